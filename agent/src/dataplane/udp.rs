//! The underlay UDP socket: `recvmsg` with UDP GRO (up to 64 datagrams per call),
//! `sendmmsg` with UDP GSO (`UDP_SEGMENT`), all buffers and message headers allocated once.
//!
//! Sticky source addresses, as WireGuard keeps them: every received message reports the
//! local address it arrived on (`IPV6_RECVPKTINFO` on the dual-stack socket, which reports
//! IPv4 ones as `::ffff:a.b.c.d`; `IP_PKTINFO` on an IPv4-only one), and a send may carry
//! the local address to leave from (`IP_PKTINFO`/`IPV6_PKTINFO`). A send whose source is
//! gone (`EINVAL`, `EADDRNOTAVAIL`, `ENETUNREACH`) is tried again once with the kernel
//! choosing, and the address is reported ([`Underlay::take_stale`]) so that the device
//! forgets it.
//!
//! Not `recvmmsg`: nix's reusable `MultiHeaders` never resets `msg_controllen`, which the
//! kernel shrinks to what each message used, so a slot that once received a datagram
//! without a GRO control message would lose the segment size of every later batch.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;

use anyhow::{Context as _, Result};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, getsockopt,
    recvmsg, sendmmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use wiremesh_core::Endpoint;
use wiremesh_core::offload::{Batch, MAX_GSO_SEGMENTS};

/// Messages per [`RxRing::recv`]; with GRO each holds up to 64 datagrams.
pub(super) const RX_MESSAGES: usize = 8;
/// One received message: a GRO batch is at most 65,535 bytes of UDP payload
/// (`net/ipv4/udp_offload.c`), and a lone datagram too.
const RX_BUF: usize = 65_536;

/// The underlay socket and its send headers.
pub(super) struct Underlay {
    socket: UdpSocket,
    /// A dual-stack IPv6 socket: IPv4 destinations go out as `::ffff:a.b.c.d`.
    mapped: bool,
    /// Datagrams per send: 1 without UDP GSO.
    max_segments: usize,
    /// Send headers for each combination of control messages ([`Headers::slot`]).
    headers: Headers,
    /// A GSO batch was already found too big for its path (logged once).
    too_big_seen: bool,
    /// A local address a send could not leave from, for the device to forget.
    stale: Option<IpAddr>,
}

/// One set of preallocated send headers per combination of control messages: nix's
/// `sendmmsg` passes the whole preallocated control buffer to the kernel and leaves it as
/// it was, so each buffer must be exactly as long as the messages written into it (a
/// shorter set would leave stale or empty headers, which the kernel refuses).
struct Headers([MultiHeaders<SockaddrStorage>; 6]);

impl Headers {
    fn new() -> Headers {
        let sized = |space: Option<Vec<u8>>| MultiHeaders::preallocate(1, space);
        Headers([
            sized(None),
            sized(Some(nix::cmsg_space!(libc::in_pktinfo))),
            sized(Some(nix::cmsg_space!(libc::in6_pktinfo))),
            sized(Some(nix::cmsg_space!(u16))),
            sized(Some(nix::cmsg_space!(u16, libc::in_pktinfo))),
            sized(Some(nix::cmsg_space!(u16, libc::in6_pktinfo))),
        ])
    }

    /// The headers for a send with (`gso`) or without `UDP_SEGMENT`, from `local`.
    fn slot(&mut self, gso: bool, local: Option<IpAddr>) -> &mut MultiHeaders<SockaddrStorage> {
        let source = match local {
            None => 0,
            Some(IpAddr::V4(_)) => 1,
            Some(IpAddr::V6(_)) => 2,
        };
        let [a, b, c, d, e, f] = &mut self.0;
        match (gso, source) {
            (false, 0) => a,
            (false, 1) => b,
            (false, _) => c,
            (true, 0) => d,
            (true, 1) => e,
            (true, _) => f,
        }
    }
}

