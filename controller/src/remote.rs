//! One peer cluster's link: a client for its API server, a watch of its `MeshNode`s, and
//! the loop that plans ([`crate::plan`]) and applies `MeshPeer`s and the `PeerCluster`'s
//! status ([`crate::status`]).
//!
//! Each `PeerCluster` gets its own task ([`mirror`]), so one slow remote never holds up
//! another. The loop mirrors on every spec change of a remote node (debounced), on every
//! local change, on a nudge from the reconciler, and every resync period (level-triggered).
//!
//! **Fail static.** The remote is probed every resync period (a one-item list with a
//! timeout), and a watch error is checked with a probe at once. While the remote cannot be
//! read the `MeshPeer`s are left exactly as they are and the `PeerCluster` is `Stale`; when
//! the remote answers again the watch starts over with a fresh list, and only once that
//! list is complete does mirroring resume. A remote that was never listed is never planned
//! from, so a controller that starts during an outage deletes nothing.
//!
//! **Bounded.** The remote API server is not trusted with our memory: lists come in pages
//! of [`PAGE_SIZE`], every response body (or watch event) is cut off past
//! [`MAX_RESPONSE_BYTES`] ([`crate::limit`]), at most `--max-nodes-per-peer` nodes are
//! kept, each at most [`MAX_NODE_BYTES`] once stripped to what the plan reads, and all
//! of them at most [`MAX_REMOTE_BYTES`]. A node over its size is refused (a Conflict).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Config, Resource as _, ResourceExt as _};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument as _, debug, info, info_span, warn};
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::{
    MeshNode, MeshPeer, PEER_CLUSTER_LABEL, PeerCluster, PeerClusterStatus, SYSTEM_NAMESPACE,
};

use crate::install::ClusterInfo;
use crate::limit::{BodyLimitLayer, MAX_RESPONSE_BYTES};
use crate::plan::{self, Conflict, Local, OtherPeer, Plan, Reason, Reserved};
use crate::shared::{FIELD_MANAGER, Shared};
use crate::status::{self, Observation, Transition};

/// Key of the bearer token in a PeerCluster's credentials Secret.
pub const TOKEN_KEY: &str = "token";

/// How long to wait for a TCP connection to a remote API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive watch failures (without a complete list in between) after which the remote
/// counts as unreadable even if a probe answers (say, RBAC allows `list` but not `watch`).
const MAX_WATCH_FAILURES: u32 = 3;
/// Server-side timeout of each watch request; the watcher reconnects after it.
const WATCH_TIMEOUT_SECS: u32 = 120;
/// Event notes are limited to 1 kB by the API.
const MAX_NOTE: usize = 1000;
/// Objects per page of a list of remote MeshNodes (`limit=500`, then `continue`): the
/// API server's own default page size for its clients (client-go's pager).
pub const PAGE_SIZE: u32 = 500;
/// Largest remote MeshNode kept, serialized, once stripped to what the plan reads (spec,
/// observed endpoints): an honest one, with an observation for each of the 1,024 tunnels
/// its agent reports, stays under 128 KiB.
pub const MAX_NODE_BYTES: usize = 256 << 10;
/// Most bytes of remote MeshNodes kept for one peer cluster: past it, new nodes are
/// dropped as past `--max-nodes-per-peer`. 5,000 honest nodes without observations take
/// about 2 MiB.
pub const MAX_REMOTE_BYTES: usize = 128 << 20;

/// Where a peer cluster's API server is and how to authenticate to it.
#[derive(Clone)]
pub struct Remote {
    /// `https://host:port`.
    pub api_server: String,
    /// Base64 PEM CA bundle, if not a public CA.
    pub ca_data: Option<String>,
    /// Bearer token (never logged).
    token: String,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("api_server", &self.api_server)
            .field("ca_data", &self.ca_data.as_ref().map(|_| "<set>"))
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The remote as far as it could be worked out from the PeerCluster and its Secret.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// Ready to connect.
    Usable(Remote),
    /// The link cannot be used; the reason goes into the `Stale` condition.
    Blocked {
        /// CamelCase, such as `CredentialsMissing`.
        reason: &'static str,
        /// For people.
        message: String,
    },
}

impl Credentials {
    /// From a PeerCluster and its Secret (`None` when it does not exist).
    pub fn new(peer: &PeerCluster, secret: Option<&Secret>) -> Self {
        let name = &peer.spec.credentials_secret;
        let Some(secret) = secret else {
            return Self::Blocked {
                reason: "CredentialsMissing",
                message: format!("Secret {SYSTEM_NAMESPACE}/{name} not found"),
            };
        };
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get(TOKEN_KEY))
            .and_then(|t| std::str::from_utf8(&t.0).ok())
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            Some(token) => Self::Usable(Remote {
                api_server: peer.spec.api_server.clone(),
                ca_data: peer.spec.ca_data.clone(),
                token: token.to_owned(),
            }),
            None => Self::Blocked {
                reason: "CredentialsMissing",
                message: format!("Secret {SYSTEM_NAMESPACE}/{name} has no {TOKEN_KEY:?}"),
            },
        }
    }

    /// A digest of everything a running link depends on: when it changes, the link restarts.
    pub fn fingerprint(&self, peer: &PeerCluster) -> u64 {
        let mut h = DefaultHasher::new();
        peer.metadata.uid.hash(&mut h);
        peer.spec.cluster_name.hash(&mut h);
        match self {
            Self::Usable(r) => (&r.api_server, &r.ca_data, &r.token).hash(&mut h),
            Self::Blocked { reason, message } => (reason, message).hash(&mut h),
        }
        h.finish()
    }
}

