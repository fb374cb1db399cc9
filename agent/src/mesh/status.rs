//! What an agent writes in its MeshNode's status about its tunnels (issue 15): the tunnels
//! counted (in total, per peer cluster and path, per gateway) and only the exceptions
//! named, so that a write does not grow with the number of peers. Pure: the device's view
//! and the peers' origins in, the status fields out.
//!
//! The exceptions are the tunnels whose peer was heard from an address it does not publish
//! (its NAT mapping: the controllers offer it to the peer's other peers, how two nodes
//! behind NAT, or a relay's peers, find each other) and the tunnels expected up that are
//! not. Without NAT, in steady state, there are none.
//!
//! An observation stays listed while the peer is heard from there, even once the controller
//! has added it to the peer's endpoints (which is what the agent compares with): else it
//! would leave the status, then the MeshPeer, then come back, every few writes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use wiremesh_core::PeerView;
use wiremesh_proto::PublicKey;
use wiremesh_proto::crd::{
    ClusterTunnels, GatewayPeers, MAX_STATUS_CLUSTERS, MAX_STATUS_DOWN, MAX_STATUS_PEERS,
    TunnelStatus, TunnelSummary,
};

use super::{Origins, PeerPath, TUNNEL_UP_WITHIN, tunnel_path, via_gateways};

/// The tunnel fields of a MeshNode status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// `status.tunnels`.
    pub summary: TunnelSummary,
    /// `status.peers`: the exceptions, sorted by name.
    pub peers: Vec<TunnelStatus>,
    /// The observations listed, by peer: give them back as [`Known::listed`] next time.
    pub observed: BTreeMap<PublicKey, SocketAddr>,
    /// Whether each of `peers` is connected, in the same order (for [`Report::key`]).
    connected: Vec<bool>,
}

/// What the agent knows besides the device's view.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// Where each configured peer came from.
    pub origins: &'a Origins,
    /// The MeshPeers with a heartbeat this agent watches (see `status.unreachable`).
    pub watched: &'a BTreeMap<PublicKey, String>,
    /// The endpoints each applied peer publishes. A peer missing here is not known yet:
    /// its observation is no exception until it is.
    pub published: &'a BTreeMap<PublicKey, Vec<SocketAddr>>,
    /// The observations the last report listed ([`Report::observed`]).
    pub listed: &'a BTreeMap<PublicKey, SocketAddr>,
}

