//! The comparison: every data path in the same lab, round after round (A B C ... A B C
//! ...), so slow drifts of a shared machine spread over all of them alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::interrupt;
use crate::measure::{self, TcpRun};
use crate::micro;
use crate::procfs::CpuMeter;
use crate::progress;
use crate::report::{Machine, Report};
use crate::tools::Toolbox;
use crate::tunnel::{Impl, Topology, Tunnel};

/// The UDP payload of the small-packet test, in bytes.
pub const UDP_PAYLOAD: usize = 64;

/// What to measure and for how long.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds; every path is measured once per round.
    pub rounds: u32,
    /// Length of each TCP test (one flow, four flows), in seconds.
    pub tcp_secs: u32,
    /// Length of the UDP test, in seconds.
    pub udp_secs: u32,
    /// Pings for the round-trip times (10 ms apart).
    pub ping_count: u32,
    /// The paths, in round order.
    pub impls: Vec<Impl>,
}

/// One path measured in one round. A test that failed leaves its fields empty and its
/// error in `errors`.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Round number, from 1.
    pub round: u32,
    /// Which path (`None` only in `Default`).
    pub imp: Option<Impl>,
    /// Seconds from starting the daemons to the first ping through the tunnel.
    pub setup_s: Option<f64>,
    /// TCP, one flow: Gbit/s.
    pub tcp1_gbps: Option<f64>,
    /// TCP, one flow: retransmitted segments.
    pub tcp1_retransmits: Option<u64>,
    /// TCP, four flows: Gbit/s.
    pub tcp4_gbps: Option<f64>,
    /// UDP, 64-byte payloads: thousand datagrams per second received.
    pub udp64_kpps: Option<f64>,
    /// UDP, 64-byte payloads: thousand datagrams per second sent.
    pub udp64_sent_kpps: Option<f64>,
    /// UDP, 64-byte payloads: loss in percent.
    pub udp64_loss_pct: Option<f64>,
    /// Round trip, median, ms.
    pub rtt_p50_ms: Option<f64>,
    /// Round trip, 99th percentile, ms.
    pub rtt_p99_ms: Option<f64>,
    /// Round trip while one TCP flow saturates the tunnel, median, ms.
    pub loaded_rtt_p50_ms: Option<f64>,
    /// Round trip while one TCP flow saturates the tunnel, 99th percentile, ms.
    pub loaded_rtt_p99_ms: Option<f64>,
    /// CPU seconds of both tunnel daemons per Gbit carried, during the one-flow TCP test.
    pub cpu_s_per_gbit: Option<f64>,
    /// The same during the four-flow TCP test.
    pub tcp4_cpu_s_per_gbit: Option<f64>,
    /// Busy CPU seconds of the whole machine per Gbit during the one-flow TCP test
    /// (iperf3, kernel, daemons, and whatever else runs on the machine).
    pub machine_cpu_s_per_gbit: Option<f64>,
    /// Peak resident memory of the larger of the two daemons, MiB.
    pub peak_rss_mib: Option<f64>,
    /// What failed.
    pub errors: Vec<String>,
}

