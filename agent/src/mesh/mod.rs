//! Turning the mesh's view of remote nodes into incremental device updates.
//!
//! Pure: Kubernetes mode and host mode feed it the peers they learnt; it answers with the
//! smallest [`DeviceUpdate`] that moves the device there, so a change to one peer never
//! touches the sessions of the others.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use wiremesh_proto::uapi::{DeviceUpdate, PeerUpdate};
use wiremesh_proto::{IpCidr, PublicKey};

pub mod liveness;
pub(crate) mod select;
pub mod status;

/// Which remote node a peer is, for logs, status and metric labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerOrigin {
    /// The MeshPeer's name.
    pub name: String,
    /// The peer cluster the node belongs to.
    pub cluster: String,
    /// The node's name in its cluster.
    pub node: String,
    /// How its tunnel is used (for status only).
    pub path: PeerPath,
}

/// How a peer is reached, for status: over a tunnel of its own, or through a gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PeerPath {
    /// A tunnel for its own prefixes.
    #[default]
    Direct,
    /// A failover group's member (a gateway): active or standing by.
    Gateway {
        /// The group.
        group: String,
        /// It carries the group's prefixes now.
        active: bool,
    },
    /// On a gateway: a node of its own cluster whose traffic it forwards.
    Forwarding,
    /// No tunnel: reached through this group's active member.
    Via {
        /// The group.
        group: String,
    },
    /// A relay.
    Relay,
    /// A peer not reached directly: its traffic goes through this relay.
    Relayed {
        /// The relay's name.
        via: String,
    },
}

/// Where each configured peer came from, by public key.
pub type Origins = BTreeMap<PublicKey, PeerOrigin>;

/// What the device should have for one remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Which remote node it is. Not part of the device's configuration: a change of it
    /// alone makes an update that changes nothing in the device.
    pub origin: PeerOrigin,
    /// The endpoint to start from; the device follows the peer if it roams.
    pub endpoint: Option<SocketAddr>,
    /// Every endpoint it publishes, most preferred first: the device moves to the next
    /// when a handshake goes unanswered.
    pub endpoints: Vec<SocketAddr>,
    /// The prefixes routed to it and accepted from it.
    pub allowed_ips: Vec<IpCidr>,
    /// Further prefixes accepted from it but not routed to it (sorted): a failover
    /// group's prefixes on every member but the active one, or the pods a gateway
    /// forwards for a node of its own cluster.
    pub accept_ips: Vec<IpCidr>,
    /// Persistent keepalive in seconds, 0 for off.
    pub persistent_keepalive: u16,
}

/// The peers keyed by public key.
pub type PeerSet = BTreeMap<PublicKey, DesiredPeer>;

/// Why a remote node was left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The key does not parse.
    #[error("{name}: public key {key:?} is not a WireGuard key")]
    Key {
        /// The MeshPeer.
        name: String,
        /// The offending value.
        key: String,
    },
    /// The key is a low-order point: every shared secret with it is zero, so a handshake
    /// with it would be keyed by a constant.
    #[error("{name}: public key {key} is a low-order point (every shared secret with it is zero)")]
    LowOrderKey {
        /// The MeshPeer.
        name: String,
        /// The offending key.
        key: PublicKey,
    },
    /// A CIDR does not parse.
    #[error("{name}: pod CIDR {cidr:?} does not parse")]
    Cidr {
        /// The MeshPeer.
        name: String,
        /// The offending value.
        cidr: String,
    },
    /// A CIDR overlaps this node's own pod CIDRs: routing it away would cut our pods off.
    #[error("{name}: pod CIDR {cidr} overlaps this node's own {own}")]
    Own {
        /// The MeshPeer.
        name: String,
        /// The offending prefix.
        cidr: IpCidr,
        /// Ours.
        own: IpCidr,
    },
}

