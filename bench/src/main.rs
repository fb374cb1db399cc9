//! `wiremesh-bench`: the peer comparison (`make bench`), the scale figures
//! (`make bench-scale`) and the chart. Needs root: everything runs in a namespace lab.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use wiremesh_bench::compare::{self, Options};
use wiremesh_bench::tools::{Toolbox, default_tools_dir};
use wiremesh_bench::tunnel::Impl;
use wiremesh_bench::{apply, chart, interrupt, mesh, mesh_chart, progress, scale};

/// Wiremesh benchmarks against plain veth routing, wireguard-go and boringtun-cli.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure every path, alternating round by round; print the table of medians and
    /// ratios, write `<out>/latest.json` and `<out>/latest.png`.
    Compare {
        /// Rounds (each path once per round).
        #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3)]
        rounds: u32,
        /// Seconds of each TCP test (one flow, four flows).
        #[arg(long, env = "BENCH_TCP_SECS", default_value_t = 5)]
        tcp_secs: u32,
        /// Seconds of the 64-byte UDP test.
        #[arg(long, env = "BENCH_UDP_SECS", default_value_t = 3)]
        udp_secs: u32,
        /// Pings (10 ms apart) for the round-trip times.
        #[arg(long, env = "BENCH_PING_COUNT", default_value_t = 200)]
        ping_count: u32,
        /// The paths, comma-separated, in round order.
        #[arg(
            long,
            env = "BENCH_IMPLS",
            value_delimiter = ',',
            default_value = "veth,wiremesh,wiremesh-translated,wireguard-go-debian,wireguard-go-latest,boringtun-cli"
        )]
        impls: Vec<Impl>,
        /// Where latest.json and latest.png go.
        #[arg(long, env = "BENCH_OUT", default_value = "bench/results")]
        out: PathBuf,
        /// Where bench/install.sh put boringtun-cli and wireguard-go-latest (in `bin/`;
        /// default: target/bench-tools).
        #[arg(long, env = "WIREMESH_BENCH_TOOLS")]
        tools: Option<PathBuf>,
        /// Criterion's output, read for the micro-benchmark table.
        #[arg(long, env = "BENCH_CRITERION_DIR")]
        criterion_dir: Option<PathBuf>,
    },
    /// The agent with many peers: memory, CPU, handshakes with all, first packet of a
    /// peer added through the UAPI; print the table, write `<out>/scale.json`.
    Scale {
        /// Peer counts, comma-separated.
        #[arg(
            long,
            env = "BENCH_PEERS",
            value_delimiter = ',',
            default_value = "1000,10000"
        )]
        peers: Vec<usize>,
        /// Seconds of each idle measurement.
        #[arg(long, env = "BENCH_IDLE_SECS", default_value_t = 10)]
        idle_secs: u64,
        /// Seconds the handshakes with all peers may take.
        #[arg(long, env = "BENCH_HANDSHAKE_TIMEOUT", default_value_t = 120)]
        handshake_timeout: u64,
        /// First-packet measurements per case.
        #[arg(long, env = "BENCH_FIRST_PACKET_RUNS", default_value_t = 5)]
        first_packet_runs: u32,
        /// Peers whose endpoints share one responder address (0: all on one, which
        /// measures the agent's per-source handshake limit instead).
        #[arg(long, env = "BENCH_PEERS_PER_ADDRESS", default_value_t = 8)]
        peers_per_address: usize,
        /// Times each peer count is measured; the summary holds the medians.
        #[arg(long, env = "BENCH_SCALE_RUNS", default_value_t = 1)]
        runs: u32,
        /// Where scale.json goes.
        #[arg(long, env = "BENCH_OUT", default_value = "bench/results")]
        out: PathBuf,
    },
    /// The mesh at scale: K control planes of N simulated nodes each, the real controller
    /// in each, every pair joined; print the table, write `<out>/mesh.json` and `mesh.png`.
    Mesh {
        /// The steps, CLUSTERSxNODES, comma-separated.
        #[arg(
            long,
            env = "BENCH_MESH_STEPS",
            value_delimiter = ',',
            default_value = "2x50,5x200,10x500"
        )]
        steps: Vec<mesh::Step>,
        /// Changes timed of each kind (creation, key change, deletion) per step.
        #[arg(long, env = "BENCH_MESH_CHANGES", default_value_t = 20)]
        changes: usize,
        /// Seconds of the steady-state window.
        #[arg(long, env = "BENCH_MESH_STEADY_SECS", default_value_t = 30)]
        steady_secs: u64,
        /// Simulated agents per cluster holding a MeshPeer watch of their own.
        #[arg(long, env = "BENCH_MESH_WATCHERS", default_value_t = 5)]
        watchers: usize,
        /// Whether the simulated agents write their status (`false`: no status writes).
        #[arg(long, env = "BENCH_MESH_STATUS", default_value_t = true, action = clap::ArgAction::Set)]
        status: bool,
        /// Seconds of the remote API server outage.
        #[arg(long, env = "BENCH_MESH_OUTAGE_SECS", default_value_t = 20)]
        outage_secs: u64,
        /// Longest wait, in seconds, for any convergence.
        #[arg(long, env = "BENCH_MESH_TIMEOUT", default_value_t = 300)]
        timeout: u64,
        /// Where mesh.json and mesh.png go.
        #[arg(long, env = "BENCH_OUT", default_value = "bench/results")]
        out: PathBuf,
    },
    /// The agent taking many peers whose routes follow their allowed IPs, all in one
    /// update and one update per peer: time until every route is in place, CPU, memory,
    /// and a route reconciler pass over them; print the table, write `<out>/apply.json`.
    Apply {
        /// Peers.
        #[arg(long, env = "BENCH_APPLY_PEERS", default_value_t = 5000)]
        peers: usize,
        /// Seconds of each idle measurement.
        #[arg(long, env = "BENCH_IDLE_SECS", default_value_t = 10)]
        idle_secs: u64,
        /// Reconciler passes timed with all routes in place.
        #[arg(long, env = "BENCH_RECONCILE_PASSES", default_value_t = 20)]
        passes: u32,
        /// Where apply.json goes.
        #[arg(long, env = "BENCH_OUT", default_value = "bench/results")]
        out: PathBuf,
    },
    /// Draw the chart of a comparison's JSON again (no measurement).
    Chart {
        /// The report.
        #[arg(long, default_value = "bench/results/latest.json")]
        json: PathBuf,
        /// The PNG to write.
        #[arg(long, default_value = "bench/results/latest.png")]
        png: PathBuf,
    },
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Compare {
            rounds,
            tcp_secs,
            udp_secs,
            ping_count,
            impls,
            out,
            tools,
            criterion_dir,
        } => {
            interrupt::install()?;
            let tools = Toolbox::locate(&tools.unwrap_or_else(default_tools_dir))?;
            let options = Options {
                rounds: rounds.max(1),
                tcp_secs: tcp_secs.max(1),
                udp_secs: udp_secs.max(1),
                ping_count: ping_count.max(10),
                impls,
            };
            let criterion_dir = criterion_dir.unwrap_or_else(default_criterion_dir);
            let report = compare::run(&options, &tools, &criterion_dir)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let json_path = out.join("latest.json");
            write_json(&json_path, &report.to_json())?;
            let png = out.join("latest.png");
            chart::render(&report, &png)?;
            print(&report.table())?;
            progress!("wrote {} and {}", json_path.display(), png.display());
        }
        Command::Scale {
            peers,
            idle_secs,
            handshake_timeout,
            first_packet_runs,
            peers_per_address,
            runs,
            out,
        } => {
            interrupt::install()?;
            let options = scale::Options {
                peers,
                idle: Duration::from_secs(idle_secs.max(1)),
                handshake_timeout: Duration::from_secs(handshake_timeout.max(1)),
                first_packet_runs: first_packet_runs.max(1),
                peers_per_address,
                runs: runs.max(1),
            };
            let (report, table) = scale::run(&options)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join("scale.json");
            write_json(&path, &report)?;
            print(&table)?;
            progress!("wrote {}", path.display());
        }
        Command::Mesh {
            steps,
            changes,
            steady_secs,
            watchers,
            status,
            outage_secs,
            timeout,
            out,
        } => {
            interrupt::install()?;
            let options = mesh::Options {
                steps,
                changes: changes.max(1),
                steady: Duration::from_secs(steady_secs.max(1)),
                watchers,
                status_writes: status,
                outage: Duration::from_secs(outage_secs.max(1)),
                timeout: Duration::from_secs(timeout.max(10)),
            };
            let (report, table) = mesh::run(&options)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join("mesh.json");
            write_json(&path, &report)?;
            let png = out.join("mesh.png");
            mesh_chart::render(&report, &png)?;
            print(&table)?;
            progress!("wrote {} and {}", path.display(), png.display());
        }
        Command::Apply {
            peers,
            idle_secs,
            passes,
            out,
        } => {
            interrupt::install()?;
            let options = apply::Options {
                peers,
                idle: Duration::from_secs(idle_secs.max(1)),
                passes: passes.max(1),
            };
            let (report, table) = apply::run(&options)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join("apply.json");
            write_json(&path, &report)?;
            print(&table)?;
            progress!("wrote {}", path.display());
        }
        Command::Chart { json, png } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", json.display()))?;
            let report = wiremesh_bench::report::Report::from_json(&value)
                .with_context(|| format!("reading the report in {}", json.display()))?;
            chart::render(&report, &png)?;
            progress!("wrote {}", png.display());
        }
    }
    Ok(())
}

/// Criterion writes to `$CARGO_TARGET_DIR/criterion`, by default this workspace's
/// `target/criterion`.
fn default_criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("criterion")
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("serialising the report")?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn print(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
