//! `meshctl host add`, `host config` and `host remove`: machines outside Kubernetes.
//!
//! A host is a `MeshNode` of kind `Host` whose pod CIDRs are its addresses. `host add`
//! checks first and writes nothing on a failed check, then creates (server-side apply,
//! field manager `meshctl`), all labelled `wiremesh.io/host=<name>`:
//! - the MeshNode, with the public key when `--public-key` is given (a stock WireGuard
//!   host), else with none until `wiremesh-agent host` publishes the one it generates;
//! - ServiceAccount `wiremesh-system/wiremesh-host-<name>`;
//! - ClusterRole and ClusterRoleBinding `wiremesh-host-<name>`: get, list and watch
//!   MeshNodes and MeshPeers; patch and update only MeshNode `<name>` and its status;
//! - Role and RoleBinding `wiremesh-system/wiremesh-host-<name>`: get only the cluster
//!   ConfigMap (so the host agent can tell it reached the right cluster);
//! - a token (TokenRequest API, valid
//!   [`TOKEN_EXPIRATION`](super::common::TOKEN_EXPIRATION)) in a bundle file (mode 0600).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use kube::ResourceExt as _;
use kube::api::Api;
use wiremesh_proto::crd::{
    CLUSTER_CONFIGMAP, GROUP, HOST_LABEL, HostBundle, MeshNode, MeshNodeKind, MeshNodeSpec,
    MeshPeer, PeerCluster, SYSTEM_NAMESPACE, host_account_name,
};
use wiremesh_proto::{IpCidr, PublicKey};

use super::common::{apply, cluster_info, delete, list, meta, mint_token, say};
use super::kubeconfig::{self, KubeArgs};
use crate::install::ClusterInfo;

/// Persistent keepalive `host config` puts on every peer: a host is often behind NAT.
const KEEPALIVE: u16 = 25;

/// What `meshctl host add` was asked.
#[derive(Debug, Clone)]
pub struct AddRequest {
    /// The host's name (its MeshNode's).
    pub name: String,
    /// Its address in the mesh: a single address.
    pub address: IpCidr,
    /// Where it receives WireGuard traffic, if it has a reachable address.
    pub endpoint: Option<SocketAddr>,
    /// Its public key, for a host that runs stock WireGuard.
    pub public_key: Option<PublicKey>,
    /// It relays for peers that cannot reach each other directly.
    pub relay: bool,
}

/// One reason not to add a host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    /// The name is not a DNS label.
    #[error("host name {0:?} is not a DNS label (lowercase letters, digits and '-', at most 63)")]
    BadName(String),
    /// A MeshNode of that name exists.
    #[error("a MeshNode {name:?} already exists ({kind}); run `meshctl host remove {name}` first")]
    Exists {
        /// The name.
        name: String,
        /// A node or a host.
        kind: &'static str,
    },
    /// The address is a network, not one address.
    #[error("address {0} is a network: a host has single addresses (/32 or /128)")]
    NotSingle(IpCidr),
    /// The address lies in the cluster's pod range.
    #[error("address {address} is inside pod CIDR {cidr} of cluster {cluster}")]
    InPodRange {
        /// The address.
        address: IpCidr,
        /// The cluster's pod CIDR.
        cidr: IpCidr,
        /// The cluster.
        cluster: String,
    },
    /// The address overlaps what a MeshNode (host or node) of this cluster claims.
    #[error("address {address} overlaps {cidr} of {kind} {node}")]
    Taken {
        /// The address.
        address: IpCidr,
        /// The other claim.
        cidr: IpCidr,
        /// "host" or "node".
        kind: &'static str,
        /// Its MeshNode.
        node: String,
    },
    /// A relay must be reachable by everyone.
    #[error("a relay needs --endpoint: peers behind NAT must be able to reach it")]
    RelayWithoutEndpoint,
    /// The address overlaps a linked cluster's pod CIDRs or one of its nodes or hosts.
    #[error("address {address} overlaps {cidr} of {owner} of linked cluster {cluster}")]
    Linked {
        /// The address.
        address: IpCidr,
        /// The other claim.
        cidr: IpCidr,
        /// "the pod range" or "node X".
        owner: String,
        /// The linked cluster.
        cluster: String,
    },
}