/// Parses one remote node; refuses it whole if any part is bad or overlaps `own`.
///
/// # Errors
/// A [`PeerError`] naming the node and the field.
pub fn desired_peer(
    origin: &PeerOrigin,
    public_key: &str,
    endpoints: &[String],
    pod_cidrs: &[String],
    persistent_keepalive: u16,
    own: &[IpCidr],
) -> Result<(PublicKey, DesiredPeer), PeerError> {
    let name = &origin.name;
    let key: PublicKey = public_key.parse().map_err(|_| PeerError::Key {
        name: name.to_owned(),
        key: public_key.to_owned(),
    })?;
    if wiremesh_core::keys::is_low_order(&key) {
        return Err(PeerError::LowOrderKey {
            name: name.to_owned(),
            key,
        });
    }
    let mut allowed_ips = Vec::with_capacity(pod_cidrs.len());
    for text in pod_cidrs {
        let cidr: IpCidr = text.parse().map_err(|_| PeerError::Cidr {
            name: name.to_owned(),
            cidr: text.clone(),
        })?;
        if let Some(mine) = own.iter().find(|o| o.overlaps(&cidr)) {
            return Err(PeerError::Own {
                name: name.to_owned(),
                cidr,
                own: *mine,
            });
        }
        allowed_ips.push(cidr);
    }
    allowed_ips.sort();
    allowed_ips.dedup();
    // Endpoints are published most preferred first; the first that parses is tried first.
    let mut parsed: Vec<SocketAddr> = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints.iter().filter_map(|e| e.parse().ok()) {
        if !parsed.contains(&endpoint) {
            parsed.push(endpoint);
        }
    }
    let endpoint = parsed.first().copied();
    Ok((
        key,
        DesiredPeer {
            origin: origin.clone(),
            endpoint,
            endpoints: parsed,
            allowed_ips,
            accept_ips: Vec::new(),
            persistent_keepalive,
        },
    ))
}

/// Peers that stand in for one another: the gateways of a cluster. The group's prefixes
/// are routed to one member at a time, the active one, and accepted from all of them (a
/// gateway that took over may answer before we noticed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// The members, most preferred first (both sides sort by node name, so they agree).
    pub members: Vec<PublicKey>,
    /// The prefixes behind the group, sorted.
    pub cidrs: Vec<IpCidr>,
    /// How a member shows it is alive.
    pub liveness: Liveness,
}

/// How a failover group's member shows it is alive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from within [`DEAD_AFTER`]: gateways, which keep every tunnel busy with
    /// [`GATEWAY_KEEPALIVE`].
    #[default]
    Heard,
    /// A session is up (a handshake within [`TUNNEL_UP_WITHIN`]): a peer and the relays
    /// that stand in for it, where the peer is the first member and may never answer.
    Session,
}

/// What the device last saw of a peer, for [`choose_active`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Time since the last authenticated datagram.
    pub since_receive: Option<Duration>,
    /// Time since the current session's handshake.
    pub since_handshake: Option<Duration>,
}

impl Seen {
    /// What the device says of `peer`.
    pub fn of(peer: &wiremesh_core::PeerView) -> Self {
        Self {
            since_receive: peer.since_receive,
            since_handshake: peer.since_handshake,
        }
    }
}

/// Failover groups by name.
pub type Groups = BTreeMap<String, Group>;

/// The active member of each group.
pub type Active = BTreeMap<String, PublicKey>;

/// Persistent keepalive a gateway sends to every peer, so that the peers that route
/// through it hear it at least this often and notice within [`DEAD_AFTER`] when it dies.
pub const GATEWAY_KEEPALIVE: u16 = 1;

/// A member not heard from for this long is taken for dead (three missed keepalives).
pub const DEAD_AFTER: Duration = Duration::from_secs(3);

/// Picks each group's active member: the most preferred member heard from within
/// [`DEAD_AFTER`] (so both sides of a link converge on the same gateway, and traffic
/// returns to a preferred gateway that recovers). When none is alive, the current
/// member stays (or the first, for a new group): switching among the dead gains nothing.
///
/// `seen` gives what the device last saw of each peer.
pub fn choose_active(
    groups: &Groups,
    seen: &BTreeMap<PublicKey, Seen>,
    current: &Active,
) -> Active {
    let alive = |key: &PublicKey, liveness: Liveness| {
        let seen = seen.get(key).copied().unwrap_or_default();
        match liveness {
            Liveness::Heard => seen.since_receive.is_some_and(|d| d < DEAD_AFTER),
            Liveness::Session => seen.since_handshake.is_some_and(|d| d < TUNNEL_UP_WITHIN),
        }
    };
    groups
        .iter()
        .filter_map(|(name, group)| {
            let chosen = group
                .members
                .iter()
                .find(|k| alive(k, group.liveness))
                .or_else(|| current.get(name).filter(|k| group.members.contains(k)))
                .or_else(|| group.members.first())?;
            Some((name.clone(), *chosen))
        })
        .collect()
}

