//! `meshctl status`: this cluster, its peer clusters and each node's tunnels, as tables or
//! as one JSON object. [`StatusReport::new`] and [`StatusReport::render`] are pure.

use anyhow::{Context as _, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use serde::Serialize;
use wiremesh_proto::crd::{
    ClusterTunnels, MeshNode, MeshNodeKind, PeerCluster, TunnelPath, TunnelSummary, ViaGateway,
};
use wiremesh_proto::mcs::{LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, ServiceExport, ServiceImport};
use wiremesh_proto::{IpCidr, PrefixMap, Towards};

use super::common::{cluster_info, comma_list, say};
use super::kubeconfig::{self, KubeArgs, Target};
use super::{OutputFormat, table};
use crate::install::ClusterInfo;
use crate::mcs::plan::{MANAGED_BY, MANAGED_BY_LABEL};

/// Everything `status` shows. Its JSON form is what `status -o json` prints.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// This cluster.
    pub cluster: ClusterView,
    /// Its PeerClusters, by name.
    pub peer_clusters: Vec<PeerClusterView>,
    /// Its MeshNodes, by name.
    pub nodes: Vec<NodeView>,
    /// Its ServiceExports (Multi-Cluster Services), by namespace and name.
    pub exports: Vec<ExportView>,
    /// Its ServiceImports, by namespace and name.
    pub imports: Vec<ImportView>,
}

/// One ServiceExport.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportView {
    /// Its namespace.
    pub namespace: String,
    /// Its name (the exported Service's).
    pub name: String,
    /// The `Valid` condition.
    pub valid: Option<ConditionView>,
    /// The `Ready` condition.
    pub ready: Option<ConditionView>,
    /// The `Conflict` condition.
    pub conflict: Option<ConditionView>,
}

/// One ServiceImport.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImportView {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Its VIPs.
    pub ips: Vec<String>,
    /// Per exporting cluster, its endpoints here.
    pub clusters: Vec<ImportedCluster>,
}

/// The endpoints one cluster contributes to an import.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImportedCluster {
    /// The exporting cluster.
    pub cluster: String,
    /// Endpoints ready.
    pub ready: usize,
    /// All its endpoints.
    pub endpoints: usize,
}

/// This cluster's name and pod CIDRs.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Its name in the mesh.
    pub name: String,
    /// Its pod range.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// What its pod CIDRs are known by in the mesh, one per pod CIDR, when translated.
    #[serde(rename = "meshCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub mesh_cidrs: Vec<String>,
}

/// One PeerCluster.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerClusterView {
    /// The object's name.
    pub name: String,
    /// The remote cluster's name.
    pub cluster_name: String,
    /// The remote API server.
    pub api_server: String,
    /// The pod CIDRs it was allowed at join time.
    #[serde(rename = "allowedPodCIDRs")]
    pub allowed_pod_cidrs: Vec<String>,
    /// What those are known by here, one per allowed pod CIDR, when it is translated.
    #[serde(rename = "meshCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub mesh_cidrs: Vec<String>,
    /// The range its hosts were granted at join time (empty: no host is accepted).
    #[serde(rename = "allowedHostCIDRs")]
    pub allowed_host_cidrs: Vec<String>,
    /// The `Ready` condition, if the controller has set it.
    pub ready: Option<ConditionView>,
    /// The `Stale` condition.
    pub stale: Option<ConditionView>,
    /// The `Conflict` condition.
    pub conflict: Option<ConditionView>,
    /// Remote nodes mirrored as MeshPeers.
    pub node_count: i32,
    /// When the remote nodes were last read (RFC 3339).
    pub last_sync_time: Option<String>,
    /// Seconds since then.
    pub last_sync_age_seconds: Option<i64>,
    /// True while it is being deleted (waiting for the controller's finalizer).
    pub deleting: bool,
}

/// A condition as shown.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, in one CamelCase word.
    pub reason: String,
    /// Why, in words.
    pub message: String,
    /// When the status last flipped (RFC 3339).
    pub last_transition_time: String,
}

/// One MeshNode of this cluster.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    /// The node.
    pub name: String,
    /// `Node` (a Kubernetes node) or `Host` (outside Kubernetes).
    pub kind: MeshNodeKind,
    /// False for a host whose agent has not published its public key yet.
    pub has_key: bool,
    /// Its pod CIDRs.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// Its endpoints, preferred first.
    pub endpoints: Vec<String>,
    /// When its agent last wrote its status (RFC 3339).
    pub last_update_time: Option<String>,
    /// Whether it is a gateway of the cluster.
    pub gateway: bool,
    /// Its tunnels counted, per peer cluster and per gateway (`status.tunnels`); absent
    /// for an agent from before it, which listed every tunnel in `tunnels`.
    pub counts: Option<TunnelSummary>,
    /// The tunnels its agent names, by peer name: those not connected and those heard
    /// from an address the peer does not publish (every tunnel, for an older agent).
    pub tunnels: Vec<TunnelView>,
    /// Remote peers it reaches through a gateway (no tunnel of their own), by name: an
    /// older agent's list (a newer one counts them in `counts.viaGateway`).
    pub via_gateway: Vec<ViaGateway>,
}

