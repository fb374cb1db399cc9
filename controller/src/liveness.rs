//! Failover from the data plane: which remote nodes this cluster's agents cannot reach,
//! so that the endpoints they host are imported not ready (`mcs::plan`'s `unreachable`),
//! and, on the exporting side, which of our nodes keep a heartbeat.
//!
//! - A node that hosts endpoints of an exported service gets `MeshNode.spec.heartbeat`
//!   ([`heartbeat_nodes`], written by [`keep_heartbeats`]); linked clusters mirror it
//!   into its MeshPeer, and its agent keeps every tunnel alive with a 1 s keepalive.
//! - Each agent reports the MeshPeers with a heartbeat it has a tunnel to but has not
//!   heard from lately in its MeshNode's `status.unreachable` (`agent/src/mesh/liveness.rs`):
//!   a bounded list of exceptions, empty in steady state.
//! - The leader counts the reports ([`votes`]) and keeps the set with hysteresis
//!   ([`Aggregate`]): a remote node enters when most local nodes with a tunnel to it
//!   report it, leaves when at most a third do and it has been in for [`MIN_WITHDRAWN`].
//!
//! Only remote nodes named by our own MeshPeers count (the controller wrote them, under
//! the cluster they came from), and only reports of this cluster's Kubernetes nodes: a
//! linked cluster cannot make us withdraw another cluster's endpoints, and one local
//! machine cannot withdraw anything alone. When a remote API server is down the tunnels
//! still answer, so nothing is withdrawn (fail static).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource as _, ResourceExt as _};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};
use wiremesh_proto::crd::{
    MAX_STATUS_CLUSTERS, MAX_UNREACHABLE, MeshNode, MeshNodeKind, MeshPeer, PeerCluster,
};
use wiremesh_proto::mcs::ExportedService;

/// Remote nodes as `(cluster, node)`.
pub type Unreachable = BTreeSet<(String, String)>;

/// Once in the set, a node stays at least this long: an endpoint withdrawn is not
/// offered again within two keepalive periods of its withdrawal.
pub const MIN_WITHDRAWN: Duration = Duration::from_secs(2);

/// How often the leader counts the reports (in memory; cheap when no MeshPeer has a
/// heartbeat).
const PERIOD: Duration = Duration::from_millis(250);

/// Field manager of `PeerCluster.status.unreachableNodes` and `MeshNode.spec.heartbeat`.
const MANAGER: &str = "wiremesh-controller-liveness";

/// Most tunnels read from one MeshNode's `status.peers` when it is an old agent's list of
/// every tunnel (such an agent listed at most 1,024).
const MAX_TUNNELS_READ: usize = 1024;

/// What this cluster's nodes say of one remote node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Votes {
    /// Local nodes that report it unreachable.
    pub unreachable: usize,
    /// Local nodes with a tunnel to it: those whose `status.tunnels` counts a tunnel to a
    /// heartbeat peer of its cluster, those reporting it, and (an agent from before
    /// `status.tunnels`) those listing it in `status.peers`.
    pub of: usize,
}

