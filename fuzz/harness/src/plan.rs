//! The controller's plan (`controller::plan::plan`) with remote `MeshNode`s built from the
//! input: names, keys, endpoints, pod CIDRs and observed endpoints that are valid, nearly
//! valid or garbage, Kubernetes nodes and hosts.
//!
//! Checks that the plan is deterministic; that a mirrored Kubernetes node's CIDRs lie
//! inside what its cluster was allowed and none overlaps this cluster's own; and that a
//! plan, once applied, plans nothing more.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};
use wiremesh_controller::plan::{
    Local, OtherPeer, Plan, allowed_host_cidrs, mesh_view, plan as plan_of,
};
use wiremesh_proto::crd::{
    MeshNode, MeshNodeKind, MeshNodeSpec, MeshNodeStatus, MeshPeer, PEER_CLUSTER_LABEL,
    PeerCluster, PeerClusterSpec, TunnelStatus,
};
use wiremesh_proto::{IpCidr, PublicKey};

/// This cluster's pod CIDRs.
const LOCAL: [&str; 2] = ["10.1.0.0/16", "fd10:1::/48"];
/// CIDRs the inputs pick from: the peer's range, inside it, ours, another peer's, wider.
const CIDRS: [&str; 9] = [
    "10.2.0.0/16",
    "10.2.1.0/24",
    "10.2.1.7/32",
    "fd10:2::/48",
    "fd10:2:0:1::/64",
    "10.1.3.0/24",
    "10.3.0.0/16",
    "10.0.0.0/8",
    "0.0.0.0/0",
];
const ENDPOINTS: [&str; 3] = ["198.18.0.2:51820", "[fd00::2]:51820", "198.18.0.3:1"];
const NODES: usize = 8;

/// Runs one input; see the module documentation.
pub fn plan(data: &[u8]) {
    let _ = run(&mut Unstructured::new(data));
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let allowed = (0..u.int_in_range(0..=3)?)
        .map(|_| cidr_text(u))
        .collect::<Result<Vec<_>>>()?;
    let allowed_hosts = (0..u.int_in_range(0..=2)?)
        .map(|_| cidr_text(u))
        .collect::<Result<Vec<_>>>()?;
    let mut peer = PeerCluster::new(
        "peer-b",
        PeerClusterSpec {
            cluster_name: "cluster-b".into(),
            api_server: "https://127.0.0.1:6443".into(),
            ca_data: None,
            credentials_secret: "peer-b-credentials".into(),
            allowed_pod_cidrs: allowed,
            mesh_cidrs: Vec::new(),
            allowed_host_cidrs: allowed_hosts,
        },
    );
    let local_cidrs: Vec<IpCidr> = LOCAL.iter().filter_map(|c| c.parse().ok()).collect();
    let local_nodes = (0..u.int_in_range(0..=2)?)
        .map(|i| node(u, &format!("local-{i}")))
        .collect::<Result<Vec<_>>>()?;
    let local = Local::new("cluster-a", &local_cidrs, &local_nodes);
    let other = PeerCluster::new(
        "peer-c",
        PeerClusterSpec {
            cluster_name: "cluster-c".into(),
            api_server: "https://127.0.0.1:6444".into(),
            ca_data: None,
            credentials_secret: "peer-c-credentials".into(),
            allowed_pod_cidrs: vec!["10.3.0.0/16".into()],
            mesh_cidrs: Vec::new(),
            allowed_host_cidrs: Vec::new(),
        },
    );
    let others = [OtherPeer::new(&other, [])];
    let mut remote = Vec::new();
    for _ in 0..u.int_in_range(0..=NODES)? {
        let name = match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary::<String>()?,
            n => format!("node-{n}"),
        };
        remote.push(node(u, &name)?);
    }
    // Translated or not, pairing with `allowed` or not (drawn last: the corpus from before
    // translation decodes as it did).
    peer.spec.mesh_cidrs = (0..u.int_in_range(0..=3)?)
        .map(|_| cidr_text(u))
        .collect::<Result<Vec<_>>>()?;

    let first = plan_of(&peer, &remote, &local, &others, &[]);
    assert_eq!(
        first,
        plan_of(&peer, &remote, &local, &others, &[]),
        "not deterministic"
    );
    check_claims(&peer, &remote, &local_cidrs, &first);
    let existing = applied(&first);
    let again = plan_of(&peer, &remote, &local, &others, &existing);
    assert!(
        again.apply.is_empty() && again.delete.is_empty(),
        "an applied plan plans more: {again:?}"
    );
    assert_eq!(again.mirrored, first.mirrored);
    Ok(())
}

