//! The controller: leader election, the `PeerCluster` reconciler and the caches the links
//! plan from.
//!
//! Only the replica holding the Lease ([`crate::leader`]) runs anything here. It watches the
//! local PeerClusters (and the credentials Secrets they name), MeshPeers and MeshNodes and
//! the cluster ConfigMap. [`reconcile`] puts the finalizer on each PeerCluster, starts (or
//! restarts, when the API server, CA or token change) its link task ([`crate::remote`]),
//! and when the PeerCluster is deleted stops the task, deletes its MeshPeers and removes the
//! finalizer. A sweep stops links whose PeerCluster vanished and deletes MeshPeers left
//! without a PeerCluster (the test control planes have no garbage collector).
//! Losing the Lease drops all of it at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};
use wiremesh_proto::crd::{
    MeshNode, MeshPeer, PEER_CLUSTER_FINALIZER, PEER_CLUSTER_LABEL, PeerCluster, SYSTEM_NAMESPACE,
};

use crate::install::cluster_info;
use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::remote::{self, Credentials};
use crate::shared::{CONTROLLER_NAME, FIELD_MANAGER, LocalState, Shared, Timing};

/// Namespace and name of the Service (and its EndpointSlice) of the API server.
const API_SERVER_NAMESPACE: &str = "default";
const API_SERVER_SERVICE: &str = "kubernetes";

/// How to run the controller.
#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's identity in the Lease (unique per replica).
    pub identity: String,
    /// How long a Lease claim lasts.
    pub lease_duration: Duration,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The clocks.
    pub timing: Timing,
    /// Most nodes mirrored from one peer cluster; the rest are refused (a Conflict).
    pub max_nodes_per_peer: usize,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The CRDs are not installed.
    #[error(
        "the Wiremesh CRDs are not installed ({}); run `meshctl install --cluster-name NAME --pod-cidr CIDR` \
         (or `kubectl apply -f deploy/crds/`)",
        missing.join(", ")
    )]
    CrdsMissing {
        /// The missing kinds.
        missing: Vec<String>,
    },
    /// The API server refused or failed a request at start-up.
    #[error("{action}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The PeerCluster controller's stream ended (it should not).
    #[error("the PeerCluster controller stopped")]
    ControllerEnded,
    /// The metrics address could not be bound.
    #[error("listening on {addr} for metrics")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a reconcile failed (the variant names are metric labels).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the local API server failed.
    #[error("{action}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// MeshPeers of a deleted PeerCluster were still there after deleting them.
    #[error("{count} MeshPeers of PeerCluster {peer} remain after deleting them")]
    PeersRemain {
        /// The PeerCluster.
        peer: String,
        /// How many remain.
        count: usize,
    },
}

impl Error {
    /// Short name, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::PeersRemain { .. } => "peers_remain",
        }
    }
}

/// Checks that the three CRDs are served.
///
/// # Errors
/// [`RunError::CrdsMissing`] naming the missing kinds, or the API server's error.
pub async fn check_crds(client: &Client) -> Result<(), RunError> {
    let mut missing = Vec::new();
    let params = ListParams::default().limit(1);
    let results = [
        (
            "MeshNode",
            Api::<MeshNode>::all(client.clone())
                .list_metadata(&params)
                .await
                .map(drop),
        ),
        (
            "PeerCluster",
            Api::<PeerCluster>::all(client.clone())
                .list_metadata(&params)
                .await
                .map(drop),
        ),
        (
            "MeshPeer",
            Api::<MeshPeer>::all(client.clone())
                .list_metadata(&params)
                .await
                .map(drop),
        ),
    ];
    for (kind, result) in results {
        match result {
            Ok(()) => {}
            // An unknown resource is a bare "404 page not found", not a Status.
            Err(kube::Error::Api(s)) if s.code == 404 => missing.push(kind.to_owned()),
            Err(source) => {
                return Err(RunError::Kube {
                    action: format!("listing {kind}s to check the CRDs are installed"),
                    source,
                });
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RunError::CrdsMissing { missing })
    }
}

/// Runs the controller until `shutdown` completes: checks the CRDs, serves metrics, takes
/// part in the election and, while leading, reconciles. On shutdown it releases the Lease.
///
/// # Errors
/// Missing CRDs, an API server that cannot be read at start-up, or a metrics address that
/// cannot be bound.
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    check_crds(&client).await?;
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = options.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        tokio::spawn(wiremesh_http::serve(listener, metrics.clone()));
    }

    let (leading_tx, mut leading) = watch::channel(false);
    let (reachable_tx, mut reachable) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let elector = Elector::new(
        client.clone(),
        options.identity.clone(),
        options.lease_duration,
    );
    info!(identity = %options.identity, lease_duration = ?options.lease_duration, "joining the leader election");
    let elector = tokio::spawn(elector.run(leading_tx, reachable_tx, stop_rx));
    let health = metrics.clone();
    let reachability = tokio::spawn(async move {
        while reachable.changed().await.is_ok() {
            let ok = *reachable.borrow_and_update();
            health.health().lease_reachable.store(ok, Ordering::Relaxed);
        }
    });

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
        }
        metrics.set_leading(true);
        info!("leading: starting the reconcilers");
        let stepped_down = tokio::select! {
            () = &mut shutdown => false,
            _ = leading.wait_for(|l| !*l) => true,
            e = lead(client.clone(), &options, metrics.clone()) => {
                error!(error = format!("{:#}", anyhow::Error::from(e)), "the reconcilers stopped; restarting them");
                tokio::time::sleep(Duration::from_secs(1)).await;
                true
            }
        };
        metrics.set_leading(false);
        if !stepped_down {
            break;
        }
        info!("stopped the reconcilers");
    }
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = elector.await;
    reachability.abort();
    Ok(())
}