/// Counts the reports: for each remote node with a heartbeat (by our MeshPeers), how many
/// of this cluster's Kubernetes nodes have a tunnel to it and how many of them report it
/// unreachable. Names that are no MeshPeer with a heartbeat are ignored, and so are the
/// nodes in `not_ready` (their Node is not Ready: a dead machine's last report must not
/// hold a remote node in the set, nor its last list of tunnels out of it).
///
/// A node's status says, per peer cluster, how many tunnels to heartbeat peers its agent
/// watches (`status.tunnels.clusters[].heartbeat`), not which: a node watching any of a
/// cluster's heartbeat peers counts for each of them. One that watches only some (it holds
/// fewer peers than `--max-peers` needs, or reaches the others through a gateway, which
/// it does not watch) can only dilute the majority: fail static, nothing withdrawn that
/// the per-tunnel count would have kept. The status of an agent from before
/// `status.tunnels` (a rolling update) lists every tunnel in `status.peers`: read as it
/// was, by name. Either way one node is at most one vote per remote node, and a node
/// that lies can add itself to the count (dilute) or vote, as before, nothing more.
pub fn votes<'a>(
    mesh_nodes: impl IntoIterator<Item = &'a MeshNode>,
    mesh_peers: impl IntoIterator<Item = &'a MeshPeer>,
    not_ready: &BTreeSet<String>,
) -> BTreeMap<(String, String), Votes> {
    let watched: BTreeMap<String, (String, String)> = mesh_peers
        .into_iter()
        .filter(|p| p.spec.heartbeat)
        .map(|p| (p.name_any(), (p.spec.cluster.clone(), p.spec.node.clone())))
        .collect();
    let mut out: BTreeMap<(String, String), Votes> = BTreeMap::new();
    if watched.is_empty() {
        return out;
    }
    let clusters: BTreeSet<&str> = watched.values().map(|(c, _)| c.as_str()).collect();
    // Per cluster, the nodes judging all of its heartbeat peers (added to each at the end,
    // so the cost is nodes x clusters plus the reports, not nodes x heartbeat peers).
    let mut judging: BTreeMap<&str, usize> = BTreeMap::new();
    for node in mesh_nodes {
        if node.spec.kind != MeshNodeKind::Node || not_ready.contains(&node.name_any()) {
            continue;
        }
        let Some(status) = &node.status else {
            continue;
        };
        let reported: BTreeSet<&str> = status
            .unreachable
            .iter()
            .take(MAX_UNREACHABLE)
            .map(String::as_str)
            .collect();
        let (by_cluster, by_name): (BTreeSet<&str>, BTreeSet<&str>) = match &status.tunnels {
            Some(summary) => (
                summary
                    .clusters
                    .iter()
                    .take(MAX_STATUS_CLUSTERS)
                    .filter(|c| c.heartbeat > 0 && clusters.contains(c.cluster.as_str()))
                    .map(|c| c.cluster.as_str())
                    .collect(),
                BTreeSet::new(),
            ),
            None => (
                BTreeSet::new(),
                status
                    .peers
                    .iter()
                    .take(MAX_TUNNELS_READ)
                    .map(|t| t.name.as_str())
                    .filter(|name| watched.contains_key(*name))
                    .collect(),
            ),
        };
        for cluster in &by_cluster {
            *judging.entry(cluster).or_default() += 1;
        }
        for name in by_name.union(&reported) {
            let Some(remote) = watched.get(*name) else {
                continue;
            };
            let votes = out.entry(remote.clone()).or_default();
            if !by_cluster.contains(remote.0.as_str()) {
                votes.of += 1;
            }
            if reported.contains(name) {
                votes.unreachable += 1;
            }
        }
    }
    for remote in watched.values() {
        if let Some(n) = judging.get(remote.0.as_str()) {
            out.entry(remote.clone()).or_default().of += n;
        }
    }
    out
}

/// The unreachable set, kept with hysteresis between counts.
#[derive(Debug, Clone, Default)]
pub struct Aggregate {
    /// The nodes in the set, with when they entered.
    entered: BTreeMap<(String, String), Instant>,
}

impl Aggregate {
    /// Moves the set on with the latest `votes`, at `now`, and answers it:
    /// - in when more than half of the local nodes with a tunnel to it report it;
    /// - out when at most a third do and it has been in for [`MIN_WITHDRAWN`], or at once
    ///   when no local node has a tunnel to it any more (nothing left to judge it by).
    pub fn step(&mut self, votes: &BTreeMap<(String, String), Votes>, now: Instant) -> Unreachable {
        self.entered.retain(|remote, since| {
            let v = votes.get(remote).copied().unwrap_or_default();
            let recovered =
                v.unreachable * 3 <= v.of && now.saturating_duration_since(*since) >= MIN_WITHDRAWN;
            v.of > 0 && !recovered
        });
        for (remote, v) in votes {
            if v.unreachable * 2 > v.of {
                self.entered.entry(remote.clone()).or_insert(now);
            }
        }
        self.entered.keys().cloned().collect()
    }
}

