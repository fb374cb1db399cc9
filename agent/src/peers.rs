//! The peer machinery Kubernetes mode and host mode share: watch the MeshPeers and this
//! cluster's MeshNodes, apply what [`Selection`] picks to the data plane incrementally, keep
//! the last known peers on disk, and report the tunnels in the MeshNode status.
//!
//! The data plane never waits for the API server: when it is unreachable the tunnels keep
//! what they have, and the watch catches up when it comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, reflector};
use kube::{Api, Client, Resource as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use wiremesh_core::translate::Translation;
use wiremesh_proto::crd::{CLUSTER_CONFIGMAP, MeshNode, MeshPeer, PeerCluster, SYSTEM_NAMESPACE};
use wiremesh_proto::uapi::DeviceUpdate;
use wiremesh_proto::{IpCidr, PublicKey};

use crate::control::Handle;
use crate::dataplane::{self, InterfaceSpec};
use crate::failclosed::{Attribution, Owner};
use crate::mesh::select::{Desired, Selection};
use crate::mesh::{self, Origins, PeerOrigin, PeerSet};
use crate::metrics::{AgentMetrics, Safety};

/// Field manager of everything the agent writes.
pub(crate) const MANAGER: &str = "wiremesh-agent";
/// How often the tunnels are looked at for a change worth a status write.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// The status is written at once when what it says changes (a tunnel's endpoints, path or
/// connection, the set of tunnels), else only this often, to refresh its counters:
/// counters belong in metrics, and a status rewritten every few seconds on every node is
/// load on the API server and on every controller that watches MeshNodes.
const STATUS_REFRESH: Duration = Duration::from_secs(300);
/// Watch events already waiting that one pass takes at most (each is only a store
/// update; the pass after them is O(peers)): a long burst still gets a pass now and then.
const MAX_BURST: usize = 4096;
/// How often the failover groups' members are checked for signs of life.
const FAILOVER_CHECK: Duration = Duration::from_millis(500);
/// Retry pause while the cluster ConfigMap cannot be read.
const RETRY: Duration = Duration::from_secs(2);
/// Keys of the cluster's pod, host and service CIDRs in the cluster ConfigMap
/// (comma-separated, as `meshctl install` writes them: `controller/src/install.rs`).
/// `meshCIDRs`: the ranges that stand for the pod CIDRs in the mesh when they are
/// translated ([`configmap_translation`]); no linked cluster may claim them either.
const LOCAL_RANGE_KEYS: [&str; 4] = ["podCIDRs", "hostCIDRs", "serviceCIDRs", MESH_CIDRS_KEY];
/// Key of the mesh CIDRs in the cluster ConfigMap: one per pod CIDR, in the same order.
const MESH_CIDRS_KEY: &str = "meshCIDRs";

/// How many peers the device may hold, and where refusals are reported.
#[derive(Debug, Clone)]
pub(crate) struct Limit {
    pub(crate) max_peers: usize,
    pub(crate) safety: Arc<Safety>,
}

/// Brings the data plane up with the `cached` peers (the last known ones; the spec holds
/// the last known prefix translation, so that no packet of theirs is handled
/// untranslated), before anything is asked of the API server; then waits for `setup` (given the data plane's
/// handle; it may wait for the API server) and runs the [`Context`] it gives (with its publisher, which ends when
/// this machine leaves the mesh) until SIGINT/SIGTERM.
///
/// An agent restarted during an API server outage so has its tunnels, from the cache,
/// for the whole outage.
pub(crate) async fn run_data_plane<S, P>(
    mut spec: InterfaceSpec,
    initial: DeviceUpdate,
    metrics_addr: Option<SocketAddr>,
    max_peers: usize,
    cached: Option<PeerSet>,
    setup: impl FnOnce(Handle) -> S + Send + 'static,
) -> Result<()>
where
    S: Future<Output = (Context, P)> + Send + 'static,
    P: Future<Output = ()> + Send + 'static,
{
    let metrics = crate::metrics::bind(metrics_addr).await?;
    let (origins_tx, origins_rx) = watch::channel(Origins::new());
    let (attribution_tx, attribution_rx) = watch::channel(Attribution::default());
    spec.attribution = Some(attribution_rx);
    let limit = Limit {
        max_peers,
        safety: Arc::clone(&spec.safety),
    };
    let ready = move |handle: Handle| {
        crate::metrics::spawn(
            metrics,
            AgentMetrics::new(handle.clone(), origins_rx, Arc::clone(&limit.safety)),
        );
        tokio::spawn(async move {
            let mut applied = PeerSet::new();
            if let Some(peers) = cached {
                info!(
                    peers = peers.len(),
                    "restoring the last known peers until the API server answers"
                );
                apply(&handle, &mut applied, peers, Some(&origins_tx), &limit).await;
                attribute(&applied, &attribution_tx);
            }
            let (context, publisher) = setup(handle.clone()).await;
            context
                .run(
                    handle,
                    applied,
                    origins_tx,
                    attribution_tx,
                    publisher,
                    limit,
                )
                .await;
        });
    };
    dataplane::run(spec, initial, ready, crate::shutdown_signal()).await
}

/// What the tunnel-building tasks of both modes share.
pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) selection: Selection,
    pub(crate) state_dir: PathBuf,
    /// Whether to watch PeerClusters, to learn which clusters are linked and so remove the
    /// fail-closed routes of one that was unlinked ([`crate::failclosed`]). A node's agent
    /// does; a host's credential cannot read PeerClusters, so a host keeps every range
    /// until `wiremesh-agent cleanup`.
    pub(crate) watch_linked: bool,
    /// Told `true` once the MeshPeers and MeshNodes were both listed and applied (what
    /// removing the startup taint waits for, with the fail-closed routes).
    pub(crate) synced: Option<watch::Sender<bool>>,
}

