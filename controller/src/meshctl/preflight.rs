//! `meshctl join`'s checks, decided before anything is written: a pure function of both
//! clusters' ConfigMaps, URLs, Node and API server addresses and existing PeerClusters.
//!
//! What each side grants the other (the other's pod CIDRs and host range, written into
//! its PeerCluster) must leave alone everything the granting side holds: its pod, service
//! and host CIDRs, its Nodes' and API servers' addresses, and what it granted its other
//! peers. A grant wider than [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`] is refused outright.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kube::ResourceExt as _;
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::PeerCluster;

use super::common::comma_list;
use crate::install::ClusterInfo;

/// The widest IPv4 range join grants (`/8`): a whole class-A network such as
/// `10.0.0.0/8` is a plausible pod range, anything wider is a claim on the Internet.
pub const MIN_PREFIX_V4: u8 = 8;
/// The widest IPv6 range join grants (`/32`, a whole provider allocation).
pub const MIN_PREFIX_V6: u8 = 32;
/// Where `meshctl join` allocates mesh CIDRs from by default: inside the shared address
/// space 100.64.0.0/10 (RFC 6598), and a ULA range (RFC 4193; the 40-bit global ID
/// 6d:6573:68, "mesh") of 256 /48s.
pub const DEFAULT_MESH_POOLS: [&str; 2] = ["100.64.0.0/10", "fd6d:6573:6800::/40"];
/// Most candidate blocks looked at in one pool (a /32 of /64s would be 2^32).
const MAX_CANDIDATES: u32 = 1 << 20;

/// One side of a join as the checks see it.
#[derive(Debug, Clone, Default)]
pub struct JoinSide {
    /// The kubeconfig context that reaches it.
    pub context: String,
    /// Its name and pod CIDRs (from its ConfigMap). `host_cidrs` is what its hosts are
    /// granted in the other cluster.
    pub info: ClusterInfo,
    /// Its API server's URL as the kubeconfig has it (what the other side will store).
    pub api_server: String,
    /// The PeerClusters that already exist in it.
    pub peers: Vec<PeerCluster>,
    /// Its Nodes' `InternalIP` and `ExternalIP` addresses, by Node.
    pub node_addresses: Vec<(String, IpAddr)>,
    /// Its API servers' addresses (the `kubernetes` Service and EndpointSlice, the
    /// kubeconfig's server when it is an address).
    pub api_servers: Vec<IpAddr>,
}

/// Which grant a refused CIDR belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The cluster's pod CIDRs (`allowedPodCIDRs`).
    PodCidr,
    /// Its hosts' range (`allowedHostCIDRs`).
    HostRange,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PodCidr => write!(f, "pod CIDR"),
            Self::HostRange => write!(f, "host range"),
        }
    }
}

/// What the granting cluster holds that a grant overlaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Its service CIDR.
    ServiceCidr(IpCidr),
    /// Its host range.
    HostRange(IpCidr),
    /// Its pod CIDR (for a host range; pod CIDRs against pod CIDRs are [`Refusal::Overlap`]).
    PodCidr(IpCidr),
    /// An address of one of its Nodes.
    Node {
        /// The Node.
        node: String,
        /// The address.
        address: IpAddr,
    },
    /// An address of its API server.
    ApiServer(IpAddr),
    /// The pod CIDR of another linked cluster (for a host range).
    PeerPodCidr {
        /// The linked cluster.
        peer: String,
        /// The range.
        cidr: IpCidr,
    },
    /// A host range it granted another linked cluster.
    PeerHostRange {
        /// The linked cluster.
        peer: String,
        /// The range.
        cidr: IpCidr,
    },
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServiceCidr(c) => write!(f, "its service CIDR {c}"),
            Self::HostRange(c) => write!(f, "its host range {c}"),
            Self::PodCidr(c) => write!(f, "its pod CIDR {c}"),
            Self::Node { node, address } => write!(f, "the address {address} of its Node {node}"),
            Self::ApiServer(a) => write!(f, "its API server's address {a}"),
            Self::PeerPodCidr { peer, cidr } => {
                write!(f, "the pod CIDR {cidr} of linked cluster {peer}")
            }
            Self::PeerHostRange { peer, cidr } => {
                write!(f, "the host range {cidr} it granted linked cluster {peer}")
            }
        }
    }
}

