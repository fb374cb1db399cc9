//! Stateless 1:1 prefix translation between a cluster's pod CIDRs and its mesh CIDRs, so
//! that clusters with the same pod CIDR can be linked (issue 14).
//!
//! Only a cluster's own agents translate its own addresses:
//!
//! - [`Translation::outbound`]: a packet from a local pod to another cluster has its source
//!   mapped from the pod CIDR to the mesh CIDR, before encryption;
//! - [`Translation::inbound`]: a packet for this cluster's mesh CIDR has its destination
//!   mapped back, after decryption and after the allowed-IPs source check.
//!
//! An ICMP error is translated inside its quoted header too (the quoted destination on the
//! way out, the quoted source on the way in), so PMTU discovery and traceroute work.
//!
//! IPv4: the IP header checksum and the TCP/UDP pseudo-header are updated incrementally
//! (RFC 1624, eqn. 3); a UDP checksum of 0 (none) stays 0. Non-first fragments carry no
//! transport header, so only their IP header changes. ICMP has no pseudo-header; an ICMP
//! error's own checksum follows every change inside its quote.
//!
//! IPv6: for a prefix of /48 or shorter, NPTv6's checksum-neutral mapping (RFC 6296 §3.2):
//! the word after the /48 (bits 48..63, the subnet ID) is adjusted so that the sum of the
//! address does not change, and no checksum anywhere needs an update. An internal subnet
//! ID of 0xffff cannot be mapped that way (RFC 6296 §3.5) and is refused. Prefixes longer
//! than /48 have no subnet word outside the prefix; rather than adjusting the interface
//! identifier as RFC 6296 §3.7 does (the pod's address would then not keep its host part),
//! they get the prefix swapped and the transport checksum (TCP, UDP, ICMPv6, behind the
//! extension headers) updated incrementally as for IPv4.
//!
//! A packet with a `virtio_net_hdr` in front ([`Translation::outbound_vnet`],
//! [`Translation::inbound_vnet`]: a GSO super-packet read from the TUN device, or a GRO
//! super-packet to write to it) may carry a partial checksum (`NEEDS_CSUM`): its transport
//! checksum field then holds the pseudo-header sum only, not inverted, and is updated as
//! such.
//!
//! Nothing here panics or reads out of bounds, whatever the packet says of itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wiremesh_proto::{IpCidr, PrefixMap, PrefixMapError, Towards};

use super::checksum;
use super::offload::{VNET_HDR_LEN, VnetHdr};

/// The translation table of one cluster: each of its pod CIDRs and the mesh CIDR of the
/// same length that stands for it in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    maps: Vec<PrefixMap>,
    /// Other destinations inside this cluster (its hosts' and services' ranges): packets
    /// to them keep their pod source, as packets to its pod CIDRs do.
    local: Vec<IpCidr>,
    /// This cluster's own ranges (pod CIDRs as its pods have them, hosts, services), when
    /// known: the only addresses a packet from a peer may be delivered to here
    /// ([`Translation::delivers`]). `None`: no such rule (standalone mode).
    own: Option<Vec<IpCidr>>,
    /// Whether a packet from a peer may be passed on to another peer (a node's gateway or
    /// relay work); a host relays nothing ([`Translation::without_passing_on`]).
    no_pass_on: bool,
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local pod to another cluster: the source goes pod → mesh.
    Outbound,
    /// From another cluster to a local pod: the destination goes mesh → pod.
    Inbound,
}

/// Why a translation table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslationError {
    /// A pod CIDR and its mesh CIDR cannot be paired (family, length, overlap).
    #[error(transparent)]
    Pair(#[from] PrefixMapError),
    /// Two of the table's CIDRs (pod or mesh) overlap: a mesh CIDR overlapping a pod CIDR
    /// would translate twice, two overlapping mesh CIDRs would not map back.
    #[error("CIDRs {0} and {1} of the translation table overlap")]
    Overlap(IpCidr, IpCidr),
}

/// Why a packet was not translated. The caller drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The headers do not fit the packet, or the vnet header does not fit.
    #[error("malformed packet")]
    Malformed,
    /// An IPv6 address whose subnet word is 0xffff under a checksum-neutral mapping
    /// (RFC 6296 §3.5).
    #[error("address cannot be mapped checksum-neutrally")]
    Unmappable,
}

/// Whether a packet was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translated {
    /// Nothing in it is ours to translate.
    Untouched,
    /// An address (outer or quoted) was rewritten.
    Rewritten,
}

