//! The underlay UDP socket: `recvmsg` with UDP GRO (up to 64 datagrams per call),
//! `sendmmsg` with UDP GSO (`UDP_SEGMENT`), all buffers and message headers allocated once.
//!
//! Not `recvmmsg`: nix's reusable `MultiHeaders` never resets `msg_controllen`, which the
//! kernel shrinks to what each message used, so a slot that once received a datagram
//! without a GRO control message would lose the segment size of every later batch.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
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
    /// For sends with a `UDP_SEGMENT` control message.
    gso_headers: MultiHeaders<SockaddrStorage>,
    /// For single datagrams: no control message at all.
    plain_headers: MultiHeaders<SockaddrStorage>,
    /// A GSO batch was already found too big for its path (logged once).
    too_big_seen: bool,
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

/// One received message: `len` bytes from `from`, datagrams of `stride` bytes (the last
/// may be shorter).
#[derive(Debug, Clone, Copy)]
pub(super) struct RxMeta {
    pub(super) from: SocketAddr,
    pub(super) len: usize,
    pub(super) stride: usize,
}

/// Receive buffers for up to [`RX_MESSAGES`] messages.
pub(super) struct RxRing {
    buf: Box<[u8]>,
    /// Room for the `UDP_GRO` control message.
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
            gso_headers: MultiHeaders::preallocate(1, Some(nix::cmsg_space!(u16))),
            plain_headers: MultiHeaders::preallocate(1, None),
            too_big_seen: false,
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

    /// Sends one datagram, waiting while the send buffer is full; failures are logged.
    pub(super) async fn send_one(&mut self, to: SocketAddr, datagram: &[u8]) {
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
    pub(super) async fn send(&mut self, batch: Batch<'_>) {
        let to = self.wire_address(batch.to);
        let refusal = match self
            .send_raw(to, batch.data, batch.count, batch.segment)
            .await
        {
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
            if let Err(e) = self.send_raw(to, datagram, 1, datagram.len()).await {
                debug!(error = %e, to = %batch.to, "sending");
            }
        }
    }

    async fn send_raw(
        &mut self,
        to: SocketAddr,
        data: &[u8],
        count: usize,
        segment: usize,
    ) -> io::Result<()> {
        let addr = [Some(SockaddrStorage::from(to))];
        let segment = u16::try_from(segment).unwrap_or(u16::MAX);
        let gso = [ControlMessage::UdpGsoSegments(&segment)];
        loop {
            let fd = self.socket.as_raw_fd();
            let iov = [[IoSlice::new(data)]];
            // A separate set of headers for single datagrams: nix leaves the control buffer
            // of a preallocated header as it was, so one used for GSO would keep its
            // UDP_SEGMENT.
            let (headers, cmsgs): (_, &[ControlMessage<'_>]) = if count > 1 {
                (&mut self.gso_headers, &gso)
            } else {
                (&mut self.plain_headers, &[])
            };
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
            from: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            stride: 0,
        };
        RxRing {
            buf: vec![0u8; RX_MESSAGES * RX_BUF].into_boxed_slice(),
            control: nix::cmsg_space!(libc::c_int),
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
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::UdpGroSegments(size) = c
                            && let Ok(size) = usize::try_from(size)
                            && size > 0
                        {
                            stride = size;
                        }
                    }
                }
                let from = msg.address.as_ref().and_then(socket_addr);
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                Ok((from, msg.bytes, stride, truncated))
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
    fn a_link_local_source_keeps_its_scope() {
        let from = SocketAddrV6::new("fe80::1".parse().unwrap(), 51820, 0, 7);
        let seen = socket_addr(&SockaddrStorage::from(SocketAddr::V6(from)));
        assert_eq!(seen, Some(SocketAddr::V6(from)));
    }
}