/// Every reason `host add` was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct HostRefusals {
    /// The host.
    pub host: String,
    /// The cluster.
    pub cluster: String,
    /// The reasons, at least one.
    pub refusals: Vec<HostRefusal>,
}

impl fmt::Display for HostRefusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing to add host {} to {}; nothing was written:",
            self.host, self.cluster
        )?;
        for refusal in &self.refusals {
            write!(f, "\n  - {refusal}")?;
        }
        Ok(())
    }
}

/// Decides whether the host may be added: a DNS-label name no MeshNode has, a single
/// address outside the cluster's pod range and disjoint from every MeshNode's claims, every
/// linked cluster's allowed pod CIDRs and every MeshPeer's.
///
/// # Errors
/// Every reason, in one [`HostRefusals`].
pub fn check_add(
    request: &AddRequest,
    cluster: &ClusterInfo,
    nodes: &[MeshNode],
    peers: &[PeerCluster],
    mesh_peers: &[MeshPeer],
) -> Result<(), HostRefusals> {
    let mut refusals = Vec::new();
    let name = &request.name;
    if crate::install::check_cluster_name(name).is_err() {
        refusals.push(HostRefusal::BadName(name.clone()));
    }
    let address = request.address;
    let single = if address.addr().is_ipv4() { 32 } else { 128 };
    if address.prefix_len() != single {
        refusals.push(HostRefusal::NotSingle(address));
    }
    if request.relay && request.endpoint.is_none() {
        refusals.push(HostRefusal::RelayWithoutEndpoint);
    }
    for cidr in cluster.pod_cidrs.iter().filter(|c| c.overlaps(&address)) {
        refusals.push(HostRefusal::InPodRange {
            address,
            cidr: *cidr,
            cluster: cluster.name.clone(),
        });
    }
    for node in nodes {
        let kind = match node.spec.kind {
            MeshNodeKind::Host => "host",
            MeshNodeKind::Node => "node",
        };
        if node.name_any() == *name {
            refusals.push(HostRefusal::Exists {
                name: name.clone(),
                kind,
            });
        }
        for cidr in parsed(&node.spec.pod_cidrs).filter(|c| c.overlaps(&address)) {
            refusals.push(HostRefusal::Taken {
                address,
                cidr,
                kind,
                node: node.name_any(),
            });
        }
    }
    for peer in peers {
        for cidr in parsed(&peer.spec.allowed_pod_cidrs).filter(|c| c.overlaps(&address)) {
            refusals.push(HostRefusal::Linked {
                address,
                cidr,
                owner: "the pod range".to_owned(),
                cluster: peer.spec.cluster_name.clone(),
            });
        }
    }
    for mp in mesh_peers {
        for cidr in parsed(&mp.spec.pod_cidrs).filter(|c| c.overlaps(&address)) {
            refusals.push(HostRefusal::Linked {
                address,
                cidr,
                owner: format!("node {}", mp.spec.node),
                cluster: mp.spec.cluster.clone(),
            });
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(HostRefusals {
            host: name.clone(),
            cluster: cluster.name.clone(),
            refusals,
        })
    }
}

/// `meshctl host add`.
pub(crate) async fn add(args: &KubeArgs, request: &AddRequest, bundle: &Path) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let info = cluster_info(&target).await?;
    let cluster = info.name.clone();
    let client = &target.client;
    let nodes = list::<MeshNode>(&target, "MeshNodes").await?;
    let peers = list::<PeerCluster>(&target, "PeerClusters").await?;
    let mesh_peers = list::<MeshPeer>(&target, "MeshPeers").await?;
    check_add(request, &info, &nodes, &peers, &mesh_peers)?;
    // The bundle file is created before anything in the cluster, so an unwritable path
    // leaves nothing behind either.
    let mut file = create_private(bundle)?;
    say(format!(
        "checks passed: {} is a free address outside {cluster}'s pod CIDRs and every linked cluster's",
        request.address
    ));

    let name = &request.name;
    let account = host_account_name(name);
    let written = async {
        apply(
            &Api::<MeshNode>::all(client.clone()),
            &host_mesh_node(request),
            &cluster,
            &format!("MeshNode {name} (host)"),
        )
        .await?;
        apply(
            &Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE),
            &host_service_account(name),
            &cluster,
            &format!("ServiceAccount {SYSTEM_NAMESPACE}/{account}"),
        )
        .await?;
        apply(
            &Api::<ClusterRole>::all(client.clone()),
            &host_role(name),
            &cluster,
            &format!("ClusterRole {account}"),
        )
        .await?;
        apply(
            &Api::<ClusterRoleBinding>::all(client.clone()),
            &host_binding(name),
            &cluster,
            &format!("ClusterRoleBinding {account}"),
        )
        .await?;
        apply(
            &Api::<Role>::namespaced(client.clone(), SYSTEM_NAMESPACE),
            &host_configmap_role(name),
            &cluster,
            &format!("Role {SYSTEM_NAMESPACE}/{account}"),
        )
        .await?;
        apply(
            &Api::<RoleBinding>::namespaced(client.clone(), SYSTEM_NAMESPACE),
            &host_configmap_binding(name),
            &cluster,
            &format!("RoleBinding {SYSTEM_NAMESPACE}/{account}"),
        )
        .await?;
        mint_token(client, &cluster, &account).await
    }
    .await;
    let token = match written {
        Ok(token) => token,
        Err(e) => {
            let _ = std::fs::remove_file(bundle);
            return Err(e.context(format!(
                "adding host {name} failed half-way; `meshctl host remove {name}` removes what was written"
            )));
        }
    };
    let contents = HostBundle {
        api_server: target.server.clone(),
        ca_data: target.ca_data.clone(),
        token,
        cluster_name: cluster.clone(),
        host_name: name.clone(),
    };
    let json = serde_json::to_vec_pretty(&contents).context("encoding the bundle")?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the bundle {}", bundle.display()))?;
    say(format!(
        "bundle written to {} (mode 0600; it holds a credential): on the host run `wiremesh-agent host --bundle {}`",
        bundle.display(),
        bundle.display()
    ));
    if request.public_key.is_some() {
        say(format!(
            "stock WireGuard: `meshctl host config {name}` prints the wg-quick config"
        ));
    }
    Ok(())
}

