//! One linked cluster's published exports: a watch of its `MeshServiceExport`s with the
//! join token (the link's credentials, [`crate::remote::Remote`]), each checked by
//! [`admit`] against what the cluster was granted, into [`Shared::mcs_peers`].
//!
//! **Fail static.** While the peer's API server cannot be read, its last listed exports
//! stay (the data plane may still reach its pods; withdrawing them would fail every
//! request while only the API server is down); a new list replaces them whole. They go
//! only when the peer is unlinked ([`forget`]).
//!
//! **Bounded** as the MeshNode watch: pages of [`PAGE_SIZE`], every response body or
//! watch event under [`crate::limit::MAX_RESPONSE_BYTES`], at most
//! [`MAX_EXPORTS_PER_PEER`] objects of at most [`MAX_EXPORT_BYTES`] each are kept.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource as _, ResourceExt as _};
use tracing::{Instrument as _, debug, info, info_span, warn};
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::MeshServiceExport;

use super::admit::{self, Admitted, Grant, MAX_EXPORT_BYTES, MAX_EXPORTS_PER_PEER};
use crate::remote::{Credentials, PAGE_SIZE};
use crate::shared::Shared;

/// Server-side timeout of each watch request; the watcher reconnects after it.
const WATCH_TIMEOUT_SECS: u32 = 120;
/// How often the kept exports are checked again against the grant (a PeerCluster's
/// allowed CIDRs or this cluster's ranges may change without an export changing).
const RECHECK: Duration = Duration::from_secs(10);

/// Each linked cluster's exports, by PeerCluster name.
pub type PeerExportMap = BTreeMap<String, PeerExports>;

/// One linked cluster's exports as last listed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerExports {
    /// Its cluster name.
    pub cluster: String,
    /// What was kept, and what refused.
    pub admitted: Admitted,
}

/// Forgets peer `name`'s exports (it was unlinked): its imports are withdrawn.
pub(crate) fn forget(shared: &Shared, name: &str) {
    shared
        .mcs_peers
        .send_if_modified(|m| m.remove(name).is_some());
}

/// Watches peer `name`'s MeshServiceExports until aborted.
pub(crate) async fn watch_exports(shared: Arc<Shared>, name: String, credentials: Credentials) {
    let span = info_span!("mcs", peer = %name);
    async move {
        let Credentials::Usable(remote) = credentials else {
            // The MeshNode link reports why in the PeerCluster's status.
            return;
        };
        let client = match remote.client().await {
            Ok(client) => client,
            Err(e) => {
                warn!(error = %e, "no client for the peer's exports");
                return;
            }
        };
        let api: Api<MeshServiceExport> = Api::all(client);
        let stream = watcher(
            api,
            watcher::Config::default()
                .timeout(WATCH_TIMEOUT_SECS)
                .page_size(PAGE_SIZE),
        )
        // The MeshNode link's schedule (at most 5 s), not kube's default (up to 30 s):
        // after the peer's API server comes back, its exports are read again within
        // seconds.
        .backoff(crate::remote::Backoff::new(
            shared.timing.watch_backoff_min,
            shared.timing.watch_backoff_max,
        ));
        futures::pin_mut!(stream);
        let mut kept = Objects::default();
        let mut listing: Option<Objects> = None;
        let mut listed = false;
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = recheck.tick() => {
                    if listed {
                        publish(&shared, &name, &kept);
                    }
                    continue;
                }
            };
            let Some(event) = event else { return };
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    listing = Some(Objects::default());
                    false
                }
                Ok(watcher::Event::InitApply(object)) => {
                    if let Some(listing) = &mut listing {
                        listing.admit(object);
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = listing.take() {
                        kept = listing;
                    }
                    if !listed {
                        info!(exports = kept.objects.len(), "listed the peer's exported services");
                    }
                    listed = true;
                    true
                }
                Ok(watcher::Event::Apply(object)) => {
                    kept.admit(object);
                    true
                }
                Ok(watcher::Event::Delete(object)) => kept.objects.remove(&object.name_any()).is_some(),
                Err(e) => {
                    // The watcher starts over with a list; until then the last list stays.
                    debug!(error = %e, "watch of the peer's exports failed; keeping the last known");
                    false
                }
            };
            if changed && listed {
                publish(&shared, &name, &kept);
            }
        }
    }
    .instrument(span)
    .await;
}

/// The peer's objects, bounded in number and size.
#[derive(Default)]
struct Objects {
    objects: BTreeMap<String, MeshServiceExport>,
    /// Too large or past the count, by name: refused with the reason.
    over: BTreeMap<String, String>,
}

impl Objects {
    fn admit(&mut self, mut object: MeshServiceExport) {
        let name = object.name_any();
        object.metadata.managed_fields = None;
        object.metadata.annotations = None;
        let size = serde_json::to_vec(&object).map_or(usize::MAX, |v| v.len());
        self.over.remove(&name);
        if size > MAX_EXPORT_BYTES {
            self.objects.remove(&name);
            self.over
                .insert(name, format!("{size} bytes, over {MAX_EXPORT_BYTES}"));
        } else if !self.objects.contains_key(&name) && self.objects.len() > MAX_EXPORTS_PER_PEER {
            // One past the cap is kept, so that admit() names the refused one.
            self.over
                .insert(name, format!("more than {MAX_EXPORTS_PER_PEER} exports"));
        } else {
            self.objects.insert(name, object);
        }
    }
}

/// Checks the kept objects against the peer's current grant and publishes the result.
fn publish(shared: &Shared, name: &str, kept: &Objects) {
    let Some(pc) = shared.peer_clusters.get(&ObjectRef::new(name)) else {
        return;
    };
    let ours: Vec<IpCidr> = {
        let local = shared.local.borrow();
        match &local.cluster {
            Some(Ok(info)) => info
                .pod_cidrs
                .iter()
                .chain(&info.service_cidrs)
                .chain(&info.mesh_cidrs)
                .copied()
                .collect(),
            // Without this cluster's ranges nothing can be checked: keep what was.
            _ => return,
        }
    };
    let grant = Grant {
        cluster: pc.spec.cluster_name.clone(),
        pod_cidrs: pc
            .spec
            .allowed_pod_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        // meshCIDRs that do not pair with the grant (which the controller also reports
        // on the peer's nodes): nothing is mapped, and every endpoint of a peer whose
        // pod CIDRs overlap ours is refused as lying in this cluster's range.
        maps: crate::plan::mesh_maps(&pc).unwrap_or_default(),
        ours,
    };
    let objects: Vec<MeshServiceExport> = kept.objects.values().cloned().collect();
    let mut admitted = admit::admit(&grant, &objects);
    admitted
        .refused
        .extend(kept.over.iter().map(|(object, reason)| admit::Refusal {
            object: object.clone(),
            field: "metadata".to_owned(),
            reason: reason.clone(),
        }));
    admitted.refused.sort();
    let next = PeerExports {
        cluster: grant.cluster,
        admitted,
    };
    shared.mcs_peers.send_if_modified(|m| {
        if m.get(name) == Some(&next) {
            return false;
        }
        let before = m.get(name).map(|p| p.admitted.refused.clone());
        for r in &next.admitted.refused {
            if !before.as_ref().is_some_and(|b| b.contains(r)) {
                warn!(
                    object = %r.object,
                    field = %r.field,
                    reason = %r.reason,
                    kind = %MeshServiceExport::kind(&()),
                    "refused an exported service of a peer cluster"
                );
            }
        }
        m.insert(name.to_owned(), next);
        true
    });
}
