//! The agent's metrics, served with `/healthz` and `/readyz` by the endpoint the controller
//! shares ([`wiremesh_http`]).
//!
//! The counters live in the core's [`Device`](wiremesh_core::Device), owned by the data-plane
//! thread with no atomics on the packet path. A scrape asks that thread for a [`Snapshot`]
//! and encodes it through a prometheus-client [`Collector`], so 10,000 peers cost nothing
//! between scrapes and no metric family has to follow the peer table. Scrapes and probes
//! within [`SNAPSHOT_MAX_AGE`] of a snapshot share it, so however often they come the
//! data-plane thread takes at most one snapshot a second.
//!
//! Every sample carries `interface`; per-peer samples also `peer` (the public key in
//! base64), `peer_cluster` and `peer_node` (the MeshPeer's `spec.cluster` and `spec.node` in
//! Kubernetes mode, empty strings in standalone mode and for peers added with `wg set`).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};

use crate::control::{Handle, Snapshot};
use crate::mesh::Origins;
use wiremesh_core::PeerView;

/// How long a snapshot serves later scrapes and probes: Prometheus scrapes every 15 s or
/// more, so only a flood of requests ever shares one.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// What the agent's shells report besides the data plane's counters: the fail-closed
/// routes' standing (see [`crate::failclosed::Standing`]) and the peers over
/// `--max-peers`. Shared by the route task, the peer machinery and the endpoint.
#[derive(Debug, Default)]
pub struct Safety {
    fail_closed_errors: AtomicU64,
    fail_closed_problem: std::sync::Mutex<Option<String>>,
    /// Passes of the route task that left every range closed and persisted, with the
    /// linked clusters known (see [`Safety::closed_passes`]).
    closed_passes: AtomicU64,
    peers_refused: AtomicU64,
    peers_refused_total: AtomicU64,
}

impl Safety {
    /// Records the fail-closed set's standing after a pass of the route task: failures
    /// since start, and why it is not in force (which makes the agent not ready), if it is
    /// not; `linked_known` when the pass knew the linked clusters (their grants included).
    pub fn fail_closed(&self, errors: u64, problem: Option<String>, linked_known: bool) {
        self.fail_closed_errors.store(errors, Ordering::Relaxed);
        if problem.is_none() && linked_known {
            self.closed_passes.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut p) = self.fail_closed_problem.lock() {
            *p = problem;
        }
    }

    /// How many passes of the route task left every range closed and persisted, with the
    /// linked clusters known: one more than at some moment means a complete pass since.
    pub fn closed_passes(&self) -> u64 {
        self.closed_passes.load(Ordering::Relaxed)
    }

    /// Records how many peers are refused now for being over `--max-peers` (a rise counts
    /// in the total) and returns how many were before.
    pub fn peers_refused(&self, now: u64) -> u64 {
        let before = self.peers_refused.swap(now, Ordering::Relaxed);
        if now > before {
            self.peers_refused_total
                .fetch_add(now - before, Ordering::Relaxed);
        }
        before
    }

    fn problem(&self) -> Option<String> {
        self.fail_closed_problem.lock().ok().and_then(|p| p.clone())
    }
}

/// What the endpoint serves for the agent.
#[derive(Debug)]
pub struct AgentMetrics {
    handle: Handle,
    origins: watch::Receiver<Origins>,
    cache: SnapshotCache<Snapshot>,
    safety: Arc<Safety>,
}

impl AgentMetrics {
    /// Metrics of the data plane behind `handle`, with the peer cluster and node of each peer
    /// looked up in `origins` (which Kubernetes mode keeps current).
    pub fn new(handle: Handle, origins: watch::Receiver<Origins>, safety: Arc<Safety>) -> Self {
        Self {
            handle,
            origins,
            cache: SnapshotCache::default(),
            safety,
        }
    }

    /// A snapshot at most [`SNAPSHOT_MAX_AGE`] old.
    async fn snapshot(&self) -> Result<Snapshot> {
        self.cache
            .get(Instant::now(), || self.handle.snapshot())
            .await
    }

    /// Metrics of a data plane whose peers have no origin (standalone mode).
    pub fn standalone(handle: Handle) -> Self {
        Self::new(handle, watch::channel(Origins::new()).1, Arc::default())
    }
}

impl wiremesh_http::Source for AgentMetrics {
    async fn metrics(&self) -> Result<String, String> {
        let snapshot = self.snapshot().await.map_err(|e| format!("{e:#}"))?;
        Ok(render(snapshot, &self.origins.borrow(), &self.safety))
    }