/// The reconciler's context: the shared state and the running links.
struct Context {
    shared: Arc<Shared>,
    links: Links,
}

/// Leads until dropped; returns only if the PeerCluster controller's stream ends.
async fn lead(client: Client, options: &Options, metrics: Arc<Metrics>) -> RunError {
    let timing = options.timing;
    let mut background = JoinSet::new();
    let (local_tx, local_rx) = watch::channel(LocalState {
        cluster: None,
        api_servers: Vec::new(),
    });
    let (mesh_peers, writer) = reflector::store::<MeshPeer>();
    background.spawn(reflect(
        Api::all(client.clone()),
        writer,
        local_tx.clone(),
        |_: &MeshPeer| String::new(),
    ));
    let (mesh_nodes, writer) = reflector::store::<MeshNode>();
    // The endpoints this cluster's machines observed their peers at feed the plans too.
    background.spawn(reflect(
        Api::all(client.clone()),
        writer,
        local_tx.clone(),
        |n: &MeshNode| format!("{:?}", crate::plan::observations_only(n.status.clone())),
    ));
    let (nodes, writer) = reflector::store::<Node>();
    // Nodes change status every few seconds; only their addresses and labels matter.
    background.spawn(reflect(
        Api::all(client.clone()),
        writer,
        local_tx.clone(),
        |n: &Node| {
            format!(
                "{:?}{:?}",
                crate::plan::node_addresses(n),
                n.metadata.labels
            )
        },
    ));
    background.spawn(crate::nodes::derive(
        client.clone(),
        mesh_nodes.clone(),
        nodes.clone(),
    ));
    background.spawn(poll_cluster_info(
        client.clone(),
        local_tx.clone(),
        timing.cluster_info_poll,
    ));

    let controller = Controller::new(
        Api::<PeerCluster>::all(client.clone()),
        watcher::Config::default(),
    );
    let peer_clusters = controller.store();
    let by_secret = peer_clusters.clone();
    let controller = controller.watches(
        Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), SYSTEM_NAMESPACE),
        watcher::Config::default(),
        move |secret| {
            let name = secret.name_any();
            by_secret
                .state()
                .into_iter()
                .filter(|pc| pc.spec.credentials_secret == name)
                .map(|pc| ObjectRef::from_obj(&*pc))
                .collect::<Vec<_>>()
        },
    );

    let caches = (
        peer_clusters.clone(),
        mesh_peers.clone(),
        mesh_nodes.clone(),
        nodes.clone(),
    );
    let synced = metrics.clone();
    background.spawn(async move {
        let (pcs, mps, mns, ns) = caches;
        let ready = wait_until_ready(&pcs).await
            && wait_until_ready(&mps).await
            && wait_until_ready(&mns).await
            && wait_until_ready(&ns).await;
        if ready {
            synced.health().caches_synced.store(true, Ordering::Relaxed);
            // The links wait for this before they plan.
            local_tx.send_modify(|_| ());
            info!("caches synced");
        }
    });

    // Failover from the data plane: the agents' reports -> the unreachable remote nodes;
    // the exports' endpoints -> our nodes' heartbeats.
    let (unreachable_tx, unreachable) = watch::channel(crate::liveness::Unreachable::new());
    background.spawn(crate::liveness::aggregate(
        client.clone(),
        mesh_nodes.clone(),
        mesh_peers.clone(),
        nodes.clone(),
        peer_clusters.clone(),
        metrics.clone(),
        unreachable_tx,
    ));
    let (heartbeats, heartbeats_rx) = watch::channel(None);
    background.spawn(crate::liveness::keep_heartbeats(
        client.clone(),
        mesh_nodes.clone(),
        heartbeats_rx,
    ));

    let reporter = Reporter {
        controller: CONTROLLER_NAME.to_owned(),
        instance: Some(options.identity.clone()),
    };
    let shared = Arc::new(Shared {
        mcs_peers: watch::channel(Default::default()).0,
        mcs_unreachable: unreachable,
        client: client.clone(),
        peer_clusters,
        mesh_peers,
        mesh_nodes,
        nodes,
        local: local_rx,
        recorder: Recorder::new(client, reporter.clone()),
        reporter,
        metrics,
        timing,
        max_nodes_per_peer: options.max_nodes_per_peer,
        heartbeats,
    });
    let ctx = Arc::new(Context {
        shared,
        links: Links::default(),
    });
    let _links = AbortLinksOnDrop(ctx.clone());
    background.spawn(sweep(ctx.clone()));
    background.spawn(crate::mcs::controller::run(ctx.shared.clone()));

    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                debug!(error = %e, "PeerCluster controller");
            }
            futures::future::ready(())
        })
        .await;
    RunError::ControllerEnded
}

