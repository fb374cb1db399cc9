//! The agent at scale: memory and CPU with thousands of configured peers, idle and after
//! a handshake with every one of them, and how soon a peer added through the UAPI passes
//! its first packet.
//!
//! ```text
//!  host a 198.18.0.1: the agent under test, N peers + later host b
//!  host b 198.18.0.2: a Wiremesh agent that already knows host a (the peer added last)
//!  host c 198.18.0.3: the responder, peer i on 198.18.16.(1 + i / 8):(20000 + i)
//! ```
//!
//! "Handshakes to all": the agent's N peers have their endpoints on the responder, which
//! answers each initiation with its own key ([`crate::responder`]). One UDP datagram to
//! each peer's allowed IP, sent from host a into `wm0`, makes the agent initiate.
//!
//! Real peers answer from addresses of their own, and the agent limits handshake work per
//! source address (20 a second once it is under load, as the kernel and wireguard-go do):
//! from one address, 10,000 handshakes would take over eight minutes. So the responder
//! answers from [`RESPONDER_NET`], [`Options::peers_per_address`] peers per address (host
//! c holds the whole /20 as a local route, host a routes it via host c: one neighbour
//! entry, not thousands). `peers_per_address` 0 puts every peer on 198.18.0.3, as the
//! bench did before.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use serde_json::{Value, json};
use wiremesh_lab::lab::Host;
use wiremesh_lab::mesh::{IFACE, Node, http_get, in_netns};
use wiremesh_lab::{Lab, Netns, Proc, agent_binary};

use crate::interrupt;
use crate::netns::{join, spawn_in_netns};
use crate::procfs::{self, CpuMeter};
use crate::progress;
use crate::promtext;
use crate::report::{Machine, markdown};
use crate::responder::{Responder, Stats};
use crate::stats::{median, min_max};
use crate::tools::{first_line, path_str};

/// The responder's first port: peer i is on port 20000 + i.
const RESPONDER_BASE_PORT: u16 = 20_000;

/// The responder's addresses on host c (inside the lab's underlay 198.18.0.0/16): the
/// network and its prefix length.
const RESPONDER_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 16, 0), 20);

/// The agent's metrics, in host a's namespace.
const METRICS_ADDR: &str = "127.0.0.1:9586";

/// The peers' allowed IPs: 10.128.0.1/32, 10.128.0.2/32, ... (inside host a only).
const PEER_NET: u32 = 0x0A80_0000;

/// Most peers the address plan holds (10.128.0.0/16, and ports above 20000).
const MAX_PEERS: usize = 40_000;

/// How long after a change before an idle measurement starts.
const SETTLE: Duration = Duration::from_secs(2);

/// The route to every peer's allowed IP, added with `ip` as a wg-quick user would: `up
/// --interface` and `wg setconf` add no routes (wg-quick's semantics).
const PEER_ROUTE: &str = "10.128.0.0/16";

/// Probes sent to the agent's TUN device per burst while triggering handshakes; a TUN
/// queue holds 500 packets by default, and packets beyond it are dropped.
const PROBE_BURST: usize = 200;

/// How often peers that have not completed a handshake are probed again.
const REPROBE: Duration = Duration::from_secs(6);

/// The echo service in pod b for the first-packet measurement (port 7, RFC 862 echo).
const ECHO_PORT: u16 = 7;

/// How often the first-packet prober sends.
const PROBE_INTERVAL: Duration = Duration::from_millis(2);

/// How long a first packet may take (a lost initiation is retried after 5 s).
const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(20);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Peer counts, such as 1,000 and 10,000.
    pub peers: Vec<usize>,
    /// Length of each idle measurement.
    pub idle: Duration,
    /// How long the handshakes with all peers may take.
    pub handshake_timeout: Duration,
    /// Times the first-packet measurement is repeated per case.
    pub first_packet_runs: u32,
    /// Peers whose endpoints share one responder address; 0: all on host c's own.
    pub peers_per_address: usize,
    /// Times each peer count is measured (the agent restarted each time).
    pub runs: u32,
}

/// The responder's addresses in [`RESPONDER_NET`] (its network and broadcast left out).
fn responder_addresses() -> usize {
    (1usize << (32 - RESPONDER_NET.1)) - 2
}

