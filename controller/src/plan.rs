//! Decide, then act: from a `PeerCluster`, its remote `MeshNode`s and what this cluster
//! already holds, the `MeshPeer`s to apply and delete, and the remote nodes refused, with why.
//!
//! Pure: no I/O and no clock. The sync task in [`crate::remote`] applies the plan.
//!
//! A peer is never trusted. A remote node is mirrored only when its key and every one of
//! its pod CIDRs parse, every CIDR lies inside what its cluster was allowed at join time,
//! and none overlaps this cluster's own CIDRs (the cluster's pod CIDRs and those of local
//! `MeshNode`s), another peer cluster's allowed CIDRs or `MeshPeer`s, or another node of the
//! same remote cluster (then both are refused: neither claim can be told from the other).
//! A host (kind `Host`) may also claim single addresses inside the host range its cluster
//! was granted at join time. No remote node may claim a reserved address ([`Reserved`]):
//! loopback, link-local (the cloud metadata address), multicast, unspecified, this
//! cluster's service CIDRs, API server and Nodes' addresses (`InternalIP`, `ExternalIP`);
//! nor may a host claim an endpoint of a node here
//! or of a peer (a route into a tunnel for a tunnel's own endpoint loops).
//! A refused node that was mirrored before loses its `MeshPeer`.
//!
//! A peer cluster whose pod CIDRs are translated (its `PeerCluster` has `meshCIDRs`, issue
//! 14) has its nodes' pod CIDRs checked against `allowedPodCIDRs` in its own pod space, then
//! mapped into its mesh CIDRs: everything else (overlaps, reserved ranges, siblings, the
//! `MeshPeer`) sees the mapped CIDRs, which is all its pods are known by here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt as _;
use wiremesh_proto::crd::{
    MeshNode, MeshNodeKind, MeshNodeStatus, MeshPeer, MeshPeerSpec, PEER_CLUSTER_LABEL,
    PeerCluster, TunnelStatus, mesh_peer_name,
};
use wiremesh_proto::{IpCidr, PrefixMap, PublicKey, Towards};

/// Longest object name the API server accepts: a DNS subdomain (RFC 1123), 253 characters.
const MAX_NAME_LEN: usize = 253;
/// Most endpoints a MeshPeer holds (the CRD's limit): published first, then observed.
const MAX_ENDPOINTS: usize = 8;

/// What to do for one `PeerCluster`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// `MeshPeer`s to create or update (server-side apply), sorted by name.
    pub apply: Vec<Desired>,
    /// Names of this peer cluster's `MeshPeer`s to delete, sorted.
    pub delete: Vec<String>,
    /// Remote nodes refused, sorted by node; a node may appear once per offending CIDR.
    pub conflicts: Vec<Conflict>,
    /// How many remote nodes are mirrored once the plan is applied.
    pub mirrored: usize,
}

/// One `MeshPeer` as it should be.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// `<cluster>.<node>`.
    pub name: String,
    /// Its spec, with keys, CIDRs and endpoints in canonical form.
    pub spec: MeshPeerSpec,
}

/// A remote node that is not mirrored, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// The remote node's name.
    pub node: String,
    /// The offending pod CIDR as the node wrote it, when a CIDR is the problem.
    pub cidr: Option<String>,
    /// Why it was refused.
    pub reason: Reason,
}

/// Why a remote node was refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The public key is not 32 bytes of base64, or is all zeros.
    InvalidKey {
        /// The key as written.
        key: String,
    },
    /// Another node (here or in a peer cluster) has the same public key.
    DuplicateKey {
        /// The key.
        key: String,
        /// Who else has it.
        other: Owner,
    },
    /// The pod CIDR does not parse.
    InvalidCidr,
    /// The pod CIDR is not inside the CIDRs the cluster was allowed at join time.
    OutsideAllowed {
        /// The peer cluster.
        cluster: String,
        /// What it was allowed.
        allowed: Vec<IpCidr>,
    },
    /// A host's address is neither inside the cluster's allowed pod CIDRs nor inside the
    /// host range it was granted at join time.
    OutsideHostRange {
        /// The peer cluster.
        cluster: String,
        /// The host range it was granted (empty: none).
        allowed: Vec<IpCidr>,
    },
    /// The CIDR overlaps an address no peer may claim.
    Reserved {
        /// The reserved range.
        other: IpCidr,
        /// What it is.
        what: Reserved,
    },
    /// The pod CIDR overlaps one claimed by someone else.
    Overlaps {
        /// The other CIDR.
        other: IpCidr,
        /// Whose it is.
        owner: Owner,
    },
    /// An endpoint is not `IP:port`.
    InvalidEndpoint {
        /// The endpoint as written.
        endpoint: String,
    },
    /// `<cluster>.<node>` is too long for an object name.
    NameTooLong,
    /// The remote MeshNode is larger than the controller keeps of one node.
    TooLarge {
        /// The limit, in bytes of JSON.
        max: usize,
    },
    /// The peer cluster has more nodes than are mirrored from one peer cluster.
    TooManyNodes {
        /// The cap (the controller's `--max-nodes-per-peer`).
        max: usize,
    },
    /// The peer cluster's `meshCIDRs` do not pair with its `allowedPodCIDRs`, or the pod
    /// CIDR has no image in them that is one prefix (an IPv6 node CIDR between /49 and
    /// /63 under a checksum-neutral /48 mapping).
    Untranslatable {
        /// What is wrong.
        why: String,
    },
}

/// Who holds a CIDR or key that a remote node also claims.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// This cluster's pod CIDRs.
    LocalCluster {
        /// This cluster's name.
        cluster: String,
    },
    /// A `MeshNode` of this cluster.
    LocalNode {
        /// Its name.
        node: String,
    },
    /// The allowed pod CIDRs of another peer cluster.
    PeerAllowed {
        /// The other peer cluster.
        cluster: String,
    },
    /// A `MeshPeer` of another peer cluster.
    PeerNode {
        /// The other peer cluster.
        cluster: String,
        /// The node.
        node: String,
    },
    /// Another node of the same remote cluster (both are refused).
    Sibling {
        /// The other node.
        node: String,
    },
}

/// An address range that no remote node may claim, whatever its cluster was allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reserved {
    /// Loopback (`127.0.0.0/8`, `::1`).
    Loopback,
    /// Link-local (`169.254.0.0/16`, the cloud metadata address included; `fe80::/10`).
    LinkLocal,
    /// Multicast or broadcast (`224.0.0.0/4`, `255.255.255.255`, `ff00::/8`).
    Multicast,
    /// Unspecified, "this network" or IPv4-mapped (`0.0.0.0/8`, `::`, `::ffff:0:0/96`).
    Unspecified,
    /// This cluster's service CIDR.
    ServiceCidr,
    /// This cluster's API server.
    ApiServer,
    /// An address of one of this cluster's Nodes (`InternalIP`, `ExternalIP`).
    LocalNode {
        /// The Node.
        node: String,
    },
    /// An endpoint of a node (or host) of this cluster.
    LocalEndpoint {
        /// The node.
        node: String,
    },
    /// An endpoint of a peer cluster's node: a route into a tunnel for it would loop.
    PeerEndpoint {
        /// The peer cluster.
        cluster: String,
        /// The node.
        node: String,
    },
}

impl Reserved {
    /// Whether the range binds pod CIDRs too, and not only hosts' addresses. Endpoints do
    /// not: a pod range was granted explicitly at join time, and the endpoints are written
    /// by nodes and peers, which must not be able to cut a granted range off.
    fn binds_pod_cidrs(&self) -> bool {
        !matches!(self, Self::LocalEndpoint { .. } | Self::PeerEndpoint { .. })
    }
}

/// The ranges reserved everywhere: (CIDR, what).
const SPECIAL: [(&str, Reserved); 10] = [
    ("127.0.0.0/8", Reserved::Loopback),
    ("::1/128", Reserved::Loopback),
    ("169.254.0.0/16", Reserved::LinkLocal),
    ("fe80::/10", Reserved::LinkLocal),
    ("224.0.0.0/4", Reserved::Multicast),
    ("255.255.255.255/32", Reserved::Multicast),
    ("ff00::/8", Reserved::Multicast),
    ("0.0.0.0/8", Reserved::Unspecified),
    ("::/128", Reserved::Unspecified),
    ("::ffff:0:0/96", Reserved::Unspecified),
];

/// What this cluster holds itself: its pod CIDRs, and the pod CIDRs and keys of its own
/// `MeshNode`s, and the ranges no peer may claim.
#[derive(Debug, Clone, Default)]
pub struct Local {
    claims: Index,
    reserved: Index<Reserved>,
    keys: BTreeMap<PublicKey, Owner>,
    /// Endpoints this cluster's machines observed their peers at, by tunnel (MeshPeer)
    /// name: see [`observed_endpoints`].
    observed: BTreeMap<String, Vec<SocketAddr>>,
}

/// What of a MeshNode's status the controller uses: per tunnel, where the peer was last
/// heard from (`observedEndpoint`, an authenticated source), sorted. Status rewrites
/// that change nothing else (every 10 s per node) then compare equal and cause no
/// replanning.
pub fn observations_only(status: Option<MeshNodeStatus>) -> Option<MeshNodeStatus> {
    let mut peers: Vec<TunnelStatus> = status?
        .peers
        .into_iter()
        .filter(|t| t.observed_endpoint.is_some())
        .map(|t| TunnelStatus {
            name: t.name,
            observed_endpoint: t.observed_endpoint,
            ..TunnelStatus::default()
        })
        .collect();
    peers.sort_by(|a, b| (&a.name, &a.observed_endpoint).cmp(&(&b.name, &b.observed_endpoint)));
    peers.dedup_by(|a, b| a.name == b.name);
    (!peers.is_empty()).then(|| MeshNodeStatus {
        peers,
        ..MeshNodeStatus::default()
    })
}

