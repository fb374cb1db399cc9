//! `wiremesh-agent`: the node agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use wiremesh_agent::standalone::{self, UpOptions};

/// The Wiremesh node agent: userspace WireGuard tunnels to every node of the mesh.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "WIREMESH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Bring up an interface from a wg-quick style config file and run in the foreground
    /// until SIGINT or SIGTERM, which remove its routes and device.
    Up {
        /// The config file (`[Interface]`, `[Peer]`); the interface is named after it.
        #[arg(long, short, env = "WIREMESH_CONFIG")]
        config: Option<PathBuf>,
        /// The interface name (default: the config file's name). Without a config file,
        /// an empty interface that `wg setconf` can configure.
        #[arg(long, short, env = "WIREMESH_INTERFACE")]
        interface: Option<String>,
        /// Private key file, used when the config has no PrivateKey; generated (mode
        /// 0600) if missing.
        #[arg(long, env = "WIREMESH_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// Directory of the UAPI socket that `wg` uses.
        #[arg(long, env = "WIREMESH_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
        /// Serve Prometheus metrics and health checks on this address (e.g. 0.0.0.0:9586).
        #[arg(long, env = "WIREMESH_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Route every peer's allowed IPs into the interface, following each change (as
        /// the `kube` and `host` modes do), instead of wg-quick's routes fixed at `up`.
        #[arg(long, env = "WIREMESH_ROUTE_ALLOWED_IPS")]
        route_allowed_ips: bool,
        /// Translate this side's addresses statelessly: `POD_CIDR=MESH_CIDR` (repeatable;
        /// ranges of the same length), for two sites whose ranges overlap. Packets into the
        /// tunnel leave with sources in MESH_CIDR, packets for MESH_CIDR arrive mapped back.
        #[arg(
            long,
            env = "WIREMESH_TRANSLATE",
            value_delimiter = ',',
            value_name = "POD_CIDR=MESH_CIDR"
        )]
        translate: Vec<String>,
    },
    /// Run as a Kubernetes node agent: publish this node's MeshNode, build a tunnel to
    /// every MeshPeer, keep forwarding when the API server is unreachable.
    Kube(Box<KubeArgs>),
    /// Run on a host outside Kubernetes registered with `meshctl host add`: publish this
    /// host's public key and endpoint, build a tunnel to every node of its cluster and of
    /// the linked clusters.
    Host(Box<HostArgs>),
    /// Remove the fail-closed routes (`unreachable ... proto 0x58`) that keep the linked
    /// clusters' ranges off the underlay while no tunnel carries them, and the list of
    /// them in the state directory. A node's agent removes a cluster's own when it is
    /// unlinked (`meshctl unjoin`); run this on each machine when uninstalling Wiremesh
    /// (after unjoining), and on hosts after unlinking a cluster: until then, traffic to
    /// those ranges is refused.
    Cleanup {
        /// The agent's state directory.
        #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
        state_dir: PathBuf,
    },
}

/// Flags the `kube` and `host` modes share.
#[derive(clap::Args)]
struct MeshArgs {
    /// The TUN device name.
    #[arg(long, env = "WIREMESH_INTERFACE", default_value = "wm0")]
    interface: String,
    /// The UDP port for WireGuard.
    #[arg(long, env = "WIREMESH_LISTEN_PORT", default_value_t = 51820)]
    listen_port: u16,
    /// MTU of the TUN device; 0: the underlay's less WireGuard's 60 (IPv4) or 80 (IPv6) bytes.
    #[arg(long, env = "WIREMESH_MTU", default_value_t = wiremesh_agent::dataplane::MTU_FROM_UNDERLAY)]
    mtu: u32,
    /// Persistent keepalive towards every peer, in seconds (0: off).
    #[arg(long, env = "WIREMESH_PERSISTENT_KEEPALIVE", default_value_t = 25)]
    persistent_keepalive: u16,
    /// Directory for the private key (generated on first start, mode 0600) and state.
    #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
    state_dir: PathBuf,
    /// Directory of the UAPI socket that `wg` uses.
    #[arg(long, env = "WIREMESH_UAPI_DIR", default_value = "/var/run/wireguard")]
    uapi_dir: PathBuf,
    /// Serve Prometheus metrics and health checks on this address.
    #[arg(long, env = "WIREMESH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Most peers (tunnels) this machine holds; beyond it the last by cluster and node
    /// name are refused, with a warning and `wiremesh_peers_over_limit`. The default is
    /// twice the 10,000 peers `make bench-scale` measures.
    #[arg(long, env = "WIREMESH_MAX_PEERS", default_value_t = 20_000)]
    max_peers: usize,
}