impl Context {
    async fn run(
        self,
        handle: Handle,
        applied: PeerSet,
        origins: watch::Sender<Origins>,
        attribution: watch::Sender<Attribution>,
        publisher: impl Future<Output = ()> + Send + 'static,
        limit: Limit,
    ) {
        let node_gone = tokio::spawn(publisher);
        if self.watch_linked {
            tokio::spawn(watch_linked(
                self.client.clone(),
                self.selection.own_cidrs.clone(),
                attribution.clone(),
            ));
        }
        let (watched, watched_rx) = watch::channel(BTreeMap::new());
        let (published, published_rx) = watch::channel(BTreeMap::new());
        tokio::spawn(report_status(
            self.client.clone(),
            self.selection.own_name.clone(),
            handle.clone(),
            (origins.subscribe(), watched_rx.clone(), published_rx),
        ));
        tokio::spawn(report_unreachable(
            self.client.clone(),
            self.selection.own_name.clone(),
            handle.clone(),
            watched_rx,
        ));
        let peers = self.watch_peers(
            handle.clone(),
            applied,
            (origins, attribution, watched, published),
            &limit,
        );
        tokio::pin!(peers);
        tokio::select! {
            () = &mut peers => {}
            _ = node_gone => {
                // Nobody builds tunnels to us any more: drop ours, and the cache, so a
                // restart does not bring them back.
                warn!("this machine left the mesh (its MeshNode was removed): dropping every tunnel");
                let update = DeviceUpdate {
                    replace_peers: true,
                    ..DeviceUpdate::default()
                };
                if let Err(e) = handle.apply(update).await {
                    warn!(error = %e, "dropping the tunnels");
                }
                for file in [CACHE_FILE, TRANSLATION_FILE] {
                    if let Err(e) = std::fs::remove_file(self.state_dir.join(file))
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        warn!(error = %e, file, "removing the peer cache");
                    }
                }
            }
        }
    }

    /// Mirrors MeshPeers and this cluster's MeshNodes (those [`LocalPeers`] selects) into
    /// the device until the task ends. Nothing changes until both lists were read once,
    /// so a restart never drops the tunnels of the list that answers second.
    async fn watch_peers(
        &self,
        handle: Handle,
        mut applied: PeerSet,
        (origins, attribution, watched, published): (
            watch::Sender<Origins>,
            watch::Sender<Attribution>,
            watch::Sender<Watched>,
            watch::Sender<Published>,
        ),
        limit: &Limit,
    ) {
        let (peers, peers_writer) = reflector::store();
        let peer_events = reflector(
            peers_writer,
            watcher::watcher(
                Api::<MeshPeer>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|e| (Source::MeshPeers, e.map(|e| changed(&e))));
        let (nodes, nodes_writer) = reflector::store();
        let node_events = reflector(
            nodes_writer,
            watcher::watcher(
                Api::<MeshNode>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|e| (Source::MeshNodes, e.map(|e| changed(&e))));
        let stream = futures::stream::select(peer_events, node_events);
        tokio::pin!(stream);
        let mut failing = [false; 2];
        let mut listed = [false; 2];
        let mut base: Option<Desired> = None;
        let mut active = mesh::Active::new();
        // The cache is written after the first complete pass even when nothing changed
        // (what was loaded may have been left out in part), then only on a change.
        let mut cached = false;
        let mut failover = tokio::time::interval(FAILOVER_CHECK);
        failover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (source, event) = tokio::select! {
                next = stream.next() => match next {
                    Some(next) => next,
                    None => return,
                },
                _ = failover.tick() => {
                    if let Some(base) = base.as_ref().filter(|b| !b.groups.is_empty()) {
                        let before = applied.clone();
                        reconcile(&handle, &mut applied, base, &mut active, &origins, limit).await;
                        attribute(&applied, &attribution);
                        publish_endpoints(&applied, &published);
                        if applied != before {
                            save_cache(&self.state_dir, &applied);
                        }
                    }
                    continue;
                }
            };
            // Every event already waiting (a burst of MeshPeers created one by one
            // arrives as one event each) is taken before the pass: one desired set, one
            // diff and one cache write per burst, not per event.
            let mut pending = Some((source, event));
            let mut taken = 0;
            let mut any_change = false;
            while let Some((source, event)) = pending.take() {
                let i = source as usize;
                match event {
                    Ok(Some(initial)) => {
                        if failing[i] {
                            info!(watch = ?source, "watch restored");
                            failing[i] = false;
                        }
                        listed[i] |= initial;
                        any_change = true;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if !failing[i] {
                            warn!(watch = ?source, error = %e, "watch failed; keeping the current tunnels");
                            failing[i] = true;
                        }
                    }
                }
                taken += 1;
                if taken < MAX_BURST {
                    pending = stream.next().now_or_never().flatten();
                }
            }
            if !any_change || listed != [true; 2] {
                continue;
            }
            let desired = base.insert(self.selection.desired(
                peers.state().iter().map(AsRef::as_ref),
                nodes.state().iter().map(AsRef::as_ref),
            ));
            watched.send_if_modified(|w| {
                let changed = *w != desired.watched;
                if changed {
                    w.clone_from(&desired.watched);
                }
                changed
            });
            let before = applied.clone();
            reconcile(&handle, &mut applied, desired, &mut active, &origins, limit).await;
            attribute(&applied, &attribution);
            publish_endpoints(&applied, &published);
            if applied != before || !cached {
                save_cache(&self.state_dir, &applied);
                cached = true;
            }
            if let Some(synced) = &self.synced {
                synced.send_if_modified(|s| !std::mem::replace(s, true));
            }
        }
    }
}

/// The endpoints each applied peer publishes, by key (for [`mesh::status`]).
type Published = BTreeMap<PublicKey, Vec<SocketAddr>>;
/// The MeshPeers with a heartbeat that have a tunnel here, by key: `Desired::watched`.
type Watched = BTreeMap<PublicKey, String>;

/// Tells the status task what each applied peer publishes: an observation elsewhere is
/// worth naming in the status.
fn publish_endpoints(applied: &PeerSet, published: &watch::Sender<Published>) {
    let now: Published = applied
        .iter()
        .map(|(key, p)| {
            let mut endpoints: Vec<SocketAddr> = p.endpoint.iter().copied().collect();
            endpoints.extend(p.endpoints.iter().filter(|e| Some(**e) != p.endpoint));
            (*key, endpoints)
        })
        .collect();
    published.send_if_modified(|p| {
        let changed = *p != now;
        if changed {
            *p = now;
        }
        changed
    });
}

/// Tells the route task whose each routed range is (the cluster of the peer it is routed
/// to; this cluster's own machines have none) and where the peers are (no fail-closed
/// route may cover an endpoint).
fn attribute(applied: &PeerSet, attribution: &watch::Sender<Attribution>) {
    let owners: BTreeMap<IpCidr, Owner> = applied
        .values()
        .flat_map(|p| {
            let owner = Owner::of_cluster(&p.origin.cluster);
            p.allowed_ips.iter().map(move |c| (*c, owner.clone()))
        })
        .collect();
    let endpoints: BTreeSet<IpAddr> = applied
        .values()
        .flat_map(|p| p.endpoint.iter().chain(&p.endpoints).map(SocketAddr::ip))
        .collect();
    attribution.send_if_modified(|a| {
        let changed = a.owners != owners || a.endpoints != endpoints;
        if changed {
            a.owners = owners;
            a.endpoints = endpoints;
        }
        changed
    });
}

