//! Which peers this machine gets (pure): from the MeshPeers the controller mirrors and this
//! cluster's MeshNodes, the tunnels, failover groups (gateways, relays) and the peers reached
//! through a group. Kubernetes mode ([`crate::k8s`]) and host mode ([`crate::host`]) feed it
//! what their watches hold ([`crate::peers`]).

use kube::ResourceExt as _;
use tracing::warn;
use wiremesh_proto::crd::{MeshNode, MeshNodeKind, MeshPeer};
use wiremesh_proto::{IpCidr, PublicKey};

use crate::mesh::{self, Origins, PeerOrigin, PeerSet};

/// Persistent keepalive towards a peer that may be relayed, when none is configured: it
/// keeps trying the direct path.
const RELAYED_KEEPALIVE: u16 = 25;

/// Which MeshNodes of this cluster get a tunnel (besides every MeshPeer): a node's
/// pods reach the other nodes of its cluster through the cluster's own network, but a
/// host outside Kubernetes only through the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalPeers {
    /// On a Kubernetes node: the cluster's hosts.
    Hosts,
    /// On a host: every node and every other host of the cluster.
    All,
}

/// Which peers this machine gets, from the MeshPeers and this cluster's MeshNodes (pure).
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    /// This machine's MeshNode, which gets no tunnel to itself.
    pub(crate) own_name: String,
    pub(crate) local_peers: LocalPeers,
    /// This machine's own pod CIDRs (or a host's addresses): no peer may claim them.
    pub(crate) own_cidrs: Vec<IpCidr>,
    pub(crate) keepalive: u16,
}

/// The peers and failover groups this machine should have.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Desired {
    pub(crate) peers: PeerSet,
    pub(crate) groups: mesh::Groups,
    /// The peers reached through a group, with no tunnel of their own (for status).
    pub(crate) via: Origins,
    /// The MeshPeers with a heartbeat (`spec.heartbeat`) this machine has a tunnel to,
    /// key -> MeshPeer name: whose silence it reports ([`mesh::liveness`]).
    pub(crate) watched: std::collections::BTreeMap<PublicKey, String>,
}

/// The failover group of this cluster's own gateways (on a node that is not one).
const LOCAL_GATEWAYS: &str = "local-gateways";