/// Where the machines that reported `nodes`' statuses last heard each of their peers
/// from, by tunnel name: for a peer behind NAT, its mapped address, learnt by whoever it
/// reached (a relay, say). Only authenticated sources count (`observedEndpoint`), one per
/// reporter and peer, and only from Kubernetes nodes and relays: a host's credential
/// cannot add endpoints to everyone's peers.
pub fn observed_endpoints<'a>(
    nodes: impl IntoIterator<Item = &'a MeshNode>,
) -> BTreeMap<String, Vec<SocketAddr>> {
    let mut out: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for node in nodes {
        if node.spec.kind != MeshNodeKind::Node && !node.spec.is_relay() {
            continue;
        }
        let Some(status) = &node.status else { continue };
        let mut seen = BTreeSet::new();
        for tunnel in &status.peers {
            if !seen.insert(tunnel.name.as_str()) {
                continue;
            }
            if let Some(addr) = tunnel
                .observed_endpoint
                .as_deref()
                .and_then(|e| e.parse().ok())
            {
                let list = out.entry(tunnel.name.clone()).or_default();
                if !list.contains(&addr) {
                    list.push(addr);
                }
            }
        }
    }
    out
}

impl Local {
    /// From this cluster's name and pod CIDRs (the `wiremesh-cluster` ConfigMap) and its
    /// `MeshNode`s. Local entries that do not parse are skipped: they are this cluster's own
    /// business and protect nothing.
    pub fn new<'a>(
        cluster: &str,
        pod_cidrs: &[IpCidr],
        nodes: impl IntoIterator<Item = &'a MeshNode>,
    ) -> Self {
        let nodes: Vec<&MeshNode> = nodes.into_iter().collect();
        let mut local = Self {
            observed: observed_endpoints(nodes.iter().copied()),
            ..Self::default()
        };
        for (text, what) in SPECIAL {
            if let Ok(cidr) = text.parse() {
                local.reserved.insert(cidr, what);
            }
        }
        for cidr in pod_cidrs {
            local.claims.insert(
                *cidr,
                Owner::LocalCluster {
                    cluster: cluster.to_owned(),
                },
            );
        }
        for node in nodes {
            let owner = Owner::LocalNode {
                node: node.name_any(),
            };
            // A local Kubernetes node claiming CIDRs outside this cluster's pod range is
            // itself misconfigured (or forged): it must not be able to cut a legitimate
            // remote node off. Hosts are the exception: their addresses lie outside the
            // pod range by design.
            let counts = |cidr: &IpCidr| {
                node.spec.kind == MeshNodeKind::Host || pod_cidrs.iter().any(|own| own.covers(cidr))
            };
            for cidr in node
                .spec
                .pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<IpCidr>().ok())
                .filter(counts)
            {
                local.claims.insert(cidr, owner.clone());
            }
            if let Ok(key) = node.spec.public_key.parse::<PublicKey>() {
                local.keys.entry(key).or_insert(owner);
            }
            for addr in endpoint_addresses(&node.spec.endpoints) {
                local.reserved.insert(
                    addr,
                    Reserved::LocalEndpoint {
                        node: node.name_any(),
                    },
                );
            }
        }
        local
    }

    /// Claims this cluster's mesh CIDRs (what its pods are known by elsewhere when
    /// translated): no remote node may claim an address in them.
    pub fn claim_mesh_cidrs(&mut self, cluster: &str, mesh_cidrs: &[IpCidr]) {
        for cidr in mesh_cidrs {
            self.claims.insert(
                *cidr,
                Owner::LocalCluster {
                    cluster: cluster.to_owned(),
                },
            );
        }
    }

    /// Reserves `cidr` as `what` (this cluster's service CIDR, its API server's address):
    /// no remote node may claim an address in it.
    pub fn reserve(&mut self, cidr: IpCidr, what: Reserved) {
        self.reserved.insert(cidr, what);
    }

    /// Reserves the addresses of this cluster's `nodes` ([`node_addresses`]): a peer's
    /// pod CIDR or host holding one would draw our node-to-node traffic into a tunnel.
    pub fn reserve_nodes<'a>(&mut self, nodes: impl IntoIterator<Item = &'a Node>) {
        for node in nodes {
            for ip in node_addresses(node) {
                self.reserve(
                    IpCidr::host(ip),
                    Reserved::LocalNode {
                        node: node.name_any(),
                    },
                );
            }
        }
    }
}

/// A Node's `InternalIP` and `ExternalIP` addresses, sorted; entries that do not parse
/// are left out.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Another peer cluster: what it was allowed and what is mirrored from it now.
#[derive(Debug, Clone, Default)]
pub struct OtherPeer {
    allowed: Vec<(IpCidr, Owner)>,
    nodes: Vec<(IpCidr, Owner)>,
    keys: Vec<(PublicKey, Owner)>,
    endpoints: Vec<(IpCidr, Reserved)>,
}

impl OtherPeer {
    /// From another `PeerCluster` and its current `MeshPeer`s.
    pub fn new<'a>(peer: &PeerCluster, mesh_peers: impl IntoIterator<Item = &'a MeshPeer>) -> Self {
        let cluster = peer.name_any();
        let allowed = mesh_view(peer)
            .into_iter()
            .map(|c| {
                (
                    c,
                    Owner::PeerAllowed {
                        cluster: cluster.clone(),
                    },
                )
            })
            .collect();
        let mut other = Self {
            allowed,
            ..Self::default()
        };
        for mp in mesh_peers {
            let owner = Owner::PeerNode {
                cluster: cluster.clone(),
                node: mp.spec.node.clone(),
            };
            for cidr in mp.spec.pod_cidrs.iter().filter_map(|c| c.parse().ok()) {
                other.nodes.push((cidr, owner.clone()));
            }
            if let Ok(key) = mp.spec.public_key.parse::<PublicKey>() {
                other.keys.push((key, owner));
            }
            for addr in endpoint_addresses(&mp.spec.endpoints) {
                other.endpoints.push((
                    addr,
                    Reserved::PeerEndpoint {
                        cluster: cluster.clone(),
                        node: mp.spec.node.clone(),
                    },
                ));
            }
        }
        other
    }
}