impl Remote {
    /// A client for the remote API server: its URL, the CA from `caData` (whose certificate
    /// must name the host of the URL, an IP address such as `127.0.0.1` included) and the
    /// token.
    ///
    /// # Errors
    /// A malformed URL or CA bundle, as text.
    pub async fn client(&self) -> Result<Client, String> {
        let mut cluster = json!({ "server": self.api_server });
        if let Some(ca) = &self.ca_data {
            cluster["certificate-authority-data"] = json!(ca);
        }
        let kubeconfig: Kubeconfig = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "remote", "cluster": cluster }],
            "users": [{ "name": "remote", "user": { "token": self.token } }],
            "contexts": [{ "name": "remote", "context": { "cluster": "remote", "user": "remote" } }],
            "current-context": "remote",
        }))
        .map_err(|e| format!("building a kubeconfig for {}: {e}", self.api_server))?;
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("client configuration for {}: {e}", self.api_server))?;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let builder = ClientBuilder::try_from(config)
            .map_err(|e| format!("client for {}: {e}", self.api_server))?;
        Ok(builder
            .with_layer(&BodyLimitLayer::new(MAX_RESPONSE_BYTES))
            .build())
    }
}

/// Why a sync pass failed (the variant names are metric labels).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Applying a MeshPeer failed.
    #[error("applying MeshPeer {name}")]
    Apply {
        /// The MeshPeer.
        name: String,
        /// The API server's answer.
        #[source]
        source: kube::Error,
    },
    /// Deleting a MeshPeer failed.
    #[error("deleting MeshPeer {name}")]
    Delete {
        /// The MeshPeer.
        name: String,
        /// The API server's answer.
        #[source]
        source: kube::Error,
    },
    /// Writing the PeerCluster's status failed.
    #[error("writing the status of PeerCluster {name}")]
    Status {
        /// The PeerCluster.
        name: String,
        /// The API server's answer.
        #[source]
        source: kube::Error,
    },
}

impl SyncError {
    /// Short name, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "apply",
            Self::Delete { .. } => "delete",
            Self::Status { .. } => "status",
        }
    }
}

/// Mirrors peer cluster `name` until aborted (or until its nudge channel closes).
pub(crate) async fn mirror(
    shared: Arc<Shared>,
    name: String,
    credentials: Credentials,
    nudges: mpsc::Receiver<()>,
) {
    let span = info_span!("peer", peer = %name);
    // One more than are mirrored, so that the cap shows as a Conflict.
    let limit = shared.max_nodes_per_peer.saturating_add(1);
    Mirror {
        shared,
        name,
        nudges,
        remote: RemoteNodes {
            limit,
            ..RemoteNodes::default()
        },
        outage: None,
        last_status: None,
    }
    .run(credentials)
    .instrument(span)
    .await;
}

type WatchStream = Pin<Box<dyn Stream<Item = watcher::Result<watcher::Event<MeshNode>>> + Send>>;

/// Why the remote cannot be read now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outage {
    reason: &'static str,
    message: String,
}

struct Mirror {
    shared: Arc<Shared>,
    name: String,
    nudges: mpsc::Receiver<()>,
    remote: RemoteNodes,
    outage: Option<Outage>,
    /// What we last wrote, fresher than the cache right after a write.
    last_status: Option<PeerClusterStatus>,
}