/// One tunnel of a node.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelView {
    /// The MeshPeer it goes to.
    pub name: String,
    /// The peer's endpoint in use.
    pub endpoint: Option<String>,
    /// When the current session's handshake completed (RFC 3339).
    pub latest_handshake_time: Option<String>,
    /// Seconds since then.
    pub latest_handshake_age_seconds: Option<i64>,
    /// Bytes received.
    pub rx_bytes: i64,
    /// Bytes sent.
    pub tx_bytes: i64,
    /// `Direct`, `Gateway` (through it now), `Standby` (a gateway ready to take over),
    /// `Forwarding` (on a gateway: a node of its cluster it forwards for), `Relay` (a relay)
    /// or `Relayed` (not reached directly: through the relay in `via`).
    pub path: TunnelPath,
    /// The relay a `Relayed` peer goes through.
    pub via: Option<String>,
}

impl StatusReport {
    /// The report for `info`, `peers` and `nodes`, with ages relative to `now`.
    pub fn new(
        info: &ClusterInfo,
        peers: &[PeerCluster],
        nodes: &[MeshNode],
        now: Timestamp,
    ) -> Self {
        let age = |t: &Time| now.as_second() - t.0.as_second();
        let mut peer_clusters: Vec<PeerClusterView> = peers
            .iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                PeerClusterView {
                    name: p.name_any(),
                    cluster_name: p.spec.cluster_name.clone(),
                    api_server: p.spec.api_server.clone(),
                    allowed_pod_cidrs: p.spec.allowed_pod_cidrs.clone(),
                    mesh_cidrs: p.spec.mesh_cidrs.clone(),
                    allowed_host_cidrs: p.spec.allowed_host_cidrs.clone(),
                    ready: condition(&status.conditions, "Ready"),
                    stale: condition(&status.conditions, "Stale"),
                    conflict: condition(&status.conditions, "Conflict"),
                    node_count: status.node_count,
                    last_sync_time: status.last_sync_time.as_ref().map(|t| t.0.to_string()),
                    last_sync_age_seconds: status.last_sync_time.as_ref().map(age),
                    deleting: p.metadata.deletion_timestamp.is_some(),
                }
            })
            .collect();
        peer_clusters.sort_by(|a, b| a.name.cmp(&b.name));
        let mut nodes: Vec<NodeView> = nodes
            .iter()
            .map(|n| {
                let status = n.status.clone().unwrap_or_default();
                let mut tunnels: Vec<TunnelView> = status
                    .peers
                    .iter()
                    .map(|t| TunnelView {
                        name: t.name.clone(),
                        endpoint: t.endpoint.clone(),
                        latest_handshake_time: t
                            .latest_handshake_time
                            .as_ref()
                            .map(|t| t.0.to_string()),
                        latest_handshake_age_seconds: t.latest_handshake_time.as_ref().map(age),
                        rx_bytes: t.rx_bytes,
                        tx_bytes: t.tx_bytes,
                        path: t.path,
                        via: t.via.clone(),
                    })
                    .collect();
                tunnels.sort_by(|a, b| a.name.cmp(&b.name));
                NodeView {
                    name: n.name_any(),
                    kind: n.spec.kind,
                    has_key: n.spec.has_key(),
                    pod_cidrs: n.spec.pod_cidrs.clone(),
                    endpoints: n.spec.endpoints.clone(),
                    last_update_time: status.last_update_time.as_ref().map(|t| t.0.to_string()),
                    gateway: n.spec.is_gateway(),
                    counts: status.tunnels.clone(),
                    tunnels,
                    via_gateway: status.via_gateway.clone(),
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            cluster: ClusterView {
                name: info.name.clone(),
                pod_cidrs: info.pod_cidrs.iter().map(ToString::to_string).collect(),
                mesh_cidrs: info.mesh_cidrs.iter().map(ToString::to_string).collect(),
            },
            peer_clusters,
            nodes,
            exports: Vec::new(),
            imports: Vec::new(),
        }
    }

    /// Adds the Multi-Cluster Services: `exports`, `imports` and the imported
    /// EndpointSlices `slices` (labelled with their source cluster).
    pub fn with_services(
        mut self,
        exports: &[ServiceExport],
        imports: &[ServiceImport],
        slices: &[EndpointSlice],
    ) -> Self {
        let names = |m: &ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        self.exports = exports
            .iter()
            .map(|e| {
                let (namespace, name) = names(&e.metadata);
                let conditions = e
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                ExportView {
                    namespace,
                    name,
                    valid: condition(&conditions, "Valid"),
                    ready: condition(&conditions, "Ready"),
                    conflict: condition(&conditions, "Conflict"),
                }
            })
            .collect();
        self.exports
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.imports = imports
            .iter()
            .map(|i| {
                let (namespace, name) = names(&i.metadata);
                let spec = i.spec.clone().unwrap_or_default();
                let mut clusters: Vec<ImportedCluster> = i
                    .status
                    .as_ref()
                    .and_then(|s| s.clusters.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| {
                        let mut ready = 0;
                        let mut endpoints = 0;
                        for slice in slices.iter().filter(|s| {
                            s.metadata.namespace.as_deref() == Some(namespace.as_str())
                                && s.labels().get(LABEL_SERVICE_NAME) == Some(&name)
                                && s.labels().get(LABEL_SOURCE_CLUSTER) == Some(&c.cluster)
                        }) {
                            for e in &slice.endpoints {
                                endpoints += 1;
                                if e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) {
                                    ready += 1;
                                }
                            }
                        }
                        ImportedCluster {
                            cluster: c.cluster,
                            ready,
                            endpoints,
                        }
                    })
                    .collect();
                clusters.sort_by(|a, b| a.cluster.cmp(&b.cluster));
                ImportView {
                    namespace,
                    name,
                    type_: format!("{:?}", spec.type_),
                    ips: spec.ips.unwrap_or_default(),
                    clusters,
                }
            })
            .collect();
        self.imports
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self
    }

    /// The Multi-Cluster Services tables (empty when there is none).
    fn render_services(&self) -> String {
        let mut out = String::new();
        if !self.exports.is_empty() {
            let rows: Vec<Vec<String>> = self
                .exports
                .iter()
                .map(|e| {
                    let reason = |c: Option<&ConditionView>| {
                        c.map_or_else(
                            || "-".to_owned(),
                            |c| format!("{} ({})", c.status, c.reason),
                        )
                    };
                    vec![
                        format!("{}/{}", e.namespace, e.name),
                        reason(e.valid.as_ref()),
                        reason(e.ready.as_ref()),
                        reason(e.conflict.as_ref()),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&table::render(
                &["EXPORT", "VALID", "READY", "CONFLICT"],
                &rows,
            ));
            for e in &self.exports {
                if let Some(c) = e.conflict.as_ref().filter(|c| c.status == "True") {
                    out.push_str(&format!(
                        "  {}/{} Conflict: {}\n",
                        e.namespace, e.name, c.message
                    ));
                }
            }
        }
        if !self.imports.is_empty() {
            let mut rows = Vec::new();
            for i in &self.imports {
                let first = vec![
                    format!("{}/{}", i.namespace, i.name),
                    i.type_.clone(),
                    if i.ips.is_empty() {
                        "-".to_owned()
                    } else {
                        i.ips.join(",")
                    },
                ];
                if i.clusters.is_empty() {
                    rows.push([first.clone(), vec!["-".to_owned(), "-".to_owned()]].concat());
                }
                for (n, c) in i.clusters.iter().enumerate() {
                    let lead = if n == 0 {
                        first.clone()
                    } else {
                        vec![String::new(), String::new(), String::new()]
                    };
                    rows.push(
                        [
                            lead,
                            vec![c.cluster.clone(), format!("{}/{}", c.ready, c.endpoints)],
                        ]
                        .concat(),
                    );
                }
            }
            out.push('\n');
            out.push_str(&table::render(
                &["IMPORT", "TYPE", "IPS", "CLUSTER", "READY"],
                &rows,
            ));
        }
        out
    }

    /// How to reach `CLUSTER/POD_IP` from here: its address in the mesh (mapped into the
    /// cluster's mesh CIDR when it is translated), with why.
    ///
    /// # Errors
    /// A query that is not `CLUSTER/IP`, an unknown cluster, or an address outside the
    /// cluster's pod CIDRs.
    pub fn resolve(&self, query: &str) -> Result<String, String> {
        let (cluster, ip) = query
            .split_once('/')
            .ok_or_else(|| format!("{query:?}: give CLUSTER/POD_IP, e.g. cluster-b/10.244.1.7"))?;
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{query:?}: {ip:?} is not an IP address"))?;
        let (pods, mesh) = if cluster == self.cluster.name {
            (&self.cluster.pod_cidrs, &self.cluster.mesh_cidrs)
        } else {
            let peer = self
                .peer_clusters
                .iter()
                .find(|p| p.cluster_name == cluster)
                .ok_or_else(|| format!("{cluster} is neither this cluster nor a linked one"))?;
            (&peer.allowed_pod_cidrs, &peer.mesh_cidrs)
        };
        let parsed = |texts: &[String]| -> Vec<IpCidr> {
            texts.iter().filter_map(|c| c.parse().ok()).collect()
        };
        let (pods, mesh) = (parsed(pods), parsed(mesh));
        let Some(at) = pods.iter().position(|c| c.contains(ip)) else {
            return Err(format!(
                "{ip} is outside {cluster}'s pod CIDRs ({})",
                comma_list(&pods)
            ));
        };
        let (Some(pod), Some(mesh)) = (pods.get(at), mesh.get(at)) else {
            return Ok(format!(
                "{query} → {ip} ({cluster}'s pod CIDRs are not translated)"
            ));
        };
        let mapped = PrefixMap::new(*pod, *mesh)
            .map_err(|e| e.to_string())?
            .map(ip, Towards::Mesh)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{ip} is outside {pod}"))?;
        let whose = if cluster == self.cluster.name {
            "from other clusters"
        } else {
            "from here"
        };
        Ok(format!(
            "{query} → {mapped} ({whose}: {cluster}'s pod CIDR {pod} is translated to mesh CIDR {mesh})"
        ))
    }

    /// The report as aligned tables: the cluster, the peer clusters (then the reasons of
    /// any that is not Ready, Stale or in Conflict), and one row per node and tunnel.
    pub fn render(&self) -> String {
        let mut out = table::render(
            &["CLUSTER", "POD CIDRS"],
            &[vec![
                self.cluster.name.clone(),
                translated(&self.cluster.pod_cidrs, &self.cluster.mesh_cidrs),
            ]],
        );
        out.push('\n');
        if self.peer_clusters.is_empty() {
            out.push_str("no peer clusters (link one with `meshctl join OTHER_CONTEXT`)\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .peer_clusters
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        cell(p.ready.as_ref()),
                        cell(p.stale.as_ref()),
                        cell(p.conflict.as_ref()),
                        p.node_count.to_string(),
                        p.last_sync_age_seconds
                            .map_or_else(|| "never".to_owned(), table::ago),
                        translated(&p.allowed_pod_cidrs, &p.mesh_cidrs),
                        if p.allowed_host_cidrs.is_empty() {
                            "none".to_owned()
                        } else {
                            p.allowed_host_cidrs.join(",")
                        },
                        p.api_server.clone(),
                    ]
                })
                .collect();
            out.push_str(&table::render(
                &[
                    "PEER CLUSTER",
                    "READY",
                    "STALE",
                    "CONFLICT",
                    "NODES",
                    "LAST SYNC",
                    "POD CIDRS",
                    "HOST CIDRS",
                    "API SERVER",
                ],
                &rows,
            ));
            for p in &self.peer_clusters {
                if p.deleting {
                    out.push_str(&format!(
                        "  {}: being deleted (waiting for wiremesh-controller)\n",
                        p.name
                    ));
                }
                let abnormal = [
                    ("Ready", p.ready.as_ref(), "True"),
                    ("Stale", p.stale.as_ref(), "False"),
                    ("Conflict", p.conflict.as_ref(), "False"),
                ];
                for (kind, c, normal) in abnormal {
                    if let Some(c) = c.filter(|c| c.status != normal) {
                        out.push_str(&format!(
                            "  {} {kind}={}: {}: {}\n",
                            p.name, c.status, c.reason, c.message
                        ));
                    }
                }
            }
        }
        out.push('\n');
        if self.nodes.is_empty() {
            out.push_str("no MeshNodes (no agent has registered yet)\n");
            out.push_str(&self.render_services());
            return out;
        }
        let mut rows = Vec::new();
        for n in &self.nodes {
            let name = match (n.kind, n.has_key) {
                (MeshNodeKind::Node, _) if n.gateway => format!("{} (gateway)", n.name),
                (MeshNodeKind::Node, _) => n.name.clone(),
                (MeshNodeKind::Host, true) => format!("{} (host)", n.name),
                (MeshNodeKind::Host, false) => format!("{} (host, no key yet)", n.name),
            };
            let first = vec![name, n.pod_cidrs.join(",")];
            let counted = n.counts.as_ref();
            let clusters = counted.into_iter().flat_map(|c| &c.clusters).map(|c| {
                let cluster = if c.cluster.is_empty() {
                    format!("{} (this cluster)", self.cluster.name)
                } else {
                    c.cluster.clone()
                };
                vec![
                    format!("{cluster}: {}", plural(c.tunnels, "tunnel")),
                    paths(c),
                    "-".to_owned(),
                    format!("{}/{} up", c.connected, c.tunnels),
                ]
            });
            let gateways = counted.into_iter().flat_map(|c| &c.via_gateway).map(|g| {
                let gateway = if g.gateway.is_empty() {
                    "via gateway (none up)".to_owned()
                } else {
                    format!("via gateway {}", g.gateway)
                };
                vec![plural(g.peers, "peer"), gateway]
            });
            let counts: Vec<Vec<String>> = clusters.chain(gateways).collect();
            if counts.is_empty() && n.tunnels.is_empty() && n.via_gateway.is_empty() {
                rows.push([first.clone(), vec!["-".to_owned()]].concat());
            }
            let vias = n.via_gateway.iter().map(|v| {
                let gateway = if v.gateway.is_empty() {
                    "via gateway (none up)".to_owned()
                } else {
                    format!("via gateway {}", v.gateway)
                };
                vec![v.name.clone(), gateway]
            });
            let tunnels = n.tunnels.iter().map(|t| {
                let path = match t.path {
                    TunnelPath::Direct => "direct".to_owned(),
                    TunnelPath::Gateway => "gateway (active)".to_owned(),
                    TunnelPath::Standby => "gateway (standby)".to_owned(),
                    TunnelPath::Forwarding => "forwarding".to_owned(),
                    TunnelPath::Relay => "relay".to_owned(),
                    TunnelPath::Relayed => {
                        format!("relayed via {}", t.via.as_deref().unwrap_or("?"))
                    }
                };
                vec![
                    t.name.clone(),
                    path,
                    t.endpoint.clone().unwrap_or_else(|| "-".to_owned()),
                    t.latest_handshake_age_seconds
                        .map_or_else(|| "never".to_owned(), table::ago),
                    table::bytes(t.rx_bytes),
                    table::bytes(t.tx_bytes),
                ]
            });
            for (i, cells) in counts.into_iter().chain(tunnels).chain(vias).enumerate() {
                let lead = if i == 0 {
                    first.clone()
                } else {
                    vec![String::new(), String::new()]
                };
                rows.push([lead, cells].concat());
            }
        }
        out.push_str(&table::render(
            &[
                "NODE",
                "POD CIDRS",
                "PEER",
                "PATH",
                "ENDPOINT",
                "HANDSHAKE",
                "RX",
                "TX",
            ],
            &rows,
        ));
        out.push_str(&self.render_services());
        out
    }
}