/// What a mirrored node claims stays inside what its cluster was allowed, as the mesh
/// knows it (its mesh CIDRs when translated; hosts' single addresses: inside its granted
/// host range), off this cluster's own CIDRs and off
/// loopback and link-local addresses.
fn check_claims(peer: &PeerCluster, remote: &[MeshNode], local: &[IpCidr], plan: &Plan) {
    let allowed = mesh_view(peer);
    let host_allowed = allowed_host_cidrs(peer);
    let reserved: Vec<IpCidr> = ["127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10"]
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    for desired in &plan.apply {
        let host = remote.iter().any(|n| {
            n.spec.kind == MeshNodeKind::Host
                && n.metadata.name.as_deref() == Some(desired.spec.node.as_str())
        });
        for text in &desired.spec.pod_cidrs {
            let cidr: IpCidr = text.parse().unwrap_or_else(|e| {
                panic!("{}: pod CIDR {text:?} does not parse: {e}", desired.name)
            });
            let single = cidr.prefix_len() == if cidr.addr().is_ipv4() { 32 } else { 128 };
            assert!(
                allowed.iter().any(|a| a.covers(&cidr))
                    || (host && single && host_allowed.iter().any(|a| a.covers(&cidr))),
                "{}: {cidr} outside {allowed:?} and host range {host_allowed:?}",
                desired.name
            );
            assert!(
                !reserved.iter().any(|r| r.overlaps(&cidr)),
                "{}: {cidr} is reserved",
                desired.name
            );
            assert!(
                !local.iter().any(|l| l.overlaps(&cidr)),
                "{}: {cidr} overlaps this cluster's own",
                desired.name
            );
        }
    }
}

/// The `MeshPeer`s as the controller applies them.
fn applied(plan: &Plan) -> Vec<MeshPeer> {
    plan.apply
        .iter()
        .map(|d| {
            let mut mp = MeshPeer::new(&d.name, d.spec.clone());
            mp.metadata.labels = Some(BTreeMap::from([(
                PEER_CLUSTER_LABEL.to_owned(),
                "peer-b".to_owned(),
            )]));
            mp
        })
        .collect()
}

fn node(u: &mut Unstructured<'_>, name: &str) -> Result<MeshNode> {
    let public_key = match u.int_in_range(0..=3u8)? {
        0 => String::new(),
        1 => u.arbitrary()?,
        _ => PublicKey::from([u.int_in_range(1..=4u8)?; 32]).to_base64(),
    };
    let endpoints = (0..u.int_in_range(0..=3)?)
        .map(|_| endpoint_text(u))
        .collect::<Result<Vec<_>>>()?;
    let pod_cidrs = (0..u.int_in_range(0..=3)?)
        .map(|_| cidr_text(u))
        .collect::<Result<Vec<_>>>()?;
    let kind = if u.arbitrary()? {
        MeshNodeKind::Host
    } else {
        MeshNodeKind::Node
    };
    let mut node = MeshNode::new(
        name,
        MeshNodeSpec {
            public_key,
            endpoints,
            pod_cidrs,
            location: None,
            kind,
            gateway: u.arbitrary()?,
            relay: u.arbitrary()?,
            heartbeat: u.arbitrary()?,
        },
    );
    if u.arbitrary()? {
        let peers = (0..u.int_in_range(0..=3)?)
            .map(|_| {
                Ok(TunnelStatus {
                    name: format!("cluster-a.local-{}", u.int_in_range(0..=1u8)?),
                    observed_endpoint: Some(endpoint_text(u)?),
                    ..TunnelStatus::default()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        node.status = Some(MeshNodeStatus {
            peers,
            ..MeshNodeStatus::default()
        });
    }
    Ok(node)
}

/// A CIDR from the table, one made of any address and length (host bits, lengths past
/// the family's), or any text.
fn cidr_text(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => u.choose(&CIDRS)?.to_string(),
        1 => format!(
            "{}/{}",
            Ipv4Addr::from(u.arbitrary::<u32>()?),
            u.int_in_range(0..=40u8)?
        ),
        2 => format!(
            "{}/{}",
            Ipv6Addr::from(u.arbitrary::<u128>()?),
            u.int_in_range(0..=140u8)?
        ),
        _ => u.arbitrary()?,
    })
}

fn endpoint_text(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => u.choose(&ENDPOINTS)?.to_string(),
        1 => format!(
            "{}:{}",
            IpAddr::from(u.arbitrary::<[u8; 4]>()?),
            u.arbitrary::<u16>()?
        ),
        _ => u.arbitrary()?,
    })
}