/// `meshctl host config NAME`: prints a wg-quick config for the host.
pub(crate) async fn config(args: &KubeArgs, name: &str) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let nodes = list::<MeshNode>(&target, "MeshNodes").await?;
    let mesh_peers = list::<MeshPeer>(&target, "MeshPeers").await?;
    let text = wg_quick_config(name, &nodes, &mesh_peers)?;
    say(text.trim_end());
    Ok(())
}

/// `meshctl host remove NAME`: the MeshNode, ServiceAccount and RBAC; "not found" is done.
pub(crate) async fn remove(args: &KubeArgs, name: &str) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let info = cluster_info(&target).await?;
    let cluster = &info.name;
    let client = &target.client;
    let nodes = Api::<MeshNode>::all(client.clone());
    if let Some(node) = nodes
        .get_opt(name)
        .await
        .with_context(|| format!("{cluster}: reading MeshNode {name}"))?
        && node.spec.kind != MeshNodeKind::Host
    {
        anyhow::bail!("MeshNode {name} of {cluster} is a Kubernetes node, not a host; not removed");
    }
    let account = host_account_name(name);
    delete(&nodes, name, cluster, &format!("MeshNode {name}")).await?;
    delete(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        &account,
        cluster,
        &format!("ClusterRoleBinding {account}"),
    )
    .await?;
    delete(
        &Api::<ClusterRole>::all(client.clone()),
        &account,
        cluster,
        &format!("ClusterRole {account}"),
    )
    .await?;
    delete(
        &Api::<RoleBinding>::namespaced(client.clone(), SYSTEM_NAMESPACE),
        &account,
        cluster,
        &format!("RoleBinding {SYSTEM_NAMESPACE}/{account}"),
    )
    .await?;
    delete(
        &Api::<Role>::namespaced(client.clone(), SYSTEM_NAMESPACE),
        &account,
        cluster,
        &format!("Role {SYSTEM_NAMESPACE}/{account}"),
    )
    .await?;
    delete(
        &Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE),
        &account,
        cluster,
        &format!("ServiceAccount {SYSTEM_NAMESPACE}/{account}"),
    )
    .await?;
    say(format!(
        "host {name} removed from {cluster}; every node drops its tunnel"
    ));
    Ok(())
}

