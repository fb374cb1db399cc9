//! The I/O shell around [`Device`]: the TUN device, the underlay UDP socket, timers,
//! routes and the UAPI socket.
//!
//! The packet loop owns the [`Device`] and runs on a thread of its own, with a
//! single-threaded runtime: it reads TCP super-packets of up to 64 KiB from the TUN device
//! (TSO, `IFF_VNET_HDR`), splits them in place, encrypts each segment straight into a UDP
//! GSO batch and sends the batch in one `sendmmsg`; the other way it takes up to 64
//! datagrams per `recvmsg` (UDP GRO; see `dataplane/udp.rs` for why not `recvmmsg`), decrypts them and
//! coalesces TCP segments into super-packets for the TUN device. Buffers are allocated
//! once. The UAPI server and the route reconciler are tasks of the calling runtime that
//! talk to the loop over bounded channels.

mod udp;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace, warn};
use wiremesh_proto::uapi::{DeviceUpdate, GetResponse, Request};
use wiremesh_proto::{InterfaceAddress, IpCidr, PresharedKey};

use self::udp::{RxRing, Underlay};
use crate::control::{Command, Handle, Snapshot};
use crate::failclosed::{self, Attribution, FailClosed, Owner, Protected, Refused, Standing};
use crate::metrics::Safety;
use crate::netlink::{MAIN_TABLE, Netlink, RouteReconciler, RouteTarget};
use crate::tun::{DetachedTun, Tun};
use crate::uapi_server;
use wiremesh_core::mtu::{self, MAX_ICMP_LEN, MtuVerdict};
use wiremesh_core::offload::{
    BatchPush, Gro, GroPush, GsoBatch, MAX_IP_PACKET, Segmenter, VNET_HDR_LEN,
};
use wiremesh_core::translate::Translation;
use wiremesh_core::{DatagramVerdict, Device, DropReason, Endpoint, TunVerdict};

/// Room for the largest IP packet, plus boringtun's 148-byte handshake initiation that it
/// may write instead of a data message.
const OUT_BUF: usize = MAX_IP_PACKET + 1 + 148;
/// One read from the TUN device: the vnet header and the largest (super-)packet.
const TUN_BUF: usize = VNET_HDR_LEN + MAX_IP_PACKET + 1;
/// TUN reads (each up to 64 KiB with TSO) before the loop looks at the other sources, so
/// that ACKs coming the other way are not held back for long. Fewer wakeups pay: in the
/// lab, 32 carried single-flow TCP some 10% faster than 8, and 64 or 128 no faster.
const TUN_READS: usize = 32;
/// Rounds of UDP receive calls (`recvmsg` with UDP GRO, see `dataplane/udp.rs`) before the loop looks at the
/// other sources.
const UDP_READS: usize = 2;
/// boringtun's timers have one-second resolution for keepalives; a quarter second keeps
/// handshake retries (5 s) and rekeys close to the whitepaper's schedule.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often routes are checked even without a change, to put back routes someone
/// deleted.
const ROUTE_RESYNC: Duration = Duration::from_secs(5);

/// [`InterfaceSpec::mtu`] that asks for the MTU to be derived from the underlay.
pub const MTU_FROM_UNDERLAY: u32 = 0;

/// What to bring up.
#[derive(Debug, Clone)]
pub struct InterfaceSpec {
    /// TUN device name.
    pub name: String,
    /// MTU of the TUN device, or [`MTU_FROM_UNDERLAY`]: the MTU of the routes towards the
    /// peers' endpoints (or of the default route) less WireGuard's 60 bytes (IPv4 underlay)
    /// or 80 (IPv6), and at least 1280 when an address or allowed IP is IPv6.
    pub mtu: u32,
    /// Addresses to put on it.
    pub addresses: Vec<InterfaceAddress>,
    /// Where the UAPI socket goes (normally `/var/run/wireguard`).
    pub uapi_dir: PathBuf,
    /// The state directory that keeps the fail-closed ranges ([`crate::failclosed`]), in
    /// the mesh modes; `None` in standalone mode, where routes follow the config file.
    pub fail_closed: Option<PathBuf>,
    /// Whose each routed range is and which clusters are linked, from the peer machinery
    /// ([`crate::failclosed::Attribution`]); without it every range is of an unknown owner
    /// and none is ever removed.
    pub attribution: Option<watch::Receiver<Attribution>>,
    /// Where the fail-closed routes' standing is reported (metrics, readiness).
    pub safety: Arc<Safety>,
    /// Which routes the interface gets.
    pub routing: Routing,
    /// The prefix translation the device starts with, before it handles any packet
    /// ([`wiremesh_core::translate`]; `up --translate`, or in Kubernetes mode the one last
    /// known, from the state directory); [`Handle::set_translation`] changes it later.
    pub translation: Translation,
}

