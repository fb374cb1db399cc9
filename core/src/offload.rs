//! Segmentation and coalescing offloads, without I/O.
//!
//! - [`VnetHdr`]: the `virtio_net_hdr` that a TUN device opened with `IFF_VNET_HDR` puts in
//!   front of every packet (`include/uapi/linux/virtio_net.h`).
//! - [`Segmenter`]: splits a TSO/USO super-packet read from the TUN device into wire-size
//!   packets in place (fixing IP length, id and checksum, TCP sequence, flags and checksum,
//!   UDP length and checksum per segment), or completes the checksum of a single packet.
//! - [`Gro`]: coalesces decrypted TCP segments of a flow into one super-packet with a GSO
//!   `virtio_net_hdr`, to write to the TUN device in one go.
//! - [`GsoBatch`]: gathers encrypted datagrams for one endpoint into one UDP GSO send
//!   (`UDP_SEGMENT`).
//!
//! The algorithms follow wireguard-go's `tun/offload_linux.go` and the kernel's TCP GRO
//! rules (`net/ipv4/tcp_offload.c`). Packets of one flow are never reordered: a segment
//! only joins the newest super-packet of its flow, and super-packets are written in the
//! order they were started.

use super::checksum;
use crate::Endpoint;

/// Size of `struct virtio_net_hdr`, the TUN device's default vnet header size.
pub const VNET_HDR_LEN: usize = 10;

/// The largest IP packet: the IPv4 total length and IPv6 payload length are 16 bits.
pub const MAX_IP_PACKET: usize = 65_535;

/// The largest UDP payload of one send, GSO included: 65535 minus the IPv4 (20) and UDP
/// (8) headers (wireguard-go's `maxIPv4PayloadLen`).
pub const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

/// Segments per UDP GSO send: `UDP_MAX_SEGMENTS` was 64 before Linux 6.9 (128 since).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` on is not computed yet;
/// the partial (pseudo-header) sum is at `csum_start + csum_offset`.
const F_NEEDS_CSUM: u8 = 0x01;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const GSO_NONE: u8 = 0x00;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
const GSO_TCPV4: u8 = 0x01;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
const GSO_TCPV6: u8 = 0x04;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO, Linux 6.2).
const GSO_UDP_L4: u8 = 0x05;
/// `VIRTIO_NET_HDR_GSO_ECN`: the first segment carries CWR.
const GSO_ECN: u8 = 0x80;

/// IP protocol numbers (IANA).
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Offset of the checksum field in the TCP header (RFC 793) and the UDP header (RFC 768).
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// TCP flags (RFC 793, RFC 3168).
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Longest headers a super-packet may have: a 60-byte IPv4 header or an IPv6 header with
/// extension headers, and a 60-byte TCP header.
const MAX_HEADERS: usize = 256;

/// How many super-packets [`Gro`] holds before it must be drained: one per flow of a
/// batch, and a batch is at most a few hundred packets.
pub const GRO_SLOTS: usize = 16;

/// Why a packet read from the TUN device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Shorter than a vnet header.
    #[error("shorter than the vnet header")]
    Truncated,
    /// A GSO type we did not enable.
    #[error("unsupported GSO type {0:#x}")]
    GsoType(u8),
    /// The GSO type does not match the IP version.
    #[error("GSO type {gso_type:#x} on an IPv{version} packet")]
    Version {
        /// The GSO type.
        gso_type: u8,
        /// The IP version nibble.
        version: u8,
    },
    /// `csum_start`, `csum_offset`, the header lengths or `gso_size` do not fit the packet.
    #[error("vnet header does not fit the packet")]
    Bounds,
}

/// A `struct virtio_net_hdr` (virtio 1.x §5.1.6), in the CPU's byte order as the TUN
/// device uses it unless told otherwise (`TUNSETVNETLE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy in front of every segment (a hint only).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksum starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let [flags, gso_type, h0, h1, g0, g1, s0, s1, o0, o1] = *b.first_chunk::<VNET_HDR_LEN>()?;
        Some(VnetHdr {
            flags,
            gso_type,
            hdr_len: u16::from_ne_bytes([h0, h1]),
            gso_size: u16::from_ne_bytes([g0, g1]),
            csum_start: u16::from_ne_bytes([s0, s1]),
            csum_offset: u16::from_ne_bytes([o0, o1]),
        })
    }

    /// Writes the header into `b`.
    pub fn write(&self, b: &mut [u8; VNET_HDR_LEN]) {
        let [h0, h1] = self.hdr_len.to_ne_bytes();
        let [g0, g1] = self.gso_size.to_ne_bytes();
        let [s0, s1] = self.csum_start.to_ne_bytes();
        let [o0, o1] = self.csum_offset.to_ne_bytes();
        *b = [self.flags, self.gso_type, h0, h1, g0, g1, s0, s1, o0, o1];
    }
}

/// Splits one packet read from a vnet-header TUN device into wire-size IP packets, in
/// place: segment `i`'s headers are written over the tail of segment `i - 1`'s payload,
/// which the caller has consumed by then.
///
/// ```text
/// read:      [hdrs][ payload 0 ][ payload 1 ][ payload 2 ]
/// segment 1:            [hdrs'][ payload 1 ]
/// ```
///
/// Call [`Segmenter::next_segment`] until it returns `None`.
#[derive(Debug)]
pub struct Segmenter<'a> {
    buf: &'a mut [u8],
    /// `None` for one complete packet.
    gso: Option<Gso>,
    next: usize,
}

#[derive(Debug)]
struct Gso {
    /// The original headers (`len` bytes), copied before the first segment changes them.
    template: [u8; MAX_HEADERS],
    /// IP header length (start of the transport header).
    ip_len: usize,
    /// IP plus transport headers.
    len: usize,
    /// Payload bytes per segment.
    mss: usize,
    v6: bool,
    tcp: bool,
    /// Clear CWR after the first segment (`VIRTIO_NET_HDR_GSO_ECN`).
    ecn: bool,
    first_seq: u32,
    first_id: u16,
}