async fn reconcile(pc: Arc<PeerCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_peer(&pc, &ctx).await;
    ctx.shared.metrics.run(
        "reconcile",
        started.elapsed(),
        result.as_ref().err().map(Error::label),
    );
    result
}

fn error_policy(pc: Arc<PeerCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(peer = %pc.name_any(), error = %chain(error), "reconcile failed");
    Action::requeue(ctx.shared.timing.sync_retry)
}

async fn reconcile_peer(pc: &PeerCluster, ctx: &Context) -> Result<Action, Error> {
    let name = pc.name_any();
    let api: Api<PeerCluster> = Api::all(ctx.shared.client.clone());
    let has_finalizer = pc.finalizers().iter().any(|f| f == PEER_CLUSTER_FINALIZER);

    if pc.metadata.deletion_timestamp.is_some() {
        if let Some(link) = ctx.links.take(&name) {
            link.abort();
            let _ = link.await;
            info!(peer = %name, "stopped the link of a deleted peer cluster");
        }
        let deleted = delete_mesh_peers(&ctx.shared.client, &name).await?;
        if has_finalizer {
            let rest: Vec<String> = pc
                .finalizers()
                .iter()
                .filter(|f| *f != PEER_CLUSTER_FINALIZER)
                .cloned()
                .collect();
            set_finalizers(&api, pc, rest).await?;
        }
        ctx.shared.metrics.forget_peer(&name);
        crate::mcs::remote::forget(&ctx.shared, &name);
        info!(peer = %name, mesh_peers = deleted, "peer cluster removed with its MeshPeers");
        return Ok(Action::await_change());
    }

    if !has_finalizer {
        let mut finalizers = pc.finalizers().to_vec();
        finalizers.push(PEER_CLUSTER_FINALIZER.to_owned());
        set_finalizers(&api, pc, finalizers).await?;
    }

    let secrets: Api<Secret> = Api::namespaced(ctx.shared.client.clone(), SYSTEM_NAMESPACE);
    let secret_name = &pc.spec.credentials_secret;
    let secret = secrets
        .get_opt(secret_name)
        .await
        .map_err(|source| Error::Kube {
            action: format!("reading Secret {SYSTEM_NAMESPACE}/{secret_name}"),
            source,
        })?;
    let credentials = Credentials::new(pc, secret.as_ref());
    let fingerprint = credentials.fingerprint(pc);
    let shared = ctx.shared.clone();
    let started = ctx.links.ensure(&name, fingerprint, |nudges| {
        // Its MeshNodes and its exported services (MCS) share the link's lifetime.
        let exports =
            crate::mcs::remote::watch_exports(shared.clone(), name.clone(), credentials.clone());
        let nodes = remote::mirror(shared, name.clone(), credentials, nudges);
        tokio::spawn(async move {
            tokio::join!(nodes, exports);
        })
    });
    if started {
        info!(peer = %name, api_server = %pc.spec.api_server, "started the link to a peer cluster");
    }
    // Another peer's allowed CIDRs may have changed: every link plans again.
    ctx.links.nudge_all();
    Ok(Action::requeue(ctx.shared.timing.requeue))
}

