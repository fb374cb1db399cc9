//! The agent taking thousands of peers whose routes follow their allowed IPs, as in the
//! `kube` and `host` modes (`up --route-allowed-ips`): all in one update, then one update
//! per peer, each timed until the kernel has every route; the agent's CPU and memory; and
//! what one pass of the route reconciler costs with all those routes in place (the agent
//! runs one every 5 s, and after each change).
//!
//! ```text
//!  host a 198.18.0.1: the agent under test; each peer a /32 in 10.128.0.0/16 with an
//!                     endpoint on 198.18.0.3 (nobody: no packet goes to the peers)
//! ```
//!
//! The updates go through the agent's UAPI socket, which feeds the same `Device::apply`
//! and route task as the MeshPeer watch of the `kube` mode (`peers.rs`, after the pure
//! diff of `mesh::diff`); the API server and the watch are not part of this figure.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use serde_json::{Value, json};
use wiremesh_agent::netlink::{Netlink, RouteReconciler, RouteTarget};
use wiremesh_lab::Lab;
use wiremesh_lab::lab::Host;
use wiremesh_lab::mesh::{IFACE, PORT, in_netns};
use wiremesh_proto::IpCidr;

use crate::interrupt;
use crate::procfs::{self, CpuMeter};
use crate::progress;
use crate::report::{Machine, markdown};
use crate::stats::{median, min_max};

/// The peers' allowed IPs: 10.128.0.1/32, 10.128.0.2/32, ...
const PEER_NET: u32 = 0x0A80_0000;

/// Most peers the address plan holds (10.128.0.0/16, ports from 20000).
const MAX_PEERS: usize = 40_000;

/// Where the peers' endpoints point: an underlay address no host has.
const NOBODY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

/// The agent's route protocol number (`agent/src/netlink.rs`, 0x57).
const ROUTE_PROTO: &str = "87";

/// How long the routes of one case may take.
const ROUTES_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the routes are counted while waiting.
const POLL: Duration = Duration::from_millis(20);

/// How long after a change before an idle measurement starts.
const SETTLE: Duration = Duration::from_secs(2);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Peers, such as 5,000.
    pub peers: usize,
    /// Length of each idle measurement (its CPU includes the reconciler's 5 s passes).
    pub idle: Duration,
    /// Reconciler passes timed with every route in place.
    pub passes: u32,
}