/// IPv4 fragment offset mask (RFC 791), in the flags/offset word.
const FRAGMENT_OFFSET: u16 = 0x1fff;
/// IP protocol numbers (IANA).
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers walked over to reach the transport header (RFC 8200 §4).
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_DESTINATION: u8 = 60;
/// Extension headers walked at most: RFC 8200 §4.1 recommends each appear once.
const MAX_EXTENSIONS: usize = 8;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM` (see [`crate::offload`]).
const F_NEEDS_CSUM: u8 = 0x01;
/// Bytes from the start of an ICMP/ICMPv6 message to the quoted packet of an error
/// (RFC 792, RFC 4443 §3).
const ICMP_QUOTE: usize = 8;

impl Translation {
    /// A table from `(pod CIDR, mesh CIDR)` pairs.
    ///
    /// # Errors
    /// [`TranslationError::Pair`] when a pair differs in family or length or overlaps,
    /// [`TranslationError::Overlap`] when any two CIDRs of the table overlap.
    pub fn new(pairs: &[(IpCidr, IpCidr)]) -> Result<Translation, TranslationError> {
        let mut maps = Vec::with_capacity(pairs.len());
        let mut seen: Vec<IpCidr> = Vec::new();
        for &(pod, mesh) in pairs {
            let map = PrefixMap::new(pod, mesh)?;
            for new in [pod, mesh] {
                if let Some(old) = seen.iter().find(|c| c.overlaps(&new)) {
                    return Err(TranslationError::Overlap(*old, new));
                }
                seen.push(new);
            }
            maps.push(map);
        }
        Ok(Translation {
            maps,
            local: Vec::new(),
            own: None,
            no_pass_on: false,
        })
    }

    /// The table with `local`: destinations inside this cluster besides its pod CIDRs (the
    /// ranges of its hosts, which reach its pods by their pod addresses, and of its
    /// services), which packets from its pods reach untranslated.
    #[must_use]
    pub fn with_local(mut self, local: Vec<IpCidr>) -> Translation {
        self.local = local;
        self
    }

    /// The table with `own`: this cluster's own ranges (its pod CIDRs as its pods have
    /// them, its hosts' and services' ranges). A packet from a peer is then delivered only
    /// to them, or passed on to another peer (a gateway's or relay's work): never to the
    /// node's other networks, its link-local metadata service or the Internet, and not to a
    /// mesh address this table does not map yet (it would leave the node in plaintext).
    #[must_use]
    pub fn with_own_ranges(mut self, own: Vec<IpCidr>) -> Translation {
        self.own = Some(own);
        self
    }

    /// The table, for a machine that passes nothing from one peer on to another (a host):
    /// with own ranges set, a packet from a peer is delivered to them only.
    #[must_use]
    pub fn without_passing_on(mut self) -> Translation {
        self.no_pass_on = true;
        self
    }

    /// Whether a packet from a peer may go on to another peer (see
    /// [`Translation::without_passing_on`]).
    pub fn passes_on(&self) -> bool {
        !self.no_pass_on
    }

    /// Whether a packet from a peer, translated, may be delivered to `dst` here: always
    /// when no own ranges are set, else when `dst` is in one of them.
    pub fn delivers(&self, dst: IpAddr) -> bool {
        self.own
            .as_ref()
            .is_none_or(|own| own.iter().any(|c| c.contains(dst)))
    }

    /// True when own ranges are set ([`Translation::with_own_ranges`]).
    pub fn limits_destinations(&self) -> bool {
        self.own.is_some()
    }

    /// The table that maps the other way (mesh → pod on the way out): what undoes this
    /// one, for tests and for a peer's view of our addresses.
    pub fn inverse(&self) -> Translation {
        Translation {
            maps: self.maps.iter().map(PrefixMap::inverse).collect(),
            local: self.local.clone(),
            own: self.own.clone(),
            no_pass_on: self.no_pass_on,
        }
    }

    /// True when the table maps nothing.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The `(pod CIDR, mesh CIDR)` pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (IpCidr, IpCidr)> + '_ {
        self.maps.iter().map(|m| (m.pod(), m.mesh()))
    }

    /// The mesh address of a local pod address, if it is in a pod CIDR of the table.
    ///
    /// `None` also for an IPv6 address RFC 6296 cannot map (subnet word 0xffff).
    pub fn pod_to_mesh(&self, ip: IpAddr) -> Option<IpAddr> {
        self.map(ip, Direction::Outbound).ok().flatten()
    }

    /// The pod address of a mesh address, if it is in a mesh CIDR of the table.
    pub fn mesh_to_pod(&self, ip: IpAddr) -> Option<IpAddr> {
        self.map(ip, Direction::Inbound).ok().flatten()
    }

    /// False when [`Self::outbound`] would surely leave the packet as it is: a TCP or UDP
    /// packet whose source is not in a pod CIDR (already translated, or from the node), or
    /// one for a pod CIDR of the table. Cheap; lets a caller skip copying the packet.
    pub fn may_rewrite_outbound(&self, packet: &[u8]) -> bool {
        let (src, dst, protocol) = match packet.first().map(|b| b >> 4) {
            Some(4) => match (v4_at(packet, 12), v4_at(packet, 16), packet.get(9)) {
                (Ok(s), Ok(d), Some(p)) => (IpAddr::V4(s), IpAddr::V4(d), *p),
                _ => return true,
            },
            Some(6) => match (v6_at(packet, 8), v6_at(packet, 24), packet.get(6)) {
                (Ok(s), Ok(d), Some(p)) => (IpAddr::V6(s), IpAddr::V6(d), *p),
                _ => return true,
            },
            _ => return true,
        };
        if self.maps.is_empty() || self.stays_inside(dst) {
            return false;
        }
        self.is_local_pod(src) || !matches!(protocol, PROTO_TCP | PROTO_UDP)
    }

    /// Translates a complete IP packet (checksums complete) from a local pod: its source
    /// when it is in a pod CIDR, and an ICMP error's quoted destination. A packet for one
    /// of the table's own pod CIDRs stays inside the cluster and is left alone.
    ///
    /// # Errors
    /// When the packet cannot be translated; it is then unchanged or partly changed, and
    /// must be dropped.
    pub fn outbound(&self, packet: &mut [u8]) -> Result<Translated, TranslateError> {
        self.translate(packet, Direction::Outbound, false)
    }

    /// Translates a complete IP packet for a local pod: its destination when it is in a
    /// mesh CIDR, and an ICMP error's quoted source.
    ///
    /// # Errors
    /// As [`Self::outbound`].
    pub fn inbound(&self, packet: &mut [u8]) -> Result<Translated, TranslateError> {
        self.translate(packet, Direction::Inbound, false)
    }

    /// [`Self::outbound`] for a packet behind a `virtio_net_hdr` (a TUN read, GSO or not).
    ///
    /// # Errors
    /// As [`Self::outbound`]; also when `buf` is shorter than the vnet header.
    pub fn outbound_vnet(&self, buf: &mut [u8]) -> Result<Translated, TranslateError> {
        self.translate_vnet(buf, Direction::Outbound)
    }

    /// [`Self::inbound`] for a packet behind a `virtio_net_hdr` (a GRO super-packet).
    ///
    /// # Errors
    /// As [`Self::outbound_vnet`].
    pub fn inbound_vnet(&self, buf: &mut [u8]) -> Result<Translated, TranslateError> {
        self.translate_vnet(buf, Direction::Inbound)
    }

    fn translate_vnet(&self, buf: &mut [u8], dir: Direction) -> Result<Translated, TranslateError> {
        let hdr = VnetHdr::parse(buf).ok_or(TranslateError::Malformed)?;
        let packet = buf
            .get_mut(VNET_HDR_LEN..)
            .ok_or(TranslateError::Malformed)?;
        self.translate(packet, dir, hdr.flags & F_NEEDS_CSUM != 0)
    }

    /// The address `ip` maps to in direction `dir`; `Ok(None)` when it is not ours.
    fn map(&self, ip: IpAddr, dir: Direction) -> Result<Option<IpAddr>, TranslateError> {
        let towards = match dir {
            Direction::Outbound => Towards::Mesh,
            Direction::Inbound => Towards::Pod,
        };
        for m in &self.maps {
            if m.source(towards).contains(ip) {
                return m.map(ip, towards).map_err(|_| TranslateError::Unmappable);
            }
        }
        Ok(None)
    }

    fn is_local_pod(&self, ip: IpAddr) -> bool {
        self.maps.iter().any(|m| m.pod().contains(ip))
    }

    /// Whether a packet for `ip` stays inside this cluster (untranslated).
    fn stays_inside(&self, ip: IpAddr) -> bool {
        self.is_local_pod(ip) || self.local.iter().any(|c| c.contains(ip))
    }

    fn translate(
        &self,
        packet: &mut [u8],
        dir: Direction,
        partial: bool,
    ) -> Result<Translated, TranslateError> {
        if self.maps.is_empty() {
            return Ok(Translated::Untouched);
        }
        match packet.first().map(|b| b >> 4) {
            Some(4) => self.v4(packet, dir, partial),
            Some(6) => self.v6(packet, dir, partial),
            _ => Err(TranslateError::Malformed),
        }
    }

    fn v4(
        &self,
        packet: &mut [u8],
        dir: Direction,
        partial: bool,
    ) -> Result<Translated, TranslateError> {
        let ihl = usize::from(packet.first().ok_or(TranslateError::Malformed)? & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl {
            return Err(TranslateError::Malformed);
        }
        if dir == Direction::Outbound && self.stays_inside(IpAddr::V4(v4_at(packet, 16)?)) {
            return Ok(Translated::Untouched);
        }
        let (at, quoted_at) = addr_offsets(dir, false);
        let mut done = Translated::Untouched;
        let protocol = *packet.get(9).ok_or(TranslateError::Malformed)?;
        let first_fragment = be16(packet, 6)? & FRAGMENT_OFFSET == 0;
        let old = v4_at(packet, at)?;
        if let Some(IpAddr::V4(new)) = self.map(IpAddr::V4(old), dir)? {
            let delta = diff(&old.octets(), &new.octets());
            put(packet, at, &new.octets())?;
            update(packet, 10, delta, Field::Full)?;
            if first_fragment {
                transport(packet, ihl, protocol, delta, partial)?;
            }
            done = Translated::Rewritten;
        }
        if protocol == PROTO_ICMP && first_fragment && is_icmp4_error(packet.get(ihl).copied()) {
            let q = ihl + ICMP_QUOTE;
            let Some(quote) = packet.get_mut(q..) else {
                return Err(TranslateError::Malformed);
            };
            if let Some(icmp_delta) = self.quoted_v4(quote, quoted_at, dir)? {
                // A partial checksum does not cover the message yet.
                if !partial {
                    update(packet, ihl + 2, icmp_delta, Field::Full)?;
                }
                done = Translated::Rewritten;
            }
        }
        Ok(done)
    }

    /// Translates the IPv4 packet quoted in an ICMP error; the change of the quote's sum
    /// (for the ICMP checksum), or `None` when nothing in it is ours.
    fn quoted_v4(
        &self,
        quote: &mut [u8],
        at: usize,
        dir: Direction,
    ) -> Result<Option<u64>, TranslateError> {
        let ihl = usize::from(quote.first().ok_or(TranslateError::Malformed)? & 0x0f) * 4;
        if quote.first().map(|b| b >> 4) != Some(4) || ihl < 20 || quote.len() < ihl {
            return Err(TranslateError::Malformed);
        }
        let old = v4_at(quote, at)?;
        let Some(IpAddr::V4(new)) = self.map(IpAddr::V4(old), dir)? else {
            return Ok(None);
        };
        let delta = diff(&old.octets(), &new.octets());
        put(quote, at, &new.octets())?;
        let mut icmp = delta + update(quote, 10, delta, Field::Full)?;
        let protocol = *quote.get(9).ok_or(TranslateError::Malformed)?;
        if be16(quote, 6)? & FRAGMENT_OFFSET == 0 {
            // The quote may end before the transport checksum (RFC 792 quotes 8 bytes).
            icmp += quoted_transport(quote, ihl, protocol, delta)?;
        }
        Ok(Some(icmp))
    }

    fn v6(
        &self,
        packet: &mut [u8],
        dir: Direction,
        partial: bool,
    ) -> Result<Translated, TranslateError> {
        if packet.len() < 40 {
            return Err(TranslateError::Malformed);
        }
        if dir == Direction::Outbound && self.stays_inside(IpAddr::V6(v6_at(packet, 24)?)) {
            return Ok(Translated::Untouched);
        }
        let (at, quoted_at) = addr_offsets(dir, true);
        let mut done = Translated::Untouched;
        let l4 = transport_v6(packet);
        let old = v6_at(packet, at)?;
        if let Some(IpAddr::V6(new)) = self.map(IpAddr::V6(old), dir)? {
            put(packet, at, &new.octets())?;
            // Zero under a checksum-neutral mapping: then `update` changes nothing.
            let delta = diff(&old.octets(), &new.octets());
            if let Some((protocol, start)) = l4 {
                transport(packet, start, protocol, delta, partial)?;
            }
            done = Translated::Rewritten;
        }
        if let Some((PROTO_ICMPV6, start)) = l4
            && packet.get(start).is_some_and(|t| *t < 128)
        {
            let q = start + ICMP_QUOTE;
            let Some(quote) = packet.get_mut(q..) else {
                return Err(TranslateError::Malformed);
            };
            if let Some(icmp_delta) = self.quoted_v6(quote, quoted_at, dir)? {
                if !partial {
                    update(packet, start + 2, icmp_delta, Field::Full)?;
                }
                done = Translated::Rewritten;
            }
        }
        Ok(done)
    }

    /// Translates the IPv6 packet quoted in an ICMPv6 error; the change of the quote's sum.
    fn quoted_v6(
        &self,
        quote: &mut [u8],
        at: usize,
        dir: Direction,
    ) -> Result<Option<u64>, TranslateError> {
        if quote.first().map(|b| b >> 4) != Some(6) || quote.len() < 40 {
            return Err(TranslateError::Malformed);
        }
        let old = v6_at(quote, at)?;
        let Some(IpAddr::V6(new)) = self.map(IpAddr::V6(old), dir)? else {
            return Ok(None);
        };
        put(quote, at, &new.octets())?;
        let delta = diff(&old.octets(), &new.octets());
        let mut icmp = delta;
        if let Some((protocol, start)) = transport_v6(quote) {
            icmp += quoted_transport(quote, start, protocol, delta)?;
        }
        Ok(Some(icmp))
    }
}

/// Where the translated address is in the packet and in an ICMP error's quote.
fn addr_offsets(dir: Direction, v6: bool) -> (usize, usize) {
    let (src, dst) = if v6 { (8, 24) } else { (12, 16) };
    match dir {
        Direction::Outbound => (src, dst),
        Direction::Inbound => (dst, src),
    }
}

/// ICMP error types that quote a packet (RFC 792): destination unreachable, source quench,
/// redirect, time exceeded, parameter problem.
fn is_icmp4_error(kind: Option<u8>) -> bool {
    matches!(kind, Some(3 | 4 | 5 | 11 | 12))
}

/// The transport protocol and where its header starts, past IPv6 extension headers;
/// `None` for a non-first fragment or a chain this code does not walk.
fn transport_v6(packet: &[u8]) -> Option<(u8, usize)> {
    let mut next = *packet.get(6)?;
    let mut at = 40;
    for _ in 0..MAX_EXTENSIONS {
        match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DESTINATION => {
                let len = (usize::from(*packet.get(at + 1)?) + 1) * 8;
                next = *packet.get(at)?;
                at += len;
            }
            EXT_FRAGMENT => {
                if be16(packet, at + 2).ok()? & 0xfff8 != 0 {
                    return None;
                }
                next = *packet.get(at)?;
                at += 8;
            }
            protocol => return Some((protocol, at)),
        }
    }
    None
}

/// Updates the transport checksum of the packet's own transport header (at `start`) for an
/// address change of `delta`. A partial checksum (`NEEDS_CSUM`) is a pseudo-header sum.
fn transport(
    packet: &mut [u8],
    start: usize,
    protocol: u8,
    delta: u64,
    partial: bool,
) -> Result<(), TranslateError> {
    let v6 = packet.first().map(|b| b >> 4) == Some(6);
    let (offset, field) = match protocol {
        PROTO_TCP => (16, Field::Full),
        PROTO_UDP => (6, Field::Udp),
        PROTO_ICMPV6 if v6 => (2, Field::Full),
        _ => return Ok(()),
    };
    let field = if partial { Field::Partial } else { field };
    update(packet, start + offset, delta, field).map(|_| ())
}

/// As [`transport`] for a quoted packet, which may be cut short before its checksum: then
/// nothing changes. The change of the quote's sum.
fn quoted_transport(
    quote: &mut [u8],
    start: usize,
    protocol: u8,
    delta: u64,
) -> Result<u64, TranslateError> {
    let v6 = quote.first().map(|b| b >> 4) == Some(6);
    let (offset, field) = match protocol {
        PROTO_TCP => (16, Field::Full),
        PROTO_UDP => (6, Field::Udp),
        PROTO_ICMPV6 if v6 => (2, Field::Full),
        _ => return Ok(0),
    };
    if quote.len() < start + offset + 2 {
        return Ok(0);
    }
    update(quote, start + offset, delta, field)
}

/// What a checksum field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// The inverted sum.
    Full,
    /// UDP: the inverted sum, 0 for none (RFC 768), 0xffff for a sum of 0.
    Udp,
    /// A partial checksum: the pseudo-header sum, not inverted.
    Partial,
}

/// Updates the checksum field at `at` for a change of `delta` in the region it covers
/// (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`); the change of the field's own sum, for a
/// checksum that covers this one (an ICMP error's over its quote).
fn update(packet: &mut [u8], at: usize, delta: u64, field: Field) -> Result<u64, TranslateError> {
    let old = be16(packet, at)?;
    if matches!(checksum::fold(delta), 0 | 0xffff) {
        // No change (a checksum-neutral mapping): keep the field as it is, even its
        // representation of zero.
        return Ok(0);
    }
    let new = match field {
        Field::Udp if old == 0 => return Ok(0),
        Field::Partial => checksum::fold(u64::from(old) + delta),
        Field::Full => !checksum::fold(u64::from(!old) + delta),
        Field::Udp => match !checksum::fold(u64::from(!old) + delta) {
            0 => 0xffff,
            c => c,
        },
    };
    put(packet, at, &new.to_be_bytes())?;
    Ok(diff(&old.to_be_bytes(), &new.to_be_bytes()))
}