#[derive(clap::Args)]
struct HostArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// The bundle file `meshctl host add` wrote (API server, CA, token, cluster, host).
    #[arg(long, env = "WIREMESH_BUNDLE")]
    bundle: PathBuf,
    /// Endpoints to publish, most preferred first (default: those of `meshctl host add
    /// --endpoint`).
    #[arg(long = "endpoint", env = "WIREMESH_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
}

#[derive(clap::Args)]
struct KubeArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// Kubeconfig file (default: in-cluster configuration, or $KUBECONFIG).
    #[arg(long, env = "WIREMESH_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long, env = "WIREMESH_CONTEXT")]
    context: Option<String>,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// An address for the TUN device, e.g. the node's pod gateway (repeatable).
    #[arg(long = "address", env = "WIREMESH_ADDRESSES", value_delimiter = ',')]
    addresses: Vec<wiremesh_proto::InterfaceAddress>,
    /// Endpoints to publish instead of the Node's addresses, most preferred first.
    #[arg(long = "endpoint", env = "WIREMESH_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
    /// After a key rotation (`meshctl rotate-keys`), how long the old key is still
    /// answered at most, in seconds (it goes earlier once every peer with a session has
    /// handshaken under the new key).
    #[arg(long, env = "WIREMESH_ROTATION_GRACE", default_value_t = 600)]
    rotation_grace: u64,
    /// A taint key (e.g. wiremesh.io/agent-not-ready) the kubelet registers this node
    /// with: removed from the Node once the fail-closed routes are in place and the peers
    /// synced.
    #[arg(long, env = "WIREMESH_STARTUP_TAINT")]
    startup_taint: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wiremesh_agent::init_tracing(matches!(cli.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up {
                config,
                interface,
                key_file,
                uapi_dir,
                metrics_addr,
                route_allowed_ips,
                translate,
            } => {
                standalone::up(UpOptions {
                    config,
                    interface,
                    key_file,
                    uapi_dir,
                    metrics_addr,
                    route_allowed_ips,
                    translate,
                })
                .await
            }
            Command::Kube(args) => {
                wiremesh_agent::k8s::check_node_name(&args.node_name)?;
                wiremesh_agent::k8s::run(wiremesh_agent::k8s::KubeOptions {
                    kubeconfig: args.kubeconfig,
                    context: args.context,
                    node_name: args.node_name,
                    interface: args.mesh.interface,
                    listen_port: args.mesh.listen_port,
                    mtu: args.mesh.mtu,
                    addresses: args.addresses,
                    key_file: args.mesh.state_dir.join("private.key"),
                    endpoints: args.endpoints,
                    persistent_keepalive: args.mesh.persistent_keepalive,
                    uapi_dir: args.mesh.uapi_dir,
                    metrics_addr: args.mesh.metrics_addr,
                    state_dir: args.mesh.state_dir,
                    rotation_grace: std::time::Duration::from_secs(args.rotation_grace),
                    max_peers: args.mesh.max_peers,
                    startup_taint: args.startup_taint.filter(|k| !k.is_empty()),
                })
                .await
            }
            Command::Cleanup { state_dir } => wiremesh_agent::failclosed::run_cleanup(&state_dir)
                .await
                .map(|removed| {
                    tracing::info!(removed, "fail-closed routes removed");
                }),
            Command::Host(args) => {
                wiremesh_agent::host::run(wiremesh_agent::host::HostOptions {
                    bundle: args.bundle,
                    interface: args.mesh.interface,
                    listen_port: args.mesh.listen_port,
                    mtu: args.mesh.mtu,
                    endpoints: args.endpoints,
                    persistent_keepalive: args.mesh.persistent_keepalive,
                    state_dir: args.mesh.state_dir,
                    uapi_dir: args.mesh.uapi_dir,
                    metrics_addr: args.mesh.metrics_addr,
                    max_peers: args.mesh.max_peers,
                })
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