impl Selection {
    /// Which peers this machine gets.
    ///
    /// - A remote cluster with gateways ([`MeshNodeSpec::is_gateway`], mirrored as
    ///   `MeshPeer.spec.gateway`) is reached through them: one failover group per such
    ///   cluster holds the pod CIDRs of all its nodes; its other nodes get no tunnel.
    ///   Its hosts are still reached directly.
    /// - When this cluster has gateways, a node that is not one tunnels only to them (one
    ///   group holding every remote prefix) and to the cluster's hosts. A gateway tunnels
    ///   to every remote peer and accepts from each node of its cluster that node's pods
    ///   (the answers come back through the cluster network, so nothing is routed to
    ///   them); it keeps every tunnel alive with [`mesh::GATEWAY_KEEPALIVE`], which is how
    ///   the others notice when it dies.
    /// - A machine whose MeshNode has a `heartbeat` (it hosts endpoints of an exported
    ///   service) keeps every tunnel alive with [`mesh::GATEWAY_KEEPALIVE`] too; the
    ///   MeshPeers with one that get a tunnel here are [`Desired::watched`].
    ///
    /// [`MeshNodeSpec::is_gateway`]: wiremesh_proto::crd::MeshNodeSpec::is_gateway
    pub(crate) fn desired<'a>(
        &self,
        peers: impl Iterator<Item = &'a MeshPeer>,
        nodes: impl Iterator<Item = &'a MeshNode>,
    ) -> Desired {
        // Sorted by name: a group's members are preferred in this order, as the other
        // side (which sorts MeshPeers by node name) prefers them.
        let mut nodes: Vec<&MeshNode> = nodes.collect();
        nodes.sort_by_key(|n| n.name_any());
        let peers: Vec<&MeshPeer> = peers.collect();
        let mut out = Desired::default();
        let on_node = self.local_peers == LocalPeers::Hosts;
        let is_gateway = |n: &&MeshNode| n.spec.is_gateway();
        let local_gateways: Vec<&MeshNode> = nodes.iter().copied().filter(is_gateway).collect();
        let me_gateway = on_node && local_gateways.iter().any(|n| n.name_any() == self.own_name);
        let behind_gateway = on_node && !me_gateway && !local_gateways.is_empty();
        let me_heartbeat = nodes
            .iter()
            .any(|n| n.name_any() == self.own_name && n.spec.heartbeat);
        let keepalive = if me_gateway || me_heartbeat {
            mesh::GATEWAY_KEEPALIVE
        } else {
            self.keepalive
        };

        for node in &nodes {
            let name = node.name_any();
            if name == self.own_name || !node.spec.has_key() {
                continue;
            }
            let host = node.spec.kind == MeshNodeKind::Host;
            let role = if host || self.local_peers == LocalPeers::All {
                Role::Direct
            } else if behind_gateway && node.spec.is_gateway() {
                Role::Member(LOCAL_GATEWAYS.to_owned())
            } else if me_gateway && !node.spec.is_gateway() {
                Role::AcceptOnly
            } else {
                continue;
            };
            // `meshctl host add` registers single addresses; anything wider on a host is
            // a forged or broken MeshNode that could take traffic meant for others.
            if host && !node.spec.pod_cidrs.iter().all(|c| is_single_address(c)) {
                warn!(host = %name, cidrs = ?node.spec.pod_cidrs, "host refused: a host has single addresses only");
                continue;
            }
            let origin = PeerOrigin {
                name: name.clone(),
                cluster: String::new(),
                node: name,
                path: mesh::PeerPath::Direct,
            };
            let spec = &node.spec;
            self.insert(
                &mut out,
                origin,
                role,
                keepalive,
                &spec.public_key,
                &spec.endpoints,
                &spec.pod_cidrs,
            );
        }

        let relay_peers: Vec<PublicKey> = peers
            .iter()
            .filter(|p| p.spec.relay)
            .filter_map(|p| p.spec.public_key.parse().ok())
            .collect();
        let gateway_clusters: std::collections::BTreeSet<&str> = peers
            .iter()
            .filter(|p| p.spec.gateway && p.spec.kind == MeshNodeKind::Node)
            // A gateway we would refuse (bad key, our own CIDRs) carries nothing: a
            // cluster with no usable gateway keeps its direct tunnels.
            .filter(|p| {
                let spec = &p.spec;
                mesh::desired_peer(
                    &PeerOrigin::default(),
                    &spec.public_key,
                    &spec.endpoints,
                    &spec.pod_cidrs,
                    0,
                    &self.own_cidrs,
                )
                .is_ok()
            })
            .map(|p| p.spec.cluster.as_str())
            .collect();
        // Sorted by node name within a cluster, as the other side sorts its gateways.
        let mut peers = peers;
        peers.sort_by(|a, b| (&a.spec.cluster, &a.spec.node).cmp(&(&b.spec.cluster, &b.spec.node)));
        for peer in peers {
            let spec = &peer.spec;
            let behind_remote =
                spec.kind == MeshNodeKind::Node && gateway_clusters.contains(spec.cluster.as_str());
            let role = if behind_gateway {
                Role::Via(LOCAL_GATEWAYS.to_owned())
            } else if behind_remote && spec.gateway {
                Role::Member(format!("cluster/{}", spec.cluster))
            } else if behind_remote {
                Role::Via(format!("cluster/{}", spec.cluster))
            } else {
                Role::Direct
            };
            let origin = PeerOrigin {
                name: peer.name_any(),
                cluster: spec.cluster.clone(),
                node: spec.node.clone(),
                path: mesh::PeerPath::Direct,
            };
            let tunnel = !matches!(role, Role::Via(_));
            let name = origin.name.clone();
            self.insert(
                &mut out,
                origin,
                role,
                keepalive,
                &spec.public_key,
                &spec.endpoints,
                &spec.pod_cidrs,
            );
            if spec.heartbeat
                && tunnel
                && let Ok(key) = spec.public_key.parse::<PublicKey>()
                && out.peers.get(&key).is_some_and(|p| p.origin.name == name)
            {
                out.watched.insert(key, name);
            }
        }
        self.add_relay_groups(&mut out, &nodes, &relay_peers);
        for group in out.groups.values_mut() {
            group.cidrs.sort();
            group.cidrs.dedup();
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        out: &mut Desired,
        origin: PeerOrigin,
        role: Role,
        keepalive: u16,
        public_key: &str,
        endpoints: &[String],
        pod_cidrs: &[String],
    ) {
        let (key, mut desired) = match mesh::desired_peer(
            &origin,
            public_key,
            endpoints,
            pod_cidrs,
            keepalive,
            &self.own_cidrs,
        ) {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!(error = %e, "peer refused");
                return;
            }
        };
        match role {
            Role::Direct => {}
            Role::AcceptOnly => {
                desired.accept_ips = std::mem::take(&mut desired.allowed_ips);
                desired.origin.path = mesh::PeerPath::Forwarding;
            }
            Role::Member(group) => {
                let group = out.groups.entry(group).or_default();
                group.members.push(key);
                // A local gateway's own pods are reached through the cluster network.
                if origin.cluster.is_empty() {
                    desired.allowed_ips.clear();
                } else {
                    group.cidrs.append(&mut desired.allowed_ips);
                }
            }
            Role::Via(group) => {
                out.groups
                    .entry(group.clone())
                    .or_default()
                    .cidrs
                    .append(&mut desired.allowed_ips);
                let origin = PeerOrigin {
                    path: mesh::PeerPath::Via { group },
                    ..origin
                };
                out.via.insert(key, origin);
                return;
            }
        }
        if let Some(previous) = out.peers.insert(key, desired) {
            warn!(peer = %origin.name, other = %previous.origin.name, "two peers with one key; keeping the later");
        }
    }

    /// A remote peer this machine cannot reach directly (both behind NAT, and no hole
    /// punched) is reached through a relay: each remote peer with a tunnel of its own
    /// gets a group of itself, then the relays that may stand in for it (this cluster's
    /// and its own cluster's, never a third cluster's, whose prefixes were not validated
    /// for it); it is routed through a relay only while it has no session and the relay
    /// has one. A relay does not relay through others.
    fn add_relay_groups(&self, out: &mut Desired, nodes: &[&MeshNode], relay_peers: &[PublicKey]) {
        let me_relay = nodes
            .iter()
            .any(|n| n.name_any() == self.own_name && n.spec.is_relay());
        // (cluster, name, key); "" is this cluster.
        let mut relays: Vec<(String, String, PublicKey)> = nodes
            .iter()
            .filter(|n| n.spec.is_relay() && n.name_any() != self.own_name)
            .filter_map(|n| Some((String::new(), n.name_any(), n.spec.public_key.parse().ok()?)))
            .collect();
        relays.extend(relay_peers.iter().filter_map(|k| {
            let origin = &out.peers.get(k)?.origin;
            Some((origin.cluster.clone(), origin.name.clone(), *k))
        }));
        relays.sort();
        relays.retain(|(_, _, k)| out.peers.contains_key(k));
        if me_relay || relays.is_empty() {
            return;
        }
        let relay_keys: Vec<PublicKey> = relays.iter().map(|(_, _, k)| *k).collect();
        let candidates: Vec<PublicKey> = out
            .peers
            .iter()
            .filter(|(k, p)| {
                !p.origin.cluster.is_empty()
                    && p.origin.path == mesh::PeerPath::Direct
                    && !relay_keys.contains(k)
                    && !out.groups.values().any(|g| g.members.contains(k))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in candidates {
            let Some(peer) = out.peers.get_mut(&key) else {
                continue;
            };
            let usable: Vec<PublicKey> = relays
                .iter()
                .filter(|(cluster, _, _)| cluster.is_empty() || *cluster == peer.origin.cluster)
                .map(|(_, _, k)| *k)
                .collect();
            if usable.is_empty() {
                continue;
            }
            // Handshakes must keep being tried while the peer is relayed (nothing else is
            // sent to it then), or it would never come back to direct.
            if peer.persistent_keepalive == 0 {
                peer.persistent_keepalive = RELAYED_KEEPALIVE;
            }
            let cidrs = std::mem::take(&mut peer.allowed_ips);
            let mut members = vec![key];
            members.extend(usable);
            out.groups.insert(
                format!("relay/{}", peer.origin.name),
                mesh::Group {
                    members,
                    cidrs,
                    liveness: mesh::Liveness::Session,
                },
            );
        }
    }
}

/// How a MeshNode or MeshPeer enters the device.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// A tunnel of its own, routed its prefixes.
    Direct,
    /// A tunnel whose prefixes are accepted but not routed (a gateway's own cluster).
    AcceptOnly,
    /// A member of a failover group; its prefixes join the group's.
    Member(String),
    /// No tunnel: its prefixes join the group that reaches it.
    Via(String),
}

