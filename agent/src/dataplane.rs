//! The I/O shell around [`Device`]: the TUN device, the underlay UDP socket, timers,
//! routes and the UAPI socket.
//!
//! One task owns the [`Device`] and runs the packet loop; the UAPI server and the route
//! reconciler are tasks of their own that talk to it over bounded channels.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use wiremesh_proto::uapi::{DeviceUpdate, GetResponse, Request};
use wiremesh_proto::{InterfaceAddress, IpCidr, PresharedKey};

use crate::core::{DatagramVerdict, Device, DropReason, TunVerdict};
use crate::metrics::Snapshot;
use crate::netlink::{Netlink, RouteReconciler};
use crate::tun::Tun;
use crate::uapi_server;

/// Largest datagram or packet we handle: the biggest UDP payload.
const MAX_PACKET: usize = 65_536;
/// boringtun's encapsulation overhead (header 16 + tag 16) plus room for the 148-byte
/// handshake initiation it may write instead.
const OUT_BUF: usize = MAX_PACKET + 148;
/// Packets taken from one source before the loop looks at the others, so that neither
/// direction starves the other or the timers.
const BATCH: usize = 64;
/// boringtun's timers have one-second resolution for keepalives; a quarter second keeps
/// handshake retries (5 s) and rekeys close to the whitepaper's schedule.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often routes are checked even without a change, to put back routes someone
/// deleted.
const ROUTE_RESYNC: Duration = Duration::from_secs(5);

/// What to bring up.
#[derive(Debug, Clone)]
pub struct InterfaceSpec {
    /// TUN device name.
    pub name: String,
    /// MTU of the TUN device.
    pub mtu: u32,
    /// Addresses to put on it.
    pub addresses: Vec<InterfaceAddress>,
    /// Where the UAPI socket goes (normally `/var/run/wireguard`).
    pub uapi_dir: PathBuf,
}

/// A request to the task that owns the device.
#[derive(Debug)]
pub enum Command {
    /// A parsed UAPI request; the reply is the full response text.
    Uapi(Request, oneshot::Sender<String>),
    /// Apply an update (Kubernetes mode); the reply says whether it was accepted.
    Apply(DeviceUpdate, oneshot::Sender<Result<(), String>>),
    /// A snapshot of the peers and counters.
    Snapshot(oneshot::Sender<Snapshot>),
}

/// A handle for other tasks to reach the device.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
}

impl Handle {
    /// Applies an update and waits for the verdict.
    ///
    /// # Errors
    /// When the data plane has stopped or refused the update.
    pub async fn apply(&self, update: DeviceUpdate) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Apply(update, tx))
            .await
            .context("data plane stopped")?;
        rx.await
            .context("data plane stopped")?
            .map_err(anyhow::Error::msg)
    }

    /// A snapshot of the peers and counters.
    ///
    /// # Errors
    /// When the data plane has stopped.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Snapshot(tx))
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }
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

    let tun =
        Tun::create(&spec.name).with_context(|| format!("creating TUN device {}", spec.name))?;
    let netlink = Netlink::new().await.context("opening netlink")?;
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
        .set_mtu_and_up(index, spec.mtu)
        .await
        .with_context(|| format!("setting MTU {} on {}", spec.mtu, spec.name))?;

    let udp = bind_underlay(device.listen_port(), device.fwmark())?;
    device.set_bound_port(udp.local_addr()?.port());
    info!(
        interface = %spec.name,
        port = device.listen_port(),
        public_key = %device.public_key().map(|k| k.to_string()).unwrap_or_default(),
        peers = device.peer_count(),
        "interface up"
    );

    let (routes_tx, routes_rx) = watch::channel(device.routes());
    let route_task = tokio::spawn(reconcile_routes(netlink, index, routes_rx));

    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let uapi_path = spec.uapi_dir.join(format!("{}.sock", spec.name));
    let uapi = uapi_server::serve(&uapi_path, cmd_tx.clone())
        .with_context(|| format!("serving the UAPI socket {}", uapi_path.display()))?;
    ready(Handle { commands: cmd_tx });

    let mut shell = Shell {
        name: spec.name.clone(),
        device,
        tun,
        udp,
        routes: routes_tx,
        in_buf: vec![0u8; MAX_PACKET].into_boxed_slice(),
        out_buf: vec![0u8; OUT_BUF].into_boxed_slice(),
    };
    let result = shell.run(cmd_rx, shutdown).await;

    uapi.stop();
    // Dropping the sender makes the route task remove every route it installed.
    drop(shell.routes);
    match tokio::time::timeout(Duration::from_secs(5), route_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "removing routes"),
        Ok(Err(e)) => warn!(error = %e, "route task failed"),
        Err(_) => warn!("route removal timed out"),
    }
    drop(shell.tun);
    info!(interface = %spec.name, "interface down");
    result
}

/// A dual-stack UDP socket on `port` (0: the kernel picks one).
fn bind_underlay(port: u16, fwmark: u32) -> Result<UdpSocket> {
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
    // Room for bursts in both directions: a 64 KiB TCP window is ~45 datagrams.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket.into())?)
}

