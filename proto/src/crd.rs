//! The Wiremesh API: group `wiremesh.io`, version `v1alpha1`.
//!
//! - [`MeshNode`]: one per node (or bare-metal host) that takes part, written by its agent.
//! - [`PeerCluster`]: one per linked cluster, written by `meshctl join`.
//! - [`MeshPeer`]: the remote nodes as seen here, written only by the controller.
//!
//! The API server validates these objects itself (patterns and CEL rules in the schema),
//! so a malformed key or CIDR never reaches a controller or an agent.

// The KubeSchema derive re-declares each type inside a private module, which the
// unreachable_pub lint mistakes for our own items; and the `kube(...)` attribute repeats
// `printcolumn(name = ...)`, which clippy takes for duplicated attributes.
#![allow(unreachable_pub, clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Annotation on a MeshNode asking its agent to rotate its WireGuard key (`meshctl
/// rotate-keys` sets it to a request id). The agent rotates once per new value, keeping
/// its old key a while so that no packet is lost; a remote cluster's annotations are
/// never read (only the agent's own MeshNode in its own cluster).
pub const ROTATE_KEYS_ANNOTATION: &str = "wiremesh.io/rotate-keys";

/// The API group.
pub const GROUP: &str = "wiremesh.io";
/// The API version.
pub const VERSION: &str = "v1alpha1";
/// Namespace of Wiremesh's own objects (Secrets, ServiceAccounts, Lease, config).
pub const SYSTEM_NAMESPACE: &str = "wiremesh-system";
/// ConfigMap in [`SYSTEM_NAMESPACE`] that names this cluster and its pod CIDRs.
pub const CLUSTER_CONFIGMAP: &str = "wiremesh-cluster";
/// Label on the ServiceAccount, RBAC objects and MeshNode of a host: the host's name.
pub const HOST_LABEL: &str = "wiremesh.io/host";
/// Label on a Node: `true` makes it a gateway of its cluster. When any node of a cluster
/// is a gateway, only the gateways hold tunnels to other clusters; the other nodes reach
/// them through a gateway, and another gateway takes over when one dies.
///
/// Under `node-restriction.kubernetes.io/` because Kubernetes' NodeRestriction admission
/// plugin forbids a kubelet to set labels with that prefix on its own Node: a compromised
/// node cannot make itself a gateway and draw its cluster's cross-cluster traffic.
pub const GATEWAY_LABEL: &str = "node-restriction.kubernetes.io/wiremesh-gateway";
/// The gateway label before [`GATEWAY_LABEL`]; a kubelet could set it on its own Node.
/// Ignored, with a warning naming the Node, so that an upgrade does not go unnoticed.
pub const LEGACY_GATEWAY_LABEL: &str = "wiremesh.io/gateway";
/// Label on MeshPeers and Secrets: the peer cluster they belong to.
pub const PEER_CLUSTER_LABEL: &str = "wiremesh.io/peer-cluster";
/// Finalizer the controller puts on PeerClusters so their MeshPeers go with them.
pub const PEER_CLUSTER_FINALIZER: &str = "wiremesh.io/mesh-peers";
/// Most names in a MeshNode's `status.unreachable` and a PeerCluster's
/// `status.unreachableNodes`: bounded so a whole dead cluster costs a bounded write; past
/// it (sorted by name) the endpoints are withdrawn only when their own cluster says so.
pub const MAX_UNREACHABLE: usize = 256;

/// Most entries in a MeshNode's `status.tunnels.clusters` and `status.tunnels.viaGateway`:
/// Cilium ClusterMesh's limit of 255 clusters; past it (sorted by name) a cluster's tunnels
/// are counted only in the totals.
pub const MAX_STATUS_CLUSTERS: usize = 255;
/// Most tunnels a MeshNode's `status.peers` lists: those not connected and those whose
/// peer was heard from an address it does not publish (what relay planning and NAT
/// traversal need), at most 1,024 so the object stays far below etcd's 1.5 MiB limit.
pub const MAX_STATUS_PEERS: usize = 1024;
/// Of [`MAX_STATUS_PEERS`], most tunnels listed only because they are not connected:
/// bounded like `unreachable`, so a dead cluster costs a bounded write.
pub const MAX_STATUS_DOWN: usize = MAX_UNREACHABLE;

