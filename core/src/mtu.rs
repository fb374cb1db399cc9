//! The tunnel MTU: how large an inner packet the tunnel carries without fragmenting the
//! underlay, and the ICMP error that answers a larger one, so that path MTU discovery
//! (RFC 1191, RFC 8201) works and no connection stalls in an MTU black hole.
//!
//! - [`tunnel_mtu`]: the MTU of the underlay paths less WireGuard's overhead;
//!   [`with_ipv6_floor`]: at least the IPv6 minimum on a tunnel that carries IPv6.
//! - [`MtuGuard`]: the verdict for each packet read from the TUN device; for one that is too
//!   big and must not be fragmented, an ICMPv4 "fragmentation needed" (RFC 792, RFC 1191)
//!   or ICMPv6 "packet too big" (RFC 4443 §3.2) to write back into the TUN device, within a
//!   [`TokenBucket`].
//!
//! The errors come from the destination of the packet they answer, as if the far end's
//! side of the tunnel sent them. Not from the TUN device's own address: Linux drops a packet
//! that enters an interface with one of the host's own addresses as its source (a "martian",
//! `fib_validate_source`), so such an error would never reach a pod behind the host nor a
//! local socket. The sender matches the error to its socket by the quoted headers, whatever
//! its source.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use wiremesh_proto::IpCidr;

use super::checksum;

/// WireGuard's overhead on an IPv4 underlay: the IPv4 header (20), the UDP header (8), the
/// data message header (16: type, reserved, receiver index, counter; whitepaper §5.4.6) and
/// the Poly1305 tag (16). The padding to a multiple of 16 never takes a packet past the
/// tunnel MTU, so nothing else is added.
pub const OVERHEAD_V4: u32 = 60;
/// WireGuard's overhead on an IPv6 underlay: as [`OVERHEAD_V4`] with a 40-byte IP header.
pub const OVERHEAD_V6: u32 = 80;
/// The MTU used when the underlay tells us nothing: wg-quick's default, right for a
/// 1500-byte underlay of either family (1500 − 80).
pub const DEFAULT_MTU: u32 = 1420;
/// The smallest MTU an IPv4 link may have (RFC 791: every host takes 68-byte datagrams).
pub const MIN_MTU_V4: u32 = 68;
/// The smallest MTU an IPv6 link may have (RFC 8200 §5).
pub const MIN_MTU_V6: u32 = 1280;
/// The largest MTU a Linux device takes (`ETH_MAX_MTU`, `include/uapi/linux/if_ether.h`).
pub const MAX_MTU: u32 = 0xffff;
/// ICMP errors per second an interface sends: a quarter of Linux's host-wide default
/// (`net.ipv4.icmp_msgs_per_sec` = 1000), enough for every sender behind it to learn the
/// MTU within its first few packets.
pub const ICMP_PER_SECOND: u32 = 250;
/// ICMP errors sent back to back before the rate applies (Linux's `net.ipv4.icmp_msgs_burst`).
pub const ICMP_BURST: u32 = 50;
/// Room [`MtuGuard::check`] needs in `out`: the largest error is an ICMPv6 packet of the
/// IPv6 minimum MTU (RFC 4443 §3.2: "as much of invoking packet as possible without the
/// ICMPv6 packet exceeding the minimum IPv6 MTU").
pub const MAX_ICMP_LEN: usize = MIN_MTU_V6 as usize;

/// IP protocol numbers (IANA).
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// IPv4 flags and fragment offset (RFC 791): don't fragment, and the offset's bits.
const IPV4_DF: u16 = 0x4000;
const IPV4_OFFSET: u16 = 0x1fff;
/// ICMPv4 "destination unreachable" (3), code "fragmentation needed and DF set" (4).
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv4 error types, which no ICMP error may answer (RFC 1122 §3.2.2): destination
/// unreachable, source quench, redirect, time exceeded, parameter problem.
const ICMP_ERRORS: [u8; 5] = [3, 4, 5, 11, 12];
/// ICMPv6 "packet too big" (RFC 4443 §3.2).
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// ICMPv6 types below this are errors (RFC 4443 §2.1), which no ICMPv6 error may answer
/// (§2.4 (e.1)).
const ICMPV6_FIRST_INFO: u8 = 128;
/// Precedence "internetwork control" in the TOS byte, which RFC 1812 §4.3.2.5 asks of ICMP
/// errors (Linux does the same).
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
/// The TTL and hop limit of the errors we make (Linux's default `ip_default_ttl`).
const TTL: u8 = 64;
/// Headers of the errors: IPv4 (20) or IPv6 (40), then the 8-byte ICMP header.
const V4_HEADERS: usize = 20 + 8;
const V6_HEADERS: usize = 40 + 8;
/// IPv6 extension headers that may come before the ICMPv6 header (RFC 8200 §4): hop-by-hop,
/// routing, fragment, destination options.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_DEST_OPTS: u8 = 60;
/// More extension headers than this before the upper layer and we stop looking.
const MAX_EXT_HEADERS: usize = 8;