/// The wg-quick config of host `name`: its address, and a peer for every node and other
/// host of this cluster and every MeshPeer that has a key, routed to their pod CIDRs.
///
/// # Errors
/// When there is no such host.
pub fn wg_quick_config(name: &str, nodes: &[MeshNode], mesh_peers: &[MeshPeer]) -> Result<String> {
    let host = nodes.iter().find(|n| n.name_any() == name).ok_or_else(|| {
        anyhow!("no MeshNode {name:?} in this cluster (meshctl host add registers one)")
    })?;
    if host.spec.kind != MeshNodeKind::Host {
        anyhow::bail!("MeshNode {name} is a Kubernetes node, not a host");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# wg-quick config for host {name}; run `meshctl host config {name}` again when nodes change."
    );
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(
        out,
        "# PrivateKey = <this host's private key; it never leaves the host>"
    );
    let _ = writeln!(out, "Address = {}", host.spec.pod_cidrs.join(", "));
    if let Some(port) = host
        .spec
        .endpoints
        .first()
        .and_then(|e| e.parse::<SocketAddr>().ok())
    {
        let _ = writeln!(out, "ListenPort = {}", port.port());
    }
    // Sorted by who they are, for a stable output.
    let mut peers: BTreeMap<String, (&str, &[String], &[String])> = BTreeMap::new();
    for node in nodes
        .iter()
        .filter(|n| n.name_any() != name && n.spec.has_key())
    {
        peers.insert(
            format!("0 {}", node.name_any()),
            (
                &node.spec.public_key,
                &node.spec.endpoints,
                &node.spec.pod_cidrs,
            ),
        );
    }
    for mp in mesh_peers {
        peers.insert(
            format!("1 {}/{}", mp.spec.cluster, mp.spec.node),
            (&mp.spec.public_key, &mp.spec.endpoints, &mp.spec.pod_cidrs),
        );
    }
    for (who, (key, endpoints, cidrs)) in peers {
        let (_, who) = who.split_at(2);
        let _ = writeln!(out, "\n[Peer]\n# {who}\nPublicKey = {key}");
        if let Some(endpoint) = endpoints.first() {
            let _ = writeln!(out, "Endpoint = {endpoint}");
        }
        if !cidrs.is_empty() {
            let _ = writeln!(out, "AllowedIPs = {}", cidrs.join(", "));
        }
        let _ = writeln!(out, "PersistentKeepalive = {KEEPALIVE}");
    }
    Ok(out)
}

fn parsed(cidrs: &[String]) -> impl Iterator<Item = IpCidr> + '_ {
    cidrs.iter().filter_map(|c| c.parse().ok())
}

/// Creates `path` for writing, mode 0600; refuses to overwrite an existing file.
fn create_private(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the bundle file {}", path.display()))
}

/// The host's MeshNode: its address as its only pod CIDR.
pub fn host_mesh_node(request: &AddRequest) -> MeshNode {
    let mut node = MeshNode::new(
        &request.name,
        MeshNodeSpec {
            public_key: request
                .public_key
                .map(|k| k.to_base64())
                .unwrap_or_default(),
            endpoints: request.endpoint.iter().map(ToString::to_string).collect(),
            pod_cidrs: vec![request.address.to_string()],
            location: None,
            kind: MeshNodeKind::Host,
            gateway: false,
            relay: request.relay,
            heartbeat: false,
        },
    );
    node.metadata.labels = meta(&request.name, None, Some((HOST_LABEL, &request.name))).labels;
    node
}

/// The host's ServiceAccount.
pub fn host_service_account(host: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(
            &host_account_name(host),
            Some(SYSTEM_NAMESPACE),
            Some((HOST_LABEL, host)),
        ),
        ..ServiceAccount::default()
    }
}