/// Sets a PeerCluster's finalizers, only if it did not change since it was read.
async fn set_finalizers(
    api: &Api<PeerCluster>,
    pc: &PeerCluster,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let name = pc.name_any();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": pc.resource_version(),
        }
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    match api.patch(&name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("setting the finalizers of PeerCluster {name}"),
            source,
        }),
    }
}

/// Deletes every MeshPeer of peer cluster `peer`; returns how many were deleted.
async fn delete_mesh_peers(client: &Client, peer: &str) -> Result<usize, Error> {
    let api: Api<MeshPeer> = Api::all(client.clone());
    let selector = ListParams::default().labels(&format!("{PEER_CLUSTER_LABEL}={peer}"));
    let list = |what: &'static str| {
        let (api, selector) = (api.clone(), selector.clone());
        async move {
            api.list_metadata(&selector)
                .await
                .map_err(|source| Error::Kube {
                    action: format!("listing the MeshPeers of {peer} {what}"),
                    source,
                })
        }
    };
    let mut deleted = 0;
    for mp in list("to delete them").await?.items {
        let name = mp.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                deleted += 1;
                info!(mesh_peer = %name, "deleted MeshPeer of a removed peer cluster");
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(source) => {
                return Err(Error::Kube {
                    action: format!("deleting MeshPeer {name}"),
                    source,
                });
            }
        }
    }
    let remaining = list("after deleting them").await?.items.len();
    if remaining > 0 {
        return Err(Error::PeersRemain {
            peer: peer.to_owned(),
            count: remaining,
        });
    }
    Ok(deleted)
}

/// Stops links whose PeerCluster vanished and deletes MeshPeers without a PeerCluster.
async fn sweep(ctx: Arc<Context>) {
    let shared = &ctx.shared;
    let mut tick = tokio::time::interval(shared.timing.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !shared
            .metrics
            .health()
            .caches_synced
            .load(Ordering::Relaxed)
        {
            continue;
        }
        for name in ctx.links.names() {
            if shared.peer_clusters.get(&ObjectRef::new(&name)).is_none() {
                if let Some(link) = ctx.links.take(&name) {
                    link.abort();
                }
                shared.metrics.forget_peer(&name);
                crate::mcs::remote::forget(shared, &name);
                info!(peer = %name, "stopped the link of a vanished peer cluster");
            }
        }
        let known: BTreeSet<String> = shared
            .peer_clusters
            .state()
            .iter()
            .map(|pc| pc.name_any())
            .collect();
        let orphaned: BTreeSet<String> = shared
            .mesh_peers
            .state()
            .iter()
            .filter_map(|mp| mp.labels().get(PEER_CLUSTER_LABEL).cloned())
            .filter(|peer| !known.contains(peer))
            .collect();
        let api: Api<PeerCluster> = Api::all(shared.client.clone());
        for peer in orphaned {
            // The cache may lag: ask the API server before deleting anything.
            match api.get_opt(&peer).await {
                Ok(None) => match delete_mesh_peers(&shared.client, &peer).await {
                    Ok(n) => {
                        info!(peer = %peer, mesh_peers = n, "deleted MeshPeers left without a PeerCluster")
                    }
                    Err(e) => warn!(peer = %peer, error = %e, "deleting orphaned MeshPeers"),
                },
                Ok(Some(_)) => {}
                Err(e) => debug!(peer = %peer, error = %e, "checking for orphaned MeshPeers"),
            }
        }
    }
}

/// Feeds a cache from a watch and ticks `local` when an object's generation changes (a spec
/// change; status updates, such as agents' tunnel reports, do not count) or it goes away.
/// Mirrors `api` into `writer`; pokes `local` when an object's generation changes, or
/// what `also` extracts from it (for what lives outside the spec).
async fn reflect<K>(
    api: Api<K>,
    writer: Writer<K>,
    local: watch::Sender<LocalState>,
    also: fn(&K) -> String,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut generations: BTreeMap<String, (Option<i64>, String)> = BTreeMap::new();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let changed = match event {
            Ok(watcher::Event::Init) => {
                generations.clear();
                false
            }
            Ok(watcher::Event::InitApply(obj)) => {
                generations.insert(obj.name_any(), (obj.meta().generation, also(&obj)));
                false
            }
            Ok(watcher::Event::InitDone) => true,
            Ok(watcher::Event::Apply(obj)) => {
                let seen = (obj.meta().generation, also(&obj));
                generations.insert(obj.name_any(), seen.clone()) != Some(seen)
            }
            Ok(watcher::Event::Delete(obj)) => generations.remove(&obj.name_any()).is_some(),
            Err(e) => {
                debug!(kind = %K::kind(&()), error = %e, "local watch failed; retrying");
                false
            }
        };
        if changed {
            local.send_modify(|_| ());
        }
    }
}