/// Watches PeerClusters and tells the route task which clusters are linked and what they
/// were allowed (closed from then on), after each successful (re)list and each change
/// after it. First it reads this cluster's own ranges (`own_cidrs`, this node's, and the
/// cluster ConfigMap's pod, host and service CIDRs), which no allowance may overlap. While the
/// watch fails (the API server is unreachable, or the agent may not read PeerClusters) it
/// tells nothing new: the route task keeps every range.
async fn watch_linked(
    client: Client,
    own_cidrs: Vec<IpCidr>,
    attribution: watch::Sender<Attribution>,
) {
    let mut local_ranges = own_cidrs;
    local_ranges.extend(cluster_ranges(&client).await);
    attribution.send_modify(|a| a.local_ranges = local_ranges);
    let (store, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher::watcher(Api::<PeerCluster>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .map(|e| e.map(|e| changed(&e)));
    tokio::pin!(events);
    let mut listed = false;
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Some(initial)) => {
                if failing {
                    info!("PeerCluster watch restored");
                    failing = false;
                }
                listed |= initial;
                if !listed {
                    continue;
                }
                let state = store.state();
                let linked = linked_clusters(state.iter().map(AsRef::as_ref));
                let allowances = allowances(state.iter().map(AsRef::as_ref));
                attribution.send_if_modified(|a| {
                    let changed = a.linked.as_ref() != Some(&linked) || a.allowances != allowances;
                    if changed {
                        info!(clusters = ?linked, allowed = allowances.len(), "linked clusters");
                        a.linked = Some(linked);
                        a.allowances = allowances;
                    }
                    changed
                });
            }
            Ok(None) => {}
            Err(e) => {
                if !failing {
                    warn!(error = %e, "PeerCluster watch failed; keeping every fail-closed range");
                    failing = true;
                }
            }
        }
    }
}

/// The clusters linked: those with a PeerCluster that is not being deleted (`meshctl
/// unjoin` deletes it; the controller's finalizer holds it while it removes the
/// cluster's MeshPeers).
fn linked_clusters<'a>(peer_clusters: impl Iterator<Item = &'a PeerCluster>) -> BTreeSet<String> {
    peer_clusters
        .filter(|pc| pc.metadata.deletion_timestamp.is_none())
        .map(|pc| pc.spec.cluster_name.clone())
        .collect()
}

/// This cluster's pod, host and service CIDRs from its cluster ConfigMap; waits while the API
/// server does not answer. A ConfigMap that is missing or may not be read gives none (the
/// agent still protects its own node's pod CIDRs and addresses).
async fn cluster_ranges(client: &Client) -> Vec<IpCidr> {
    let data = cluster_configmap(client)
        .await
        .unwrap_or_else(|message| {
            warn!(error = %message, "cannot read the cluster ConfigMap: linked clusters' ranges are checked against this node's only");
            BTreeMap::new()
        });
    let (ranges, bad) = configmap_ranges(&data);
    for text in bad {
        warn!(configmap = CLUSTER_CONFIGMAP, value = %text, "not a CIDR; ignored");
    }
    ranges
}