/// The pod CIDRs `peer` was allowed at join time (`spec.allowedPodCIDRs`); entries that do
/// not parse allow nothing.
#[must_use]
pub fn allowed_cidrs(peer: &PeerCluster) -> Vec<IpCidr> {
    peer.spec
        .allowed_pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// The CIDRs `peer`'s pods are known by in the mesh: its mesh CIDRs when translated, else
/// its allowed pod CIDRs; entries that do not parse are left out.
#[must_use]
pub fn mesh_view(peer: &PeerCluster) -> Vec<IpCidr> {
    if peer.spec.mesh_cidrs.is_empty() {
        return allowed_cidrs(peer);
    }
    peer.spec
        .mesh_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// `peer`'s translation: each allowed pod CIDR with the mesh CIDR at the same place. None
/// when it has no `meshCIDRs`.
///
/// # Errors
/// When `meshCIDRs` does not pair with `allowedPodCIDRs` (count, family, length, a value
/// that is not a CIDR), naming what is wrong.
pub fn mesh_maps(peer: &PeerCluster) -> Result<Vec<PrefixMap>, String> {
    let spec = &peer.spec;
    if spec.mesh_cidrs.is_empty() {
        return Ok(Vec::new());
    }
    if spec.mesh_cidrs.len() != spec.allowed_pod_cidrs.len() {
        return Err(format!(
            "{} meshCIDRs for {} allowedPodCIDRs",
            spec.mesh_cidrs.len(),
            spec.allowed_pod_cidrs.len()
        ));
    }
    spec.allowed_pod_cidrs
        .iter()
        .zip(&spec.mesh_cidrs)
        .map(|(pod, mesh)| {
            let parse = |t: &str| t.parse::<IpCidr>().map_err(|e| format!("{t:?}: {e}"));
            PrefixMap::new(parse(pod)?, parse(mesh)?).map_err(|e| e.to_string())
        })
        .collect()
}

/// The host range `peer` was granted at join time (`spec.allowedHostCIDRs`); entries that
/// do not parse allow nothing.
#[must_use]
pub fn allowed_host_cidrs(peer: &PeerCluster) -> Vec<IpCidr> {
    peer.spec
        .allowed_host_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Keeps the first `max` of `remote` (by name) and refuses the others.
pub fn cap_nodes(remote: &mut Vec<MeshNode>, max: usize) -> Vec<Conflict> {
    remote.sort_by_key(|n| n.name_any());
    remote
        .split_off(max.min(remote.len()))
        .iter()
        .map(|n| Conflict {
            node: n.name_any(),
            cidr: None,
            reason: Reason::TooManyNodes { max },
        })
        .collect()
}

/// Computes what to do for `peer`, given its remote nodes, this cluster's own claims, the
/// other peer clusters and the `MeshPeer`s that exist for `peer` now (those labelled
/// [`PEER_CLUSTER_LABEL`]`=<peer name>`).
///
/// `apply` holds only the `MeshPeer`s that are missing or differ (spec, label or owner
/// reference to `peer`), so applying an unchanged plan writes nothing.
pub fn plan(
    peer: &PeerCluster,
    remote: &[MeshNode],
    local: &Local,
    others: &[OtherPeer],
    existing: &[MeshPeer],
) -> Plan {
    let peer_name = peer.name_any();
    let cluster = peer.spec.cluster_name.as_str();
    let allowed = allowed_cidrs(peer);
    let host_allowed = allowed_host_cidrs(peer);
    let maps = mesh_maps(peer);

    let mut foreign = local.claims.clone();
    let mut foreign_keys = local.keys.clone();
    let mut reserved = local.reserved.clone();
    for other in others {
        for (cidr, owner) in other.allowed.iter().chain(&other.nodes) {
            foreign.insert(*cidr, owner.clone());
        }
        for (cidr, what) in &other.endpoints {
            reserved.insert(*cidr, what.clone());
        }
        for (key, owner) in &other.keys {
            foreign_keys.entry(*key).or_insert_with(|| owner.clone());
        }
    }

    let nodes: BTreeMap<String, &MeshNode> = remote.iter().map(|n| (n.name_any(), n)).collect();
    for (name, node) in &nodes {
        for addr in endpoint_addresses(&node.spec.endpoints) {
            reserved.insert(
                addr,
                Reserved::PeerEndpoint {
                    cluster: peer_name.clone(),
                    node: name.clone(),
                },
            );
        }
    }
    // Where the remote cluster's own machines, and ours, heard each remote node from.
    let remote_observed = observed_endpoints(remote);
    let mut conflicts = BTreeSet::new();
    let mut candidates = BTreeMap::new();
    let mut siblings = Index::default();
    let mut keys: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for (name, node) in &nodes {
        if !node.spec.has_key() {
            // A host registered before its agent published a key: not ready, not refused.
            continue;
        }
        let mut candidate = Candidate::parse(cluster, name, node, &mut conflicts);
        candidate.map_into_mesh(&maps);
        let observed = remote_observed
            .get(name)
            .into_iter()
            .chain(local.observed.get(&mesh_peer_name(cluster, name)))
            .flatten();
        for addr in observed {
            if candidate.endpoints.len() < MAX_ENDPOINTS && !candidate.endpoints.contains(addr) {
                candidate.endpoints.push(*addr);
            }
        }
        for cidr in candidate.mapped.iter().flatten() {
            siblings.insert(*cidr, Owner::Sibling { node: name.clone() });
        }
        if let Some(key) = candidate.key {
            keys.entry(key).or_default().push(name);
        }
        candidates.insert(name.clone(), candidate);
    }

    for (key, holders) in &keys {
        for name in holders {
            let other = match (foreign_keys.get(key), holders.iter().find(|h| *h != name)) {
                (Some(owner), _) => owner.clone(),
                (None, Some(sibling)) => Owner::Sibling {
                    node: (*sibling).to_owned(),
                },
                (None, None) => continue,
            };
            conflicts.insert(Conflict {
                node: (*name).to_owned(),
                cidr: None,
                reason: Reason::DuplicateKey {
                    key: key.to_base64(),
                    other,
                },
            });
        }
    }

    for (name, candidate) in &candidates {
        let is_host = nodes
            .get(name)
            .is_some_and(|n| n.spec.kind == MeshNodeKind::Host);
        for (original, mapped) in candidate.cidrs.iter().zip(&candidate.mapped) {
            // What the rest of the mesh knows the pods by; the allowance is in the
            // cluster's own pod space.
            let Some(cidr) = mapped else {
                conflicts.insert(Conflict {
                    node: name.clone(),
                    cidr: Some(original.to_string()),
                    reason: Reason::Untranslatable {
                        why: match &maps {
                            Err(why) => why.clone(),
                            Ok(_) => "its image is not one prefix".to_owned(),
                        },
                    },
                });
                continue;
            };
            // Taking someone else's addresses is the gravest reason: it is named first.
            let reason = if let Some((other, owner)) = foreign.find_overlap(cidr, |_| true) {
                Some(Reason::Overlaps {
                    other,
                    owner: owner.clone(),
                })
            } else if let Some((other, what)) =
                reserved.find_overlap(cidr, |r| is_host || r.binds_pod_cidrs())
            {
                Some(Reason::Reserved {
                    other,
                    what: what.clone(),
                })
            } else if allowed.iter().any(|a| a.covers(original)) {
                None
            } else if is_host && is_single_address(cidr) {
                (!host_allowed.iter().any(|a| a.covers(cidr))).then(|| Reason::OutsideHostRange {
                    cluster: peer_name.clone(),
                    allowed: host_allowed.clone(),
                })
            } else {
                Some(Reason::OutsideAllowed {
                    cluster: peer_name.clone(),
                    allowed: allowed.clone(),
                })
            };
            let reason = reason.or_else(|| {
                siblings
                    .find_overlap(
                        cidr,
                        |o| !matches!(o, Owner::Sibling { node } if node == name),
                    )
                    .map(|(other, owner)| Reason::Overlaps {
                        other,
                        owner: owner.clone(),
                    })
            });
            if let Some(reason) = reason {
                conflicts.insert(Conflict {
                    node: name.clone(),
                    cidr: Some(original.to_string()),
                    reason,
                });
            }
        }
    }

    let refused: BTreeSet<&str> = conflicts.iter().map(|c| c.node.as_str()).collect();
    let desired: BTreeMap<String, MeshPeerSpec> = candidates
        .into_iter()
        .filter(|(name, _)| !refused.contains(name.as_str()))
        .filter_map(|(name, c)| {
            let spec = c.into_spec(cluster, &name, nodes.get(&name)?)?;
            Some((mesh_peer_name(cluster, &name), spec))
        })
        .collect();

    let existing: BTreeMap<String, &MeshPeer> =
        existing.iter().map(|mp| (mp.name_any(), mp)).collect();
    let owner_uid = peer.metadata.uid.as_deref();
    let apply = desired
        .iter()
        .filter(|(name, spec)| {
            existing
                .get(*name)
                .is_none_or(|mp| !is_current(mp, spec, &peer_name, owner_uid))
        })
        .map(|(name, spec)| Desired {
            name: name.clone(),
            spec: spec.clone(),
        })
        .collect();
    let delete = existing
        .keys()
        .filter(|name| !desired.contains_key(*name))
        .cloned()
        .collect();
    Plan {
        apply,
        delete,
        conflicts: conflicts.into_iter().collect(),
        mirrored: desired.len(),
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = &self.node;
        let cidr = self.cidr.as_deref().unwrap_or("");
        match &self.reason {
            Reason::InvalidKey { key } => {
                write!(f, "node {node}: public key {key:?} is not a WireGuard key")
            }
            Reason::DuplicateKey { key, other } => {
                write!(
                    f,
                    "node {node}: public key {key} is also the key of {other}"
                )
            }
            Reason::InvalidCidr => write!(f, "node {node}: pod CIDR {cidr:?} is not a CIDR"),
            Reason::OutsideAllowed { cluster, allowed } => write!(
                f,
                "node {node}: pod CIDR {cidr} is outside what {cluster} was allowed ({})",
                listed(allowed, "nothing")
            ),
            Reason::OutsideHostRange { cluster, allowed } => write!(
                f,
                "node {node}: host address {cidr} is outside the host range {cluster} was granted ({})",
                listed(allowed, "none: grant one with `meshctl join --host-cidr`")
            ),
            Reason::Overlaps { other, owner } => {
                write!(
                    f,
                    "node {node}: pod CIDR {cidr} overlaps {other} of {owner}"
                )
            }
            Reason::Reserved { other, what } => {
                write!(
                    f,
                    "node {node}: address {cidr} overlaps {other}, {what}, which no peer may claim"
                )
            }
            Reason::InvalidEndpoint { endpoint } => {
                write!(f, "node {node}: endpoint {endpoint:?} is not IP:port")
            }
            Reason::TooManyNodes { max } => write!(
                f,
                "node {node}: its cluster has more than {max} nodes, the most mirrored from one peer cluster (--max-nodes-per-peer)"
            ),
            Reason::TooLarge { max } => write!(
                f,
                "node {node}: its MeshNode is over {} KiB, the most kept of one remote node",
                max >> 10
            ),
            Reason::NameTooLong => write!(
                f,
                "node {node}: its MeshPeer name would be longer than {MAX_NAME_LEN} characters"
            ),
            Reason::Untranslatable { why } => {
                write!(
                    f,
                    "node {node}: pod CIDR {cidr} cannot be mapped to its mesh CIDR: {why}"
                )
            }
        }
    }
}

/// `cidrs` comma-separated, or `none` when there are none.
fn listed(cidrs: &[IpCidr], none: &str) -> String {
    if cidrs.is_empty() {
        return none.to_owned();
    }
    let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    cidrs.join(", ")
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::LocalCluster { cluster } => write!(f, "this cluster ({cluster})"),
            Owner::LocalNode { node } => write!(f, "local node {node}"),
            Owner::PeerAllowed { cluster } => write!(f, "peer cluster {cluster} (allowed range)"),
            Owner::PeerNode { cluster, node } => {
                write!(f, "node {node} of peer cluster {cluster}")
            }
            Owner::Sibling { node } => write!(f, "node {node} of the same cluster"),
        }
    }
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reserved::Loopback => write!(f, "loopback"),
            Reserved::LinkLocal => write!(f, "link-local (cloud metadata included)"),
            Reserved::Multicast => write!(f, "multicast or broadcast"),
            Reserved::Unspecified => write!(f, "unspecified or IPv4-mapped"),
            Reserved::ServiceCidr => write!(f, "this cluster's service CIDR"),
            Reserved::ApiServer => write!(f, "this cluster's API server"),
            Reserved::LocalNode { node } => write!(f, "an address of local Node {node}"),
            Reserved::LocalEndpoint { node } => write!(f, "the endpoint of local node {node}"),
            Reserved::PeerEndpoint { cluster, node } => {
                write!(f, "the endpoint of node {node} of peer cluster {cluster}")
            }
        }
    }
}