/// Runs every case; returns the JSON report and the printed table.
///
/// # Errors
/// When the lab cannot be built, the agent does not come up, or the run is interrupted.
pub fn run(options: &Options) -> Result<(Value, String)> {
    for n in &options.peers {
        ensure!(
            (1..=MAX_PEERS).contains(n),
            "{n} peers: the scale benchmark takes 1 to {MAX_PEERS}"
        );
        ensure!(
            options.peers_per_address == 0
                || n.div_ceil(options.peers_per_address) <= responder_addresses(),
            "{n} peers at {} per address need more than the {} addresses of {}/{}",
            options.peers_per_address,
            responder_addresses(),
            RESPONDER_NET.0,
            RESPONDER_NET.1
        );
    }
    let started = SystemTime::now();
    let agent = agent_binary()?;
    let lab = Lab::new()?;
    let a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    let c = lab.add_host("c", Ipv4Addr::new(198, 18, 0, 3), "10.3.0.0/24")?;
    b.start(&[a.as_peer(true)])?;
    if options.peers_per_address > 0 {
        let net = format!("{}/{}", RESPONDER_NET.0, RESPONDER_NET.1);
        c.ip(&["route", "add", "local", &net, "dev", "lo"])?;
        a.host
            .ip(&["route", "add", &net, "via", &c.underlay_ip().to_string()])?;
    }
    progress!(
        "lab {}: agent under test on host a, ready peer on host b, responder on host c",
        lab.prefix()
    );

    let baseline = baseline_case(&a, &b, options)?;
    let mut cases = Vec::new();
    for n in &options.peers {
        for _ in 0..options.runs {
            interrupt::check()?;
            cases.push(peers_case(&a, &b, &c, *n, options)?);
        }
    }
    let summary = summary(&cases);

    let table = table(&baseline, &cases);
    let report = json!({
        "schema": 1,
        "started_unix": started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "machine": {
            "cpus": Machine::this().cpus,
            "cpu_model": Machine::this().cpu_model,
            "kernel": Machine::this().kernel,
        },
        "agent": format!(
            "{} (git {})",
            first_line(path_str(&agent), &["--version"]),
            first_line("git", &["-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"])
        ),
        "config": {
            "idle_secs": options.idle.as_secs(),
            "handshake_timeout_secs": options.handshake_timeout.as_secs(),
            "first_packet_runs": options.first_packet_runs,
            "peers_per_address": options.peers_per_address,
            "responder_net": format!("{}/{}", RESPONDER_NET.0, RESPONDER_NET.1),
            "runs": options.runs,
        },
        "notes": {
            "handshakes": "each peer's endpoint is a UDP port of an in-process responder (one boringtun Tunn per peer key) in another namespace; one datagram to each peer's allowed IP makes the agent initiate; completed = peers whose first data message reached the responder after the handshake",
            "cpu_pct": "CPU of the agent process (all threads) over the idle window, percent of one core",
            "first_packet_ms": "from running `wg set wm0 peer <b> endpoint ... allowed-ips ...` on host a (the route to pod b added with `ip` before) until pod a gets the first UDP echo from pod b (a datagram every 2 ms): the wg command, handshake and one round trip",
            "routes_s": "none: `up --interface` and `wg setconf` add no routes (wg-quick's semantics); one route to 10.128.0.0/16 is added with `ip`",
            "rss_mib": "VmRSS after the window; peak_rss_mib is VmHWM",
            "endpoints": "peer i's endpoint is 198.18.16.(1 + i / peers_per_address) (in RESPONDER_NET, routed to host c), port 20000 + i: the agent limits handshake work per source address, so one address for all peers would measure that limit; peers_per_address 0: all on 198.18.0.3",
            "agent_counters": "the agent's /metrics at the end of the case: drops by reason, cookie replies sent, live tunnels",
            "summary": "per peer count: medians over the runs",
            "completed_by_second": "handshakes.completed_by_second[k]: handshakes completed by the end of second k + 1",
        },
        "baseline": baseline,
        "cases": cases,
        "summary": summary,
    });
    drop(b);
    drop(lab);
    Ok((report, table))
}