/// A WireGuard public key: 32 bytes in base64 (the last character before `=` encodes
/// only 4 bits, hence its restricted alphabet).
const KEY_PATTERN: &str = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$";
/// [`KEY_PATTERN`] or empty: a host registered before its agent generated its key.
const KEY_OR_EMPTY_PATTERN: &str = "^([A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=)?$";
/// `198.18.0.1:51820` or `[fd00::1]:51820`.
const ENDPOINT_PATTERN: &str = r"^(([0-9]{1,3}\.){3}[0-9]{1,3}|\[[0-9a-fA-F:.]+\]):[0-9]{1,5}$";

/// What takes part in the mesh.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum MeshNodeKind {
    /// A Kubernetes node running the agent as a DaemonSet pod.
    #[default]
    Node,
    /// A machine outside Kubernetes.
    Host,
}

/// One node (or host) of this cluster that takes part in the mesh. Written by its agent;
/// owned by its `Node`, so it goes away with it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "MeshNode",
    status = "MeshNodeStatus",
    shortname = "mn",
    category = "wiremesh",
    derive = "PartialEq",
    printcolumn(name = "Kind", type_ = "string", json_path = ".spec.kind"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoints[0]"),
    printcolumn(name = "PodCIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(
        name = "Tunnels",
        type_ = "integer",
        json_path = ".status.tunnels.total"
    ),
    printcolumn(
        name = "Connected",
        type_ = "integer",
        json_path = ".status.tunnels.connected"
    ),
    printcolumn(
        name = "PublicKey",
        type_ = "string",
        json_path = ".spec.publicKey",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeSpec {
    /// The node's WireGuard public key (base64). The private key never leaves the node.
    /// Empty only for a host whose agent has not published its key yet: such a node is
    /// not ready, and nobody builds a tunnel to it.
    #[schemars(regex(pattern = KEY_OR_EMPTY_PATTERN))]
    #[serde(default)]
    pub public_key: String,
    /// UDP endpoints where the node receives WireGuard traffic, most preferred first
    /// (`IP:port`, IPv6 in brackets).
    #[schemars(length(max = 8), inner(regex(pattern = ENDPOINT_PATTERN)))]
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The pod CIDRs routed to this node (from `Node.spec.podCIDRs`), or a host's addresses.
    #[serde(rename = "podCIDRs", default)]
    #[schemars(length(max = 4))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("each entry must be a CIDR with no host bits set, such as 10.1.0.0/24"))]
    pub pod_cidrs: Vec<String>,
    /// Where the node is (region, zone or site); informational today.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// A Kubernetes node or a host outside Kubernetes.
    #[serde(default)]
    pub kind: MeshNodeKind,
    /// The node carries the [`GATEWAY_LABEL`]. It counts only for a Node-kind MeshNode
    /// with a key and an endpoint (see [`MeshNodeSpec::is_gateway`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
    /// A relay (set by `meshctl host add --relay`): a machine with an endpoint every
    /// cluster reaches, which forwards between peers that cannot reach each other
    /// directly (both behind NAT). It counts only with a key and an endpoint
    /// (see [`MeshNodeSpec::is_relay`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// The node hosts endpoints of an exported service (set by its cluster's controller,
    /// from the exports' EndpointSlices): its agent keeps every tunnel alive with a 1 s
    /// keepalive, so that the importing clusters' agents can tell within seconds when it
    /// stops answering (see `status.unreachable`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heartbeat: bool,
}

/// What an agent reports about its tunnels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    /// Conditions: `Ready` (the data plane is configured).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The tunnels worth naming (at most [`MAX_STATUS_PEERS`], sorted by name): those
    /// whose peer was last heard from an address it does not publish (`observedEndpoint`:
    /// how peers behind NAT learn each other's mapped address), then those not connected
    /// (at most [`MAX_STATUS_DOWN`]). Empty in steady state without NAT: `tunnels` counts
    /// the rest. An agent from before `tunnels` existed listed every tunnel here.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub peers: Vec<TunnelStatus>,
    /// How many tunnels there are, connected, per path and per peer cluster: a size that
    /// does not grow with the number of peers. Absent in the status of an agent from before
    /// it existed (which listed every tunnel in `peers` and `viaGateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<TunnelSummary>,
    /// When the agent last wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Time>,
    /// Written only by agents from before `tunnels`: the remote peers reached through a
    /// gateway, one entry each (now counted per gateway in `tunnels.viaGateway`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub via_gateway: Vec<ViaGateway>,
    /// MeshPeers with a `heartbeat` this node has a tunnel to and has not heard from
    /// lately (sorted, at most [`MAX_UNREACHABLE`]): the exceptions, empty when every
    /// watched peer answers. Written as soon as it changes (rate-limited); the
    /// controller withdraws an imported endpoint when most of this cluster's nodes with
    /// a tunnel to its node list that node here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 253)))]
    pub unreachable: Vec<String>,
}

/// How a tunnel is used.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum TunnelPath {
    /// To the peer itself, for its own pods.
    #[default]
    Direct,
    /// To a gateway that now carries its cluster's traffic (or, on a node behind gateways,
    /// every remote cluster's).
    Gateway,
    /// To a gateway kept ready to take over.
    Standby,
    /// On a gateway: to a node of its own cluster whose traffic it forwards.
    Forwarding,
    /// To a relay that forwards for peers this node cannot reach directly.
    Relay,
    /// To a peer not reached directly (no handshake completes): its traffic goes through
    /// the relay named in `via`, while handshakes keep being tried.
    Relayed,
}