/// Which routes the interface gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// The device's allowed IPs, in the main table, following every change (`kube` and
    /// `host` modes).
    AllowedIps,
    /// Exactly these, in `table`, each preferring the interface's first address of its
    /// family as source, whatever `wg set` changes later (standalone mode: wg-quick's
    /// `Table`).
    Fixed {
        /// The routing table.
        table: u32,
        /// The routed prefixes (none: no routes).
        routes: BTreeSet<IpCidr>,
    },
}

/// Brings the interface up with `initial` applied, serves until `shutdown` completes,
/// then removes routes, socket and device.
///
/// The update is applied to an in-memory device first: if it is refused, nothing has
/// been created.
///
/// # Errors
/// When the device, socket or routes cannot be set up.
pub async fn run(
    spec: InterfaceSpec,
    initial: DeviceUpdate,
    ready: impl FnOnce(Handle),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut device = Device::new();
    let _ = device
        .apply(&initial)
        .context("the initial configuration was refused")?;
    if !spec.translation.is_empty() {
        info!(pairs = ?spec.translation.pairs().collect::<Vec<_>>(), "prefix translation set");
    }
    device.set_translation(spec.translation.clone());

    let netlink = Netlink::new().await.context("opening netlink")?;
    // Before the TUN device exists: the ranges routed before a restart, a crash or a
    // reboot are closed again first.
    let mut fail_closed = spec.fail_closed.as_ref().map(|dir| Closing {
        dir: dir.clone(),
        set: FailClosed::new(failclosed::load(dir)),
        attribution: spec.attribution.clone(),
        safety: Arc::clone(&spec.safety),
        standing: Standing::default(),
        warned: BTreeSet::new(),
    });
    if let Some(closing) = &mut fail_closed {
        closing.install(&netlink, false).await;
        info!(
            ranges = closing.set.ranges().len(),
            "fail-closed routes in place"
        );
    }
    // From here on the device decides the MTU: a derived one is raised to the IPv6 minimum
    // when IPv6 routes arrive later, a configured one is left as it is.
    let derived = spec.mtu == MTU_FROM_UNDERLAY;
    let mtu = match spec.mtu {
        MTU_FROM_UNDERLAY => {
            // IPv6 inside: an address on the interface, or a peer's allowed IPs.
            let carries_ipv6 = spec.addresses.iter().any(|a| a.addr.is_ipv6())
                || device.routes().iter().any(|c| c.addr().is_ipv6());
            derive_mtu(&netlink, &device, carries_ipv6).await
        }
        mtu => {
            info!(interface = %spec.name, mtu, "MTU as configured");
            mtu
        }
    };
    device.set_mtu(mtu, derived);
    let mtu = device.mtu();
    let tun = DetachedTun::create_offloaded(&spec.name)
        .with_context(|| format!("creating TUN device {}", spec.name))?;
    let index = netlink
        .link_index(&spec.name)
        .await
        .with_context(|| format!("finding link {}", spec.name))?;
    for addr in &spec.addresses {
        netlink
            .add_address(index, *addr)
            .await
            .with_context(|| format!("adding address {addr} to {}", spec.name))?;
    }
    netlink
        .set_mtu_and_up(index, mtu)
        .await
        .with_context(|| format!("setting MTU {mtu} on {}", spec.name))?;

    let socket = udp::bind(device.listen_port(), device.fwmark())?;
    device.set_bound_port(socket.local_addr()?.port());
    info!(
        interface = %spec.name,
        port = device.listen_port(),
        public_key = %device.public_key().map(|k| k.to_string()).unwrap_or_default(),
        peers = device.peer_count(),
        offloads = ?tun.offloads(),
        "interface up"
    );

    let (fixed_routes, target) = match &spec.routing {
        Routing::AllowedIps => (None, RouteTarget::main(index)),
        Routing::Fixed { table, routes } => (
            Some(routes.clone()),
            RouteTarget {
                index,
                table: *table,
                sources: spec.addresses.iter().map(|a| a.addr).collect(),
            },
        ),
    };
    if target.table != MAIN_TABLE {
        info!(table = target.table, "routes go to a table of their own");
    }
    let (link_tx, link_rx) = watch::channel(Link::of(&device, fixed_routes.as_ref()));
    let route_task = tokio::spawn(reconcile_link(netlink, target, link_rx, mtu, fail_closed));

    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let uapi_path = spec.uapi_dir.join(format!("{}.sock", spec.name));
    let uapi = uapi_server::serve(&uapi_path, cmd_tx.clone())
        .with_context(|| format!("serving the UAPI socket {}", uapi_path.display()))?;
    ready(Handle::new(cmd_tx));

    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let parts = Parts {
        name: spec.name.clone(),
        device,
        tun,
        socket,
        link: link_tx,
        fixed_routes,
    };
    std::thread::Builder::new()
        .name("wm-dataplane".into())
        .spawn(move || {
            let _ = done_tx.send(packet_thread(parts, cmd_rx, stop_rx));
        })
        .context("starting the data-plane thread")?;
    tokio::pin!(shutdown);
    let mut done_rx = done_rx;
    let exit = tokio::select! {
        () = &mut shutdown => {
            let _ = stop_tx.send(());
            done_rx.await
        }
        exit = &mut done_rx => exit,
    };

    uapi.stop();
    // The loop's end dropped the routes sender, which makes the route task remove every
    // route it installed (also when the thread panicked).
    let (result, tun) = match exit {
        Ok(exit) => (exit.result, exit.tun),
        Err(_) => (Err(anyhow!("the data-plane thread panicked")), None),
    };
    match tokio::time::timeout(Duration::from_secs(5), route_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "removing routes"),
        Ok(Err(e)) => warn!(error = %e, "route task failed"),
        Err(_) => warn!("route removal timed out"),
    }
    drop(tun);
    info!(interface = %spec.name, "interface down");
    result
}