    /// Ready while the data plane, configured before the endpoint starts, answers, and
    /// every fail-closed range has its route and is persisted.
    async fn ready(&self) -> Result<(), String> {
        self.snapshot().await.map_err(|e| format!("{e:#}"))?;
        match self.safety.problem() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }
}

/// The last value fetched and when: a request within [`SNAPSHOT_MAX_AGE`] of it gets a
/// copy instead of a new fetch. Requests that come while a fetch is under way wait for it
/// and share it. Failures are not kept.
#[derive(Debug)]
struct SnapshotCache<T> {
    last: Mutex<Option<(Instant, T)>>,
}

impl<T> Default for SnapshotCache<T> {
    fn default() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }
}

impl<T: Clone> SnapshotCache<T> {
    /// The value for a request made at `now`: the kept one if it is fresh, else `fetch`'s.
    async fn get<F, E>(&self, now: Instant, fetch: impl FnOnce() -> F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, value)) = &*last
            && now.saturating_duration_since(*at) < SNAPSHOT_MAX_AGE
        {
            return Ok(value.clone());
        }
        let value = fetch().await?;
        *last = Some((now, value.clone()));
        Ok(value)
    }
}

/// Binds the metrics address, if one was given, before anything else is created.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for metrics"))?;
    Ok(Some(listener))
}

/// Serves `metrics` with health and readiness on `listener`, if any, until the runtime
/// stops.
pub fn spawn(listener: Option<TcpListener>, metrics: AgentMetrics) {
    if let Some(listener) = listener {
        tokio::spawn(wiremesh_http::serve(listener, Arc::new(metrics)));
    }
}

