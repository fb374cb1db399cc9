//! The protocol core: peer table, cryptokey routing and the verdict for every packet.
//!
//! Nothing in here does I/O: no sockets, no TUN device, no netlink, no async runtime.
//! Callers hand in bytes and get back what to do with them ([`TunVerdict`],
//! [`DatagramVerdict`]). This crate's dependencies are `wiremesh-proto` and boringtun's
//! noise state machine (without its `device` feature) and nothing else, so the compiler
//! keeps it that way: the agent's `wiremesh-agent` crate is the shell that does the I/O.
//!
//! Nothing here may panic on bytes from outside (a peer, a pod, the kernel): no indexing
//! or slicing that is not checked. Tests index freely.
#![deny(clippy::indexing_slicing)]
#![cfg_attr(test, allow(clippy::indexing_slicing))]

pub mod allowed_ips;
pub mod checksum;
mod device;
pub mod encap;
mod endpoint;
pub mod handshake_limiter;
pub mod keys;
pub mod mtu;
pub mod offload;
pub mod translate;

pub use allowed_ips::AllowedIps;
pub use device::{
    ApplyOutcome, DatagramVerdict, Device, DeviceError, PeerId, PeerView, TunVerdict,
};
pub use endpoint::Endpoint;
pub use handshake_limiter::HandshakeLimiter;

use std::fmt;

/// Why a packet was dropped. Each variant is a counter and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A packet from the TUN device for an address no peer is allowed.
    NoRoute,
    /// A packet for a peer that has no endpoint to send to.
    NoEndpoint,
    /// A packet from the TUN device that is not IPv4 or IPv6.
    BadTunPacket,
    /// A decrypted packet whose source address is not in the sending peer's allowed IPs.
    BadSource,
    /// A datagram that is not a well-formed WireGuard message.
    BadPacket,
    /// A handshake whose MAC does not verify.
    BadMac,
    /// A datagram for a receiver index or static key no peer has.
    UnknownPeer,
    /// A data packet that fails authenticated decryption.
    BadAuth,
    /// A data packet whose counter was already seen or is too old (a replay).
    Replay,
    /// A handshake refused because we are under load and it had no valid cookie.
    UnderLoad,
    /// A handshake message that does not fit the handshake state (stale, wrong key,
    /// old timestamp).
    BadHandshake,
    /// The device has no private key yet.
    NoPrivateKey,
    /// Any other failure inside the noise state machine.
    Internal,
    /// A packet from the TUN device larger than the tunnel MTU that must not be fragmented
    /// (IPv4 with DF, IPv6); answered with an ICMP "fragmentation needed" or "packet too
    /// big" unless the rate limit is spent.
    TooBig,
    /// A handshake message from a source address that has had its share of handshake
    /// work this second ([`handshake_limiter`]), although it answered our cookie.
    RateLimited,
    /// A handshake message addressed to a static key of ours that was rotated out
    /// ([`Device::rotate_private_key`]): its MAC verifies only under that old key.
    RetiredKey,
    /// A packet the prefix translation ([`translate`]) could not map: malformed headers,
    /// or an IPv6 address NPTv6 cannot map checksum-neutrally.
    Untranslatable,
    /// A decrypted packet for an address that is neither in this cluster's own ranges
    /// ([`translate::Translation::with_own_ranges`]) nor another peer's allowed IPs: a
    /// peer using this node to reach its other networks, its metadata service or beyond.
    BadDestination,
    /// A decrypted packet that carries another tunnel's packet (IP-in-IP, GRE, VXLAN,
    /// Geneve, ...; [`encap`]), which a node that runs such a tunnel would unwrap and route
    /// with whatever inner addresses the peer chose. Checked where the destinations are.
    Encapsulated,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 19] = [
        Self::NoRoute,
        Self::NoEndpoint,
        Self::BadTunPacket,
        Self::BadSource,
        Self::BadPacket,
        Self::BadMac,
        Self::UnknownPeer,
        Self::BadAuth,
        Self::Replay,
        Self::UnderLoad,
        Self::BadHandshake,
        Self::NoPrivateKey,
        Self::Internal,
        Self::TooBig,
        Self::RateLimited,
        Self::RetiredKey,
        Self::Untranslatable,
        Self::BadDestination,
        Self::Encapsulated,
    ];

    /// A short snake_case name, used as metric label and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::NoEndpoint => "no_endpoint",
            Self::BadTunPacket => "bad_tun_packet",
            Self::BadSource => "bad_source",
            Self::BadPacket => "bad_packet",
            Self::BadMac => "bad_mac",
            Self::UnknownPeer => "unknown_peer",
            Self::BadAuth => "bad_auth",
            Self::Replay => "replay",
            Self::UnderLoad => "under_load",
            Self::BadHandshake => "bad_handshake",
            Self::NoPrivateKey => "no_private_key",
            Self::Internal => "internal",
            Self::TooBig => "too_big",
            Self::RateLimited => "rate_limited",
            Self::RetiredKey => "retired_key",
            Self::Untranslatable => "untranslatable",
            Self::BadDestination => "bad_destination",
            Self::Encapsulated => "encapsulated",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Device-wide counters of dropped packets and cookie replies.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    drops: [u64; DropReason::ALL.len()],
    /// Cookie replies sent because we were under load.
    pub cookies_sent: u64,
}

impl Counters {
    /// Counts one dropped packet.
    pub fn drop(&mut self, reason: DropReason) {
        if let Some(count) = self.drops.get_mut(reason.index()) {
            *count += 1;
        }
    }

    /// How many packets were dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// Every reason with its count, in a stable order.
    pub fn all_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops(*r)))
    }
}
