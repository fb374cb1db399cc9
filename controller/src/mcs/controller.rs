//! The MCS controller (the leader only): one loop that, on any change (debounced) and
//! every resync period, runs both sides of KEP-1645 from its caches.
//!
//! - **Export side:** for each local `ServiceExport`, the Service it names and that
//!   Service's EndpointSlices become an `ExportedService` ([`export::exported`]),
//!   published as a `MeshServiceExport` that linked clusters read with their join token;
//!   the export's `Valid`/`Ready`/`Conflict` conditions ([`export::conditions`]), and a
//!   Warning Event when `Conflict` turns True or changes reason.
//! - **Import side:** this cluster's exports and every linked cluster's admitted ones
//!   ([`super::remote`]) go through [`plan::plan`] with the local namespaces, what exists
//!   and the unreachable remote nodes; the plan's ServiceImports (spec, then status),
//!   derived Services and EndpointSlices are applied and what it no longer wants deleted.
//!
//! Writes are server-side applies by [`FIELD_MANAGER`], made only when what is wanted
//! changed since the last successful write or the object is missing from the cache (and
//! all again every [`REWRITE`], level-triggered).
//!
//! **Fail static.** A linked cluster whose exports were never listed by this leader (its
//! API server was down when the leader started) might have imports here: nothing is
//! deleted while such a cluster exists, and its slices stay as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use wiremesh_proto::crd::{MeshServiceExport, MeshServiceExportSpec, mesh_service_export_name};
use wiremesh_proto::mcs::{
    ExportCondition, ExportedService, LABEL_SOURCE_CLUSTER, ServiceExport, ServiceImport,
};

use super::export;
use super::plan::{
    self, Existing, ExistingService, MANAGED_BY, MANAGED_BY_LABEL, ObjectKey, SERVICE_NAME_LABEL,
};
use crate::shared::{FIELD_MANAGER, Shared};

/// Quiet time after a change before a pass: a burst of watch events makes one pass.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Every object is written again this often, changed or not (someone may have edited it).
const REWRITE: Duration = Duration::from_secs(60);
/// Event notes are limited to 1 kB by the API.
const MAX_NOTE: usize = 1000;

/// Runs the MCS controller until aborted (leadership lost). Returns at once, with a
/// warning, when the MCS CRDs are not served (installed before MCS existed).
pub(crate) async fn run(shared: Arc<Shared>) {
    if let Err(missing) = check_crds(&shared).await {
        warn!(
            missing = %missing,
            "Multi-Cluster Services are off: CRDs not served; run `meshctl install` again"
        );
        return;
    }
    let wake = Arc::new(Notify::new());
    let mut feeds = JoinSet::new();
    let client = shared.client.clone();
    let exports = feed::<ServiceExport>(&mut feeds, Api::all(client.clone()), &wake);
    let services = feed::<Service>(&mut feeds, Api::all(client.clone()), &wake);
    let slices = feed::<EndpointSlice>(&mut feeds, Api::all(client.clone()), &wake);
    let namespaces = feed::<Namespace>(&mut feeds, Api::all(client.clone()), &wake);
    let imports = feed::<ServiceImport>(&mut feeds, Api::all(client.clone()), &wake);
    let published = feed::<MeshServiceExport>(&mut feeds, Api::all(client.clone()), &wake);
    let caches = Caches {
        exports,
        services,
        slices,
        namespaces,
        imports,
        published,
    };
    for ready in [
        caches.exports.wait_until_ready().await.is_ok(),
        caches.services.wait_until_ready().await.is_ok(),
        caches.slices.wait_until_ready().await.is_ok(),
        caches.namespaces.wait_until_ready().await.is_ok(),
        caches.imports.wait_until_ready().await.is_ok(),
        caches.published.wait_until_ready().await.is_ok(),
    ] {
        if !ready {
            return;
        }
    }
    info!("MCS caches synced");
    let mut state = State {
        written: BTreeMap::new(),
        rewrite_at: Instant::now() + REWRITE,
        endpoints: BTreeMap::new(),
        recorder: Recorder::new(shared.client.clone(), shared.reporter.clone()),
    };
    let mut peers = shared.mcs_peers.subscribe();
    let mut unreachable = shared.mcs_unreachable.clone();
    let mut local = shared.local.clone();
    loop {
        let started = std::time::Instant::now();
        let result = pass(&shared, &caches, &mut state).await;
        shared.metrics.run("mcs", started.elapsed(), result.err());
        tokio::select! {
            () = wake.notified() => {}
            _ = peers.changed() => {}
            _ = unreachable.changed() => {}
            _ = local.changed() => {}
            () = tokio::time::sleep(shared.timing.resync) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

struct Caches {
    exports: Store<ServiceExport>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    imports: Store<ServiceImport>,
    published: Store<MeshServiceExport>,
}

struct State {
    /// Digest of what was last written successfully, by object.
    written: BTreeMap<String, u64>,
    rewrite_at: Instant,
    /// Ready imported endpoints per source cluster after the last pass.
    endpoints: BTreeMap<String, usize>,
    recorder: Recorder,
}

/// Feeds a store from a watch of `api`; every event wakes the loop.
fn feed<K>(tasks: &mut JoinSet<()>, api: Api<K>, wake: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let wake = wake.clone();
    tasks.spawn(async move {
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        );
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => wake.notify_one(),
                Err(e) => debug!(kind = %K::kind(&()), error = %e, "MCS watch failed; retrying"),
            }
        }
    });
    store
}