/// The MTU of one way out on the underlay: towards a peer's endpoint, or the default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnderlayPath {
    /// The underlay is IPv6 (an IPv4-mapped endpoint is IPv4).
    pub ipv6: bool,
    /// The path's MTU: the route's own, else its output interface's.
    pub mtu: u32,
}

/// The tunnel MTU over `paths`: the smallest path MTU less WireGuard's overhead for the
/// path's family ([`OVERHEAD_V4`], [`OVERHEAD_V6`]), kept within
/// [`MIN_MTU_V4`]`..=`[`MAX_MTU`] so that the TUN device takes it; `None` without a path.
pub fn tunnel_mtu(paths: impl IntoIterator<Item = UnderlayPath>) -> Option<u32> {
    paths
        .into_iter()
        .map(|p| {
            let overhead = if p.ipv6 { OVERHEAD_V6 } else { OVERHEAD_V4 };
            p.mtu.saturating_sub(overhead).clamp(MIN_MTU_V4, MAX_MTU)
        })
        .min()
}

/// `mtu` raised to [`MIN_MTU_V6`] when the tunnel carries IPv6: Linux turns IPv6 off on a
/// device whose MTU is below 1280 bytes (its addresses and routes go), so a smaller tunnel
/// would carry no IPv6 at all. The outer datagrams of such a tunnel are then fragmented on
/// the underlay (RFC 8200 §5: a link below the IPv6 minimum must fragment underneath).
pub fn with_ipv6_floor(mtu: u32, carries_ipv6: bool) -> u32 {
    if carries_ipv6 {
        mtu.max(MIN_MTU_V6)
    } else {
        mtu
    }
}

/// The MTU a tunnel of `mtu` bytes needs once it routes `routes`: raised to the IPv6
/// minimum ([`with_ipv6_floor`]) as soon as one of them is IPv6, so that IPv6 peers that
/// arrive after the MTU was derived (Kubernetes mode starts with no peer) get their routes.
/// Never lowered.
pub fn floor_for_routes<'r>(mtu: u32, routes: impl IntoIterator<Item = &'r IpCidr>) -> u32 {
    with_ipv6_floor(mtu, routes.into_iter().any(|c| c.addr().is_ipv6()))
}

/// What to do with a packet read from the TUN device, given the tunnel MTU.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum MtuVerdict<'o> {
    /// Send it: it fits, it may be fragmented on the way (IPv4 without DF, IPv6 up to the
    /// IPv6 minimum MTU), or it is no IP packet we can read (the device decides).
    Fits,
    /// Too big and must not be fragmented: drop it, and write this ICMP error into the TUN
    /// device.
    TooBig(&'o [u8]),
    /// Too big and must not be fragmented: drop it, without an answer (the rate limit is
    /// spent, or the packet is one no ICMP error may answer).
    TooBigSilently,
}

/// Checks packets against the tunnel MTU and answers the ones that are too big.
#[derive(Debug, Clone)]
pub struct MtuGuard {
    mtu: u32,
    limit: TokenBucket,
}

impl MtuGuard {
    /// A guard for a tunnel of `mtu` bytes, with [`ICMP_PER_SECOND`] answers a second at
    /// most.
    pub fn new(mtu: u32) -> Self {
        Self {
            mtu,
            limit: TokenBucket::new(ICMP_PER_SECOND, ICMP_BURST),
        }
    }

    /// The tunnel MTU.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Changes the tunnel MTU (the device's MTU changed).
    pub fn set_mtu(&mut self, mtu: u32) {
        self.mtu = mtu;
    }