/// `new - old` in ones' complement, unfolded: what adds to a sum when `old` becomes `new`.
fn diff(old: &[u8], new: &[u8]) -> u64 {
    u64::from(!checksum::fold(checksum::sum(old))) + checksum::sum(new)
}

fn be16(p: &[u8], at: usize) -> Result<u16, TranslateError> {
    let b = p.get(at..at + 2).ok_or(TranslateError::Malformed)?;
    Ok(u16::from_be_bytes([
        b.first().copied().unwrap_or(0),
        b.get(1).copied().unwrap_or(0),
    ]))
}

fn v4_at(p: &[u8], at: usize) -> Result<Ipv4Addr, TranslateError> {
    let b: [u8; 4] = p
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .ok_or(TranslateError::Malformed)?;
    Ok(Ipv4Addr::from(b))
}

fn v6_at(p: &[u8], at: usize) -> Result<Ipv6Addr, TranslateError> {
    let b: [u8; 16] = p
        .get(at..at + 16)
        .and_then(|b| b.try_into().ok())
        .ok_or(TranslateError::Malformed)?;
    Ok(Ipv6Addr::from(b))
}

fn put(p: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), TranslateError> {
    p.get_mut(at..at + bytes.len())
        .ok_or(TranslateError::Malformed)?
        .copy_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::offload::{Gro, GroPush, Segmenter};

    fn cidr(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    /// Cluster A's table: 10.244.0.0/16 and fd00:10:244::/48 (neutral) and
    /// fd00:20:244:100::/56 (full update).
    fn a() -> Translation {
        Translation::new(&[
            (cidr("10.244.0.0/16"), cidr("100.64.0.0/16")),
            (cidr("fd00:10:244::/48"), cidr("fd64:aaaa:1::/48")),
            (cidr("fd00:20:244:100::/56"), cidr("fd64:aaaa:2:300::/56")),
        ])
        .unwrap()
    }

    /// Cluster B's table: the same pod CIDRs, other mesh CIDRs.
    fn b() -> Translation {
        Translation::new(&[
            (cidr("10.244.0.0/16"), cidr("100.65.0.0/16")),
            (cidr("fd00:10:244::/48"), cidr("fd64:bbbb:1::/48")),
            (cidr("fd00:20:244:100::/56"), cidr("fd64:bbbb:2:300::/56")),
        ])
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tables_refuse_other_shapes_and_overlaps_naming_both() {
        let e = Translation::new(&[(cidr("10.244.0.0/16"), cidr("100.64.0.0/17"))]).unwrap_err();
        assert!(e.to_string().contains("100.64.0.0/17"), "{e}");
        let e = Translation::new(&[
            (cidr("10.244.0.0/16"), cidr("100.64.0.0/16")),
            (cidr("10.245.0.0/16"), cidr("100.64.0.0/16")),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            TranslationError::Overlap(cidr("100.64.0.0/16"), cidr("100.64.0.0/16"))
        );
        assert!(Translation::new(&[(cidr("10.0.0.0/8"), cidr("fd00::/8"))]).is_err());
    }

    #[test]
    fn addresses_map_one_to_one_and_the_neutral_ipv6_mapping_keeps_the_sum() {
        let t = a();
        assert_eq!(t.pod_to_mesh(ip("10.244.1.2")), Some(ip("100.64.1.2")));
        assert_eq!(t.mesh_to_pod(ip("100.64.1.2")), Some(ip("10.244.1.2")));
        assert_eq!(t.pod_to_mesh(ip("10.245.1.2")), None);
        let pod = ip("fd00:10:244:1::2");
        let mesh = t.pod_to_mesh(pod).unwrap();
        assert!(cidr("fd64:aaaa:1::/48").contains(mesh));
        let octets = |a: IpAddr| match a {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!(),
        };
        assert_eq!(
            checksum::fold(checksum::sum(&octets(pod))) % 0xffff,
            checksum::fold(checksum::sum(&octets(mesh))) % 0xffff
        );
        assert_eq!(
            octets(mesh)[8..],
            octets(pod)[8..],
            "the interface identifier stays"
        );
        assert_eq!(t.mesh_to_pod(mesh), Some(pod));
        // RFC 6296 §3.5: subnet 0xffff has no checksum-neutral mapping.
        assert_eq!(t.pod_to_mesh(ip("fd00:10:244:ffff::1")), None);
        // /56: the prefix is swapped, the rest kept.
        assert_eq!(
            t.pod_to_mesh(ip("fd00:20:244:1a5::7")),
            Some(ip("fd64:aaaa:2:3a5::7"))
        );
    }

    #[test]
    fn a_conversation_between_two_clusters_with_the_same_pod_cidr() {
        for (a_pod, b_pod, b_mesh, a_mesh) in [
            ("10.244.1.2", "10.244.1.2", "100.65.1.2", "100.64.1.2"),
            (
                "fd00:10:244:1::2",
                "fd00:10:244:1::2",
                &*b().pod_to_mesh(ip("fd00:10:244:1::2")).unwrap().to_string(),
                &*a().pod_to_mesh(ip("fd00:10:244:1::2")).unwrap().to_string(),
            ),
            (
                "fd00:20:244:101::2",
                "fd00:20:244:101::2",
                "fd64:bbbb:2:301::2",
                "fd64:aaaa:2:301::2",
            ),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                // A's pod sends to B's mesh address.
                let sent = packet(ip(a_pod), ip(b_mesh), proto, b"hello");
                let mut p = sent.clone();
                assert_eq!(a().outbound(&mut p), Ok(Translated::Rewritten));
                assert_eq!(src(&p), ip(a_mesh));
                assert!(checksums_ok(&p));
                assert_eq!(b().inbound(&mut p), Ok(Translated::Rewritten));
                assert_eq!((src(&p), dst(&p)), (ip(a_mesh), ip(b_pod)));
                assert!(checksums_ok(&p));
                // B's pod answers with an ICMP error that quotes what it got.
                let mut err = icmp_error(ip(b_pod), ip(a_mesh), &p);
                assert!(checksums_ok(&err));
                assert_eq!(b().outbound(&mut err), Ok(Translated::Rewritten));
                assert!(checksums_ok(&err));
                assert_eq!(a().inbound(&mut err), Ok(Translated::Rewritten));
                assert!(checksums_ok(&err), "{err:02x?}");
                assert_eq!((src(&err), dst(&err)), (ip(b_mesh), ip(a_pod)));
                // A's pod sees the packet it sent, quoted.
                let quote = &err[quote_at(&err)..];
                assert!(same_but_zero(quote, &sent), "{quote:02x?} vs {sent:02x?}");
            }
        }
    }

    #[test]
    fn a_packet_within_the_cluster_and_foreign_addresses_stay_untouched() {
        let t = a().with_local(vec![cidr("10.250.0.0/16")]);
        // To one of the cluster's own hosts: the host knows the pod by its pod address.
        let mut p = packet(ip("10.244.1.2"), ip("10.250.0.7"), PROTO_TCP, b"x");
        let before = p.clone();
        assert_eq!(t.outbound(&mut p), Ok(Translated::Untouched));
        assert!(!t.may_rewrite_outbound(&p));
        assert_eq!(p, before);
        let mut p = packet(ip("10.244.1.2"), ip("10.244.2.3"), PROTO_TCP, b"x");
        let before = p.clone();
        assert_eq!(t.outbound(&mut p), Ok(Translated::Untouched));
        assert_eq!(p, before);
        let mut p = packet(ip("10.9.1.2"), ip("100.65.2.3"), PROTO_UDP, b"x");
        let before = p.clone();
        assert_eq!(t.outbound(&mut p), Ok(Translated::Untouched));
        assert_eq!(t.inbound(&mut p), Ok(Translated::Untouched));
        assert_eq!(p, before);
    }

    #[test]
    fn a_udp_checksum_of_zero_stays_zero_and_non_first_fragments_keep_their_payload() {
        let mut p = packet(ip("10.244.1.2"), ip("100.65.0.9"), PROTO_UDP, b"abc");
        p[26..28].copy_from_slice(&[0, 0]);
        a().outbound(&mut p).unwrap();
        assert_eq!(p[26..28], [0, 0]);
        assert!(ipv4_header_ok(&p));
        let mut p = packet(ip("10.244.1.2"), ip("100.65.0.9"), PROTO_UDP, b"abcdefgh");
        p[6..8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128 bytes
        refresh_ipv4_header(&mut p);
        let payload = p[20..].to_vec();
        a().outbound(&mut p).unwrap();
        assert_eq!(p[20..], payload[..]);
        assert!(ipv4_header_ok(&p));
    }

    #[test]
    fn truncated_and_lying_headers_are_refused_without_a_panic() {
        let t = a();
        let whole = packet(ip("10.244.1.2"), ip("100.65.0.9"), PROTO_TCP, b"abc");
        for n in 0..whole.len() {
            let mut p = whole[..n].to_vec();
            let _ = t.outbound(&mut p);
            let _ = t.inbound(&mut p);
            let _ = t.outbound_vnet(&mut p);
        }
        let mut p = whole.clone();
        p[0] = 0x4f; // IHL 60, longer than the packet
        assert_eq!(t.outbound(&mut p[..40]), Err(TranslateError::Malformed));
        let mut p = whole;
        assert_eq!(t.outbound(&mut p[..30]), Err(TranslateError::Malformed));
    }

    #[test]
    fn a_tso_super_packet_translated_once_splits_as_if_each_segment_was() {
        for (src, dst) in [
            ("10.244.1.2", "100.65.1.2"),
            ("fd00:20:244:101::2", "fd64:bbbb:2:301::2"),
            ("fd00:10:244:1::2", "fd64:bbbb:1::7"),
        ] {
            let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
            let original = packet(ip(src), ip(dst), PROTO_TCP, &data);
            let mut read = tso(&original, 1_400);
            let mut whole = read.clone();
            assert_eq!(a().outbound_vnet(&mut whole), Ok(Translated::Rewritten));
            let translated = segments(&mut whole);
            let mut each = segments(&mut read);
            assert_eq!(translated.len(), each.len());
            for (t, e) in translated.iter().zip(&mut each) {
                a().outbound(e).unwrap();
                assert!(checksums_ok(t));
                assert!(same_but_zero(t, e));
            }
        }
    }

    #[test]
    fn a_gro_super_packet_translated_once_is_the_segments_translated() {
        for (src, dst) in [
            ("100.64.1.2", "100.65.1.2"),
            ("fd64:aaaa:2:301::2", "fd64:bbbb:2:301::2"),
        ] {
            let data: Vec<u8> = (0..8_000u32).map(|i| (i * 3) as u8).collect();
            let original = packet(ip(src), ip(dst), PROTO_TCP, &data);
            let segs = segments(&mut tso(&original, 1_000));
            let mut gro = Gro::new();
            for s in &segs {
                assert_eq!(gro.push(s), GroPush::Added);
            }
            let mut out = Vec::new();
            gro.drain(|p| out.push(p.to_vec()));
            let mut coalesced = out.pop().unwrap();
            assert_eq!(b().inbound_vnet(&mut coalesced), Ok(Translated::Rewritten));
            for (i, s) in segments(&mut coalesced).iter().enumerate() {
                let mut e = segs[i].clone();
                b().inbound(&mut e).unwrap();
                assert!(checksums_ok(s));
                assert!(same_but_zero(s, &e));
            }
        }
    }

    proptest! {
        #[test]
        fn translating_then_back_is_the_identity_and_checksums_verify(
            family in 0..3u8,
            host in any::<u32>(),
            subnet in any::<u16>(),
            inside in any::<bool>(),
            proto in prop::sample::select(vec![PROTO_TCP, PROTO_UDP, NO_NEXT_HEADER, PROTO_ICMP]),
            payload in prop::collection::vec(any::<u8>(), 0..300),
            quote in any::<bool>(),
        ) {
            let (s, d) = match family {
                0 => {
                    let first = if inside { 10u32 << 24 | 244 << 16 } else { 10u32 << 24 | 9 << 16 };
                    (IpAddr::V4(Ipv4Addr::from(first | (host & 0xffff))), ip("100.65.3.4"))
                }
                1 => {
                    let mut o = ip6(if inside { "fd00:10:244::" } else { "fd00:11:244::" });
                    o[6..8].copy_from_slice(&subnet.to_be_bytes());
                    o[12..16].copy_from_slice(&host.to_be_bytes());
                    (IpAddr::V6(Ipv6Addr::from(o)), ip("fd64:bbbb:1::9"))
                }
                _ => {
                    let mut o = ip6(if inside { "fd00:20:244:100::" } else { "fd00:20:244:200::" });
                    o[7] = subnet as u8;
                    o[12..16].copy_from_slice(&host.to_be_bytes());
                    (IpAddr::V6(Ipv6Addr::from(o)), ip("fd64:bbbb:2:300::9"))
                }
            };
            let proto = match (proto, s) {
                (PROTO_ICMP, IpAddr::V6(_)) => PROTO_ICMPV6,
                (p, _) => p,
            };
            let mut original = packet(s, d, proto, &payload);
            if quote {
                let quoted = packet(d, s, proto, &payload);
                original = icmp_error(s, d, &quoted);
            }
            let mut p = original.clone();
            let t = a();
            match t.outbound(&mut p) {
                Err(TranslateError::Unmappable) => {
                    prop_assert!(family == 1 && inside && subnet == 0xffff);
                    return Ok(());
                }
                r => prop_assert_eq!(r, Ok(if inside { Translated::Rewritten } else { Translated::Untouched })),
            }
            prop_assert!(checksums_ok(&p), "{:02x?}", p);
            if inside {
                prop_assert_eq!(Some(src(&p)), t.pod_to_mesh(s));
            }
            t.inverse().outbound(&mut p).unwrap();
            prop_assert!(same_but_zero(&p, &original), "{:02x?} vs {:02x?}", p, original);
        }

        #[test]
        fn garbage_never_panics(mut p in prop::collection::vec(any::<u8>(), 0..200), v6 in any::<bool>()) {
            if let Some(b) = p.first_mut() {
                *b = if v6 { 0x60 | (*b & 0x0f) } else { 0x40 | (*b & 0x0f) };
            }
            let _ = a().outbound(&mut p);
            let _ = a().inbound(&mut p);
            let _ = b().outbound_vnet(&mut p);
            let _ = b().inbound_vnet(&mut p);
        }
    }

    // Helpers: packets built and verified from scratch.

    /// IPv6 "no next header" (RFC 8200 §4.7), also unused as an IPv4 protocol here.
    const NO_NEXT_HEADER: u8 = 59;

    fn ip6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    /// An IP packet from `s` to `d` with a transport header (TCP, UDP, ICMP echo, or none
    /// for protocol 0) and valid checksums.
    fn packet(s: IpAddr, d: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut l4 = match proto {
            PROTO_TCP => {
                let mut h = vec![0u8; 20];
                h[0..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
                h[4..8].copy_from_slice(&7u32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = 0x18;
                h[14..16].copy_from_slice(&502u16.to_be_bytes());
                h
            }
            PROTO_UDP => {
                let mut h = vec![0u8; 8];
                h[0..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
                h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                h
            }
            PROTO_ICMP => vec![8, 0, 0, 0, 0, 1, 0, 1],
            PROTO_ICMPV6 => vec![128, 0, 0, 0, 0, 1, 0, 1],
            _ => Vec::new(),
        };
        l4.extend_from_slice(payload);
        let mut p = match (s, d) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
                h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h
            }
            _ => unreachable!(),
        };
        let ip_len = p.len();
        p.extend_from_slice(&l4);
        if ip_len == 20 {
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            refresh_ipv4_header(&mut p);
        }
        if let Some(at) = csum_field(proto, ip_len == 40) {
            let acc = if proto == PROTO_ICMP {
                checksum::sum(&p[ip_len..])
            } else {
                checksum::pseudo_header_of(&p, proto, p.len() - ip_len)
                    + checksum::sum(&p[ip_len..])
            };
            let c = checksum::finish(acc);
            p[ip_len + at..ip_len + at + 2].copy_from_slice(&c.to_be_bytes());
        }
        p
    }

    /// An ICMP(v6) "destination unreachable" from `s` to `d` quoting `quoted` whole.
    fn icmp_error(s: IpAddr, d: IpAddr, quoted: &[u8]) -> Vec<u8> {
        let v6 = s.is_ipv6();
        let mut body = vec![if v6 { 1 } else { 3 }, 4, 0, 0, 0, 0, 5, 0xdc];
        body.extend_from_slice(quoted);
        let proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        let mut p = packet(s, d, NO_NEXT_HEADER, &body);
        let ip_len = if v6 { 40 } else { 20 };
        if v6 {
            p[6] = proto;
        } else {
            p[9] = proto;
            refresh_ipv4_header(&mut p);
        }
        let acc = if v6 {
            checksum::pseudo_header_of(&p, proto, p.len() - ip_len) + checksum::sum(&p[ip_len..])
        } else {
            checksum::sum(&p[ip_len..])
        };
        let c = checksum::finish(acc);
        p[ip_len + 2..ip_len + 4].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn csum_field(proto: u8, v6: bool) -> Option<usize> {
        match proto {
            PROTO_TCP => Some(16),
            PROTO_UDP => Some(6),
            PROTO_ICMP if !v6 => Some(2),
            PROTO_ICMPV6 if v6 => Some(2),
            _ => None,
        }
    }

    fn refresh_ipv4_header(p: &mut [u8]) {
        p[10..12].copy_from_slice(&[0, 0]);
        let c = checksum::finish(checksum::sum(&p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }

    fn ipv4_header_ok(p: &[u8]) -> bool {
        checksum::fold(checksum::sum(&p[..usize::from(p[0] & 0xf) * 4])) == 0xffff
    }

    fn src(p: &[u8]) -> IpAddr {
        if p[0] >> 4 == 4 {
            IpAddr::V4(v4_at(p, 12).unwrap())
        } else {
            IpAddr::V6(v6_at(p, 8).unwrap())
        }
    }

    fn dst(p: &[u8]) -> IpAddr {
        if p[0] >> 4 == 4 {
            IpAddr::V4(v4_at(p, 16).unwrap())
        } else {
            IpAddr::V6(v6_at(p, 24).unwrap())
        }
    }

    fn quote_at(p: &[u8]) -> usize {
        if p[0] >> 4 == 4 { 28 } else { 48 }
    }

    /// Every checksum of the packet, computed from scratch, and of an ICMP error's quote.
    fn checksums_ok(p: &[u8]) -> bool {
        let v6 = p[0] >> 4 == 6;
        let (ip_len, proto) = if v6 {
            (40, p[6])
        } else {
            if !ipv4_header_ok(p) {
                return false;
            }
            if u16::from_be_bytes([p[6], p[7]]) & FRAGMENT_OFFSET != 0 {
                return true;
            }
            (usize::from(p[0] & 0xf) * 4, p[9])
        };
        let Some(at) = csum_field(proto, v6) else {
            return true;
        };
        let field = u16::from_be_bytes([p[ip_len + at], p[ip_len + at + 1]]);
        let acc = if proto == PROTO_ICMP {
            checksum::sum(&p[ip_len..])
        } else {
            checksum::pseudo_header_of(p, proto, p.len() - ip_len) + checksum::sum(&p[ip_len..])
        };
        let ok = (proto == PROTO_UDP && field == 0) || checksum::fold(acc) == 0xffff;
        let error =
            matches!(proto, PROTO_ICMP | PROTO_ICMPV6) && (p[ip_len] < if v6 { 128 } else { 8 });
        ok && (!error || checksums_ok(&p[ip_len + 8..]))
    }

    /// Equal, but for 16-bit words that are 0x0000 in one and 0xffff in the other (both
    /// zero in ones' complement: RFC 1624 §3).
    fn same_but_zero(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len()
            && a.chunks(2).zip(b.chunks(2)).all(|(x, y)| {
                x == y
                    || (x.len() == 2
                        && matches!((x, y), ([0, 0], [0xff, 0xff]) | ([0xff, 0xff], [0, 0])))
            })
    }

    /// What the kernel hands a TSO-enabled TUN device (as `offload`'s tests build it).
    fn tso(packet: &[u8], mss: usize) -> Vec<u8> {
        let v6 = packet[0] >> 4 == 6;
        let ip_len = if v6 { 40 } else { 20 };
        let mut p = packet.to_vec();
        let pseudo = checksum::fold(checksum::pseudo_header_of(&p, PROTO_TCP, p.len() - ip_len));
        p[ip_len + 16..ip_len + 18].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { 0x04 } else { 0x01 },
            hdr_len: (ip_len + 20) as u16,
            gso_size: mss as u16,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        let mut out = vec![0u8; VNET_HDR_LEN];
        hdr.write((&mut out[..]).try_into().unwrap());
        out.extend_from_slice(&p);
        out
    }

    fn segments(read: &mut [u8]) -> Vec<Vec<u8>> {
        let mut s = Segmenter::new(read).unwrap();
        let mut out = Vec::new();
        while let Some(seg) = s.next_segment() {
            out.push(seg.to_vec());
        }
        out
    }
}