/// Builds the status fields for the device's `peers` at `now`.
pub fn report(peers: &[PeerView], known: Known<'_>, now: Timestamp) -> Report {
    let mut clusters: BTreeMap<&str, ClusterTunnels> = BTreeMap::new();
    let mut summary = TunnelSummary::default();
    let mut observed: Vec<(TunnelStatus, bool, PublicKey)> = Vec::new();
    let mut down: Vec<(TunnelStatus, bool)> = Vec::new();
    for p in peers {
        let origin = known.origins.get(&p.public_key);
        let path = origin.map(|o| tunnel_path(&o.path)).unwrap_or_default();
        let connected = p.since_handshake.is_some_and(|d| d < TUNNEL_UP_WITHIN);
        summary.total = summary.total.saturating_add(1);
        if connected {
            summary.connected = summary.connected.saturating_add(1);
        }
        let cluster = origin.map_or("", |o| o.cluster.as_str());
        if clusters.contains_key(cluster) || clusters.len() < MAX_STATUS_CLUSTERS {
            clusters
                .entry(cluster)
                .or_insert_with(|| ClusterTunnels {
                    cluster: cluster.to_owned(),
                    ..ClusterTunnels::default()
                })
                .count(path, connected, known.watched.contains_key(&p.public_key));
        }
        let unpublished = p.observed_endpoint.is_some_and(|o| {
            known.listed.get(&p.public_key) == Some(&o)
                || known
                    .published
                    .get(&p.public_key)
                    .is_some_and(|published| !published.contains(&o))
        });
        // Not connected though it should be: it keeps itself alive, or it carried traffic.
        // An idle tunnel with keepalive off has no session and is no exception.
        let expected_up = p.persistent_keepalive > 0 || p.tx_packets > 0;
        if !unpublished && (connected || !expected_up) {
            continue;
        }
        let tunnel = TunnelStatus {
            name: origin.map_or_else(|| p.public_key.to_string(), |o| o.name.clone()),
            endpoint: p.endpoint.map(|e| e.to_string()),
            observed_endpoint: p.observed_endpoint.map(|e| e.to_string()),
            latest_handshake_time: p.since_handshake.and_then(|d| {
                let d = SignedDuration::try_from(d).ok()?;
                now.checked_sub(d).ok().map(Time)
            }),
            rx_bytes: i64::try_from(p.rx_bytes).unwrap_or(i64::MAX),
            tx_bytes: i64::try_from(p.tx_bytes).unwrap_or(i64::MAX),
            path,
            via: origin.and_then(|o| match &o.path {
                PeerPath::Relayed { via } => Some(via.clone()),
                _ => None,
            }),
        };
        if unpublished {
            observed.push((tunnel, connected, p.public_key));
        } else {
            down.push((tunnel, connected));
        }
    }
    // Observations first (NAT traversal needs them), then what is down; each by name.
    observed.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    down.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    observed.truncate(MAX_STATUS_PEERS);
    let observed_now: BTreeMap<PublicKey, SocketAddr> = observed
        .iter()
        .filter_map(|(t, _, key)| Some((*key, t.observed_endpoint.as_deref()?.parse().ok()?)))
        .collect();
    let mut listed: Vec<(TunnelStatus, bool)> =
        observed.into_iter().map(|(t, up, _)| (t, up)).collect();
    listed.extend(down.into_iter().take(MAX_STATUS_DOWN));
    listed.truncate(MAX_STATUS_PEERS);
    listed.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let (peers, connected) = listed.into_iter().unzip();

    let mut gateways: BTreeMap<String, i32> = BTreeMap::new();
    for via in via_gateways(known.origins) {
        if gateways.contains_key(&via.gateway) || gateways.len() < MAX_STATUS_CLUSTERS {
            let n = gateways.entry(via.gateway).or_default();
            *n = n.saturating_add(1);
        }
    }
    summary.clusters = clusters.into_values().collect();
    summary.via_gateway = gateways
        .into_iter()
        .map(|(gateway, peers)| GatewayPeers { gateway, peers })
        .collect();
    Report {
        summary,
        peers,
        observed: observed_now,
        connected,
    }
}

