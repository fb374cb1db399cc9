//! What the reconciler ([`crate::reconcile`]) and the link tasks ([`crate::remote`]) both
//! use: the controller's names, its clocks and the state the links share.
//!
//! The reconciler starts the links and the links read this, never the reconciler, so the
//! controller's modules import one another without a loop.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use tokio::sync::watch;
use wiremesh_proto::crd::{MeshNode, MeshPeer, PeerCluster};

use crate::install::ClusterInfo;
use crate::metrics::Metrics;

/// The server-side-apply field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "wiremesh-controller";
/// The reporting controller of its Events.
pub const CONTROLLER_NAME: &str = "wiremesh-controller";

/// The controller's clocks. The defaults suit production and tests alike.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Quiet time after a change before mirroring, so a burst of changes makes one pass.
    pub debounce: Duration,
    /// Every link mirrors and probes its remote this often, changes or not.
    pub resync: Duration,
    /// A probe of a remote API server (a one-item list) that takes longer fails.
    pub probe_timeout: Duration,
    /// While a remote is unreadable, it is probed this often.
    pub stale_probe: Duration,
    /// A failed pass (the local API server refused a write) is retried after this.
    pub sync_retry: Duration,
    /// Every PeerCluster is reconciled again after this, changes or not.
    pub requeue: Duration,
    /// First delay before restarting a failed remote watch; doubles up to `watch_backoff_max`.
    pub watch_backoff_min: Duration,
    /// Longest delay before restarting a failed remote watch.
    pub watch_backoff_max: Duration,
    /// The cluster ConfigMap is read this often.
    pub cluster_info_poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(200),
            resync: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
            stale_probe: Duration::from_secs(2),
            sync_retry: Duration::from_secs(2),
            requeue: Duration::from_secs(30),
            watch_backoff_min: Duration::from_millis(500),
            watch_backoff_max: Duration::from_secs(5),
            cluster_info_poll: Duration::from_secs(15),
        }
    }
}

/// What the link tasks share: the local client and caches, the Event recorder, metrics.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) peer_clusters: Store<PeerCluster>,
    pub(crate) mesh_peers: Store<MeshPeer>,
    pub(crate) mesh_nodes: Store<MeshNode>,
    /// This cluster's Nodes: their addresses are reserved (no peer may claim them).
    pub(crate) nodes: Store<Node>,
    /// This cluster's ConfigMap; it also ticks on every local change that matters to plans
    /// (a spec change of a local MeshNode or MeshPeer, a Node's addresses or labels).
    pub(crate) local: watch::Receiver<LocalState>,
    pub(crate) recorder: Recorder,
    /// Who records the Events (for Events that must not join an earlier one's series).
    pub(crate) reporter: Reporter,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) timing: Timing,
    /// Most nodes mirrored from one peer cluster.
    pub(crate) max_nodes_per_peer: usize,
    /// Each linked cluster's exported services (MCS), by PeerCluster name, as its link
    /// last listed them ([`crate::mcs::remote`]); kept while its API server is down.
    pub(crate) mcs_peers: watch::Sender<crate::mcs::remote::PeerExportMap>,
    /// Remote nodes the local agents cannot reach, `(cluster, node)`, as
    /// [`crate::liveness::aggregate`] counts the agents' reports: their endpoints are
    /// imported not ready ([`crate::mcs::plan::Unreachable`]). The MCS controller plans
    /// again on every change.
    pub(crate) mcs_unreachable: watch::Receiver<crate::liveness::Unreachable>,
    /// Where the MCS controller says which of our nodes host exported endpoints
    /// ([`crate::liveness::heartbeat_nodes`]); `None` until it first does.
    pub(crate) heartbeats: watch::Sender<Option<std::collections::BTreeSet<String>>>,
}

/// This cluster as the links see it.
#[derive(Debug, Clone)]
pub(crate) struct LocalState {
    /// The cluster ConfigMap, or why it cannot be used; `None` until it was first read.
    pub(crate) cluster: Option<Result<ClusterInfo, String>>,
    /// This cluster's API server addresses (the `kubernetes` Service and its
    /// EndpointSlice), as far as they could be read: no peer may claim them.
    pub(crate) api_servers: Vec<IpAddr>,
}