/// What the packet loop starts from.
struct Parts {
    name: String,
    device: Device,
    tun: DetachedTun,
    socket: std::net::UdpSocket,
    link: watch::Sender<Link>,
    fixed_routes: Option<BTreeSet<IpCidr>>,
}

/// How the packet loop ended: the TUN device outlives it until the routes are gone.
struct Exit {
    result: Result<()>,
    tun: Option<DetachedTun>,
}

/// The data-plane thread: a single-threaded runtime that drives the packet loop until
/// `stop` fires (or its sender is dropped).
fn packet_thread(
    parts: Parts,
    commands: mpsc::Receiver<Command>,
    stop: oneshot::Receiver<()>,
) -> Exit {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return Exit {
                result: Err(anyhow!(e).context("starting the data-plane runtime")),
                tun: Some(parts.tun),
            };
        }
    };
    runtime.block_on(async move {
        let tun = match parts.tun.attach() {
            Ok(tun) => tun,
            Err(e) => {
                return Exit {
                    result: Err(anyhow!(e)),
                    tun: None,
                };
            }
        };
        let udp = match Underlay::new(parts.socket) {
            Ok(udp) => udp,
            Err(e) => {
                return Exit {
                    result: Err(e),
                    tun: Some(tun.detach()),
                };
            }
        };
        let vnet = tun.offloads().vnet_hdr;
        let mut shell = Shell {
            name: parts.name,
            device: parts.device,
            tx: GsoBatch::new(udp.max_segments()),
            tun,
            vnet,
            udp,
            rx: RxRing::new(),
            link: parts.link,
            fixed_routes: parts.fixed_routes,
            tun_buf: vec![0u8; TUN_BUF].into_boxed_slice(),
            out: vec![0u8; OUT_BUF].into_boxed_slice(),
            gro: Gro::new(),
            icmp: vec![0u8; VNET_HDR_LEN + MAX_ICMP_LEN].into_boxed_slice(),
        };
        let result = shell.run(commands, stop).await;
        let Shell { tun, link, .. } = shell;
        drop(link);
        Exit {
            result,
            tun: Some(tun.detach()),
        }
    })
}

struct Shell {
    name: String,
    device: Device,
    tun: Tun,
    /// The TUN device puts a `virtio_net_hdr` before every packet.
    vnet: bool,
    udp: Underlay,
    rx: RxRing,
    /// What the route task makes of the interface.
    link: watch::Sender<Link>,
    /// The routes when they do not follow the device ([`Routing::Fixed`]).
    fixed_routes: Option<BTreeSet<IpCidr>>,
    /// One TUN read.
    tun_buf: Box<[u8]>,
    /// Encrypted datagrams waiting for one GSO send.
    tx: GsoBatch,
    /// Decrypted packets, replies and timer messages.
    out: Box<[u8]>,
    /// Decrypted packets waiting to be written to the TUN device.
    gro: Gro,
    /// An ICMP error for the TUN device, behind room for a vnet header.
    icmp: Box<[u8]>,
}

