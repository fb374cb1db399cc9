//! Whether a decrypted packet carries another tunnel's packet.
//!
//! A peer may send, inside its tunnel, a packet from one of its own addresses (so it passes
//! the source check) to an address this node holds in its cluster's pod range (a CNI
//! bridge's gateway, `flannel.1`, `cilium_host`), whose payload is a whole packet of
//! another tunnel: IP-in-IP, GRE, VXLAN, Geneve. If the node runs such a tunnel (a CNI in
//! VXLAN or IPIP mode does, on every address it holds), the kernel decapsulates it and
//! routes the inner packet, whose source and destination the peer chose freely: the peer
//! would claim addresses that are not its own and reach networks the destination check
//! keeps it from. Pods have no reason to tunnel to each other across clusters through the
//! mesh, so in a cluster (where the agent knows its own ranges) such packets are dropped.
//!
//! What is recognised: the IP protocols of tunnels the Linux kernel decapsulates
//! ([`PROTOCOLS`]), in every fragment, and the well-known UDP ports of UDP tunnels
//! ([`UDP_PORTS`]), in an unfragmented packet or a first fragment. An IPv6 extension
//! header chain is walked to its end; one too long to walk, or a UDP header cut short, is
//! treated as a tunnel (the kernel would have to guess too). Foo-over-UDP, GUE and
//! tunnels moved to ports of the administrator's choosing (Calico's `vxlanPort`, Cilium's
//! `tunnel-port`, flannel's `Port`) are not recognised.
//!
//! Source routes steer a packet the same way, to an address written inside it: an IPv6
//! Routing Header with segments left (SRv6, RPL, where the node enables them) or an IPv4
//! loose or strict source route option. Those are dropped too.

/// IP protocol numbers (IANA) of tunnels: IPv4-in-IP (IPIP), IPv6-in-IP (SIT, ip6ip6),
/// GRE (also ERSPAN, NVGRE, gretap), EtherIP, L2TPv3, MPLS-in-IP and Ethernet (SRv6).
pub const PROTOCOLS: [u8; 7] = [4, 41, 47, 97, 115, 137, 143];

/// Well-known UDP destination ports of tunnels: L2TP (1701), GRE-in-UDP (4754), VXLAN
/// (4789), VXLAN-GPE (4790), Geneve (6081), MPLS-in-UDP (6635), Weave Net's fast
/// datapath (6784) and Linux's VXLAN default (8472, used by flannel and Cilium).
pub const UDP_PORTS: [u16; 8] = [1701, 4754, 4789, 4790, 6081, 6635, 6784, 8472];

/// IPv4 options that route a packet by addresses inside it (RFC 791): loose and strict
/// source route.
const SOURCE_ROUTE_OPTIONS: [u8; 2] = [0x83, 0x89];

const PROTO_UDP: u8 = 17;
/// IPv6 extension headers (RFC 8200 §4) and AH (RFC 4302), which chain like them.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AH: u8 = 51;
const EXT_DESTINATION: u8 = 60;
/// Extension headers walked at most; a longer chain counts as a tunnel.
const MAX_EXTENSIONS: usize = 16;

/// True when `packet` (an IPv4 or IPv6 packet, as decrypted) carries another tunnel's
/// packet or a source route, or its headers are too short or too long to tell. Anything else, including a
/// packet that is neither IPv4 nor IPv6, is false: other checks drop those.
pub fn carries_tunnel(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => v4(packet).is_none_or(|inner| inner.is_tunnel()),
        Some(6) => v6(packet).is_none_or(|inner| inner.is_tunnel()),
        _ => false,
    }
}

/// The payload's protocol and, for a packet that holds the transport header (not a later
/// fragment), the UDP destination port or `None` when the header is cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Payload {
    protocol: u8,
    udp_port: Option<Option<u16>>,
}

impl Payload {
    fn is_tunnel(self) -> bool {
        if PROTOCOLS.contains(&self.protocol) {
            return true;
        }
        match (self.protocol, self.udp_port) {
            (PROTO_UDP, Some(None)) => true,
            (PROTO_UDP, Some(Some(port))) => UDP_PORTS.contains(&port),
            _ => false,
        }
    }
}