impl<'a> Segmenter<'a> {
    /// Parses the vnet header at the start of `buf` (a whole read from the TUN device) and
    /// prepares the packet behind it.
    ///
    /// A `GSO_NONE` packet with `NEEDS_CSUM` gets its checksum completed now.
    ///
    /// # Errors
    /// When the header is malformed or does not fit the packet; nothing is yielded then.
    pub fn new(buf: &'a mut [u8]) -> Result<Segmenter<'a>, OffloadError> {
        let hdr = VnetHdr::parse(buf).ok_or(OffloadError::Truncated)?;
        let buf = buf.get_mut(VNET_HDR_LEN..).ok_or(OffloadError::Truncated)?;
        let gso_type = hdr.gso_type & !GSO_ECN;
        if gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(buf, hdr.csum_start.into(), hdr.csum_offset.into())?;
            }
            return Ok(Segmenter {
                buf,
                gso: None,
                next: 0,
            });
        }
        let version = buf.first().map_or(0, |b| b >> 4);
        let (v6, tcp) = match (gso_type, version) {
            (GSO_TCPV4, 4) => (false, true),
            (GSO_TCPV6, 6) => (true, true),
            (GSO_UDP_L4, 4) => (false, false),
            (GSO_UDP_L4, 6) => (true, false),
            (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, _) => {
                return Err(OffloadError::Version { gso_type, version });
            }
            _ => return Err(OffloadError::GsoType(hdr.gso_type)),
        };
        // Like wireguard-go, trust csum_start for the IP header length but not hdr_len,
        // which is the whole first packet on the kernel's forwarding path.
        let ip_len = usize::from(hdr.csum_start);
        if v6 {
            if ip_len < 40 {
                return Err(OffloadError::Bounds);
            }
        } else if buf.first().map(|b| usize::from(b & 0x0f) * 4) != Some(ip_len) || ip_len < 20 {
            return Err(OffloadError::Bounds);
        }
        let transport_len = if tcp {
            let doff = buf.get(ip_len + 12).ok_or(OffloadError::Bounds)?;
            usize::from(doff >> 4) * 4
        } else {
            8
        };
        if transport_len < 8 || (tcp && transport_len < 20) {
            return Err(OffloadError::Bounds);
        }
        let len = ip_len + transport_len;
        let mss = usize::from(hdr.gso_size);
        if len > MAX_HEADERS || len > buf.len() || mss == 0 || buf.len() > MAX_IP_PACKET + len {
            return Err(OffloadError::Bounds);
        }
        let mut template = [0u8; MAX_HEADERS];
        let headers = buf.get(..len).ok_or(OffloadError::Bounds)?;
        template
            .get_mut(..len)
            .ok_or(OffloadError::Bounds)?
            .copy_from_slice(headers);
        let first_seq = if tcp {
            be32(buf, ip_len + 4).ok_or(OffloadError::Bounds)?
        } else {
            0
        };
        let first_id = if v6 {
            0
        } else {
            be16(buf, 4).ok_or(OffloadError::Bounds)?
        };
        Ok(Segmenter {
            buf,
            gso: Some(Gso {
                template,
                ip_len,
                len,
                mss,
                v6,
                tcp,
                ecn: hdr.gso_type & GSO_ECN != 0,
                first_seq,
                first_id,
            }),
            next: 0,
        })
    }

    /// Whether the packet was a super-packet to split.
    pub fn is_gso(&self) -> bool {
        self.gso.is_some()
    }

    /// The next wire-size packet, or `None` when all were yielded.
    pub fn next_segment(&mut self) -> Option<&[u8]> {
        let i = self.next;
        self.next += 1;
        match &self.gso {
            None => (i == 0).then_some(&*self.buf),
            Some(g) => {
                let payload_at = g.len + i.checked_mul(g.mss)?;
                // A super-packet with no payload is still one packet.
                if payload_at >= self.buf.len() && !(i == 0 && payload_at == self.buf.len()) {
                    return None;
                }
                let payload_end = (payload_at + g.mss).min(self.buf.len());
                let last = payload_end == self.buf.len();
                let start = payload_at - g.len;
                let seg = self.buf.get_mut(start..payload_end)?;
                g.write_headers(seg, i, last)?;
                Some(&*seg)
            }
        }
    }
}

impl Gso {
    /// Writes the headers of segment `i` at the start of `seg` (headers then payload);
    /// `None` when `seg` is shorter than the headers ([`Segmenter::new`] ruled that out).
    fn write_headers(&self, seg: &mut [u8], i: usize, last: bool) -> Option<()> {
        let total = seg.len();
        put(seg, 0, self.template.get(..self.len)?)?;
        if self.v6 {
            // Payload length: everything after the fixed 40-byte header.
            put(seg, 4, &((total - 40) as u16).to_be_bytes())?;
        } else {
            put(seg, 2, &(total as u16).to_be_bytes())?;
            // The IP ids of the segments count up from the super-packet's, as the kernel's
            // software GSO does.
            put(seg, 4, &self.first_id.wrapping_add(i as u16).to_be_bytes())?;
            put(seg, 10, &[0, 0])?;
            let c = checksum::finish(checksum::sum(seg.get(..self.ip_len)?));
            put(seg, 10, &c.to_be_bytes())?;
        }
        let t = self.ip_len;
        let csum_at;
        let protocol;
        if self.tcp {
            let seq = self
                .first_seq
                .wrapping_add((i as u32).wrapping_mul(self.mss as u32));
            put(seg, t + 4, &seq.to_be_bytes())?;
            let flags = seg.get_mut(t + 13)?;
            if !last {
                *flags &= !(TCP_FIN | TCP_PSH);
            }
            if self.ecn && i > 0 {
                *flags &= !TCP_CWR;
            }
            csum_at = t + usize::from(TCP_CSUM_OFFSET);
            protocol = PROTO_TCP;
        } else {
            put(seg, t + 4, &((total - t) as u16).to_be_bytes())?;
            csum_at = t + usize::from(UDP_CSUM_OFFSET);
            protocol = PROTO_UDP;
        }
        put(seg, csum_at, &[0, 0])?;
        let acc =
            checksum::pseudo_header_of(seg, protocol, total - t) + checksum::sum(seg.get(t..)?);
        put(seg, csum_at, &checksum::finish(acc).to_be_bytes())
    }
}