/// `3 tunnels`, `1 peer`.
fn plural(n: i32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The paths a cluster's tunnels take, counted: `2 direct, 1 gateway (standby)`.
fn paths(c: &ClusterTunnels) -> String {
    let parts: Vec<String> = [
        (c.direct, "direct"),
        (c.gateway, "gateway (active)"),
        (c.standby, "gateway (standby)"),
        (c.forwarding, "forwarding"),
        (c.relay, "relay"),
        (c.relayed, "relayed"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, path)| format!("{n} {path}"))
    .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// `meshctl status`.
pub(crate) async fn status(
    args: &KubeArgs,
    output: OutputFormat,
    resolve: Option<&str>,
) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let report = gather(&target).await?;
    if let Some(query) = resolve {
        say(report.resolve(query).map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    match output {
        OutputFormat::Table => say(report.render().trim_end()),
        OutputFormat::Json => say(serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// Pod CIDRs, each with its mesh CIDR when translated (`10.244.0.0/16→100.64.0.0/16`).
fn translated(pods: &[String], mesh: &[String]) -> String {
    if mesh.is_empty() {
        return pods.join(",");
    }
    let pairs: Vec<String> = pods
        .iter()
        .zip(mesh)
        .map(|(p, m)| format!("{p}→{m}"))
        .collect();
    pairs.join(",")
}

/// Reads what the report needs from `target`'s cluster.
///
/// # Errors
/// When the cluster cannot be read or Wiremesh is not installed in it.
pub async fn gather(target: &Target) -> Result<StatusReport> {
    let info = cluster_info(target).await?;
    let not_installed = || {
        format!(
            "Wiremesh is not installed in context {} (listing its custom resources failed)",
            target.context
        )
    };
    let peers = Api::<PeerCluster>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .with_context(not_installed)?;
    let nodes = Api::<MeshNode>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .with_context(not_installed)?;
    // Multi-Cluster Services: absent CRDs (an older install) show as none.
    let exports = Api::<ServiceExport>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let imports = Api::<ServiceImport>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let slices = Api::<EndpointSlice>::all(target.client.clone())
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    Ok(
        StatusReport::new(&info, &peers.items, &nodes.items, Timestamp::now())
            .with_services(&exports, &imports, &slices),
    )
}

fn condition(conditions: &[Condition], kind: &str) -> Option<ConditionView> {
    conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| ConditionView {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_time: c.last_transition_time.0.to_string(),
        })
}

fn cell(condition: Option<&ConditionView>) -> String {
    condition.map_or_else(|| "-".to_owned(), |c| c.status.clone())
}

#[cfg(test)]
mod tests {
    use wiremesh_proto::crd::{MeshNodeStatus, PeerClusterSpec, PeerClusterStatus, TunnelStatus};

    use super::*;

    #[test]
    fn tables_show_peers_reasons_and_tunnels() {
        let report = report();
        let text = report.render();
        let expected = "\
CLUSTER     POD CIDRS
cluster-a   10.1.0.0/16

PEER CLUSTER   READY   STALE   CONFLICT   NODES   LAST SYNC   POD CIDRS     HOST CIDRS   API SERVER
cluster-b      True    False   False      2       3s ago      10.2.0.0/16   none         https://b.example:6443
cluster-c      False   True    True       1       5m0s ago    10.3.0.0/16   none         https://c.example:6443
  cluster-c Ready=False: ApiServerUnreachable: connection refused
  cluster-c Stale=True: ApiServerUnreachable: keeping 1 peers
  cluster-c Conflict=True: CidrOutOfRange: node c9 claims 10.1.0.0/24

NODE   POD CIDRS     PEER           PATH                ENDPOINT           HANDSHAKE   RX        TX
a1     10.1.1.0/24   cluster-b.b1   direct              198.18.0.3:51820   12s ago     1.5 KiB   300 B
                     cluster-b.b2   gateway (standby)   -                  never       0 B       0 B
                     cluster-b.b3   via gateway b1
a2     10.1.2.0/24   -
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn exports_and_imports_show_conditions_clusters_and_endpoint_counts() {
        let export: ServiceExport = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "hello", "namespace": "demo"},
        }))
        .unwrap();
        let mut export = export;
        export.status = Some(wiremesh_proto::mcs::ServiceExportStatus {
            conditions: Some(vec![
                cond("Valid", "True", "Valid", "ok"),
                cond("Ready", "True", "Exported", "ok"),
                cond(
                    "Conflict",
                    "True",
                    "PortConflict",
                    "cluster-c has port 9090",
                ),
            ]),
        });
        let import: ServiceImport = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "hello", "namespace": "demo"},
            "spec": {"ports": [{"port": 8080}], "type": "ClusterSetIP", "ips": ["10.96.0.9"]},
            "status": {"clusters": [{"cluster": "cluster-c"}, {"cluster": "cluster-b"}]},
        }))
        .unwrap();
        let slice = |cluster: &str, ready: &[bool]| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("d-{cluster}"), "namespace": "demo", "labels": {
                    (LABEL_SERVICE_NAME): "hello", (LABEL_SOURCE_CLUSTER): cluster}},
                "addressType": "IPv4",
                "endpoints": ready.iter().enumerate().map(|(i, r)| serde_json::json!({
                    "addresses": [format!("10.2.0.{i}")], "conditions": {"ready": r}})).collect::<Vec<_>>(),
            }))
            .unwrap()
        };
        let report = StatusReport::new(&ClusterInfo::default(), &[], &[], now()).with_services(
            &[export],
            &[import],
            &[
                slice("cluster-b", &[true, false]),
                slice("cluster-c", &[true]),
            ],
        );
        let text = report.render();
        for line in [
            "EXPORT       VALID          READY             CONFLICT",
            "demo/hello   True (Valid)   True (Exported)   True (PortConflict)",
            "  demo/hello Conflict: cluster-c has port 9090",
            "IMPORT       TYPE           IPS         CLUSTER     READY",
            "demo/hello   ClusterSetIP   10.96.0.9   cluster-b   1/2",
            "                                        cluster-c   1/1",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["imports"][0]["clusters"][0]["endpoints"], 2);
        assert_eq!(json["exports"][0]["conflict"]["reason"], "PortConflict");
    }

    #[test]
    fn json_has_the_same_content() {
        let json = serde_json::to_value(report()).unwrap();
        assert_eq!(json["cluster"]["name"], "cluster-a");
        assert_eq!(json["cluster"]["podCIDRs"][0], "10.1.0.0/16");
        assert_eq!(json["peerClusters"][0]["name"], "cluster-b");
        assert_eq!(
            json["peerClusters"][0]["allowedHostCIDRs"],
            serde_json::json!([])
        );
        assert_eq!(json["peerClusters"][0]["ready"]["status"], "True");
        assert_eq!(
            json["peerClusters"][1]["conflict"]["reason"],
            "CidrOutOfRange"
        );
        assert_eq!(json["peerClusters"][0]["lastSyncAgeSeconds"], 3);
        assert_eq!(
            json["nodes"][0]["tunnels"][0]["latestHandshakeAgeSeconds"],
            12
        );
        assert_eq!(json["nodes"][0]["tunnels"][0]["rxBytes"], 1536);
        assert_eq!(json["nodes"][0]["tunnels"][1]["path"], "Standby");
        assert_eq!(json["nodes"][0]["viaGateway"][0]["gateway"], "b1");
        assert_eq!(json["nodes"][1]["tunnels"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn counted_tunnels_are_one_row_per_cluster_and_gateway_then_the_named_ones() {
        let info = ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            ..ClusterInfo::default()
        };
        let mut a1 = node(
            "a1",
            "10.1.1.0/24",
            vec![TunnelStatus {
                name: "cluster-b.b7".into(),
                endpoint: Some("198.18.0.7:51820".into()),
                path: TunnelPath::Direct,
                ..TunnelStatus::default()
            }],
        );
        if let Some(status) = &mut a1.status {
            status.tunnels = Some(TunnelSummary {
                total: 502,
                connected: 501,
                clusters: vec![
                    ClusterTunnels {
                        cluster: String::new(),
                        tunnels: 1,
                        connected: 1,
                        relay: 1,
                        ..ClusterTunnels::default()
                    },
                    ClusterTunnels {
                        cluster: "cluster-b".into(),
                        tunnels: 501,
                        connected: 500,
                        direct: 499,
                        gateway: 1,
                        standby: 1,
                        ..ClusterTunnels::default()
                    },
                ],
                via_gateway: vec![wiremesh_proto::crd::GatewayPeers {
                    gateway: "cluster-c.c1".into(),
                    peers: 40,
                }],
            });
        }
        let report = StatusReport::new(&info, &[], &[a1], now());
        let text = report.render();
        let rows: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("NODE"))
            .collect();
        assert_eq!(rows.len(), 5, "{text}");
        for (row, cells) in rows.iter().skip(1).zip([
            &[
                "a1",
                "cluster-a (this cluster): 1 tunnel",
                "1 relay",
                "1/1 up",
            ][..],
            &[
                "cluster-b: 501 tunnels",
                "499 direct, 1 gateway (active), 1 gateway (standby)",
                "500/501 up",
            ],
            &["40 peers", "via gateway cluster-c.c1"],
            &["cluster-b.b7", "direct", "198.18.0.7:51820", "never"],
        ]) {
            for cell in cells {
                assert!(row.contains(cell), "{cell:?} not in {row:?}\n{text}");
            }
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["nodes"][0]["counts"]["clusters"][1]["direct"], 499);
        assert_eq!(json["nodes"][0]["counts"]["viaGateway"][0]["peers"], 40);
        assert_eq!(json["nodes"][0]["tunnels"][0]["name"], "cluster-b.b7");
    }

    #[test]
    fn hosts_are_marked_and_a_host_without_key_says_so() {
        let info = ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            ..ClusterInfo::default()
        };
        let mut db1 = node("db1", "10.250.1.1/32", vec![]);
        db1.spec.kind = MeshNodeKind::Host;
        let mut db2 = node("db2", "10.250.2.1/32", vec![]);
        db2.spec.kind = MeshNodeKind::Host;
        db2.spec.public_key = String::new();
        let report = StatusReport::new(&info, &[], &[db1, db2], now());
        let text = report.render();
        assert!(text.contains("db1 (host)  "), "{text}");
        assert!(text.contains("db2 (host, no key yet)"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["nodes"][1]["kind"], "Host");
        assert_eq!(json["nodes"][1]["hasKey"], false);
    }

    #[test]
    fn an_empty_cluster_says_what_to_do() {
        let info = ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            ..ClusterInfo::default()
        };
        let text = StatusReport::new(&info, &[], &[], now()).render();
        assert!(text.contains("meshctl join OTHER_CONTEXT"), "{text}");
        assert!(text.contains("no MeshNodes"), "{text}");
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn before(seconds: i64) -> Time {
        Time(Timestamp::from_second(now().as_second() - seconds).unwrap())
    }

    fn cond(kind: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: before(60),
            observed_generation: Some(1),
        }
    }

    #[test]
    fn resolve_gives_a_translated_clusters_mesh_address() {
        let info = ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            mesh_cidrs: vec!["100.64.0.0/16".parse().unwrap()],
            ..ClusterInfo::default()
        };
        let mut b = peer("cluster-b", "10.244.0.0/16", PeerClusterStatus::default());
        b.spec.mesh_cidrs = vec!["100.65.0.0/16".into()];
        let c = peer("cluster-c", "10.3.0.0/16", PeerClusterStatus::default());
        let report = StatusReport::new(&info, &[b, c], &[], now());
        let text = report.resolve("cluster-b/10.244.1.7").unwrap();
        assert!(
            text.starts_with("cluster-b/10.244.1.7 → 100.65.1.7 (from here"),
            "{text}"
        );
        let text = report.resolve("cluster-a/10.244.1.7").unwrap();
        assert!(text.contains("→ 100.64.1.7 (from other clusters"), "{text}");
        let text = report.resolve("cluster-c/10.3.0.9").unwrap();
        assert!(
            text.contains("→ 10.3.0.9 (cluster-c's pod CIDRs are not translated)"),
            "{text}"
        );
        for (bad, says) in [
            ("cluster-b", "CLUSTER/POD_IP"),
            (
                "cluster-z/10.244.1.7",
                "neither this cluster nor a linked one",
            ),
            ("cluster-b/10.9.1.7", "outside cluster-b's pod CIDRs"),
            ("cluster-b/nope", "not an IP address"),
        ] {
            let e = report.resolve(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let rendered = report.render();
        assert!(
            rendered.contains("10.244.0.0/16→100.65.0.0/16"),
            "{rendered}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["cluster"]["meshCIDRs"][0], "100.64.0.0/16");
    }

    fn peer(name: &str, cidr: &str, status: PeerClusterStatus) -> PeerCluster {
        let mut p = PeerCluster::new(
            name,
            PeerClusterSpec {
                cluster_name: name.into(),
                api_server: format!("https://{}.example:6443", &name[8..]),
                ca_data: None,
                credentials_secret: format!("peer-{name}"),
                allowed_pod_cidrs: vec![cidr.into()],
                mesh_cidrs: Vec::new(),
                allowed_host_cidrs: Vec::new(),
            },
        );
        p.status = Some(status);
        p
    }

    fn node(name: &str, cidr: &str, tunnels: Vec<TunnelStatus>) -> MeshNode {
        let mut n = crate::testing::mesh_node(name, 1, None, &[cidr]);
        n.status = Some(MeshNodeStatus {
            peers: tunnels,
            ..MeshNodeStatus::default()
        });
        n
    }

    fn report() -> StatusReport {
        let info = ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            ..ClusterInfo::default()
        };
        let peers = [
            peer(
                "cluster-c",
                "10.3.0.0/16",
                PeerClusterStatus {
                    conditions: vec![
                        cond(
                            "Ready",
                            "False",
                            "ApiServerUnreachable",
                            "connection refused",
                        ),
                        cond("Stale", "True", "ApiServerUnreachable", "keeping 1 peers"),
                        cond(
                            "Conflict",
                            "True",
                            "CidrOutOfRange",
                            "node c9 claims 10.1.0.0/24",
                        ),
                    ],
                    node_count: 1,
                    last_sync_time: Some(before(300)),
                    observed_generation: Some(1),
                    unreachable_nodes: Vec::new(),
                },
            ),
            peer(
                "cluster-b",
                "10.2.0.0/16",
                PeerClusterStatus {
                    conditions: vec![
                        cond("Ready", "True", "Synced", "2 nodes"),
                        cond("Stale", "False", "Synced", ""),
                        cond("Conflict", "False", "NoConflict", ""),
                    ],
                    node_count: 2,
                    last_sync_time: Some(before(3)),
                    observed_generation: Some(1),
                    unreachable_nodes: Vec::new(),
                },
            ),
        ];
        let nodes = [
            node("a2", "10.1.2.0/24", vec![]),
            node(
                "a1",
                "10.1.1.0/24",
                vec![
                    TunnelStatus {
                        name: "cluster-b.b2".into(),
                        path: TunnelPath::Standby,
                        ..TunnelStatus::default()
                    },
                    TunnelStatus {
                        name: "cluster-b.b1".into(),
                        endpoint: Some("198.18.0.3:51820".into()),
                        observed_endpoint: None,
                        latest_handshake_time: Some(before(12)),
                        rx_bytes: 1536,
                        tx_bytes: 300,
                        path: TunnelPath::Direct,
                        via: None,
                    },
                ],
            ),
        ];
        let mut nodes = nodes;
        if let Some(status) = nodes[1].status.as_mut() {
            status.via_gateway = vec![ViaGateway {
                name: "cluster-b.b3".into(),
                gateway: "b1".into(),
            }];
        }
        StatusReport::new(&info, &peers, &nodes, now())
    }
}