/// Whether a send refused with `error` may have failed for its source address (gone, or
/// no longer routable from), so that it is worth sending again with the kernel choosing.
fn source_refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
    )
}

/// What a refused GSO send (`sendmmsg` with `UDP_SEGMENT`) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GsoRefusal {
    /// The kernel cannot segment on this socket or route (`EIO`: no checksum offload on
    /// the route's device; `EINVAL`: kernels before 6.x also for datagrams larger than the
    /// MTU): send this batch and every later one datagram by datagram.
    Unsupported,
    /// The datagrams are larger than the path MTU (`EMSGSIZE`, what Linux 6.x answers):
    /// send this batch datagram by datagram, which the kernel fragments; GSO stays on for
    /// the paths the datagrams fit.
    TooBig,
    /// Anything else: the batch is lost.
    Other,
}

impl GsoRefusal {
    fn of(error: &io::Error) -> GsoRefusal {
        match error.raw_os_error() {
            Some(libc::EIO | libc::EINVAL) => GsoRefusal::Unsupported,
            Some(libc::EMSGSIZE) => GsoRefusal::TooBig,
            _ => GsoRefusal::Other,
        }
    }
}

/// One received message: `len` bytes from `from` (with the local address it arrived on),
/// datagrams of `stride` bytes (the last may be shorter).
#[derive(Debug, Clone, Copy)]
pub(super) struct RxMeta {
    pub(super) from: Endpoint,
    pub(super) len: usize,
    pub(super) stride: usize,
}

/// Receive buffers for up to [`RX_MESSAGES`] messages.
pub(super) struct RxRing {
    buf: Box<[u8]>,
    /// Room for the `UDP_GRO` and packet-info control messages.
    control: Vec<u8>,
    meta: [RxMeta; RX_MESSAGES],
    count: usize,
}