/// The cluster ConfigMap's `data` (empty when it has none); waits while the API server
/// does not answer.
///
/// # Errors
/// The API server's message when the ConfigMap is missing or may not be read.
async fn cluster_configmap(client: &Client) -> Result<BTreeMap<String, String>, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let mut logged = false;
    loop {
        match api.get_opt(CLUSTER_CONFIGMAP).await {
            Ok(Some(cm)) => return Ok(cm.data.unwrap_or_default()),
            Ok(None) => return Err(format!("{SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP} not found")),
            Err(kube::Error::Api(status)) if status.code == 403 || status.code == 404 => {
                return Err(status.message);
            }
            Err(e) => {
                if !logged {
                    warn!(error = %e, "reading the cluster ConfigMap; retrying");
                    logged = true;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Sets this cluster's prefix translation from its cluster ConfigMap (read once, waiting
/// while the API server does not answer), persists it in the state directory, then
/// follows it ([`follow_translation`]). Awaited before any MeshPeer is read: a packet
/// from a peer for one of this cluster's mesh addresses is never handled untranslated
/// (untranslated, the kernel would route it by the mesh address, out of the node in
/// plaintext). `restored` is what the state directory held (already set).
pub(crate) async fn start_translation(
    client: Client,
    handle: Handle,
    state_dir: PathBuf,
    restored: Translation,
) {
    let translation = match cluster_configmap(&client).await {
        Ok(data) => match configmap_translation(&data) {
            Ok(translation) => {
                save_translation(&state_dir, &data);
                translation
            }
            Err(e) => {
                warn!(configmap = CLUSTER_CONFIGMAP, error = %e, "prefix translation unchanged");
                restored
            }
        },
        // Not readable now: the restored translation stays until the watch below sees the
        // ConfigMap (created later, or readable once RBAC allows).
        Err(message) => {
            warn!(error = %message, "cannot read the cluster ConfigMap: no prefix translation but the last known one");
            restored
        }
    };
    if !translation.limits_destinations() {
        warn!(
            configmap = CLUSTER_CONFIGMAP,
            "no podCIDRs known: packets from peers are delivered wherever the node routes them"
        );
    }
    if handle.set_translation(translation.clone()).await.is_err() {
        return;
    }
    tokio::spawn(follow_translation(client, handle, state_dir, translation));
}

/// Follows this cluster's prefix translation in its cluster ConfigMap (`podCIDRs` paired
/// in order with `meshCIDRs`, which `meshctl join` may write at any time) and hands each
/// change to the data plane (and to the state directory). A ConfigMap that is wrong is
/// said in a warning and the last good translation (`current` at first) kept.
async fn follow_translation(
    client: Client,
    handle: Handle,
    state_dir: PathBuf,
    mut current: Translation,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let config = watcher::Config::default().fields(&format!("metadata.name={CLUSTER_CONFIGMAP}"));
    let events = watcher::watcher(api, config)
        .default_backoff()
        .applied_objects();
    tokio::pin!(events);
    while let Some(event) = events.next().await {
        let cm = match event {
            Ok(cm) => cm,
            Err(e) => {
                debug!(error = %e, "watching the cluster ConfigMap");
                continue;
            }
        };
        let data = cm.data.unwrap_or_default();
        match configmap_translation(&data) {
            Ok(translation) if translation != current => {
                if handle.set_translation(translation.clone()).await.is_err() {
                    return;
                }
                save_translation(&state_dir, &data);
                current = translation;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(configmap = CLUSTER_CONFIGMAP, error = %e, "prefix translation unchanged");
            }
        }
    }
}

/// The translation a cluster ConfigMap's `data` asks for: each `podCIDRs` entry with the
/// `meshCIDRs` entry at the same place. No `meshCIDRs`: none (the pod CIDRs are unique).
/// With `podCIDRs`, the cluster's own ranges too (pod and service CIDRs): packets from
/// peers are delivered only there or passed on to another peer
/// ([`Translation::with_own_ranges`]).
///
/// # Errors
/// A value that is not a CIDR, lists of different lengths, or a table
/// [`Translation::new`] refuses; the message names the field and value.
pub(crate) fn configmap_translation(
    data: &BTreeMap<String, String>,
) -> Result<Translation, String> {
    let list = |key: &str| -> Result<Vec<IpCidr>, String> {
        data.get(key)
            .map_or("", String::as_str)
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| c.parse().map_err(|e| format!("{key}: {c}: {e}")))
            .collect()
    };
    // Where a packet from a peer may be delivered: this cluster's pod and service ranges
    // (or on to another peer: this cluster's hosts are peers, so an address of the host
    // range no host holds is no destination). Read leniently, as `configmap_ranges` does:
    // a bad entry is skipped, not a reason to drop the rule. No pod CIDRs (an install that
    // never named them): no such rule.
    let lenient = |key: &str| -> Vec<IpCidr> {
        data.get(key)
            .map_or("", String::as_str)
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect()
    };
    let own_pods = lenient("podCIDRs");
    let own: Option<Vec<IpCidr>> = (!own_pods.is_empty()).then(|| {
        own_pods
            .into_iter()
            .chain(lenient("serviceCIDRs"))
            .collect()
    });
    let limit = |t: Translation| match &own {
        Some(own) => t.with_own_ranges(own.clone()),
        None => t,
    };
    let mesh = list(MESH_CIDRS_KEY)?;
    if mesh.is_empty() {
        return Ok(limit(Translation::default()));
    }
    let pods = list("podCIDRs")?;
    let hosts = list("hostCIDRs")?;
    let services = list("serviceCIDRs")?;
    if pods.len() != mesh.len() {
        return Err(format!(
            "{MESH_CIDRS_KEY} has {} entries, podCIDRs {}: one mesh CIDR per pod CIDR",
            mesh.len(),
            pods.len()
        ));
    }
    let pairs: Vec<(IpCidr, IpCidr)> = pods.into_iter().zip(mesh).collect();
    // The cluster's hosts reach its pods, and its pods its hosts, by pod address.
    let mut local = hosts;
    local.extend(services);
    Translation::new(&pairs)
        .map(|t| limit(t.with_local(local)))
        .map_err(|e| format!("{MESH_CIDRS_KEY}: {e}"))
}

/// The pod, host and service CIDRs of a cluster ConfigMap's `data`, and the values that
/// are not CIDRs.
fn configmap_ranges(data: &BTreeMap<String, String>) -> (Vec<IpCidr>, Vec<String>) {
    let mut ranges = Vec::new();
    let mut bad = Vec::new();
    for key in LOCAL_RANGE_KEYS {
        let text = data.get(key).map_or("", String::as_str);
        for item in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match item.parse() {
                Ok(cidr) => ranges.push(cidr),
                Err(_) => bad.push(format!("{key}: {item}")),
            }
        }
    }
    (ranges, bad)
}

/// What the linked clusters were granted at join, each range with its cluster: the pod (or
/// mesh, when translated) and host CIDRs of each PeerCluster not being deleted (values that do not parse, which the
/// CRD's validation refuses, are skipped; a range granted twice keeps the first cluster
/// by name).
fn allowances<'a>(peer_clusters: impl Iterator<Item = &'a PeerCluster>) -> BTreeMap<IpCidr, Owner> {
    let mut linked: Vec<&PeerCluster> = peer_clusters
        .filter(|pc| pc.metadata.deletion_timestamp.is_none())
        .collect();
    linked.sort_by(|a, b| a.spec.cluster_name.cmp(&b.spec.cluster_name));
    let mut out = BTreeMap::new();
    for pc in linked {
        let spec = &pc.spec;
        // A translated cluster's pods are routed by its mesh CIDRs; its pod CIDRs are
        // its own business (and may well be ours too).
        let pods = if spec.mesh_cidrs.is_empty() {
            &spec.allowed_pod_cidrs
        } else {
            &spec.mesh_cidrs
        };
        for text in pods.iter().chain(&spec.allowed_host_cidrs) {
            if let Ok(cidr) = text.parse::<IpCidr>() {
                out.entry(cidr)
                    .or_insert_with(|| Owner::of_cluster(&spec.cluster_name));
            }
        }
    }
    out
}

/// Which watch an event came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    MeshPeers = 0,
    MeshNodes = 1,
}

/// `Some(true)` when the event completes a (re)list, `Some(false)` for another change,
/// `None` while a relist is still streaming in.
fn changed<K>(event: &Event<K>) -> Option<bool> {
    match event {
        Event::InitDone => Some(true),
        Event::Apply(_) | Event::Delete(_) => Some(false),
        Event::Init | Event::InitApply(_) => None,
    }
}

/// Picks each failover group's active member from what the device heard lately, then
/// applies the result.
async fn reconcile(
    handle: &Handle,
    applied: &mut PeerSet,
    desired: &Desired,
    active: &mut mesh::Active,
    origins: &watch::Sender<Origins>,
    limit: &Limit,
) {
    let chosen = if desired.groups.is_empty() {
        mesh::Active::new()
    } else {
        let heard = match handle.snapshot().await {
            Ok(snapshot) => snapshot
                .peers
                .iter()
                .map(|p| (p.public_key, mesh::Seen::of(p)))
                .collect(),
            Err(_) => return,
        };
        mesh::choose_active(&desired.groups, &heard, active)
    };
    for (group, key) in &chosen {
        if active.get(group) != Some(key) {
            let via = desired.peers.get(key).map(|p| p.origin.name.as_str());
            match active.get(group) {
                Some(_) => {
                    warn!(group = %group, via, "failover: routing the group through another member")
                }
                None => info!(group = %group, via, "routing the group through this member"),
            }
        }
    }
    *active = chosen;
    let target = mesh::materialize(&desired.peers, &desired.groups, active);
    apply(handle, applied, target, None, limit).await;
    // One map, sent once: the tunnels' origins, and the peers reached through a gateway
    // (no tunnel of their own; status still names them).
    let mut all: Origins = applied
        .iter()
        .map(|(k, p)| (*k, p.origin.clone()))
        .collect();
    for (key, origin) in &desired.via {
        all.entry(*key).or_insert_with(|| origin.clone());
    }
    origins.send_if_modified(|o| {
        let changed = *o != all;
        if changed {
            *o = all;
        }
        changed
    });
}