/// An agent's tunnels counted: a size bounded by the number of peer clusters and gateways,
/// not of peers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSummary {
    /// Tunnels configured.
    #[serde(default)]
    pub total: i32,
    /// Of them, those with a handshake in the last 180 s (Reject-After-Time).
    #[serde(default)]
    pub connected: i32,
    /// Per peer cluster the tunnels go to (an empty name for this cluster's own machines:
    /// its gateways, relays and the nodes a gateway forwards for), sorted by cluster, at
    /// most [`MAX_STATUS_CLUSTERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 255))]
    pub clusters: Vec<ClusterTunnels>,
    /// Per gateway (the tunnel of the failover group's active member; empty when none is
    /// up), how many remote peers this node reaches through it with no tunnel of their
    /// own; sorted, at most [`MAX_STATUS_CLUSTERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 255))]
    pub via_gateway: Vec<GatewayPeers>,
}

/// An agent's tunnels to one peer cluster, counted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTunnels {
    /// The peer cluster.
    #[schemars(length(max = 253))]
    pub cluster: String,
    /// Tunnels to its nodes.
    #[serde(default)]
    pub tunnels: i32,
    /// Of them, those with a handshake in the last 180 s.
    #[serde(default)]
    pub connected: i32,
    /// Of them, those to a MeshPeer with a `heartbeat` that this agent watches (and would
    /// list in `unreachable`): the controller counts this node among those that judge
    /// that cluster's heartbeat nodes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub heartbeat: i32,
    /// Of them, those used directly for the peer's own pods.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub direct: i32,
    /// Of them, those to a gateway that carries its cluster's traffic now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gateway: i32,
    /// Of them, those to a gateway kept ready to take over.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub standby: i32,
    /// Of them, on a gateway, those to nodes of its own cluster it forwards for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub forwarding: i32,
    /// Of them, those to relays.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub relay: i32,
    /// Of them, those whose traffic goes through a relay for now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub relayed: i32,
}

impl ClusterTunnels {
    /// Counts one more tunnel on `path`.
    pub fn count(&mut self, path: TunnelPath, connected: bool, heartbeat: bool) {
        let add = |n: &mut i32| *n = n.saturating_add(1);
        add(&mut self.tunnels);
        if connected {
            add(&mut self.connected);
        }
        if heartbeat {
            add(&mut self.heartbeat);
        }
        add(match path {
            TunnelPath::Direct => &mut self.direct,
            TunnelPath::Gateway => &mut self.gateway,
            TunnelPath::Standby => &mut self.standby,
            TunnelPath::Forwarding => &mut self.forwarding,
            TunnelPath::Relay => &mut self.relay,
            TunnelPath::Relayed => &mut self.relayed,
        });
    }
}

/// How many remote peers an agent reaches through one gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPeers {
    /// The tunnel (MeshPeer or MeshNode name) of the gateway; empty when its group has no
    /// member up.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub gateway: String,
    /// Remote peers reached through it.
    #[serde(default)]
    pub peers: i32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// A remote peer reached through a gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ViaGateway {
    /// The MeshPeer.
    pub name: String,
    /// The tunnel (MeshPeer or MeshNode name) of the gateway that carries it now.
    pub gateway: String,
}