/// Completes a `CHECKSUM_PARTIAL` checksum: the field holds the pseudo-header sum, and the
/// sum of everything from `start` on, field included, is the checksum.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start.checked_add(offset).ok_or(OffloadError::Bounds)?;
    if at + 2 > packet.len() {
        return Err(OffloadError::Bounds);
    }
    let c = checksum::finish(checksum::sum(
        packet.get(start..).ok_or(OffloadError::Bounds)?,
    ));
    put(packet, at, &c.to_be_bytes()).ok_or(OffloadError::Bounds)
}

/// The big-endian `u16` at `at` in `p`.
#[inline]
fn be16(p: &[u8], at: usize) -> Option<u16> {
    p.get(at..)?.first_chunk().copied().map(u16::from_be_bytes)
}

/// The big-endian `u32` at `at` in `p`.
#[inline]
fn be32(p: &[u8], at: usize) -> Option<u32> {
    p.get(at..)?.first_chunk().copied().map(u32::from_be_bytes)
}

/// Copies `bytes` into `p` at `at`; `None`, with `p` unchanged, when they do not fit.
#[inline]
fn put(p: &mut [u8], at: usize, bytes: &[u8]) -> Option<()> {
    p.get_mut(at..)?
        .get_mut(..bytes.len())?
        .copy_from_slice(bytes);
    Some(())
}

/// What [`Gro::push`] did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroPush {
    /// The packet was added (merged or stored).
    Added,
    /// Every slot is in use: [`Gro::drain`] and push it again.
    Full,
    /// Not an IP packet that fits a slot; dropped.
    Refused,
}

/// Coalesces decrypted packets into super-packets for a vnet-header TUN device.
///
/// TCP segments of a flow that follow each other (same addresses, ports, ACK, options and
/// IP header fields, adjacent sequence numbers, all of one size but the last) become one
/// packet with a `GSO_TCPV4`/`GSO_TCPV6` header and `NEEDS_CSUM`, so the kernel takes them
/// in one write and never verifies or recomputes their checksum on the way to a local
/// socket. Every other TCP packet goes out alone, also with `NEEDS_CSUM`; other packets
/// go out untouched.
///
/// Like the kernel's WireGuard (`wg_packet_consume_data_done` sets
/// `CHECKSUM_UNNECESSARY`), the inner checksums of decrypted packets are not verified:
/// the AEAD tag already authenticated every byte.
pub struct Gro {
    buf: Box<[u8]>,
    items: Vec<Item>,
}

/// One super-packet (or single packet) in a slot.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Bytes of IP packet in the slot (after the vnet header space).
    len: usize,
    tcp: Option<TcpItem>,
}

#[derive(Debug, Clone, Copy)]
struct TcpItem {
    meta: TcpMeta,
    flow: Flow,
    /// Payload size of the segments (the first's); only the last may be shorter.
    gso_size: usize,
    segments: u16,
    next_seq: u32,
    /// No more segments may join (a short one or PSH was the last).
    closed: bool,
}

/// Bytes of one slot: vnet header and the largest IP packet.
const SLOT: usize = VNET_HDR_LEN + MAX_IP_PACKET;

impl Default for Gro {
    fn default() -> Self {
        Self::new()
    }
}

impl Gro {
    /// An empty coalescer with [`GRO_SLOTS`] slots of 64 KiB.
    pub fn new() -> Gro {
        Gro {
            buf: vec![0u8; SLOT * GRO_SLOTS].into_boxed_slice(),
            items: Vec::with_capacity(GRO_SLOTS),
        }
    }

    /// Whether nothing waits to be drained.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds a decrypted IP packet.
    pub fn push(&mut self, packet: &[u8]) -> GroPush {
        if packet.is_empty() || packet.len() > MAX_IP_PACKET {
            return GroPush::Refused;
        }
        let meta = TcpMeta::parse(packet);
        let flow = meta.and_then(|m| m.flow(packet));
        if let (Some(m), Some(flow)) = (meta.filter(|m| m.mergeable), flow)
            && let Some(index) = self
                .items
                .iter()
                .rposition(|it| it.tcp.is_some_and(|t| t.flow == flow))
            && self.try_merge(index, &m, packet)
        {
            return GroPush::Added;
        }
        if self.items.len() == GRO_SLOTS {
            return GroPush::Full;
        }
        let slot = self.items.len() * SLOT + VNET_HDR_LEN;
        let Some(()) = put(&mut self.buf, slot, packet) else {
            return GroPush::Refused;
        };
        self.items.push(Item {
            len: packet.len(),
            tcp: meta.zip(flow).map(|(meta, flow)| TcpItem {
                meta,
                flow,
                gso_size: meta.payload_len,
                segments: 1,
                next_seq: meta.seq.wrapping_add(meta.payload_len as u32),
                closed: !meta.mergeable,
            }),
        });
        GroPush::Added
    }

    /// Appends `packet`'s payload to item `index` if it is the next segment of its
    /// super-packet.
    fn try_merge(&mut self, index: usize, m: &TcpMeta, packet: &[u8]) -> bool {
        self.merge(index, m, packet).is_some()
    }