/// A dual-stack UDP socket on `port` (0: the kernel picks one), non-blocking.
///
/// # Errors
/// When the port is taken or the socket cannot be set up.
pub(super) fn bind(port: u16, fwmark: u32) -> Result<std::net::UdpSocket> {
    let socket = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(s) => {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())
                .with_context(|| format!("binding UDP port {port}"))?;
            s
        }
        Err(_) => {
            // No IPv6 in this namespace.
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .with_context(|| format!("binding UDP port {port}"))?;
            s
        }
    };
    if fwmark != 0 {
        socket.set_mark(fwmark).context("setting the fwmark")?;
    }
    // The local address of each datagram (sticky sources, see the module's comment).
    let pktinfo = match socket.local_addr()?.as_socket() {
        Some(SocketAddr::V6(_)) => setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true),
        _ => setsockopt(&socket, sockopt::Ipv4PacketInfo, &true),
    };
    if let Err(e) = pktinfo {
        warn!(error = %e, "no packet info on the underlay socket: replies leave from the address the kernel chooses");
    }
    // Room for bursts in both directions: a GSO send is up to 64 KiB, and the window of a
    // fast TCP flow is several of them.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl Underlay {
    /// Takes a socket from [`bind`], turning UDP GRO on when the kernel has it. Must be
    /// called inside the runtime that will drive it.
    ///
    /// # Errors
    /// When the runtime refuses the socket.
    pub(super) fn new(socket: std::net::UdpSocket) -> Result<Underlay> {
        let gro = setsockopt(&socket, sockopt::UdpGroSegment, &true).is_ok();
        // wireguard-go's probe: the option exists when the kernel takes UDP_SEGMENT.
        let gso = getsockopt(&socket, sockopt::UdpGsoSegment).is_ok();
        let mapped = matches!(socket.local_addr()?, SocketAddr::V6(_));
        debug!(gso, gro, "underlay socket");
        Ok(Underlay {
            socket: UdpSocket::from_std(socket)?,
            mapped,
            max_segments: if gso { MAX_GSO_SEGMENTS } else { 1 },
            headers: Headers::new(),
            too_big_seen: false,
            stale: None,
        })
    }

    /// Datagrams one send may carry (1 without GSO).
    pub(super) fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// The port the socket is bound to.
    pub(super) fn local_port(&self) -> io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Sets the fwmark of outgoing datagrams.
    pub(super) fn set_mark(&self, mark: u32) -> io::Result<()> {
        SockRef::from(&self.socket).set_mark(mark)
    }

    /// Waits until the socket may have datagrams.
    pub(super) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// The local address a send could not leave from since the last call, if any: the
    /// device should forget it ([`wiremesh_core::Device::forget_local`]).
    pub(super) fn take_stale(&mut self) -> Option<IpAddr> {
        self.stale.take()
    }

    /// Sends one datagram, waiting while the send buffer is full; failures are logged.
    pub(super) async fn send_one(&mut self, to: Endpoint, datagram: &[u8]) {
        self.send(Batch {
            to,
            data: datagram,
            segment: datagram.len(),
            count: 1,
        })
        .await;
    }

    /// Sends a batch in one `sendmmsg` (with `UDP_SEGMENT` when it holds more than one
    /// datagram), waiting while the send buffer is full. A GSO send the kernel refuses goes
    /// out datagram by datagram, and turns GSO off when the kernel cannot do it at all
    /// (see [`GsoRefusal`]). Other failures are logged.
    pub(super) async fn send(&mut self, mut batch: Batch<'_>) {
        let to = self.wire_address(batch.to.addr);
        let mut sent = self
            .send_raw(to, batch.to.local, batch.data, batch.count, batch.segment)
            .await;
        if let (Err(e), Some(local)) = (&sent, batch.to.local)
            && source_refused(e)
        {
            debug!(error = %e, %local, to = %batch.to.addr, "cannot send from this address any more; letting the kernel choose");
            self.stale = Some(local);
            batch.to.local = None;
            sent = self
                .send_raw(to, None, batch.data, batch.count, batch.segment)
                .await;
        }
        let refusal = match sent {
            Ok(()) => return,
            Err(e) if batch.count > 1 => match GsoRefusal::of(&e) {
                GsoRefusal::Unsupported => {
                    info!(error = %e, "UDP GSO refused; sending datagram by datagram from now on");
                    self.max_segments = 1;
                    GsoRefusal::Unsupported
                }
                GsoRefusal::TooBig => {
                    if !std::mem::replace(&mut self.too_big_seen, true) {
                        warn!(
                            to = %batch.to,
                            datagram = batch.segment,
                            "encrypted datagrams are larger than the path MTU: the kernel \
                             fragments them (is the tunnel MTU too big for the underlay?)"
                        );
                    }
                    GsoRefusal::TooBig
                }
                GsoRefusal::Other => {
                    debug!(error = %e, to = %batch.to, "sending");
                    return;
                }
            },
            Err(e) => {
                debug!(error = %e, to = %batch.to, "sending");
                return;
            }
        };
        debug!(?refusal, to = %batch.to, count = batch.count, "GSO batch sent datagram by datagram");
        for datagram in batch.data.chunks(batch.segment.max(1)) {
            let local = batch.to.local;
            if let Err(e) = self.send_raw(to, local, datagram, 1, datagram.len()).await {
                debug!(error = %e, to = %batch.to, "sending");
            }
        }
    }

    async fn send_raw(
        &mut self,
        to: SocketAddr,
        local: Option<IpAddr>,
        data: &[u8],
        count: usize,
        segment: usize,
    ) -> io::Result<()> {
        let addr = [Some(SockaddrStorage::from(to))];
        let segment = u16::try_from(segment).unwrap_or(u16::MAX);
        let gso = count > 1;
        let (info4, info6) = packet_info(local);
        let mut storage = [ControlMessage::UdpGsoSegments(&segment); 2];
        let mut n = 0;
        if gso {
            n += 1;
        }
        if let Some(info) = &info4 {
            storage[n] = ControlMessage::Ipv4PacketInfo(info);
            n += 1;
        } else if let Some(info) = &info6 {
            storage[n] = ControlMessage::Ipv6PacketInfo(info);
            n += 1;
        }
        let cmsgs = storage.get(..n).unwrap_or_default();
        loop {
            let fd = self.socket.as_raw_fd();
            let iov = [[IoSlice::new(data)]];
            // Headers whose control buffer fits exactly these messages (see `Headers`).
            let headers = self.headers.slot(gso, local);
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                // Not iterating the results: for sendmmsg they hold no addresses to read.
                sendmmsg(fd, headers, &iov, addr, cmsgs, MsgFlags::empty())
                    .map(|_| ())
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.socket.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The address to hand the kernel: IPv4 as mapped IPv6 on a dual-stack socket.
    fn wire_address(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.mapped => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => to,
        }
    }
}