/// What the host may do cluster-wide: read MeshNodes and MeshPeers, and write only its own
/// MeshNode and its status.
pub fn host_role(host: &str) -> ClusterRole {
    let rule = |resources: &[&str], verbs: &[&str], names: Option<&str>| PolicyRule {
        api_groups: Some(vec![GROUP.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        resource_names: names.map(|n| vec![n.to_owned()]),
        ..PolicyRule::default()
    };
    ClusterRole {
        metadata: meta(&host_account_name(host), None, Some((HOST_LABEL, host))),
        rules: Some(vec![
            rule(&["meshnodes", "meshpeers"], &["get", "list", "watch"], None),
            rule(
                &["meshnodes", "meshnodes/status"],
                &["get", "patch", "update"],
                Some(host),
            ),
        ]),
        ..ClusterRole::default()
    }
}

fn subject(host: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: host_account_name(host),
        namespace: Some(SYSTEM_NAMESPACE.to_owned()),
        ..Subject::default()
    }
}

/// The binding of [`host_service_account`] to [`host_role`].
pub fn host_binding(host: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(&host_account_name(host), None, Some((HOST_LABEL, host))),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: host_account_name(host),
        },
        subjects: Some(vec![subject(host)]),
    }
}

/// Get on the cluster ConfigMap only.
pub fn host_configmap_role(host: &str) -> Role {
    Role {
        metadata: meta(
            &host_account_name(host),
            Some(SYSTEM_NAMESPACE),
            Some((HOST_LABEL, host)),
        ),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_owned()]),
            verbs: vec!["get".to_owned()],
            resource_names: Some(vec![CLUSTER_CONFIGMAP.to_owned()]),
            ..PolicyRule::default()
        }]),
    }
}

/// The binding of [`host_service_account`] to [`host_configmap_role`].
pub fn host_configmap_binding(host: &str) -> RoleBinding {
    RoleBinding {
        metadata: meta(
            &host_account_name(host),
            Some(SYSTEM_NAMESPACE),
            Some((HOST_LABEL, host)),
        ),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: host_account_name(host),
        },
        subjects: Some(vec![subject(host)]),
    }
}

#[cfg(test)]
mod tests {
    use wiremesh_proto::crd::{MeshPeerSpec, PeerClusterSpec};

    use super::*;