impl Shell {
    async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(TIMER_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                r = self.tun.readable() => {
                    r.context("waiting on the TUN device")?;
                    self.drain_tun().await;
                }
                r = self.udp.readable() => {
                    r.context("waiting on the UDP socket")?;
                    self.drain_udp().await;
                }
                _ = ticker.tick() => self.tick().await,
                Some(cmd) = commands.recv() => self.command(cmd).await,
            }
            if let Some(local) = self.udp.take_stale() {
                let peers = self.device.forget_local(local);
                info!(%local, peers, "local address no longer usable: the kernel chooses the source");
            }
        }
    }

    /// Reads, splits and encrypts what the TUN device has, then sends the last batch.
    async fn drain_tun(&mut self) {
        let Shell {
            device,
            tun,
            vnet,
            udp,
            tun_buf,
            tx,
            icmp,
            ..
        } = self;
        let now = Instant::now();
        for _ in 0..TUN_READS {
            let len = match tun.try_recv(tun_buf) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "reading the TUN device");
                    break;
                }
            };
            // The kernel clamps a read to the buffer; a longer length would be a bug, not
            // a packet.
            let Some(read) = tun_buf.get_mut(..len) else {
                device.count_drop(DropReason::BadTunPacket);
                continue;
            };
            if !*vnet {
                if fits(device, tun, false, read, now, icmp) {
                    // Padded in place: the read buffer has room after the packet.
                    let sent = sent(device.handle_tun_packet_in_place(tun_buf, len, tx.space()));
                    batch(tx, udp, sent).await;
                }
                continue;
            }
            // A single packet is padded in place, behind the vnet header; the segments of
            // a super-packet are not (the next one follows), and are copied when they
            // need padding (the kernel sizes all but the last to the MTU, which needs none).
            // A super-packet is translated once, before it is split.
            if device.translate_tun_read(read).is_err() {
                trace_drop(DropReason::Untranslatable);
                continue;
            }
            let single = match Segmenter::new(read) {
                Ok(mut segments) if !segments.is_gso() => segments.next_segment().map(<[u8]>::len),
                Ok(mut segments) => {
                    // A super-packet is as long as 64 KiB; its segments are sized by the
                    // kernel from the device's MTU. Only a single packet can be too big.
                    while let Some(packet) = segments.next_segment() {
                        encrypt(device, tx, udp, packet).await;
                    }
                    None
                }
                Err(e) => {
                    device.count_drop(DropReason::BadTunPacket);
                    trace!(error = %e, "refused a TUN read");
                    None
                }
            };
            if let Some(n) = single
                && let Some(room) = tun_buf.get_mut(VNET_HDR_LEN..)
                && let Some(packet) = room.get(..n)
                && fits(device, tun, true, packet, now, icmp)
            {
                let sent = sent(device.handle_tun_packet_in_place(room, n, tx.space()));
                batch(tx, udp, sent).await;
            }
        }
        flush(tx, udp).await;
    }

    /// Receives, decrypts and delivers what the UDP socket has, then writes the last
    /// coalesced packets.
    async fn drain_udp(&mut self) {
        let Shell {
            device,
            tun,
            vnet,
            udp,
            rx,
            out,
            gro,
            ..
        } = self;
        for _ in 0..UDP_READS {
            let count = match rx.recv(udp) {
                Ok(0) => break,
                Ok(count) => count,
                Err(e) => {
                    debug!(error = %e, "reading the UDP socket");
                    break;
                }
            };
            for i in 0..count {
                let Some((meta, message)) = rx.message(i) else {
                    continue;
                };
                for datagram in message.chunks(meta.stride.max(1)) {
                    let flush = match device.handle_datagram(meta.from, datagram, out) {
                        DatagramVerdict::Tunnel { packet, .. } => {
                            deliver(gro, tun, *vnet, packet);
                            None
                        }
                        DatagramVerdict::Reply { peer, to, datagram } => {
                            udp.send_one(to, datagram).await;
                            peer
                        }
                        DatagramVerdict::Done => None,
                        DatagramVerdict::Drop(reason) => {
                            trace_drop(reason);
                            None
                        }
                    };
                    if let Some(peer) = flush {
                        while let Some((to, datagram)) = device.poll_queued(peer, out) {
                            udp.send_one(to, datagram).await;
                        }
                    }
                }
            }
            // Fewer messages than there is room for: the socket was found empty (which
            // cleared its readiness), and another round would be one more system call per
            // lone packet. When a message was skipped or an error cut the round short, the
            // readiness is still set and the loop's `readable()` comes straight back.
            if count < udp::RX_MESSAGES {
                break;
            }
        }
        write_coalesced(gro, tun);
    }

    async fn tick(&mut self) {
        let mut pending: Vec<(Endpoint, Vec<u8>)> = Vec::new();
        let now = Instant::now();
        self.device
            .update_timers(now, &mut self.out, |to, datagram| {
                pending.push((to, datagram.to_vec()));
            });
        for (to, datagram) in pending {
            self.udp.send_one(to, &datagram).await;
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Uapi(Request::Get, reply) => {
                let _ = reply.send(self.uapi_get());
            }
            Command::Uapi(Request::Set(update), reply) => {
                let errno = match self.apply(&update) {
                    Ok(()) => 0,
                    Err(e) => {
                        warn!(error = %e.message, "UAPI set refused");
                        e.errno
                    }
                };
                let _ = reply.send(format!("errno={errno}\n\n"));
            }
            Command::Apply(update, reply) => {
                let _ = reply.send(self.apply(&update).map_err(|e| e.message));
            }
            Command::SetTranslation(translation) => {
                if translation != *self.device.translation() {
                    info!(pairs = ?translation.pairs().collect::<Vec<_>>(), "prefix translation set");
                }
                self.device.set_translation(translation);
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(Snapshot {
                    interface: self.name.clone(),
                    peers: self.device.peers(),
                    counters: self.device.counters().clone(),
                    live_tunnels: self.device.live_tunnels(),
                });
            }
        }
    }

    fn apply(&mut self, update: &DeviceUpdate) -> Result<(), ApplyError> {
        // A new listen port is bound before anything changes, so a port in use refuses
        // the whole update.
        let new_socket = match update.listen_port {
            Some(port) if port != self.device.listen_port() => Some(
                udp::bind(port, update.fwmark.unwrap_or(self.device.fwmark()))
                    .and_then(Underlay::new)
                    .map_err(|e| ApplyError {
                        errno: 98, // EADDRINUSE
                        message: format!("listen port {port}: {e:#}"),
                    })?,
            ),
            _ => None,
        };
        let outcome = self.device.apply(update).map_err(|e| ApplyError {
            errno: e.errno(),
            message: e.to_string(),
        })?;
        if let Some(socket) = new_socket {
            self.udp = socket;
            if let Ok(port) = self.udp.local_port() {
                self.device.set_bound_port(port);
            }
        } else if outcome.fwmark_changed
            && let Err(e) = self.udp.set_mark(self.device.fwmark())
        {
            warn!(error = %e, "setting the fwmark");
        }
        for key in &outcome.removed {
            info!(peer = %key.short(), "peer removed");
        }
        for key in &outcome.added {
            info!(peer = %key.short(), "peer added");
        }
        for (old, new) in &outcome.rekeyed {
            info!(peer = %new.short(), old = %old.short(), "peer rotated its key");
        }
        if outcome.routes_changed || outcome.mtu_changed {
            self.link
                .send_replace(Link::of(&self.device, self.fixed_routes.as_ref()));
        }
        Ok(())
    }

    fn uapi_get(&self) -> String {
        let mut r = GetResponse::new();
        if let Some(key) = self.device.private_key() {
            r.private_key(&key);
        }
        if self.device.listen_port() != 0 {
            r.listen_port(self.device.listen_port());
        }
        if self.device.fwmark() != 0 {
            r.fwmark(self.device.fwmark());
        }
        let now = SystemTime::now();
        for peer in self.device.peers() {
            r.peer(&peer.public_key);
            // wireguard-go writes the zero key when there is none.
            r.preshared_key(&peer.preshared_key.unwrap_or(PresharedKey::from([0u8; 32])));
            r.protocol_version(1);
            if let Some(endpoint) = peer.endpoint {
                r.endpoint(endpoint);
            }
            let (sec, nsec) = peer
                .since_handshake
                .and_then(|d| now.checked_sub(d))
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
            r.last_handshake(sec, nsec);
            r.tx_bytes(peer.tx_bytes);
            r.rx_bytes(peer.rx_bytes);
            r.persistent_keepalive_interval(peer.persistent_keepalive);
            for cidr in &peer.allowed_ips {
                r.allowed_ip(cidr);
            }
        }
        r.finish(0)
    }
}