impl Mirror {
    async fn run(mut self, credentials: Credentials) {
        let timing = self.shared.timing;
        let api = match credentials {
            Credentials::Usable(remote) => match remote.client().await {
                Ok(client) => Some(Api::<MeshNode>::all(client)),
                Err(message) => {
                    self.outage = Some(Outage {
                        reason: "ClientConfigInvalid",
                        message,
                    });
                    None
                }
            },
            Credentials::Blocked { reason, message } => {
                self.outage = Some(Outage { reason, message });
                None
            }
        };
        if let Some(outage) = &self.outage {
            warn!(reason = outage.reason, message = %outage.message, "peer cluster link unusable");
        }
        let mut session = api.as_ref().map(watch);
        let mut backoff = Backoff::new(timing.watch_backoff_min, timing.watch_backoff_max);
        let mut retry_at: Option<Instant> = None;
        let mut probe_at = Instant::now() + timing.resync;
        let mut sync_at = Some(Instant::now() + timing.debounce);
        let mut resync_at = Instant::now() + timing.resync;
        let mut local = self.shared.local.clone();
        loop {
            let schedule = |sync_at: &mut Option<Instant>, delay: Duration| {
                let at = Instant::now() + delay;
                *sync_at = Some(sync_at.map_or(at, |t| t.min(at)));
            };
            tokio::select! {
                item = next_event(&mut session) => match item {
                    Some(Ok(event)) => {
                        if self.remote.apply(event) {
                            schedule(&mut sync_at, timing.debounce);
                        }
                        if self.remote.synced {
                            backoff.reset();
                        }
                    }
                    failed => {
                        let error = match failed {
                            Some(Err(e)) => format!("{:#}", anyhow::Error::new(e)),
                            _ => "the watch ended".to_owned(),
                        };
                        session = None;
                        self.remote.synced = false;
                        self.remote.failures += 1;
                        retry_at = Some(Instant::now() + backoff.next_delay());
                        debug!(%error, failures = self.remote.failures, "watch of remote MeshNodes failed");
                        if self.remote.failures >= MAX_WATCH_FAILURES && self.outage.is_none() {
                            self.remote.synced = false;
                            self.outage = Some(Outage {
                                reason: "RemoteUnreachable",
                                message: format!("watching MeshNodes at {}: {error}", self.server()),
                            });
                            schedule(&mut sync_at, Duration::ZERO);
                        }
                        // Is the server gone, or was it one broken watch? Ask it now.
                        probe_at = Instant::now();
                    }
                },
                () = sleep_opt(retry_at) => {
                    retry_at = None;
                    session = api.as_ref().map(watch);
                }
                () = sleep_until(probe_at), if api.is_some() => {
                    let Some(api) = &api else { continue };
                    match self.probe(api, timing.probe_timeout).await {
                        Ok(()) => {
                            probe_at = Instant::now() + timing.resync;
                            if self.outage.take().is_some() {
                                info!("remote API server answers again");
                                if !self.remote.synced {
                                    // Nothing was listed since the outage began: start over
                                    // from a fresh list, whatever the old watch saw.
                                    session = Some(watch(api));
                                    self.remote.failures = 0;
                                    retry_at = None;
                                    backoff.reset();
                                }
                                schedule(&mut sync_at, Duration::ZERO);
                            }
                        }
                        Err(outage) => {
                            probe_at = Instant::now() + timing.stale_probe;
                            if self.outage.as_ref() != Some(&outage) {
                                debug!(message = %outage.message, "remote API server unreadable");
                                if self.outage.is_none() {
                                    // Whatever the watch holds now predates the outage.
                                    self.remote.synced = false;
                                }
                                self.outage = Some(outage);
                                schedule(&mut sync_at, Duration::ZERO);
                            }
                        }
                    }
                }
                () = sleep_until(resync_at) => {
                    resync_at = Instant::now() + timing.resync;
                    schedule(&mut sync_at, Duration::ZERO);
                }
                changed = local.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    schedule(&mut sync_at, timing.debounce);
                }
                nudge = self.nudges.recv() => {
                    if nudge.is_none() {
                        return;
                    }
                    schedule(&mut sync_at, timing.debounce);
                }
                () = sleep_opt(sync_at) => {
                    sync_at = None;
                    let started = std::time::Instant::now();
                    let result = self.sync().await;
                    let error = result.as_ref().err().map(SyncError::label);
                    self.shared.metrics.run("sync", started.elapsed(), error);
                    if let Err(e) = result {
                        warn!(error = format!("{:#}", anyhow::Error::from(e)), "mirroring failed; retrying");
                        schedule(&mut sync_at, timing.sync_retry);
                    }
                }
            }
        }
    }

    /// The remote API server's URL, for messages.
    fn server(&self) -> String {
        self.shared
            .peer_clusters
            .get(&ObjectRef::new(&self.name))
            .map_or_else(
                || "the remote API server".to_owned(),
                |pc| pc.spec.api_server.clone(),
            )
    }

    /// A one-item list, with a timeout: can the remote be read at all?
    async fn probe(&self, api: &Api<MeshNode>, timeout: Duration) -> Result<(), Outage> {
        probe(api, &self.server(), timeout).await
    }

    /// One pass: plan and apply if the remote is live, then the status and its Events.
    async fn sync(&mut self) -> Result<(), SyncError> {
        let Some(pc) = self.shared.peer_clusters.get(&ObjectRef::new(&self.name)) else {
            return Ok(());
        };
        if pc.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let caches_synced = self
            .shared
            .metrics
            .health()
            .caches_synced
            .load(Ordering::Relaxed);
        let seen = match (&self.outage, self.remote.synced) {
            (Some(outage), _) => Seen::Stale(outage.clone()),
            (None, false) => return Ok(()),
            (None, true) => {
                let (cluster, api_servers) = {
                    let local = self.shared.local.borrow();
                    (local.cluster.clone(), local.api_servers.clone())
                };
                match cluster {
                    // Planning against a partial view of this cluster could delete good
                    // peers or miss a conflict: wait (a local change wakes us).
                    _ if !caches_synced => return Ok(()),
                    None => return Ok(()),
                    Some(Err(message)) => Seen::Stale(Outage {
                        reason: "ClusterInfoMissing",
                        message,
                    }),
                    Some(Ok(info)) => {
                        let plan = self.plan(&pc, &info, &api_servers);
                        self.apply(&pc, &plan).await?;
                        Seen::Synced(plan)
                    }
                }
            }
        };
        let observation = match &seen {
            Seen::Synced(plan) => Observation::Synced {
                node_count: plan.mirrored,
                conflicts: &plan.conflicts,
            },
            Seen::Stale(outage) => Observation::Stale {
                reason: outage.reason,
                message: &outage.message,
            },
        };
        let previous = match &self.last_status {
            Some(status) => Some(status),
            None => pc.status.as_ref(),
        };
        let update = status::next(
            previous,
            pc.metadata.generation,
            &observation,
            Timestamp::now(),
        );
        match &seen {
            Seen::Synced(plan) => self.shared.metrics.peer(
                &self.name,
                Some(plan.mirrored),
                false,
                Some(plan.conflicts.len()),
            ),
            Seen::Stale(_) => self.shared.metrics.peer(&self.name, None, true, None),
        }
        if update.changed {
            // `unreachableNodes` is the liveness task's field (`crate::liveness`), under
            // its own field manager: not claimed here.
            let mut status = update.status.clone();
            status.unreachable_nodes.clear();
            let body = json!({
                "apiVersion": PeerCluster::api_version(&()),
                "kind": PeerCluster::kind(&()),
                "status": status,
            });
            let api: Api<PeerCluster> = Api::all(self.shared.client.clone());
            api.patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|source| SyncError::Status {
                name: self.name.clone(),
                source,
            })?;
            self.last_status = Some(update.status);
        }
        for transition in &update.transitions {
            self.announce(&pc, transition).await;
        }
        Ok(())
    }

    fn plan(&self, pc: &PeerCluster, info: &ClusterInfo, api_servers: &[IpAddr]) -> Plan {
        let local_nodes = self.shared.mesh_nodes.state();
        let mut local = Local::new(
            &info.name,
            &info.pod_cidrs,
            local_nodes.iter().map(|n| &**n),
        );
        local.claim_mesh_cidrs(&info.name, &info.mesh_cidrs);
        for cidr in &info.service_cidrs {
            local.reserve(*cidr, Reserved::ServiceCidr);
        }
        for ip in api_servers {
            local.reserve(IpCidr::host(*ip), Reserved::ApiServer);
        }
        local.reserve_nodes(self.shared.nodes.state().iter().map(|n| &**n));
        let mut by_peer: BTreeMap<String, Vec<MeshPeer>> = BTreeMap::new();
        for mp in self.shared.mesh_peers.state() {
            if let Some(peer) = mp.labels().get(PEER_CLUSTER_LABEL) {
                by_peer.entry(peer.clone()).or_default().push((*mp).clone());
            }
        }
        let others: Vec<OtherPeer> = self
            .shared
            .peer_clusters
            .state()
            .iter()
            .filter(|other| other.name_any() != self.name)
            .map(|other| {
                OtherPeer::new(other, by_peer.get(&other.name_any()).into_iter().flatten())
            })
            .collect();
        let existing = by_peer.remove(&self.name).unwrap_or_default();
        let mut remote: Vec<MeshNode> = self.remote.nodes.values().cloned().collect();
        let refused = plan::cap_nodes(&mut remote, self.shared.max_nodes_per_peer);
        let mut plan = plan::plan(pc, &remote, &local, &others, &existing);
        if !refused.is_empty() || self.remote.dropped > 0 {
            warn!(
                mirrored = remote.len(),
                dropped = self.remote.dropped,
                "peer cluster has more nodes than --max-nodes-per-peer"
            );
        }
        plan.conflicts.extend(refused);
        plan.conflicts
            .extend(self.remote.oversized.iter().map(|node| Conflict {
                node: node.clone(),
                cidr: None,
                reason: Reason::TooLarge {
                    max: MAX_NODE_BYTES,
                },
            }));
        plan
    }

    /// Applies every write of `plan`; one the API server refuses does not stop the others.
    /// Returns the first failure (each is logged).
    async fn apply(&self, pc: &PeerCluster, plan: &Plan) -> Result<(), SyncError> {
        let api: Api<MeshPeer> = Api::all(self.shared.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut first: Option<SyncError> = None;
        let mut failed = |error: SyncError| {
            warn!(
                error = error_text(&error),
                "mirroring one MeshPeer failed; going on with the others"
            );
            first.get_or_insert(error);
        };
        for desired in &plan.apply {
            let mut mp = MeshPeer::new(&desired.name, desired.spec.clone());
            mp.metadata.labels = Some([(PEER_CLUSTER_LABEL.to_owned(), pc.name_any())].into());
            mp.metadata.owner_references = Some(vec![owner_reference(pc)]);
            match api.patch(&desired.name, &params, &Patch::Apply(&mp)).await {
                Ok(_) => {
                    info!(mesh_peer = %desired.name, node = %desired.spec.node, pod_cidrs = ?desired.spec.pod_cidrs, "mirrored remote node");
                }
                Err(source) => failed(SyncError::Apply {
                    name: desired.name.clone(),
                    source,
                }),
            }
        }
        for name in &plan.delete {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(mesh_peer = %name, "deleted MeshPeer: its remote node is gone or refused")
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(source) => failed(SyncError::Delete {
                    name: name.clone(),
                    source,
                }),
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Logs a transition and records it as a Kubernetes Event on the PeerCluster.
    async fn announce(&self, pc: &PeerCluster, transition: &Transition) {
        let (warning, reason, note) = transition.event();
        match transition {
            Transition::Ready { .. } => info!(%note, "peer cluster ready"),
            Transition::ConflictResolved => info!(%note, "peer cluster conflict resolved"),
            Transition::Stale { .. } => {
                warn!(%note, "peer cluster stale: keeping its last known MeshPeers")
            }
            Transition::Conflict { .. } => warn!(%note, "remote nodes refused"),
        }
        let event = K8sEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(truncate(note, MAX_NOTE)),
            action: "Mirror".to_owned(),
            secondary: None,
        };
        // The recorder folds Events of one reason on one object into a series that keeps
        // the first note: a new set of refused nodes must be an Event of its own.
        let fresh;
        let recorder = if matches!(transition, Transition::Conflict { .. }) {
            fresh = Recorder::new(self.shared.client.clone(), self.shared.reporter.clone());
            &fresh
        } else {
            &self.shared.recorder
        };
        if let Err(e) = recorder.publish(&event, &pc.object_ref(&())).await {
            warn!(error = %e, reason, "recording an Event");
        }
    }
}

/// Remote nodes by name, with their sizes.
#[derive(Debug, Default)]
struct Kept {
    nodes: BTreeMap<String, MeshNode>,
    sizes: BTreeMap<String, usize>,
    bytes: usize,
}

impl std::ops::Deref for Kept {
    type Target = BTreeMap<String, MeshNode>;

    fn deref(&self) -> &Self::Target {
        &self.nodes
    }
}

impl Kept {
    /// Keeps `node` (of `size` bytes) unless that makes more than `limit` nodes or
    /// [`MAX_REMOTE_BYTES`]; false when it was not kept (and is no longer).
    fn admit(&mut self, name: String, node: MeshNode, size: usize, limit: usize) -> bool {
        let old = self.sizes.get(&name).copied();
        let bytes = self.bytes - old.unwrap_or(0) + size;
        if (old.is_none() && self.nodes.len() >= limit) || bytes > MAX_REMOTE_BYTES {
            self.remove(&name);
            return false;
        }
        self.bytes = bytes;
        self.sizes.insert(name.clone(), size);
        self.nodes.insert(name, node);
        true
    }

    /// Forgets `name`; true if it was kept.
    fn remove(&mut self, name: &str) -> bool {
        let size = self.sizes.remove(name).unwrap_or(0);
        self.bytes -= size;
        self.nodes.remove(name).is_some()
    }
}

/// The remote nodes as the watch reports them.
#[derive(Debug)]
struct RemoteNodes {
    /// As last known (name and spec only).
    nodes: Kept,
    /// A list in progress.
    buffer: Option<Kept>,
    /// Nodes refused for their size (over [`MAX_NODE_BYTES`]), not kept.
    oversized: BTreeSet<String>,
    /// The current watch session has completed its list.
    synced: bool,
    /// Watch failures since the last complete list.
    failures: u32,
    /// Most nodes kept: past it, new names are dropped (and counted), so a peer with
    /// millions of MeshNodes cannot exhaust our memory.
    limit: usize,
    /// New nodes dropped because of `limit`, since the last complete list.
    dropped: usize,
}

impl Default for RemoteNodes {
    fn default() -> Self {
        Self {
            nodes: Kept::default(),
            buffer: None,
            oversized: BTreeSet::new(),
            synced: false,
            failures: 0,
            limit: usize::MAX,
            dropped: 0,
        }
    }
}

impl RemoteNodes {
    /// Applies one watch event to the remote picture; true when a node's spec changed.
    fn apply(&mut self, event: watcher::Event<MeshNode>) -> bool {
        let event = event.modify(|n| {
            // Only the endpoints its machines observed matter here (see
            // plan::observed_endpoints); the rest changes every few seconds.
            n.status = plan::observations_only(n.status.take());
            n.managed_fields_mut().clear();
            n.annotations_mut().clear();
        });
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Kept::default());
                self.dropped = 0;
                self.oversized.clear();
                false
            }
            watcher::Event::InitApply(node) => {
                let name = node.name_any();
                let Some(size) = self.size(&name, &node) else {
                    if let Some(buffer) = &mut self.buffer {
                        buffer.remove(&name);
                    }
                    return false;
                };
                if let Some(buffer) = &mut self.buffer
                    && !buffer.admit(name, node, size, self.limit)
                {
                    self.dropped += 1;
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(buffer) = self.buffer.take() {
                    self.nodes = buffer;
                }
                if !self.synced {
                    info!(
                        nodes = self.nodes.len(),
                        "listed remote MeshNodes; watching"
                    );
                }
                self.synced = true;
                self.failures = 0;
                true
            }
            watcher::Event::Apply(node) => {
                let name = node.name_any();
                let known_oversized = self.oversized.contains(&name);
                let Some(size) = self.size(&name, &node) else {
                    // Its MeshPeer, if any, goes: a Conflict says why.
                    return self.nodes.remove(&name) || !known_oversized;
                };
                let changed = self
                    .nodes
                    .get(&name)
                    .is_none_or(|old| old.spec != node.spec || old.status != node.status);
                let was_oversized = self.oversized.remove(&name);
                if !self.nodes.admit(name, node, size, self.limit) {
                    self.dropped += 1;
                    return was_oversized;
                }
                changed || was_oversized
            }
            watcher::Event::Delete(node) => {
                let name = node.name_any();
                self.oversized.remove(&name) | self.nodes.remove(&name)
            }
        }
    }

    /// The size of `node` as kept, or `None` (and it is recorded as oversized) when it is
    /// over [`MAX_NODE_BYTES`].
    fn size(&mut self, name: &str, node: &MeshNode) -> Option<usize> {
        let size = serde_json::to_vec(node).map_or(usize::MAX, |v| v.len());
        if size > MAX_NODE_BYTES {
            if self.oversized.insert(name.to_owned()) {
                warn!(
                    node = name,
                    size,
                    max = MAX_NODE_BYTES,
                    "remote MeshNode too large; refused"
                );
            }
            return None;
        }
        Some(size)
    }
}