/// Moves the device from `applied` to `desired` (at most `limit.max_peers` of them, see
/// [`mesh::cap`]); on success publishes, if given `origins`, where each peer came from (for
/// the status reporter and the metric labels).
async fn apply(
    handle: &Handle,
    applied: &mut PeerSet,
    desired: PeerSet,
    origins: Option<&watch::Sender<Origins>>,
    limit: &Limit,
) {
    let (desired, refused) = mesh::cap(desired, limit.max_peers);
    let before = limit.safety.peers_refused(refused.len() as u64);
    if refused.len() as u64 != before && !refused.is_empty() {
        let first: Vec<String> = refused
            .iter()
            .take(5)
            .map(|o| format!("{}/{}", o.cluster, o.node))
            .collect();
        warn!(
            max_peers = limit.max_peers,
            refused = refused.len(),
            first = ?first,
            "more peers than --max-peers: the last by cluster and node name get no tunnel"
        );
    }
    let Some(update) = mesh::diff(applied, &desired) else {
        return;
    };
    match handle.apply(update).await {
        Ok(()) => {
            debug!(peers = desired.len(), "peers applied");
            if let Some(origins) = origins {
                origins.send_replace(
                    desired
                        .iter()
                        .map(|(k, p)| (*k, p.origin.clone()))
                        .collect(),
                );
            }
            *applied = desired;
        }
        Err(e) => warn!(error = %e, "the data plane refused the peers"),
    }
}

/// Records an Event on this node's MeshNode for each tunnel that went up or down.
async fn record_transitions(
    recorder: &Recorder,
    node: &ObjectReference,
    changes: &[(PublicKey, bool)],
    origins: &Origins,
) {
    for (key, up) in changes {
        let peer = origins
            .get(key)
            .map_or_else(|| key.to_string(), |o| format!("{}/{}", o.cluster, o.node));
        let (type_, reason, note) = if *up {
            (
                EventType::Normal,
                "TunnelUp",
                format!("tunnel to {peer} is up (handshake completed)"),
            )
        } else {
            (
                EventType::Warning,
                "TunnelDown",
                format!(
                    "tunnel to {peer} is down: no handshake for {}s",
                    mesh::TUNNEL_UP_WITHIN.as_secs()
                ),
            )
        };
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Handshake".to_owned(),
            // The MeshPeer is the related object: Events with the same reason on the
            // same MeshNode are merged into one series unless this differs.
            secondary: origins.get(key).map(|o| ObjectReference {
                api_version: Some(MeshPeer::api_version(&()).into_owned()),
                kind: Some(MeshPeer::kind(&()).into_owned()),
                name: Some(o.name.clone()),
                ..ObjectReference::default()
            }),
        };
        if let Err(e) = recorder.publish(&event, node).await {
            debug!(error = %e, reason, "recording an Event");
        }
    }
}

/// Writes the tunnels' state into the MeshNode status when it changes (at most every
/// [`STATUS_INTERVAL`], at least every [`STATUS_REFRESH`]), and records an Event on it
/// when a tunnel goes up or down. The status counts the tunnels and names only the
/// exceptions ([`mesh::status`]): its size does not grow with the number of peers.
async fn report_status(
    client: Client,
    name: String,
    handle: Handle,
    (origins, watched, published): (
        watch::Receiver<Origins>,
        watch::Receiver<Watched>,
        watch::Receiver<Published>,
    ),
) {
    let api: Api<MeshNode> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(name.clone()),
        },
    );
    let reference = ObjectReference {
        api_version: Some(MeshNode::api_version(&()).into_owned()),
        kind: Some(MeshNode::kind(&()).into_owned()),
        name: Some(name.clone()),
        // Events go to the agent's own namespace (its RBAC allows no other), not to
        // `default`, where a cluster-scoped object's Events would land otherwise.
        namespace: Some(SYSTEM_NAMESPACE.to_owned()),
        ..ObjectReference::default()
    };
    let mut tunnels: BTreeMap<PublicKey, bool> = BTreeMap::new();
    let mut ready_since: Option<Time> = None;
    let mut last_error: Option<String> = None;
    let mut written: Option<(serde_json::Value, tokio::time::Instant)> = None;
    let mut listed: BTreeMap<PublicKey, SocketAddr> = BTreeMap::new();
    loop {
        if let Ok(snapshot) = handle.snapshot().await {
            let now = k8s_openapi::jiff::Timestamp::now();
            let origins = origins.borrow().clone();
            let (changes, state) = mesh::tunnel_transitions(&tunnels, &snapshot.peers);
            tunnels = state;
            record_transitions(&recorder, &reference, &changes, &origins).await;
            let report = {
                let (watched, published) = (watched.borrow(), published.borrow());
                let known = mesh::status::Known {
                    origins: &origins,
                    watched: &watched,
                    published: &published,
                    listed: &listed,
                };
                mesh::status::report(&snapshot.peers, known, now)
            };
            listed.clone_from(&report.observed);
            let key = report.key();
            let due = last_error.is_some()
                || written
                    .as_ref()
                    .is_none_or(|(k, at)| *k != key || at.elapsed() >= STATUS_REFRESH);
            if !due {
                tokio::time::sleep(STATUS_INTERVAL).await;
                continue;
            }
            let since = ready_since.get_or_insert(Time(now)).clone();
            // `viaGateway`, which listed every peer reached through a gateway, is no
            // longer applied: the server drops it with this manager's ownership.
            let status = serde_json::json!({
                "apiVersion": MeshNode::api_version(&()),
                "kind": MeshNode::kind(&()),
                "status": {
                    "conditions": [Condition {
                        type_: "Ready".to_owned(),
                        status: "True".to_owned(),
                        reason: "DataPlaneConfigured".to_owned(),
                        message: format!("{} tunnels configured", snapshot.peers.len()),
                        last_transition_time: since,
                        observed_generation: None,
                    }],
                    "peers": report.peers,
                    "tunnels": report.summary,
                    "lastUpdateTime": Time(now),
                }
            });
            match api
                .patch_status(&name, &params, &Patch::Apply(&status))
                .await
            {
                Ok(_) => {
                    last_error = None;
                    written = Some((key, tokio::time::Instant::now()));
                }
                // Each new error once: the MeshNode may not exist yet at the first try.
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        warn!(error = %text, "writing the MeshNode status");
                    }
                    last_error = Some(text);
                }
            }
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    }
}