struct ApplyError {
    errno: i32,
    message: String,
}

fn trace_drop(reason: DropReason) {
    tracing::trace!(%reason, "packet dropped");
}

/// Whether a single packet from the TUN device goes on to be encrypted; when it is too big
/// for the tunnel and may not be fragmented, it is dropped (counted as
/// [`DropReason::TooBig`]) and answered with an ICMP error written into the TUN device.
fn fits(
    device: &mut Device,
    tun: &Tun,
    vnet: bool,
    packet: &[u8],
    now: Instant,
    icmp: &mut [u8],
) -> bool {
    let Some((header, out)) = icmp.split_at_mut_checked(VNET_HDR_LEN) else {
        return true;
    };
    let len = match device.check_mtu(packet, now, out) {
        MtuVerdict::Fits => return true,
        MtuVerdict::TooBig(answer) => answer.len(),
        MtuVerdict::TooBigSilently => {
            trace!(
                len = packet.len(),
                mtu = device.mtu(),
                "too big, not answered"
            );
            return false;
        }
    };
    trace!(
        len = packet.len(),
        mtu = device.mtu(),
        "too big, ICMP error sent"
    );
    // A vnet header of zeros: no GSO, checksums complete.
    header.fill(0);
    let start = if vnet { 0 } else { VNET_HDR_LEN };
    if let Some(answer) = icmp.get(start..VNET_HDR_LEN + len) {
        write_tun(tun, answer);
    }
    false
}