    /// The verdict for one IP packet read from the TUN device (a single packet, never a
    /// GSO super-packet, whose segments the kernel already sized), at time `now`. An ICMP
    /// error is built in `out`, which needs [`MAX_ICMP_LEN`] bytes (a shorter `out` gets no
    /// answer).
    pub fn check<'o>(&mut self, packet: &[u8], now: Instant, out: &'o mut [u8]) -> MtuVerdict<'o> {
        if packet.len() as u64 <= u64::from(self.mtu) {
            return MtuVerdict::Fits;
        }
        let built = match packet.first().map(|b| b >> 4) {
            Some(4) => match too_big_v4(packet) {
                Refusal::Fits => return MtuVerdict::Fits,
                Refusal::Silently => None,
                Refusal::Answer(ihl) => self.answer(now).then(|| {
                    // The MTU field is 16 bits (RFC 1191 §4); so is every IPv4 length.
                    let mtu = u16::try_from(self.mtu).unwrap_or(u16::MAX);
                    fragmentation_needed(packet, ihl, mtu, out)
                }),
            },
            Some(6) => {
                // A link below the IPv6 minimum MTU must fragment underneath (RFC 8200 §5):
                // the underlay fragments the outer datagram.
                let mtu = self.mtu.max(MIN_MTU_V6);
                if packet.len() as u64 <= u64::from(mtu) {
                    return MtuVerdict::Fits;
                }
                match too_big_v6(packet) {
                    Refusal::Fits => return MtuVerdict::Fits,
                    Refusal::Silently => None,
                    Refusal::Answer(()) => {
                        self.answer(now).then(|| packet_too_big(packet, mtu, out))
                    }
                }
            }
            _ => return MtuVerdict::Fits,
        };
        match built.flatten().and_then(|len| out.get(..len)) {
            Some(icmp) => MtuVerdict::TooBig(icmp),
            None => MtuVerdict::TooBigSilently,
        }
    }

    fn answer(&mut self, now: Instant) -> bool {
        self.limit.take(now)
    }
}

/// A token bucket on an injected clock: `rate` tokens a second, at most `burst` saved.
/// It starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Saved credit, in nanoseconds; a token costs `cost`, at most `max` is saved.
    credit: u64,
    cost: u64,
    max: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled with `rate` a second (both at least 1).
    pub fn new(rate: u32, burst: u32) -> Self {
        let cost = 1_000_000_000 / u64::from(rate.max(1));
        let max = cost * u64::from(burst.max(1));
        Self {
            credit: max,
            cost,
            max,
            last: None,
        }
    }

    /// Takes a token at time `now` if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_nanos();
            let elapsed = u64::try_from(elapsed).unwrap_or(u64::MAX);
            self.credit = self.credit.saturating_add(elapsed).min(self.max);
        }
        // A clock that went back never moves `last` back, so it cannot earn credit twice.
        if self.last.is_none_or(|last| now > last) {
            self.last = Some(now);
        }
        if self.credit >= self.cost {
            self.credit -= self.cost;
            true
        } else {
            false
        }
    }
}

/// Whether a packet over the MTU gets an answer; `Answer` carries what the builder needs.
enum Refusal<T> {
    /// It may go on (fragmentable, or not something we can read).
    Fits,
    /// Drop it without an answer.
    Silently,
    /// Drop it and answer.
    Answer(T),
}