/// Runs the measurement; returns the JSON report and the printed table.
///
/// # Errors
/// When the lab cannot be built, the agent does not come up or refuses an update, routes
/// do not appear in time, or the run is interrupted.
pub fn run(options: &Options) -> Result<(Value, String)> {
    let n = options.peers;
    ensure!(
        (1..=MAX_PEERS).contains(&n),
        "{n} peers: the apply benchmark takes 1 to {MAX_PEERS}"
    );
    let started = SystemTime::now();
    let lab = Lab::new()?;
    let a = lab.add_host("a", Ipv4Addr::new(198, 18, 0, 1), "10.1.0.0/24")?;
    progress!("lab {}: the agent under test on host a", lab.prefix());
    let agent = a.spawn_agent(
        &["up", "--interface", IFACE, "--route-allowed-ips"],
        &[("RUST_LOG", "warn")],
    )?;
    a.wait_for_uapi_socket(IFACE, &agent, Duration::from_secs(10))?;
    let pid = agent.pid();
    let socket = a.run_dir().join(format!("{IFACE}.sock"));
    let private = StaticSecret::random_from_rng(OsRng);
    uapi(
        &socket,
        &format!(
            "set=1\nprivate_key={}\nlisten_port={PORT}\n\n",
            hex(&private.to_bytes())
        ),
    )?;
    progress!("{n} peers: generating keys");
    let keys: Vec<String> = (0..n)
        .map(|_| hex(PublicKey::from(&StaticSecret::random_from_rng(OsRng)).as_bytes()))
        .collect();
    let empty = idle(pid, options.idle)?;

    progress!("{n} peers: all in one update");
    let mut all = String::from("set=1\n");
    for (i, key) in keys.iter().enumerate() {
        all.push_str(&peer_lines(i, key));
    }
    all.push('\n');
    let at_once = timed(&a, pid, n, || uapi(&socket, &all))?;
    progress!("{n} peers: {at_once}");
    let loaded = idle(pid, options.idle)?;
    let passes = reconcile_passes(&a, n, options.passes)?;
    progress!("{n} peers: a reconciler pass takes {passes}");

    progress!("{n} peers: all removed in one update");
    let removed = timed(&a, pid, 0, || {
        uapi(&socket, "set=1\nreplace_peers=true\n\n")
    })?;
    progress!("{n} peers: one update per peer");
    let one_by_one = timed(&a, pid, n, || {
        for (i, key) in keys.iter().enumerate() {
            interrupt::check()?;
            uapi(&socket, &format!("set=1\n{}\n", peer_lines(i, key)))?;
        }
        Ok(())
    })?;
    progress!("{n} peers: {one_by_one}");
    let peak_rss_mib = procfs::peak_rss_mib(pid)?;
    agent.stop()?;
    drop(lab);

    let header = ["case", "updates s", "routes s", "agent CPU s", "RSS MiB"];
    let mut table = markdown(&[
        header.iter().map(|h| (*h).to_owned()).collect(),
        row("all in one update", &at_once),
        row("all removed in one update", &removed),
        row("one update per peer", &one_by_one),
    ]);
    let _ = writeln!(
        table,
        "\n{n} peers; a route reconciler pass with all routes in place: {passes}; idle agent CPU {}% with no peer, {}% with all",
        empty["cpu_pct"], loaded["cpu_pct"]
    );
    let report = json!({
        "schema": 1,
        "started_unix": started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "machine": {
            "cpus": Machine::this().cpus,
            "cpu_model": Machine::this().cpu_model,
            "kernel": Machine::this().kernel,
        },
        "peers": n,
        "config": { "idle_secs": options.idle.as_secs(), "passes": options.passes },
        "notes": {
            "updates_s": "until the agent answered the UAPI set(s): the device has the peers",
            "routes_s": "from the first update until `ip route` shows every peer's /32 on wm0 (or none, after the removal), polled every 20 ms",
            "agent_cpu_s": "CPU of the agent process (all threads) from the first update until the routes were in place",
            "reconcile_pass_ms": "one RouteReconciler::reconcile with every route already in place (a route dump and the diff, nothing to change), run by the benchmark in host a's namespace",
            "idle": "agent CPU (percent of one core, including its 5 s route resync) and memory with no peer and with all of them",
        },
        "idle_empty": empty,
        "idle_loaded": loaded,
        "at_once": at_once.json(),
        "removed": removed.json(),
        "one_by_one": one_by_one.json(),
        "reconcile_pass_ms": passes.json(),
        "peak_rss_mib": round2(peak_rss_mib),
    });
    Ok((report, table))
}

/// One case: how long the updates and the routes took, and what the agent spent.
struct Timed {
    updates_s: f64,
    routes_s: f64,
    agent_cpu_s: f64,
    rss_mib: f64,
}

impl Timed {
    fn json(&self) -> Value {
        json!({
            "updates_s": round2(self.updates_s),
            "routes_s": round2(self.routes_s),
            "agent_cpu_s": round2(self.agent_cpu_s),
            "rss_mib": round2(self.rss_mib),
        })
    }
}

impl std::fmt::Display for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "updates {:.2} s, routes {:.2} s, agent CPU {:.2} s, RSS {:.1} MiB",
            self.updates_s, self.routes_s, self.agent_cpu_s, self.rss_mib
        )
    }
}

fn row(name: &str, t: &Timed) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("{:.2}", t.updates_s),
        format!("{:.2}", t.routes_s),
        format!("{:.2}", t.agent_cpu_s),
        format!("{:.1}", t.rss_mib),
    ]
}