/// Encrypts one packet into the GSO batch, sending the batch when the packet cannot join
/// it or it is full.
async fn encrypt(device: &mut Device, tx: &mut GsoBatch, udp: &mut Underlay, packet: &[u8]) {
    let sent = sent(device.handle_tun_packet(packet, tx.space()));
    batch(tx, udp, sent).await;
}

/// Where a datagram encrypted into the batch's space goes, and its length; `None` when
/// nothing was (queued for a handshake, or dropped).
fn sent(verdict: TunVerdict<'_>) -> Option<(Endpoint, usize)> {
    match verdict {
        TunVerdict::Send { to, datagram, .. } => Some((to, datagram.len())),
        TunVerdict::Queued => None,
        TunVerdict::Drop(reason) => {
            trace_drop(reason);
            None
        }
    }
}

/// Adds the datagram encrypted into the batch's space to it, sending the batch when the
/// datagram cannot join it or it is full.
async fn batch(tx: &mut GsoBatch, udp: &mut Underlay, sent: Option<(Endpoint, usize)>) {
    let Some((to, len)) = sent else {
        return;
    };
    if tx.push(to, len) == BatchPush::FlushFirst {
        flush(tx, udp).await;
    }
    if tx.is_full() {
        flush(tx, udp).await;
    }
}

/// Sends the pending batch, if any.
async fn flush(tx: &mut GsoBatch, udp: &mut Underlay) {
    if let Some(batch) = tx.pending() {
        udp.send(batch).await;
    }
    tx.set_max_segments(udp.max_segments());
    tx.clear();
}

/// Hands a decrypted packet to the coalescer, or straight to a TUN device without vnet
/// headers.
fn deliver(gro: &mut Gro, tun: &Tun, vnet: bool, packet: &[u8]) {
    if !vnet {
        write_tun(tun, packet);
        return;
    }
    match gro.push(packet) {
        GroPush::Added => {}
        GroPush::Full => {
            write_coalesced(gro, tun);
            let _ = gro.push(packet);
        }
        GroPush::Refused => trace!(len = packet.len(), "packet too large to coalesce"),
    }
}

/// Writes every coalesced packet, in order.
fn write_coalesced(gro: &mut Gro, tun: &Tun) {
    gro.drain(|packet| write_tun(tun, packet));
}

fn write_tun(tun: &Tun, packet: &[u8]) {
    if let Err(e) = tun.write_now(packet) {
        debug!(error = %e, "writing to the TUN device");
    }
}