async fn check_crds(shared: &Shared) -> Result<(), String> {
    let params = ListParams::default().limit(1);
    let client = &shared.client;
    let mut missing = Vec::new();
    let results = [
        (
            "serviceexports.multicluster.x-k8s.io",
            Api::<ServiceExport>::all(client.clone())
                .list_metadata(&params)
                .await
                .map(drop),
        ),
        (
            "serviceimports.multicluster.x-k8s.io",
            Api::<ServiceImport>::all(client.clone())
                .list_metadata(&params)
                .await
                .map(drop),
        ),
        (
            "meshserviceexports.wiremesh.io",
            Api::<MeshServiceExport>::all(client.clone())
                .list_metadata(&params)
                .await
                .map(drop),
        ),
    ];
    for (name, result) in results {
        if let Err(kube::Error::Api(s)) = result
            && s.code == 404
        {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// One pass of both sides. Every write is tried; the first failure's label is returned.
async fn pass(shared: &Shared, caches: &Caches, state: &mut State) -> Result<(), &'static str> {
    let cluster = match &shared.local.borrow().cluster {
        Some(Ok(info)) => info.name.clone(),
        _ => return Ok(()),
    };
    if Instant::now() >= state.rewrite_at {
        state.written.clear();
        state.rewrite_at = Instant::now() + REWRITE;
    }
    let mut failure: Option<&'static str> = None;

    // Export side: what this cluster publishes.
    let local_exports = caches.exports.state();
    let mut ours: Vec<ExportedService> = Vec::new();
    for e in &local_exports {
        let (Some(namespace), Some(name)) = (&e.metadata.namespace, &e.metadata.name) else {
            continue;
        };
        let service = caches.services.get(&ObjectRef::new(name).within(namespace));
        let Some(service) = service else { continue };
        if export::validity(e, Some(&*service)) != export::Validity::Valid {
            continue;
        }
        let slices = caches.slices.state();
        let slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_ref() == Some(namespace)
                    && s.labels().get(SERVICE_NAME_LABEL) == Some(name)
                    && s.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY)
            })
            .map(|s| &**s)
            .collect();
        if let Some(exported) = export::exported(&cluster, e, &service, &slices) {
            ours.push(exported);
        }
    }
    // Our nodes that host exported endpoints keep a heartbeat (failover from the data
    // plane, `crate::liveness`).
    let beating = crate::liveness::heartbeat_nodes(&cluster, &ours);
    shared.heartbeats.send_if_modified(|was| {
        let changed = was.as_ref() != Some(&beating);
        if changed {
            *was = Some(beating);
        }
        changed
    });
    let mut published: BTreeSet<ObjectKey> = BTreeSet::new();
    let api: Api<MeshServiceExport> = Api::all(shared.client.clone());
    for service in &ours {
        let name = mesh_service_export_name(&service.namespace, &service.name);
        let mut object = MeshServiceExport::new(
            &name,
            MeshServiceExportSpec {
                service: service.clone(),
            },
        );
        object.metadata.labels = Some(managed());
        let present = caches.published.get(&ObjectRef::new(&name)).is_some();
        match write(state, &api, &name, &object, present, false).await {
            Ok(()) => {
                published.insert(ObjectKey::new(&service.namespace, &service.name));
            }
            Err(()) => failure = failure.or(Some("publish")),
        }
    }
    let wanted: BTreeSet<String> = ours
        .iter()
        .map(|s| mesh_service_export_name(&s.namespace, &s.name))
        .collect();
    for stale in caches.published.state() {
        let name = stale.name_any();
        // Only ours: an object someone else wrote is theirs to delete.
        if stale.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
            continue;
        }
        if !wanted.contains(&name) && delete(state, &api, &name).await.is_err() {
            failure = failure.or(Some("publish"));
        }
    }

    // Import side: every cluster's exports, ours included.
    let linked: BTreeMap<String, String> = shared
        .peer_clusters
        .state()
        .iter()
        .filter(|pc| pc.metadata.deletion_timestamp.is_none())
        .map(|pc| (pc.name_any(), pc.spec.cluster_name.clone()))
        .collect();
    let peers = shared.mcs_peers.borrow().clone();
    let mut all = ours.clone();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for (peer, exports) in &peers {
        if !linked.contains_key(peer) || exports.cluster == cluster {
            continue;
        }
        all.extend(exports.admitted.services.values().cloned());
        refused.insert(peer.clone(), exports.admitted.refused.len());
    }
    let unknown: BTreeSet<&String> = linked
        .iter()
        .filter(|(peer, _)| !peers.contains_key(*peer))
        .map(|(_, cluster)| cluster)
        .collect();
    let namespaces: BTreeSet<String> = caches
        .namespaces
        .state()
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .map(|n| n.name_any())
        .collect();
    let existing = existing(caches);
    let unreachable = shared.mcs_unreachable.borrow().clone();
    let mut wanted = plan::plan(&all, &namespaces, &existing, &unreachable);
    if !unknown.is_empty() {
        // Fail static: some linked cluster's exports are not known yet.
        wanted.delete_imports.clear();
        wanted.delete_services.clear();
        let slices = caches.slices.state();
        wanted.delete_slices.retain(|key| {
            !slices.iter().any(|s| {
                s.metadata.namespace.as_ref() == Some(&key.namespace)
                    && s.metadata.name.as_ref() == Some(&key.name)
                    && s.labels()
                        .get(LABEL_SOURCE_CLUSTER)
                        .is_some_and(|c| unknown.contains(c))
            })
        });
    }
    for r in &wanted.rejected {
        debug!(cluster = %r.cluster, service = %r.service, field = %r.field, reason = %r.reason, "part of an export ignored");
    }

    // Conditions on our exports, now that the conflicts are known.
    let now = Time(Timestamp::now());
    for e in &local_exports {
        let (Some(namespace), Some(name)) = (&e.metadata.namespace, &e.metadata.name) else {
            continue;
        };
        let key = ObjectKey::new(namespace, name);
        let service = caches.services.get(&ObjectRef::new(name).within(namespace));
        let conflict = wanted
            .conflicts
            .get(&key)
            .filter(|c| c.clusters.contains(&cluster));
        let conditions = export::conditions(
            e,
            service.as_deref(),
            conflict,
            published.contains(&key),
            &now,
        );
        let current = e
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if same_conditions(&current, &conditions) {
            continue;
        }
        let api: Api<ServiceExport> = Api::namespaced(shared.client.clone(), namespace);
        let patch = json!({ "status": { "conditions": conditions } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match api.patch_status(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                warn!(export = %key, error = %e, "setting the conditions of a ServiceExport");
                failure = failure.or(Some("conditions"));
                continue;
            }
        }
        let was = condition(&current, ExportCondition::Conflict);
        let is = condition(&conditions, ExportCondition::Conflict);
        if let Some(is) = is
            && is.status == "True"
            && was.is_none_or(|w| w.status != "True" || w.reason != is.reason)
        {
            warn!(export = %key, reason = %is.reason, message = %is.message, "exported service conflicts");
            let event = K8sEvent {
                type_: EventType::Warning,
                reason: is.reason.chars().take(128).collect(),
                note: Some(is.message.chars().take(MAX_NOTE).collect()),
                action: "Export".to_owned(),
                secondary: None,
            };
            if let Err(err) = state.recorder.publish(&event, &e.object_ref(&())).await {
                warn!(error = %err, "recording a conflict Event");
            }
        }
    }

    // Apply the import plan.
    let client = &shared.client;
    for key in &wanted.replace_services {
        let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
        if delete(state, &api, &key.name).await.is_err() {
            failure = failure.or(Some("import"));
        }
    }
    for service in &wanted.services {
        let (namespace, name) = names(&service.metadata);
        let api: Api<Service> = Api::namespaced(client.clone(), &namespace);
        let present = caches
            .services
            .get(&ObjectRef::new(&name).within(&namespace))
            .is_some();
        if write(state, &api, &name, service, present, false)
            .await
            .is_err()
        {
            failure = failure.or(Some("import"));
        }
    }
    for import in &wanted.imports {
        let (namespace, name) = names(&import.metadata);
        let api: Api<ServiceImport> = Api::namespaced(client.clone(), &namespace);
        let cached = caches
            .imports
            .get(&ObjectRef::new(&name).within(&namespace));
        let spec = ServiceImport {
            status: None,
            ..import.clone()
        };
        let ok = write(state, &api, &name, &spec, cached.is_some(), false).await;
        let status = ServiceImport {
            spec: None,
            ..import.clone()
        };
        let status_present = cached.is_some_and(|c| c.status.is_some());
        let ok = ok.is_ok()
            && write(state, &api, &name, &status, status_present, true)
                .await
                .is_ok();
        if !ok {
            failure = failure.or(Some("import"));
        }
    }
    for slice in &wanted.slices {
        let (namespace, name) = names(&slice.metadata);
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
        let present = caches
            .slices
            .get(&ObjectRef::new(&name).within(&namespace))
            .is_some();
        if write(state, &api, &name, slice, present, false)
            .await
            .is_err()
        {
            failure = failure.or(Some("import"));
        }
    }
    for key in &wanted.delete_slices {
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &key.namespace);
        if delete(state, &api, &key.name).await.is_err() {
            failure = failure.or(Some("import"));
        }
    }
    for key in &wanted.delete_imports {
        let api: Api<ServiceImport> = Api::namespaced(client.clone(), &key.namespace);
        if delete(state, &api, &key.name).await.is_err() {
            failure = failure.or(Some("import"));
        }
    }
    for key in &wanted.delete_services {
        let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
        if delete(state, &api, &key.name).await.is_err() {
            failure = failure.or(Some("import"));
        }
    }

    let mut endpoints: BTreeMap<String, usize> = BTreeMap::new();
    for slice in &wanted.slices {
        if let Some(source) = slice.labels().get(LABEL_SOURCE_CLUSTER) {
            let ready = slice
                .endpoints
                .iter()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .count();
            *endpoints.entry(source.clone()).or_default() += ready;
        }
    }
    shared.metrics.mcs(
        ours.len(),
        wanted.imports.len(),
        &endpoints,
        &state.endpoints,
        &refused,
    );
    state.endpoints = endpoints;
    failure.map_or(Ok(()), Err)
}