/// One tunnel as an agent sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    /// The MeshPeer this tunnel is for.
    pub name: String,
    /// The peer's endpoint in use (it follows the peer when it roams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Where the last authenticated datagram from the peer came from (for a peer behind
    /// NAT, its mapped address). Controllers offer it to the peer's other peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_endpoint: Option<String>,
    /// When the current session's handshake completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake_time: Option<Time>,
    /// Bytes received from the peer.
    #[serde(default)]
    pub rx_bytes: i64,
    /// Bytes sent to the peer.
    #[serde(default)]
    pub tx_bytes: i64,
    /// How the tunnel is used.
    #[serde(default)]
    pub path: TunnelPath,
    /// For a `Relayed` peer: the relay its traffic goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// A linked cluster: where its API server is, the read-only credentials for it, and the
/// pod CIDRs it was allowed when it was joined. Written by `meshctl join`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "PeerCluster",
    status = "PeerClusterStatus",
    shortname = "pc",
    category = "wiremesh",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Stale",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Stale\")].status"
    ),
    printcolumn(
        name = "Conflict",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Conflict\")].status"
    ),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodeCount"),
    printcolumn(
        name = "HostCIDRs",
        type_ = "string",
        json_path = ".spec.allowedHostCIDRs"
    ),
    printcolumn(name = "LastSync", type_ = "date", json_path = ".status.lastSyncTime"),
    printcolumn(
        name = "APIServer",
        type_ = "string",
        json_path = ".spec.apiServer",
        priority = 1
    )
)]
#[x_kube(validation = Rule::new("self.clusterName == oldSelf.clusterName").message("clusterName is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct PeerClusterSpec {
    /// The remote cluster's name, unique in the mesh.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub cluster_name: String,
    /// The remote API server's URL (`https://…`).
    #[schemars(regex(pattern = "^https://"))]
    pub api_server: String,
    /// PEM CA bundle that signs the remote API server's certificate, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_data: Option<String>,
    /// The Secret (in `wiremesh-system`) whose `token` is a read-only credential for the
    /// remote cluster's MeshNodes.
    pub credentials_secret: String,
    /// The pod CIDRs the remote cluster was allowed at join time. A remote node that claims
    /// anything outside them is not mirrored.
    #[serde(rename = "allowedPodCIDRs")]
    // Bounded strings keep the CEL rule's estimated cost within the API server's budget
    // (43 characters: the longest IPv6 CIDR).
    #[schemars(length(min = 1, max = 64), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("each entry must be a CIDR with no host bits set"))]
    pub allowed_pod_cidrs: Vec<String>,
    /// The remote cluster's mesh CIDRs, one for each of `allowedPodCIDRs` in the same order
    /// and of the same length, when its pod CIDRs overlap another cluster's and its agents
    /// translate them (issue 14): its nodes are checked against `allowedPodCIDRs` in its
    /// own pod space, then mirrored with their pod CIDRs mapped into these. Empty: its pod
    /// CIDRs are unique and used as they are.
    #[serde(rename = "meshCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("each entry must be a CIDR with no host bits set"))]
    pub mesh_cidrs: Vec<String>,
    /// The range the remote cluster's hosts (MeshNodes of kind `Host`) may take their
    /// addresses from, granted at join time (`meshctl join --host-cidr`, by default the
    /// remote cluster's own configured host range). A remote host whose address lies
    /// outside it is not mirrored; empty: no host is.
    #[serde(
        rename = "allowedHostCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 64), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("each entry must be a CIDR with no host bits set"))]
    pub allowed_host_cidrs: Vec<String>,
}

/// How the link with a peer cluster is doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerClusterStatus {
    /// `Ready` (mirrored from a live watch), `Stale` (the remote API server is unreachable;
    /// the last known peers are kept), `Conflict` (a remote node was refused).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Remote nodes mirrored as MeshPeers.
    #[serde(default)]
    pub node_count: i32,
    /// When the remote nodes were last read successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The cluster's nodes this cluster's data plane finds unreachable (most local nodes
    /// with a tunnel to one have not heard from it lately; sorted, at most
    /// [`MAX_UNREACHABLE`]): the endpoints they host are imported not ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 253)))]
    pub unreachable_nodes: Vec<String>,
}