    /// [`Gro::try_merge`]; `None` when the packet does not join, before anything changed.
    fn merge(&mut self, index: usize, m: &TcpMeta, packet: &[u8]) -> Option<()> {
        let item = *self.items.get(index)?;
        let mut t = item.tcp?;
        let slot = index * SLOT + VNET_HDR_LEN;
        let head = self.buf.get(slot..slot + item.len)?;
        let headers = m.ip_len + m.tcp_len;
        let options = m.ip_len + 20..headers;
        let fits = !t.closed
            && m.seq == t.next_seq
            && m.payload_len <= t.gso_size
            && item.len + m.payload_len <= MAX_IP_PACKET
            && m.ack == t.meta.ack
            && m.ip_len == t.meta.ip_len
            && m.tcp_len == t.meta.tcp_len
            && ip_headers_match(head, packet, m.v6)
            // Options (timestamps) must be equal, as in the kernel's tcp_gro_receive.
            && head.get(options.clone()).is_some_and(|o| packet.get(options) == Some(o));
        if !fits {
            return None;
        }
        put(&mut self.buf, slot + item.len, packet.get(headers..)?)?;
        if m.flags & TCP_PSH != 0 {
            if let Some(flags) = self.buf.get_mut(slot + m.ip_len + 13) {
                *flags |= TCP_PSH;
            }
            t.closed = true;
        }
        if m.payload_len < t.gso_size {
            t.closed = true;
        }
        t.segments += 1;
        t.next_seq = t.next_seq.wrapping_add(m.payload_len as u32);
        *self.items.get_mut(index)? = Item {
            len: item.len + m.payload_len,
            tcp: Some(t),
        };
        Some(())
    }

    /// Finishes every packet (vnet header, lengths, checksums) and hands each, vnet header
    /// first, to `write` in the order they were started; then empties the coalescer.
    pub fn drain(&mut self, mut write: impl FnMut(&[u8])) {
        for (index, item) in self.items.iter().enumerate() {
            let Some(slot) = self
                .buf
                .get_mut(index * SLOT..index * SLOT + VNET_HDR_LEN + item.len)
            else {
                continue;
            };
            let Some((hdr, packet)) = slot.split_at_mut_checked(VNET_HDR_LEN) else {
                continue;
            };
            let vnet = item
                .tcp
                .and_then(|t| finish_tcp(packet, &t))
                .unwrap_or_default();
            if let Ok(hdr) = <&mut [u8; VNET_HDR_LEN]>::try_from(hdr) {
                vnet.write(hdr);
            }
            write(slot);
        }
        self.items.clear();
    }
}

/// Sets lengths and checksums of a finished TCP item and returns its vnet header; `None`
/// when the packet is shorter than the headers its item recorded (never: they were parsed
/// from it).
fn finish_tcp(packet: &mut [u8], t: &TcpItem) -> Option<VnetHdr> {
    let m = &t.meta;
    let total = packet.len();
    if t.segments > 1 {
        if m.v6 {
            put(packet, 4, &((total - 40) as u16).to_be_bytes())?;
        } else {
            put(packet, 2, &(total as u16).to_be_bytes())?;
            put(packet, 10, &[0, 0])?;
            let c = checksum::finish(checksum::sum(packet.get(..m.ip_len)?));
            put(packet, 10, &c.to_be_bytes())?;
        }
    }
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel does the rest
    // only if the packet leaves through a device that cannot.
    let l4 = total - m.ip_len;
    let pseudo = checksum::fold(checksum::pseudo_header_of(packet, PROTO_TCP, l4));
    put(
        packet,
        m.ip_len + usize::from(TCP_CSUM_OFFSET),
        &pseudo.to_be_bytes(),
    )?;
    let (gso_type, gso_size) = match (t.segments > 1, m.v6) {
        (false, _) => (GSO_NONE, 0),
        (true, false) => (GSO_TCPV4, t.gso_size as u16),
        (true, true) => (GSO_TCPV6, t.gso_size as u16),
    };
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: (m.ip_len + m.tcp_len) as u16,
        gso_size,
        csum_start: m.ip_len as u16,
        csum_offset: TCP_CSUM_OFFSET,
    })
}

/// IP header fields that must be equal for two segments to merge (wireguard-go's
/// `ipHeadersCanCoalesce`, the kernel's `inet_gro_receive`/`ipv6_gro_receive`).
fn ip_headers_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    let (Some(a), Some(b)) = (a.first_chunk::<9>(), b.first_chunk::<9>()) else {
        return false;
    };
    if v6 {
        // Version, traffic class, flow label; hop limit.
        a[..4] == b[..4] && a[7] == b[7]
    } else {
        // TOS; DF and reserved flags; TTL.
        a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8] == b[8]
    }
}

/// What GRO needs to know of a well-formed TCP packet.
#[derive(Debug, Clone, Copy)]
struct TcpMeta {
    v6: bool,
    ip_len: usize,
    tcp_len: usize,
    payload_len: usize,
    seq: u32,
    ack: u32,
    flags: u8,
    /// May join or start a super-packet: no IP options, only ACK (and PSH), some payload.
    mergeable: bool,
}

/// Addresses and ports (both directions' bytes, as stored), compared as a flow key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    v6: bool,
    addrs: [u8; 32],
    ports: [u8; 4],
}

impl TcpMeta {
    /// A TCP packet with consistent lengths that is not a fragment, or `None`.
    fn parse(p: &[u8]) -> Option<TcpMeta> {
        let (v6, ip_len) = match p.first()? >> 4 {
            4 => {
                // The fixed header first: a total length shorter than it (boringtun cuts
                // the packet to that length) must not be read past.
                let h: &[u8; 20] = p.get(..20)?.try_into().ok()?;
                let ihl = usize::from(h[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
                let fragment = h[6] & 0x3f != 0 || h[7] != 0;
                if ihl < 20 || total != p.len() || fragment || h[9] != PROTO_TCP {
                    return None;
                }
                (false, ihl)
            }
            6 => {
                let h: &[u8; 40] = p.get(..40)?.try_into().ok()?;
                let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
                if payload + 40 != p.len() || h[6] != PROTO_TCP {
                    return None;
                }
                (true, 40)
            }
            _ => return None,
        };
        let tcp_len = usize::from(p.get(ip_len + 12)? >> 4) * 4;
        if tcp_len < 20 || ip_len + tcp_len > p.len() {
            return None;
        }
        let t: &[u8; 20] = p.get(ip_len..)?.first_chunk()?;
        let flags = t[13];
        let payload_len = p.len() - ip_len - tcp_len;
        Some(TcpMeta {
            v6,
            ip_len,
            tcp_len,
            payload_len,
            seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
            ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            flags,
            mergeable: (v6 || ip_len == 20)
                && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH)
                && payload_len > 0,
        })
    }

    /// The flow of `p`, the packet this was parsed from (`None` for any other shorter
    /// one).
    fn flow(&self, p: &[u8]) -> Option<Flow> {
        let mut addrs = [0u8; 32];
        if self.v6 {
            addrs.copy_from_slice(p.get(8..40)?);
        } else {
            put(&mut addrs, 0, p.get(12..20)?)?;
        }
        Some(Flow {
            v6: self.v6,
            addrs,
            ports: *p.get(self.ip_len..)?.first_chunk()?,
        })
    }
}

/// What [`GsoBatch::push`] did with the datagram written at [`GsoBatch::space`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchPush {
    /// It joined the batch.
    Added,
    /// It cannot join: send [`GsoBatch::pending`], then [`GsoBatch::clear`], which makes it
    /// the start of the next batch.
    FlushFirst,
}