/// The peers as the device should have them: each group's prefixes routed to its active
/// member and accepted from all its members.
pub fn materialize(peers: &PeerSet, groups: &Groups, active: &Active) -> PeerSet {
    let mut out = peers.clone();
    for (name, group) in groups {
        for key in &group.members {
            let Some(peer) = out.get_mut(key) else {
                continue;
            };
            let is_active = active.get(name) == Some(key);
            peer.origin.path = match group.liveness {
                Liveness::Heard => PeerPath::Gateway {
                    group: name.clone(),
                    active: is_active,
                },
                // A relay group: the peer itself, then the relays.
                Liveness::Session if group.members.first() != Some(key) => PeerPath::Relay,
                Liveness::Session if is_active => PeerPath::Direct,
                Liveness::Session => PeerPath::Relayed {
                    via: active
                        .get(name)
                        .and_then(|k| peers.get(k))
                        .map(|p| p.origin.name.clone())
                        .unwrap_or_default(),
                },
            };
            if is_active {
                peer.allowed_ips.extend(&group.cidrs);
                peer.allowed_ips.sort();
                peer.allowed_ips.dedup();
            } else {
                peer.accept_ips.extend(&group.cidrs);
            }
        }
    }
    for peer in out.values_mut() {
        peer.accept_ips.sort();
        peer.accept_ips.dedup();
        peer.accept_ips.retain(|c| !peer.allowed_ips.contains(c));
    }
    out
}

/// At most `max` of `peers`: the first by cluster, node and name (then key), so every
/// agent refuses the same ones whatever order they came in; also the origins of those
/// refused, in that order. A linked cluster that publishes more nodes than an agent can
/// hold costs it a bounded table, never its memory.
pub fn cap(mut peers: PeerSet, max: usize) -> (PeerSet, Vec<PeerOrigin>) {
    if peers.len() <= max {
        return (peers, Vec::new());
    }
    let mut order: Vec<(&str, &str, &str, PublicKey)> = peers
        .iter()
        .map(|(k, p)| {
            (
                p.origin.cluster.as_str(),
                p.origin.node.as_str(),
                p.origin.name.as_str(),
                *k,
            )
        })
        .collect();
    order.sort_unstable();
    let over: Vec<PublicKey> = order.iter().skip(max).map(|(.., k)| *k).collect();
    let refused = over
        .iter()
        .filter_map(|k| peers.remove(k).map(|p| p.origin))
        .collect();
    (peers, refused)
}

/// The update that turns `applied` into `desired`: removes, additions, and changes of
/// only the fields that changed. `None` when there is nothing to do.
///
/// An unchanged endpoint is not sent again, so a peer that roamed stays where it roamed.
///
/// A node whose key changed (the key it had gone, a new one with the same MeshPeer name
/// and cluster) is a rekey, not a remove and an add: [`PeerUpdate::replaces`] keeps its
/// sessions under the old key carrying traffic until one under the new key exists.
pub fn diff(applied: &PeerSet, desired: &PeerSet) -> Option<DeviceUpdate> {
    let rekeyed = rekeyed(applied, desired);
    let mut peers = Vec::new();
    for key in applied.keys() {
        if !desired.contains_key(key) && !rekeyed.values().any(|old| old == key) {
            let mut update = PeerUpdate::new(*key);
            update.remove = true;
            peers.push(update);
        }
    }
    for (key, want) in desired {
        let replaces = rekeyed.get(key).copied();
        let have = applied
            .get(key)
            .or_else(|| replaces.and_then(|old| applied.get(&old)));
        if have == Some(want) && replaces.is_none() {
            continue;
        }
        let mut update = PeerUpdate::new(*key);
        update.replaces = replaces;
        if have.map(|h| h.endpoint) != Some(want.endpoint) {
            update.endpoint = want.endpoint;
        }
        if have.map(|h| &h.endpoints) != Some(&want.endpoints) {
            update.endpoints = Some(want.endpoints.clone());
        }
        if have.map(|h| &h.allowed_ips) != Some(&want.allowed_ips) {
            update.replace_allowed_ips = true;
            update.allowed_ips = want.allowed_ips.clone();
        }
        if have.map(|h| &h.accept_ips) != Some(&want.accept_ips) {
            update.accept_ips = Some(want.accept_ips.clone());
        }
        if have.map(|h| h.persistent_keepalive) != Some(want.persistent_keepalive) {
            update.persistent_keepalive = Some(want.persistent_keepalive);
        }
        peers.push(update);
    }
    (!peers.is_empty()).then(|| DeviceUpdate {
        peers,
        ..DeviceUpdate::default()
    })
}

