//! No one steers a tunnel without the keys (issue 12 §3): a third namespace on the
//! underlay floods one agent with forged handshake initiations that name its peer, and
//! answers the cookies it gets back. The peer's endpoint never moves, the forgeries count
//! as nothing heard, the handshake limits trip, and traffic keeps flowing. The lab has no
//! API server here: the agent's endpoint for the peer comes from its UAPI (`wg show`),
//! which is also what it would publish as `observedEndpoint` in kube mode.

// The test prints the latencies it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use wiremesh_lab::forge::{Forger, INITIATION_LEN};
use wiremesh_lab::mesh::{IFACE, Keypair, Node, in_netns};
use wiremesh_lab::{Lab, MIB, Netns, ping, transfer};

/// Source addresses of the second flood (a /16 underlay; A resolves each of them to
/// send its cookie, so stay under the default neighbour table limit of 1,024).
const SOURCES: u32 = 1_000;
/// Pings per latency sample (10 ms apart).
const PINGS: u32 = 300;
/// No flood outlives this, whatever happens to the test thread.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn forged_initiations_naming_a_peer_steer_nothing_and_traffic_keeps_flowing() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    // c runs no agent: the attacker, on the same underlay.
    let c = Node::new(&lab, "c", 3)?;
    a.start(&[b.as_peer(true)])?;
    b.start(&[a.as_peer(true)])?;
    ping(&a.pod, b.pod.ip(), 2)?;
    let quiet = rtts(&a.pod, b.pod.ip())?;

    // Forgeries naming b, mixed with some naming a key nobody has: those stop before
    // b's noise state, whereas boringtun counts the others twice.
    let a_key = a.keys.public_key();
    let forgers = Arc::new([
        Forger::new(&a_key, &b.keys.public_key())?,
        Forger::new(&a_key, &Keypair::generate().public_key())?,
    ]);
    let b_key = b.keys.public.clone();
    let rx_packets = |a: &Node| {
        a.metric(
            "wiremesh_peer_receive_packets_total",
            &[("peer", b_key.as_str())],
        )
    };

    // 1. One address, ~5,000 a second, for 3 s ignoring the cookies (each second the
    // count crosses the limit, and now and then between the two checks of a forgery
    // naming b: the old code moved the endpoint then), then 2 s answering them (which
    // the source limit meets). Nothing else is sent between a and b meanwhile, so
    // nothing should count as heard from b.
    let rx_before = rx_packets(&a)?;
    let mut one = Vec::new();
    for (answer_cookies, secs) in [(false, 3), (true, 2)] {
        let flood = Flood::start(
            &c,
            vec![c.host.underlay_ip()],
            a.endpoint(),
            &forgers,
            50,
            answer_cookies,
        )?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            check_endpoint(&a, &b)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        one.push(flood.stop()?);
        check_endpoint(&a, &b)?;
    }
    // Scrapes share a data-plane snapshot for up to a second: let it expire first.
    std::thread::sleep(Duration::from_millis(1100));
    let rx_after = rx_packets(&a)?;
    let drops = a.scrape()?;
    let drop = |reason| drops.value("wiremesh_drops_total", &[("reason", reason)]);
    println!(
        "one source, ignoring cookies: {}; answering them: {}; \
         a's rx packets from b {rx_before} -> {rx_after}; a's drops: bad_handshake {}, \
         unknown_peer {}, rate_limited {}",
        one[0],
        one[1],
        drop("bad_handshake")?,
        drop("unknown_peer")?,
        drop("rate_limited").unwrap_or(-1.0),
    );
    ensure!(
        one[0].cookies > 0,
        "the flood never tripped the cookie limit"
    );
    ensure!(
        rx_after - rx_before < 10.0,
        "forgeries counted as heard from b: {rx_before} -> {rx_after}"
    );
    let limited = a.metric_reaching("wiremesh_drops_total", &[("reason", "rate_limited")], 1.0)?;
    ensure!(limited > 0.0, "no handshake refused by the source limit");

    // 2. 1,000 addresses, each answering its cookies, while a pings b and moves 16 MiB.
    let sources: Vec<Ipv4Addr> = (0..SOURCES)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 100, 0)) + i))
        .collect();
    add_addresses(&lab, &c, &sources)?;
    let agent_pid = a
        .agent
        .as_ref()
        .map(|p| p.pid())
        .context("a has no agent")?;
    let flood = Flood::start(&c, sources, a.endpoint(), &forgers, 1, true)?;
    std::thread::sleep(Duration::from_secs(1));
    let (cpu_before, wall) = (cpu_seconds(agent_pid)?, Instant::now());
    let flooded = rtts(&a.pod, b.pod.ip());
    let cpu = (cpu_seconds(agent_pid)? - cpu_before) / wall.elapsed().as_secs_f64();
    let moved = transfer(&a.pod, b.pod.ip(), 16 * MIB);
    check_endpoint(&a, &b)?;
    let many = flood.stop()?;
    let (flooded, moved) = (flooded?, moved?);
    let limited_after = a.metric("wiremesh_drops_total", &[("reason", "rate_limited")])?;
    println!(
        "ping a->b p50/p99/max: quiet {quiet}; during the flood {flooded}\n\
         {SOURCES} sources: {many}; rate_limited {limited} -> {limited_after}; \
         agent a used {:.0}% of a CPU while pinging\n\
         16 MiB a->b during the flood: {:.0} Mbit/s (sha256 {})",
        cpu * 100.0,
        moved.mbit_per_s(),
        moved.sha256
    );
    ensure!(
        many.cookies > 0,
        "no cookie reached the {SOURCES} sources: {many}"
    );
    ensure!(
        limited_after > limited,
        "the limits did not trip under {SOURCES} sources"
    );
    // Loose bounds: the timing goals live in bench/. On a shared two-core machine the
    // attacker's own thread takes most of a core, and the agent waits for the CPU as
    // much as for its work: a stalled data plane would lose pings and take seconds.
    ensure!(
        flooded.received * 10 >= PINGS * 9,
        "pings lost during the flood: {flooded}"
    );
    ensure!(
        flooded.p99 < Duration::from_secs(2),
        "ping p99 during the flood: {flooded}"
    );
    ensure!(
        a.agent.as_ref().is_some_and(|p| p.is_running()),
        "agent a died"
    );
    Ok(())
}