/// Encrypted datagrams for one endpoint, back to back, for one UDP GSO send: all of one
/// size except the last, which may be shorter (`UDP_SEGMENT` semantics, `udp(7)`).
pub struct GsoBatch {
    buf: Box<[u8]>,
    len: usize,
    to: Option<Endpoint>,
    segment: usize,
    count: usize,
    closed: bool,
    max_segments: usize,
    /// A datagram written after the batch that did not join it.
    held: Option<(Endpoint, usize)>,
}

/// One batch to send.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Where to, and from which local address.
    pub to: Endpoint,
    /// The datagrams, back to back.
    pub data: &'a [u8],
    /// Size of each datagram but the last.
    pub segment: usize,
    /// How many datagrams.
    pub count: usize,
}

/// Room after a batch for one more datagram: the largest packet plus boringtun's 32 bytes
/// of overhead, and at least the 148-byte handshake initiation it may write instead.
const DATAGRAM_ROOM: usize = MAX_IP_PACKET + 1 + 32 + 148;

impl GsoBatch {
    /// An empty batch of at most `max_segments` datagrams (1: no GSO).
    pub fn new(max_segments: usize) -> GsoBatch {
        GsoBatch {
            buf: vec![0u8; MAX_GSO_BYTES + DATAGRAM_ROOM].into_boxed_slice(),
            len: 0,
            to: None,
            segment: 0,
            count: 0,
            closed: false,
            max_segments: max_segments.clamp(1, MAX_GSO_SEGMENTS),
            held: None,
        }
    }

    /// Limits later batches to `max_segments` datagrams (1 turns GSO off).
    pub fn set_max_segments(&mut self, max_segments: usize) {
        self.max_segments = max_segments.clamp(1, MAX_GSO_SEGMENTS);
    }

    /// Where to write the next datagram: room for the largest one.
    pub fn space(&mut self) -> &mut [u8] {
        // `len` stays within the buffer: at most `MAX_GSO_BYTES` plus one datagram.
        self.buf.get_mut(self.len..).unwrap_or_default()
    }