/// Waits until `store` has been filled by its first complete list; false if its writer
/// went away.
///
/// A store's readiness is a oneshot channel that wakes only its latest waiter, and the
/// Controller waits on the PeerCluster store too: so look again every 100 ms rather than
/// trust the wake-up.
async fn wait_until_ready<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(result) => return result.is_ok(),
            Err(_) => continue,
        }
    }
}

/// Reads the cluster ConfigMap now and then; a change ticks `local`.
async fn poll_cluster_info(client: Client, local: watch::Sender<LocalState>, period: Duration) {
    loop {
        let read = tokio::time::timeout(period, cluster_info(&client)).await;
        let cluster = match read {
            Ok(Ok(info)) => Some(Ok(info)),
            Ok(Err(e)) if e.is_not_installed() => Some(Err(e.to_string())),
            Ok(Err(e)) => {
                debug!(error = %e, "reading the cluster ConfigMap");
                None
            }
            Err(_) => None,
        };
        let read = api_server_addresses(&client).await;
        local.send_if_modified(|s| {
            let api_servers = next_api_servers(&s.api_servers, read);
            if s.api_servers == api_servers {
                return false;
            }
            info!(?api_servers, "this cluster's API server addresses");
            s.api_servers = api_servers;
            true
        });
        if let Some(cluster) = cluster {
            local.send_if_modified(|s| {
                if s.cluster.as_ref() == Some(&cluster) {
                    return false;
                }
                match &cluster {
                    Ok(info) => {
                        info!(cluster = %info.name, pod_cidrs = ?info.pod_cidrs, "this cluster")
                    }
                    Err(e) => warn!(error = %e, "the cluster ConfigMap is unusable; not mirroring"),
                }
                s.cluster = Some(cluster);
                true
            });
        }
        tokio::time::sleep(period).await;
    }
}

/// One read of this cluster's API server addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiServersRead {
    /// What was read, sorted and deduplicated.
    pub(crate) addresses: Vec<IpAddr>,
    /// Every read succeeded (an object that does not exist counts as read: it holds no
    /// address); false when one failed (no permission, API server down).
    pub(crate) complete: bool,
}

/// The API server addresses to reserve after `read`, given those reserved before: a
/// complete read replaces them; after a failed one the last good set stays (with any new
/// address read), so an API server error never un-reserves an address.
pub(crate) fn next_api_servers(previous: &[IpAddr], read: ApiServersRead) -> Vec<IpAddr> {
    if read.complete {
        return read.addresses;
    }
    let mut kept: Vec<IpAddr> = previous.iter().copied().chain(read.addresses).collect();
    kept.sort_unstable();
    kept.dedup();
    kept
}

/// This cluster's API server addresses: the cluster IPs of Service `default/kubernetes`
/// and the addresses of its EndpointSlice.
pub(crate) async fn api_server_addresses(client: &Client) -> ApiServersRead {
    let mut out = Vec::new();
    let mut complete = true;
    let services: Api<Service> = Api::namespaced(client.clone(), API_SERVER_NAMESPACE);
    match services.get_opt(API_SERVER_SERVICE).await {
        Ok(Some(service)) => out.extend(
            service
                .spec
                .and_then(|s| s.cluster_ips)
                .unwrap_or_default()
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok()),
        ),
        Ok(None) => {}
        Err(e) => {
            complete = false;
            debug!(error = %e, "reading Service default/kubernetes");
        }
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), API_SERVER_NAMESPACE);
    match slices.get_opt(API_SERVER_SERVICE).await {
        Ok(Some(slice)) => out.extend(
            slice
                .endpoints
                .iter()
                .flat_map(|e| &e.addresses)
                .filter_map(|ip| ip.parse::<IpAddr>().ok()),
        ),
        Ok(None) => {}
        Err(e) => {
            complete = false;
            debug!(error = %e, "reading EndpointSlice default/kubernetes");
        }
    }
    out.sort_unstable();
    out.dedup();
    ApiServersRead {
        addresses: out,
        complete,
    }
}