/// The OpenMetrics text exposition of `snapshot`; `origins` names each peer's cluster and
/// node; `safety` adds the fail-closed and peer-limit families.
pub fn render(snapshot: Snapshot, origins: &Origins, safety: &Safety) -> String {
    let peers = snapshot
        .peers
        .iter()
        .map(|p| {
            let origin = origins.get(&p.public_key);
            PeerLabels {
                peer: p.public_key.to_string(),
                peer_cluster: origin.map(|o| o.cluster.clone()).unwrap_or_default(),
                peer_node: origin.map(|o| o.node.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let interface: Cow<'static, str> = Cow::Owned(snapshot.interface.clone());
    let mut registry =
        Registry::with_prefix_and_labels("wiremesh", [("interface".into(), interface)].into_iter());
    registry.register_collector(Box::new(SnapshotCollector { snapshot, peers }));
    register_safety(&mut registry, safety);
    wiremesh_http::encode(&registry)
}

/// Registers the [`Safety`] families.
fn register_safety(registry: &mut Registry, safety: &Safety) {
    let counter = |v: &AtomicU64| ConstCounter::new(v.load(Ordering::Relaxed));
    registry.register(
        "fail_closed_errors",
        "Failures to install a fail-closed route, to list them or to persist the set (each retried at the next pass)",
        counter(&safety.fail_closed_errors),
    );
    registry.register(
        "peers_refused",
        "Peers refused for being over --max-peers (each time one is)",
        counter(&safety.peers_refused_total),
    );
    registry.register(
        "peers_over_limit",
        "Peers refused now for being over --max-peers",
        ConstGauge::new(
            i64::try_from(safety.peers_refused.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        ),
    );
}

/// The labels of one peer's samples, besides `interface`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerLabels {
    peer: String,
    peer_cluster: String,
    peer_node: String,
}

impl PeerLabels {
    /// Borrowed, so that a scrape does not copy every peer's labels for each family.
    fn set(&self) -> [(&'static str, &str); 3] {
        [
            ("peer", &self.peer),
            ("peer_cluster", &self.peer_cluster),
            ("peer_node", &self.peer_node),
        ]
    }
}

/// The label of a drop counter, besides `interface`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// One scrape's worth of data: encoded once, then dropped with its registry.
#[derive(Debug)]
struct SnapshotCollector {
    snapshot: Snapshot,
    /// The labels of `snapshot.peers`, in the same order.
    peers: Vec<PeerLabels>,
}

/// Per-peer counter families: name (before `_total`), unit, help, value.
type PeerCounter = (
    &'static str,
    Option<Unit>,
    &'static str,
    fn(&PeerView) -> u64,
);

const PEER_COUNTERS: [PeerCounter; 5] = [
    (
        "peer_receive",
        Some(Unit::Bytes),
        "Bytes of authenticated WireGuard datagrams received from the peer",
        |p| p.rx_bytes,
    ),
    (
        "peer_transmit",
        Some(Unit::Bytes),
        "Bytes of WireGuard datagrams sent to the peer",
        |p| p.tx_bytes,
    ),
    (
        "peer_receive_packets",
        None,
        "Authenticated WireGuard datagrams received from the peer",
        |p| p.rx_packets,
    ),
    (
        "peer_transmit_packets",
        None,
        "WireGuard datagrams sent to the peer",
        |p| p.tx_packets,
    ),
    (
        "peer_handshakes",
        None,
        "Handshake messages (initiations and responses) authenticated from the peer",
        |p| p.handshakes,
    ),
];

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.snapshot;
        let labelled = || self.peers.iter().map(PeerLabels::set).zip(&s.peers);
        for (name, unit, help, value) in &PEER_COUNTERS {
            family(
                &mut encoder,
                name,
                help,
                unit.as_ref(),
                labelled().map(|(labels, p)| (labels, ConstCounter::new(value(p)))),
            )?;
        }
        family(
            &mut encoder,
            "peer_last_handshake_age",
            "Seconds since the current session's handshake; absent while the peer has no session",
            Some(&Unit::Seconds),
            labelled().filter_map(|(labels, p)| {
                p.since_handshake
                    .map(|age| (labels, ConstGauge::new(age.as_secs_f64())))
            }),
        )?;
        family(
            &mut encoder,
            "drops",
            "Packets dropped by the agent, by reason",
            None,
            s.counters.all_drops().map(|(reason, count)| {
                let labels = DropLabels {
                    reason: reason.as_str(),
                };
                (labels, ConstCounter::new(count))
            }),
        )?;
        single(
            &mut encoder,
            "cookie_replies",
            "Cookie replies sent instead of handshake responses while under load",
            ConstCounter::new(s.counters.cookies_sent),
        )?;
        single(
            &mut encoder,
            "peers",
            "Configured peers",
            ConstGauge::new(s.peers.len()),
        )?;
        single(
            &mut encoder,
            "live_tunnels",
            "Peers holding noise state (a session or a handshake in progress)",
            ConstGauge::new(s.live_tunnels),
        )
    }
}

/// One metric family with a sample per label set.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl Iterator<Item = (L, M)>,
) -> std::fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One metric family with one sample, labelled with the interface only.
fn single<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: M,
) -> std::fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, None, M::TYPE)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wiremesh_proto::PublicKey;

    use super::*;
    use crate::mesh::PeerOrigin;
    use wiremesh_core::{Counters, DropReason};

    #[tokio::test]
    async fn scrapes_share_one_snapshot_a_second_however_often_they_come() {
        let cache = SnapshotCache::default();
        let fetched = AtomicU64::new(0);
        let fetches = &fetched;
        let fetch = move || async move {
            let n = fetches.fetch_add(1, Ordering::Relaxed) + 1;
            Ok::<_, String>(n)
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A thousand scrapes in the first second, some of them at once.
        for i in 0..1000u64 {
            assert_eq!(cache.get(t0 + ms(i), fetch).await, Ok(1));
        }
        let at_once = futures::future::join_all((0..100).map(|_| cache.get(t0 + ms(999), fetch)));
        assert!(at_once.await.iter().all(|r| *r == Ok(1)));
        assert_eq!(cache.get(t0 + ms(1000), fetch).await, Ok(2));
        assert_eq!(cache.get(t0 + ms(1999), fetch).await, Ok(2));
        // A clock that goes back reuses the kept snapshot.
        assert_eq!(cache.get(t0, fetch).await, Ok(2));
        assert_eq!(cache.get(t0 + ms(5000), fetch).await, Ok(3));
        assert_eq!(fetched.load(Ordering::Relaxed), 3);
        // A failure is not kept: the next request asks again.
        let failing = SnapshotCache::<u64>::default();
        assert_eq!(failing.get(t0, || async { Err("down") }).await, Err("down"));
        assert_eq!(failing.get(t0, || async { Ok(7) }).await, Ok::<_, &str>(7));
    }

    #[test]
    fn peers_are_labelled_with_their_cluster_and_node_when_known() {
        let (known, unknown) = (PublicKey::from([1; 32]), PublicKey::from([2; 32]));
        let mut counters = Counters::default();
        counters.drop(DropReason::BadPacket);
        counters.drop(DropReason::BadPacket);
        counters.cookies_sent = 4;
        let snapshot = Snapshot {
            interface: "wm0".to_owned(),
            peers: vec![
                peer(known, 1000, 10, Some(Duration::from_millis(2500))),
                peer(unknown, 0, 0, None),
            ],
            counters,
            live_tunnels: 1,
        };
        let mut origins = Origins::new();
        origins.insert(
            known,
            PeerOrigin {
                name: "cluster-b.n1".to_owned(),
                cluster: "cluster-b".to_owned(),
                node: "n1".to_owned(),
                path: crate::mesh::PeerPath::Direct,
            },
        );
        let text = render(snapshot, &origins, &Safety::default());
        let k = known.to_string();
        let u = unknown.to_string();
        for line in [
            "# TYPE wiremesh_peer_receive_bytes counter".to_owned(),
            "# UNIT wiremesh_peer_receive_bytes bytes".to_owned(),
            format!(
                "wiremesh_peer_receive_bytes_total{{interface=\"wm0\",peer=\"{k}\",peer_cluster=\"cluster-b\",peer_node=\"n1\"}} 1000"
            ),
            format!(
                "wiremesh_peer_transmit_bytes_total{{interface=\"wm0\",peer=\"{k}\",peer_cluster=\"cluster-b\",peer_node=\"n1\"}} 2000"
            ),
            format!(
                "wiremesh_peer_receive_packets_total{{interface=\"wm0\",peer=\"{k}\",peer_cluster=\"cluster-b\",peer_node=\"n1\"}} 10"
            ),
            format!(
                "wiremesh_peer_transmit_packets_total{{interface=\"wm0\",peer=\"{k}\",peer_cluster=\"cluster-b\",peer_node=\"n1\"}} 20"
            ),
            format!(
                "wiremesh_peer_handshakes_total{{interface=\"wm0\",peer=\"{k}\",peer_cluster=\"cluster-b\",peer_node=\"n1\"}} 3"
            ),
            format!(
                "wiremesh_peer_last_handshake_age_seconds{{interface=\"wm0\",peer=\"{k}\",peer_cluster=\"cluster-b\",peer_node=\"n1\"}} 2.5"
            ),
            format!(
                "wiremesh_peer_receive_bytes_total{{interface=\"wm0\",peer=\"{u}\",peer_cluster=\"\",peer_node=\"\"}} 0"
            ),
            "wiremesh_drops_total{interface=\"wm0\",reason=\"bad_packet\"} 2".to_owned(),
            "wiremesh_drops_total{interface=\"wm0\",reason=\"under_load\"} 0".to_owned(),
            "wiremesh_drops_total{interface=\"wm0\",reason=\"rate_limited\"} 0".to_owned(),
            "wiremesh_cookie_replies_total{interface=\"wm0\"} 4".to_owned(),
            "wiremesh_peers{interface=\"wm0\"} 2".to_owned(),
            "wiremesh_live_tunnels{interface=\"wm0\"} 1".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // A peer without a session has no handshake age.
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("wiremesh_peer_last_handshake_age") && l.contains(&u)),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn fail_closed_errors_and_refused_peers_are_exported() {
        let safety = Safety::default();
        safety.fail_closed(
            3,
            Some("no fail-closed route yet for 10.2.0.0/16".to_owned()),
            true,
        );
        assert_eq!(safety.closed_passes(), 0);
        safety.peers_refused(5);
        safety.peers_refused(2);
        safety.peers_refused(4);
        assert!(safety.problem().unwrap().contains("10.2.0.0/16"));
        let snapshot = Snapshot {
            interface: "wm0".to_owned(),
            peers: Vec::new(),
            counters: Counters::default(),
            live_tunnels: 0,
        };
        let text = render(snapshot, &Origins::new(), &safety);
        for line in [
            "wiremesh_fail_closed_errors_total{interface=\"wm0\"} 3",
            "wiremesh_peers_refused_total{interface=\"wm0\"} 7",
            "wiremesh_peers_over_limit{interface=\"wm0\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        safety.fail_closed(3, None, false);
        assert_eq!((safety.problem(), safety.closed_passes()), (None, 0));
        safety.fail_closed(3, None, true);
        assert_eq!(safety.closed_passes(), 1);
    }

    fn peer(key: PublicKey, rx: u64, packets: u64, age: Option<Duration>) -> PeerView {
        PeerView {
            since_handshake: age,
            rx_bytes: rx,
            tx_bytes: 2 * rx,
            rx_packets: packets,
            tx_packets: 2 * packets,
            handshakes: if age.is_some() { 3 } else { 0 },
            ..PeerView::configured(key)
        }
    }
}
