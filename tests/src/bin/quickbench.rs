//! `wm-quickbench`: a quick A/B throughput check for the data path. For each round and each
//! implementation (alternating A B A B), a fresh lab with two hosts and a pod behind each,
//! the tunnel on both hosts, ping latency, then one `iperf3` TCP flow pod a -> pod b. Prints
//! each run and the medians: Gbit/s, CPU seconds of both tunnel processes per Gbit, and
//! ping p50.
//!
//! ```text
//! wm-quickbench [--secs 5] [--rounds 3] [--flows 1] NAME=wiremesh:/path/agent NAME=wggo:/path/wireguard-go ...
//! ```

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use wiremesh_lab::mesh::{IFACE, Node, write_config};
use wiremesh_lab::{Lab, Proc, ping};

/// Compares tunnel implementations with single-flow iperf3 between two lab pods.
#[derive(Parser)]
#[command(name = "wm-quickbench")]
struct Cli {
    /// Seconds of iperf3 per run.
    #[arg(long, default_value_t = 5)]
    secs: u32,
    /// Rounds (each runs every implementation once, in the given order).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Parallel TCP flows.
    #[arg(long, default_value_t = 1)]
    flows: u32,
    /// Run tunnels and iperf3 under SCHED_FIFO: on a machine where other work (such as
    /// niced compiles) keeps every CPU busy, this approximates a quiet machine, because
    /// the scheduler then spreads the benchmark over the CPUs as it would over idle ones.
    #[arg(long)]
    rt: bool,
    /// Set up the first implementation, print the namespaces and wait this many seconds
    /// instead of measuring (for poking at it by hand).
    #[arg(long)]
    hold: Option<u64>,
    /// `name=wiremesh:PATH` or `name=wggo:PATH`.
    #[arg(required = true)]
    impls: Vec<String>,
}

#[derive(Clone)]
enum Kind {
    Wiremesh,
    WireguardGo,
}

#[derive(Clone)]
struct Impl {
    name: String,
    kind: Kind,
    path: String,
    /// Prefix commands with `chrt -f 1`.
    rt: bool,
}

impl Impl {
    /// `program args` as a command line, under SCHED_FIFO when asked.
    fn command<'a>(&self, program: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = if self.rt {
            vec!["chrt", "-f", "1", program]
        } else {
            vec![program]
        };
        v.extend_from_slice(args);
        v
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    gbps: f64,
    cpu_s_per_gbit: f64,
    rtt_p50_ms: f64,
    retransmits: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_impl(s: &str, rt: bool) -> Result<Impl> {
    let (name, rest) = s.split_once('=').context("expected name=kind:path")?;
    let (kind, path) = rest.split_once(':').context("expected name=kind:path")?;
    let kind = match kind {
        "wiremesh" => Kind::Wiremesh,
        "wggo" => Kind::WireguardGo,
        other => bail!("unknown kind {other}"),
    };
    ensure!(Path::new(path).exists(), "{path} does not exist");
    Ok(Impl {
        name: name.to_owned(),
        kind,
        path: path.to_owned(),
        rt,
    })
}

fn run(cli: &Cli) -> Result<()> {
    let impls: Vec<Impl> = cli
        .impls
        .iter()
        .map(|s| parse_impl(s, cli.rt))
        .collect::<Result<_>>()?;
    if let Some(secs) = cli.hold {
        return hold(&impls[0], secs);
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); impls.len()];
    for round in 0..cli.rounds {
        for (i, imp) in impls.iter().enumerate() {
            match one(imp, cli.secs, cli.flows) {
                Ok(r) => {
                    println!(
                        "round {round} {:<12} {:6.2} Gbit/s  {:5.2} CPU-s/Gbit  p50 {:.3} ms  retr {}",
                        imp.name, r.gbps, r.cpu_s_per_gbit, r.rtt_p50_ms, r.retransmits
                    );
                    results[i].push(r);
                }
                Err(e) => println!("round {round} {:<12} FAILED: {e:#}", imp.name),
            }
        }
    }
    println!("\nmedians:");
    for (imp, runs) in impls.iter().zip(&results) {
        if runs.is_empty() {
            continue;
        }
        println!(
            "{:<12} {:6.2} Gbit/s  {:5.2} CPU-s/Gbit  p50 {:.3} ms  retr {}  (n={})",
            imp.name,
            median(runs.iter().map(|r| r.gbps)),
            median(runs.iter().map(|r| r.cpu_s_per_gbit)),
            median(runs.iter().map(|r| r.rtt_p50_ms)),
            median(runs.iter().map(|r| r.retransmits)),
            runs.len()
        );
    }
    Ok(())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