impl RxRing {
    /// Buffers for [`RX_MESSAGES`] messages of 64 KiB.
    pub(super) fn new() -> RxRing {
        let nowhere = RxMeta {
            from: Endpoint::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            len: 0,
            stride: 0,
        };
        RxRing {
            buf: vec![0u8; RX_MESSAGES * RX_BUF].into_boxed_slice(),
            control: nix::cmsg_space!(libc::c_int, libc::in6_pktinfo, libc::in_pktinfo),
            meta: [nowhere; RX_MESSAGES],
            count: 0,
        }
    }

    /// Receives what is waiting (up to [`RX_MESSAGES`] messages) without blocking; returns
    /// how many messages arrived, 0 when none was waiting.
    ///
    /// # Errors
    /// The `recvmsg(2)` error (such as an ICMP error for an earlier send) when it came
    /// before any message.
    pub(super) fn recv(&mut self, underlay: &Underlay) -> io::Result<usize> {
        let fd = underlay.socket.as_raw_fd();
        self.count = 0;
        for chunk in self.buf.chunks_exact_mut(RX_BUF) {
            let control = &mut self.control;
            let received = underlay.socket.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(chunk)];
                let msg =
                    recvmsg::<SockaddrStorage>(fd, &mut iov, Some(control), MsgFlags::empty())
                        .map_err(io::Error::from)?;
                let mut stride = msg.bytes;
                let mut local = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::UdpGroSegments(size) => {
                                if let Ok(size) = usize::try_from(size)
                                    && size > 0
                                {
                                    stride = size;
                                }
                            }
                            ControlMessageOwned::Ipv4PacketInfo(info) => {
                                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                                    info.ipi_addr.s_addr,
                                ))));
                            }
                            ControlMessageOwned::Ipv6PacketInfo(info) => {
                                local = Some(local_address(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                            }
                            _ => {}
                        }
                    }
                }
                let from = msg.address.as_ref().and_then(socket_addr);
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                Ok((
                    from.map(|f| Endpoint::new(f, local)),
                    msg.bytes,
                    stride,
                    truncated,
                ))
            });
            match received {
                Ok((Some(from), len, stride, false)) => {
                    self.meta[self.count] = RxMeta { from, len, stride };
                    self.count += 1;
                }
                // No source address, or longer than 64 KiB: not a datagram of ours.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if self.count == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(self.count)
    }

    /// Message `i` of the last [`RxRing::recv`]: its metadata and bytes.
    pub(super) fn message(&self, i: usize) -> Option<(RxMeta, &[u8])> {
        let meta = *self.meta[..self.count].get(i)?;
        let start = i * RX_BUF;
        Some((meta, self.buf.get(start..start + meta.len)?))
    }
}