    fn cidr(text: &str) -> IpCidr {
        text.parse().unwrap()
    }

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: vec![cidr("10.1.0.0/16")],
            ..ClusterInfo::default()
        }
    }

    fn request(name: &str, address: &str) -> AddRequest {
        AddRequest {
            name: name.into(),
            address: cidr(address),
            endpoint: None,
            public_key: None,
            relay: false,
        }
    }

    fn node(name: &str, kind: MeshNodeKind, cidr: &str, key: u8) -> MeshNode {
        let endpoint = format!("198.18.1.{key}:51820");
        let mut node = crate::testing::mesh_node(name, key, Some(&endpoint), &[cidr]);
        node.spec.kind = kind;
        node
    }

    fn mesh_peer(cluster: &str, node: &str, cidr: &str, key: u8) -> MeshPeer {
        MeshPeer::new(
            &format!("{cluster}.{node}"),
            MeshPeerSpec {
                cluster: cluster.into(),
                node: node.into(),
                public_key: PublicKey::from([key; 32]).to_base64(),
                endpoints: vec![format!("198.18.2.{key}:51820")],
                pod_cidrs: vec![cidr.into()],
                location: None,
                kind: MeshNodeKind::Node,
                gateway: false,
                relay: false,
                heartbeat: false,
            },
        )
    }

    fn refusals(
        request: &AddRequest,
        nodes: &[MeshNode],
        peers: &[PeerCluster],
        mesh_peers: &[MeshPeer],
    ) -> Vec<String> {
        match check_add(request, &cluster(), nodes, peers, mesh_peers) {
            Ok(()) => Vec::new(),
            Err(e) => e.refusals.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_free_single_address_is_accepted() {
        let nodes = [node("a1", MeshNodeKind::Node, "10.1.1.0/24", 1)];
        assert!(refusals(&request("db-1", "10.250.0.5/32"), &nodes, &[], &[]).is_empty());
    }

    #[test]
    fn an_address_inside_the_pod_range_is_refused_naming_the_range() {
        let found = refusals(&request("db-1", "10.1.7.5/32"), &[], &[], &[]);
        assert_eq!(
            found,
            ["address 10.1.7.5/32 is inside pod CIDR 10.1.0.0/16 of cluster cluster-a"]
        );
    }

    #[test]
    fn another_hosts_address_or_name_is_refused_naming_the_host() {
        let nodes = [node("db-1", MeshNodeKind::Host, "10.250.0.5/32", 0)];
        let found = refusals(&request("db-2", "10.250.0.5/32"), &nodes, &[], &[]);
        assert_eq!(
            found,
            ["address 10.250.0.5/32 overlaps 10.250.0.5/32 of host db-1"]
        );
        let found = refusals(&request("db-1", "10.250.0.6/32"), &nodes, &[], &[]);
        assert!(found[0].contains("already exists (host)"), "{found:?}");
    }

    #[test]
    fn linked_clusters_ranges_and_nodes_are_refused() {
        let mut pc = PeerCluster::new(
            "cluster-b",
            PeerClusterSpec {
                cluster_name: "cluster-b".into(),
                api_server: "https://127.0.0.1:1".into(),
                ca_data: None,
                credentials_secret: "peer-cluster-b".into(),
                allowed_pod_cidrs: vec!["10.2.0.0/16".into()],
                mesh_cidrs: Vec::new(),
                allowed_host_cidrs: Vec::new(),
            },
        );
        pc.metadata.uid = Some("u".into());
        let found = refusals(&request("db-1", "10.2.0.9/32"), &[], &[pc], &[]);
        assert!(found[0].contains("linked cluster cluster-b"), "{found:?}");
        let mp = mesh_peer("cluster-b", "h9", "10.250.0.5/32", 9);
        let found = refusals(&request("db-1", "10.250.0.5/32"), &[], &[], &[mp]);
        assert!(
            found[0].contains("node h9 of linked cluster cluster-b"),
            "{found:?}"
        );
    }

    #[test]
    fn a_network_and_a_bad_name_are_refused() {
        let found = refusals(&request("DB_1", "10.250.0.0/24"), &[], &[], &[]);
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn the_role_writes_only_the_hosts_own_mesh_node() {
        let role = host_role("db-1");
        let rules = role.rules.unwrap();
        for rule in &rules {
            let writes = rule
                .verbs
                .iter()
                .any(|v| v != "get" && v != "list" && v != "watch");
            if writes {
                assert_eq!(
                    rule.resource_names.as_deref(),
                    Some(&["db-1".to_owned()][..])
                );
                assert!(!rule.verbs.iter().any(|v| v == "create" || v == "delete"));
            }
        }
    }

    #[test]
    fn the_config_lists_every_keyed_peer_but_the_host_itself() {
        let nodes = [
            node("db-1", MeshNodeKind::Host, "10.250.0.5/32", 5),
            node("a1", MeshNodeKind::Node, "10.1.1.0/24", 1),
            node("db-2", MeshNodeKind::Host, "10.250.0.6/32", 0),
        ];
        let peers = [mesh_peer("cluster-b", "b1", "10.2.1.0/24", 7)];
        let text = wg_quick_config("db-1", &nodes, &peers).unwrap();
        assert!(text.contains("Address = 10.250.0.5/32"), "{text}");
        assert!(text.contains("ListenPort = 51820"), "{text}");
        assert_eq!(text.matches("[Peer]").count(), 2, "{text}");
        assert!(text.contains("AllowedIPs = 10.1.1.0/24"), "{text}");
        assert!(text.contains("Endpoint = 198.18.2.7:51820"), "{text}");
        assert!(
            text.contains(&PublicKey::from([7; 32]).to_base64()),
            "{text}"
        );
        assert!(wg_quick_config("a1", &nodes, &peers).is_err());
        assert!(wg_quick_config("nope", &nodes, &peers).is_err());
    }
}
