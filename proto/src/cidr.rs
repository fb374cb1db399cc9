//! IP prefixes: allowed IPs and routes ([`IpCidr`], host bits cleared) and interface
//! addresses ([`InterfaceAddress`], host bits kept).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a prefix did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The prefix length is not a number or too long for the family.
    #[error("prefix length {0:?} is not between 0 and {1}")]
    PrefixLength(String, u8),
}

/// A network prefix whose host bits are zero, such as `10.1.0.0/16`.
///
/// Parsing accepts host bits (as `wg` does) and clears them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    addr: IpAddr,
    len: u8,
}

impl IpCidr {
    /// A prefix from an address and a length; host bits are cleared.
    ///
    /// # Errors
    /// [`CidrError::PrefixLength`] when `len` is longer than the family allows.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, CidrError> {
        let max = max_len(addr);
        if len > max {
            return Err(CidrError::PrefixLength(len.to_string(), max));
        }
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }

    /// The single-address prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: max_len(addr),
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// True for a zero-length prefix (`0.0.0.0/0` or `::/0`).
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    /// True when `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// True when the two prefixes share at least one address.
    pub fn overlaps(&self, other: &IpCidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// True when every address of `other` is inside this prefix.
    pub fn covers(&self, other: &IpCidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }
}

impl FromStr for IpCidr {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr, len) = parse_prefix(text)?;
        Self::new(addr, len)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An address on an interface with its prefix length, such as `10.1.0.1/24`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceAddress {
    /// The address itself (host bits kept).
    pub addr: IpAddr,
    /// The length of the on-link prefix.
    pub len: u8,
}

impl InterfaceAddress {
    /// The on-link network this address implies.
    pub fn network(&self) -> IpCidr {
        IpCidr {
            addr: mask(self.addr, self.len),
            len: self.len,
        }
    }
}

impl FromStr for InterfaceAddress {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr, len) = parse_prefix(text)?;
        let max = max_len(addr);
        if len > max {
            return Err(CidrError::PrefixLength(len.to_string(), max));
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for InterfaceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for InterfaceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `addr[/len]`; a missing length means a single host.
fn parse_prefix(text: &str) -> Result<(IpAddr, u8), CidrError> {
    let text = text.trim();
    let (addr_text, len_text) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| CidrError::Address(addr_text.to_owned()))?;
    let max = max_len(addr);
    let len = match len_text {
        None => max,
        Some(l) => {
            if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 3 {
                return Err(CidrError::PrefixLength(l.to_owned(), max));
            }
            let n: u16 = l
                .parse()
                .map_err(|_| CidrError::PrefixLength(l.to_owned(), max))?;
            if n > u16::from(max) {
                return Err(CidrError::PrefixLength(l.to_owned(), max));
            }
            n as u8
        }
    };
    Ok((addr, len))
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bits_are_cleared() {
        let c: IpCidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        let c: IpCidr = "fd00::1/64".parse().unwrap();
        assert_eq!(c.to_string(), "fd00::/64");
    }

    #[test]
    fn missing_length_means_host() {
        let c: IpCidr = "10.0.0.1".parse().unwrap();
        assert_eq!(c.prefix_len(), 32);
    }

    #[test]
    fn bad_prefixes_are_refused() {
        assert!(matches!(
            "10.0.0.0/33".parse::<IpCidr>(),
            Err(CidrError::PrefixLength(..))
        ));
        assert!(matches!(
            "10.0.0/8".parse::<IpCidr>(),
            Err(CidrError::Address(..))
        ));
        assert!(matches!(
            "10.0.0.0/-1".parse::<IpCidr>(),
            Err(CidrError::PrefixLength(..))
        ));
        assert!(matches!(
            "10.0.0.0/".parse::<IpCidr>(),
            Err(CidrError::PrefixLength(..))
        ));
    }

    #[test]
    fn overlap_and_cover() {
        let a: IpCidr = "10.0.0.0/8".parse().unwrap();
        let b: IpCidr = "10.2.0.0/16".parse().unwrap();
        let c: IpCidr = "192.168.0.0/16".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(a.covers(&b) && !b.covers(&a));
        assert!(!a.overlaps(&c));
        let v6: IpCidr = "::/0".parse().unwrap();
        assert!(!v6.overlaps(&a));
    }
}
