//! `wiremesh-controller`: mirrors linked clusters' nodes into local `MeshPeer`s. The work is
//! in `wiremesh_controller::reconcile`; this parses the flags, sets up logging, builds the
//! client, runs until SIGINT or SIGTERM and maps the error to an exit code (3: the CRDs are
//! not installed, 1: anything else).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tracing_subscriber::EnvFilter;
use wiremesh_controller::leader::DEFAULT_LEASE_DURATION;
use wiremesh_controller::reconcile::{self, Options, RunError};
use wiremesh_controller::shared::Timing;

/// The Wiremesh controller: for every PeerCluster, watches the linked cluster's MeshNodes
/// and mirrors them, checked, into local MeshPeers. One replica leads (a Lease in
/// wiremesh-system); the others stand by.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster configuration).
    #[arg(long, env = "WIREMESH_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, env = "WIREMESH_CONTEXT")]
    context: Option<String>,
    /// This replica's identity in the Lease (default: $POD_NAME, else HOSTNAME-PID).
    #[arg(long, env = "WIREMESH_IDENTITY")]
    identity: Option<String>,
    /// How long a replica's claim on the Lease lasts; a standby takes over this long after
    /// the leader stopped renewing.
    #[arg(long, env = "WIREMESH_LEASE_DURATION_SECONDS", default_value_t = DEFAULT_LEASE_DURATION.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_duration_seconds: u64,
    /// Serve Prometheus metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9587).
    #[arg(long, env = "WIREMESH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Most nodes mirrored from one peer cluster: its other nodes are refused, with a
    /// Conflict condition on its PeerCluster, and not kept in memory.
    #[arg(long, env = "WIREMESH_MAX_NODES_PER_PEER", default_value_t = 5_000)]
    max_nodes_per_peer: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "WIREMESH_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(try_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "wiremesh-controller failed");
            let not_installed = matches!(
                e.downcast_ref::<RunError>(),
                Some(RunError::CrdsMissing { .. })
            );
            ExitCode::from(if not_installed { 3 } else { 1 })
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    let client = client(cli.kubeconfig.as_deref(), cli.context.as_deref()).await?;
    let options = Options {
        identity: cli.identity.unwrap_or_else(default_identity),
        lease_duration: Duration::from_secs(cli.lease_duration_seconds),
        metrics_addr: cli.metrics_addr,
        timing: Timing::default(),
        max_nodes_per_peer: cli.max_nodes_per_peer,
    };
    reconcile::run(client, options, shutdown_signal()).await?;
    Ok(())
}

/// `--kubeconfig`/`--context` as kubectl reads them, else the usual inference.
async fn client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options)
            .await
            .context("loading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
        (None, None) => Config::infer()
            .await
            .context("finding a Kubernetes configuration (kubeconfig or in-cluster)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// `$POD_NAME` (set from the downward API in the manifest), else `HOSTNAME-PID`, so two
/// replicas on one machine (as in the tests) still differ.
fn default_identity() -> String {
    match std::env::var("POD_NAME") {
        Ok(name) if !name.is_empty() => name,
        _ => {
            let host = hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "wiremesh-controller".to_owned());
            format!("{host}-{}", std::process::id())
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `RUST_LOG`, else `info` without kube-client's line per failed request (during a peer
/// cluster's outage, one every few seconds; the PeerCluster's `Stale` condition and our own
/// warning say it once).
const DEFAULT_LOG_FILTER: &str = "info,kube_client::client::builder=off";

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