/// One reason not to join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The pod CIDRs overlap and no mesh CIDRs can be given ([`plan_mesh_cidrs`]).
    #[error("{0}")]
    MeshCidrs(String),
    /// Both contexts lead to clusters with the same name (maybe the same cluster twice).
    #[error(
        "contexts {a_context} and {b_context} both name a cluster {name:?}; cluster names must be unique in the mesh"
    )]
    SameName {
        /// The name.
        name: String,
        /// One context.
        a_context: String,
        /// The other.
        b_context: String,
    },
    /// `cluster` is already linked with another cluster of the same name.
    #[error(
        "{cluster} is already linked with a different cluster named {name} (its PeerCluster {peer_cluster} points at {linked_server}, \
         but context {context} is {joining_server}); unjoin that one first"
    )]
    NameTaken {
        /// The cluster holding the PeerCluster.
        cluster: String,
        /// The name both share.
        name: String,
        /// The existing PeerCluster.
        peer_cluster: String,
        /// Its API server.
        linked_server: String,
        /// The context being joined.
        context: String,
        /// Its API server.
        joining_server: String,
    },
    /// `cluster` already links the same API server under another name.
    #[error(
        "{cluster} already links the API server {server} as {linked_name} (PeerCluster {peer_cluster}), but it now calls itself {name}; \
         unjoin {linked_name} first"
    )]
    ServerTaken {
        /// The cluster holding the PeerCluster.
        cluster: String,
        /// The API server.
        server: String,
        /// The name it was linked under.
        linked_name: String,
        /// The existing PeerCluster.
        peer_cluster: String,
        /// The name it has now.
        name: String,
    },
    /// The link being made is still being removed.
    #[error(
        "PeerCluster {peer_cluster} in {cluster} is being deleted (wiremesh-controller removes it once its MeshPeers are gone); \
         join again when it has disappeared"
    )]
    BeingDeleted {
        /// The cluster holding the PeerCluster.
        cluster: String,
        /// The PeerCluster.
        peer_cluster: String,
    },
    /// The two clusters' pod CIDRs overlap.
    #[error("pod CIDRs overlap: {a} has {a_cidr} and {b} has {b_cidr}")]
    Overlap {
        /// One cluster.
        a: String,
        /// Its CIDR.
        a_cidr: IpCidr,
        /// The other.
        b: String,
        /// Its CIDR.
        b_cidr: IpCidr,
    },
    /// One cluster's pod CIDRs overlap those of a cluster the other is already linked with.
    #[error(
        "{cluster} is already linked with {peer}, whose pod CIDR {peer_cidr} overlaps {joining}'s {joining_cidr}"
    )]
    PeerOverlap {
        /// The cluster holding the PeerCluster.
        cluster: String,
        /// The linked cluster.
        peer: String,
        /// Its allowed CIDR.
        peer_cidr: IpCidr,
        /// The cluster being joined.
        joining: String,
        /// Its CIDR.
        joining_cidr: IpCidr,
    },
    /// A grant is wider than join grants.
    #[error(
        "{grantee}'s {grant} {cidr} is wider than /{widest}, the widest range join grants (a claim on addresses far beyond one cluster)"
    )]
    TooWide {
        /// The cluster the range would be granted to.
        grantee: String,
        /// Which grant.
        grant: Grant,
        /// The range.
        cidr: IpCidr,
        /// The widest prefix allowed for its family.
        widest: u8,
    },
    /// A grant overlaps something the granting cluster holds.
    #[error("{grantee}'s {grant} {cidr} overlaps {held} in {granter}; it cannot be granted there")]
    Holds {
        /// The cluster that would grant it.
        granter: String,
        /// The cluster it would be granted to.
        grantee: String,
        /// Which grant.
        grant: Grant,
        /// The range.
        cidr: IpCidr,
        /// What it overlaps.
        held: Held,
    },
    /// An existing PeerCluster holds a CIDR that does not parse (the schema should prevent it).
    #[error(
        "PeerCluster {peer_cluster} in {cluster} has allowedPodCIDRs entry {value:?}, which is not a CIDR"
    )]
    BadPeerCidr {
        /// The cluster holding the PeerCluster.
        cluster: String,
        /// The PeerCluster.
        peer_cluster: String,
        /// The entry.
        value: String,
    },
}

/// Every reason a join was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refusals {
    /// The local cluster (or context, if the names are unknown).
    pub local: String,
    /// The other cluster.
    pub remote: String,
    /// The reasons, at least one.
    pub refusals: Vec<Refusal>,
}