/// Runs `updates`, then waits until host a has `routes` routes of the agent's.
fn timed(a: &Host, pid: u32, routes: usize, updates: impl FnOnce() -> Result<()>) -> Result<Timed> {
    let meter = CpuMeter::start(&[pid])?;
    let start = Instant::now();
    updates()?;
    let updates_s = start.elapsed().as_secs_f64();
    loop {
        interrupt::check()?;
        let now = route_count(a)?;
        if now == routes {
            break;
        }
        if start.elapsed() > ROUTES_TIMEOUT {
            bail!("{now} routes on {IFACE} after {ROUTES_TIMEOUT:?}, not {routes}");
        }
        std::thread::sleep(POLL);
    }
    let routes_s = start.elapsed().as_secs_f64();
    let usage = meter.read()?;
    Ok(Timed {
        updates_s,
        routes_s,
        agent_cpu_s: usage.processes_s,
        rss_mib: procfs::rss_mib(pid)?,
    })
}

/// The agent's routes on the tunnel device.
fn route_count(a: &Host) -> Result<usize> {
    Ok(
        a.ip(&["-4", "route", "show", "dev", IFACE, "proto", ROUTE_PROTO])?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count(),
    )
}

/// Timed reconciler passes over `n` routes already in place.
struct Passes(Vec<f64>);

impl Passes {
    fn json(&self) -> Value {
        let (lo, hi) = min_max(&self.0).unwrap_or((f64::NAN, f64::NAN));
        json!({
            "median": median(&self.0).map(round2),
            "min": round2(lo),
            "max": round2(hi),
        })
    }
}

impl std::fmt::Display for Passes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lo, hi) = min_max(&self.0).unwrap_or((f64::NAN, f64::NAN));
        write!(
            f,
            "{:.2} ms (median of {}; {lo:.2} to {hi:.2})",
            median(&self.0).unwrap_or(f64::NAN),
            self.0.len()
        )
    }
}

/// `passes` runs of the agent's `RouteReconciler` in host a's namespace with the `n`
/// peers' routes as desired, all of them already installed: each a route dump and the
/// diff, the cost of the agent's every resync.
fn reconcile_passes(a: &Host, n: usize, passes: u32) -> Result<Passes> {
    in_netns(a, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let netlink = Netlink::new().await?;
            let index = netlink.link_index(IFACE).await?;
            let mut reconciler = RouteReconciler::new(RouteTarget::main(index));
            let desired = (0..n)
                .map(|i| IpCidr::new(peer_address(i).into(), 32))
                .collect::<Result<BTreeSet<IpCidr>, _>>()?;
            let mut times = Vec::new();
            for _ in 0..passes {
                let start = Instant::now();
                let diff = reconciler.reconcile(&netlink, &desired).await?;
                times.push(start.elapsed().as_secs_f64() * 1e3);
                ensure!(
                    diff.is_empty(),
                    "routes changed under the benchmark: {diff:?}"
                );
            }
            Ok::<_, anyhow::Error>(Passes(times))
        })
    })
}

/// Settles, then watches the agent for `window`: CPU share and memory.
fn idle(pid: u32, window: Duration) -> Result<Value> {
    interrupt::sleep(SETTLE)?;
    let meter = CpuMeter::start(&[pid])?;
    interrupt::sleep(window)?;
    let usage = meter.read()?;
    Ok(json!({
        "cpu_pct": round2(usage.process_cores() * 100.0),
        "rss_mib": round2(procfs::rss_mib(pid)?),
    }))
}

/// The UAPI lines of peer `i` (no blank line).
fn peer_lines(i: usize, key: &str) -> String {
    let mut s = String::new();
    let port = 20_000 + i % 40_000;
    let _ = write!(
        s,
        "public_key={key}\nendpoint={NOBODY}:{port}\nreplace_allowed_ips=true\nallowed_ip={}/32\n",
        peer_address(i)
    );
    s
}

fn peer_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(PEER_NET + i as u32 + 1)
}

/// One UAPI request on a fresh connection to `socket`; fails unless it answers `errno=0`.
fn uapi(socket: &Path, request: &str) -> Result<()> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\n" {
            break;
        }
        answer.push_str(&line);
    }
    ensure!(
        answer.trim() == "errno=0",
        "the agent answered {:?}",
        answer.trim()
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
