//! A WireGuard responder for many peers at once, for the scale benchmark: one UDP port
//! and one boringtun `Tunn` per peer key, inside a lab namespace.
//!
//! An initiation is encrypted to the responder's static key, so the responder must know
//! which of its keys a datagram is for before it can read it: each key gets its own
//! socket address, and the agent under test has peer `i`'s endpoint on it. The addresses
//! are spread over many IPs, as real peers are: the agent limits handshake work per
//! source address (`core/src/handshake_limiter.rs`).

use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use nix::sched::{CloneFlags, setns};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

/// WireGuard message types (whitepaper §5.4).
const HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const COOKIE_REPLY: u8 = 3;
const DATA: u8 = 4;

/// Room for any datagram on a 1500-byte underlay, and for a handshake message.
const BUFFER: usize = 2048;

/// What the responder saw.
#[derive(Debug)]
pub struct Stats {
    /// Handshake initiations received.
    pub initiations: AtomicU64,
    /// Handshake responses sent.
    pub responses: AtomicU64,
    /// Cookie replies received: the agent was under load and asked for a cookie instead
    /// of taking a response (whitepaper §5.3).
    pub cookie_replies: AtomicU64,
    /// Peers whose first data message (or keepalive) arrived after a handshake: the agent
    /// completed the handshake with them.
    pub confirmed: AtomicUsize,
    per_peer: Vec<AtomicBool>,
}

impl Stats {
    /// Whether peer `i` completed a handshake.
    pub fn is_confirmed(&self, i: usize) -> bool {
        self.per_peer
            .get(i)
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// A running responder; dropping it stops it.
pub struct Responder {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Responder {
    /// Binds one UDP socket per key, key `i` on `endpoints[i]`, in network namespace
    /// `netns` and answers handshakes from `initiator` on each, for at most `lifetime`.
    ///
    /// # Errors
    /// When the counts differ, the namespace cannot be entered or an address cannot be
    /// bound.
    pub fn start(
        netns: &str,
        endpoints: Vec<SocketAddr>,
        keys: Vec<StaticSecret>,
        initiator: PublicKey,
        lifetime: Duration,
    ) -> Result<Self> {
        ensure!(
            endpoints.len() == keys.len(),
            "{} endpoints for {} keys",
            endpoints.len(),
            keys.len()
        );
        let stats = Arc::new(Stats {
            initiations: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            cookie_replies: AtomicU64::new(0),
            confirmed: AtomicUsize::new(0),
            per_peer: (0..keys.len()).map(|_| AtomicBool::new(false)).collect(),
        });
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let path = format!("/run/netns/{netns}");
        let thread_stats = Arc::clone(&stats);
        let thread = thread::Builder::new()
            .name("responder".into())
            .spawn(move || {
                let sockets = match bind_all(&path, &endpoints) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("starting the runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    for (i, (socket, key)) in sockets.into_iter().zip(keys).enumerate() {
                        let socket = match UdpSocket::from_std(socket) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = ready_tx.send(Err(anyhow!("socket {i}: {e}")));
                                return;
                            }
                        };
                        // Index i: each Tunn is alone on its socket, so indices need not
                        // be unique; they only have to fit boringtun's 24 bits.
                        let tunn = Tunn::new(key, initiator, None, None, i as u32, None);
                        tokio::spawn(serve(socket, tunn, i, Arc::clone(&thread_stats)));
                    }
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = tokio::time::sleep(lifetime) => {}
                    }
                });
            })
            .context("starting the responder thread")?;
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow!("the responder did not start"))??;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            stats,
        })
    }

    /// What it saw so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Enters the namespace (this thread only) and binds every endpoint.
fn bind_all(netns_path: &str, endpoints: &[SocketAddr]) -> Result<Vec<std::net::UdpSocket>> {
    let file = File::open(netns_path).with_context(|| format!("opening {netns_path}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {netns_path}"))?;
    raise_open_files(endpoints.len() as u64 + 1024)?;
    endpoints
        .iter()
        .map(|addr| {
            let socket =
                std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect()
}

/// Raises this process's open-file limit to at least `want` (root may raise the hard
/// limit too).
fn raise_open_files(want: u64) -> Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft >= want {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want))
        .with_context(|| format!("raising the open-file limit from {soft} to {want}"))
}

async fn serve(socket: UdpSocket, mut tunn: Tunn, index: usize, stats: Arc<Stats>) {
    let mut datagram = vec![0u8; BUFFER];
    let mut out = vec![0u8; BUFFER];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut datagram).await else {
            continue;
        };
        let is_data = datagram.first() == Some(&DATA);
        match datagram.first() {
            Some(&HANDSHAKE_INIT) => {
                stats.initiations.fetch_add(1, Ordering::Relaxed);
            }
            Some(&COOKIE_REPLY) => {
                stats.cookie_replies.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let mut first = true;
        loop {
            let result = if first {
                tunn.decapsulate(Some(from.ip()), &datagram[..len], &mut out)
            } else {
                // Whitepaper §6.2: after a handshake, flush what waited for it.
                tunn.decapsulate(None, &[], &mut out)
            };
            first = false;
            match result {
                TunnResult::WriteToNetwork(reply) => {
                    if reply.first() == Some(&HANDSHAKE_RESPONSE) {
                        stats.responses.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = socket.send_to(reply, from).await;
                }
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {
                    if is_data {
                        confirm(&stats, index);
                    }
                    break;
                }
                TunnResult::Err(_) => break,
            }
        }
    }
}

fn confirm(stats: &Stats, index: usize) {
    if let Some(flag) = stats.per_peer.get(index)
        && !flag.swap(true, Ordering::Relaxed)
    {
        stats.confirmed.fetch_add(1, Ordering::Relaxed);
    }
}