/// The running link tasks, by PeerCluster name.
#[derive(Default)]
struct Links {
    tasks: Mutex<BTreeMap<String, LinkTask>>,
}

struct LinkTask {
    fingerprint: u64,
    nudge: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl Links {
    /// Starts the link for `name` unless one with the same fingerprint runs; true if started.
    fn ensure(
        &self,
        name: &str,
        fingerprint: u64,
        start: impl FnOnce(mpsc::Receiver<()>) -> JoinHandle<()>,
    ) -> bool {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if tasks
            .get(name)
            .is_some_and(|t| t.fingerprint == fingerprint && !t.handle.is_finished())
        {
            return false;
        }
        if let Some(old) = tasks.remove(name) {
            old.handle.abort();
        }
        // One pending nudge is enough: the task plans from the current state anyway.
        let (nudge, nudges) = mpsc::channel(1);
        tasks.insert(
            name.to_owned(),
            LinkTask {
                fingerprint,
                nudge,
                handle: start(nudges),
            },
        );
        true
    }

    fn nudge_all(&self) {
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        for task in tasks.values() {
            let _ = task.nudge.try_send(());
        }
    }

    fn take(&self, name: &str) -> Option<JoinHandle<()>> {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.remove(name).map(|t| t.handle)
    }

    fn names(&self) -> Vec<String> {
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.keys().cloned().collect()
    }

    fn abort_all(&self) -> Vec<String> {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        let tasks = std::mem::take(&mut *tasks);
        tasks
            .into_iter()
            .map(|(name, task)| {
                task.handle.abort();
                name
            })
            .collect()
    }
}

/// Aborts every link when leadership ends (the future of [`lead`] is dropped).
struct AbortLinksOnDrop(Arc<Context>);

impl Drop for AbortLinksOnDrop {
    fn drop(&mut self) {
        for name in self.0.links.abort_all() {
            self.0.shared.metrics.forget_peer(&name);
        }
    }
}

/// An error and its sources, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut chain = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    chain.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn links_restart_only_when_the_fingerprint_changes() {
        let links = Links::default();
        let spawn = |_: mpsc::Receiver<()>| tokio::spawn(std::future::pending::<()>());
        assert!(links.ensure("b", 1, spawn));
        assert!(!links.ensure("b", 1, spawn));
        assert!(links.ensure("b", 2, spawn));
        assert_eq!(links.names(), ["b"]);
        let handle = links.take("b").unwrap();
        handle.abort();
        assert!(handle.await.unwrap_err().is_cancelled());
        assert!(links.names().is_empty());
    }

    #[tokio::test]
    async fn a_finished_link_is_started_again() {
        let links = Links::default();
        assert!(links.ensure("b", 1, |_| tokio::spawn(async {})));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(links.ensure("b", 1, |_| tokio::spawn(std::future::pending::<()>())));
        assert_eq!(links.abort_all(), ["b"]);
    }

    #[test]
    fn a_failed_read_keeps_the_last_good_api_server_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let good = vec![ip("10.96.0.1"), ip("198.18.1.10")];
        // The API server refused one read: nothing is un-reserved.
        let failed = ApiServersRead {
            addresses: Vec::new(),
            complete: false,
        };
        assert_eq!(next_api_servers(&good, failed), good);
        // A partial read adds what it saw and still drops nothing.
        let partial = ApiServersRead {
            addresses: vec![ip("10.96.0.1"), ip("198.18.1.11")],
            complete: false,
        };
        assert_eq!(
            next_api_servers(&good, partial),
            [ip("10.96.0.1"), ip("198.18.1.10"), ip("198.18.1.11")]
        );
        // A complete read is the truth, even when an address went away.
        let moved = ApiServersRead {
            addresses: vec![ip("10.96.0.1"), ip("198.18.1.12")],
            complete: true,
        };
        assert_eq!(
            next_api_servers(&good, moved),
            [ip("10.96.0.1"), ip("198.18.1.12")]
        );
    }

    #[test]
    fn crds_missing_names_the_install_command() {
        let e = RunError::CrdsMissing {
            missing: vec!["PeerCluster".into()],
        };
        let text = e.to_string();
        assert!(
            text.contains("PeerCluster") && text.contains("meshctl install"),
            "{text}"
        );
    }
}
