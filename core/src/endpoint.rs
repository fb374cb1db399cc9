//! Where a peer is: its UDP address, and the local address that reaches it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A peer's endpoint as WireGuard keeps it (the kernel's `struct endpoint`): the remote
/// UDP address, and the local address the last authenticated datagram from it arrived on
/// (the "sticky" source, `IP_PKTINFO`/`IPV6_PKTINFO`), which replies leave from so that
/// the peer sees them come from the address it sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// The peer's address and port.
    pub addr: SocketAddr,
    /// Our address to send from; `None` lets the kernel choose (a configured endpoint,
    /// or one whose local address stopped working).
    pub local: Option<IpAddr>,
}

impl Endpoint {
    /// An endpoint reached from `local`.
    pub fn new(addr: SocketAddr, local: Option<IpAddr>) -> Self {
        Self { addr, local }
    }
}

impl From<SocketAddr> for Endpoint {
    /// An endpoint with no local address: the kernel chooses one.
    fn from(addr: SocketAddr) -> Self {
        Self { addr, local: None }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.local {
            Some(local) => write!(f, "{} (from {local})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}