/// The Nodes whose `Ready` condition is there and not `True` (the node controller sets
/// it `Unknown` 40 s after the kubelet's last heartbeat). A Node without one counts as
/// ready: no kubelet reported yet (or none runs, as in the lab).
pub fn not_ready<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes
        .into_iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status != "True")
        })
        .map(|n| n.name_any())
        .collect()
}

/// This cluster's nodes that host endpoints of `exports` (this cluster's own exports):
/// those whose agents keep a heartbeat.
pub fn heartbeat_nodes<'a>(
    cluster: &str,
    exports: impl IntoIterator<Item = &'a ExportedService>,
) -> BTreeSet<String> {
    exports
        .into_iter()
        .filter(|e| e.cluster == cluster)
        .flat_map(|e| &e.endpoint_slices)
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// Counts the agents' reports every [`PERIOD`] while leading, publishes the unreachable
/// set on `out` and in each PeerCluster's `status.unreachableNodes`, and logs each node
/// that enters or leaves it.
pub(crate) async fn aggregate(
    client: Client,
    mesh_nodes: Store<MeshNode>,
    mesh_peers: Store<MeshPeer>,
    nodes: Store<Node>,
    peer_clusters: Store<PeerCluster>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    out: watch::Sender<Unreachable>,
) {
    let api: Api<PeerCluster> = Api::all(client);
    let params = PatchParams::apply(MANAGER).force();
    let mut aggregate = Aggregate::default();
    // PeerCluster name -> what its status says.
    let mut written: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (reporters, peers) = (mesh_nodes.state(), mesh_peers.state());
        let votes = if peers.iter().any(|p| p.spec.heartbeat) {
            let not_ready = not_ready(nodes.state().iter().map(AsRef::as_ref));
            votes(
                reporters.iter().map(AsRef::as_ref),
                peers.iter().map(AsRef::as_ref),
                &not_ready,
            )
        } else {
            BTreeMap::new()
        };
        let set = aggregate.step(&votes, Instant::now());
        let before = out.borrow().clone();
        for remote in set.difference(&before) {
            let v = votes.get(remote).copied().unwrap_or_default();
            warn!(cluster = %remote.0, node = %remote.1, reports = v.unreachable, tunnels = v.of,
                "remote node unreachable from this cluster's data plane: the endpoints it hosts are imported not ready");
        }
        for remote in before.difference(&set) {
            info!(cluster = %remote.0, node = %remote.1, "remote node reachable again");
        }
        out.send_if_modified(|o| {
            let changed = *o != set;
            if changed {
                o.clone_from(&set);
            }
            changed
        });
        for pc in peer_clusters.state() {
            let name = pc.name_any();
            let cluster = &pc.spec.cluster_name;
            let listed: Vec<String> = set
                .iter()
                .filter(|(c, _)| c == cluster)
                .map(|(_, n)| n.clone())
                .take(MAX_UNREACHABLE)
                .collect();
            metrics.peer_unreachable(&name, listed.len());
            let current = written.get(&name).map_or_else(
                || {
                    pc.status
                        .as_ref()
                        .map(|s| s.unreachable_nodes.clone())
                        .unwrap_or_default()
                },
                Clone::clone,
            );
            if current == listed {
                written.insert(name, listed);
                continue;
            }
            let body = json!({
                "apiVersion": PeerCluster::api_version(&()),
                "kind": PeerCluster::kind(&()),
                "status": { "unreachableNodes": listed },
            });
            match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
                Ok(_) => {
                    written.insert(name, listed);
                }
                Err(e) => warn!(peer = %name, error = %e, "writing the unreachable nodes"),
            }
        }
        written.retain(|name, _| {
            peer_clusters
                .state()
                .iter()
                .any(|pc| pc.name_any() == *name)
        });
    }
}

