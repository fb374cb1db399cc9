//! The lab's address plan (the ranges underlays and pods must come from) and the prefix
//! arithmetic it needs on top of `proto`'s [`IpCidr`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};
use wiremesh_proto::IpCidr;

/// The range underlay addresses must come from: RFC 2544's benchmarking block.
pub(super) fn underlay_range() -> IpCidr {
    prefix(Ipv4Addr::new(198, 18, 0, 0), 15)
}

/// The range pod CIDRs must come from (RFC 1918), used only inside lab namespaces.
pub(super) fn pod_range() -> IpCidr {
    prefix(Ipv4Addr::new(10, 0, 0, 0), 8)
}

/// The range IPv6 underlay prefixes must come from: unique local addresses (RFC 4193).
pub(super) fn underlay_range6() -> IpCidr {
    prefix(Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 0), 16)
}

/// The range IPv6 pod CIDRs must come from: unique local addresses (RFC 4193).
pub(super) fn pod_range6() -> IpCidr {
    prefix(Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 0), 16)
}

/// Parses an IPv4 prefix written with its length, such as `10.1.0.0/24`; host bits are
/// cleared.
///
/// # Errors
/// When `text` has no `/`, is not IPv4, or does not parse.
pub(super) fn parse_v4(text: &str) -> Result<IpCidr> {
    parse(text, false, "an IPv4 CIDR like 10.1.0.0/24")
}

/// Parses an IPv6 prefix written with its length, such as `fd10:1::/64`; host bits are
/// cleared.
///
/// # Errors
/// When `text` has no `/`, is not IPv6, or does not parse.
pub(super) fn parse_v6(text: &str) -> Result<IpCidr> {
    parse(text, true, "an IPv6 CIDR like fd10:1::/64")
}

/// What the lab asks of a prefix beyond [`IpCidr`]'s own methods.
pub(super) trait LabPrefix {
    /// Whether every address of this prefix is inside `outer`.
    fn within(&self, outer: &IpCidr) -> bool;

    /// The `n`th address of an IPv4 prefix (the network address is the 0th), if inside it.
    fn nth_v4(&self, n: u32) -> Option<Ipv4Addr>;

    /// The `n`th address of an IPv6 prefix (the network address is the 0th), if inside it.
    fn nth_v6(&self, n: u32) -> Option<Ipv6Addr>;

    /// The last address of the prefix: for IPv4, its broadcast address.
    fn last(&self) -> IpAddr;

    /// Whether `ip` may be a host's address: inside the prefix, of its family, and neither
    /// the network address nor (IPv4) the broadcast address.
    fn is_host(&self, ip: IpAddr) -> bool;
}

impl LabPrefix for IpCidr {
    fn within(&self, outer: &IpCidr) -> bool {
        outer.covers(self)
    }

    fn nth_v4(&self, n: u32) -> Option<Ipv4Addr> {
        let IpAddr::V4(network) = self.addr() else {
            return None;
        };
        let ip = Ipv4Addr::from(u32::from(network).checked_add(n)?);
        self.contains(IpAddr::V4(ip)).then_some(ip)
    }

    fn nth_v6(&self, n: u32) -> Option<Ipv6Addr> {
        let IpAddr::V6(network) = self.addr() else {
            return None;
        };
        let ip = Ipv6Addr::from(u128::from(network).checked_add(u128::from(n))?);
        self.contains(IpAddr::V6(ip)).then_some(ip)
    }

    fn last(&self) -> IpAddr {
        let len = u32::from(self.prefix_len());
        match self.addr() {
            IpAddr::V4(network) => {
                let hosts = u32::MAX.checked_shr(len).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(network) | hosts))
            }
            IpAddr::V6(network) => {
                let hosts = u128::MAX.checked_shr(len).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(network) | hosts))
            }
        }
    }

    fn is_host(&self, ip: IpAddr) -> bool {
        self.contains(ip) && ip != self.addr() && (ip.is_ipv6() || ip != self.last())
    }
}

fn parse(text: &str, ipv6: bool, example: &str) -> Result<IpCidr> {
    ensure!(
        text.contains('/') && text.trim() == text,
        "{text:?} is not {example}"
    );
    let net: IpCidr = text
        .parse()
        .with_context(|| format!("{text:?} is not {example}"))?;
    ensure!(net.addr().is_ipv6() == ipv6, "{text:?} is not {example}");
    Ok(net)
}

fn prefix(network: impl Into<IpAddr>, len: u8) -> IpCidr {
    // Only called above, with lengths that fit the family.
    IpCidr::new(network.into(), len).expect("a prefix length within the family's bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_clears_host_bits() {
        let net = parse_v4("10.1.2.3/24").unwrap();
        assert_eq!(net.to_string(), "10.1.2.0/24");
        assert_eq!(net.last(), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(net.nth_v4(1), Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(net.nth_v4(256), None);
    }

    #[test]
    fn only_benchmarking_range_is_an_underlay() {
        let ok = parse_v4("198.19.4.0/24").unwrap();
        let bad = parse_v4("192.168.0.0/16").unwrap();
        let too_wide = parse_v4("198.16.0.0/12").unwrap();
        assert!(ok.within(&underlay_range()));
        assert!(!bad.within(&underlay_range()));
        assert!(!too_wide.within(&underlay_range()));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert!(parse_v4("10.0.0.0").is_err());
        assert!(parse_v4("10.0.0.0/33").is_err());
        assert!(parse_v4("x/8").is_err());
        assert_eq!(parse_v4("0.0.0.0/0").unwrap().prefix_len(), 0);
    }

    #[test]
    fn ipv6_prefixes_parse_and_stay_in_their_ranges() {
        let net = parse_v6("fd10:1::5/64").unwrap();
        assert_eq!(net.to_string(), "fd10:1::/64");
        assert_eq!(net.nth_v6(1), Some("fd10:1::1".parse().unwrap()));
        assert!(net.within(&pod_range6()));
        assert!(!net.within(&underlay_range6()));
        let tiny = parse_v6("fd10:1::/127").unwrap();
        assert_eq!(tiny.nth_v6(2), None);
        let ul = parse_v6("fd18:1::/64").unwrap();
        assert!(ul.within(&underlay_range6()));
        assert!(
            !parse_v6("2001:db8::/64")
                .unwrap()
                .within(&underlay_range6())
        );
        assert!(!parse_v6("fd00::/8").unwrap().within(&underlay_range6()));
        assert!(parse_v6("fd10::/129").is_err());
        assert_eq!(parse_v6("::/0").unwrap().prefix_len(), 0);
        assert!(ul.is_host("fd18:1::2".parse().unwrap()));
        assert!(!ul.is_host("fd18:1::".parse().unwrap()));
        assert!(!ul.is_host("198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn families_do_not_mix() {
        assert!(parse_v4("fd10::/64").is_err());
        assert!(parse_v6("10.0.0.0/8").is_err());
        assert!(parse_v4(" 10.0.0.0/8").is_err());
        let v4 = parse_v4("198.18.0.0/16").unwrap();
        assert!(v4.is_host("198.18.0.1".parse().unwrap()));
        assert!(!v4.is_host("198.18.255.255".parse().unwrap()));
        assert!(!v4.is_host("198.18.0.0".parse().unwrap()));
        assert_eq!(v4.nth_v6(1), None);
    }
}