/// Fails unless a sends to b at b's own address.
fn check_endpoint(a: &Node, b: &Node) -> Result<()> {
    let endpoints = a.wg(&["show", IFACE, "endpoints"])?;
    let line = endpoints
        .lines()
        .find(|l| l.starts_with(&b.keys.public))
        .with_context(|| format!("b is not a peer of a: {endpoints}"))?;
    ensure!(
        line.ends_with(&format!("\t{}", b.endpoint())),
        "a's endpoint for b moved: {line}"
    );
    Ok(())
}

/// User and system CPU time of process `pid` so far (`/proc/<pid>/stat`, in the kernel's
/// 100 Hz clock ticks).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which ends at the last ')'; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        let field = fields
            .get(i)
            .with_context(|| format!("no field {i} in {stat}"))?;
        Ok(field.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Adds `sources` to c's underlay interface in one `ip -batch`.
fn add_addresses(lab: &Lab, c: &Node, sources: &[Ipv4Addr]) -> Result<()> {
    let batch: String = sources
        .iter()
        .map(|ip| format!("address add {ip}/16 dev ul0\n"))
        .collect();
    let path = lab.dir().join("attacker-addresses");
    std::fs::write(&path, batch)?;
    let path = path.to_str().context("lab paths are UTF-8")?;
    c.host.ip(&["-batch", path])?;
    Ok(())
}

/// Latency of `PINGS` pings 10 ms apart.
struct Rtts {
    received: u32,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl std::fmt::Display for Rtts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2}/{:.2}/{:.2} ms ({}/{PINGS} answered)",
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3,
            self.received
        )
    }
}

