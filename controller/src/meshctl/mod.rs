//! The library behind `meshctl`: `install`, `join`, `unjoin`, `status`, `host`,
//! `gateway`, `rotate-keys`, `export` and `unexport`.
//!
//! The decisions are pure functions with unit tests ([`preflight::check_join`],
//! [`status::StatusReport`], [`table`]); the rest talks to the API servers and prints each
//! step on stdout.
//!
//! The objects of a link in which cluster X reads cluster Y (and the same with X and Y
//! swapped), all written with server-side apply by field manager `meshctl`:
//! - in Y: ClusterRole `wiremesh-peer-reader` (get, list, watch on `meshnodes` and
//!   `meshserviceexports.wiremesh.io` only), ServiceAccount `wiremesh-system/wiremesh-peer-<X>`, ClusterRoleBinding
//!   `wiremesh-peer-<X>`, and a token for that ServiceAccount from the TokenRequest API;
//! - in X: Secret `wiremesh-system/peer-<Y>` holding the token, and PeerCluster `<Y>`.

pub mod common;
pub mod dns;
pub mod export;
pub mod gateway;
pub mod host;
pub mod join;
pub mod kubeconfig;
pub mod preflight;
pub mod rotate;
pub mod status;
pub mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use wiremesh_proto::{IpCidr, PublicKey};

use self::kubeconfig::KubeArgs;