/// The tunnel MTU from the underlay: the smallest over the routes to the peers' endpoints,
/// else the default route's, less WireGuard's overhead, and at least the IPv6 minimum when
/// the tunnel `carries_ipv6`; [`mtu::DEFAULT_MTU`] when the underlay tells nothing.
async fn derive_mtu(netlink: &Netlink, device: &Device, carries_ipv6: bool) -> u32 {
    let endpoints: BTreeSet<IpAddr> = device
        .peers()
        .iter()
        .filter_map(|p| p.endpoint.map(|e| e.ip()))
        .collect();
    let mut paths = Vec::new();
    for endpoint in endpoints {
        match netlink.path_mtu(endpoint, device.fwmark()).await {
            Ok(path) => {
                debug!(%endpoint, mtu = path.mtu, "underlay path");
                paths.push(path);
            }
            Err(e) => debug!(%endpoint, error = %e, "no underlay path"),
        }
    }
    let from = if paths.is_empty() {
        match netlink.default_route_mtu().await {
            Ok(Some(path)) => paths.push(path),
            Ok(None) => {}
            Err(e) => debug!(error = %e, "reading the default route"),
        }
        "default route"
    } else {
        "peer endpoints"
    };
    match mtu::tunnel_mtu(paths.iter().copied()) {
        Some(mtu) => {
            let underlay = paths.iter().map(|p| p.mtu).min().unwrap_or(0);
            let floored = mtu::with_ipv6_floor(mtu, carries_ipv6);
            if floored != mtu {
                warn!(
                    mtu = floored,
                    underlay,
                    from,
                    "MTU derived from the underlay is below the IPv6 minimum; using the \
                     minimum, and the underlay fragments the encrypted datagrams"
                );
                return floored;
            }
            info!(mtu, underlay, from, "MTU derived from the underlay");
            mtu
        }
        None => {
            info!(
                mtu = mtu::DEFAULT_MTU,
                "no route on the underlay to derive the MTU from; using the default"
            );
            mtu::DEFAULT_MTU
        }
    }
}

/// What the interface should have: its routes (the device's allowed IPs, or the `fixed`
/// ones), and the device's MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    routes: BTreeSet<IpCidr>,
    mtu: u32,
}

impl Link {
    fn of(device: &Device, fixed: Option<&BTreeSet<IpCidr>>) -> Self {
        Self {
            routes: fixed.cloned().unwrap_or_else(|| device.routes()),
            mtu: device.mtu(),
        }
    }
}

/// Keeps the interface's routes and MTU equal to what `desired` says until the sender is
/// dropped, then removes the routes. The MTU is set first: it only changes when the device
/// raises a derived MTU to the IPv6 minimum for an IPv6 route ([`Device::set_mtu`]), and
/// below that minimum Linux turns IPv6 off on the device and refuses its IPv6 routes.
///
/// With `fail_closed` (a state directory and the set read from it), every routed range is
/// added to the set, persisted, and gets its fail-closed route before its tunnel route;
/// those stay when the task ends. Those of a cluster no longer linked go once its tunnel
/// routes are gone.
async fn reconcile_link(
    netlink: Netlink,
    target: RouteTarget,
    mut desired: watch::Receiver<Link>,
    mut mtu: u32,
    mut fail_closed: Option<Closing>,
) -> Result<()> {
    let index = target.index;
    let mut reconciler = RouteReconciler::new(target);
    let mut resync = tokio::time::interval(ROUTE_RESYNC);
    loop {
        let Link {
            routes,
            mtu: wanted,
        } = desired.borrow_and_update().clone();
        if wanted != mtu {
            match netlink.set_mtu_and_up(index, wanted).await {
                Ok(()) => {
                    warn!(
                        mtu = wanted,
                        was = mtu,
                        "IPv6 routes arrived: MTU raised to the IPv6 minimum, and the \
                         underlay fragments the encrypted datagrams"
                    );
                    mtu = wanted;
                }
                Err(e) => warn!(mtu = wanted, error = %e, "raising the MTU for IPv6"),
            }
        }
        if let Some(closing) = &mut fail_closed {
            closing.close_ranges(&netlink, &routes).await;
        }
        match reconciler.reconcile(&netlink, &routes).await {
            Ok(diff) => {
                for (cidr, e) in &diff.failed {
                    warn!(route = %cidr, error = %e, "route not installed");
                }
            }
            Err(e) => warn!(error = %e, "reconciling routes"),
        }
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = resync.tick() => {}
            () = attribution_changed(fail_closed.as_mut()) => {}
        }
    }
    reconciler
        .remove_all(&netlink)
        .await
        .context("removing routes")?;
    Ok(())
}

/// The fail-closed set the route task keeps: where it is persisted, what the peer
/// machinery says about whose ranges they are, and whether it is in force.
struct Closing {
    dir: PathBuf,
    set: FailClosed,
    attribution: Option<watch::Receiver<Attribution>>,
    safety: Arc<Safety>,
    standing: Standing,
    /// The linked clusters' ranges refused a fail-closed route, already warned about.
    warned: BTreeSet<Refused>,
}