impl fmt::Display for Refusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing to join {} and {}; nothing was written:",
            self.local, self.remote
        )?;
        for refusal in &self.refusals {
            write!(f, "\n  - {refusal}")?;
        }
        Ok(())
    }
}

/// Decides whether `local` and `remote` may be linked: distinct names, neither already linked
/// with a different cluster of the same name (or with the same API server under another
/// name), and pod CIDRs disjoint from each other and from every cluster either side is
/// already linked with. An existing link between the two themselves is fine (join is
/// idempotent) unless it is being deleted.
///
/// # Errors
/// [`Refusals`] listing every reason, each naming the clusters and CIDRs.
pub fn check_join(local: &JoinSide, remote: &JoinSide) -> Result<(), Refusals> {
    let mut refusals = Vec::new();
    if local.info.name == remote.info.name {
        refusals.push(Refusal::SameName {
            name: local.info.name.clone(),
            a_context: local.context.clone(),
            b_context: remote.context.clone(),
        });
    }
    for (a, b) in [(local, remote), (remote, local)] {
        check_existing_links(a, b, &mut refusals);
    }
    for a_cidr in local.info.mesh_view() {
        for b_cidr in remote.info.mesh_view() {
            if a_cidr.overlaps(b_cidr) {
                refusals.push(Refusal::Overlap {
                    a: local.info.name.clone(),
                    a_cidr: *a_cidr,
                    b: remote.info.name.clone(),
                    b_cidr: *b_cidr,
                });
            }
        }
    }
    for (granter, grantee) in [(local, remote), (remote, local)] {
        check_grants(granter, grantee, &mut refusals);
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(Refusals {
            local: local.info.name.clone(),
            remote: remote.info.name.clone(),
            refusals,
        })
    }
}

/// The checks of what `granter` would grant `grantee` (its pod CIDRs and host range)
/// against what `granter` holds. Pod CIDRs against pod CIDRs, and against other peers'
/// pod CIDRs, are [`check_join`]'s and [`check_existing_links`]'s.
fn check_grants(granter: &JoinSide, grantee: &JoinSide, refusals: &mut Vec<Refusal>) {
    let grants = grantee
        .info
        .mesh_view()
        .iter()
        .map(|c| (Grant::PodCidr, *c))
        .chain(
            grantee
                .info
                .host_cidrs
                .iter()
                .map(|c| (Grant::HostRange, *c)),
        );
    for (grant, cidr) in grants {
        let widest = match cidr.addr() {
            IpAddr::V4(_) => MIN_PREFIX_V4,
            IpAddr::V6(_) => MIN_PREFIX_V6,
        };
        if cidr.prefix_len() < widest {
            refusals.push(Refusal::TooWide {
                grantee: grantee.info.name.clone(),
                grant,
                cidr,
                widest,
            });
            continue;
        }
        let mut held: Vec<Held> = Vec::new();
        // Pod CIDRs against an untranslated granter's pod CIDRs are a Refusal::Overlap;
        // a translated granter keeps its pods in its own pod CIDRs all the same.
        if grant == Grant::HostRange || !granter.info.mesh_cidrs.is_empty() {
            held.extend(granter.info.pod_cidrs.iter().map(|c| Held::PodCidr(*c)));
        }
        held.extend(
            granter
                .info
                .service_cidrs
                .iter()
                .map(|c| Held::ServiceCidr(*c)),
        );
        held.extend(granter.info.host_cidrs.iter().map(|c| Held::HostRange(*c)));
        held.extend(
            granter
                .node_addresses
                .iter()
                .map(|(node, address)| Held::Node {
                    node: node.clone(),
                    address: *address,
                }),
        );
        held.extend(granter.api_servers.iter().map(|a| Held::ApiServer(*a)));
        for peer in granter
            .peers
            .iter()
            .filter(|p| !links_to(p, &grantee.info.name))
        {
            held.extend(
                peer.spec
                    .allowed_host_cidrs
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .map(|c| Held::PeerHostRange {
                        peer: peer.spec.cluster_name.clone(),
                        cidr: c,
                    }),
            );
            if grant == Grant::HostRange {
                // A host range against another peer's pod CIDRs (pod CIDRs against them
                // are a PeerOverlap).
                held.extend(
                    peer_mesh_view(peer)
                        .iter()
                        .filter_map(|c| c.parse().ok())
                        .map(|c| Held::PeerPodCidr {
                            peer: peer.spec.cluster_name.clone(),
                            cidr: c,
                        }),
                );
            }
        }
        for held in held {
            let overlaps = match &held {
                Held::ServiceCidr(c)
                | Held::HostRange(c)
                | Held::PodCidr(c)
                | Held::PeerPodCidr { cidr: c, .. }
                | Held::PeerHostRange { cidr: c, .. } => cidr.overlaps(c),
                Held::Node { address, .. } | Held::ApiServer(address) => cidr.contains(*address),
            };
            if overlaps {
                refusals.push(Refusal::Holds {
                    granter: granter.info.name.clone(),
                    grantee: grantee.info.name.clone(),
                    grant,
                    cidr,
                    held,
                });
            }
        }
    }
}