/// The agent with no peer but host b: memory and idle CPU, and first packets.
fn baseline_case(a: &Node, b: &Node, options: &Options) -> Result<Value> {
    progress!("baseline: the agent with no other peer");
    let agent = start_agent(&a.host)?;
    setconf(a, &[])?;
    let idle = idle_window(agent.pid(), options.idle)?;
    let first_packet = first_packets(a, b, options.first_packet_runs)?;
    stop_agent(&a.host, agent)?;
    Ok(json!({
        "peers": 0,
        "idle": idle,
        "first_packet_ms": first_packet,
    }))
}

/// The agent with `n` peers: configure, idle, handshake with all, idle, first packets.
fn peers_case(a: &Node, b: &Node, c: &Host, n: usize, options: &Options) -> Result<Value> {
    progress!("{n} peers: generating keys");
    let secrets: Vec<StaticSecret> = (0..n)
        .map(|_| StaticSecret::random_from_rng(OsRng))
        .collect();
    let peers: Vec<ScalePeer> = secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| ScalePeer {
            public: STANDARD.encode(PublicKey::from(secret).as_bytes()),
            endpoint: responder_endpoint(c.underlay_ip(), options.peers_per_address, i),
            address: peer_address(i),
        })
        .collect();
    let lifetime = options.handshake_timeout + options.idle * 4 + Duration::from_secs(600);
    let responder = Responder::start(
        Netns::name(c),
        peers.iter().map(|p| p.endpoint).collect(),
        secrets,
        a.keys.public_key(),
        lifetime,
    )?;

    let agent = start_agent(&a.host)?;
    let pid = agent.pid();
    let before_mib = procfs::rss_mib(pid)?;
    progress!("{n} peers: wg setconf");
    let start = Instant::now();
    setconf(a, &peers)?;
    let setconf_s = start.elapsed().as_secs_f64();
    progress!("{n} peers: configured in {setconf_s:.2} s; idle");
    let configured = idle_window(pid, options.idle)?;

    progress!("{n} peers: handshakes with all");
    let handshakes = handshake_all(a, &peers, responder.stats(), pid, options.handshake_timeout)?;
    progress!(
        "{n} peers: {} handshakes in {:.1} s; idle",
        handshakes["completed"],
        handshakes["seconds"].as_f64().unwrap_or(0.0)
    );
    let established = idle_window(pid, options.idle)?;
    let first_packet = first_packets(a, b, options.first_packet_runs)?;
    let peak_rss_mib = procfs::peak_rss_mib(pid)?;
    // After the memory figures: a scrape with 10,000 peers allocates.
    let counters = agent_counters(&a.host)?;
    let responder_stats = responder.stats();
    let responder_json = json!({
        "initiations_received": responder_stats.initiations.load(Ordering::Relaxed),
        "responses_sent": responder_stats.responses.load(Ordering::Relaxed),
        "cookie_replies_received": responder_stats.cookie_replies.load(Ordering::Relaxed),
    });
    stop_agent(&a.host, agent)?;
    drop(responder);
    Ok(json!({
        "peers": n,
        "rss_before_mib": round2(before_mib),
        "setconf_s": round2(setconf_s),
        "routes_s": Value::Null,
        "configured_idle": configured,
        "handshakes": handshakes,
        "established_idle": established,
        "peak_rss_mib": round2(peak_rss_mib),
        "first_packet_ms": first_packet,
        "agent_counters": counters,
        "responder": responder_json,
    }))
}

/// Peer `i`'s endpoint on the responder: see the module's documentation.
fn responder_endpoint(c: Ipv4Addr, peers_per_address: usize, i: usize) -> SocketAddr {
    let port = RESPONDER_BASE_PORT + i as u16;
    if peers_per_address == 0 {
        return SocketAddr::from((c, port));
    }
    let ip = Ipv4Addr::from(u32::from(RESPONDER_NET.0) + 1 + (i / peers_per_address) as u32);
    SocketAddr::from((ip, port))
}