/// Reads an IPv4 packet over the MTU: `Answer(header length)` when it has DF set and may be
/// answered.
fn too_big_v4(packet: &[u8]) -> Refusal<usize> {
    let Some(header) = packet.first_chunk::<20>() else {
        return Refusal::Fits;
    };
    let ihl = usize::from(header[0] & 0x0f) * 4;
    if ihl < 20 || ihl > packet.len() {
        return Refusal::Fits;
    }
    let flags = u16::from_be_bytes([header[6], header[7]]);
    if flags & IPV4_DF == 0 {
        // The outer datagram is fragmented on the way instead (RFC 791).
        return Refusal::Fits;
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    // RFC 1122 §3.2.2 and RFC 1812 §4.3.2.7: no ICMP error about a non-first fragment, an
    // ICMP error, or a packet to or from an address that is not one host.
    let unanswerable = flags & IPV4_OFFSET != 0
        || !is_single_host_v4(src)
        || dst.is_broadcast()
        || dst.is_multicast()
        || (header[9] == PROTO_ICMP
            && packet
                .get(ihl)
                .is_none_or(|kind| ICMP_ERRORS.contains(kind)));
    if unanswerable {
        Refusal::Silently
    } else {
        Refusal::Answer(ihl)
    }
}

/// Reads an IPv6 packet over the MTU: it may always be answered unless RFC 4443 §2.4 (e)
/// says otherwise.
fn too_big_v6(packet: &[u8]) -> Refusal<()> {
    let Some(header) = packet.first_chunk::<40>() else {
        return Refusal::Fits;
    };
    let src = ipv6_at(header, 8);
    // §2.4 (e.2): a packet too big for a multicast destination is answered, unlike other
    // errors; (e.3): not when the source is not one node.
    if src.is_unspecified() || src.is_multicast() {
        return Refusal::Silently;
    }
    match upper_layer_v6(packet) {
        // §2.4 (e.1): never about an ICMPv6 error. An ICMPv6 header we cannot find counts as
        // one, to be safe.
        Some((PROTO_ICMPV6, at)) => match packet.get(at) {
            Some(kind) if *kind >= ICMPV6_FIRST_INFO => Refusal::Answer(()),
            _ => Refusal::Silently,
        },
        _ => Refusal::Answer(()),
    }
}

/// The upper-layer protocol of an IPv6 packet and where its header starts, past the
/// extension headers; `None` when they run off the packet, or past a non-first fragment.
fn upper_layer_v6(packet: &[u8]) -> Option<(u8, usize)> {
    let mut next = *packet.get(6)?;
    let mut at = 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                let [ext_next, ext_len] = *packet.get(at..)?.first_chunk::<2>()?;
                next = ext_next;
                at += (usize::from(ext_len) + 1) * 8;
            }
            EXT_FRAGMENT => {
                let [ext_next, _, o0, o1] = *packet.get(at..)?.first_chunk::<4>()?;
                if u16::from_be_bytes([o0, o1]) & 0xfff8 != 0 {
                    return None;
                }
                next = ext_next;
                at += 8;
            }
            protocol => return Some((protocol, at)),
        }
    }
    None
}

/// Builds, in `out`, the ICMPv4 "fragmentation needed and DF set" (type 3, code 4) answering
/// `packet` (whose header is `ihl` bytes), with next-hop MTU `mtu` (RFC 1191 §4), from the
/// packet's destination to its source, quoting the packet's IP header and first 8 bytes of
/// payload (RFC 792). Returns its length, or `None` when `out` is too short.
pub fn fragmentation_needed(packet: &[u8], ihl: usize, mtu: u16, out: &mut [u8]) -> Option<usize> {
    let header = packet.first_chunk::<20>()?;
    let quote = packet.get(..(ihl + 8).min(packet.len()))?;
    let len = V4_HEADERS + quote.len();
    let out = out.get_mut(..len)?;
    // The error goes back: from the packet's destination to its source.
    let [.., d0, d1, d2, d3, s0, s1, s2, s3] = *header;
    let (ip, icmp) = out.split_first_chunk_mut::<20>()?;
    let (icmp_header, icmp_quote) = icmp.split_first_chunk_mut::<8>()?;
    *ip = [
        0x45,
        TOS_INTERNETWORK_CONTROL,
        0,
        0,
        0,
        0,
        0,
        0,
        TTL,
        PROTO_ICMP,
        0,
        0,
        s0,
        s1,
        s2,
        s3,
        d0,
        d1,
        d2,
        d3,
    ];
    ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    let c = checksum::finish(checksum::sum(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let [m0, m1] = mtu.to_be_bytes();
    *icmp_header = [ICMP_UNREACHABLE, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m0, m1];
    icmp_quote.copy_from_slice(quote);
    let c = checksum::finish(checksum::sum(icmp));
    icmp.get_mut(2..4)?.copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// Builds, in `out`, the ICMPv6 "packet too big" (type 2, code 0) answering `packet` with
/// MTU `mtu`, from the packet's destination to its source, quoting as much of the packet as
/// keeps the answer within the IPv6 minimum MTU (RFC 4443 §3.2). Returns its length, or
/// `None` when `out` is too short or the destination cannot be a source (multicast).
pub fn packet_too_big(packet: &[u8], mtu: u32, out: &mut [u8]) -> Option<usize> {
    let header = packet.first_chunk::<40>()?;
    let dst = ipv6_at(header, 8);
    let src = Some(ipv6_at(header, 24)).filter(|a| !a.is_multicast())?;
    let quote = packet.get(..packet.len().min(MAX_ICMP_LEN - V6_HEADERS))?;
    let len = V6_HEADERS + quote.len();
    let out = out.get_mut(..len)?;
    let (ip, icmp) = out.split_first_chunk_mut::<40>()?;
    let payload = (len - 40) as u16;
    ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, PROTO_ICMPV6, TTL]);
    ip[4..6].copy_from_slice(&payload.to_be_bytes());
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let (icmp_header, icmp_quote) = icmp.split_first_chunk_mut::<8>()?;
    let [m0, m1, m2, m3] = mtu.to_be_bytes();
    *icmp_header = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, m0, m1, m2, m3];
    icmp_quote.copy_from_slice(quote);
    let acc = checksum::pseudo_header(src.into(), dst.into(), PROTO_ICMPV6, icmp.len())
        + checksum::sum(icmp);
    icmp.get_mut(2..4)?
        .copy_from_slice(&checksum::finish(acc).to_be_bytes());
    Some(len)
}