impl Report {
    /// What of the report counts as a change worth a write: the counts, and per listed
    /// tunnel its name, endpoints, path, relay and whether it is connected (not its
    /// counters or the exact handshake time).
    pub fn key(&self) -> serde_json::Value {
        let tunnels: Vec<serde_json::Value> = self
            .peers
            .iter()
            .zip(&self.connected)
            .map(|(t, up)| {
                serde_json::json!([t.name, t.endpoint, t.observed_endpoint, t.path, t.via, up])
            })
            .collect();
        serde_json::json!([self.summary, tunnels])
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wiremesh_proto::crd::TunnelPath;

    use super::*;
    use crate::mesh::PeerOrigin;

    #[test]
    fn a_status_for_five_thousand_tunnels_is_the_size_of_one_for_five() {
        let now = Timestamp::UNIX_EPOCH;
        let mut sizes = Vec::new();
        for n in [5, 50, 5_000] {
            let mesh = Mesh::new(n, 10);
            let report = report(&mesh.peers, mesh.known(), now);
            assert_eq!(report.summary.total, i32::try_from(n).unwrap());
            assert_eq!(report.summary.connected, report.summary.total);
            assert!(report.peers.is_empty(), "{:?}", report.peers.first());
            let new = serde_json::to_vec(&status_body(&report)).unwrap().len();
            let old = serde_json::to_vec(&mesh.old_status(now)).unwrap().len();
            sizes.push((n, old, new));
        }
        // Run with `--nocapture` for the figures (README's performance section).
        for (n, old, new) in &sizes {
            eprintln!("status write at {n} tunnels: {old} bytes before, {new} bytes now");
        }
        // Ten peer clusters: the same bound at 5 tunnels as at 5,000.
        assert!(sizes.iter().all(|(_, _, new)| *new < 2_048), "{sizes:?}");
        let (_, _, five) = sizes[0];
        let (_, _, many) = sizes[2];
        assert!(many < five * 4, "{sizes:?}");
    }

    #[test]
    fn tunnels_are_counted_per_cluster_path_and_heartbeat() {
        let mut mesh = Mesh::new(6, 2);
        mesh.set_path(
            1,
            PeerPath::Gateway {
                group: "cluster-b".into(),
                active: true,
            },
        );
        mesh.set_path(
            3,
            PeerPath::Gateway {
                group: "cluster-b".into(),
                active: false,
            },
        );
        mesh.watched
            .insert(mesh.peers[0].public_key, "c0.n0".into());
        // A remote peer with no tunnel of its own, through the active gateway.
        mesh.origins.insert(
            key(999),
            PeerOrigin {
                name: "cluster-b.b9".into(),
                cluster: "cluster-b".into(),
                node: "b9".into(),
                path: PeerPath::Via {
                    group: "cluster-b".into(),
                },
            },
        );
        mesh.peers[2].since_handshake = None;
        let r = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert_eq!((r.summary.total, r.summary.connected), (6, 5));
        let c0 = &r.summary.clusters[0];
        assert_eq!(
            (c0.cluster.as_str(), c0.tunnels, c0.connected, c0.heartbeat),
            ("c0", 3, 2, 1)
        );
        let c1 = &r.summary.clusters[1];
        assert_eq!(
            (c1.tunnels, c1.direct, c1.gateway, c1.standby),
            (3, 1, 1, 1)
        );
        assert_eq!(
            r.summary.via_gateway,
            vec![GatewayPeers {
                gateway: mesh.origins[&mesh.peers[1].public_key].name.clone(),
                peers: 1,
            }]
        );
        // The tunnel that is down is named, with its path.
        assert_eq!(r.peers.len(), 1);
        assert_eq!(r.peers[0].name, "c0.n2");
        assert_eq!(r.peers[0].path, TunnelPath::Direct);
    }

    #[test]
    fn an_observation_the_peer_does_not_publish_is_listed_and_changes_the_key() {
        let mut mesh = Mesh::new(3, 1);
        let before = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert!(before.peers.is_empty());
        let mapped: SocketAddr = "198.19.7.7:40000".parse().unwrap();
        mesh.peers[1].observed_endpoint = Some(mapped);
        mesh.peers[1].endpoint = Some(mapped);
        let after = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert_eq!(after.peers.len(), 1);
        assert_eq!(
            after.peers[0].observed_endpoint.as_deref(),
            Some("198.19.7.7:40000")
        );
        assert_ne!(before.key(), after.key());
        // The controller adds it to the peer's endpoints: it stays listed while the peer
        // is heard from there (else it would go, and so leave the MeshPeer again).
        mesh.published
            .get_mut(&mesh.peers[1].public_key)
            .unwrap()
            .push(mapped);
        let listed = after.observed.clone();
        assert_eq!(listed.len(), 1);
        let known = Known {
            listed: &listed,
            ..mesh.known()
        };
        assert_eq!(
            report(&mesh.peers, known, Timestamp::UNIX_EPOCH).peers,
            after.peers
        );
        // Without that memory (an agent just restarted) it is published and not listed.
        assert!(
            report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH)
                .peers
                .is_empty()
        );
        // Not yet known to publish anything: no exception until it is.
        mesh.published.clear();
        mesh.peers[1].observed_endpoint = Some("198.19.7.8:40000".parse().unwrap());
        assert!(
            report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH)
                .peers
                .is_empty()
        );
    }

    #[test]
    fn counters_and_handshake_times_alone_change_nothing_worth_a_write() {
        let mut mesh = Mesh::new(4, 2);
        mesh.peers[0].since_handshake = None;
        let a = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        for p in &mut mesh.peers {
            p.rx_bytes += 1_000;
            p.tx_bytes += 1_000;
        }
        mesh.peers[1].since_handshake = Some(Duration::from_secs(100));
        let b = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert_eq!(a.key(), b.key());
        // A tunnel going down is a change.
        mesh.peers[1].since_handshake = None;
        let c = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert_ne!(a.key(), c.key());
    }

    #[test]
    fn a_dead_cluster_costs_a_bounded_list_and_idle_tunnels_none() {
        let mut mesh = Mesh::new(3_000, 3);
        for p in &mut mesh.peers {
            p.since_handshake = None;
        }
        let r = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert_eq!(r.peers.len(), MAX_STATUS_DOWN);
        assert!(r.peers.windows(2).all(|w| w[0].name <= w[1].name));
        assert_eq!(r.summary.connected, 0);
        // With keepalive off and no traffic sent, no session is expected.
        for p in &mut mesh.peers {
            p.persistent_keepalive = 0;
            p.tx_packets = 0;
        }
        assert!(
            report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH)
                .peers
                .is_empty()
        );
    }

    #[test]
    fn clusters_past_the_bound_are_counted_only_in_the_totals() {
        let mesh = Mesh::new(600, 300);
        let r = report(&mesh.peers, mesh.known(), Timestamp::UNIX_EPOCH);
        assert_eq!(r.summary.clusters.len(), MAX_STATUS_CLUSTERS);
        assert_eq!(r.summary.total, 600);
    }

    /// `n` connected tunnels to nodes spread over `clusters` peer clusters, each heard from
    /// the endpoint it publishes, with a 25 s keepalive.
    struct Mesh {
        peers: Vec<PeerView>,
        origins: Origins,
        watched: BTreeMap<PublicKey, String>,
        published: BTreeMap<PublicKey, Vec<SocketAddr>>,
        listed: BTreeMap<PublicKey, SocketAddr>,
    }

    impl Mesh {
        fn new(n: usize, clusters: usize) -> Self {
            let mut mesh = Self {
                peers: Vec::new(),
                origins: Origins::new(),
                watched: BTreeMap::new(),
                published: BTreeMap::new(),
                listed: BTreeMap::new(),
            };
            for i in 0..n {
                let key = key(i);
                let endpoint: SocketAddr = format!("198.18.{}.{}:51820", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap();
                let mut view = PeerView::configured(key);
                view.endpoint = Some(endpoint);
                view.observed_endpoint = Some(endpoint);
                view.persistent_keepalive = 25;
                view.since_handshake = Some(Duration::from_secs(30));
                view.rx_bytes = 123_456_789;
                view.tx_bytes = 987_654_321;
                view.tx_packets = 1_000;
                mesh.peers.push(view);
                let cluster = format!("c{}", i % clusters);
                mesh.origins.insert(
                    key,
                    PeerOrigin {
                        name: format!("{cluster}.n{i}"),
                        node: format!("n{i}"),
                        cluster,
                        path: PeerPath::Direct,
                    },
                );
                mesh.published.insert(key, vec![endpoint]);
            }
            mesh
        }

        fn set_path(&mut self, i: usize, path: PeerPath) {
            let key = self.peers[i].public_key;
            self.origins.get_mut(&key).unwrap().path = path;
        }

        fn known(&self) -> Known<'_> {
            Known {
                origins: &self.origins,
                watched: &self.watched,
                published: &self.published,
                listed: &self.listed,
            }
        }

        /// The status as agents wrote it before: one entry per tunnel, at most 1,024.
        fn old_status(&self, now: Timestamp) -> serde_json::Value {
            let peers: Vec<TunnelStatus> = self
                .peers
                .iter()
                .take(MAX_STATUS_PEERS)
                .map(|p| {
                    let origin = &self.origins[&p.public_key];
                    TunnelStatus {
                        name: origin.name.clone(),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        observed_endpoint: p.observed_endpoint.map(|e| e.to_string()),
                        latest_handshake_time: Some(Time(now)),
                        rx_bytes: 123_456_789,
                        tx_bytes: 987_654_321,
                        path: tunnel_path(&origin.path),
                        via: None,
                    }
                })
                .collect();
            serde_json::json!({
                "apiVersion": "wiremesh.io/v1alpha1",
                "kind": "MeshNode",
                "status": { "conditions": [condition()], "peers": peers, "lastUpdateTime": Time(now) },
            })
        }
    }

    /// The apply body the agent sends, as `report_status` builds it.
    fn status_body(report: &Report) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "wiremesh.io/v1alpha1",
            "kind": "MeshNode",
            "status": {
                "conditions": [condition()],
                "peers": report.peers,
                "tunnels": report.summary,
                "lastUpdateTime": Time(Timestamp::UNIX_EPOCH),
            },
        })
    }

    fn condition() -> serde_json::Value {
        serde_json::json!({
            "type": "Ready", "status": "True", "reason": "DataPlaneConfigured",
            "message": "5000 tunnels configured", "lastTransitionTime": Time(Timestamp::UNIX_EPOCH),
        })
    }

    fn key(i: usize) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        PublicKey::from(bytes)
    }
}