/// Server-side applies `object` (its status when `status`) unless the same was written
/// last and the object is `present`.
async fn write<K>(
    state: &mut State,
    api: &Api<K>,
    name: &str,
    object: &K,
    present: bool,
    status: bool,
) -> Result<(), ()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Serialize,
{
    let body = serde_json::to_string(object).unwrap_or_default();
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    let digest = h.finish();
    let key = format!(
        "{}/{}/{name}{}",
        K::kind(&()),
        object.meta().namespace.as_deref().unwrap_or_default(),
        if status { "/status" } else { "" }
    );
    if present && state.written.get(&key) == Some(&digest) {
        return Ok(());
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let result = if status {
        api.patch_status(name, &params, &Patch::Apply(object)).await
    } else {
        api.patch(name, &params, &Patch::Apply(object)).await
    };
    match result {
        Ok(_) => {
            debug!(object = %key, "applied");
            state.written.insert(key, digest);
            Ok(())
        }
        Err(e) => {
            state.written.remove(&key);
            warn!(object = %key, error = %e, "MCS write failed; retrying");
            Err(())
        }
    }
}

async fn delete<K>(state: &mut State, api: &Api<K>, name: &str) -> Result<(), ()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    state
        .written
        .retain(|k, _| !k.starts_with(&format!("{}/", K::kind(&()))) || !k.contains(name));
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            info!(kind = %K::kind(&()), name, "deleted");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => {
            warn!(kind = %K::kind(&()), name, error = %e, "MCS delete failed; retrying");
            Err(())
        }
    }
}