impl Closing {
    /// Adds the `routed` ranges and the linked clusters' allowances (less those
    /// [`failclosed::screen`] refuses) to the fail-closed set with their owners, forgets
    /// (and deletes the routes of) those of clusters no longer linked and those that came
    /// to cover this node, persists the set when it changed (or the last write failed),
    /// and installs the missing fail-closed routes (also those someone deleted). A set
    /// whose file is gone was removed by the user (`wiremesh-agent cleanup`): it starts
    /// again from the ranges routed now.
    async fn close_ranges(&mut self, netlink: &Netlink, routed: &BTreeSet<IpCidr>) {
        let Attribution {
            mut owners,
            linked,
            allowances,
            local_ranges,
            endpoints,
        } = self
            .attribution
            .as_mut()
            .map(|a| a.borrow_and_update().clone())
            .unwrap_or_default();
        let mut wanted = routed.clone();
        let mut conflicting = Vec::new();
        let mut checked = true;
        let watched = !allowances.is_empty()
            || self
                .set
                .ranges()
                .values()
                .any(|o| matches!(o, Owner::Cluster(_)));
        if watched {
            match netlink.own_addresses().await {
                Ok(mut addresses) => {
                    addresses.extend(endpoints);
                    let protected = Protected {
                        addresses,
                        ranges: local_ranges,
                    };
                    let (admitted, refused) = failclosed::screen(&allowances, &protected);
                    self.warn_refused(refused);
                    for (cidr, owner) in admitted {
                        wanted.insert(cidr);
                        owners.entry(cidr).or_insert(owner);
                    }
                    conflicting = self.set.conflicting(&protected, routed);
                }
                // Nothing is admitted that cannot be checked; what is closed stays.
                Err(e) => {
                    checked = false;
                    warn!(error = %e, "reading this node's addresses; linked clusters' ranges wait");
                }
            }
        }
        let set = &mut self.set;
        let dir = self.dir.as_path();
        let mut changed = if failclosed::persisted(dir) {
            set.extend(&wanted, &owners)
        } else {
            if !set.ranges().is_empty() {
                info!("the fail-closed ranges were removed: starting again from the routed ones");
            }
            set.reset(&wanted, &owners);
            true
        };
        let mut gone = conflicting;
        if let Some(linked) = &linked {
            gone.extend(set.unlinked(linked, routed));
        }
        if !gone.is_empty() {
            gone.sort();
            gone.dedup();
            let removed = failclosed::remove(netlink, &gone).await;
            changed |= set.forget(&removed);
        }
        if self.standing.must_save(changed) {
            let saved = failclosed::save(dir, set.ranges());
            if let Err(e) = &saved {
                warn!(error = %e, dir = %dir.display(), "saving the fail-closed ranges; retried at the next pass");
            }
            self.standing.saved(saved.is_ok());
        }
        self.install(netlink, linked.is_some() && checked).await;
    }

    /// Installs the missing fail-closed routes and reports the standing; `linked_known`
    /// when the set includes the linked clusters' grants.
    async fn install(&mut self, netlink: &Netlink, linked_known: bool) {
        let failed = match failclosed::install(netlink, &self.set).await {
            Ok(failed) => Some(failed),
            Err(e) => {
                warn!(error = %e, "installing the fail-closed routes; retried at the next pass");
                None
            }
        };
        self.standing.installed(failed);
        self.safety.fail_closed(
            self.standing.errors(),
            self.standing.problem(),
            linked_known,
        );
    }

    /// Warns once about each linked cluster's range refused a fail-closed route.
    fn warn_refused(&mut self, refused: Vec<Refused>) {
        let now: BTreeSet<_> = refused.into_iter().collect();
        for (cidr, owner, why) in now.difference(&self.warned) {
            let cluster = match owner {
                Owner::Cluster(name) => name.as_str(),
                Owner::Local | Owner::Unknown => "",
            };
            warn!(
                peer_cluster = cluster,
                %cidr,
                reason = %why,
                "a range allowed to a linked cluster (its PeerCluster) gets no fail-closed route"
            );
        }
        self.warned = now;
    }
}

/// Completes when the attribution changed; never when there is none (or its sender is
/// gone: the agent is stopping).
async fn attribution_changed(closing: Option<&mut Closing>) {
    if let Some(attribution) = closing.and_then(|c| c.attribution.as_mut())
        && attribution.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}