/// Runs the comparison and returns everything measured; criterion estimates found under
/// `criterion_dir` are added to the report.
///
/// # Errors
/// When the lab cannot be built or the run is interrupted; a path that fails in a round
/// is recorded and the run goes on.
pub fn run(options: &Options, tools: &Toolbox, criterion_dir: &std::path::Path) -> Result<Report> {
    let started = SystemTime::now();
    let versions = tools.versions();
    let topology = Topology::new()?;
    progress!(
        "lab {}: pod {} (host a) -> pod {} (host b), {} rounds of {}",
        topology.lab.prefix(),
        topology.a.pod.ip(),
        topology.b.pod.ip(),
        options.rounds,
        options
            .impls
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let per_path = options.tcp_secs * 3 + options.udp_secs + options.ping_count / 100 + 4;
    progress!(
        "about {} s in all",
        per_path as usize * options.impls.len() * options.rounds as usize
    );
    let mut samples = Vec::new();
    for round in 1..=options.rounds {
        for imp in &options.impls {
            interrupt::check()?;
            let sample = measure_path(&topology, tools, options, *imp, round);
            progress!("{}", describe(&sample));
            samples.push(sample);
        }
    }
    interrupt::check()?;
    drop(topology);
    Ok(Report {
        started_unix: unix(started),
        finished_unix: unix(SystemTime::now()),
        options: options.clone(),
        machine: Machine::this(),
        versions,
        samples,
        micro: micro::read_estimates(criterion_dir),
    })
}

fn measure_path(
    topology: &Topology,
    tools: &Toolbox,
    options: &Options,
    imp: Impl,
    round: u32,
) -> Sample {
    let mut sample = Sample {
        round,
        imp: Some(imp),
        ..Sample::default()
    };
    let start = Instant::now();
    let tunnel = match topology.up(imp, tools) {
        Ok(tunnel) => tunnel,
        Err(e) => {
            sample.errors.push(format!("setup: {e:#}"));
            return sample;
        }
    };
    sample.setup_s = Some(start.elapsed().as_secs_f64());
    if let Err(e) = run_tests(topology, &tunnel, options, &mut sample) {
        sample.errors.push(format!("{e:#}"));
    }
    if let Err(e) = tunnel.down() {
        sample.errors.push(format!("teardown: {e:#}"));
    }
    sample
}

/// Latency first, on an idle tunnel; then the loads.
fn run_tests(
    topology: &Topology,
    tunnel: &Tunnel<'_>,
    options: &Options,
    sample: &mut Sample,
) -> Result<()> {
    let (a, b) = (&topology.a, &topology.b);
    let server_ip = crate::tunnel::mesh_ip(tunnel.imp(), b.pod.ip());
    let (server, client) = (&*b.pod, &*a.pod);
    let pids = tunnel.pids();

    interrupt::check()?;
    match measure::rtt(client, server_ip, options.ping_count) {
        Ok(rtt) => {
            sample.rtt_p50_ms = Some(rtt.p50_ms);
            sample.rtt_p99_ms = Some(rtt.p99_ms);
        }
        Err(e) => sample.errors.push(format!("ping: {e:#}")),
    }

    for flows in [1, 4] {
        interrupt::check()?;
        let meter = CpuMeter::start(&pids)?;
        match measure::tcp(server, server_ip, client, flows, options.tcp_secs) {
            Ok(run) => {
                let usage = meter.read()?;
                let per_gbit = |seconds: f64| per_gbit(seconds, &run);
                if flows == 1 {
                    sample.tcp1_gbps = Some(run.gbps);
                    sample.tcp1_retransmits = Some(run.retransmits);
                    sample.cpu_s_per_gbit = per_gbit(usage.processes_s);
                    sample.machine_cpu_s_per_gbit = per_gbit(usage.machine_s);
                } else {
                    sample.tcp4_gbps = Some(run.gbps);
                    sample.tcp4_cpu_s_per_gbit = per_gbit(usage.processes_s);
                }
            }
            Err(e) => sample.errors.push(format!("tcp x{flows}: {e:#}")),
        }
    }

    interrupt::check()?;
    match measure::loaded_rtt(server, server_ip, client, options.tcp_secs) {
        Ok(rtt) => {
            sample.loaded_rtt_p50_ms = Some(rtt.p50_ms);
            sample.loaded_rtt_p99_ms = Some(rtt.p99_ms);
        }
        Err(e) => sample.errors.push(format!("ping under load: {e:#}")),
    }

    interrupt::check()?;
    match measure::udp(server, server_ip, client, UDP_PAYLOAD, options.udp_secs) {
        Ok(run) => {
            sample.udp64_kpps = Some(run.kpps);
            sample.udp64_sent_kpps = Some(run.sent_kpps);
            sample.udp64_loss_pct = Some(run.loss_pct);
        }
        Err(e) => sample.errors.push(format!("udp: {e:#}")),
    }

    sample.peak_rss_mib = Some(tunnel.peak_rss_mib()?);
    if !tunnel.alive() {
        sample
            .errors
            .push("a tunnel daemon exited during the tests".to_owned());
    }
    Ok(())
}

/// CPU seconds per Gbit carried by `run`; `None` when nothing was carried.
fn per_gbit(cpu_seconds: f64, run: &TcpRun) -> Option<f64> {
    let gbit = run.bytes as f64 * 8.0 / 1e9;
    (gbit > 0.0).then(|| cpu_seconds / gbit)
}

fn describe(s: &Sample) -> String {
    let f = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
    };
    let name = s.imp.map_or("?", Impl::name);
    let mut line = format!(
        "round {} {name:<20} tcp1 {} tcp4 {} Gbit/s, udp64 {} kpps, rtt {}/{} ms, loaded {}/{} ms, {} CPU-s/Gbit, {} MiB",
        s.round,
        f(s.tcp1_gbps, 2),
        f(s.tcp4_gbps, 2),
        f(s.udp64_kpps, 0),
        f(s.rtt_p50_ms, 3),
        f(s.rtt_p99_ms, 3),
        f(s.loaded_rtt_p50_ms, 3),
        f(s.loaded_rtt_p99_ms, 3),
        f(s.cpu_s_per_gbit, 2),
        f(s.peak_rss_mib, 1),
    );
    for e in &s.errors {
        line.push_str(&format!("\n    error: {}", e.replace('\n', "\n    ")));
    }
    line
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Samples grouped by path, in round order.
pub fn by_impl(samples: &[Sample]) -> BTreeMap<Impl, Vec<&Sample>> {
    let mut map: BTreeMap<Impl, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        if let Some(imp) = s.imp {
            map.entry(imp).or_default().push(s);
        }
    }
    map
}