/// The agent's drop counters by reason, cookie replies and live tunnels, from `/metrics`.
fn agent_counters(host: &Host) -> Result<Value> {
    let text = http_get(host, METRICS_ADDR, "/metrics")?;
    let samples = promtext::parse(&text);
    let drops: serde_json::Map<String, Value> =
        promtext::sum_by(&samples, "wiremesh_drops_total", "reason")
            .into_iter()
            .filter(|(_, v)| *v > 0.0)
            .map(|(reason, v)| (reason, json!(v)))
            .collect();
    Ok(json!({
        "drops": drops,
        "cookie_replies_sent": promtext::sum(&samples, "wiremesh_cookie_replies_total", |_| true),
        "live_tunnels": promtext::sum(&samples, "wiremesh_live_tunnels", |_| true),
    }))
}

/// Medians over the runs of each peer count.
fn summary(cases: &[Value]) -> Value {
    let counts: BTreeSet<u64> = cases.iter().filter_map(|c| c["peers"].as_u64()).collect();
    let rows: Vec<Value> = counts
        .iter()
        .map(|n| {
            let runs: Vec<&Value> = cases
                .iter()
                .filter(|c| c["peers"].as_u64() == Some(*n))
                .collect();
            let med = |f: &dyn Fn(&Value) -> Option<f64>| {
                let values: Vec<f64> = runs.iter().filter_map(|c| f(c)).collect();
                median(&values).map(round2)
            };
            json!({
                "peers": n,
                "runs": runs.len(),
                "configured_rss_mib": med(&|c| c["configured_idle"]["rss_mib"].as_f64()),
                "configured_cpu_pct": med(&|c| c["configured_idle"]["cpu_pct"].as_f64()),
                "handshakes_completed": med(&|c| c["handshakes"]["completed"].as_f64()),
                "handshakes_s": med(&|c| c["handshakes"]["seconds"].as_f64()),
                "established_rss_mib": med(&|c| c["established_idle"]["rss_mib"].as_f64()),
                "established_cpu_pct": med(&|c| c["established_idle"]["cpu_pct"].as_f64()),
                "peak_rss_mib": med(&|c| c["peak_rss_mib"].as_f64()),
                "first_packet_ms": med(&|c| c["first_packet_ms"]["median"].as_f64()),
            })
        })
        .collect();
    Value::Array(rows)
}

struct ScalePeer {
    public: String,
    endpoint: SocketAddr,
    address: Ipv4Addr,
}

fn peer_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(PEER_NET + i as u32 + 1)
}