/// The packet info for a send from `local` (none: the kernel chooses): `IP_PKTINFO` for
/// IPv4, also on the dual-stack socket (the kernel hands a send to an IPv4-mapped address
/// to its IPv4 path, which reads it), `IPV6_PKTINFO` for IPv6. The interface is left to
/// the route, as the kernel's WireGuard does for a source that is still local.
fn packet_info(local: Option<IpAddr>) -> (Option<libc::in_pktinfo>, Option<libc::in6_pktinfo>) {
    match local {
        Some(IpAddr::V4(ip)) => (
            Some(libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            }),
            None,
        ),
        Some(IpAddr::V6(ip)) => (
            None,
            Some(libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            }),
        ),
        None => (None, None),
    }
}

/// A local address from `IPV6_PKTINFO`: IPv4-mapped (an IPv4 datagram on the dual-stack
/// socket) as IPv4.
fn local_address(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

/// A received address as a `SocketAddr`, IPv4-mapped IPv6 as IPv4. An IPv6 address keeps
/// its scope (interface index): replies to a link-local peer need it to leave at all.
fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    let v6 = addr.as_sockaddr_in6()?;
    Some(match v6.ip().to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
        None => SocketAddr::V6(SocketAddrV6::new(
            v6.ip(),
            v6.port(),
            v6.flowinfo(),
            v6.scope_id(),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(addr: &str) -> Option<SocketAddr> {
        let addr: SocketAddr = addr.parse().unwrap();
        socket_addr(&SockaddrStorage::from(addr))
    }

    #[test]
    fn received_addresses_keep_their_family_and_mapped_ones_become_ipv4() {
        assert_eq!(
            round_trip("198.18.0.1:51820"),
            Some("198.18.0.1:51820".parse().unwrap())
        );
        assert_eq!(
            round_trip("[fd18:6::2]:51820"),
            Some("[fd18:6::2]:51820".parse().unwrap())
        );
        assert_eq!(
            round_trip("[::ffff:198.18.0.2]:51821"),
            Some("198.18.0.2:51821".parse().unwrap())
        );
    }

    #[test]
    fn refused_gso_sends_are_told_apart() {
        let refusal = |errno| GsoRefusal::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(refusal(libc::EIO), GsoRefusal::Unsupported);
        assert_eq!(refusal(libc::EINVAL), GsoRefusal::Unsupported);
        assert_eq!(refusal(libc::EMSGSIZE), GsoRefusal::TooBig);
        assert_eq!(refusal(libc::ENETUNREACH), GsoRefusal::Other);
        assert_eq!(GsoRefusal::of(&io::Error::other("x")), GsoRefusal::Other);
    }

    #[test]
    fn packet_info_carries_the_local_address_in_network_order() {
        let (v4, none) = packet_info(Some("198.18.0.2".parse().unwrap()));
        assert!(none.is_none());
        assert_eq!(
            v4.unwrap().ipi_spec_dst.s_addr.to_ne_bytes(),
            [198, 18, 0, 2]
        );
        let (none, v6) = packet_info(Some("fd18::2".parse().unwrap()));
        assert!(none.is_none());
        assert_eq!(
            Ipv6Addr::from(v6.unwrap().ipi6_addr.s6_addr),
            "fd18::2".parse::<Ipv6Addr>().unwrap()
        );
        assert!(matches!(packet_info(None), (None, None)));
        assert_eq!(
            local_address("::ffff:198.18.0.2".parse().unwrap()),
            "198.18.0.2".parse::<IpAddr>().unwrap()
        );
        assert!(source_refused(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!source_refused(&io::Error::from_raw_os_error(libc::EAGAIN)));
    }

    #[test]
    fn a_link_local_source_keeps_its_scope() {
        let from = SocketAddrV6::new("fe80::1".parse().unwrap(), 51820, 0, 7);
        let seen = socket_addr(&SockaddrStorage::from(SocketAddr::V6(from)));
        assert_eq!(seen, Some(SocketAddr::V6(from)));
    }
}
