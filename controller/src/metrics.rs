//! The controller's metrics and what its health endpoint (served by [`wiremesh_http`])
//! answers: `/metrics`, `/healthz` (the process runs) and `/readyz` (the Lease can be read
//! and, on the leader, the local caches are synced).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which loop ran: `reconcile` (a PeerCluster: finalizer, link task) or `sync` (one
/// mirror pass of a peer cluster's nodes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// `reconcile` or `sync`.
    pub kind: &'static str,
}

/// A failed run, by its error's short name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `reconcile` or `sync`.
    pub kind: &'static str,
    /// The error variant, such as `kube` or `apply`.
    pub error: &'static str,
}

/// Per peer cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The PeerCluster's name.
    pub peer: String,
}

/// Per source cluster of imported services.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The exporting cluster's name.
    pub cluster: String,
}

/// Everything the controller counts.
pub struct Metrics {
    mcs_exports: Gauge,
    mcs_imports: Gauge,
    mcs_endpoints: Family<ClusterLabels, Gauge>,
    mcs_withdrawals: Family<ClusterLabels, Counter>,
    mcs_refused: Family<PeerLabels, Gauge>,
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<RunLabels, Histogram>,
    leader: Gauge,
    peer_nodes: Family<PeerLabels, Gauge>,
    peer_stale: Family<PeerLabels, Gauge>,
    peer_conflicts: Family<PeerLabels, Gauge>,
    peer_unreachable: Family<PeerLabels, Gauge>,
    health: Health,
}

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Health {
    /// The last look at the Lease succeeded.
    pub lease_reachable: AtomicBool,
    /// This replica leads.
    pub leading: AtomicBool,
    /// The leader's local caches (PeerClusters, MeshPeers, MeshNodes) are synced.
    pub caches_synced: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wiremesh_controller");
        let runs = Family::<RunLabels, Counter>::default();
        registry.register("runs", "Reconcile and sync runs", runs.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "failures",
            "Failed reconcile and sync runs, by error",
            failures.clone(),
        );
        let duration = Family::<RunLabels, Histogram>::new_with_constructor(|| {
            // 1 ms to ~16 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        registry.register(
            "run_duration_seconds",
            "Duration of reconcile and sync runs",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let peer_nodes = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_nodes",
            "Remote nodes mirrored as MeshPeers",
            peer_nodes.clone(),
        );
        let peer_stale = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_stale",
            "1 while a peer cluster's API server cannot be read",
            peer_stale.clone(),
        );
        let peer_conflicts = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_conflicts",
            "Remote nodes refused",
            peer_conflicts.clone(),
        );
        let mcs_exports = Gauge::default();
        registry.register(
            "mcs_exports",
            "Services this cluster exports (valid ServiceExports published)",
            mcs_exports.clone(),
        );
        let mcs_imports = Gauge::default();
        registry.register(
            "mcs_imports",
            "ServiceImports in this cluster",
            mcs_imports.clone(),
        );
        let mcs_endpoints = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "mcs_endpoints",
            "Ready imported endpoints, by source cluster",
            mcs_endpoints.clone(),
        );
        let mcs_withdrawals = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "mcs_withdrawals",
            "Imported endpoints withdrawn (no longer ready, or gone), by source cluster",
            mcs_withdrawals.clone(),
        );
        let mcs_refused = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "mcs_refused_exports",
            "Exported services of a peer cluster refused (out of grant, malformed, over a bound)",
            mcs_refused.clone(),
        );
        let peer_unreachable = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_unreachable_nodes",
            "Remote nodes this cluster's data plane cannot reach (their imported endpoints are not ready)",
            peer_unreachable.clone(),
        );
        Self {
            mcs_exports,
            mcs_imports,
            mcs_endpoints,
            mcs_withdrawals,
            mcs_refused,
            registry,
            runs,
            failures,
            duration,
            leader,
            peer_nodes,
            peer_stale,
            peer_conflicts,
            peer_unreachable,
            health: Health::default(),
        }
    }

    /// Counts a run of `kind` that took `elapsed`; `error` names the failure, if any.
    pub fn run(&self, kind: &'static str, elapsed: Duration, error: Option<&'static str>) {
        self.runs.get_or_create(&RunLabels { kind }).inc();
        self.duration
            .get_or_create(&RunLabels { kind })
            .observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            self.failures
                .get_or_create(&FailureLabels { kind, error })
                .inc();
        }
    }

    /// Records a peer cluster's state after a sync.
    pub fn peer(&self, peer: &str, nodes: Option<usize>, stale: bool, conflicts: Option<usize>) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        if let Some(nodes) = nodes {
            self.peer_nodes
                .get_or_create(&labels)
                .set(i64::try_from(nodes).unwrap_or(i64::MAX));
        }
        self.peer_stale.get_or_create(&labels).set(i64::from(stale));
        if let Some(conflicts) = conflicts {
            self.peer_conflicts
                .get_or_create(&labels)
                .set(i64::try_from(conflicts).unwrap_or(i64::MAX));
        }
    }

    /// Forgets a deleted peer cluster.
    pub fn forget_peer(&self, peer: &str) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.peer_nodes.remove(&labels);
        self.peer_stale.remove(&labels);
        self.peer_conflicts.remove(&labels);
        self.peer_unreachable.remove(&labels);
    }

    /// Records how many of a peer cluster's nodes are unreachable ([`crate::liveness`]).
    pub fn peer_unreachable(&self, peer: &str, nodes: usize) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.peer_unreachable
            .get_or_create(&labels)
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
    }

    /// Records a pass of the MCS controller: exports published, imports, ready
    /// endpoints per source cluster now (a cluster that had some and is absent now counts
    /// as zero) and before, refused exports per peer.
    pub fn mcs(
        &self,
        exports: usize,
        imports: usize,
        endpoints: &std::collections::BTreeMap<String, usize>,
        before: &std::collections::BTreeMap<String, usize>,
        refused: &std::collections::BTreeMap<String, usize>,
    ) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.mcs_exports.set(count(exports));
        self.mcs_imports.set(count(imports));
        for (cluster, was) in before {
            let now = endpoints.get(cluster).copied().unwrap_or(0);
            let labels = ClusterLabels {
                cluster: cluster.clone(),
            };
            if now < *was {
                self.mcs_withdrawals
                    .get_or_create(&labels)
                    .inc_by(u64::try_from(was - now).unwrap_or(u64::MAX));
            }
            if now == 0 {
                self.mcs_endpoints.remove(&labels);
            }
        }
        for (cluster, now) in endpoints {
            self.mcs_endpoints
                .get_or_create(&ClusterLabels {
                    cluster: cluster.clone(),
                })
                .set(count(*now));
        }
        self.mcs_refused.clear();
        for (peer, n) in refused {
            self.mcs_refused
                .get_or_create(&PeerLabels { peer: peer.clone() })
                .set(count(*n));
        }
    }

    /// Records whether this replica leads.
    pub fn set_leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        self.health.leading.store(leading, Ordering::Relaxed);
        if !leading {
            self.health.caches_synced.store(false, Ordering::Relaxed);
        }
    }

    /// What `/readyz` answers from.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// True when `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        let h = &self.health;
        h.lease_reachable.load(Ordering::Relaxed)
            && (!h.leading.load(Ordering::Relaxed) || h.caches_synced.load(Ordering::Relaxed))
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        wiremesh_http::encode(&self.registry)
    }
}