/// `10.250.0.5/32` or `fd00::5/128`.
fn is_single_address(text: &str) -> bool {
    text.parse::<IpCidr>()
        .is_ok_and(|c| c.prefix_len() == if c.addr().is_ipv4() { 32 } else { 128 })
}

#[cfg(test)]
mod tests {
    use wiremesh_proto::crd::{MeshNodeSpec, MeshPeerSpec};

    use super::*;

    fn key(seed: u8) -> PublicKey {
        PublicKey::from([seed; 32])
    }

    fn mesh_node(name: &str, kind: MeshNodeKind, seed: u8, cidr: &str) -> MeshNode {
        MeshNode::new(
            name,
            MeshNodeSpec {
                public_key: if seed == 0 {
                    String::new()
                } else {
                    key(seed).to_base64()
                },
                endpoints: vec![format!("198.18.1.{seed}:51820")],
                pod_cidrs: vec![cidr.to_owned()],
                location: None,
                kind,
                gateway: false,
                relay: false,
                heartbeat: false,
            },
        )
    }

    fn mesh_peer(seed: u8, cidr: &str) -> MeshPeer {
        MeshPeer::new(
            "cluster-b.b1",
            MeshPeerSpec {
                cluster: "cluster-b".into(),
                node: "b1".into(),
                public_key: key(seed).to_base64(),
                endpoints: vec!["198.18.2.1:51820".into()],
                pod_cidrs: vec![cidr.into()],
                location: None,
                kind: MeshNodeKind::Node,
                gateway: false,
                relay: false,
                heartbeat: false,
            },
        )
    }