/// Keeps `MeshNode.spec.heartbeat` true on exactly the nodes `nodes` names (this cluster's
/// nodes hosting exported endpoints, [`heartbeat_nodes`]), until aborted. Fed by the
/// export controller; until its first value nothing is written.
pub(crate) async fn keep_heartbeats(
    client: Client,
    mesh_nodes: Store<MeshNode>,
    mut nodes: watch::Receiver<Option<BTreeSet<String>>>,
) {
    let api: Api<MeshNode> = Api::all(client);
    loop {
        let want = nodes.borrow_and_update().clone();
        if let Some(want) = want {
            for node in mesh_nodes.state() {
                let on = want.contains(&node.name_any());
                if node.spec.heartbeat == on || node.spec.kind != MeshNodeKind::Node {
                    continue;
                }
                let patch = json!({ "spec": { "heartbeat": on } });
                match api
                    .patch(
                        &node.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        info!(node = %node.name_any(), heartbeat = on, "MeshNode heartbeat set")
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => {
                        warn!(node = %node.name_any(), error = %e, "setting a MeshNode's heartbeat")
                    }
                }
            }
        }
        // Again on a change, and every few seconds for MeshNodes that appeared or whose
        // write failed.
        let _ = tokio::time::timeout(Duration::from_secs(2), nodes.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use wiremesh_proto::crd::{
        ClusterTunnels, MeshNodeStatus, MeshPeerSpec, TunnelStatus, TunnelSummary,
    };
    use wiremesh_proto::mcs::{ExportedEndpoint, ExportedSlice, ServiceImportType};

    use super::*;
    use crate::testing::mesh_node;

    fn peer(cluster: &str, node: &str, heartbeat: bool) -> MeshPeer {
        MeshPeer::new(
            &format!("{cluster}.{node}"),
            MeshPeerSpec {
                cluster: cluster.into(),
                node: node.into(),
                public_key: String::new(),
                endpoints: Vec::new(),
                pod_cidrs: Vec::new(),
                location: None,
                kind: MeshNodeKind::Node,
                gateway: false,
                relay: false,
                heartbeat,
            },
        )
    }

    /// A local node with tunnels to `tunnels` that reports `unreachable`.
    fn reporter(name: &str, tunnels: &[&str], unreachable: &[&str]) -> MeshNode {
        let mut n = mesh_node(name, 1, None, &["10.1.1.0/24"]);
        n.status = Some(MeshNodeStatus {
            peers: tunnels
                .iter()
                .map(|t| TunnelStatus {
                    name: (*t).to_owned(),
                    ..TunnelStatus::default()
                })
                .collect(),
            unreachable: unreachable.iter().map(|u| (*u).to_owned()).collect(),
            ..MeshNodeStatus::default()
        });
        n
    }

    /// A local node whose agent counts its tunnels (`status.tunnels`): per cluster, how many
    /// and how many to heartbeat peers; it reports `unreachable`.
    fn counting(name: &str, clusters: &[(&str, i32, i32)], unreachable: &[&str]) -> MeshNode {
        let mut n = mesh_node(name, 1, None, &["10.1.1.0/24"]);
        n.status = Some(MeshNodeStatus {
            tunnels: Some(TunnelSummary {
                clusters: clusters
                    .iter()
                    .map(|(cluster, tunnels, heartbeat)| ClusterTunnels {
                        cluster: (*cluster).to_owned(),
                        tunnels: *tunnels,
                        connected: *tunnels,
                        heartbeat: *heartbeat,
                        ..ClusterTunnels::default()
                    })
                    .collect(),
                ..TunnelSummary::default()
            }),
            unreachable: unreachable.iter().map(|u| (*u).to_owned()).collect(),
            ..MeshNodeStatus::default()
        });
        n
    }

    fn remote(cluster: &str, node: &str) -> (String, String) {
        (cluster.to_owned(), node.to_owned())
    }

    #[test]
    fn votes_count_local_nodes_with_a_tunnel_to_each_heartbeat_peer() {
        let peers = [
            peer("cluster-b", "b1", true),
            peer("cluster-b", "b2", false),
            peer("cluster-c", "c1", true),
        ];
        let nodes = [
            reporter(
                "a1",
                &["cluster-b.b1", "cluster-b.b2", "cluster-c.c1"],
                &["cluster-b.b1"],
            ),
            // Reports b1 without listing its tunnel yet; and b2, which has no heartbeat,
            // and a name that is no MeshPeer of ours.
            reporter(
                "a2",
                &["cluster-c.c1"],
                &["cluster-b.b1", "cluster-b.b2", "cluster-c.b1"],
            ),
            reporter("a3", &["cluster-b.b1"], &[]),
        ];
        let mut host = reporter("h1", &["cluster-b.b1"], &["cluster-b.b1"]);
        host.spec.kind = MeshNodeKind::Host;
        let none = BTreeSet::new();
        let counted = votes(nodes.iter().chain([&host]), peers.iter(), &none);
        assert_eq!(
            counted,
            BTreeMap::from([
                (
                    remote("cluster-b", "b1"),
                    Votes {
                        unreachable: 2,
                        of: 3
                    }
                ),
                (
                    remote("cluster-c", "c1"),
                    Votes {
                        unreachable: 0,
                        of: 2
                    }
                ),
            ]),
            "a host's report does not count"
        );
        // A node whose Node is not Ready counts for nothing.
        let a1_down = BTreeSet::from(["a1".to_owned()]);
        assert_eq!(
            votes(nodes.iter(), peers.iter(), &a1_down)[&remote("cluster-b", "b1")],
            Votes {
                unreachable: 1,
                of: 2
            }
        );
        // No MeshPeer with a heartbeat: nothing to count.
        assert!(votes(nodes.iter(), [peer("cluster-b", "b1", false)].iter(), &none).is_empty());
    }

    #[test]
    fn counted_tunnels_make_a_node_judge_every_heartbeat_peer_of_that_cluster() {
        let peers = [
            peer("cluster-b", "b1", true),
            peer("cluster-b", "b2", true),
            peer("cluster-b", "b3", false),
            peer("cluster-c", "c1", true),
        ];
        let nodes = [
            counting(
                "a1",
                &[("", 2, 0), ("cluster-b", 500, 2), ("cluster-c", 500, 1)],
                &["cluster-b.b1"],
            ),
            counting("a2", &[("cluster-b", 500, 2)], &["cluster-b.b1"]),
            // Tunnels to cluster-c but to none of its heartbeat peers: judges nothing there.
            counting("a3", &[("cluster-b", 500, 2), ("cluster-c", 3, 0)], &[]),
            // Only tunnels to its own cluster's gateways (behind them): judges nothing,
            // but a report of its own counts it in (as an old agent's would).
            counting("a4", &[("", 2, 0)], &["cluster-c.c1"]),
            // A name it claims for a cluster no heartbeat peer belongs to: ignored.
            counting("a5", &[("cluster-z", 9, 9)], &[]),
        ];
        let counted = votes(nodes.iter(), peers.iter(), &BTreeSet::new());
        assert_eq!(
            counted,
            BTreeMap::from([
                (
                    remote("cluster-b", "b1"),
                    Votes {
                        unreachable: 2,
                        of: 3
                    }
                ),
                (
                    remote("cluster-b", "b2"),
                    Votes {
                        unreachable: 0,
                        of: 3
                    }
                ),
                (
                    remote("cluster-c", "c1"),
                    Votes {
                        unreachable: 1,
                        of: 2
                    }
                ),
            ])
        );
        // The decision is the one the per-tunnel lists gave: b1 in, b2 and c1 not yet.
        let set = Aggregate::default().step(&counted, Instant::now());
        assert_eq!(set, Unreachable::from([remote("cluster-b", "b1")]));
    }

    #[test]
    fn old_and_new_agents_statuses_are_counted_together_during_a_rolling_update() {
        let peers = [peer("cluster-b", "b1", true)];
        // a1 runs the old agent (every tunnel listed, no counts); a2 and a3 the new one.
        let nodes = [
            reporter("a1", &["cluster-b.b1", "cluster-b.b2"], &["cluster-b.b1"]),
            counting("a2", &[("cluster-b", 2, 1)], &["cluster-b.b1"]),
            counting("a3", &[("cluster-b", 2, 1)], &[]),
        ];
        let counted = votes(nodes.iter(), peers.iter(), &BTreeSet::new());
        assert_eq!(
            counted[&remote("cluster-b", "b1")],
            Votes {
                unreachable: 2,
                of: 3
            }
        );
        // A new agent whose list names tunnels that are down is still read by its counts:
        // no node counted twice.
        let mut a3 = counting("a3", &[("cluster-b", 2, 1)], &["cluster-b.b1"]);
        if let Some(status) = &mut a3.status {
            status.peers = vec![TunnelStatus {
                name: "cluster-b.b1".into(),
                ..TunnelStatus::default()
            }];
        }
        let counted = votes([&a3], peers.iter(), &BTreeSet::new());
        assert_eq!(
            counted[&remote("cluster-b", "b1")],
            Votes {
                unreachable: 1,
                of: 1
            }
        );
    }

    #[test]
    fn a_node_is_not_ready_only_when_its_ready_condition_says_so() {
        use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
        let node = |name: &str, ready: Option<&str>| Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            status: ready.map(|r| NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: r.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let nodes = [
            node("a1", Some("True")),
            node("a2", Some("Unknown")),
            node("a3", Some("False")),
            node("a4", None),
        ];
        assert_eq!(
            not_ready(&nodes),
            BTreeSet::from(["a2".to_owned(), "a3".to_owned()])
        );
    }

    #[test]
    fn a_node_enters_on_a_majority_and_leaves_on_a_third_after_a_hold() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let b1 = remote("cluster-b", "b1");
        let count = |unreachable, of| BTreeMap::from([(b1.clone(), Votes { unreachable, of })]);
        let mut agg = Aggregate::default();
        // One of two is no majority.
        assert!(agg.step(&count(1, 2), at(0)).is_empty());
        assert!(agg.step(&count(2, 3), at(100)).contains(&b1));
        // Down to one of three, but within the hold: stays.
        assert!(agg.step(&count(1, 3), at(1000)).contains(&b1));
        // Two of four after the hold: between a third and a half, stays (no flapping at
        // the edge).
        assert!(agg.step(&count(2, 4), at(3000)).contains(&b1));
        // One of three after the hold: out.
        assert!(agg.step(&count(1, 3), at(3100)).is_empty());
        // Back in on a majority, at once.
        assert!(agg.step(&count(3, 3), at(3200)).contains(&b1));
        // The MeshPeer went away (no tunnel left): out at once.
        assert!(agg.step(&BTreeMap::new(), at(3300)).is_empty());
    }

    #[test]
    fn one_local_node_alone_is_a_majority_of_one() {
        let b1 = remote("cluster-b", "b1");
        let mut agg = Aggregate::default();
        let t0 = Instant::now();
        let one = BTreeMap::from([(
            b1.clone(),
            Votes {
                unreachable: 1,
                of: 1,
            },
        )]);
        assert_eq!(agg.step(&one, t0), Unreachable::from([b1.clone()]));
        let none = BTreeMap::from([(
            b1,
            Votes {
                unreachable: 0,
                of: 1,
            },
        )]);
        assert!(agg.step(&none, t0 + MIN_WITHDRAWN).is_empty());
    }

    #[test]
    fn heartbeat_nodes_are_those_hosting_this_clusters_exported_endpoints() {
        let export = |cluster: &str, nodes: &[Option<&str>]| ExportedService {
            cluster: cluster.into(),
            namespace: "demo".into(),
            name: "hello".into(),
            export_created: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            type_: ServiceImportType::ClusterSetIP,
            ports: Vec::new(),
            session_affinity: None,
            session_affinity_config: None,
            ip_families: Vec::new(),
            internal_traffic_policy: None,
            traffic_distribution: None,
            endpoint_slices: vec![ExportedSlice {
                address_type: "IPv4".into(),
                ports: Vec::new(),
                endpoints: nodes
                    .iter()
                    .map(|n| ExportedEndpoint {
                        addresses: vec!["10.2.1.5".into()],
                        node_name: n.map(Into::into),
                        ..ExportedEndpoint::default()
                    })
                    .collect(),
            }],
        };
        let exports = [
            export("cluster-b", &[Some("b1"), None, Some("b2"), Some("b1")]),
            export("cluster-c", &[Some("c1")]),
        ];
        assert_eq!(
            heartbeat_nodes("cluster-b", &exports),
            BTreeSet::from(["b1".to_owned(), "b2".to_owned()])
        );
    }
}