/// Whether `addr` names one host: not unspecified, broadcast, multicast or class E.
fn is_single_host_v4(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified()
        || addr.is_broadcast()
        || addr.is_multicast()
        || addr.octets()[0] >= 240)
}

/// The IPv6 address at `at` (8: source, 24: destination) in an IPv6 header.
fn ipv6_at(header: &[u8; 40], at: usize) -> Ipv6Addr {
    let octets = header
        .get(at..)
        .and_then(|b| b.first_chunk::<16>())
        .copied()
        .unwrap_or_default();
    Ipv6Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn mtu_is_the_smallest_path_less_the_family_overhead() {
        let v4 = |mtu| UnderlayPath { ipv6: false, mtu };
        let v6 = |mtu| UnderlayPath { ipv6: true, mtu };
        assert_eq!(tunnel_mtu([v4(1500)]), Some(1440));
        assert_eq!(tunnel_mtu([v6(1500)]), Some(1420));
        assert_eq!(tunnel_mtu([v4(1280)]), Some(1220));
        assert_eq!(tunnel_mtu([v6(1280)]), Some(1200));
        assert_eq!(tunnel_mtu([v4(9000), v4(1400), v6(1500)]), Some(1340));
        assert_eq!(tunnel_mtu([v4(1500), v6(1460)]), Some(1380));
        assert_eq!(tunnel_mtu([]), None);
    }

    #[test]
    fn a_tunnel_carrying_ipv6_keeps_the_ipv6_minimum() {
        assert_eq!(with_ipv6_floor(1200, true), MIN_MTU_V6);
        assert_eq!(with_ipv6_floor(1200, false), 1200);
        assert_eq!(with_ipv6_floor(1220, false), 1220);
        assert_eq!(with_ipv6_floor(1420, true), 1420);
        assert_eq!(with_ipv6_floor(MIN_MTU_V4, true), MIN_MTU_V6);
    }

    #[test]
    fn ipv6_routes_arriving_later_raise_a_small_mtu_to_the_ipv6_minimum() {
        let cidrs =
            |list: &[&str]| -> Vec<IpCidr> { list.iter().map(|c| c.parse().unwrap()).collect() };
        // No peers yet, or IPv4 pods only: the derived MTU stays.
        assert_eq!(floor_for_routes(1240, &cidrs(&[])), 1240);
        assert_eq!(floor_for_routes(1240, &cidrs(&["10.2.1.0/24"])), 1240);
        // A dual-stack peer arrives: IPv6 needs 1280 on the device.
        assert_eq!(
            floor_for_routes(1240, &cidrs(&["10.2.1.0/24", "fd10:2:0:1::/64"])),
            MIN_MTU_V6
        );
        assert_eq!(
            floor_for_routes(1240, &cidrs(&["fd10:2::1/128"])),
            MIN_MTU_V6
        );
        // Never lowered.
        assert_eq!(floor_for_routes(1420, &cidrs(&["fd10:2:0:1::/64"])), 1420);
    }

    #[test]
    fn mtu_stays_within_what_a_device_takes() {
        let v4 = |mtu| UnderlayPath { ipv6: false, mtu };
        assert_eq!(tunnel_mtu([v4(100)]), Some(MIN_MTU_V4));
        assert_eq!(tunnel_mtu([v4(0)]), Some(MIN_MTU_V4));
        // Loopback has 65536.
        assert_eq!(tunnel_mtu([v4(65_536)]), Some(65_476));
        assert_eq!(tunnel_mtu([v4(u32::MAX)]), Some(MAX_MTU));
    }

    #[test]
    fn a_packet_within_the_mtu_fits() {
        let mut guard = MtuGuard::new(1220);
        let mut out = [0u8; MAX_ICMP_LEN];
        let packet = ipv4_packet(1220, true, PROTO_UDP, 0);
        assert_eq!(guard.check(&packet, t0(), &mut out), MtuVerdict::Fits);
        let packet = ipv6_packet(1220, 17, &[]);
        assert_eq!(guard.check(&packet, t0(), &mut out), MtuVerdict::Fits);
    }

    #[test]
    fn ipv4_with_df_gets_fragmentation_needed_quoting_header_and_8_bytes() {
        let mut guard = MtuGuard::new(1220);
        let mut out = [0u8; MAX_ICMP_LEN];
        let packet = ipv4_packet(1400, true, PROTO_UDP, 0);
        let MtuVerdict::TooBig(icmp) = guard.check(&packet, t0(), &mut out) else {
            panic!("no answer");
        };
        assert_eq!(icmp.len(), 20 + 8 + 20 + 8);
        // IP header: valid checksum, from the original destination to the original source.
        assert_eq!(icmp[0], 0x45);
        assert_eq!(u16::from_be_bytes([icmp[2], icmp[3]]), 56);
        assert_eq!(icmp[9], PROTO_ICMP);
        assert_eq!(checksum::fold(checksum::sum(&icmp[..20])), 0xffff);
        assert_eq!(icmp[12..16], packet[16..20]);
        assert_eq!(icmp[16..20], packet[12..16]);
        // ICMP: type 3 code 4, next-hop MTU 1220, valid checksum, the quote.
        let message = &icmp[20..];
        assert_eq!(message[..2], [3, 4]);
        assert_eq!(message[4..6], [0, 0]);
        assert_eq!(u16::from_be_bytes([message[6], message[7]]), 1220);
        assert_eq!(checksum::fold(checksum::sum(message)), 0xffff);
        assert_eq!(message[8..], packet[..28]);
    }

    #[test]
    fn a_header_with_options_is_quoted_whole() {
        let mut guard = MtuGuard::new(576);
        let mut out = [0u8; MAX_ICMP_LEN];
        let mut packet = ipv4_packet(1000, true, PROTO_UDP, 0);
        packet[0] = 0x47; // 28-byte header
        let MtuVerdict::TooBig(icmp) = guard.check(&packet, t0(), &mut out) else {
            panic!("no answer");
        };
        assert_eq!(icmp.len(), 28 + 28 + 8);
        assert_eq!(icmp[28..], packet[..36]);
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 576);
    }

    #[test]
    fn ipv4_without_df_is_sent_to_be_fragmented() {
        let mut guard = MtuGuard::new(1220);
        let mut out = [0u8; MAX_ICMP_LEN];
        let packet = ipv4_packet(1400, false, PROTO_UDP, 0);
        assert_eq!(guard.check(&packet, t0(), &mut out), MtuVerdict::Fits);
    }

    #[test]
    fn icmp_errors_fragments_and_broadcasts_get_no_answer() {
        let mut guard = MtuGuard::new(1220);
        let mut out = [0u8; MAX_ICMP_LEN];
        let silent = |packet: &[u8], guard: &mut MtuGuard, out: &mut [u8]| {
            assert_eq!(
                guard.check(packet, t0(), out),
                MtuVerdict::TooBigSilently,
                "{:?}",
                &packet[..24]
            );
        };
        for kind in ICMP_ERRORS {
            silent(
                &ipv4_packet(1400, true, PROTO_ICMP, kind),
                &mut guard,
                &mut out,
            );
        }
        let mut fragment = ipv4_packet(1400, true, PROTO_UDP, 0);
        fragment[7] = 0x10;
        silent(&fragment, &mut guard, &mut out);
        let mut multicast = ipv4_packet(1400, true, PROTO_UDP, 0);
        multicast[16] = 239;
        silent(&multicast, &mut guard, &mut out);
        let mut from_nowhere = ipv4_packet(1400, true, PROTO_UDP, 0);
        from_nowhere[12..16].fill(0);
        silent(&from_nowhere, &mut guard, &mut out);
        // An echo request is answered.
        let echo = ipv4_packet(1400, true, PROTO_ICMP, 8);
        assert!(matches!(
            guard.check(&echo, t0(), &mut out),
            MtuVerdict::TooBig(_)
        ));
    }

    #[test]
    fn ipv6_gets_packet_too_big_quoting_up_to_1280_with_a_valid_checksum() {
        let mut guard = MtuGuard::new(1300);
        let mut out = [0u8; MAX_ICMP_LEN];
        let packet = ipv6_packet(1400, 17, &[]);
        let MtuVerdict::TooBig(icmp) = guard.check(&packet, t0(), &mut out) else {
            panic!("no answer");
        };
        assert_eq!(icmp.len(), 1280);
        assert_eq!(icmp[0] >> 4, 6);
        assert_eq!(usize::from(u16::from_be_bytes([icmp[4], icmp[5]])), 1240);
        assert_eq!(icmp[6], PROTO_ICMPV6);
        assert_eq!(icmp[8..24], packet[24..40]);
        assert_eq!(icmp[24..40], packet[8..24]);
        let message = &icmp[40..];
        assert_eq!(message[..2], [2, 0]);
        assert_eq!(
            u32::from_be_bytes([message[4], message[5], message[6], message[7]]),
            1300
        );
        assert_eq!(message[8..], packet[..1232]);
        assert_eq!(checksum::fold(icmpv6_sum(icmp)), 0xffff);
    }

    #[test]
    fn ipv6_to_a_multicast_group_gets_no_answer_it_could_not_source() {
        let mut guard = MtuGuard::new(1280);
        let mut out = [0u8; MAX_ICMP_LEN];
        let mut packet = ipv6_packet(1400, 17, &[]);
        packet[24..40].copy_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            guard.check(&packet, t0(), &mut out),
            MtuVerdict::TooBigSilently
        );
    }

    #[test]
    fn ipv6_below_its_minimum_mtu_reports_1280_and_carries_up_to_it() {
        let mut guard = MtuGuard::new(1200);
        let mut out = [0u8; MAX_ICMP_LEN];
        let packet = ipv6_packet(1280, 17, &[]);
        assert_eq!(guard.check(&packet, t0(), &mut out), MtuVerdict::Fits);
        let packet = ipv6_packet(1281, 17, &[]);
        let MtuVerdict::TooBig(icmp) = guard.check(&packet, t0(), &mut out) else {
            panic!("no answer");
        };
        assert_eq!(icmp[44..48], 1280u32.to_be_bytes());
    }

    #[test]
    fn ipv6_icmp_errors_are_not_answered_even_behind_extension_headers() {
        let mut guard = MtuGuard::new(1280);
        let mut out = [0u8; MAX_ICMP_LEN];
        // Hop-by-hop options (8 bytes), then an ICMPv6 "destination unreachable".
        let packet = ipv6_packet(
            1400,
            EXT_HOP_BY_HOP,
            &[PROTO_ICMPV6, 0, 0, 0, 0, 0, 0, 0, 1],
        );
        assert_eq!(
            guard.check(&packet, t0(), &mut out),
            MtuVerdict::TooBigSilently
        );
        // An echo request behind the same header is answered.
        let packet = ipv6_packet(
            1400,
            EXT_HOP_BY_HOP,
            &[PROTO_ICMPV6, 0, 0, 0, 0, 0, 0, 0, 128],
        );
        assert!(matches!(
            guard.check(&packet, t0(), &mut out),
            MtuVerdict::TooBig(_)
        ));
        // From the unspecified address: not answered.
        let mut packet = ipv6_packet(1400, 17, &[]);
        packet[8..24].fill(0);
        assert_eq!(
            guard.check(&packet, t0(), &mut out),
            MtuVerdict::TooBigSilently
        );
    }

    #[test]
    fn answers_are_rate_limited() {
        let mut guard = MtuGuard::new(1220);
        let mut out = [0u8; MAX_ICMP_LEN];
        let packet = ipv4_packet(1400, true, PROTO_UDP, 0);
        let now = t0();
        let answered = (0..1000)
            .filter(|_| matches!(guard.check(&packet, now, &mut out), MtuVerdict::TooBig(_)))
            .count();
        assert_eq!(answered, ICMP_BURST as usize);
        // A second later, a second's worth more (capped at the burst).
        let later = now + Duration::from_secs(1);
        let answered = (0..1000)
            .filter(|_| matches!(guard.check(&packet, later, &mut out), MtuVerdict::TooBig(_)))
            .count();
        assert_eq!(answered, ICMP_BURST as usize);
        let soon = later + Duration::from_millis(20);
        let answered = (0..1000)
            .filter(|_| matches!(guard.check(&packet, soon, &mut out), MtuVerdict::TooBig(_)))
            .count();
        assert_eq!(answered, 5);
    }

    #[test]
    fn the_bucket_refills_at_its_rate_and_ignores_a_clock_going_back() {
        let mut bucket = TokenBucket::new(100, 2);
        let now = t0();
        assert!(bucket.take(now));
        assert!(bucket.take(now));
        assert!(!bucket.take(now));
        assert!(!bucket.take(now + Duration::from_millis(9)));
        assert!(bucket.take(now + Duration::from_millis(10)));
        assert!(!bucket.take(now));
        assert!(!bucket.take(now + Duration::from_millis(10)));
        assert!(bucket.take(now + Duration::from_millis(20)));
    }

    #[test]
    fn a_short_out_buffer_gets_no_answer() {
        let mut guard = MtuGuard::new(1220);
        let mut out = [0u8; 40];
        let packet = ipv4_packet(1400, true, PROTO_UDP, 0);
        assert_eq!(
            guard.check(&packet, t0(), &mut out),
            MtuVerdict::TooBigSilently
        );
    }

    #[test]
    fn garbage_over_the_mtu_goes_on_to_the_device() {
        let mut guard = MtuGuard::new(100);
        let mut out = [0u8; MAX_ICMP_LEN];
        // Not IP, and an IPv4 header length below 20.
        for packet in [vec![0u8; 200], vec![0x40; 200]] {
            assert_eq!(guard.check(&packet, t0(), &mut out), MtuVerdict::Fits);
        }
        // An IPv4 header length past the end.
        let mut guard = MtuGuard::new(0);
        assert_eq!(guard.check(&[0x4f; 30], t0(), &mut out), MtuVerdict::Fits);
        // Too short for the IP header at all: no panic.
        for len in 1..48 {
            for first in [0x45, 0x60] {
                let mut packet = vec![0xff; len];
                packet[0] = first;
                let _ = guard.check(&packet, t0(), &mut out);
            }
        }
        assert_eq!(guard.check(&[], t0(), &mut out), MtuVerdict::Fits);
    }

    proptest! {
        #[test]
        fn no_input_panics_and_every_answer_verifies(
            packet in proptest::collection::vec(any::<u8>(), 0..1600),
            first in prop_oneof![Just(0x45u8), Just(0x46), Just(0x4f), Just(0x60), any::<u8>()],
            df in any::<bool>(),
            mtu in 0u32..1600,
        ) {
            let mut packet = packet;
            if let Some(b) = packet.first_mut() { *b = first; }
            if df && packet.len() > 7 {
                packet[6] = (packet[6] & 0xe0) | 0x40;
                packet[7] = 0;
            }
            let mut guard = MtuGuard::new(mtu);
            let mut out = [0u8; MAX_ICMP_LEN];
            if let MtuVerdict::TooBig(icmp) = guard.check(&packet, t0(), &mut out) {
                prop_assert!(icmp.len() <= MAX_ICMP_LEN);
                if icmp[0] >> 4 == 4 {
                    prop_assert_eq!(checksum::fold(checksum::sum(&icmp[..20])), 0xffff);
                    prop_assert_eq!(checksum::fold(checksum::sum(&icmp[20..])), 0xffff);
                } else {
                    prop_assert_eq!(checksum::fold(icmpv6_sum(icmp)), 0xffff);
                }
            }
        }
    }

    const PROTO_UDP: u8 = 17;

    fn t0() -> Instant {
        Instant::now()
    }

    /// An IPv4 packet of `len` bytes from 10.1.0.2 to 10.2.0.2 whose payload starts with
    /// `first` (an ICMP type), DF as asked, the header checksum right.
    fn ipv4_packet(len: usize, df: bool, protocol: u8, first: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[10, 1, 0, 2]);
        p[16..20].copy_from_slice(&[10, 2, 0, 2]);
        let c = checksum::finish(checksum::sum(&p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20] = first;
        for (i, b) in p[21..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    /// An IPv6 packet of `len` bytes from fd01::2 to fd02::2 with next header `next` and
    /// payload starting with `payload`.
    fn ipv6_packet(len: usize, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fd01::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd02::2".parse::<Ipv6Addr>().unwrap().octets());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        p[40..40 + payload.len()].copy_from_slice(payload);
        p
    }

    /// The ICMPv6 checksum sum of a whole IPv6 packet carrying an ICMPv6 message (no
    /// extension headers): pseudo-header plus message, checksum included.
    fn icmpv6_sum(packet: &[u8]) -> u64 {
        let header = packet.first_chunk().unwrap();
        let src = ipv6_at(header, 8);
        let dst = ipv6_at(header, 24);
        checksum::pseudo_header(src.into(), dst.into(), PROTO_ICMPV6, packet.len() - 40)
            + checksum::sum(&packet[40..])
    }
}