/// Whether the PeerCluster `peer` in some cluster is the link with `other`.
pub fn links_to(peer: &PeerCluster, other: &str) -> bool {
    peer.name_any() == other || peer.spec.cluster_name == other
}

/// The checks of `side`'s existing PeerClusters against `joining`.
fn check_existing_links(side: &JoinSide, joining: &JoinSide, refusals: &mut Vec<Refusal>) {
    let cluster = &side.info.name;
    for peer in &side.peers {
        let peer_name = peer.name_any();
        let same_server = same_url(&peer.spec.api_server, &joining.api_server);
        if links_to(peer, &joining.info.name) {
            if !same_server {
                refusals.push(Refusal::NameTaken {
                    cluster: cluster.clone(),
                    name: joining.info.name.clone(),
                    peer_cluster: peer_name,
                    linked_server: peer.spec.api_server.clone(),
                    context: joining.context.clone(),
                    joining_server: joining.api_server.clone(),
                });
            } else if peer.metadata.deletion_timestamp.is_some() {
                refusals.push(Refusal::BeingDeleted {
                    cluster: cluster.clone(),
                    peer_cluster: peer_name,
                });
            }
            // The existing link with the joining cluster is replaced, not compared with.
            continue;
        }
        if same_server {
            refusals.push(Refusal::ServerTaken {
                cluster: cluster.clone(),
                server: joining.api_server.clone(),
                linked_name: peer.spec.cluster_name.clone(),
                peer_cluster: peer_name.clone(),
                name: joining.info.name.clone(),
            });
        }
        for value in peer_mesh_view(peer) {
            let Ok(peer_cidr) = value.parse::<IpCidr>() else {
                refusals.push(Refusal::BadPeerCidr {
                    cluster: cluster.clone(),
                    peer_cluster: peer_name.clone(),
                    value: value.clone(),
                });
                continue;
            };
            for joining_cidr in joining.info.mesh_view() {
                if peer_cidr.overlaps(joining_cidr) {
                    refusals.push(Refusal::PeerOverlap {
                        cluster: cluster.clone(),
                        peer: peer.spec.cluster_name.clone(),
                        peer_cidr,
                        joining: joining.info.name.clone(),
                        joining_cidr: *joining_cidr,
                    });
                }
            }
        }
    }
}

/// What a linked cluster's pods are known by: its mesh CIDRs when translated, else its
/// allowed pod CIDRs.
fn peer_mesh_view(peer: &PeerCluster) -> &[String] {
    if peer.spec.mesh_cidrs.is_empty() {
        &peer.spec.allowed_pod_cidrs
    } else {
        &peer.spec.mesh_cidrs
    }
}