/// New key -> old key of each node whose key changed between `applied` and `desired`:
/// an applied peer whose key is gone and a desired one not applied yet with the same
/// MeshPeer name and cluster.
fn rekeyed(applied: &PeerSet, desired: &PeerSet) -> BTreeMap<PublicKey, PublicKey> {
    let gone: BTreeMap<(&str, &str), PublicKey> = applied
        .iter()
        .filter(|(key, p)| !desired.contains_key(*key) && !p.origin.name.is_empty())
        .map(|(key, p)| ((p.origin.name.as_str(), p.origin.cluster.as_str()), *key))
        .collect();
    desired
        .iter()
        .filter(|(key, _)| !applied.contains_key(*key))
        .filter_map(|(key, p)| {
            gone.get(&(p.origin.name.as_str(), p.origin.cluster.as_str()))
                .map(|old| (*key, *old))
        })
        .collect()
}

/// How a tunnel to a peer of this path is used, for status.
pub fn tunnel_path(path: &PeerPath) -> wiremesh_proto::crd::TunnelPath {
    use wiremesh_proto::crd::TunnelPath;
    match path {
        PeerPath::Direct | PeerPath::Via { .. } => TunnelPath::Direct,
        PeerPath::Relay => TunnelPath::Relay,
        PeerPath::Relayed { .. } => TunnelPath::Relayed,
        PeerPath::Gateway { active: true, .. } => TunnelPath::Gateway,
        PeerPath::Gateway { active: false, .. } => TunnelPath::Standby,
        PeerPath::Forwarding => TunnelPath::Forwarding,
    }
}