/// Field manager of the agent's `status.unreachable`: apart from [`MANAGER`]'s status
/// apply, which does not carry it and so must not own it.
const LIVENESS_MANAGER: &str = "wiremesh-agent-liveness";
/// How often the watched peers are looked at: a sixth of [`mesh::liveness::UNREACHABLE_AFTER`].
const LIVENESS_CHECK: Duration = Duration::from_millis(500);
/// Least time between two writes of `status.unreachable`: a flapping peer costs the API
/// server at most a write a second per node.
const LIVENESS_WRITE_GAP: Duration = Duration::from_secs(1);

/// Reports the watched peers (MeshPeers with a heartbeat) this machine has not heard from
/// lately in its MeshNode's `status.unreachable`, as soon as the list changes (at most a
/// write every [`LIVENESS_WRITE_GAP`]); once at start, so a list from before a restart
/// does not stay. Steady state: an empty list, no write.
async fn report_unreachable(
    client: Client,
    name: String,
    handle: Handle,
    watched: watch::Receiver<BTreeMap<PublicKey, String>>,
) {
    let api: Api<MeshNode> = Api::all(client);
    let params = PatchParams::apply(LIVENESS_MANAGER).force();
    let mut judge = mesh::liveness::Judge::default();
    let mut written: Option<Vec<String>> = None;
    let mut judged: Vec<String> = Vec::new();
    let mut last_write: Option<tokio::time::Instant> = None;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(LIVENESS_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let watched = watched.borrow().clone();
        let seen = if watched.is_empty() {
            BTreeMap::new()
        } else {
            match handle.snapshot().await {
                Ok(snapshot) => snapshot
                    .peers
                    .iter()
                    .filter(|p| watched.contains_key(&p.public_key))
                    .map(|p| (p.public_key, mesh::Seen::of(p)))
                    .collect(),
                Err(_) => continue,
            }
        };
        let report = judge.judge(&watched, &seen, std::time::Instant::now());
        if written.as_ref() == Some(&report)
            || last_write.is_some_and(|t| t.elapsed() < LIVENESS_WRITE_GAP)
        {
            continue;
        }
        if judged != report {
            let before: BTreeSet<&String> = judged.iter().collect();
            let now: BTreeSet<&String> = report.iter().collect();
            for peer in now.difference(&before) {
                warn!(%peer, "a peer with a heartbeat went silent: reported unreachable");
            }
            for peer in before.difference(&now) {
                info!(%peer, "a peer with a heartbeat answers again");
            }
            judged.clone_from(&report);
        }
        let status = serde_json::json!({
            "apiVersion": MeshNode::api_version(&()),
            "kind": MeshNode::kind(&()),
            "status": { "unreachable": report },
        });
        last_write = Some(tokio::time::Instant::now());
        match api
            .patch_status(&name, &params, &Patch::Apply(&status))
            .await
        {
            Ok(_) => {
                written = Some(report);
                last_error = None;
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    warn!(error = %text, "writing the MeshNode's unreachable peers");
                }
                last_error = Some(text);
            }
        }
    }
}

const CACHE_FILE: &str = "peers.json";
/// The cluster ConfigMap's entries the prefix translation is made of
/// ([`configmap_translation`]), as a JSON object: restored with the peer cache.
const TRANSLATION_FILE: &str = "translation.json";
/// The cluster ConfigMap's keys [`configmap_translation`] reads.
const TRANSLATION_KEYS: [&str; 4] = ["podCIDRs", MESH_CIDRS_KEY, "hostCIDRs", "serviceCIDRs"];

/// Persists the entries of the cluster ConfigMap's `data` the translation is made of.
fn save_translation(dir: &std::path::Path, data: &BTreeMap<String, String>) {
    let kept: BTreeMap<&str, &str> = TRANSLATION_KEYS
        .iter()
        .filter_map(|&k| data.get(k).map(|v| (k, v.as_str())))
        .collect();
    let write = || -> Result<()> {
        crate::state::write_atomic(&dir.join(TRANSLATION_FILE), &serde_json::to_vec(&kept)?)?;
        Ok(())
    };
    if let Err(e) = write() {
        warn!(error = %e, "saving the prefix translation");
    }
}

/// The last known prefix translation from the state directory: none when there is no
/// file; none, with a warning, when it does not parse or is refused.
pub(crate) fn load_translation(dir: &std::path::Path) -> Translation {
    let path = dir.join(TRANSLATION_FILE);
    let Ok(text) = std::fs::read(&path) else {
        return Translation::default();
    };
    match parse_translation(&text) {
        Ok(translation) => translation,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the saved prefix translation is refused; none until the cluster ConfigMap is read");
            Translation::default()
        }
    }
}

/// The translation a [`TRANSLATION_FILE`]'s bytes describe.
///
/// # Errors
/// When they are not a JSON object of strings, or as [`configmap_translation`].
fn parse_translation(text: &[u8]) -> Result<Translation, String> {
    let data: BTreeMap<String, String> = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    configmap_translation(&data)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedPeer {
    public_key: String,
    name: String,
    /// Absent in caches written before peers carried their origin.
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    node: String,
    endpoint: Option<SocketAddr>,
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
    allowed_ips: Vec<String>,
    #[serde(default)]
    accept_ips: Vec<String>,
    persistent_keepalive: u16,
}

fn save_cache(dir: &std::path::Path, peers: &PeerSet) {
    let list: Vec<CachedPeer> = peers
        .iter()
        .map(|(k, p)| CachedPeer {
            public_key: k.to_string(),
            name: p.origin.name.clone(),
            cluster: p.origin.cluster.clone(),
            node: p.origin.node.clone(),
            endpoint: p.endpoint,
            endpoints: p.endpoints.clone(),
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            accept_ips: p.accept_ips.iter().map(ToString::to_string).collect(),
            persistent_keepalive: p.persistent_keepalive,
        })
        .collect();
    let write = || -> Result<()> {
        crate::state::write_atomic(&dir.join(CACHE_FILE), &serde_json::to_vec(&list)?)?;
        Ok(())
    };
    if let Err(e) = write() {
        debug!(error = %e, "saving the peer cache");
    }
}

/// The last known peers from the state directory; `None` when there is no cache or it
/// does not parse. Peers the cache holds but the MeshPeer path would refuse are left out
/// (see [`parse_cache`]).
pub(crate) fn load_cache(dir: &std::path::Path) -> Option<PeerSet> {
    let path = dir.join(CACHE_FILE);
    let text = std::fs::read(&path).ok()?;
    let (set, refused) = match parse_cache(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the peer cache does not parse; ignored");
            return None;
        }
    };
    for reason in refused {
        warn!(path = %path.display(), %reason, "a cached peer refused");
    }
    Some(set)
}