/// The mesh CIDRs `meshctl join` gives `local` and `remote`: when a pod CIDR of one
/// overlaps one of the other's, each side that has no mesh CIDRs yet gets one per pod
/// CIDR, of its length, from the first of `pools` of its family with room, clear of every
/// range either side holds (pod, service, host and mesh CIDRs) and of every range either
/// side granted a linked cluster. Empty for a side that needs none.
///
/// # Errors
/// When the pools have no free block of the length needed, naming the pod CIDR and the
/// pools.
pub fn plan_mesh_cidrs(
    local: &JoinSide,
    remote: &JoinSide,
    pools: &[IpCidr],
) -> Result<(Vec<IpCidr>, Vec<IpCidr>), String> {
    let overlap = local
        .info
        .pod_cidrs
        .iter()
        .any(|a| remote.info.pod_cidrs.iter().any(|b| a.overlaps(b)));
    if !overlap {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut taken: Vec<IpCidr> = Vec::new();
    for side in [local, remote] {
        let info = &side.info;
        taken.extend(info.pod_cidrs.iter().chain(&info.service_cidrs));
        taken.extend(info.host_cidrs.iter().chain(&info.mesh_cidrs));
        for peer in &side.peers {
            let spec = &peer.spec;
            let texts = spec
                .allowed_pod_cidrs
                .iter()
                .chain(&spec.mesh_cidrs)
                .chain(&spec.allowed_host_cidrs);
            taken.extend(texts.filter_map(|c| c.parse::<IpCidr>().ok()));
        }
    }
    // A cluster's agents translate for every link at once: a cluster already linked by
    // its pod CIDRs would lose those links the moment it is translated.
    for (side, other) in [(local, remote), (remote, local)] {
        if !side.info.mesh_cidrs.is_empty() {
            continue;
        }
        let linked: Vec<&str> = side
            .peers
            .iter()
            .map(|p| p.spec.cluster_name.as_str())
            .filter(|name| *name != other.info.name)
            .collect();
        if !linked.is_empty() {
            return Err(format!(
                "the pod CIDRs of {} and {} overlap and {} has no mesh CIDRs, but it is \
                 linked with {}, which know its pods by their pod CIDRs ({}): translating \
                 them would cut those links; unjoin them, give {} mesh CIDRs \
                 (`meshctl install --mesh-cidr`), and join again",
                local.info.name,
                remote.info.name,
                side.info.name,
                linked.join(", "),
                comma_list(&side.info.pod_cidrs),
                side.info.name,
            ));
        }
    }
    let mut local_mesh = Vec::new();
    let mut remote_mesh = Vec::new();
    for (side, allocated) in [(local, &mut local_mesh), (remote, &mut remote_mesh)] {
        if !side.info.mesh_cidrs.is_empty() {
            continue;
        }
        for pod in &side.info.pod_cidrs {
            let Some(block) = free_block(pod, pools, &taken) else {
                let pools: Vec<String> = pools.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "no free /{} in the mesh CIDR pools ({}) for pod CIDR {pod} of {}; \
                     give it one with `meshctl install --mesh-cidr`, or another pool with `--mesh-pool`",
                    pod.prefix_len(),
                    pools.join(", "),
                    side.info.name
                ));
            };
            taken.push(block);
            allocated.push(block);
        }
    }
    Ok((local_mesh, remote_mesh))
}