/// Link Kubernetes clusters into one Wiremesh network.
#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about)]
pub struct Cli {
    /// Which kubeconfig and context to use.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Install Wiremesh in this cluster: the CRDs, the cluster ConfigMap and everything in
    /// deploy/wiremesh.yaml (RBAC, agent DaemonSet, controller Deployment), server-side
    /// applied.
    Install {
        /// This cluster's name in the mesh (a DNS label, unique among linked clusters).
        #[arg(long, value_name = "NAME")]
        cluster_name: String,
        /// The cluster's whole pod range; repeat for several (e.g. IPv4 and IPv6).
        #[arg(long = "pod-cidr", value_name = "CIDR", required = true)]
        pod_cidrs: Vec<IpCidr>,
        /// The range this cluster's hosts (`meshctl host add`) take their addresses from;
        /// `meshctl join` grants it to them in linked clusters. Repeat for several.
        #[arg(long = "host-cidr", value_name = "CIDR")]
        host_cidrs: Vec<IpCidr>,
        /// The cluster's service CIDRs: no linked cluster may claim an address in them.
        /// Repeat for several.
        #[arg(long = "service-cidr", value_name = "CIDR")]
        service_cidrs: Vec<IpCidr>,
        /// The range that stands for a pod CIDR in the mesh, when other clusters use the
        /// same pod CIDR: one per `--pod-cidr`, in the same order and of the same length.
        /// The agents then translate pod addresses to it and back (stateless, 1:1).
        /// Default: none; `meshctl join` allocates them if the pod CIDRs overlap.
        #[arg(long = "mesh-cidr", value_name = "CIDR")]
        mesh_cidrs: Vec<IpCidr>,
        /// The container image of the agent and controller (default: the manifest's).
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
        /// Only the CRDs, namespace and cluster ConfigMap: for clusters where the agent and
        /// controller are installed another way (Helm, or run outside the cluster).
        #[arg(long)]
        crds_only: bool,
        /// Make CoreDNS answer `clusterset.local` (Multi-Cluster Services): add the zone
        /// and `multicluster clusterset.local` to the Corefile's kubernetes plugin
        /// (ConfigMap kube-system/coredns) and list/watch on serviceimports to its
        /// ClusterRole. Without it, install only says what to change. Refused, before
        /// anything is installed, for CoreDNS older than 1.12.2.
        #[arg(long)]
        configure_dns: bool,
        /// CoreDNS's version, when the image tag of Deployment kube-system/coredns does not
        /// tell it (e.g. 1.12.2).
        #[arg(long, value_name = "VERSION")]
        coredns_version: Option<String>,
    },
    /// Link this cluster with the cluster of another kubeconfig context, in both directions.
    ///
    /// Checks everything first (both API servers reachable, Wiremesh installed in both,
    /// distinct names, disjoint pod CIDRs or mesh CIDRs (allocated here from the pool when
    /// the pod CIDRs overlap, and said so), no grant overlapping what the granting cluster
    /// holds: pod, service and host CIDRs, Node and API server addresses, other links; no
    /// grant wider than /8 or /32) and writes nothing if a check fails. Running it again
    /// changes nothing.
    Join {
        /// The kubeconfig context of the other cluster.
        #[arg(value_name = "OTHER_CONTEXT")]
        other_context: String,
        /// The range the other cluster's hosts may take addresses from, as this cluster
        /// accepts them. Default: none, no host of it is accepted (the range the other
        /// cluster declares is not trusted). This cluster's hosts are granted there the
        /// range it was installed with. Repeat for several.
        #[arg(long = "host-cidr", value_name = "CIDR")]
        host_cidrs: Vec<IpCidr>,
        /// Where mesh CIDRs are allocated from when the two clusters' pod CIDRs overlap
        /// (for each that has none). Repeat for several; default 100.64.0.0/10 and
        /// fd6d:6573:6800::/40.
        #[arg(long = "mesh-pool", value_name = "CIDR")]
        mesh_pools: Vec<IpCidr>,
    },
    /// Remove the link with the cluster of another kubeconfig context, on both sides.
    Unjoin {
        /// The kubeconfig context of the other cluster.
        #[arg(value_name = "OTHER_CONTEXT")]
        other_context: String,
        /// How long to wait for each PeerCluster to disappear (wiremesh-controller first
        /// removes its MeshPeers): `30s`, `2m` or seconds.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Show this cluster, its peer clusters and each node's tunnels.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
        /// Print only how to reach a pod: `CLUSTER/POD_IP` gives its address in the mesh
        /// (its cluster's mesh address when its pod CIDRs are translated).
        #[arg(long, value_name = "CLUSTER/POD_IP")]
        resolve: Option<String>,
    },
    /// Hosts outside Kubernetes: add, print a wg-quick config, remove.
    #[command(subcommand)]
    Host(HostCommand),
    /// Gateway nodes: when a cluster has any, only they hold tunnels to other clusters
    /// and its other nodes go through them; another takes over when one dies.
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Rotate the WireGuard key of a node, or of every node of this cluster, with no lost
    /// packet: each agent keeps answering its old key until every peer has a session
    /// under the new one. Waits until each node has published its new key; names the
    /// hosts running stock WireGuard whose config must be fetched again.
    RotateKeys {
        /// The node (MeshNode) to rotate.
        #[arg(
            value_name = "NODE",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        node: Option<String>,
        /// Every node of the cluster.
        #[arg(long)]
        all: bool,
        /// How long to wait for the new keys: `30s`, `2m` or seconds.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Export a Service to the linked clusters: create its ServiceExport
    /// (multicluster.x-k8s.io), as `kubectl apply` of one would.
    Export {
        /// The Service's name.
        #[arg(value_name = "SERVICE")]
        service: String,
        /// The Service's namespace.
        #[arg(short = 'n', long, value_name = "NAMESPACE", default_value = "default")]
        namespace: String,
    },
    /// Stop exporting a Service: delete its ServiceExport.
    Unexport {
        /// The Service's name.
        #[arg(value_name = "SERVICE")]
        service: String,
        /// The Service's namespace.
        #[arg(short = 'n', long, value_name = "NAMESPACE", default_value = "default")]
        namespace: String,
    },
}

/// `meshctl gateway ...`.
#[derive(Subcommand, Debug)]
pub enum GatewayCommand {
    /// Make a node a gateway (label it `node-restriction.kubernetes.io/wiremesh-gateway=true`,
    /// which a kubelet cannot set on its own Node). Refused, with nothing
    /// written, for a node without a running agent or without an endpoint.
    Add {
        /// The node's name.
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Make a node an ordinary node again (remove the label).
    Remove {
        /// The node's name.
        #[arg(value_name = "NODE")]
        node: String,
    },
}

/// `meshctl host ...`.
#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Register a host outside Kubernetes in this cluster: a MeshNode of kind Host, a
    /// ServiceAccount that can only update that MeshNode and read the mesh, and a bundle
    /// file for `wiremesh-agent host --bundle`. Checks first; writes nothing if a check fails.
    Add {
        /// The host's name (a DNS label; its MeshNode's name).
        #[arg(value_name = "NAME")]
        name: String,
        /// The host's address in the mesh (one address, e.g. 10.250.0.5/32), outside every
        /// pod CIDR.
        #[arg(long, value_name = "CIDR", value_parser = parse_host_address)]
        address: IpCidr,
        /// Where the host receives WireGuard traffic (omit for a host behind NAT).
        #[arg(long, value_name = "IP:PORT")]
        endpoint: Option<SocketAddr>,
        /// The host's WireGuard public key, for a host running stock WireGuard (then see
        /// `meshctl host config`); without it the host agent publishes the key it generates.
        #[arg(long, value_name = "KEY")]
        public_key: Option<PublicKey>,
        /// Where to write the bundle (mode 0600; an existing file is not overwritten).
        #[arg(long, value_name = "FILE", default_value = "host-bundle.json")]
        bundle: PathBuf,
        /// Make the host a relay: peers of every linked cluster that cannot reach each
        /// other directly (both behind NAT) send their traffic through it. Needs
        /// --endpoint, an address everyone reaches, and IP forwarding on the host.
        #[arg(long)]
        relay: bool,
    },
    /// Print a wg-quick config for a host that runs stock WireGuard: its Address and a
    /// Peer section for every node it can reach. Run it again when nodes come and go.
    Config {
        /// The host's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Remove a host: its MeshNode, ServiceAccount and RBAC. Every node drops its tunnel.
    Remove {
        /// The host's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// A CIDR, or a bare address meaning the single address.
fn parse_host_address(text: &str) -> Result<IpCidr, String> {
    if let Ok(ip) = text.trim().parse::<std::net::IpAddr>() {
        return Ok(IpCidr::host(ip));
    }
    text.parse::<IpCidr>()
        .map_err(|e| format!("{text:?} is not an address or CIDR: {e}"))
}

/// How `status` prints.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned tables.
    #[default]
    Table,
    /// One JSON object.
    Json,
}

/// Runs one `meshctl` command.
///
/// # Errors
/// Whatever stopped the command, with context all the way down; see [`exit_code`].
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Install {
            cluster_name,
            pod_cidrs,
            host_cidrs,
            service_cidrs,
            mesh_cidrs,
            image,
            crds_only,
            configure_dns,
            coredns_version,
        } => {
            let components = (!crds_only).then_some(image.as_deref());
            let dns = join::DnsOptions {
                configure: configure_dns,
                version: coredns_version,
            };
            crate::install::check_mesh_cidrs(&pod_cidrs, &mesh_cidrs)
                .map_err(|e| anyhow::anyhow!("--mesh-cidr: {e}"))?;
            let info = crate::install::ClusterInfo {
                name: cluster_name,
                pod_cidrs,
                host_cidrs,
                service_cidrs,
                mesh_cidrs,
            };
            join::install(&cli.kube, &info, components, &dns).await
        }
        Command::Join {
            other_context,
            host_cidrs,
            mesh_pools,
        } => {
            let pools = if mesh_pools.is_empty() {
                preflight::DEFAULT_MESH_POOLS
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect()
            } else {
                mesh_pools
            };
            join::join(&cli.kube, &other_context, &host_cidrs, &pools).await
        }
        Command::Unjoin {
            other_context,
            timeout,
        } => join::unjoin(&cli.kube, &other_context, timeout).await,
        Command::Status { output, resolve } => {
            status::status(&cli.kube, output, resolve.as_deref()).await
        }
        Command::Host(HostCommand::Add {
            name,
            address,
            endpoint,
            public_key,
            bundle,
            relay,
        }) => {
            let request = host::AddRequest {
                name,
                address,
                endpoint,
                public_key,
                relay,
            };
            host::add(&cli.kube, &request, &bundle).await
        }
        Command::Host(HostCommand::Config { name }) => host::config(&cli.kube, &name).await,
        Command::Host(HostCommand::Remove { name }) => host::remove(&cli.kube, &name).await,
        Command::Gateway(GatewayCommand::Add { node }) => gateway::add(&cli.kube, &node).await,
        Command::Gateway(GatewayCommand::Remove { node }) => {
            gateway::remove(&cli.kube, &node).await
        }
        Command::RotateKeys { node, all, timeout } => {
            let which = match node {
                Some(node) if !all => rotate::Which::Node(node),
                _ => rotate::Which::All,
            };
            rotate::rotate_keys(&cli.kube, &which, timeout).await
        }
        Command::Export { service, namespace } => {
            export::export(&cli.kube, &service, &namespace).await
        }
        Command::Unexport { service, namespace } => {
            export::unexport(&cli.kube, &service, &namespace).await
        }
    }
}

/// The exit code for an error of [`run`]: 3 when the checks of `join` or `host add` refused, 1 otherwise
/// (clap exits with 2 on a bad command line).
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<preflight::Refusals>().is_some()
        || error.downcast_ref::<host::HostRefusals>().is_some()
        || error.downcast_ref::<gateway::GatewayRefusals>().is_some()
    {
        3
    } else {
        1
    }
}