fn rtts(from: &Netns, to: Ipv4Addr) -> Result<Rtts> {
    let count = PINGS.to_string();
    let target = to.to_string();
    let out = from.exec_timeout(
        &["ping", "-n", "-c", &count, "-i", "0.01", "-W", "1", &target],
        Duration::from_secs(30),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times: Vec<Duration> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").trim().parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
        .collect();
    times.sort();
    let at = |q: f64| {
        let i = ((times.len() as f64) * q).ceil() as usize;
        times
            .get(i.saturating_sub(1))
            .copied()
            .unwrap_or(Duration::MAX)
    };
    Ok(Rtts {
        received: u32::try_from(times.len())?,
        p50: at(0.5),
        p99: at(0.99),
        max: times.last().copied().unwrap_or(Duration::MAX),
    })
}

/// Forged initiations from some of c's addresses, in c's namespace, on a thread.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<FloodReport>>,
}

#[derive(Debug, Default)]
struct FloodReport {
    sent: u64,
    cookies: u64,
    /// Sources that sent with a cookie (none unless they answer cookies).
    sources_with_cookie: usize,
    elapsed: Duration,
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-3);
        write!(
            f,
            "{} initiations in {:.1} s ({:.0}/s), {} cookie replies, {} sources with a cookie",
            self.sent,
            secs,
            self.sent as f64 / secs,
            self.cookies,
            self.sources_with_cookie
        )
    }
}

impl Flood {
    /// Every 10 ms, `per_round` initiations from each of `sources` to `to`, with a mac2
    /// from the latest cookie if `answer_cookies`.
    fn start(
        c: &Node,
        sources: Vec<Ipv4Addr>,
        to: SocketAddr,
        forgers: &Arc<[Forger; 2]>,
        per_round: u32,
        answer_cookies: bool,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, forgers, ns) = (Arc::clone(&stop), Arc::clone(forgers), c.host.clone());
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let pace = Pace {
                    per_round,
                    answer_cookies,
                };
                flood(&sources, to, &forgers, &pace, &flag)
            })
        });
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Result<FloodReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the flood thread panicked"))?
    }
}

struct Pace {
    per_round: u32,
    answer_cookies: bool,
}

fn flood(
    sources: &[Ipv4Addr],
    to: SocketAddr,
    [naming_b, stranger]: &[Forger; 2],
    pace: &Pace,
    stop: &AtomicBool,
) -> Result<FloodReport> {
    struct Source {
        sock: UdpSocket,
        cookie: Option<[u8; 16]>,
        /// The initiations in flight by sender index, to open the cookie that answers one.
        sent: BTreeMap<u32, [u8; INITIATION_LEN]>,
    }
    let mut all = Vec::with_capacity(sources.len());
    for ip in sources {
        let sock = UdpSocket::bind((*ip, 0)).with_context(|| format!("binding {ip}"))?;
        sock.set_nonblocking(true)?;
        all.push(Source {
            sock,
            cookie: None,
            sent: BTreeMap::new(),
        });
    }
    let mut report = FloodReport::default();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let mut index = 0u32;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < FLOOD_LIMIT {
        let round = Instant::now();
        for source in &mut all {
            loop {
                match source.sock.recv(&mut buf) {
                    Ok(n) => {
                        let reply = &buf[..n];
                        let Some(idx) = reply.get(4..8).and_then(|b| b.try_into().ok()) else {
                            continue;
                        };
                        let Some(init) = source.sent.get(&u32::from_le_bytes(idx)) else {
                            continue;
                        };
                        if let Some(cookie) = naming_b.open_cookie(reply, init) {
                            report.cookies += 1;
                            if pace.answer_cookies {
                                source.cookie = Some(cookie);
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
            for _ in 0..pace.per_round {
                index = index.wrapping_add(1);
                // Half name b, in a scrambled order, so the count of handshakes that
                // boringtun keeps reaches its limit at every step, once in a while just
                // between its two checks of a forgery naming b.
                let forger = if index.wrapping_mul(0x9e37_79b9) >> 31 == 0 {
                    naming_b
                } else {
                    stranger
                };
                let init = forger.initiation(index, source.cookie.as_ref());
                // Only a cookie reply to a recent one is of use.
                if source.sent.len() >= 64 {
                    source.sent.pop_first();
                }
                source.sent.insert(index, init);
                match source.sock.send_to(&init, to) {
                    Ok(_) => report.sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if let Some(rest) = Duration::from_millis(10).checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    report.elapsed = start.elapsed();
    report.sources_with_cookie = all.iter().filter(|s| s.cookie.is_some()).count();
    Ok(report)
}