/// A remote node after parsing: what parsed, with problems recorded as conflicts.
struct Candidate {
    key: Option<PublicKey>,
    cidrs: Vec<IpCidr>,
    /// Each of `cidrs` as the mesh knows it (mapped into the mesh CIDRs when the cluster
    /// is translated); `None` when it cannot be mapped.
    mapped: Vec<Option<IpCidr>>,
    endpoints: Vec<SocketAddr>,
}

impl Candidate {
    fn parse(
        cluster: &str,
        name: &str,
        node: &MeshNode,
        conflicts: &mut BTreeSet<Conflict>,
    ) -> Self {
        let mut refuse = |cidr: Option<&str>, reason| {
            conflicts.insert(Conflict {
                node: name.to_owned(),
                cidr: cidr.map(str::to_owned),
                reason,
            });
        };
        let key = match node.spec.public_key.parse::<PublicKey>() {
            Ok(key) if !key.0.is_zero() => Some(key),
            _ => {
                refuse(
                    None,
                    Reason::InvalidKey {
                        key: node.spec.public_key.clone(),
                    },
                );
                None
            }
        };
        let mut cidrs = Vec::new();
        for text in &node.spec.pod_cidrs {
            match text.parse::<IpCidr>() {
                // Host bits are refused too: the node meant some other network.
                Ok(cidr) if canonical_eq(text, &cidr) => cidrs.push(cidr),
                _ => refuse(Some(text), Reason::InvalidCidr),
            }
        }
        let mut endpoints = Vec::new();
        for text in &node.spec.endpoints {
            match text.parse::<SocketAddr>() {
                Ok(addr) => endpoints.push(addr),
                Err(_) => refuse(
                    None,
                    Reason::InvalidEndpoint {
                        endpoint: text.clone(),
                    },
                ),
            }
        }
        if mesh_peer_name(cluster, name).len() > MAX_NAME_LEN {
            refuse(None, Reason::NameTooLong);
        }
        Self {
            key,
            mapped: cidrs.iter().copied().map(Some).collect(),
            cidrs,
            endpoints,
        }
    }

    /// Maps each pod CIDR inside one of `maps`' pod CIDRs into its mesh CIDR; one outside
    /// them all stays as it is (a host's address, or one the allowance check refuses).
    fn map_into_mesh(&mut self, maps: &Result<Vec<PrefixMap>, String>) {
        self.mapped = self
            .cidrs
            .iter()
            .map(|cidr| match maps {
                Err(_) => None,
                Ok(maps) => match maps.iter().find(|m| m.pod().covers(cidr)) {
                    Some(m) => m.map_cidr(*cidr, Towards::Mesh),
                    None => Some(*cidr),
                },
            })
            .collect();
    }

    fn into_spec(self, cluster: &str, name: &str, node: &MeshNode) -> Option<MeshPeerSpec> {
        Some(MeshPeerSpec {
            cluster: cluster.to_owned(),
            node: name.to_owned(),
            public_key: self.key?.to_base64(),
            endpoints: self.endpoints.iter().map(ToString::to_string).collect(),
            pod_cidrs: self
                .mapped
                .iter()
                .flatten()
                .map(ToString::to_string)
                .collect(),
            location: node.spec.location.clone(),
            kind: node.spec.kind,
            gateway: node.spec.is_gateway(),
            relay: node.spec.is_relay(),
            heartbeat: node.spec.heartbeat,
        })
    }
}

/// A host's addresses lie outside its cluster's pod range by design, so the pod allowance
/// of the join does not cover them: a host may claim single addresses (`/32`, `/128`)
/// inside its cluster's granted host range.
fn is_single_address(cidr: &IpCidr) -> bool {
    cidr.prefix_len() == if cidr.addr().is_ipv4() { 32 } else { 128 }
}

/// The addresses of `endpoints` that parse, each as a single-address CIDR.
fn endpoint_addresses(endpoints: &[String]) -> impl Iterator<Item = IpCidr> + '_ {
    endpoints
        .iter()
        .filter_map(|e| e.parse::<SocketAddr>().ok())
        .map(|a| IpCidr::host(a.ip()))
}

/// True when `text` names exactly `cidr` (no host bits), allowing other spellings of the
/// same address (`fd00:0::/64` for `fd00::/64`).
fn canonical_eq(text: &str, cidr: &IpCidr) -> bool {
    let Some((addr, len)) = text.trim().split_once('/') else {
        return false;
    };
    addr.parse::<IpAddr>()
        .is_ok_and(|a| a == cidr.addr() && len.parse::<u8>() == Ok(cidr.prefix_len()))
}

/// True when the existing `MeshPeer` already is what the plan wants.
fn is_current(mp: &MeshPeer, spec: &MeshPeerSpec, peer: &str, owner_uid: Option<&str>) -> bool {
    let labelled = mp.labels().get(PEER_CLUSTER_LABEL).map(String::as_str) == Some(peer);
    let owned = owner_uid.is_none_or(|uid| mp.owner_references().iter().any(|o| o.uid == uid));
    mp.spec == *spec && labelled && owned
}