    /// Takes the `len`-byte datagram just written at [`GsoBatch::space`], for `to`.
    pub fn push(&mut self, to: Endpoint, len: usize) -> BatchPush {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = len;
            self.count = 1;
            self.len = len;
            self.closed = false;
            return BatchPush::Added;
        }
        let joins = self.to == Some(to)
            && !self.closed
            && len <= self.segment
            && self.count < self.max_segments
            && self.len + len <= MAX_GSO_BYTES;
        if !joins {
            self.held = Some((to, len));
            return BatchPush::FlushFirst;
        }
        self.len += len;
        self.count += 1;
        if len < self.segment {
            self.closed = true;
        }
        BatchPush::Added
    }

    /// Whether the batch should go now: no datagram of the same size can join it.
    pub fn is_full(&self) -> bool {
        self.count > 0
            && (self.closed
                || self.count >= self.max_segments
                || self.len + self.segment > MAX_GSO_BYTES)
    }

    /// The batch to send, if any.
    pub fn pending(&self) -> Option<Batch<'_>> {
        Some(Batch {
            to: self.to?,
            data: self.buf.get(..self.len)?,
            segment: self.segment,
            count: self.count,
        })
        .filter(|_| self.count > 0)
    }

    /// Forgets the batch (it was sent); a held datagram becomes the next batch.
    pub fn clear(&mut self) {
        let len = self.len;
        self.len = 0;
        self.count = 0;
        self.to = None;
        self.closed = false;
        if let Some((to, n)) = self.held.take() {
            self.buf.copy_within(len..len + n, 0);
            let _ = self.push(to, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn endpoint(addr: &str) -> Endpoint {
        Endpoint::from(addr.parse::<std::net::SocketAddr>().unwrap())
    }

    const MSS: usize = 1368;

    /// An IPv4 or IPv6 TCP packet with valid checksums; `options` padded to 4 bytes.
    fn tcp(v6: bool, seq: u32, ack: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let tcp_len = 20 + options.len().div_ceil(4) * 4;
        let total = ip_len + tcp_len + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            p[1] = 0x0a;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[10, 1, 0, 2]);
            p[16..20].copy_from_slice(&[10, 2, 0, 2]);
            let c = checksum::finish(checksum::sum(&p[..20]));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40_000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&502u16.to_be_bytes());
        p[t + 20..t + 20 + options.len()].copy_from_slice(options);
        p[t + tcp_len..].copy_from_slice(payload);
        let acc = checksum::pseudo_header_of(&p, PROTO_TCP, total - t) + checksum::sum(&p[t..]);
        p[t + 16..t + 18].copy_from_slice(&checksum::finish(acc).to_be_bytes());
        p
    }

    /// What the kernel hands a TSO-enabled TUN device: vnet header, then the packet with
    /// only the pseudo-header sum in the checksum field.
    fn tso(packet: &[u8], mss: usize) -> Vec<u8> {
        let ip_len = if packet[0] >> 4 == 6 { 40 } else { 20 };
        let mut p = packet.to_vec();
        let pseudo = checksum::fold(checksum::pseudo_header_of(&p, PROTO_TCP, p.len() - ip_len));
        p[ip_len + 16..ip_len + 18].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if ip_len == 40 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (ip_len + usize::from(p[ip_len + 12] >> 4) * 4) as u16,
            gso_size: mss as u16,
            csum_start: ip_len as u16,
            csum_offset: TCP_CSUM_OFFSET,
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

    fn transport_checksum_ok(p: &[u8], ip_len: usize, protocol: u8) -> bool {
        let acc =
            checksum::pseudo_header_of(p, protocol, p.len() - ip_len) + checksum::sum(&p[ip_len..]);
        checksum::fold(acc) == 0xffff
    }

    fn ipv4_checksum_ok(p: &[u8]) -> bool {
        checksum::fold(checksum::sum(&p[..20])) == 0xffff
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn drain_all(gro: &mut Gro) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        gro.drain(|p| out.push(p.to_vec()));
        out
    }

    /// Splits a 64 KB TSO packet, checks every segment as a receiver would, coalesces
    /// the segments again and splits the result once more.
    fn split_then_coalesce(v6: bool) {
        let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let data = payload(64_000, 7);
        let seq = 0xffff_f000; // wraps inside the packet
        let original = tcp(v6, seq, 77, TCP_ACK | TCP_PSH, &options, &data);
        let ip_len = if v6 { 40 } else { 20 };
        let headers = ip_len + 32;
        let mut read = tso(&original, MSS);
        let segs = segments(&mut read);
        assert_eq!(segs.len(), 64_000usize.div_ceil(MSS));
        let mut offset = 0;
        for (i, seg) in segs.iter().enumerate() {
            let last = i == segs.len() - 1;
            assert!(transport_checksum_ok(seg, ip_len, PROTO_TCP), "segment {i}");
            if v6 {
                assert_eq!(
                    usize::from(u16::from_be_bytes([seg[4], seg[5]])),
                    seg.len() - 40
                );
            } else {
                assert!(ipv4_checksum_ok(seg), "segment {i}");
                assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
                assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
            }
            let t = &seg[ip_len..];
            assert_eq!(
                u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                seq.wrapping_add(offset as u32)
            );
            assert_eq!(t[13], if last { TCP_ACK | TCP_PSH } else { TCP_ACK });
            assert_eq!(&seg[headers..], &data[offset..offset + seg.len() - headers]);
            assert_eq!(seg[ip_len + 20..headers], options);
            offset += seg.len() - headers;
        }
        assert_eq!(offset, data.len());

        let mut gro = Gro::new();
        for seg in &segs {
            assert_eq!(gro.push(seg), GroPush::Added);
        }
        let out = drain_all(&mut gro);
        assert_eq!(out.len(), 1, "one super-packet");
        let hdr = VnetHdr::parse(&out[0]).unwrap();
        assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(usize::from(hdr.gso_size), MSS);
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(usize::from(hdr.csum_start), ip_len);
        let packet = &out[0][VNET_HDR_LEN..];
        assert_eq!(packet.len(), original.len());
        // Equal to the original but for the checksum field, which holds the pseudo sum.
        let mut expected = tso(&original, MSS)[VNET_HDR_LEN..].to_vec();
        if !v6 {
            assert!(ipv4_checksum_ok(packet));
            // The id is the first segment's, as the original's.
            expected[10..12].copy_from_slice(&packet[10..12]);
        }
        assert_eq!(packet, &expected[..]);

        let mut again = out[0].clone();
        assert_eq!(segments(&mut again), segs);
    }

    #[test]
    fn a_64k_ipv4_tso_packet_splits_with_valid_checksums_and_coalesces_back() {
        split_then_coalesce(false);
    }

    #[test]
    fn a_64k_ipv6_tso_packet_splits_with_valid_checksums_and_coalesces_back() {
        split_then_coalesce(true);
    }

    #[test]
    fn a_uso_packet_splits_into_udp_datagrams_with_lengths_and_checksums() {
        let data = payload(5000, 3);
        let total = 20 + 8 + data.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 1, 0, 2]);
        p[16..20].copy_from_slice(&[10, 2, 0, 2]);
        p[20..22].copy_from_slice(&4433u16.to_be_bytes());
        p[22..24].copy_from_slice(&443u16.to_be_bytes());
        p[28..].copy_from_slice(&data);
        let pseudo = checksum::fold(checksum::pseudo_header_of(&p, PROTO_UDP, total - 20));
        p[26..28].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: UDP_CSUM_OFFSET,
        };
        let mut read = vec![0u8; VNET_HDR_LEN];
        hdr.write((&mut read[..]).try_into().unwrap());
        read.extend_from_slice(&p);
        let segs = segments(&mut read);
        assert_eq!(
            segs.iter().map(Vec::len).collect::<Vec<_>>(),
            [1228, 1228, 1228, 1228, 228]
        );
        let mut joined = Vec::new();
        for seg in &segs {
            assert!(ipv4_checksum_ok(seg));
            assert!(transport_checksum_ok(seg, 20, PROTO_UDP));
            assert_eq!(
                usize::from(u16::from_be_bytes([seg[24], seg[25]])),
                seg.len() - 20
            );
            joined.extend_from_slice(&seg[28..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn a_single_packet_with_a_partial_checksum_gets_it_completed() {
        let original = tcp(false, 1, 2, TCP_ACK, &[], b"hello");
        let mut read = tso(&original, 0);
        // GSO_NONE with NEEDS_CSUM, as for a small packet from a local socket.
        read[1] = GSO_NONE;
        let segs = segments(&mut read);
        assert_eq!(segs, vec![original]);
    }

    #[test]
    fn a_plain_packet_passes_untouched() {
        let original = tcp(true, 1, 2, TCP_ACK, &[], b"plain");
        let mut read = vec![0u8; VNET_HDR_LEN];
        read.extend_from_slice(&original);
        assert_eq!(segments(&mut read), vec![original]);
    }

    #[test]
    fn malformed_vnet_headers_are_refused() {
        let original = tcp(false, 1, 2, TCP_ACK, &[], &payload(3000, 1));
        let good = tso(&original, MSS);
        type Breakage = fn(&mut Vec<u8>);
        let cases: [(&str, Breakage); 7] = [
            ("short", |r| r.truncate(5)),
            ("gso type", |r| r[1] = 3),
            ("v6 type on v4", |r| r[1] = GSO_TCPV6),
            ("zero gso_size", |r| r[4..6].fill(0)),
            ("csum_start past the end", |r| {
                r[6..8].copy_from_slice(&60_000u16.to_ne_bytes())
            }),
            ("csum_start not the IP header", |r| {
                r[6..8].copy_from_slice(&24u16.to_ne_bytes())
            }),
            ("bad tcp data offset", |r| r[VNET_HDR_LEN + 32] = 0x10),
        ];
        for (name, break_it) in cases {
            let mut read = good.clone();
            break_it(&mut read);
            assert!(Segmenter::new(&mut read).is_err(), "{name}");
        }
        let mut read = good.clone();
        read[1] = GSO_NONE;
        read[8..10].copy_from_slice(&60_000u16.to_ne_bytes());
        assert!(
            Segmenter::new(&mut read).is_err(),
            "csum_offset past the end"
        );
    }

    #[test]
    fn gro_keeps_each_flow_in_order_and_closes_on_short_or_psh_segments() {
        let p = |seq: u32, flags: u8, len: usize| {
            tcp(false, seq, 9, flags, &[], &payload(len, seq as u8))
        };
        let mut other = tcp(false, 500, 9, TCP_ACK, &[], &payload(100, 1));
        other[20..22].copy_from_slice(&40_001u16.to_be_bytes()); // another source port
        let other_next = {
            let mut q = tcp(false, 600, 9, TCP_ACK, &[], &payload(100, 2));
            q[20..22].copy_from_slice(&40_001u16.to_be_bytes());
            q
        };
        let packets = [
            p(0, TCP_ACK, 100),
            other.clone(),
            p(100, TCP_ACK, 100),
            other_next.clone(),
            p(200, TCP_ACK, 60),            // short: closes
            p(260, TCP_ACK, 100),           // new item
            p(360, TCP_ACK | TCP_PSH, 100), // joins and closes
            p(460, TCP_ACK, 100),           // new item
            p(999, TCP_ACK, 100),           // gap: new item
        ];
        let mut gro = Gro::new();
        for packet in &packets {
            assert_eq!(gro.push(packet), GroPush::Added);
        }
        let out = drain_all(&mut gro);
        let summary: Vec<(u32, usize, u8)> = out
            .iter()
            .map(|o| {
                let p = &o[VNET_HDR_LEN..];
                let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
                (seq, p.len() - 40, VnetHdr::parse(o).unwrap().gso_type)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, 260, GSO_TCPV4),
                (500, 200, GSO_TCPV4),
                (260, 200, GSO_TCPV4),
                (460, 100, GSO_NONE),
                (999, 100, GSO_NONE),
            ]
        );
        assert_eq!(out[2][VNET_HDR_LEN + 33], TCP_ACK | TCP_PSH);
        assert!(gro.is_empty());
    }

    #[test]
    fn gro_does_not_merge_across_acks_options_or_ttl() {
        let mut gro = Gro::new();
        let a = tcp(false, 0, 1, TCP_ACK, &[], &payload(100, 0));
        let b = tcp(false, 100, 2, TCP_ACK, &[], &payload(100, 0));
        let mut c = tcp(false, 200, 2, TCP_ACK, &[], &payload(100, 0));
        c[8] = 63;
        let d = tcp(false, 300, 2, TCP_ACK, &[1, 1, 1, 1], &payload(100, 0));
        for p in [&a, &b, &c, &d] {
            assert_eq!(gro.push(p), GroPush::Added);
        }
        assert_eq!(drain_all(&mut gro).len(), 4);
    }

    #[test]
    fn gro_passes_non_tcp_packets_untouched_and_reports_full() {
        let mut gro = Gro::new();
        let mut udp = tcp(false, 0, 0, 0, &[], b"x");
        udp[9] = PROTO_UDP;
        for _ in 0..GRO_SLOTS {
            assert_eq!(gro.push(&udp), GroPush::Added);
        }
        assert_eq!(gro.push(&udp), GroPush::Full);
        assert_eq!(gro.push(&[]), GroPush::Refused);
        let out = drain_all(&mut gro);
        assert_eq!(out.len(), GRO_SLOTS);
        assert_eq!(out[0][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(&out[0][VNET_HDR_LEN..], &udp[..]);
    }

    #[test]
    fn an_ipv4_packet_shorter_than_its_header_passes_untouched_without_a_panic() {
        // What boringtun hands over for a decrypted packet whose total-length field says 7:
        // it cuts the packet to that length, shorter than any IPv4 header.
        let mut short = tcp(false, 1, 2, TCP_ACK, &[], b"x");
        short[2..4].copy_from_slice(&7u16.to_be_bytes());
        short.truncate(7);
        let mut gro = Gro::new();
        for len in 1..=short.len() {
            assert_eq!(gro.push(&short[..len]), GroPush::Added, "{len} bytes");
        }
        let out = drain_all(&mut gro);
        assert_eq!(out.len(), short.len());
        for (len, written) in (1..).zip(&out) {
            assert_eq!(written[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
            assert_eq!(&written[VNET_HDR_LEN..], &short[..len]);
        }
    }

    #[test]
    fn ipv4_and_ipv6_headers_cut_anywhere_never_panic_gro() {
        for v6 in [false, true] {
            let whole = tcp(v6, 1, 2, TCP_ACK, &[1, 1, 1, 1], b"payload");
            let mut gro = Gro::new();
            for len in 1..whole.len() {
                let mut cut = whole[..len].to_vec();
                // Lengths that agree with the cut, as boringtun makes them.
                if v6 {
                    let payload = len.saturating_sub(40) as u16;
                    if len >= 6 {
                        cut[4..6].copy_from_slice(&payload.to_be_bytes());
                    }
                } else if len >= 4 {
                    cut[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                }
                if gro.push(&cut) == GroPush::Full {
                    gro.drain(|_| {});
                    assert_eq!(gro.push(&cut), GroPush::Added);
                }
            }
            gro.drain(|_| {});
        }
    }

    #[test]
    fn a_single_tcp_packet_goes_out_with_a_partial_checksum() {
        let mut gro = Gro::new();
        let syn = tcp(false, 0, 0, 0x02, &[2, 4, 5, 0xb4], &[]);
        assert_eq!(gro.push(&syn), GroPush::Added);
        let out = drain_all(&mut gro);
        let hdr = VnetHdr::parse(&out[0]).unwrap();
        assert_eq!(
            (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset),
            (F_NEEDS_CSUM, GSO_NONE, 20, 16)
        );
        // What the kernel will compute from it is the original checksum.
        let mut read = out[0].clone();
        assert_eq!(segments(&mut read), vec![syn]);
    }

    #[test]
    fn gso_batch_joins_equal_datagrams_and_ends_on_a_short_one() {
        let a = endpoint("198.18.0.2:51820");
        let b = Endpoint::new(a.addr, Some("198.18.0.9".parse().unwrap()));
        let mut batch = GsoBatch::new(64);
        for i in 0..3u8 {
            batch.space()[..100].fill(i);
            assert_eq!(batch.push(a, 100), BatchPush::Added);
        }
        batch.space()[..50].fill(9);
        assert_eq!(batch.push(a, 50), BatchPush::Added);
        assert!(batch.is_full());
        let p = batch.pending().unwrap();
        assert_eq!((p.to, p.data.len(), p.segment, p.count), (a, 350, 100, 4));
        batch.clear();
        assert!(batch.pending().is_none());

        batch.space()[..100].fill(1);
        assert_eq!(batch.push(a, 100), BatchPush::Added);
        batch.space()[..100].fill(2);
        assert_eq!(batch.push(b, 100), BatchPush::FlushFirst);
        assert_eq!(batch.pending().unwrap().data, &[1; 100][..]);
        batch.clear();
        let p = batch.pending().unwrap();
        assert_eq!((p.to, p.data, p.count), (b, &[2; 100][..], 1));
    }

    #[test]
    fn gso_batch_respects_the_segment_and_byte_limits() {
        let a = endpoint("[fd00::1]:51820");
        let mut batch = GsoBatch::new(3);
        for _ in 0..3 {
            assert_eq!(batch.push(a, 10), BatchPush::Added);
        }
        assert!(batch.is_full());
        assert_eq!(batch.push(a, 10), BatchPush::FlushFirst);
        batch.clear();
        assert_eq!(batch.pending().unwrap().count, 1, "the held datagram");
        batch.clear();
        batch.set_max_segments(64);
        let mut pushed = 0;
        while !batch.is_full() {
            assert_eq!(batch.push(a, 1452), BatchPush::Added);
            pushed += 1;
        }
        assert_eq!(pushed, MAX_GSO_BYTES / 1452);
        assert!(batch.pending().unwrap().data.len() <= MAX_GSO_BYTES);
    }

    proptest! {
        #[test]
        fn any_split_coalesces_back_to_the_same_bytes(
            v6 in any::<bool>(),
            len in 0usize..20_000,
            mss in 1usize..3000,
            seq in any::<u32>(),
        ) {
            let data = payload(len, seq as u8);
            let original = tcp(v6, seq, 5, TCP_ACK, &[], &data);
            let mut read = tso(&original, mss);
            let segs = segments(&mut read);
            prop_assert_eq!(segs.len(), len.div_ceil(mss).max(1));
            let ip_len = if v6 { 40 } else { 20 };
            let mut gro = Gro::new();
            let mut joined = Vec::new();
            for seg in &segs {
                prop_assert!(transport_checksum_ok(seg, ip_len, PROTO_TCP));
                joined.extend_from_slice(&seg[ip_len + 20..]);
                prop_assert!(matches!(gro.push(seg), GroPush::Added | GroPush::Full));
            }
            prop_assert_eq!(&joined, &data);
            let mut rejoined = Vec::new();
            gro.drain(|p| rejoined.extend_from_slice(&p[VNET_HDR_LEN + ip_len + 20..]));
            prop_assert_eq!(rejoined, data);
        }

        #[test]
        fn garbage_reads_never_panic(mut read in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(mut s) = Segmenter::new(&mut read) {
                for _ in 0..1000 {
                    if s.next_segment().is_none() {
                        break;
                    }
                }
            }
        }

        #[test]
        fn garbage_vnet_headers_on_a_real_packet_never_panic(
            hdr in proptest::collection::vec(any::<u8>(), VNET_HDR_LEN),
            len in 0usize..3000,
        ) {
            let mut read = hdr;
            read.extend_from_slice(&tcp(len % 2 == 0, 1, 2, TCP_ACK, &[], &payload(len, 0)));
            if let Ok(mut s) = Segmenter::new(&mut read) {
                let mut n = 0;
                while s.next_segment().is_some() {
                    n += 1;
                    prop_assert!(n <= 3000);
                }
            }
        }

        #[test]
        fn garbage_packets_never_panic_gro(
            packets in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..200), 0u8..5, any::<u16>()),
                0..40,
            ),
        ) {
            let mut gro = Gro::new();
            for (mut p, shape, lie) in packets {
                // Make most of them look like IPv4 or IPv6 TCP whatever their size, with a
                // length field that is true or lies (shorter than the header included).
                let len = if shape % 2 == 0 { p.len() as u16 } else { lie };
                let mut set = |i: usize, v: u8| {
                    if let Some(b) = p.get_mut(i) {
                        *b = v;
                    }
                };
                let [hi, lo] = len.to_be_bytes();
                match shape / 2 {
                    0 => {
                        set(0, 0x45);
                        set(9, PROTO_TCP);
                        set(2, hi);
                        set(3, lo);
                        set(6, 0);
                        set(7, 0);
                    }
                    1 => {
                        let [hi, lo] = len.wrapping_sub(40).to_be_bytes();
                        set(0, 0x60);
                        set(4, hi);
                        set(5, lo);
                        set(6, PROTO_TCP);
                    }
                    _ => {}
                }
                if gro.push(&p) == GroPush::Full {
                    gro.drain(|_| {});
                }
            }
            gro.drain(|_| {});
        }
    }
}