/// `30s`, `2m`, `1h` or plain seconds.
///
/// # Errors
/// When it is none of those.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{text:?} is not a duration such as 30s, 2m or 1h")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a duration such as 30s, 2m or 1h"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn export_and_unexport_take_a_service_and_a_namespace() {
        let cli = Cli::try_parse_from(["meshctl", "export", "hello", "-n", "demo"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Export { ref service, ref namespace } if service == "hello" && namespace == "demo"
        ));
        let cli = Cli::try_parse_from(["meshctl", "unexport", "hello"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Unexport { ref namespace, .. } if namespace == "default"
        ));
        assert!(Cli::try_parse_from(["meshctl", "export"]).is_err());
    }

    #[test]
    fn durations_parse_like_kubectls() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn the_command_line_is_consistent_and_flags_are_global() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "meshctl",
            "join",
            "cluster-b",
            "--context",
            "cluster-a",
            "--kubeconfig",
            "/k",
        ])
        .unwrap();
        assert_eq!(cli.kube.context.as_deref(), Some("cluster-a"));
        assert!(
            matches!(cli.command, Command::Join { ref other_context, .. } if other_context == "cluster-b")
        );
        let cli = Cli::try_parse_from(["meshctl", "install", "--cluster-name", "a"]);
        assert!(cli.is_err(), "--pod-cidr is required");
        let cli = Cli::try_parse_from([
            "meshctl",
            "install",
            "--cluster-name",
            "a",
            "--pod-cidr",
            "10.1.0.0/16",
            "--pod-cidr",
            "fd00::/48",
        ])
        .unwrap();
        assert!(
            matches!(cli.command, Command::Install { ref pod_cidrs, .. } if pod_cidrs.len() == 2)
        );
        assert!(
            Cli::try_parse_from([
                "meshctl",
                "install",
                "--cluster-name",
                "a",
                "--pod-cidr",
                "x"
            ])
            .is_err()
        );
    }
}