impl wiremesh_http::Source for Metrics {
    async fn metrics(&self) -> Result<String, String> {
        Ok(self.render())
    }

    async fn ready(&self) -> Result<(), String> {
        if Metrics::ready(self) {
            Ok(())
        } else {
            Err("the lease cannot be read or the caches are not synced".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_runs_failures_and_peers() {
        let m = Metrics::new();
        m.run("sync", Duration::from_millis(3), None);
        m.run("sync", Duration::from_millis(3), Some("apply"));
        m.peer("cluster-b", Some(2), true, Some(1));
        let text = m.render();
        assert!(
            text.contains("wiremesh_controller_runs_total{kind=\"sync\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_controller_failures_total{kind=\"sync\",error=\"apply\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_controller_peer_nodes{peer=\"cluster-b\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_controller_peer_stale{peer=\"cluster-b\"} 1"),
            "{text}"
        );
        m.forget_peer("cluster-b");
        assert!(!m.render().contains("cluster-b"));
    }

    #[test]
    fn mcs_counts_endpoints_and_withdrawals_per_cluster() {
        let m = Metrics::new();
        let map = |v: &[(&str, usize)]| {
            v.iter()
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let none = map(&[]);
        m.mcs(
            1,
            1,
            &map(&[("cluster-b", 2), ("cluster-c", 2)]),
            &none,
            &none,
        );
        m.mcs(
            1,
            1,
            &map(&[("cluster-c", 1)]),
            &map(&[("cluster-b", 2), ("cluster-c", 2)]),
            &map(&[("cluster-b", 1)]),
        );
        let text = m.render();
        for line in [
            "wiremesh_controller_mcs_imports 1",
            "wiremesh_controller_mcs_endpoints{cluster=\"cluster-c\"} 1",
            "wiremesh_controller_mcs_withdrawals_total{cluster=\"cluster-b\"} 2",
            "wiremesh_controller_mcs_withdrawals_total{cluster=\"cluster-c\"} 1",
            "wiremesh_controller_mcs_refused_exports{peer=\"cluster-b\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        assert!(
            !text.contains("mcs_endpoints{cluster=\"cluster-b\"}"),
            "{text}"
        );
    }

    #[test]
    fn ready_needs_the_lease_and_on_the_leader_the_caches() {
        let m = Metrics::new();
        assert!(!m.ready());
        m.health().lease_reachable.store(true, Ordering::Relaxed);
        assert!(m.ready());
        m.set_leading(true);
        assert!(!m.ready());
        m.health().caches_synced.store(true, Ordering::Relaxed);
        assert!(m.ready());
    }
}
