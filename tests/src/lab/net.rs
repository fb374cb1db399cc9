//! The lab's address plan (the ranges underlays and pods must come from) and the prefix
//! arithmetic it needs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, ensure};

/// The range underlay addresses must come from: RFC 2544's benchmarking block.
pub(super) const UNDERLAY_RANGE: Ipv4Net = Ipv4Net {
    network: Ipv4Addr::new(198, 18, 0, 0),
    len: 15,
};

/// The range pod CIDRs must come from (RFC 1918), used only inside lab namespaces.
pub(super) const POD_RANGE: Ipv4Net = Ipv4Net {
    network: Ipv4Addr::new(10, 0, 0, 0),
    len: 8,
};

/// The range IPv6 underlay prefixes must come from: unique local addresses (RFC 4193).
pub(super) const UNDERLAY_RANGE6: Ipv6Net = Ipv6Net {
    network: Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 0),
    len: 16,
};

/// The range IPv6 pod CIDRs must come from: unique local addresses (RFC 4193).
pub(super) const POD_RANGE6: Ipv6Net = Ipv6Net {
    network: Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 0),
    len: 16,
};

/// An IPv4 prefix with host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ipv4Net {
    pub(super) network: Ipv4Addr,
    pub(super) len: u8,
}

impl Ipv4Net {
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    pub(super) fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.network)
    }

    pub(super) fn within(&self, outer: &Ipv4Net) -> bool {
        self.len >= outer.len && outer.contains(self.network)
    }

    pub(super) fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask(self.len))
    }

    /// The `n`th address of the prefix, if inside it.
    pub(super) fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from(u32::from(self.network).checked_add(n)?);
        self.contains(ip).then_some(ip)
    }
}

impl FromStr for Ipv4Net {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("{s:?} is not an IPv4 CIDR like 10.1.0.0/24"))?;
        let addr: Ipv4Addr = addr.parse().with_context(|| format!("address in {s:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("prefix length in {s:?}"))?;
        ensure!(len <= 32, "prefix length {len} in {s:?} is longer than 32");
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// An IPv6 prefix with host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ipv6Net {
    pub(super) network: Ipv6Addr,
    pub(super) len: u8,
}

impl Ipv6Net {
    fn mask(len: u8) -> u128 {
        u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }

    pub(super) fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask(self.len) == u128::from(self.network)
    }

    pub(super) fn within(&self, outer: &Ipv6Net) -> bool {
        self.len >= outer.len && outer.contains(self.network)
    }

    /// The `n`th address of the prefix, if inside it.
    pub(super) fn host(&self, n: u32) -> Option<Ipv6Addr> {
        let ip = Ipv6Addr::from(u128::from(self.network).checked_add(u128::from(n))?);
        self.contains(ip).then_some(ip)
    }
}

impl FromStr for Ipv6Net {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("{s:?} is not an IPv6 CIDR like fd10:1::/64"))?;
        let addr: Ipv6Addr = addr.parse().with_context(|| format!("address in {s:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("prefix length in {s:?}"))?;
        ensure!(
            len <= 128,
            "prefix length {len} in {s:?} is longer than 128"
        );
        Ok(Self {
            network: Ipv6Addr::from(u128::from(addr) & Self::mask(len)),
            len,
        })
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// The prefix of an underlay: IPv4, or IPv6 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UnderlayNet {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl UnderlayNet {
    pub(super) fn len(&self) -> u8 {
        match self {
            UnderlayNet::V4(net) => net.len,
            UnderlayNet::V6(net) => net.len,
        }
    }

    /// Whether `ip` may be a host's address: inside the prefix, of its family, and neither
    /// the network address nor (IPv4) the broadcast address.
    pub(super) fn is_host(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (UnderlayNet::V4(net), IpAddr::V4(ip)) => {
                net.contains(ip) && ip != net.network && ip != net.broadcast()
            }
            (UnderlayNet::V6(net), IpAddr::V6(ip)) => net.contains(ip) && ip != net.network,
            _ => false,
        }
    }
}

impl fmt::Display for UnderlayNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnderlayNet::V4(net) => net.fmt(f),
            UnderlayNet::V6(net) => net.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_clears_host_bits() {
        let net: Ipv4Net = "10.1.2.3/24".parse().unwrap();
        assert_eq!(net.to_string(), "10.1.2.0/24");
        assert_eq!(net.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(net.host(1), Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(net.host(256), None);
    }

    #[test]
    fn only_benchmarking_range_is_an_underlay() {
        let ok: Ipv4Net = "198.19.4.0/24".parse().unwrap();
        let bad: Ipv4Net = "192.168.0.0/16".parse().unwrap();
        let too_wide: Ipv4Net = "198.16.0.0/12".parse().unwrap();
        assert!(ok.within(&UNDERLAY_RANGE));
        assert!(!bad.within(&UNDERLAY_RANGE));
        assert!(!too_wide.within(&UNDERLAY_RANGE));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert!("10.0.0.0".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("x/8".parse::<Ipv4Net>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().len, 0);
    }

    #[test]
    fn ipv6_prefixes_parse_and_stay_in_their_ranges() {
        let net: Ipv6Net = "fd10:1::5/64".parse().unwrap();
        assert_eq!(net.to_string(), "fd10:1::/64");
        assert_eq!(net.host(1), Some("fd10:1::1".parse().unwrap()));
        assert!(net.within(&POD_RANGE6));
        assert!(!net.within(&UNDERLAY_RANGE6));
        let tiny: Ipv6Net = "fd10:1::/127".parse().unwrap();
        assert_eq!(tiny.host(2), None);
        let ul: Ipv6Net = "fd18:1::/64".parse().unwrap();
        assert!(ul.within(&UNDERLAY_RANGE6));
        assert!(
            !"2001:db8::/64"
                .parse::<Ipv6Net>()
                .unwrap()
                .within(&UNDERLAY_RANGE6)
        );
        assert!(
            !"fd00::/8"
                .parse::<Ipv6Net>()
                .unwrap()
                .within(&UNDERLAY_RANGE6)
        );
        assert!("fd10::/129".parse::<Ipv6Net>().is_err());
        assert_eq!("::/0".parse::<Ipv6Net>().unwrap().len, 0);
        let underlay = UnderlayNet::V6(ul);
        assert!(underlay.is_host("fd18:1::2".parse().unwrap()));
        assert!(!underlay.is_host("fd18:1::".parse().unwrap()));
        assert!(!underlay.is_host("198.18.0.1".parse().unwrap()));
    }
}