    fn selection(own: &str, local_peers: LocalPeers, own_cidr: &str) -> Selection {
        Selection {
            own_name: own.into(),
            local_peers,
            own_cidrs: vec![own_cidr.parse().unwrap()],
            keepalive: 25,
        }
    }

    fn cluster() -> Vec<MeshNode> {
        vec![
            mesh_node("a1", MeshNodeKind::Node, 1, "10.1.1.0/24"),
            mesh_node("a2", MeshNodeKind::Node, 2, "10.1.2.0/24"),
            mesh_node("db1", MeshNodeKind::Host, 3, "10.250.1.1/32"),
            // Registered, no agent yet: not ready.
            mesh_node("db2", MeshNodeKind::Host, 0, "10.250.2.1/32"),
            // A forged host claiming a network.
            mesh_node("evil", MeshNodeKind::Host, 4, "10.250.0.0/16"),
        ]
    }

    #[test]
    fn a_node_gets_the_mesh_peers_and_the_clusters_ready_hosts_only() {
        let peers = [mesh_peer(9, "10.2.1.0/24")];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), cluster().iter());
        assert!(set.groups.is_empty());
        let set = set.peers;
        let keys: Vec<_> = set.keys().copied().collect();
        assert_eq!(keys, [key(3), key(9)]);
        assert_eq!(set[&key(3)].origin.node, "db1");
        assert_eq!(set[&key(3)].allowed_ips, ["10.250.1.1/32".parse().unwrap()]);
    }

    #[test]
    fn a_host_gets_every_node_and_host_but_itself() {
        let peers = [mesh_peer(9, "10.2.1.0/24")];
        let set = selection("db1", LocalPeers::All, "10.250.1.1/32")
            .desired(peers.iter(), cluster().iter());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(keys, [key(1), key(2), key(9)]);
    }

    fn remote(seed: u8, node: &str, cidr: &str, gateway: bool) -> MeshPeer {
        let mut p = mesh_peer(seed, cidr);
        p.metadata.name = Some(format!("cluster-b.{node}"));
        p.spec.node = node.into();
        p.spec.gateway = gateway;
        p
    }

    fn cidrs(list: &[&str]) -> Vec<IpCidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn a_cluster_with_gateways_is_reached_through_them() {
        let mut host = remote(14, "h1", "10.250.9.1/32", false);
        host.spec.kind = MeshNodeKind::Host;
        let peers = [
            remote(12, "b2", "10.2.2.0/24", true),
            remote(11, "b1", "10.2.1.0/24", true),
            remote(13, "b3", "10.2.3.0/24", false),
            host,
        ];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), std::iter::empty());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(keys, [key(11), key(12), key(14)], "no tunnel to b3");
        assert!(set.peers[&key(11)].allowed_ips.is_empty());
        assert_eq!(set.peers[&key(14)].allowed_ips, cidrs(&["10.250.9.1/32"]));
        let group = &set.groups["cluster/cluster-b"];
        assert_eq!(group.members, [key(11), key(12)], "sorted by node name");
        assert_eq!(
            group.cidrs,
            cidrs(&["10.2.1.0/24", "10.2.2.0/24", "10.2.3.0/24"])
        );
    }

    #[test]
    fn a_relay_stands_in_only_for_its_own_clusters_peers() {
        let mut relay = remote(20, "rb", "10.250.9.1/32", false);
        relay.spec.kind = MeshNodeKind::Host;
        relay.spec.relay = true;
        let mut c1 = remote(30, "c1", "10.3.1.0/24", false);
        c1.spec.cluster = "cluster-c".into();
        c1.metadata.name = Some("cluster-c.c1".into());
        let peers = [remote(11, "b1", "10.2.1.0/24", false), relay, c1];
        let mut sel = selection("a1", LocalPeers::Hosts, "10.1.1.0/24");
        sel.keepalive = 0;
        let set = sel.desired(peers.iter(), std::iter::empty());
        let group = &set.groups["relay/cluster-b.b1"];
        assert_eq!(group.members, [key(11), key(20)]);
        assert_eq!(group.cidrs, cidrs(&["10.2.1.0/24"]));
        assert_eq!(group.liveness, mesh::Liveness::Session);
        // A relayed peer keeps trying the direct path even with keepalive off.
        assert_eq!(set.peers[&key(11)].persistent_keepalive, RELAYED_KEEPALIVE);
        // cluster-b's relay never carries cluster-c's prefixes.
        assert!(
            !set.groups.contains_key("relay/cluster-c.c1"),
            "{:?}",
            set.groups
        );
        assert_eq!(set.peers[&key(30)].allowed_ips, cidrs(&["10.3.1.0/24"]));
        assert_eq!(set.peers[&key(30)].persistent_keepalive, 0);
    }

    #[test]
    fn a_cluster_whose_gateways_are_all_refused_keeps_its_direct_tunnels() {
        // The only gateway claims our own CIDR: refused, so no gateway mode.
        let peers = [
            remote(11, "b1", "10.1.1.0/24", true),
            remote(13, "b3", "10.2.3.0/24", false),
        ];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), std::iter::empty());
        assert!(set.groups.is_empty(), "{:?}", set.groups);
        assert_eq!(set.peers[&key(13)].allowed_ips, cidrs(&["10.2.3.0/24"]));
    }

    fn gateway_cluster() -> Vec<MeshNode> {
        let mut nodes = vec![
            mesh_node("b1", MeshNodeKind::Node, 1, "10.2.1.0/24"),
            mesh_node("b2", MeshNodeKind::Node, 2, "10.2.2.0/24"),
            mesh_node("b3", MeshNodeKind::Node, 3, "10.2.3.0/24"),
            mesh_node("db1", MeshNodeKind::Host, 4, "10.250.1.1/32"),
        ];
        nodes[0].spec.gateway = true;
        nodes[1].spec.gateway = true;
        nodes
    }

    #[test]
    fn a_gateway_tunnels_to_the_remote_peers_and_accepts_its_clusters_pods() {
        let peers = [mesh_peer(9, "10.1.1.0/24")];
        let set = selection("b1", LocalPeers::Hosts, "10.2.1.0/24")
            .desired(peers.iter(), gateway_cluster().iter());
        assert!(set.groups.is_empty());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(
            keys,
            [key(3), key(4), key(9)],
            "b3, the host, the remote node"
        );
        let b3 = &set.peers[&key(3)];
        assert!(
            b3.allowed_ips.is_empty(),
            "b3's pods are reached through the cluster"
        );
        assert_eq!(b3.accept_ips, cidrs(&["10.2.3.0/24"]));
        assert!(
            set.peers
                .values()
                .all(|p| p.persistent_keepalive == mesh::GATEWAY_KEEPALIVE)
        );
        assert_eq!(set.peers[&key(9)].allowed_ips, cidrs(&["10.1.1.0/24"]));
    }

    #[test]
    fn a_node_behind_gateways_tunnels_only_to_them_and_the_hosts() {
        let peers = [mesh_peer(9, "10.1.1.0/24")];
        // In any order from the store: the members are preferred by node name.
        let set = selection("b3", LocalPeers::Hosts, "10.2.3.0/24")
            .desired(peers.iter(), gateway_cluster().iter().rev());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(keys, [key(1), key(2), key(4)]);
        assert!(set.peers[&key(1)].allowed_ips.is_empty());
        assert_eq!(set.peers[&key(1)].persistent_keepalive, 25);
        let group = &set.groups[LOCAL_GATEWAYS];
        assert_eq!(group.members, [key(1), key(2)]);
        assert_eq!(group.cidrs, cidrs(&["10.1.1.0/24"]));
        // A gateway with no endpoint cannot be reached: it is no gateway.
        let mut nodes = gateway_cluster();
        nodes[0].spec.endpoints.clear();
        nodes[1].spec.endpoints.clear();
        let set =
            selection("b3", LocalPeers::Hosts, "10.2.3.0/24").desired(peers.iter(), nodes.iter());
        assert!(set.groups.is_empty());
        assert!(set.peers.contains_key(&key(9)), "back to direct tunnels");
    }

    #[test]
    fn heartbeat_peers_with_a_tunnel_are_watched_and_a_heartbeat_node_keeps_them_alive() {
        let beating = |seed, node: &str, cidr: &str, gateway| {
            let mut p = remote(seed, node, cidr, gateway);
            p.spec.heartbeat = true;
            p
        };
        let peers = [
            beating(11, "b1", "10.2.1.0/24", false),
            remote(12, "b2", "10.2.2.0/24", false),
        ];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), cluster().iter());
        assert_eq!(
            set.watched,
            std::collections::BTreeMap::from([(key(11), "cluster-b.b1".to_owned())])
        );
        assert!(set.peers.values().all(|p| p.persistent_keepalive == 25));
        // Behind a remote cluster's gateways, a node has no tunnel of its own: nothing to
        // watch (its silence cannot be heard).
        let peers = [
            beating(11, "b1", "10.2.1.0/24", false),
            beating(12, "b2", "10.2.2.0/24", true),
        ];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), cluster().iter());
        assert_eq!(set.watched.keys().copied().collect::<Vec<_>>(), [key(12)]);
        // A node that hosts exported endpoints keeps every tunnel alive every second.
        let mut nodes = cluster();
        nodes[0].spec.heartbeat = true;
        let set =
            selection("a1", LocalPeers::Hosts, "10.1.1.0/24").desired(peers.iter(), nodes.iter());
        assert!(
            set.peers
                .values()
                .all(|p| p.persistent_keepalive == mesh::GATEWAY_KEEPALIVE)
        );
    }
}