fn start_agent(host: &Host) -> Result<Proc> {
    let agent = agent_binary()?;
    let proc = host.spawn_agent(
        &["up", "--interface", IFACE, "--metrics-addr", METRICS_ADDR],
        &[("RUST_LOG", "warn")],
    )?;
    let socket = host.run_dir().join(format!("{IFACE}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if !proc.is_running() || Instant::now() > deadline {
            bail!(
                "{} did not come up on {}:\n{}",
                agent.display(),
                host.name(),
                proc.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    host.ip(&["route", "add", PEER_ROUTE, "dev", IFACE])?;
    Ok(proc)
}

fn stop_agent(host: &Host, agent: Proc) -> Result<()> {
    agent.stop()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while host
        .exec(&["ip", "link", "show", "dev", IFACE])?
        .status
        .success()
    {
        ensure!(
            Instant::now() < deadline,
            "{IFACE} lingers on {}",
            host.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `wg setconf` host a's agent with its key, port 51820 and `peers`.
fn setconf(a: &Node, peers: &[ScalePeer]) -> Result<()> {
    let mut conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {}\n",
        a.keys.private,
        wiremesh_lab::mesh::PORT
    );
    for p in peers {
        let _ = write!(
            conf,
            "\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}/32\n",
            p.public, p.endpoint, p.address
        );
    }
    let path = a.host.dir().join("scale.conf");
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    a.host.wg(&["setconf", IFACE, path_str(&path)])?;
    Ok(())
}

/// Settles, then watches the agent for `window`: CPU share and memory.
fn idle_window(pid: u32, window: Duration) -> Result<Value> {
    interrupt::sleep(SETTLE)?;
    let meter = CpuMeter::start(&[pid])?;
    interrupt::sleep(window)?;
    let usage = meter.read()?;
    Ok(json!({
        "cpu_pct": round2(usage.process_cores() * 100.0),
        "rss_mib": round2(procfs::rss_mib(pid)?),
        "peak_rss_mib": round2(procfs::peak_rss_mib(pid)?),
    }))
}

/// Makes the agent initiate a handshake with every peer and waits until the responder saw
/// all of them complete (or the timeout).
fn handshake_all(
    a: &Node,
    peers: &[ScalePeer],
    stats: &Stats,
    pid: u32,
    timeout: Duration,
) -> Result<Value> {
    let n = peers.len();
    let targets: Arc<Vec<Ipv4Addr>> = Arc::new(peers.iter().map(|p| p.address).collect());
    let meter = CpuMeter::start(&[pid])?;
    let start = Instant::now();
    let mut probes = 0;
    let mut last_probe: Option<Instant> = None;
    // Handshakes completed at the end of each second: the shape of the bring-up.
    let mut timeline = Vec::new();
    loop {
        interrupt::check()?;
        let done = stats.confirmed.load(Ordering::Relaxed);
        if start.elapsed() >= Duration::from_secs(timeline.len() as u64 + 1) {
            timeline.push(done);
        }
        if done >= n || start.elapsed() > timeout {
            break;
        }
        if last_probe.is_none_or(|t| t.elapsed() >= REPROBE) {
            let pending: Vec<Ipv4Addr> = (0..n)
                .filter(|i| !stats.is_confirmed(*i))
                .map(|i| targets[i])
                .collect();
            probes += pending.len();
            probe(&a.host, pending)?;
            last_probe = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = start.elapsed().as_secs_f64();
    let usage = meter.read()?;
    let completed = stats.confirmed.load(Ordering::Relaxed);
    let agent_reported = a
        .host
        .wg(&["show", IFACE, "latest-handshakes"])?
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|t| t != "0"))
        .count();
    Ok(json!({
        "completed": completed,
        "agent_reported": agent_reported,
        "responses_sent": stats.responses.load(Ordering::Relaxed),
        "probes_sent": probes,
        "seconds": round2(seconds),
        "timed_out": completed < n,
        "agent_cpu_s": round2(usage.processes_s),
        "completed_by_second": timeline,
    }))
}

/// Sends one small UDP datagram to each target from host a, in bursts the TUN queue can
/// hold.
fn probe(host: &Host, targets: Vec<Ipv4Addr>) -> Result<()> {
    in_netns(host, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").context("binding the probe socket")?;
        for chunk in targets.chunks(PROBE_BURST) {
            for ip in chunk {
                // Port 9 (discard): nobody answers; the datagram only wakes the tunnel.
                let _ = socket.send_to(b"wiremesh-scale-probe", (*ip, 9));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    })
}

/// Adds host b to host a's agent through the UAPI `runs` times (removing it in between)
/// and times each until the first ping reply.
fn first_packets(a: &Node, b: &Node, runs: u32) -> Result<Value> {
    let mut times = Vec::new();
    for _ in 0..runs {
        interrupt::check()?;
        times.push(first_packet(a, b)?);
    }
    let (lo, hi) = min_max(&times).unwrap_or((f64::NAN, f64::NAN));
    Ok(json!({
        "median": median(&times).map(round2),
        "min": round2(lo),
        "max": round2(hi),
        "runs": times.iter().map(|t| round2(*t)).collect::<Vec<_>>(),
    }))
}

/// One first-packet measurement, in milliseconds: a prober in pod a sends a UDP datagram
/// to an echo service in pod b every 2 ms; the clock runs from the start of `wg set` to
/// the first echo.
fn first_packet(a: &Node, b: &Node) -> Result<f64> {
    let pod_cidr = b.host.pod_cidr();
    ensure!(
        a.host.ip(&["route", "show", &pod_cidr])?.trim().is_empty(),
        "host a already routes {pod_cidr}"
    );
    let target = SocketAddr::from((b.pod.ip(), ECHO_PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = Arc::clone(&stop);
        spawn_in_netns(&b.pod, move || echo_service(target, &stop))?
    };
    let prober = {
        let stop = Arc::clone(&stop);
        spawn_in_netns(&a.pod, move || first_echo(target, &stop))?
    };
    a.host.ip(&["route", "replace", &pod_cidr, "dev", IFACE])?;
    // Let both sockets open and the prober hit the missing peer a few times.
    std::thread::sleep(Duration::from_millis(100));
    let endpoint = b.endpoint().to_string();
    let start = Instant::now();
    let added = a.host.wg(&[
        "set",
        IFACE,
        "peer",
        &b.keys.public,
        "endpoint",
        &endpoint,
        "allowed-ips",
        &pod_cidr,
    ]);
    let reply = join(prober);
    stop.store(true, Ordering::Relaxed);
    let echoed = join(echo);
    added?;
    echoed?;
    let ms = reply?.saturating_duration_since(start).as_secs_f64() * 1e3;

    a.host
        .wg(&["set", IFACE, "peer", &b.keys.public, "remove"])?;
    a.host.ip(&["route", "del", &pod_cidr, "dev", IFACE])?;
    interrupt::sleep(Duration::from_millis(500))?;
    Ok(ms)
}

/// Sends to `target` every [`PROBE_INTERVAL`] until an echo comes back; returns when.
fn first_echo(target: SocketAddr, stop: &AtomicBool) -> Result<Instant> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding the prober")?;
    socket.set_read_timeout(Some(PROBE_INTERVAL))?;
    let deadline = Instant::now() + FIRST_PACKET_TIMEOUT;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        // Errors (no route yet) are expected until the peer is in place.
        let _ = socket.send_to(b"wiremesh-first-packet", target);
        if let Ok((_, from)) = socket.recv_from(&mut buf)
            && from == target
        {
            return Ok(Instant::now());
        }
    }
    bail!("no echo from {target} within {FIRST_PACKET_TIMEOUT:?}")
}

/// Echoes datagrams on `addr` until `stop` (or [`FIRST_PACKET_TIMEOUT`] twice over).
fn echo_service(addr: SocketAddr, stop: &AtomicBool) -> Result<()> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let deadline = Instant::now() + FIRST_PACKET_TIMEOUT * 2;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Ok((len, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..len], from);
        }
    }
    Ok(())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn table(baseline: &Value, cases: &[Value]) -> String {
    let mut rows = vec![
        [
            "peers",
            "wg setconf s",
            "routes s",
            "idle RSS MiB",
            "idle CPU %",
            "handshakes done",
            "in s",
            "agent CPU s",
            "RSS after MiB",
            "idle CPU after %",
            "peak RSS MiB",
            "first packet ms",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let v = |value: &Value| match value {
        Value::Null => "-".to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    };
    rows.push(vec![
        "0".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        v(&baseline["idle"]["rss_mib"]),
        v(&baseline["idle"]["cpu_pct"]),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        v(&baseline["idle"]["peak_rss_mib"]),
        v(&baseline["first_packet_ms"]["median"]),
    ]);
    for c in cases {
        rows.push(vec![
            v(&c["peers"]),
            v(&c["setconf_s"]),
            v(&c["routes_s"]),
            v(&c["configured_idle"]["rss_mib"]),
            v(&c["configured_idle"]["cpu_pct"]),
            format!("{}/{}", v(&c["handshakes"]["completed"]), v(&c["peers"])),
            v(&c["handshakes"]["seconds"]),
            v(&c["handshakes"]["agent_cpu_s"]),
            v(&c["established_idle"]["rss_mib"]),
            v(&c["established_idle"]["cpu_pct"]),
            v(&c["peak_rss_mib"]),
            v(&c["first_packet_ms"]["median"]),
        ]);
    }
    format!(
        "\nWiremesh agent at scale (first packet: median of runs, from `wg set` to the first echo through the tunnel)\n\n{}",
        markdown(&rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_share_responder_addresses_in_groups_inside_the_net() {
        let c = Ipv4Addr::new(198, 18, 0, 3);
        let at = |per, i| responder_endpoint(c, per, i);
        assert_eq!(at(8, 0), "198.18.16.1:20000".parse().unwrap());
        assert_eq!(at(8, 7), "198.18.16.1:20007".parse().unwrap());
        assert_eq!(at(8, 8), "198.18.16.2:20008".parse().unwrap());
        assert_eq!(at(0, 9_999), "198.18.0.3:29999".parse().unwrap());
        // The last address of the plan is the /20's last host address.
        let last = responder_addresses() * 8 - 1;
        assert_eq!(at(8, last).ip(), Ipv4Addr::new(198, 18, 31, 254));
    }
}