enum Seen {
    Synced(Plan),
    Stale(Outage),
}

/// `error` and its source, as one line.
fn error_text(error: &SyncError) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// The owner reference from a MeshPeer to its PeerCluster. The controller deletes MeshPeers
/// itself (finalizer); the reference shows ownership and lets a garbage collector help.
fn owner_reference(pc: &PeerCluster) -> OwnerReference {
    OwnerReference {
        api_version: PeerCluster::api_version(&()).into_owned(),
        kind: PeerCluster::kind(&()).into_owned(),
        name: pc.name_any(),
        uid: pc.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn watch(api: &Api<MeshNode>) -> WatchStream {
    watcher(
        api.clone(),
        watcher::Config::default()
            .timeout(WATCH_TIMEOUT_SECS)
            .page_size(PAGE_SIZE),
    )
    .boxed()
}

async fn next_event(
    session: &mut Option<WatchStream>,
) -> Option<watcher::Result<watcher::Event<MeshNode>>> {
    match session {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A one-item list of `api` at `server`, with a timeout.
async fn probe(api: &Api<MeshNode>, server: &str, timeout: Duration) -> Result<(), Outage> {
    match tokio::time::timeout(timeout, api.list_metadata(&ListParams::default().limit(1))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Outage {
            reason: outage_reason(&e),
            message: format!(
                "listing MeshNodes at {server}: {:#}",
                anyhow::Error::from(e)
            ),
        }),
        Err(_) => Err(Outage {
            reason: "RemoteUnreachable",
            message: format!("listing MeshNodes at {server}: no answer within {timeout:?}"),
        }),
    }
}

/// `RemoteForbidden` when the remote refuses our credentials, else `RemoteUnreachable`.
fn outage_reason(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => "RemoteForbidden",
        _ => "RemoteUnreachable",
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max.saturating_sub(3);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// Exponential delays between watch restarts, from `min` doubling to `max`. Also a
/// `kube` watcher backoff (`WatchStreamExt::backoff`), so that every watch of a linked
/// cluster retries on the same schedule (`Timing::watch_backoff_min` to `watch_backoff_max`).
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use wiremesh_proto::crd::PeerClusterSpec;

    use super::*;

    #[test]
    fn credentials_come_from_the_secret_token() {
        let pc = peer();
        let missing = Credentials::new(&pc, None);
        assert!(
            matches!(&missing, Credentials::Blocked { reason: "CredentialsMissing", message } if message.contains("cluster-b-token"))
        );
        let empty = Credentials::new(&pc, Some(&secret(b"  ")));
        assert!(matches!(empty, Credentials::Blocked { .. }));
        let ok = Credentials::new(&pc, Some(&secret(b"abc\n")));
        let Credentials::Usable(remote) = &ok else {
            panic!("{ok:?}")
        };
        assert_eq!(remote.token, "abc");
        assert!(
            !format!("{ok:?}").contains("abc"),
            "the token is never printed"
        );
    }

    #[test]
    fn fingerprint_follows_token_server_and_uid() {
        let pc = peer();
        let a = Credentials::new(&pc, Some(&secret(b"abc"))).fingerprint(&pc);
        assert_eq!(
            a,
            Credentials::new(&pc, Some(&secret(b"abc"))).fingerprint(&pc)
        );
        assert_ne!(
            a,
            Credentials::new(&pc, Some(&secret(b"abd"))).fingerprint(&pc)
        );
        let mut moved = pc.clone();
        moved.spec.api_server = "https://127.0.0.1:7443".into();
        assert_ne!(
            a,
            Credentials::new(&moved, Some(&secret(b"abc"))).fingerprint(&moved)
        );
        let mut again = pc.clone();
        again.metadata.uid = Some("other".into());
        assert_ne!(
            a,
            Credentials::new(&again, Some(&secret(b"abc"))).fingerprint(&again)
        );
        // The allowed CIDRs are read on every pass: changing them needs no restart.
        let mut widened = pc.clone();
        widened.spec.allowed_pod_cidrs.push("10.3.0.0/16".into());
        assert_eq!(
            a,
            Credentials::new(&widened, Some(&secret(b"abc"))).fingerprint(&widened)
        );
    }

    #[tokio::test]
    async fn client_accepts_an_ip_address_server_and_a_ca() {
        // Any PEM will do: the bundle is parsed, not used, until the first request.
        let remote = Remote {
            api_server: "https://127.0.0.1:6443".into(),
            ca_data: None,
            token: "t".into(),
        };
        assert!(remote.client().await.is_ok());
        let bad = Remote {
            api_server: "https://127.0.0.1:6443".into(),
            ca_data: Some("not base64!".into()),
            token: "t".into(),
        };
        assert!(bad.client().await.is_err());
    }

    #[test]
    fn a_list_replaces_the_nodes_only_when_complete() {
        let mut remote = RemoteNodes::default();
        remote.apply(watcher::Event::Apply(node("old", "10.2.9.0/24")));
        assert!(!remote.synced, "no picture before a complete list");
        assert!(!remote.apply(watcher::Event::Init));
        assert!(!remote.apply(watcher::Event::InitApply(node("b1", "10.2.1.0/24"))));
        // Mid-list, the last known picture stands.
        assert_eq!(remote.nodes.keys().collect::<Vec<_>>(), ["old"]);
        assert!(remote.apply(watcher::Event::InitDone));
        assert!(remote.synced);
        assert_eq!(remote.nodes.keys().collect::<Vec<_>>(), ["b1"]);
    }

    #[test]
    fn only_spec_changes_and_deletions_count() {
        let mut remote = RemoteNodes::default();
        remote.apply(watcher::Event::Init);
        remote.apply(watcher::Event::InitDone);
        assert!(remote.apply(watcher::Event::Apply(node("b1", "10.2.1.0/24"))));
        let mut status_only = node("b1", "10.2.1.0/24");
        status_only.status = Some(Default::default());
        status_only.metadata.resource_version = Some("2".into());
        assert!(!remote.apply(watcher::Event::Apply(status_only)));
        assert!(remote.nodes["b1"].status.is_none(), "statuses are not kept");
        assert!(remote.apply(watcher::Event::Apply(node("b1", "10.2.2.0/24"))));
        assert!(remote.apply(watcher::Event::Delete(node("b1", "10.2.2.0/24"))));
        assert!(!remote.apply(watcher::Event::Delete(node("b1", "10.2.2.0/24"))));
        assert!(remote.nodes.is_empty());
    }

    #[test]
    fn no_more_nodes_are_kept_than_the_limit() {
        let mut remote = RemoteNodes {
            limit: 2,
            ..RemoteNodes::default()
        };
        remote.apply(watcher::Event::Init);
        for name in ["b1", "b2", "b3"] {
            remote.apply(watcher::Event::InitApply(node(name, "10.2.1.0/24")));
        }
        remote.apply(watcher::Event::InitDone);
        assert_eq!(remote.nodes.len(), 2);
        assert_eq!(remote.dropped, 1);
        assert!(!remote.apply(watcher::Event::Apply(node("b4", "10.2.4.0/24"))));
        assert_eq!(remote.nodes.len(), 2);
        // A known node still follows its updates.
        let known = remote.nodes.keys().next().cloned().unwrap();
        assert!(remote.apply(watcher::Event::Apply(node(&known, "10.2.9.0/24"))));
    }

    #[tokio::test]
    async fn a_huge_answer_is_cut_off_and_the_link_goes_stale() {
        let (server, written) = huge_server().await;
        let remote = Remote {
            api_server: server.clone(),
            ca_data: None,
            token: "t".into(),
        };
        let api = Api::<MeshNode>::all(remote.client().await.unwrap());
        // The probe fails, naming the limit: the link is Stale, not crashed.
        let outage = probe(&api, &server, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(outage.reason, "RemoteUnreachable");
        assert!(
            outage.message.contains("a response body over 16 MiB"),
            "{}",
            outage.message
        );
        // A watch whose one event never ends fails the same way.
        let mut events = api
            .watch(&kube::api::WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        let error = events.next().await.unwrap().unwrap_err();
        let text = format!("{:#}", anyhow::Error::new(error));
        assert!(text.contains("a watch event over 16 MiB"), "{text}");
        // We read no more than the limit (and what the sockets buffer), not the 256 MiB
        // offered on each request.
        let written = written.load(Ordering::Relaxed);
        assert!(written < 2 * (40 << 20), "the server wrote {written} bytes");
    }

    #[test]
    fn oversized_nodes_are_refused_and_forgotten() {
        let mut remote = RemoteNodes::default();
        remote.apply(watcher::Event::Init);
        let mut huge = node("b2", "10.2.2.0/24");
        huge.spec.endpoints = vec!["198.18.2.2:51820".into(); MAX_NODE_BYTES / 16];
        remote.apply(watcher::Event::InitApply(node("b1", "10.2.1.0/24")));
        remote.apply(watcher::Event::InitApply(huge.clone()));
        remote.apply(watcher::Event::InitDone);
        assert_eq!(remote.nodes.keys().collect::<Vec<_>>(), ["b1"]);
        assert_eq!(remote.oversized.iter().collect::<Vec<_>>(), ["b2"]);
        // A node that grows too large is forgotten (its MeshPeer goes), once.
        let mut grown = node("b1", "10.2.1.0/24");
        grown.spec.endpoints = huge.spec.endpoints.clone();
        assert!(remote.apply(watcher::Event::Apply(grown.clone())));
        assert!(!remote.apply(watcher::Event::Apply(grown)));
        assert!(remote.nodes.is_empty());
        assert_eq!(remote.nodes.bytes, 0);
        // Back to a sane size, it is kept again.
        assert!(remote.apply(watcher::Event::Apply(node("b1", "10.2.1.0/24"))));
        assert_eq!(remote.oversized.iter().collect::<Vec<_>>(), ["b2"]);
        assert!(remote.apply(watcher::Event::Delete(huge)));
        assert!(remote.oversized.is_empty());
    }

    /// A fake API server on loopback that answers every request with a chunked body of
    /// 256 MiB without a newline, as fast as the client reads; the bytes it managed to
    /// write, over all requests.
    async fn huge_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let total = written.clone();
        tokio::spawn(async move {
            // Two requests: the probe's list and the watch.
            for _ in 0..2 {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let total = total.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                  Transfer-Encoding: chunked\r\n\r\n";
                    if socket.write_all(header.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 1 << 20];
                    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                    framed.extend_from_slice(&chunk);
                    framed.extend_from_slice(b"\r\n");
                    for _ in 0..256 {
                        if socket.write_all(&framed).await.is_err() {
                            return;
                        }
                        total.fetch_add(chunk.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        (url, written)
    }

    #[test]
    fn backoff_doubles_and_resets_as_a_watcher_backoff_too() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        let first: Vec<Duration> = b.by_ref().take(4).collect();
        assert_eq!(
            first,
            [500, 1000, 2000, 2000].map(Duration::from_millis).to_vec()
        );
        kube::runtime::utils::Backoff::reset(&mut b);
        assert_eq!(b.next(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        let delays: Vec<_> = (0..4).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [500, 1000, 2000, 2000].map(Duration::from_millis));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
    }

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let cut = truncate("é".repeat(600), MAX_NOTE);
        assert!(cut.len() <= MAX_NOTE);
        assert!(cut.ends_with("..."));
    }

    fn peer() -> PeerCluster {
        let mut pc = PeerCluster::new(
            "cluster-b",
            PeerClusterSpec {
                cluster_name: "cluster-b".into(),
                api_server: "https://127.0.0.1:6443".into(),
                ca_data: None,
                credentials_secret: "cluster-b-token".into(),
                allowed_pod_cidrs: vec!["10.2.0.0/16".into()],
                mesh_cidrs: Vec::new(),
                allowed_host_cidrs: Vec::new(),
            },
        );
        pc.metadata.uid = Some("uid".into());
        pc
    }

    fn node(name: &str, cidr: &str) -> MeshNode {
        crate::testing::mesh_node(name, 1, None, &[cidr])
    }

    fn secret(token: &[u8]) -> Secret {
        Secret {
            data: Some([(TOKEN_KEY.to_owned(), ByteString(token.to_vec()))].into()),
            ..Secret::default()
        }
    }
}