/// What this cluster holds that the plan manages.
fn existing(caches: &Caches) -> Existing {
    let ours = |labels: &BTreeMap<String, String>| {
        labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
    };
    let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        let (namespace, name) = names(m);
        ObjectKey::new(namespace, name)
    };
    Existing {
        imports: caches
            .imports
            .state()
            .iter()
            .filter(|i| ours(i.labels()))
            .map(|i| key(&i.metadata))
            .collect(),
        services: caches
            .services
            .state()
            .iter()
            .filter(|s| ours(s.labels()))
            .map(|s| {
                let spec = s.spec.clone().unwrap_or_default();
                (
                    key(&s.metadata),
                    ExistingService {
                        cluster_ips: spec.cluster_ips.unwrap_or_default(),
                        ip_families: spec.ip_families.unwrap_or_default(),
                    },
                )
            })
            .collect(),
        slices: caches
            .slices
            .state()
            .iter()
            .filter(|s| ours(s.labels()))
            .map(|s| key(&s.metadata))
            .collect(),
    }
}

fn names(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn managed() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

fn condition(conditions: &[Condition], type_: ExportCondition) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Equal but for the precision of times the API server returns (seconds).
fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
                && x.last_transition_time.0.as_second() == y.last_transition_time.0.as_second()
        })
}