/// CIDRs and who claims them, for overlap queries in O(prefix length × log n).
#[derive(Debug, Clone)]
struct Index<T = Owner> {
    entries: BTreeMap<IpCidr, Vec<T>>,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<T: PartialEq> Index<T> {
    fn insert(&mut self, cidr: IpCidr, owner: T) {
        let owners = self.entries.entry(cidr).or_default();
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }

    /// The first entry (by prefix) that overlaps `cidr` and whose owner passes `keep`.
    ///
    /// Overlapping prefixes nest: either an entry contains `cidr` (it is `cidr` shortened
    /// to one of the lengths 0..=len) or `cidr` contains it (it sorts at or after `cidr`
    /// and before the end of `cidr`'s range).
    fn find_overlap(&self, cidr: &IpCidr, keep: impl Fn(&T) -> bool) -> Option<(IpCidr, &T)> {
        for len in 0..=cidr.prefix_len() {
            let Ok(outer) = IpCidr::new(cidr.addr(), len) else {
                continue;
            };
            if let Some(owner) = self
                .entries
                .get(&outer)
                .and_then(|o| o.iter().find(|o| keep(o)))
            {
                return Some((outer, owner));
            }
        }
        self.entries
            .range(cidr..)
            .take_while(|(inner, _)| cidr.covers(inner))
            .find_map(|(inner, owners)| owners.iter().find(|o| keep(o)).map(|o| (*inner, o)))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use proptest::prelude::*;
    use wiremesh_proto::crd::PeerClusterSpec;

    use super::*;
    use crate::testing::{key, mesh_node};

    #[test]
    fn valid_nodes_are_mirrored() {
        let plan = plan_b(&[
            node("b1", 1, &["10.2.1.0/24"]),
            node("b2", 2, &["10.2.2.0/24"]),
        ]);
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
        assert_eq!(names(&plan.apply), ["cluster-b.b1", "cluster-b.b2"]);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.mirrored, 2);
        let b1 = &plan.apply[0].spec;
        assert_eq!(b1.cluster, "cluster-b");
        assert_eq!(b1.node, "b1");
        assert_eq!(b1.public_key, key(1));
        assert_eq!(b1.pod_cidrs, ["10.2.1.0/24"]);
        assert_eq!(b1.endpoints, ["198.18.0.1:51820"]);
    }

    #[test]
    fn unchanged_peers_are_not_applied_again() {
        let pc = peer("cluster-b", &["10.2.0.0/16"]);
        let remote = [node("b1", 1, &["10.2.1.0/24"])];
        let first = plan(&pc, &remote, &local(), &[], &[]);
        let existing = applied(&pc, &first);
        let second = plan(&pc, &remote, &local(), &[], &existing);
        assert!(second.apply.is_empty(), "{:?}", second.apply);
        assert!(second.delete.is_empty());
        assert_eq!(second.mirrored, 1);
    }

    #[test]
    fn changed_node_is_applied_again() {
        let pc = peer("cluster-b", &["10.2.0.0/16"]);
        let existing = applied(
            &pc,
            &plan(&pc, &[node("b1", 1, &["10.2.1.0/24"])], &local(), &[], &[]),
        );
        let mut moved = node("b1", 1, &["10.2.1.0/24"]);
        moved.spec.endpoints = vec!["198.18.9.9:51820".into()];
        let plan = plan(&pc, &[moved], &local(), &[], &existing);
        assert_eq!(names(&plan.apply), ["cluster-b.b1"]);
        assert_eq!(plan.apply[0].spec.endpoints, ["198.18.9.9:51820"]);
    }

    #[test]
    fn peer_without_label_or_owner_is_applied_again() {
        let pc = peer("cluster-b", &["10.2.0.0/16"]);
        let remote = [node("b1", 1, &["10.2.1.0/24"])];
        let mut existing = applied(&pc, &plan(&pc, &remote, &local(), &[], &[]));
        existing[0].metadata.owner_references = None;
        assert_eq!(plan(&pc, &remote, &local(), &[], &existing).apply.len(), 1);
        let mut existing = applied(&pc, &plan(&pc, &remote, &local(), &[], &[]));
        existing[0].metadata.labels = None;
        assert_eq!(plan(&pc, &remote, &local(), &[], &existing).apply.len(), 1);
    }

    #[test]
    fn vanished_node_is_deleted() {
        let pc = peer("cluster-b", &["10.2.0.0/16"]);
        let both = [
            node("b1", 1, &["10.2.1.0/24"]),
            node("b2", 2, &["10.2.2.0/24"]),
        ];
        let existing = applied(&pc, &plan(&pc, &both, &local(), &[], &[]));
        let plan = plan(&pc, &both[..1], &local(), &[], &existing);
        assert!(plan.apply.is_empty());
        assert_eq!(plan.delete, ["cluster-b.b2"]);
        assert_eq!(plan.mirrored, 1);
    }

    #[test]
    fn empty_remote_deletes_everything() {
        let pc = peer("cluster-b", &["10.2.0.0/16"]);
        let existing = applied(
            &pc,
            &plan(&pc, &[node("b1", 1, &["10.2.1.0/24"])], &local(), &[], &[]),
        );
        let plan = plan(&pc, &[], &local(), &[], &existing);
        assert_eq!(plan.delete, ["cluster-b.b1"]);
        assert_eq!(plan.mirrored, 0);
    }

    #[test]
    fn peer_outside_its_allowed_cidrs_is_refused() {
        let plan = plan_b(&[
            node("evil", 1, &["10.2.1.0/24", "10.9.0.0/24"]),
            node("b2", 2, &["10.2.2.0/24"]),
        ]);
        assert_eq!(names(&plan.apply), ["cluster-b.b2"]);
        assert_eq!(plan.conflicts.len(), 1);
        let c = &plan.conflicts[0];
        assert_eq!(
            (c.node.as_str(), c.cidr.as_deref()),
            ("evil", Some("10.9.0.0/24"))
        );
        let text = c.to_string();
        assert!(
            text.contains("evil") && text.contains("10.9.0.0/24") && text.contains("10.2.0.0/16"),
            "{text}"
        );
    }

    #[test]
    fn allowed_range_that_only_overlaps_is_not_enough() {
        let plan = plan(
            &peer("cluster-b", &["10.2.0.0/24"]),
            &[node("b1", 1, &["10.2.0.0/16"])],
            &local(),
            &[],
            &[],
        );
        assert!(plan.apply.is_empty());
        assert!(matches!(
            plan.conflicts[0].reason,
            Reason::OutsideAllowed { .. }
        ));
    }

    #[test]
    fn overlap_with_this_cluster_is_named_before_the_allowed_range() {
        let plan = plan_b(&[node("evil", 1, &["10.1.5.0/24"])]);
        assert_eq!(
            plan.conflicts[0].reason,
            Reason::Overlaps {
                other: cidr("10.1.0.0/16"),
                owner: Owner::LocalCluster {
                    cluster: "cluster-a".into()
                }
            }
        );
    }

    #[test]
    fn node_claiming_a_local_cidr_is_refused() {
        let plan = plan(
            // Allowed too much at join time: the local check still holds.
            &peer("cluster-b", &["10.0.0.0/8"]),
            &[node("evil", 1, &["10.1.5.0/24"])],
            &local(),
            &[],
            &[],
        );
        assert!(plan.apply.is_empty());
        let text = plan.conflicts[0].to_string();
        assert!(
            text.contains("evil") && text.contains("10.1.5.0/24"),
            "{text}"
        );
        assert!(
            text.contains("10.1.0.0/16") && text.contains("cluster-a"),
            "{text}"
        );
    }

    #[test]
    fn node_claiming_a_local_nodes_cidr_is_refused() {
        let local = Local::new(
            "cluster-a",
            &[cidr("10.5.0.0/16")],
            &[node("a1", 9, &["10.5.0.0/24"])],
        );
        let plan = plan(
            &peer("cluster-b", &["10.0.0.0/8"]),
            &[node("evil", 1, &["10.5.0.0/25"])],
            &local,
            &[],
            &[],
        );
        assert!(plan.apply.is_empty());
        assert!(matches!(plan.conflicts[0].reason, Reason::Overlaps { .. }));
    }

    #[test]
    fn a_local_node_outside_our_pod_range_cannot_block_a_remote_node() {
        // A forged local MeshNode claims the remote cluster's CIDR: the remote node stays.
        let local = Local::new(
            "cluster-a",
            &[cidr("10.1.0.0/16")],
            &[node("forged", 9, &["10.2.1.0/24"])],
        );
        let plan = plan(
            &peer("cluster-b", &["10.2.0.0/16"]),
            &[node("b1", 1, &["10.2.1.0/24"])],
            &local,
            &[],
            &[],
        );
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
        assert_eq!(plan.apply.len(), 1);
    }

    #[test]
    fn a_translated_peer_with_our_pod_cidr_is_mirrored_with_its_mesh_cidrs() {
        // Both clusters use 10.244.0.0/16; cluster-a is known elsewhere as 100.64.0.0/16.
        let mut local = Local::new("cluster-a", &[cidr("10.244.0.0/16")], std::iter::empty());
        local.claim_mesh_cidrs("cluster-a", &[cidr("100.64.0.0/16")]);
        let mut b = peer("cluster-b", &["10.244.0.0/16", "fd00:10:244::/48"]);
        b.spec.mesh_cidrs = vec!["100.65.0.0/16".into(), "fd64:b::/48".into()];
        let plan = plan(
            &b,
            &[
                node("b1", 1, &["10.244.1.0/24", "fd00:10:244:1::/64"]),
                // Checked in its own pod space: outside what it was allowed.
                node("b2", 2, &["100.65.2.0/24"]),
                // A /56 under a neutral /48 mapping is not one prefix once mapped.
                node("b3", 3, &["fd00:10:244:300::/56"]),
            ],
            &local,
            &[],
            &[],
        );
        assert_eq!(names(&plan.apply), ["cluster-b.b1"]);
        let mapped = &plan.apply[0].spec.pod_cidrs;
        assert_eq!(mapped[0], "100.65.1.0/24");
        assert!(cidr("fd64:b::/48").covers(&cidr(&mapped[1])), "{mapped:?}");
        assert!(matches!(
            plan.conflicts[0].reason,
            Reason::OutsideAllowed { .. }
        ));
        assert!(matches!(
            plan.conflicts[1].reason,
            Reason::Untranslatable { .. }
        ));
        assert!(
            plan.conflicts[1]
                .to_string()
                .contains("fd00:10:244:300::/56")
        );
    }

    #[test]
    fn mesh_cidrs_that_collide_are_refused_naming_both() {
        let mut local = Local::new("cluster-a", &[cidr("10.244.0.0/16")], std::iter::empty());
        local.claim_mesh_cidrs("cluster-a", &[cidr("100.64.0.0/16")]);
        let mut c = peer("cluster-c", &["10.244.0.0/16"]);
        c.spec.mesh_cidrs = vec!["100.66.0.0/16".into()];
        let c = OtherPeer::new(&c, &[]);
        for (mesh, other) in [
            ("100.64.0.0/16", "100.64.0.0/16"),
            ("100.66.0.0/16", "100.66.0.0/16"),
        ] {
            let mut b = peer("cluster-b", &["10.244.0.0/16"]);
            b.spec.mesh_cidrs = vec![mesh.into()];
            let plan = plan(
                &b,
                &[node("b1", 1, &["10.244.1.0/24"])],
                &local,
                std::slice::from_ref(&c),
                &[],
            );
            assert!(plan.apply.is_empty());
            let text = plan.conflicts[0].to_string();
            assert!(
                text.contains("10.244.1.0/24") && text.contains(other),
                "{text}"
            );
        }
        // meshCIDRs that do not pair refuse every node, saying why.
        let mut b = peer("cluster-b", &["10.244.0.0/16"]);
        b.spec.mesh_cidrs = vec!["100.65.0.0/24".into()];
        let plan = plan(&b, &[node("b1", 1, &["10.244.1.0/24"])], &local, &[], &[]);
        assert!(plan.apply.is_empty());
        assert!(
            plan.conflicts[0].to_string().contains("100.65.0.0/24"),
            "{}",
            plan.conflicts[0]
        );
    }

    #[test]
    fn node_claiming_another_peers_allowed_range_is_refused() {
        let c = OtherPeer::new(&peer("cluster-c", &["10.3.0.0/16"]), &[]);
        let plan = plan(
            &peer("cluster-b", &["10.0.0.0/8"]),
            &[node("evil", 1, &["10.3.7.0/24"])],
            &local(),
            &[c],
            &[],
        );
        assert!(plan.apply.is_empty());
        assert_eq!(
            plan.conflicts[0].reason,
            Reason::Overlaps {
                other: cidr("10.3.0.0/16"),
                owner: Owner::PeerAllowed {
                    cluster: "cluster-c".into()
                }
            }
        );
    }

    #[test]
    fn node_claiming_another_peers_mesh_peer_is_refused() {
        let pc_c = peer("cluster-c", &["10.3.0.0/16"]);
        let c_peers = applied(
            &pc_c,
            &plan(
                &pc_c,
                &[node("c1", 5, &["10.3.1.0/24"])],
                &local(),
                &[],
                &[],
            ),
        );
        // cluster-c's MeshPeer sits outside its current allowed range: still protected.
        let c = OtherPeer::new(&peer("cluster-c", &["10.4.0.0/16"]), &c_peers);
        let plan = plan(
            &peer("cluster-b", &["10.3.0.0/16"]),
            &[node("evil", 1, &["10.3.0.0/22"])],
            &local(),
            &[c],
            &[],
        );
        assert!(plan.apply.is_empty());
        assert_eq!(
            plan.conflicts[0].reason,
            Reason::Overlaps {
                other: cidr("10.3.1.0/24"),
                owner: Owner::PeerNode {
                    cluster: "cluster-c".into(),
                    node: "c1".into()
                }
            }
        );
        assert!(plan.conflicts[0].to_string().contains("c1"));
    }

    #[test]
    fn overlapping_siblings_are_both_refused() {
        let plan = plan_b(&[
            node("b1", 1, &["10.2.1.0/24"]),
            node("b2", 2, &["10.2.1.128/25"]),
            node("b3", 3, &["10.2.3.0/24"]),
        ]);
        assert_eq!(names(&plan.apply), ["cluster-b.b3"]);
        let refused: Vec<_> = plan.conflicts.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(refused, ["b1", "b2"]);
        assert!(plan.conflicts[0].to_string().contains("b2"));
        assert!(plan.conflicts[1].to_string().contains("b1"));
    }

    #[test]
    fn a_node_may_list_nested_cidrs_of_its_own() {
        let plan = plan_b(&[node("b1", 1, &["10.2.0.0/23", "10.2.1.0/24"])]);
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
    }

    #[test]
    fn refused_node_that_was_mirrored_is_deleted() {
        let pc = peer("cluster-b", &["10.2.0.0/16"]);
        let existing = applied(
            &pc,
            &plan(&pc, &[node("b1", 1, &["10.2.1.0/24"])], &local(), &[], &[]),
        );
        let plan = plan(
            &pc,
            &[node("b1", 1, &["10.1.0.0/24"])],
            &local(),
            &[],
            &existing,
        );
        assert!(plan.apply.is_empty());
        assert_eq!(plan.delete, ["cluster-b.b1"]);
        assert_eq!(plan.conflicts.len(), 1);
    }

    #[test]
    fn bad_key_is_refused() {
        let mut bad = node("b1", 1, &["10.2.1.0/24"]);
        bad.spec.public_key = "not-a-key".into();
        let mut zero = node("b2", 1, &["10.2.2.0/24"]);
        zero.spec.public_key = PublicKey::from([0; 32]).to_base64();
        let plan = plan_b(&[bad, zero]);
        assert!(plan.apply.is_empty());
        assert!(
            plan.conflicts
                .iter()
                .all(|c| matches!(c.reason, Reason::InvalidKey { .. }))
        );
        assert!(plan.conflicts[0].to_string().contains("not-a-key"));
    }

    #[test]
    fn bad_or_unmasked_cidr_is_refused() {
        let plan = plan_b(&[
            node("b1", 1, &["10.2.1.0/33"]),
            node("b2", 2, &["10.2.2.7/24"]),
            node("b3", 3, &["fd00:0::/64"]),
        ]);
        let refused: Vec<_> = plan
            .conflicts
            .iter()
            .map(|c| (c.node.as_str(), c.cidr.as_deref()))
            .collect();
        assert_eq!(
            refused[..2],
            [("b1", Some("10.2.1.0/33")), ("b2", Some("10.2.2.7/24"))]
        );
        assert!(
            plan.conflicts
                .iter()
                .all(|c| c.node != "b3" || matches!(c.reason, Reason::OutsideAllowed { .. }))
        );
    }

    #[test]
    fn ipv6_spelling_is_canonicalised() {
        let plan = plan(
            &peer("cluster-b", &["fd00::/48"]),
            &[node("b1", 1, &["fd00:0:0:1::/64"])],
            &local(),
            &[],
            &[],
        );
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
        assert_eq!(plan.apply[0].spec.pod_cidrs, ["fd00:0:0:1::/64"]);
    }

    #[test]
    fn bad_endpoint_is_refused() {
        let mut n = node("b1", 1, &["10.2.1.0/24"]);
        n.spec.endpoints = vec!["999.1.1.1:51820".into()];
        let plan = plan_b(&[n]);
        assert!(plan.apply.is_empty());
        assert!(plan.conflicts[0].to_string().contains("999.1.1.1:51820"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let local = Local::new("cluster-a", &[], &[node("a1", 7, &[])]);
        let plan = plan(
            &peer("cluster-b", &["10.2.0.0/16"]),
            &[
                node("b1", 1, &["10.2.1.0/24"]),
                node("b2", 1, &["10.2.2.0/24"]),
                node("b3", 7, &["10.2.3.0/24"]),
                node("b4", 4, &["10.2.4.0/24"]),
            ],
            &local,
            &[],
            &[],
        );
        assert_eq!(names(&plan.apply), ["cluster-b.b4"]);
        let refused: Vec<_> = plan.conflicts.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(refused, ["b1", "b2", "b3"]);
        assert!(plan.conflicts[2].to_string().contains("local node a1"));
    }

    #[test]
    fn overlong_name_is_refused() {
        let long = "n".repeat(250);
        let plan = plan_b(&[node(&long, 1, &["10.2.1.0/24"])]);
        assert_eq!(plan.conflicts[0].reason, Reason::NameTooLong);
    }

    #[test]
    fn node_without_cidrs_is_mirrored() {
        let plan = plan_b(&[node("b1", 1, &[])]);
        assert_eq!(plan.mirrored, 1);
        assert!(plan.apply[0].spec.pod_cidrs.is_empty());
    }

    #[test]
    fn mesh_peers_take_the_cluster_name_and_keep_location_and_kind() {
        let mut n = node("h1", 1, &["10.2.9.0/24"]);
        n.spec.location = Some("fra1".into());
        n.spec.kind = MeshNodeKind::Host;
        let plan = plan_b(&[n]);
        assert_eq!(plan.apply[0].name, "cluster-b.h1");
        assert_eq!(plan.apply[0].spec.location.as_deref(), Some("fra1"));
        assert_eq!(plan.apply[0].spec.kind, MeshNodeKind::Host);
    }

    /// A relay host whose status lists `(peer, endpoint, observed)` tunnels: `observed`
    /// puts the endpoint in `observedEndpoint`, else only in `endpoint` (a guess).
    fn reporter(name: &str, tunnels: &[(&str, &str, bool)]) -> MeshNode {
        let mut n = host(name, 50, &["10.250.0.50/32"]);
        n.spec.relay = true;
        n.status = Some(MeshNodeStatus {
            peers: tunnels
                .iter()
                .map(|(peer, endpoint, observed)| TunnelStatus {
                    name: (*peer).to_owned(),
                    endpoint: Some((*endpoint).to_owned()),
                    observed_endpoint: observed.then(|| (*endpoint).to_owned()),
                    ..TunnelStatus::default()
                })
                .collect(),
            ..MeshNodeStatus::default()
        });
        n
    }

    #[test]
    fn endpoints_observed_on_either_side_follow_the_published_ones() {
        // b1 publishes its private address; a relay of cluster-b heard it from its NAT's
        // address, and a relay of ours did too (from another port).
        let remote = [
            node("b1", 1, &["10.2.1.0/24"]),
            reporter("relay-b", &[("b1", "198.18.2.254:51820", true)]),
            // Only where it sends: a guess, not an observation.
            reporter("relay-b2", &[("b1", "198.18.2.254:4000", false)]),
        ];
        let ours = reporter("relay-a", &[("cluster-b.b1", "198.18.2.254:51821", true)]);
        // A host that is no relay adds nothing, nor a second entry for one tunnel.
        let mut plain = reporter("db1", &[("cluster-b.b1", "198.18.66.6:51820", true)]);
        plain.spec.relay = false;
        let twice = reporter(
            "relay-c",
            &[
                ("cluster-b.b1", "198.18.2.254:51821", true),
                ("cluster-b.b1", "198.18.77.7:51820", true),
            ],
        );
        let local = Local::new("cluster-a", &[cidr("10.1.0.0/16")], [&ours, &plain, &twice]);
        let plan = plan(
            &peer("cluster-b", &["10.2.0.0/16"]),
            &remote,
            &local,
            &[],
            &[],
        );
        let b1 = plan.apply.iter().find(|d| d.spec.node == "b1").unwrap();
        assert_eq!(
            b1.spec.endpoints,
            [
                "198.18.0.1:51820",
                "198.18.2.254:51820",
                "198.18.2.254:51821"
            ]
        );
    }

    #[test]
    fn only_a_labelled_node_with_an_endpoint_is_mirrored_as_a_gateway() {
        let mut gw = node("b1", 1, &["10.2.1.0/24"]);
        gw.spec.gateway = true;
        let mut mute = node("b2", 2, &["10.2.2.0/24"]);
        mute.spec.gateway = true;
        mute.spec.endpoints.clear();
        let mut host_gw = host("h1", 3, &["10.250.0.5/32"]);
        host_gw.spec.gateway = true;
        let plan = plan_b(&[gw, mute, host_gw, node("b4", 4, &["10.2.4.0/24"])]);
        let gateways: Vec<(&str, bool)> = plan
            .apply
            .iter()
            .map(|d| (d.spec.node.as_str(), d.spec.gateway))
            .collect();
        assert_eq!(
            gateways,
            [("b1", true), ("b2", false), ("b4", false), ("h1", false)]
        );
    }

    #[test]
    fn a_host_without_a_key_is_not_ready_and_neither_mirrored_nor_refused() {
        let mut h = host("h1", 1, &["10.250.0.5/32"]);
        h.spec.public_key = String::new();
        let plan = plan_b(&[h, node("b1", 2, &["10.2.1.0/24"])]);
        assert_eq!(names(&plan.apply), ["cluster-b.b1"]);
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
    }

    #[test]
    fn a_host_address_outside_the_allowed_range_is_mirrored_but_not_a_whole_network() {
        let plan = plan_b(&[
            host("h1", 1, &["10.250.0.5/32"]),
            host("h2", 2, &["10.250.1.0/24"]),
            node("b1", 3, &["10.250.2.5/32"]),
        ]);
        assert_eq!(names(&plan.apply), ["cluster-b.h1"]);
        let refused: Vec<_> = plan.conflicts.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(refused, ["b1", "h2"]);
    }

    #[test]
    fn a_host_address_claimed_here_is_refused() {
        let local = Local::new(
            "cluster-a",
            &[cidr("10.1.0.0/16")],
            [&host("db", 9, &["10.250.0.5/32"])],
        );
        let plan = plan(
            &peer("cluster-b", &["10.2.0.0/16"]),
            &[host("h1", 1, &["10.250.0.5/32"])],
            &local,
            &[],
            &[],
        );
        assert!(plan.apply.is_empty());
        assert!(
            plan.conflicts[0].to_string().contains("local node db"),
            "{}",
            plan.conflicts[0]
        );
    }

    #[test]
    fn a_host_outside_the_granted_host_range_is_refused() {
        let mut pc = peer("cluster-b", &["10.2.0.0/16"]);
        pc.spec.allowed_host_cidrs.clear();
        let remote = [host("h1", 1, &["10.250.0.5/32"])];
        let refused = plan(&pc, &remote, &local(), &[], &[]);
        assert!(refused.apply.is_empty());
        assert!(matches!(
            refused.conflicts[0].reason,
            Reason::OutsideHostRange { .. }
        ));
        let text = refused.conflicts[0].to_string();
        assert!(
            text.contains("h1") && text.contains("10.250.0.5/32") && text.contains("--host-cidr"),
            "{text}"
        );
        pc.spec.allowed_host_cidrs = vec!["10.251.0.0/24".into()];
        let refused = plan(&pc, &remote, &local(), &[], &[]);
        assert!(refused.apply.is_empty());
        assert!(refused.conflicts[0].to_string().contains("10.251.0.0/24"));
        pc.spec.allowed_host_cidrs = vec!["10.250.0.0/24".into()];
        assert_eq!(
            names(&plan(&pc, &remote, &local(), &[], &[]).apply),
            ["cluster-b.h1"]
        );
    }

    #[test]
    fn no_host_claims_a_reserved_address_even_inside_its_granted_range() {
        let mut pc = peer("cluster-b", &["10.2.0.0/16"]);
        pc.spec.allowed_host_cidrs = vec!["0.0.0.0/0".into(), "::/0".into()];
        let mut local = Local::new(
            "cluster-a",
            &[cidr("10.1.0.0/16")],
            [&node("a1", 9, &["10.1.1.0/24"])],
        );
        local.reserve(cidr("10.96.0.0/12"), Reserved::ServiceCidr);
        local.reserve(cidr("192.0.2.10/32"), Reserved::ApiServer);
        let pc_c = peer("cluster-c", &["10.3.0.0/16"]);
        let c_peers = applied(
            &pc_c,
            &plan(&pc_c, &[node("c1", 5, &["10.3.1.0/24"])], &local, &[], &[]),
        );
        let c = OtherPeer::new(&pc_c, &c_peers);
        let peer_endpoint = |cluster: &str, node: &str| Reserved::PeerEndpoint {
            cluster: cluster.into(),
            node: node.into(),
        };
        let cases = [
            ("127.0.0.1/32", Reserved::Loopback),
            ("::1/128", Reserved::Loopback),
            ("169.254.169.254/32", Reserved::LinkLocal),
            ("fe80::1/128", Reserved::LinkLocal),
            ("224.0.0.251/32", Reserved::Multicast),
            ("255.255.255.255/32", Reserved::Multicast),
            ("ff02::1/128", Reserved::Multicast),
            ("0.0.0.0/32", Reserved::Unspecified),
            ("::/128", Reserved::Unspecified),
            ("::ffff:127.0.0.1/128", Reserved::Unspecified),
            ("10.96.0.10/32", Reserved::ServiceCidr),
            ("192.0.2.10/32", Reserved::ApiServer),
            (
                "198.18.0.9/32",
                Reserved::LocalEndpoint { node: "a1".into() },
            ),
            ("198.18.0.5/32", peer_endpoint("cluster-c", "c1")),
            ("198.18.0.3/32", peer_endpoint("cluster-b", "b3")),
        ];
        let mut remote = vec![node("b3", 3, &["10.2.3.0/24"])];
        for (i, (address, _)) in cases.iter().enumerate() {
            remote.push(host(&format!("h{i:02}"), 10 + i as u8, &[address]));
        }
        let plan = plan(&pc, &remote, &local, &[c], &[]);
        assert_eq!(names(&plan.apply), ["cluster-b.b3"]);
        assert_eq!(plan.conflicts.len(), cases.len(), "{:?}", plan.conflicts);
        for (conflict, (address, what)) in plan.conflicts.iter().zip(&cases) {
            assert_eq!(conflict.cidr.as_deref(), Some(*address));
            assert!(
                matches!(&conflict.reason, Reason::Reserved { what: w, .. } if w == what),
                "{address}: {conflict}"
            );
            let text = conflict.to_string();
            assert!(
                text.contains(&conflict.node) && text.contains(address),
                "{text}"
            );
        }
    }

    #[test]
    fn a_granted_pod_range_still_may_not_cover_reserved_ranges() {
        let mut local = local();
        local.reserve(cidr("10.96.0.0/12"), Reserved::ServiceCidr);
        let plan = plan(
            &peer("cluster-b", &["0.0.0.0/0"]),
            &[
                node("b1", 1, &["10.96.0.0/16"]),
                node("b2", 2, &["169.254.0.0/24"]),
                node("b3", 3, &["127.0.0.0/8"]),
                node("b4", 4, &["10.2.4.0/24"]),
            ],
            &local,
            &[],
            &[],
        );
        assert_eq!(names(&plan.apply), ["cluster-b.b4"]);
        let whats: Vec<_> = plan
            .conflicts
            .iter()
            .map(|c| match &c.reason {
                Reason::Reserved { what, .. } => what.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            whats,
            [
                Reserved::ServiceCidr,
                Reserved::LinkLocal,
                Reserved::Loopback
            ]
        );
    }

    #[test]
    fn endpoints_do_not_cut_a_granted_pod_range_off() {
        // A local node (written by its own credential) publishes an endpoint inside the
        // remote's granted range: the remote node stays.
        let mut forged = node("forged", 9, &[]);
        forged.spec.endpoints = vec!["10.2.1.5:51820".into()];
        let local = Local::new("cluster-a", &[cidr("10.1.0.0/16")], [&forged]);
        let plan = plan(
            &peer("cluster-b", &["10.2.0.0/16"]),
            &[node("b1", 1, &["10.2.1.0/24"])],
            &local,
            &[],
            &[],
        );
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
    }

    #[test]
    fn no_remote_node_claims_an_address_of_our_nodes() {
        let mut ours = k8s_node("a1", &[("InternalIP", "10.2.9.5"), ("Hostname", "a1")]);
        ours.status
            .get_or_insert_with(Default::default)
            .addresses
            .get_or_insert_with(Vec::new)
            .push(NodeAddress {
                type_: "ExternalIP".into(),
                address: "192.0.2.7".into(),
            });
        assert_eq!(
            node_addresses(&ours),
            [
                "10.2.9.5".parse::<IpAddr>().unwrap(),
                "192.0.2.7".parse().unwrap()
            ]
        );
        let mut local = local();
        local.reserve_nodes([&ours]);
        let mut pc = peer("cluster-b", &["10.2.0.0/16"]);
        pc.spec.allowed_host_cidrs = vec!["192.0.2.0/24".into()];
        let plan = plan(
            &pc,
            &[
                // A granted pod range that holds our node's InternalIP.
                node("b1", 1, &["10.2.9.0/24"]),
                node("b2", 2, &["10.2.2.0/24"]),
                // A host inside its granted range, on our node's ExternalIP.
                host("h1", 3, &["192.0.2.7/32"]),
            ],
            &local,
            &[],
            &[],
        );
        assert_eq!(names(&plan.apply), ["cluster-b.b2"]);
        let texts: Vec<String> = plan.conflicts.iter().map(ToString::to_string).collect();
        assert_eq!(plan.conflicts.len(), 2, "{texts:?}");
        for conflict in &plan.conflicts {
            assert!(
                matches!(&conflict.reason, Reason::Reserved { what: Reserved::LocalNode { node }, .. } if node == "a1"),
                "{conflict}"
            );
        }
        assert!(
            texts[0].contains("node b1")
                && texts[0].contains("10.2.9.0/24")
                && texts[0].contains("10.2.9.5/32")
                && texts[0].contains("local Node a1"),
            "{}",
            texts[0]
        );
        assert!(texts[1].contains("node h1") && texts[1].contains("192.0.2.7/32"));
    }

    #[test]
    fn a_peer_cannot_steer_our_endpoints_for_a_third_cluster_or_our_own_nodes() {
        // cluster-b's machines claim to have heard cluster-c's c1 and our a1 at an address
        // of b's choosing, and b names one of its nodes after c's node.
        let b_nodes = [
            node("b1", 1, &["10.2.1.0/24"]),
            reporter(
                "relay-b",
                &[
                    ("cluster-c.c1", "198.18.66.6:51820", true),
                    ("cluster-a.a1", "198.18.66.6:51821", true),
                    ("c1", "198.18.66.6:51822", true),
                    ("b1", "198.18.2.254:51820", true),
                ],
            ),
        ];
        // Our own machines heard c1 at its NAT's address.
        let ours = reporter("relay-a", &[("cluster-c.c1", "198.18.3.254:51820", true)]);
        let local = Local::new("cluster-a", &[cidr("10.1.0.0/16")], [&ours]);
        let pc_b = peer("cluster-b", &["10.2.0.0/16"]);
        let b_plan = plan(&pc_b, &b_nodes, &local, &[], &[]);
        let b_peers = applied(&pc_b, &b_plan);
        // What b's machines saw of b's own node counts for it.
        let b1 = b_plan.apply.iter().find(|d| d.spec.node == "b1").unwrap();
        assert_eq!(
            b1.spec.endpoints,
            ["198.18.0.1:51820", "198.18.2.254:51820"]
        );
        // Nothing b published reaches cluster-c's node: only its own endpoint and what
        // our machines observed.
        let pc_c = peer("cluster-c", &["10.3.0.0/16"]);
        let c_plan = plan(
            &pc_c,
            &[node("c1", 5, &["10.3.1.0/24"])],
            &local,
            &[OtherPeer::new(&pc_b, &b_peers)],
            &[],
        );
        let c1 = c_plan.apply.iter().find(|d| d.spec.node == "c1").unwrap();
        assert_eq!(
            c1.spec.endpoints,
            ["198.18.0.5:51820", "198.18.3.254:51820"]
        );
        // And no endpoint b's machines claim to have seen anywhere else is used.
        for desired in b_plan.apply.iter().chain(&c_plan.apply) {
            assert!(
                !desired
                    .spec
                    .endpoints
                    .iter()
                    .any(|e| e.starts_with("198.18.66.6")),
                "{}: {:?}",
                desired.name,
                desired.spec.endpoints
            );
        }
    }

    #[test]
    fn nodes_past_the_cap_are_refused() {
        let mut remote = vec![
            node("b3", 3, &["10.2.3.0/24"]),
            node("b1", 1, &["10.2.1.0/24"]),
            node("b2", 2, &["10.2.2.0/24"]),
        ];
        let refused = cap_nodes(&mut remote, 2);
        let kept: Vec<String> = remote.iter().map(|n| n.name_any()).collect();
        assert_eq!(kept, ["b1", "b2"]);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].to_string().contains("node b3"), "{}", refused[0]);
        assert!(cap_nodes(&mut remote, 5).is_empty());
    }

    proptest! {
        #[test]
        fn index_agrees_with_a_linear_scan(
            entries in prop::collection::vec(arb_cidr(), 0..24),
            query in arb_cidr(),
        ) {
            let mut index = Index::default();
            for (i, c) in entries.iter().enumerate() {
                index.insert(*c, Owner::Sibling { node: i.to_string() });
            }
            let found = index.find_overlap(&query, |_| true);
            let any = entries.iter().any(|c| c.overlaps(&query));
            prop_assert_eq!(found.is_some(), any);
            if let Some((c, _)) = found {
                prop_assert!(c.overlaps(&query));
            }
        }

        #[test]
        fn mirrored_nodes_are_disjoint_allowed_and_not_local(
            nodes in prop::collection::vec(prop::collection::vec(arb_cidr(), 0..3), 0..10),
        ) {
            let remote = numbered_nodes(&nodes);
            let pc = peer("cluster-b", &["10.2.0.0/16"]);
            let plan = plan(&pc, &remote, &local(), &[], &[]);
            let allowed = cidr("10.2.0.0/16");
            let local_cidr = cidr("10.1.0.0/16");
            let mirrored: Vec<(String, IpCidr)> = plan
                .apply
                .iter()
                .flat_map(|d| d.spec.pod_cidrs.iter().map(move |c| (d.spec.node.clone(), cidr(c))))
                .collect();
            for (n, c) in &mirrored {
                prop_assert!(allowed.covers(c));
                prop_assert!(!local_cidr.overlaps(c));
                for (m, d) in &mirrored {
                    prop_assert!(n == m || !c.overlaps(d), "{} {} overlaps {} {}", n, c, m, d);
                }
            }
            // Every node is either mirrored or named in a conflict, never both.
            let refused: BTreeSet<&str> = plan.conflicts.iter().map(|c| c.node.as_str()).collect();
            prop_assert_eq!(plan.mirrored + refused.len(), remote.len());
            for d in &plan.apply {
                prop_assert!(!refused.contains(d.spec.node.as_str()));
            }
        }

        #[test]
        fn replanning_an_applied_plan_changes_nothing(
            nodes in prop::collection::vec(prop::collection::vec(arb_cidr(), 0..3), 0..8),
        ) {
            let remote = numbered_nodes(&nodes);
            let pc = peer("cluster-b", &["10.2.0.0/16"]);
            let first = plan(&pc, &remote, &local(), &[], &[]);
            let second = plan(&pc, &remote, &local(), &[], &applied(&pc, &first));
            prop_assert!(second.apply.is_empty());
            prop_assert!(second.delete.is_empty());
            prop_assert_eq!(second.conflicts, first.conflicts);
        }
    }

    /// Nodes `n0`, `n1`, … claiming `cidrs[0]`, `cidrs[1]`, …, with keys 1, 2, ….
    fn numbered_nodes(cidrs: &[Vec<IpCidr>]) -> Vec<MeshNode> {
        cidrs
            .iter()
            .enumerate()
            .map(|(i, cidrs)| {
                let texts: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                node(&format!("n{i}"), i as u8 + 1, &texts)
            })
            .collect()
    }

    fn arb_cidr() -> impl Strategy<Value = IpCidr> {
        // Mostly inside 10.0.0.0/14 so that overlaps are common.
        (0u32..4, any::<u16>(), 14u8..=26).prop_map(|(b, rest, len)| {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (b << 16) | u32::from(rest));
            IpCidr::new(addr.into(), len).unwrap()
        })
    }

    fn cidr(text: &str) -> IpCidr {
        text.parse().unwrap()
    }

    fn local() -> Local {
        Local::new("cluster-a", &[cidr("10.1.0.0/16")], std::iter::empty())
    }

    /// The plan for `remote` as the nodes of cluster-b (allowed 10.2.0.0/16), seen from
    /// [`local`], with no other peer and no MeshPeer yet.
    fn plan_b(remote: &[MeshNode]) -> Plan {
        plan(
            &peer("cluster-b", &["10.2.0.0/16"]),
            remote,
            &local(),
            &[],
            &[],
        )
    }

    fn names(apply: &[Desired]) -> Vec<&str> {
        apply.iter().map(|d| d.name.as_str()).collect()
    }

    fn peer(name: &str, allowed: &[&str]) -> PeerCluster {
        let mut pc = PeerCluster::new(
            name,
            PeerClusterSpec {
                cluster_name: name.into(),
                api_server: "https://127.0.0.1:6443".into(),
                ca_data: None,
                credentials_secret: format!("{name}-credentials"),
                allowed_pod_cidrs: allowed.iter().map(|s| (*s).to_owned()).collect(),
                mesh_cidrs: Vec::new(),
                allowed_host_cidrs: vec!["10.250.0.0/16".into()],
            },
        );
        pc.metadata.uid = Some(format!("uid-{name}"));
        pc
    }

    fn node(name: &str, key_seed: u8, cidrs: &[&str]) -> MeshNode {
        let endpoint = format!("198.18.0.{key_seed}:51820");
        mesh_node(name, key_seed, Some(&endpoint), cidrs)
    }

    fn host(name: &str, key_seed: u8, cidrs: &[&str]) -> MeshNode {
        let mut h = node(name, key_seed, cidrs);
        h.spec.kind = MeshNodeKind::Host;
        h
    }

    /// The MeshPeers that exist after `plan` was applied for `pc`.
    fn k8s_node(name: &str, addresses: &[(&str, &str)]) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(type_, address)| NodeAddress {
                            type_: (*type_).to_owned(),
                            address: (*address).to_owned(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn applied(pc: &PeerCluster, plan: &Plan) -> Vec<MeshPeer> {
        plan.apply
            .iter()
            .map(|d| {
                let mut mp = MeshPeer::new(&d.name, d.spec.clone());
                mp.metadata.labels = Some([(PEER_CLUSTER_LABEL.to_owned(), pc.name_any())].into());
                mp.metadata.owner_references = Some(vec![OwnerReference {
                    api_version: "wiremesh.io/v1alpha1".into(),
                    kind: "PeerCluster".into(),
                    name: pc.name_any(),
                    uid: pc.metadata.uid.clone().unwrap(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]);
                mp
            })
            .collect()
    }
}