/// The first block of `pod`'s family and length inside one of `pools` that overlaps none
/// of `taken`.
fn free_block(pod: &IpCidr, pools: &[IpCidr], taken: &[IpCidr]) -> Option<IpCidr> {
    let len = pod.prefix_len();
    for pool in pools {
        if pool.addr().is_ipv4() != pod.addr().is_ipv4() || pool.prefix_len() > len {
            continue;
        }
        let bits: u32 = if pool.addr().is_ipv4() { 32 } else { 128 };
        let step = 1u128.checked_shl(bits - u32::from(len)).unwrap_or(0);
        let count = 1u128
            .checked_shl(u32::from(len - pool.prefix_len()))
            .unwrap_or(u128::MAX)
            .min(u128::from(MAX_CANDIDATES));
        let base = match pool.addr() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        for i in 0..count {
            let start = base + i * step;
            let addr = match pool.addr() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(start as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(start)),
            };
            let Ok(block) = IpCidr::new(addr, len) else {
                continue;
            };
            if !taken.iter().any(|t| t.overlaps(&block)) {
                return Some(block);
            }
        }
    }
    None
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use wiremesh_proto::crd::PeerClusterSpec;

    use super::*;

    #[test]
    fn disjoint_clusters_may_join() {
        let a = side("cluster-a", &["10.1.0.0/16"], &[]);
        let b = side("cluster-b", &["10.2.0.0/16"], &[]);
        assert_eq!(check_join(&a, &b), Ok(()));
    }

    #[test]
    fn an_existing_link_between_the_two_is_fine() {
        let a = side(
            "cluster-a",
            &["10.1.0.0/16"],
            &[peer("cluster-b", &["10.2.0.0/16"])],
        );
        let b = side(
            "cluster-b",
            &["10.2.0.0/16"],
            &[peer("cluster-a", &["10.1.0.0/16"])],
        );
        assert_eq!(check_join(&a, &b), Ok(()));
    }

    #[test]
    fn same_names_are_refused() {
        let a = side("cluster-a", &["10.1.0.0/16"], &[]);
        let mut b = side("cluster-a", &["10.2.0.0/16"], &[]);
        b.context = "ctx-b".to_owned();
        let err = check_join(&a, &b).unwrap_err();
        assert!(
            matches!(err.refusals[..], [Refusal::SameName { .. }]),
            "{err}"
        );
        assert!(err.to_string().contains("ctx-b"), "{err}");
    }

    fn pools() -> Vec<IpCidr> {
        DEFAULT_MESH_POOLS.iter().map(|c| cidr(c)).collect()
    }

    #[test]
    fn overlapping_pod_cidrs_get_mesh_cidrs_clear_of_everything_linked_then_join() {
        // cluster-a is already linked with cluster-c, which holds 100.64.0.0/16.
        let mut c = peer("cluster-c", &["10.244.0.0/16"]);
        c.spec.mesh_cidrs = vec!["100.64.0.0/16".into()];
        let mut a = side("cluster-a", &["10.244.0.0/16", "fd00:10:244::/48"], &[c]);
        a.info.mesh_cidrs = vec![cidr("100.65.0.0/16"), cidr("fd6d:6573:6800::/48")];
        let mut b = side("cluster-b", &["10.244.0.0/16", "fd00:10:244::/48"], &[]);
        b.info.service_cidrs = vec![cidr("100.66.0.0/16")];
        let (for_a, for_b) = plan_mesh_cidrs(&a, &b, &pools()).unwrap();
        assert!(for_a.is_empty(), "cluster-a keeps its mesh CIDRs");
        assert_eq!(for_b, [cidr("100.67.0.0/16"), cidr("fd6d:6573:6801::/48")]);
        assert!(
            check_join(&a, &b).is_err(),
            "refused while cluster-b is untranslated"
        );
        b.info.mesh_cidrs = for_b;
        assert_eq!(check_join(&a, &b), Ok(()));
        // Disjoint pod CIDRs need none.
        let d = side("cluster-d", &["10.9.0.0/16"], &[]);
        assert_eq!(
            plan_mesh_cidrs(&a, &d, &pools()),
            Ok((Vec::new(), Vec::new()))
        );
        // A full pool says which pod CIDR found no room.
        let e = plan_mesh_cidrs(&a, &b_untranslated(), &[cidr("100.64.0.0/15")]).unwrap_err();
        assert!(e.contains("pod CIDR 10.244.0.0/16 of cluster-b"), "{e}");
    }

    #[test]
    fn a_cluster_linked_by_its_pod_cidrs_is_not_translated_behind_its_links_back() {
        let c = peer("cluster-c", &["10.9.0.0/16"]);
        let a = side("cluster-a", &["10.244.0.0/16"], &[c]);
        let e = plan_mesh_cidrs(&a, &b_untranslated(), &pools()).unwrap_err();
        assert!(
            e.contains("cluster-a has no mesh CIDRs") && e.contains("linked with cluster-c"),
            "{e}"
        );
        // Its link with the other side itself (a join run again) is no obstacle.
        let b = side("cluster-b", &["10.244.0.0/16"], &[]);
        let a = side(
            "cluster-a",
            &["10.244.0.0/16"],
            &[peer("cluster-b", &["10.244.0.0/16"])],
        );
        assert_eq!(plan_mesh_cidrs(&a, &b, &pools()).unwrap().0.len(), 1);
    }

    fn b_untranslated() -> JoinSide {
        side("cluster-b", &["10.244.0.0/16"], &[])
    }

    #[test]
    fn colliding_mesh_cidrs_are_refused_naming_both() {
        let mut a = side("cluster-a", &["10.244.0.0/16"], &[]);
        a.info.mesh_cidrs = vec![cidr("100.64.0.0/16")];
        let mut b = side("cluster-b", &["10.244.0.0/16"], &[]);
        b.info.mesh_cidrs = vec![cidr("100.64.0.0/16")];
        let text = check_join(&a, &b).unwrap_err().to_string();
        assert!(
            text.contains("cluster-a has 100.64.0.0/16 and cluster-b has 100.64.0.0/16"),
            "{text}"
        );
        // A mesh CIDR over the other side's own pod CIDR is refused too.
        let mut c = side("cluster-c", &["10.9.0.0/16"], &[]);
        c.info.mesh_cidrs = vec![cidr("10.244.0.0/16")];
        let text = check_join(&a, &c).unwrap_err().to_string();
        assert!(text.contains("its pod CIDR 10.244.0.0/16"), "{text}");
    }

    #[test]
    fn overlapping_pod_cidrs_are_refused_with_both_cidrs() {
        let a = side("cluster-a", &["10.1.0.0/16"], &[]);
        let c = side("cluster-c", &["10.3.0.0/16", "10.1.128.0/17"], &[]);
        let err = check_join(&a, &c).unwrap_err();
        assert_eq!(err.refusals.len(), 1, "{err}");
        let text = err.to_string();
        assert!(
            text.contains(
                "pod CIDRs overlap: cluster-a has 10.1.0.0/16 and cluster-c has 10.1.128.0/17"
            ),
            "{text}"
        );
        assert!(
            text.starts_with("refusing to join cluster-a and cluster-c; nothing was written"),
            "{text}"
        );
    }

    #[test]
    fn a_cidr_of_a_linked_cluster_is_refused_in_both_directions() {
        let a = side(
            "cluster-a",
            &["10.1.0.0/16"],
            &[peer("cluster-b", &["10.2.0.0/16"])],
        );
        let c = side("cluster-c", &["10.2.128.0/17"], &[]);
        let err = check_join(&a, &c).unwrap_err();
        assert_eq!(
            err.refusals,
            vec![Refusal::PeerOverlap {
                cluster: "cluster-a".into(),
                peer: "cluster-b".into(),
                peer_cidr: cidr("10.2.0.0/16"),
                joining: "cluster-c".into(),
                joining_cidr: cidr("10.2.128.0/17"),
            }]
        );
        // The same seen from the other side: c is linked with d, which overlaps a.
        let a = side("cluster-a", &["10.1.0.0/16"], &[]);
        let c = side(
            "cluster-c",
            &["10.3.0.0/16"],
            &[peer("cluster-d", &["10.1.2.0/24"])],
        );
        let err = check_join(&a, &c).unwrap_err();
        assert!(
            err.to_string().contains(
                "cluster-c is already linked with cluster-d, whose pod CIDR 10.1.2.0/24 overlaps cluster-a's 10.1.0.0/16"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_different_cluster_with_a_linked_name_is_refused() {
        let a = side(
            "cluster-a",
            &["10.1.0.0/16"],
            &[peer_at(
                "cluster-b",
                "https://10.9.9.9:6443",
                &["10.2.0.0/16"],
            )],
        );
        let b = side("cluster-b", &["10.2.0.0/16"], &[]);
        let err = check_join(&a, &b).unwrap_err();
        assert!(
            matches!(&err.refusals[..], [Refusal::NameTaken { cluster, .. }] if cluster == "cluster-a"),
            "{err}"
        );
        assert!(err.to_string().contains("https://10.9.9.9:6443"), "{err}");
    }

    #[test]
    fn a_linked_server_under_another_name_is_refused() {
        let a = side(
            "cluster-a",
            &["10.1.0.0/16"],
            &[peer_at("old-b", &url("cluster-b"), &["10.5.0.0/16"])],
        );
        let b = side("cluster-b", &["10.2.0.0/16"], &[]);
        let err = check_join(&a, &b).unwrap_err();
        assert!(
            matches!(&err.refusals[..], [Refusal::ServerTaken { linked_name, .. }] if linked_name == "old-b"),
            "{err}"
        );
    }

    #[test]
    fn a_link_being_deleted_is_refused() {
        let mut existing = peer("cluster-b", &["10.2.0.0/16"]);
        existing.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let a = side("cluster-a", &["10.1.0.0/16"], &[existing]);
        let b = side("cluster-b", &["10.2.0.0/16"], &[]);
        let err = check_join(&a, &b).unwrap_err();
        assert!(
            matches!(&err.refusals[..], [Refusal::BeingDeleted { .. }]),
            "{err}"
        );
    }

    #[test]
    fn every_reason_is_listed() {
        let a = side(
            "cluster-a",
            &["10.1.0.0/16"],
            &[peer("cluster-b", &["10.2.0.0/16"])],
        );
        let c = side("cluster-c", &["10.0.0.0/8"], &[]);
        let err = check_join(&a, &c).unwrap_err();
        assert_eq!(err.refusals.len(), 2, "{err}");
        assert_eq!(err.to_string().lines().count(), 3, "{err}");
    }

    #[test]
    fn a_grant_may_not_cover_what_the_granting_cluster_holds() {
        let mut a = side("cluster-a", &["10.1.0.0/16"], &[]);
        a.info.service_cidrs = vec![cidr("10.96.0.0/12")];
        a.info.host_cidrs = vec![cidr("10.250.0.0/16")];
        a.node_addresses = vec![("a1".into(), ip("198.18.1.1"))];
        a.api_servers = vec![ip("198.18.1.10")];
        let mut b = side("cluster-b", &["10.2.0.0/16", "10.96.0.0/16"], &[]);
        b.info.host_cidrs = vec![cidr("198.18.1.0/24"), cidr("10.250.7.0/24")];
        let err = check_join(&a, &b).unwrap_err();
        let text = err.to_string();
        let expected = [
            "cluster-b's pod CIDR 10.96.0.0/16 overlaps its service CIDR 10.96.0.0/12 in cluster-a",
            "cluster-b's host range 198.18.1.0/24 overlaps the address 198.18.1.1 of its Node a1 in cluster-a",
            "cluster-b's host range 198.18.1.0/24 overlaps its API server's address 198.18.1.10 in cluster-a",
            "cluster-b's host range 10.250.7.0/24 overlaps its host range 10.250.0.0/16 in cluster-a",
            // Both ways: cluster-a's own host range in cluster-b.
            "cluster-a's host range 10.250.0.0/16 overlaps its host range 10.250.7.0/24 in cluster-b",
        ];
        for line in expected {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(err.refusals.len(), expected.len(), "{text}");
        // The same holds the other way: cluster-a's grants in cluster-b.
        let mut b = side("cluster-b", &["10.2.0.0/16"], &[]);
        b.node_addresses = vec![("b1".into(), ip("10.1.200.7"))];
        let err = check_join(&side("cluster-a", &["10.1.0.0/16"], &[]), &b).unwrap_err();
        assert!(
            err.to_string().contains(
                "cluster-a's pod CIDR 10.1.0.0/16 overlaps the address 10.1.200.7 of its Node b1 in cluster-b"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_host_range_may_not_overlap_another_link() {
        let mut linked = peer("cluster-c", &["10.3.0.0/16"]);
        linked.spec.allowed_host_cidrs = vec!["10.251.0.0/16".into()];
        let a = side("cluster-a", &["10.1.0.0/16"], &[linked]);
        let mut b = side("cluster-b", &["10.2.0.0/16"], &[]);
        b.info.host_cidrs = vec![cidr("10.251.3.0/24"), cidr("10.3.9.0/24")];
        let text = check_join(&a, &b).unwrap_err().to_string();
        assert!(
            text.contains("cluster-b's host range 10.251.3.0/24 overlaps the host range 10.251.0.0/16 it granted linked cluster cluster-c in cluster-a"),
            "{text}"
        );
        assert!(
            text.contains("cluster-b's host range 10.3.9.0/24 overlaps the pod CIDR 10.3.0.0/16 of linked cluster cluster-c in cluster-a"),
            "{text}"
        );
    }

    #[test]
    fn huge_ranges_are_never_granted() {
        let a = side("cluster-a", &["10.1.0.0/16"], &[]);
        let mut b = side(
            "cluster-b",
            &["128.0.0.0/1", "fd00::/8", "10.2.0.0/16"],
            &[],
        );
        b.info.host_cidrs = vec![cidr("0.0.0.0/0")];
        let err = check_join(&a, &b).unwrap_err();
        let text = err.to_string();
        for line in [
            "cluster-b's pod CIDR 128.0.0.0/1 is wider than /8",
            "cluster-b's pod CIDR fd00::/8 is wider than /32",
            "cluster-b's host range 0.0.0.0/0 is wider than /8",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // The widest allowed pass.
        let b = side("cluster-b", &["11.0.0.0/8", "fd02::/32"], &[]);
        assert_eq!(check_join(&a, &b), Ok(()));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    fn url(name: &str) -> String {
        format!("https://{name}.example:6443")
    }

    fn side(name: &str, cidrs: &[&str], peers: &[PeerCluster]) -> JoinSide {
        JoinSide {
            context: name.to_owned(),
            info: ClusterInfo {
                name: name.to_owned(),
                pod_cidrs: cidrs.iter().map(|c| cidr(c)).collect(),
                ..ClusterInfo::default()
            },
            api_server: url(name),
            peers: peers.to_vec(),
            ..JoinSide::default()
        }
    }

    fn peer(name: &str, cidrs: &[&str]) -> PeerCluster {
        peer_at(name, &url(name), cidrs)
    }

    fn peer_at(name: &str, server: &str, cidrs: &[&str]) -> PeerCluster {
        PeerCluster::new(
            name,
            PeerClusterSpec {
                cluster_name: name.to_owned(),
                api_server: server.to_owned(),
                ca_data: None,
                credentials_secret: format!("peer-{name}"),
                allowed_pod_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
                mesh_cidrs: Vec::new(),
                allowed_host_cidrs: Vec::new(),
            },
        )
    }
}