/// The peers reached through a gateway, each with the name of the group's active member.
pub fn via_gateways(origins: &Origins) -> Vec<wiremesh_proto::crd::ViaGateway> {
    let active: BTreeMap<&str, &str> = origins
        .values()
        .filter_map(|o| match &o.path {
            PeerPath::Gateway {
                group,
                active: true,
            } => Some((group.as_str(), o.name.as_str())),
            _ => None,
        })
        .collect();
    let mut out: Vec<_> = origins
        .values()
        .filter_map(|o| match &o.path {
            PeerPath::Via { group } => Some(wiremesh_proto::crd::ViaGateway {
                name: o.name.clone(),
                gateway: active.get(group.as_str()).copied().unwrap_or("").to_owned(),
            }),
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A tunnel counts as up while its session is younger than this (WireGuard's
/// REJECT_AFTER_TIME: an older session can no longer carry data).
pub const TUNNEL_UP_WITHIN: Duration = Duration::from_secs(180);

/// Tunnels that went up or down since `previous` (true: up), and the new state. A tunnel
/// seen for the first time is reported only when it is up; a removed one is forgotten.
pub fn tunnel_transitions(
    previous: &BTreeMap<PublicKey, bool>,
    peers: &[wiremesh_core::PeerView],
) -> (Vec<(PublicKey, bool)>, BTreeMap<PublicKey, bool>) {
    let mut changes = Vec::new();
    let mut now = BTreeMap::new();
    for peer in peers {
        let up = peer.since_handshake.is_some_and(|d| d < TUNNEL_UP_WITHIN);
        if previous.get(&peer.public_key).copied().unwrap_or(false) != up {
            changes.push((peer.public_key, up));
        }
        now.insert(peer.public_key, up);
    }
    (changes, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(key: u8, since: Option<u64>) -> wiremesh_core::PeerView {
        wiremesh_core::PeerView {
            since_handshake: since.map(Duration::from_secs),
            ..wiremesh_core::PeerView::configured(PublicKey::from([key; 32]))
        }
    }

    #[test]
    fn tunnel_transitions_report_changes_only() {
        let (changes, state) =
            tunnel_transitions(&BTreeMap::new(), &[view(1, None), view(2, Some(3))]);
        // A new tunnel that is down is not news; one that is up is.
        assert_eq!(changes, vec![(PublicKey::from([2; 32]), true)]);
        let (changes, state) = tunnel_transitions(&state, &[view(1, Some(1)), view(2, Some(4))]);
        assert_eq!(changes, vec![(PublicKey::from([1; 32]), true)]);
        let (changes, _) = tunnel_transitions(&state, &[view(1, Some(200)), view(2, Some(5))]);
        assert_eq!(changes, vec![(PublicKey::from([1; 32]), false)]);
    }

    fn key(b: u8) -> PublicKey {
        PublicKey::from([b; 32])
    }

    fn peer(name: &str, endpoint: &str, cidrs: &[&str]) -> DesiredPeer {
        DesiredPeer {
            origin: origin(name),
            endpoint: Some(endpoint.parse().unwrap()),
            endpoints: vec![endpoint.parse().unwrap()],
            allowed_ips: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            accept_ips: Vec::new(),
            persistent_keepalive: 25,
        }
    }

    #[test]
    fn peers_over_the_cap_are_the_last_by_cluster_and_node_whatever_the_order() {
        let named = |cluster: &str, node: &str| DesiredPeer {
            origin: PeerOrigin {
                name: format!("{cluster}.{node}"),
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                path: PeerPath::Direct,
            },
            ..peer("x", "198.18.2.1:51820", &[])
        };
        // Keys in the opposite order of the names, so the map's order is not the answer.
        let mut set = PeerSet::new();
        set.insert(key(9), named("cluster-b", "b1"));
        set.insert(key(8), named("cluster-b", "b2"));
        set.insert(key(7), named("cluster-c", "c1"));
        set.insert(key(6), named("", "host-1"));
        set.insert(key(5), named("cluster-c", "c0"));
        let (kept, refused) = cap(set.clone(), 3);
        assert_eq!(
            kept.keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            std::collections::BTreeSet::from([key(6), key(9), key(8)])
        );
        let refused: Vec<String> = refused.into_iter().map(|o| o.name).collect();
        assert_eq!(refused, vec!["cluster-c.c0", "cluster-c.c1"]);
        // Under the cap, nothing changes.
        let (all, none) = cap(set.clone(), 5);
        assert_eq!((all, none), (set.clone(), Vec::new()));
        let (empty, refused) = cap(set, 0);
        assert!(empty.is_empty());
        assert_eq!(refused.len(), 5);
    }

    fn gateways() -> (PeerSet, Groups) {
        let mut set = PeerSet::new();
        set.insert(key(1), peer("b.gw1", "198.18.2.1:51820", &[]));
        set.insert(key(2), peer("b.gw2", "198.18.2.2:51820", &[]));
        set.insert(key(3), peer("b.h1", "198.18.9.1:51820", &["10.250.1.1/32"]));
        let group = Group {
            members: vec![key(1), key(2)],
            cidrs: vec![
                "10.2.1.0/24".parse().unwrap(),
                "10.2.3.0/24".parse().unwrap(),
            ],
            liveness: Liveness::Heard,
        };
        (set, Groups::from([("cluster-b".to_owned(), group)]))
    }

    fn heard(pairs: &[(u8, Option<u64>)]) -> BTreeMap<PublicKey, Seen> {
        pairs
            .iter()
            .map(|(k, s)| {
                let seen = Seen {
                    since_receive: s.map(Duration::from_secs),
                    since_handshake: None,
                };
                (key(*k), seen)
            })
            .collect()
    }

    #[test]
    fn the_most_preferred_live_member_is_active() {
        let (_, groups) = gateways();
        let none = Active::new();
        // Nobody heard yet: the first member.
        let active = choose_active(&groups, &heard(&[]), &none);
        assert_eq!(active["cluster-b"], key(1));
        // The first one died (silent for 5 s); the second is alive.
        let active = choose_active(&groups, &heard(&[(1, Some(5)), (2, Some(0))]), &active);
        assert_eq!(active["cluster-b"], key(2));
        // Both dead: stay where we are rather than flap.
        let active = choose_active(&groups, &heard(&[(1, Some(9)), (2, Some(9))]), &active);
        assert_eq!(active["cluster-b"], key(2));
        // The first came back: back to it, as the other side will.
        let active = choose_active(&groups, &heard(&[(1, Some(0)), (2, Some(0))]), &active);
        assert_eq!(active["cluster-b"], key(1));
        // An empty group has no active member.
        let empty = Groups::from([("x".to_owned(), Group::default())]);
        assert!(choose_active(&empty, &heard(&[]), &none).is_empty());
    }

    #[test]
    fn a_peer_is_relayed_while_it_has_no_session_and_the_relay_has_one() {
        let mut set = PeerSet::new();
        set.insert(key(1), peer("b.n1", "198.19.2.1:51820", &[]));
        set.insert(
            key(7),
            peer("relay", "198.18.9.1:51820", &["10.250.9.1/32"]),
        );
        let group = Group {
            members: vec![key(1), key(7)],
            cidrs: vec!["10.2.1.0/24".parse().unwrap()],
            liveness: Liveness::Session,
        };
        let groups = Groups::from([("relay/b.n1".to_owned(), group)]);
        let session = |k: u8, s: Option<u64>| {
            let seen = Seen {
                since_receive: Some(Duration::ZERO),
                since_handshake: s.map(Duration::from_secs),
            };
            (key(k), seen)
        };
        // Nothing up yet: try the peer itself.
        let active = choose_active(&groups, &BTreeMap::new(), &Active::new());
        assert_eq!(active["relay/b.n1"], key(1));
        // Only the relay has a session: relay. Heard-from alone does not count.
        let seen = BTreeMap::from([session(1, None), session(7, Some(4))]);
        let active = choose_active(&groups, &seen, &active);
        assert_eq!(active["relay/b.n1"], key(7));
        let set2 = materialize(&set, &groups, &active);
        assert_eq!(
            set2[&key(1)].origin.path,
            PeerPath::Relayed {
                via: "relay".to_owned()
            }
        );
        assert_eq!(set2[&key(7)].origin.path, PeerPath::Relay);
        assert!(
            set2[&key(7)]
                .allowed_ips
                .contains(&"10.2.1.0/24".parse().unwrap())
        );
        assert!(
            set2[&key(1)]
                .accept_ips
                .contains(&"10.2.1.0/24".parse().unwrap())
        );
        // The peer answers at last: direct again.
        let seen = BTreeMap::from([session(1, Some(0)), session(7, Some(4))]);
        let active = choose_active(&groups, &seen, &active);
        assert_eq!(active["relay/b.n1"], key(1));
        let set3 = materialize(&set, &groups, &active);
        assert_eq!(set3[&key(1)].origin.path, PeerPath::Direct);
        assert_eq!(
            set3[&key(1)].allowed_ips,
            vec!["10.2.1.0/24".parse().unwrap()]
        );
    }

    #[test]
    fn status_names_the_gateway_each_peer_goes_through() {
        let (set, groups) = gateways();
        let active = Active::from([("cluster-b".to_owned(), key(2))]);
        let mut origins: Origins = materialize(&set, &groups, &active)
            .into_iter()
            .map(|(k, p)| (k, p.origin))
            .collect();
        let mut b3 = origin("b.n3");
        b3.path = PeerPath::Via {
            group: "cluster-b".to_owned(),
        };
        origins.insert(key(9), b3);
        let via = via_gateways(&origins);
        assert_eq!(via.len(), 1);
        assert_eq!(
            (via[0].name.as_str(), via[0].gateway.as_str()),
            ("b.n3", "b.gw2")
        );
        use wiremesh_proto::crd::TunnelPath;
        assert_eq!(tunnel_path(&origins[&key(2)].path), TunnelPath::Gateway);
        assert_eq!(tunnel_path(&origins[&key(1)].path), TunnelPath::Standby);
        assert_eq!(tunnel_path(&origins[&key(3)].path), TunnelPath::Direct);
    }

    #[test]
    fn the_active_member_is_routed_the_others_only_accept() {
        let (set, groups) = gateways();
        let active = Active::from([("cluster-b".to_owned(), key(1))]);
        let first = materialize(&set, &groups, &active);
        assert_eq!(first[&key(1)].allowed_ips, groups["cluster-b"].cidrs);
        assert!(first[&key(1)].accept_ips.is_empty());
        assert!(first[&key(2)].allowed_ips.is_empty());
        assert_eq!(first[&key(2)].accept_ips, groups["cluster-b"].cidrs);
        assert_eq!(
            first[&key(3)],
            set[&key(3)],
            "a host outside the group is untouched"
        );
        // Failing over moves the routes and touches only the two members.
        let active = Active::from([("cluster-b".to_owned(), key(2))]);
        let second = materialize(&set, &groups, &active);
        let update = diff(&first, &second).unwrap();
        assert_eq!(update.peers.len(), 2);
        let to = update
            .peers
            .iter()
            .find(|p| p.public_key == key(2))
            .unwrap();
        assert!(to.replace_allowed_ips && to.allowed_ips == groups["cluster-b"].cidrs);
        assert_eq!(to.accept_ips, Some(Vec::new()));
        let from = update
            .peers
            .iter()
            .find(|p| p.public_key == key(1))
            .unwrap();
        assert!(from.replace_allowed_ips && from.allowed_ips.is_empty());
        assert_eq!(
            from.accept_ips.as_deref(),
            Some(&groups["cluster-b"].cidrs[..])
        );
        assert_eq!(diff(&second, &materialize(&set, &groups, &active)), None);
    }

    #[test]
    fn nothing_to_do_when_equal() {
        let mut set = PeerSet::new();
        set.insert(key(1), peer("b.n1", "198.18.0.2:51820", &["10.2.0.0/24"]));
        assert_eq!(diff(&set, &set), None);
    }

    #[test]
    fn added_removed_and_changed_peers_touch_only_themselves() {
        let mut applied = PeerSet::new();
        applied.insert(key(1), peer("b.n1", "198.18.0.2:51820", &["10.2.0.0/24"]));
        applied.insert(key(2), peer("b.n2", "198.18.0.3:51820", &["10.2.1.0/24"]));
        applied.insert(key(3), peer("b.n3", "198.18.0.4:51820", &["10.2.2.0/24"]));
        let mut desired = applied.clone();
        desired.remove(&key(2));
        desired.insert(key(4), peer("b.n4", "198.18.0.5:51820", &["10.2.3.0/24"]));
        desired.get_mut(&key(3)).unwrap().allowed_ips = vec!["10.2.9.0/24".parse().unwrap()];
        let update = diff(&applied, &desired).unwrap();
        assert!(!update.replace_peers);
        let by_key: BTreeMap<_, _> = update.peers.iter().map(|p| (p.public_key, p)).collect();
        assert_eq!(by_key.len(), 3, "peer 1 is not touched");
        assert!(by_key[&key(2)].remove);
        assert_eq!(
            by_key[&key(4)].endpoint,
            Some("198.18.0.5:51820".parse().unwrap())
        );
        let changed = by_key[&key(3)];
        assert!(changed.replace_allowed_ips && changed.endpoint.is_none());
        assert_eq!(changed.persistent_keepalive, None);
    }

    #[test]
    fn a_node_whose_key_changed_is_rekeyed_not_removed_and_added() {
        let mut applied = PeerSet::new();
        applied.insert(key(1), peer("b.n1", "198.18.0.2:51820", &["10.2.0.0/24"]));
        applied.insert(key(2), peer("b.n2", "198.18.0.3:51820", &["10.2.1.0/24"]));
        let mut desired = applied.clone();
        let n1 = desired.remove(&key(1)).unwrap();
        desired.insert(key(9), n1);
        let update = diff(&applied, &desired).unwrap();
        assert_eq!(update.peers.len(), 1, "{:?}", update.peers);
        let rekey = &update.peers[0];
        assert_eq!((rekey.public_key, rekey.replaces), (key(9), Some(key(1))));
        assert!(!rekey.remove);
        // Nothing else changed: the endpoint it roamed to and its prefixes stay.
        assert_eq!(rekey.endpoint, None);
        assert!(!rekey.replace_allowed_ips);
        // A different node with a new key is a remove and an add.
        let mut desired = applied.clone();
        desired.remove(&key(1));
        desired.insert(key(9), peer("b.n3", "198.18.0.4:51820", &["10.2.2.0/24"]));
        let update = diff(&applied, &desired).unwrap();
        assert!(update.peers.iter().all(|p| p.replaces.is_none()));
        assert!(
            update
                .peers
                .iter()
                .any(|p| p.remove && p.public_key == key(1))
        );
    }

    #[test]
    fn a_new_origin_alone_is_an_update_that_changes_nothing_in_the_device() {
        let mut applied = PeerSet::new();
        applied.insert(key(1), peer("b.n1", "198.18.0.2:51820", &["10.2.0.0/24"]));
        let mut desired = applied.clone();
        desired.get_mut(&key(1)).unwrap().origin = origin("c.n1");
        let update = diff(&applied, &desired).unwrap();
        assert_eq!(update.peers, vec![PeerUpdate::new(key(1))]);
    }

    #[test]
    fn a_peer_claiming_our_own_pod_cidr_is_refused() {
        let own: Vec<IpCidr> = vec!["10.1.0.0/24".parse().unwrap()];
        let err = desired_peer(
            &origin("b.evil"),
            &key(1).to_base64(),
            &[],
            &["10.1.0.0/16".to_owned()],
            25,
            &own,
        )
        .unwrap_err();
        assert!(matches!(err, PeerError::Own { .. }), "{err}");
        assert!(desired_peer(&origin("x"), "nope", &[], &[], 0, &own).is_err());
        assert!(
            desired_peer(
                &origin("x"),
                &key(1).to_base64(),
                &[],
                &["10.9.0.1/24".to_owned()],
                0,
                &own
            )
            .is_ok()
        );
    }

    #[test]
    fn a_peer_with_a_low_order_key_is_refused_naming_it() {
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [PublicKey::from([0; 32]), PublicKey::from(one)] {
            let err = desired_peer(
                &origin("b.evil"),
                &bad.to_base64(),
                &["198.18.0.9:51820".to_owned()],
                &["10.9.0.0/24".to_owned()],
                25,
                &[],
            )
            .unwrap_err();
            assert!(
                matches!(err, PeerError::LowOrderKey { key, .. } if key == bad),
                "{err}"
            );
            let said = err.to_string();
            assert!(
                said.contains("b.evil") && said.contains(&bad.to_base64()),
                "{said}"
            );
        }
    }

    #[test]
    fn the_first_endpoint_that_parses_wins() {
        let (_, p) = desired_peer(
            &origin("b.n1"),
            &key(1).to_base64(),
            &[
                "bogus".to_owned(),
                "198.18.0.2:51820".to_owned(),
                "[fd00::2]:51820".to_owned(),
            ],
            &[],
            0,
            &[],
        )
        .unwrap();
        assert_eq!(p.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        let all: Vec<SocketAddr> = vec![
            "198.18.0.2:51820".parse().unwrap(),
            "[fd00::2]:51820".parse().unwrap(),
        ];
        assert_eq!(p.endpoints, all, "every endpoint that parses, in order");
        // A new fallback list alone is sent without moving the endpoint in use.
        let mut q = p.clone();
        q.endpoints.reverse();
        let (a, b) = (PeerSet::from([(key(1), p)]), PeerSet::from([(key(1), q)]));
        let update = diff(&a, &b).unwrap();
        assert_eq!(update.peers[0].endpoint, None);
        assert_eq!(update.peers[0].endpoints.as_ref().map(Vec::len), Some(2));
    }

    /// The origin of MeshPeer `name` (`cluster.node`).
    fn origin(name: &str) -> PeerOrigin {
        let (cluster, node) = name.split_once('.').unwrap_or((name, ""));
        PeerOrigin {
            name: name.to_owned(),
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            path: PeerPath::Direct,
        }
    }
}