/// A remote node as seen here: what the local agents build tunnels to. Written only by the
/// controller, from a PeerCluster's remote MeshNodes after validation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "MeshPeer",
    shortname = "mp",
    category = "wiremesh",
    derive = "PartialEq",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoints[0]"),
    printcolumn(name = "PodCIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerSpec {
    /// The peer cluster the node belongs to.
    pub cluster: String,
    /// The node's name in its cluster.
    pub node: String,
    /// The node's WireGuard public key (base64).
    #[schemars(regex(pattern = KEY_PATTERN))]
    pub public_key: String,
    /// Its endpoints, most preferred first.
    #[serde(default)]
    #[schemars(length(max = 8), inner(regex(pattern = ENDPOINT_PATTERN)))]
    pub endpoints: Vec<String>,
    /// The pod CIDRs routed to it.
    #[serde(rename = "podCIDRs", default)]
    #[schemars(length(max = 4))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("each entry must be a CIDR with no host bits set"))]
    pub pod_cidrs: Vec<String>,
    /// Where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// A Kubernetes node or a host.
    #[serde(default)]
    pub kind: MeshNodeKind,
    /// A gateway of its cluster: the cluster's other nodes are reached through the
    /// gateways (the first that answers, in order of node name).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
    /// A relay: peers that cannot reach a node of this cluster directly go through it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// It hosts endpoints of an exported service and keeps a 1 s keepalive on every
    /// tunnel: agents judge it by whether they heard from it within seconds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heartbeat: bool,
}

impl MeshNodeSpec {
    /// Whether the node has published its public key (a host registered with
    /// `meshctl host add` has none until its agent starts).
    pub fn has_key(&self) -> bool {
        !self.public_key.is_empty()
    }

    /// Whether the node serves as a gateway: labelled so, a Kubernetes node (a host is
    /// outside the cluster network the gateway forwards into), with a key and at least one
    /// endpoint (the other side must be able to reach it).
    pub fn is_gateway(&self) -> bool {
        self.gateway
            && self.kind == MeshNodeKind::Node
            && self.has_key()
            && !self.endpoints.is_empty()
    }

    /// Whether the machine serves as a relay: marked so, with a key and an endpoint.
    pub fn is_relay(&self) -> bool {
        self.relay && self.has_key() && !self.endpoints.is_empty()
    }
}

/// The bundle `meshctl host add` writes for a host outside Kubernetes and
/// `wiremesh-agent host --bundle` reads: where the API server is and the host's
/// credential, which can only update the host's own MeshNode and read the mesh.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostBundle {
    /// The API server's URL (`https://…`).
    pub api_server: String,
    /// PEM CA bundle of the API server, base64-encoded; absent: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_data: Option<String>,
    /// A bearer token of ServiceAccount `wiremesh-system/wiremesh-host-<host>`.
    pub token: String,
    /// The cluster's name (its `wiremesh-cluster` ConfigMap's `clusterName`).
    pub cluster_name: String,
    /// The host's name: its MeshNode's name.
    pub host_name: String,
}

impl std::fmt::Debug for HostBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBundle")
            .field("api_server", &self.api_server)
            .field("cluster_name", &self.cluster_name)
            .field("host_name", &self.host_name)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The ServiceAccount (in [`SYSTEM_NAMESPACE`]), ClusterRole and bindings of host `host`.
pub fn host_account_name(host: &str) -> String {
    format!("wiremesh-host-{host}")
}

/// The name of the MeshPeer for `node` of peer cluster `cluster`.
pub fn mesh_peer_name(cluster: &str, node: &str) -> String {
    format!("{cluster}.{node}")
}

/// What this cluster publishes about one of its `ServiceExport`s (KEP-1645) for the
/// clusters linked to it: written only by the controller (the leader), from the export,
/// its Service and EndpointSlices, and read by linked clusters through their join token,
/// which may list and watch these and nothing else of the kind. Named
/// `<namespace>.<name>` of the export (both DNS labels, so the name is unique).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "MeshServiceExport",
    shortname = "mse",
    category = "wiremesh",
    derive = "PartialEq",
    printcolumn(
        name = "Namespace",
        type_ = "string",
        json_path = ".spec.service.namespace"
    ),
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service.name"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.service.type"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshServiceExportSpec {
    /// The exported service: ports, type, properties and endpoints.
    pub service: crate::mcs::ExportedService,
}

/// The name of the MeshServiceExport of export `namespace/name`.
pub fn mesh_service_export_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    #[test]
    fn crds_carry_validation_rules() {
        let json = serde_json::to_string(&MeshNode::crd()).unwrap();
        assert!(json.contains("x-kubernetes-validations"), "{json}");
        assert!(
            json.contains(KEY_PATTERN.replace('\\', "\\\\").as_str())
                || json.contains("[A-Za-z0-9+/]{42}")
        );
        let json = serde_json::to_string(&PeerCluster::crd()).unwrap();
        assert!(json.contains("clusterName is immutable"));
        assert!(ENDPOINT_PATTERN.starts_with('^'));
    }
}