/// The peers of a cache file, and why each one left out was: a key that does not parse or
/// is a low-order point (as [`mesh::desired_peer`] refuses a MeshPeer's), a CIDR that does
/// not parse. The cache lives on the node, but it holds what linked clusters published.
///
/// # Errors
/// When the file is not a JSON list of peers.
fn parse_cache(text: &[u8]) -> Result<(PeerSet, Vec<String>), serde_json::Error> {
    let list: Vec<CachedPeer> = serde_json::from_slice(text)?;
    let mut set = PeerSet::new();
    let mut refused = Vec::new();
    for p in list {
        let Ok(key) = p.public_key.parse::<PublicKey>() else {
            refused.push(format!(
                "{}: public key {:?} is not a WireGuard key",
                p.name, p.public_key
            ));
            continue;
        };
        if wiremesh_core::keys::is_low_order(&key) {
            refused.push(format!(
                "{}: public key {key} is a low-order point (every shared secret with it is zero)",
                p.name
            ));
            continue;
        }
        let cidrs = |texts: &[String]| -> Result<Vec<IpCidr>, String> {
            texts
                .iter()
                .map(|c| {
                    c.parse()
                        .map_err(|_| format!("{}: CIDR {c:?} does not parse", p.name))
                })
                .collect()
        };
        let (allowed_ips, accept_ips) = match (cidrs(&p.allowed_ips), cidrs(&p.accept_ips)) {
            (Ok(allowed), Ok(accept)) => (allowed, accept),
            (Err(reason), _) | (_, Err(reason)) => {
                refused.push(reason);
                continue;
            }
        };
        set.insert(
            key,
            mesh::DesiredPeer {
                origin: PeerOrigin {
                    name: p.name,
                    cluster: p.cluster,
                    node: p.node,
                    path: mesh::PeerPath::Direct,
                },
                endpoint: p.endpoint,
                endpoints: p.endpoints,
                allowed_ips,
                accept_ips,
                persistent_keepalive: p.persistent_keepalive,
            },
        );
    }
    Ok((set, refused))
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;
    use wiremesh_proto::crd::PeerClusterSpec;

    use super::*;

    /// A linked PeerCluster granted `pods` and `hosts`.
    fn peer_cluster(name: &str, pods: &[&str], hosts: &[&str]) -> PeerCluster {
        PeerCluster {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: PeerClusterSpec {
                cluster_name: name.to_owned(),
                api_server: "https://198.18.0.1:6443".to_owned(),
                ca_data: None,
                credentials_secret: format!("wiremesh-peer-{name}"),
                allowed_pod_cidrs: pods.iter().map(|c| (*c).to_owned()).collect(),
                mesh_cidrs: Vec::new(),
                allowed_host_cidrs: hosts.iter().map(|c| (*c).to_owned()).collect(),
            },
            status: None,
        }
    }

    #[test]
    fn a_cluster_whose_peer_cluster_is_being_deleted_is_no_longer_linked() {
        let pc = |name: &str, deleting: bool| {
            let mut pc = peer_cluster(name, &["10.2.0.0/16"], &[]);
            pc.metadata.deletion_timestamp =
                deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            pc
        };
        let all = [pc("cluster-b", false), pc("cluster-c", true)];
        assert_eq!(
            linked_clusters(all.iter()),
            BTreeSet::from(["cluster-b".to_owned()])
        );
        assert!(linked_clusters([].iter()).is_empty());
        // Its allowance is no longer closed either (the route task forgets it once the
        // cluster is unlinked).
        assert_eq!(
            allowances(all.iter()).keys().copied().collect::<Vec<_>>(),
            vec!["10.2.0.0/16".parse::<IpCidr>().unwrap()]
        );
    }

    #[test]
    fn a_linked_clusters_pod_and_host_ranges_are_closed_as_its_own() {
        let pc = peer_cluster;
        // The same range granted twice: the first cluster by name keeps it.
        let all = [
            pc("cluster-c", &["10.3.0.0/16", "10.2.0.0/16"], &[]),
            pc(
                "cluster-b",
                &["10.2.0.0/16", "fd10:2::/48", "not-a-cidr"],
                &["10.250.2.0/24"],
            ),
        ];
        let cidr = |s: &str| s.parse::<IpCidr>().unwrap();
        let b = Owner::Cluster("cluster-b".into());
        assert_eq!(
            allowances(all.iter()),
            BTreeMap::from([
                (cidr("10.2.0.0/16"), b.clone()),
                (cidr("10.250.2.0/24"), b.clone()),
                (cidr("10.3.0.0/16"), Owner::Cluster("cluster-c".into())),
                (cidr("fd10:2::/48"), b),
            ])
        );
    }

    #[test]
    fn the_cluster_configmap_gives_this_clusters_pod_host_and_service_ranges() {
        let data = BTreeMap::from([
            ("clusterName".to_owned(), "cluster-a".to_owned()),
            ("podCIDRs".to_owned(), "10.1.0.0/16, fd10:1::/48".to_owned()),
            ("serviceCIDRs".to_owned(), "10.96.0.0/12,bogus".to_owned()),
            ("hostCIDRs".to_owned(), "10.250.1.0/24".to_owned()),
        ]);
        let (ranges, bad) = configmap_ranges(&data);
        let expected: Vec<IpCidr> = [
            "10.1.0.0/16",
            "fd10:1::/48",
            "10.250.1.0/24",
            "10.96.0.0/12",
        ]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
        assert_eq!(ranges, expected);
        assert_eq!(bad, vec!["serviceCIDRs: bogus".to_owned()]);
        assert_eq!(configmap_ranges(&BTreeMap::new()), (Vec::new(), Vec::new()));
    }

    #[test]
    fn the_cluster_configmap_gives_the_translation_pairing_pod_and_mesh_cidrs_in_order() {
        let data = |pods: &str, mesh: &str| {
            BTreeMap::from([
                ("podCIDRs".to_owned(), pods.to_owned()),
                ("meshCIDRs".to_owned(), mesh.to_owned()),
            ])
        };
        let t = configmap_translation(&data(
            "10.244.0.0/16, fd00:10:244::/48",
            "100.64.0.0/16,fd64:1:2::/48",
        ))
        .unwrap();
        assert_eq!(
            t.pod_to_mesh("10.244.1.2".parse().unwrap()),
            Some("100.64.1.2".parse().unwrap())
        );
        assert!(
            configmap_translation(&data("10.244.0.0/16", ""))
                .unwrap()
                .is_empty()
        );
        let e = configmap_translation(&data("10.244.0.0/16", "100.64.0.0/16,100.65.0.0/16"))
            .unwrap_err();
        assert!(e.contains("2 entries"), "{e}");
        let e = configmap_translation(&data("10.244.0.0/16", "100.64.0.0/24")).unwrap_err();
        assert!(e.contains("100.64.0.0/24"), "{e}");
        let e = configmap_translation(&data("10.244.0.0/16", "nope")).unwrap_err();
        assert!(e.contains("meshCIDRs: nope"), "{e}");
        let (ranges, _) = configmap_ranges(&data("10.244.0.0/16", "100.64.0.0/16"));
        assert!(
            ranges.contains(&"100.64.0.0/16".parse().unwrap()),
            "a peer may not claim our mesh CIDR"
        );
    }

    #[test]
    fn the_cluster_configmap_limits_delivery_to_the_clusters_own_ranges() {
        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let plain = configmap_translation(&data(&[
            ("podCIDRs", "10.1.0.0/16,fd10:1::/48"),
            ("hostCIDRs", "10.250.1.0/24"),
            ("serviceCIDRs", "10.96.0.0/12"),
        ]))
        .unwrap();
        assert!(plain.is_empty(), "unique pod CIDRs: nothing to translate");
        for own in ["10.1.2.3", "fd10:1::7", "10.96.0.10"] {
            assert!(plain.delivers(ip(own)), "{own}");
        }
        // The hosts' range is reached through the host peers that hold its addresses: an
        // address of it no host holds is no destination (it would leave unencrypted).
        for other in [
            "169.254.169.254",
            "198.18.1.1",
            "8.8.8.8",
            "10.2.0.1",
            "fd10:2::1",
            "10.250.1.9",
        ] {
            assert!(!plain.delivers(ip(other)), "{other}");
        }
        // A value that is not a CIDR is skipped, not a reason to drop the rule.
        let typo = configmap_translation(&data(&[
            ("podCIDRs", "10.1.0.0/16"),
            ("serviceCIDRs", "10.96.0.0/12,bogus"),
        ]))
        .unwrap();
        assert!(typo.delivers(ip("10.96.0.10")));
        assert!(!typo.delivers(ip("169.254.169.254")));
        // Translated: the pod ranges as this cluster's pods have them; a mesh address left
        // untranslated (a table not known yet) is no destination.
        let translated = configmap_translation(&data(&[
            ("podCIDRs", "10.244.0.0/16"),
            ("meshCIDRs", "100.64.0.0/16"),
        ]))
        .unwrap();
        assert!(translated.delivers(ip("10.244.1.2")));
        assert!(!translated.delivers(ip("100.64.1.2")));
        // No pod CIDRs named: no rule (an older install), everything as before.
        let unknown = configmap_translation(&data(&[("serviceCIDRs", "10.96.0.0/12")])).unwrap();
        assert!(!unknown.limits_destinations());
        assert!(unknown.delivers(ip("169.254.169.254")));
    }

    #[test]
    fn the_translation_is_saved_and_restored_from_the_state_directory() {
        let dir = std::env::temp_dir().join(format!("wm-translation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load_translation(&dir).is_empty(), "no file: no translation");
        let data = BTreeMap::from([
            ("clusterName".to_owned(), "cluster-a".to_owned()),
            ("podCIDRs".to_owned(), "10.244.0.0/16".to_owned()),
            ("meshCIDRs".to_owned(), "100.64.0.0/16".to_owned()),
            ("hostCIDRs".to_owned(), "10.250.0.0/16".to_owned()),
            ("serviceCIDRs".to_owned(), "10.96.0.0/12".to_owned()),
        ]);
        save_translation(&dir, &data);
        let restored = load_translation(&dir);
        assert_eq!(restored, configmap_translation(&data).unwrap());
        assert_eq!(
            restored.pod_to_mesh("10.244.1.2".parse().unwrap()),
            Some("100.64.1.2".parse().unwrap())
        );
        // Only what the translation is made of is kept.
        let text = std::fs::read_to_string(dir.join(TRANSLATION_FILE)).unwrap();
        assert!(!text.contains("cluster-a"), "{text}");
        // A file that does not parse, or that the translation refuses, gives none.
        for bad in [
            &b"{not json"[..],
            b"[]",
            br#"{"podCIDRs":"10.244.0.0/16","meshCIDRs":"100.64.0.0/24"}"#,
            br#"{"podCIDRs":"10.244.0.0/16","meshCIDRs":7}"#,
        ] {
            std::fs::write(dir.join(TRANSLATION_FILE), bad).unwrap();
            assert!(load_translation(&dir).is_empty(), "{bad:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cached_peers_with_low_order_or_bad_keys_are_left_out() {
        // The identity point (a low-order key), a key that does not parse, a peer with a
        // bad CIDR, and a good peer.
        let low_order = PublicKey::from({
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        });
        assert!(wiremesh_core::keys::is_low_order(&low_order));
        let good = PublicKey::from([7u8; 32]);
        assert!(!wiremesh_core::keys::is_low_order(&good));
        let peer = |key: &str, name: &str, cidr: &str| {
            serde_json::json!({
                "public_key": key, "name": name, "cluster": "cluster-b", "node": name,
                "endpoint": "198.18.2.1:51820", "allowed_ips": [cidr],
                "persistent_keepalive": 25,
            })
        };
        let file = serde_json::to_vec(&serde_json::json!([
            peer(&low_order.to_string(), "evil", "10.2.9.0/24"),
            peer("not-a-key", "garbled", "10.2.8.0/24"),
            peer(
                &PublicKey::from([8u8; 32]).to_string(),
                "bad-cidr",
                "10.2.7.0/33"
            ),
            peer(&good.to_string(), "b1", "10.2.1.0/24"),
        ]))
        .unwrap();
        let (set, refused) = parse_cache(&file).unwrap();
        assert_eq!(set.keys().copied().collect::<Vec<_>>(), vec![good]);
        assert_eq!(set[&good].allowed_ips, vec!["10.2.1.0/24".parse().unwrap()]);
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(
            refused[0].contains("evil") && refused[0].contains("low-order"),
            "{refused:?}"
        );
        assert!(refused[1].contains("garbled"), "{refused:?}");
        assert!(refused[2].contains("10.2.7.0/33"), "{refused:?}");
        // The shell reads the same from a file.
        let dir = std::env::temp_dir().join(format!("wm-peer-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CACHE_FILE), &file).unwrap();
        assert_eq!(load_cache(&dir).unwrap(), set);
        std::fs::write(dir.join(CACHE_FILE), b"{not json").unwrap();
        assert!(load_cache(&dir).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