struct Shell {
    name: String,
    device: Device,
    tun: Tun,
    udp: UdpSocket,
    routes: watch::Sender<BTreeSet<IpCidr>>,
    in_buf: Box<[u8]>,
    out_buf: Box<[u8]>,
}

impl Shell {
    async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(TIMER_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
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
        }
    }

    async fn drain_tun(&mut self) {
        for _ in 0..BATCH {
            let len = match self.tun.try_recv(&mut self.in_buf) {
                Ok(Some(len)) => len,
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %e, "reading the TUN device");
                    return;
                }
            };
            match self
                .device
                .handle_tun_packet(&self.in_buf[..len], &mut self.out_buf)
            {
                TunVerdict::Send { to, datagram, .. } => {
                    send_udp(&self.udp, to, datagram).await;
                }
                TunVerdict::Queued => {}
                TunVerdict::Drop(reason) => trace_drop(reason),
            }
        }
    }

    async fn drain_udp(&mut self) {
        for _ in 0..BATCH {
            let (len, from) = match self.udp.try_recv_from(&mut self.in_buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "reading the UDP socket");
                    return;
                }
            };
            let from = canonical(from);
            let flush =
                match self
                    .device
                    .handle_datagram(from, &self.in_buf[..len], &mut self.out_buf)
                {
                    DatagramVerdict::Tunnel { packet, .. } => {
                        if let Err(e) = self.tun.send(packet).await {
                            debug!(error = %e, "writing to the TUN device");
                        }
                        None
                    }
                    DatagramVerdict::Reply { peer, to, datagram } => {
                        send_udp(&self.udp, to, datagram).await;
                        peer
                    }
                    DatagramVerdict::Done => None,
                    DatagramVerdict::Drop(reason) => {
                        trace_drop(reason);
                        None
                    }
                };
            if let Some(peer) = flush {
                while let Some((to, datagram)) = self.device.poll_queued(peer, &mut self.out_buf) {
                    send_udp(&self.udp, to, datagram).await;
                }
            }
        }
    }

    async fn tick(&mut self) {
        let mut pending: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        self.device
            .update_timers(&mut self.out_buf, |to, datagram| {
                pending.push((to, datagram.to_vec()));
            });
        for (to, datagram) in pending {
            send_udp(&self.udp, to, &datagram).await;
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
            Command::Snapshot(reply) => {
                let _ = reply.send(Snapshot {
                    interface: self.name.clone(),
                    peers: self.device.peers(),
                    counters: self.device.counters().clone(),
                });
            }
        }
    }

    fn apply(&mut self, update: &DeviceUpdate) -> Result<(), ApplyError> {
        // A new listen port is bound before anything changes, so a port in use refuses
        // the whole update.
        let new_socket = match update.listen_port {
            Some(port) if port != self.device.listen_port() => Some(
                bind_underlay(port, update.fwmark.unwrap_or(self.device.fwmark())).map_err(
                    |e| ApplyError {
                        errno: 98, // EADDRINUSE
                        message: format!("listen port {port}: {e:#}"),
                    },
                )?,
            ),
            _ => None,
        };
        let outcome = self.device.apply(update).map_err(|e| ApplyError {
            errno: 28, // ENOSPC
            message: e.to_string(),
        })?;
        if let Some(socket) = new_socket {
            self.udp = socket;
            if let Ok(addr) = self.udp.local_addr() {
                self.device.set_bound_port(addr.port());
            }
        } else if outcome.fwmark_changed
            && let Err(e) = SockRef::from(&self.udp).set_mark(self.device.fwmark())
        {
            warn!(error = %e, "setting the fwmark");
        }
        for key in &outcome.removed {
            info!(peer = %key.short(), "peer removed");
        }
        for key in &outcome.added {
            info!(peer = %key.short(), "peer added");
        }
        if outcome.routes_changed {
            self.routes.send_replace(self.device.routes());
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

/// IPv4 peers reach a dual-stack socket as `::ffff:a.b.c.d`; we keep them as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

async fn send_udp(udp: &UdpSocket, to: SocketAddr, datagram: &[u8]) {
    let to = match (to, udp.local_addr()) {
        (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => to,
    };
    match udp.try_send_to(datagram, to) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if let Err(e) = udp.send_to(datagram, to).await {
                debug!(error = %e, %to, "sending");
            }
        }
        Err(e) => debug!(error = %e, %to, "sending"),
    }
}

/// Keeps the routes on the interface equal to the device's allowed IPs until the sender
/// is dropped, then removes them.
async fn reconcile_routes(
    netlink: Netlink,
    index: u32,
    mut desired: watch::Receiver<BTreeSet<IpCidr>>,
) -> Result<()> {
    let mut reconciler = RouteReconciler::new(index);
    let mut resync = tokio::time::interval(ROUTE_RESYNC);
    loop {
        let routes = desired.borrow_and_update().clone();
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
        }
    }
    reconciler
        .remove_all(&netlink)
        .await
        .context("removing routes")?;
    Ok(())
}