/// Two nodes `a` and `b` in a fresh lab, tunnelled by `imp`: the lab, the nodes and the
/// two tunnel processes (dropping the lab stops everything).
fn pair(imp: &Impl) -> Result<(Lab, Node, Node, [Proc; 2])> {
    let lab = Lab::new()?;
    let a = Node::new(&lab, "a", 1)?;
    let b = Node::new(&lab, "b", 2)?;
    let procs = match imp.kind {
        Kind::Wiremesh => [start_wiremesh(imp, &a, &b)?, start_wiremesh(imp, &b, &a)?],
        Kind::WireguardGo => [start_wggo(imp, &a, &b)?, start_wggo(imp, &b, &a)?],
    };
    Ok((lab, a, b, procs))
}

fn one(imp: &Impl, secs: u32, flows: u32) -> Result<Run> {
    let (_lab, a, b, procs) = pair(imp)?;
    ping(&a.pod, b.pod.ip(), 2)?;
    let rtt = rtt_p50(&a, &b)?;

    let server = b.pod.spawn(&imp.command("iperf3", &["-s", "-1"]))?;
    std::thread::sleep(Duration::from_millis(300));
    let before: f64 = procs
        .iter()
        .map(|p| cpu_seconds(p.pid()))
        .sum::<Result<f64>>()?;
    let (ip, secs_s, flows_s) = (b.pod.ip().to_string(), secs.to_string(), flows.to_string());
    let out = a.pod.exec_timeout(
        &imp.command("iperf3", &["-c", &ip, "-t", &secs_s, "-P", &flows_s, "-J"]),
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    let after: f64 = procs
        .iter()
        .map(|p| cpu_seconds(p.pid()))
        .sum::<Result<f64>>()?;
    let _ = server.wait_with_timeout(Duration::from_secs(5));
    let json = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "iperf3 failed: {json}");
    let bps = json_number_after(&json, "\"sum_received\"", "\"bits_per_second\"")
        .context("no sum_received in iperf3 output")?;
    let seconds = json_number_after(&json, "\"sum_received\"", "\"seconds\"").unwrap_or(1.0);
    let retransmits = json_number_after(&json, "\"sum_sent\"", "\"retransmits\"").unwrap_or(0.0);
    let gbps = bps / 1e9;
    for p in &procs {
        ensure!(p.is_running(), "{} died: {}", p.label(), p.stderr());
    }
    Ok(Run {
        gbps,
        cpu_s_per_gbit: (after - before) / (gbps * seconds),
        rtt_p50_ms: rtt,
        retransmits,
    })
}

fn hold(imp: &Impl, secs: u64) -> Result<()> {
    let (_lab, a, b, procs) = pair(imp)?;
    println!(
        "host a {} pod a {} ({}), host b {} pod b {} ({}), pids {} {}",
        a.host.name(),
        a.pod.name(),
        a.pod.ip(),
        b.host.name(),
        b.pod.name(),
        b.pod.ip(),
        procs[0].pid(),
        procs[1].pid()
    );
    std::thread::sleep(Duration::from_secs(secs));
    for p in &procs {
        println!("--- {}:\n{}", p.label(), p.stderr());
    }
    Ok(())
}

fn start_wiremesh(imp: &Impl, me: &Node, peer: &Node) -> Result<Proc> {
    let config = write_config(&me.host, &me.keys, &[peer.as_peer(true)])?;
    let config = config.to_str().context("utf-8 path")?.to_owned();
    let cmd = imp.command(&imp.path, &["up", "--config", &config]);
    let proc = me
        .host
        .spawn_in_private_mounts(cmd[0], &cmd[1..], &[("RUST_LOG", "warn")])?;
    me.host
        .wait_for_uapi_socket(IFACE, &proc, Duration::from_secs(10))?;
    Ok(proc)
}

fn start_wggo(imp: &Impl, me: &Node, peer: &Node) -> Result<Proc> {
    let cmd = imp.command(&imp.path, &["-f", IFACE]);
    me.start_wireguard_go(
        &cmd,
        &[("LOG_LEVEL", "error"), ("GOMAXPROCS", "2")],
        peer,
        true,
    )
}

/// p50 of 20 pings 50 ms apart, in milliseconds.
fn rtt_p50(a: &Node, b: &Node) -> Result<f64> {
    let out = a.pod.exec_ok(&[
        "ping",
        "-n",
        "-c",
        "20",
        "-i",
        "0.05",
        &b.pod.ip().to_string(),
    ])?;
    let times = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse::<f64>().ok());
    Ok(median(times))
}

/// User plus system CPU seconds of a process, all threads.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY-free: the clock tick is 100 Hz on every Linux we run on (USER_HZ).
    Ok((utime + stime) / 100.0)
}

/// The first number after `key` that follows `section` in iperf3's JSON.
fn json_number_after(json: &str, section: &str, key: &str) -> Option<f64> {
    // The summary is at the end; search the last `section`.
    let start = json.rfind(section)?;
    let rest = &json[start..];
    let at = rest.find(key)? + key.len();
    let rest = rest[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