fn port_at(packet: &[u8], at: usize) -> Option<u16> {
    let b = packet.get(at + 2..at + 4)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// `None` when the header is cut short.
fn v4(packet: &[u8]) -> Option<Payload> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let protocol = *packet.get(9)?;
    let flags = packet.get(6..8)?;
    let offset = u16::from_be_bytes([*flags.first()?, *flags.get(1)?]) & 0x1fff;
    if ihl < 20 || packet.len() < ihl {
        return None;
    }
    // The options: a source route, or a list that does not parse, counts as a tunnel.
    let mut at = 20;
    while at < ihl {
        match *packet.get(at)? {
            0 => break,
            1 => at += 1,
            kind if SOURCE_ROUTE_OPTIONS.contains(&kind) => return None,
            _ => {
                let len = usize::from(*packet.get(at + 1)?);
                if len < 2 {
                    return None;
                }
                at += len;
            }
        }
    }
    if at > ihl {
        return None;
    }
    let udp_port = (offset == 0).then(|| port_at(packet, ihl));
    Some(Payload { protocol, udp_port })
}

/// `None` when the header or its extension chain is cut short or too long.
fn v6(packet: &[u8]) -> Option<Payload> {
    let mut next = *packet.get(6)?;
    let mut at = 40;
    if packet.len() < at {
        return None;
    }
    let mut first = true;
    for _ in 0..MAX_EXTENSIONS {
        match next {
            EXT_ROUTING if *packet.get(at + 3)? != 0 => return None,
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DESTINATION => {
                let len = (usize::from(*packet.get(at + 1)?) + 1) * 8;
                next = *packet.get(at)?;
                at += len;
            }
            EXT_AH => {
                let len = (usize::from(*packet.get(at + 1)?) + 2) * 4;
                next = *packet.get(at)?;
                at += len;
            }
            EXT_FRAGMENT => {
                let b = packet.get(at + 2..at + 4)?;
                let offset = u16::from_be_bytes([*b.first()?, *b.get(1)?]) & 0xfff8;
                first &= offset == 0;
                next = *packet.get(at)?;
                at += 8;
            }
            protocol => {
                let udp_port = first.then(|| port_at(packet, at));
                return Some(Payload { protocol, udp_port });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_packet(protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0];
        p.splice(6..8, frag.to_be_bytes());
        p.extend_from_slice(&[10, 2, 0, 2, 10, 1, 0, 1]);
        p.extend_from_slice(payload);
        p
    }

    fn udp(port: u16) -> Vec<u8> {
        let mut h = vec![0x30, 0x39];
        h.extend_from_slice(&port.to_be_bytes());
        h.extend_from_slice(&[0, 8, 0, 0]);
        h
    }

    /// IPv6 with the given extension headers (each as next-header-less bytes: the chain is
    /// linked here) then `protocol` and `payload`.
    fn v6_packet(exts: &[(u8, Vec<u8>)], protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
        p.extend_from_slice(&[0xfd; 32]);
        let mut kinds: Vec<u8> = exts.iter().map(|(k, _)| *k).collect();
        kinds.push(protocol);
        if let Some(first) = kinds.first() {
            p[6] = *first;
        }
        for (i, (_, body)) in exts.iter().enumerate() {
            let mut h = body.clone();
            h[0] = kinds[i + 1];
            p.extend_from_slice(&h);
        }
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn ip_in_ip_gre_and_udp_tunnels_are_recognised_in_ipv4() {
        for protocol in PROTOCOLS {
            assert!(carries_tunnel(&v4_packet(protocol, 0, &[0; 20])));
            // Every fragment names the protocol.
            assert!(carries_tunnel(&v4_packet(protocol, 0x0040, &[0; 8])));
        }
        for port in UDP_PORTS {
            assert!(carries_tunnel(&v4_packet(17, 0, &udp(port))), "{port}");
            // A first fragment (more fragments, offset 0) holds the port.
            assert!(carries_tunnel(&v4_packet(17, 0x2000, &udp(port))));
        }
        for (protocol, payload) in [
            (17, udp(53)),
            (17, udp(51820)),
            (6, vec![0; 20]),
            (1, vec![8, 0, 0, 0]),
        ] {
            assert!(!carries_tunnel(&v4_packet(protocol, 0, &payload)));
        }
        // A later fragment of a UDP datagram: its port is in the first one.
        assert!(!carries_tunnel(&v4_packet(17, 0x0001, &udp(4789))));
        // Options move the UDP header.
        let mut with_options = v4_packet(17, 0, &[1, 1, 1, 0]);
        with_options[0] = 0x46;
        with_options.extend_from_slice(&udp(8472));
        assert!(carries_tunnel(&with_options));
    }

    #[test]
    fn source_routes_count_as_tunnels() {
        let options = |opts: &[u8]| {
            let mut p = v4_packet(6, 0, &[]);
            p[0] = 0x40 | (5 + opts.len() / 4) as u8;
            p.extend_from_slice(opts);
            p.extend_from_slice(&[0; 20]);
            p
        };
        // Loose and strict source route; a NOP then a timestamp option does not route.
        assert!(carries_tunnel(&options(&[0x83, 7, 4, 10, 0, 0, 1, 0])));
        assert!(carries_tunnel(&options(&[1, 0x89, 7, 4, 10, 0, 0, 1])));
        assert!(!carries_tunnel(&options(&[1, 0x44, 4, 5, 0, 0, 0, 0])));
        // An option longer than the header, or of length 0.
        assert!(carries_tunnel(&options(&[0x44, 12, 5, 0])));
        assert!(carries_tunnel(&options(&[0x44, 0, 0, 0])));
        // IPv6: a Routing Header with segments left steers; with none left it does not.
        let routing = |left: u8| vec![0, 0, 4, left, 0, 0, 0, 0];
        assert!(carries_tunnel(&v6_packet(&[(43, routing(1))], 6, &[0; 20])));
        assert!(!carries_tunnel(&v6_packet(
            &[(43, routing(0))],
            6,
            &[0; 20]
        )));
    }

    #[test]
    fn a_header_too_short_to_tell_counts_as_a_tunnel() {
        assert!(carries_tunnel(&v4_packet(17, 0, &[0x30, 0x39])));
        assert!(carries_tunnel(&[0x45, 0, 0]));
        assert!(carries_tunnel(&[0x44; 20]));
        assert!(carries_tunnel(&[0x60; 20]));
        assert!(!carries_tunnel(&[]));
        assert!(!carries_tunnel(&[0x10; 40]));
    }

    #[test]
    fn ipv6_extension_chains_are_walked_to_the_payload() {
        let opts = vec![0, 0, 1, 4, 0, 0, 0, 0];
        let frag = |offset: u16| {
            let mut h = vec![0, 0];
            h.extend_from_slice(&offset.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1]);
            h
        };
        let ah = vec![0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        assert!(carries_tunnel(&v6_packet(&[], 41, &[0; 40])));
        assert!(carries_tunnel(&v6_packet(
            &[(0, opts.clone()), (60, opts.clone())],
            4,
            &[0; 20]
        )));
        assert!(carries_tunnel(&v6_packet(&[(51, ah.clone())], 47, &[0; 4])));
        assert!(carries_tunnel(&v6_packet(
            &[(60, opts.clone())],
            17,
            &udp(6081)
        )));
        assert!(carries_tunnel(&v6_packet(&[(44, frag(0))], 17, &udp(4789))));
        // A later fragment still names the protocol, not the port.
        assert!(carries_tunnel(&v6_packet(&[(44, frag(8))], 47, &[0; 8])));
        assert!(!carries_tunnel(&v6_packet(
            &[(44, frag(8))],
            17,
            &udp(4789)
        )));
        assert!(!carries_tunnel(&v6_packet(
            &[(60, opts.clone())],
            17,
            &udp(53)
        )));
        assert!(!carries_tunnel(&v6_packet(&[], 58, &[128, 0, 0, 0])));
        // A chain longer than the walk, or cut short, is not let through.
        let long: Vec<(u8, Vec<u8>)> = (0..MAX_EXTENSIONS).map(|_| (60, opts.clone())).collect();
        assert!(carries_tunnel(&v6_packet(&long, 6, &[0; 20])));
        let mut cut = v6_packet(&[(60, opts)], 17, &udp(53));
        cut.truncate(44);
        assert!(carries_tunnel(&cut));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_u32;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            for version in [0x45, 0x4f, 0x60] {
                let mut p = bytes.clone();
                if let Some(b) = p.first_mut() {
                    *b = version;
                }
                let _ = carries_tunnel(&p);
            }
        }
    }
}
