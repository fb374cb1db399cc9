//! `meshctl install`, `join` and `unjoin`: the writes, each printed as a step.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::{
    CLUSTER_CONFIGMAP, GROUP, MeshNode, PEER_CLUSTER_LABEL, PeerCluster, PeerClusterSpec,
    SYSTEM_NAMESPACE,
};

use super::common::{apply, cluster_info, comma_list, delete, meta, mint_token, say};
use super::kubeconfig::{self, KubeArgs, Target};
use super::preflight::{self, JoinSide};
use crate::install::{self, ClusterInfo};
use crate::mcs::crds::CrdAction;

/// The ClusterRole that lets a peer cluster read this cluster's MeshNodes and
/// MeshServiceExports (what it exports, KEP-1645), and nothing else.
pub const PEER_READER_ROLE: &str = "wiremesh-peer-reader";
/// Bound for the first request to each API server.
const REACH_TIMEOUT: Duration = Duration::from_secs(15);

/// The ServiceAccount (in `wiremesh-system`) and ClusterRoleBinding through which cluster
/// `reader` reads this cluster.
pub fn reader_name(reader: &str) -> String {
    format!("wiremesh-peer-{reader}")
}

/// The Secret (in `wiremesh-system`) holding the token for peer cluster `peer`.
pub fn secret_name(peer: &str) -> String {
    format!("peer-{peer}")
}

/// `meshctl install`.
///
/// `components`: `None` for the CRDs, namespace and ConfigMap only; `Some(image)` for
/// deploy/wiremesh.yaml's components too, with `image` if given.
/// `meshctl install`'s DNS options: see [`super::dns`].
#[derive(Debug, Default)]
pub(crate) struct DnsOptions {
    /// `--configure-dns`.
    pub configure: bool,
    /// `--coredns-version`.
    pub version: Option<String>,
}

pub(crate) async fn install(
    args: &KubeArgs,
    info: &ClusterInfo,
    components: Option<Option<&str>>,
    dns_options: &DnsOptions,
) -> Result<()> {
    let (cluster_name, pod_cidrs) = (info.name.as_str(), &info.pod_cidrs);
    install::check_cluster_name(cluster_name)?;
    let objects = components.map(install::components).transpose()?;
    let target = kubeconfig::current_target(args).await?;
    let context = &target.context;
    reachable(&target).await?;
    let dns_plan = super::dns::plan(
        &target,
        dns_options.configure,
        dns_options.version.as_deref(),
    )
    .await?;
    let installed = install::install_cluster(&target.client, info)
        .await
        .with_context(|| {
            format!(
                "installing Wiremesh in context {context} ({})",
                target.server
            )
        })?;
    say(format!(
        "{context}: CustomResourceDefinitions meshnodes, peerclusters, meshpeers, meshserviceexports.{GROUP} applied and Established"
    ));
    let kept = info.mesh_cidrs.is_empty() && !installed.info.mesh_cidrs.is_empty();
    let info = &installed.info;
    for crd in installed.upstream {
        let what = match crd.action {
            CrdAction::Create => "created".to_owned(),
            CrdAction::Upgrade { from, to } => format!("upgraded from {from} to {to}"),
            CrdAction::Keep { reason } => format!("kept: {reason}"),
        };
        say(format!(
            "{context}: CustomResourceDefinition {} {what}",
            crd.name
        ));
    }
    say(format!(
        "{context}: ClusterProperty {} = {cluster_name}",
        wiremesh_proto::mcs::CLUSTER_ID_PROPERTY
    ));
    say(format!("{context}: Namespace {SYSTEM_NAMESPACE} applied"));
    say(format!(
        "{context}: ConfigMap {SYSTEM_NAMESPACE}/{} applied: clusterName={cluster_name} podCIDRs={} hostCIDRs={} serviceCIDRs={} meshCIDRs={}",
        CLUSTER_CONFIGMAP,
        comma_list(pod_cidrs),
        comma_list(&info.host_cidrs),
        comma_list(&info.service_cidrs),
        comma_list(&info.mesh_cidrs),
    ));
    if kept {
        say(format!(
            "{context}: meshCIDRs {} kept (linked clusters reach this cluster's pods at them)",
            comma_list(&info.mesh_cidrs)
        ));
    }
    if let Some(objects) = objects {
        let applied = install::apply_components(&target.client, &objects)
            .await
            .with_context(|| format!("installing Wiremesh's components in context {context}"))?;
        for object in applied {
            say(format!("{context}: {object} applied"));
        }
    }
    super::dns::apply(&target, dns_plan, dns_options.configure).await
}

/// One cluster of a join, read and checked.
struct Side {
    target: Target,
    info: ClusterInfo,
    peers: Vec<PeerCluster>,
    node_addresses: Vec<(String, IpAddr)>,
    api_servers: Vec<IpAddr>,
}

impl Side {
    fn name(&self) -> &str {
        &self.info.name
    }
}

/// `meshctl join OTHER_CONTEXT`; `host_cidrs` is what the other cluster's hosts are
/// granted here: none unless given (the other cluster's own declared range is not
/// trusted). This cluster's hosts are granted there this cluster's own declared range.
/// When the two clusters' pod CIDRs overlap, each that has no mesh CIDRs gets them from
/// `mesh_pools` (written in its cluster ConfigMap, which its agents follow).
pub(crate) async fn join(
    args: &KubeArgs,
    other_context: &str,
    host_cidrs: &[IpCidr],
    mesh_pools: &[IpCidr],
) -> Result<()> {
    let (kubeconfig, context) = kubeconfig::load_with_context(args)?;
    ensure!(
        context != other_context,
        "cannot join context {context} with itself"
    );
    let local = kubeconfig::target(&kubeconfig, &context).await?;
    let remote = kubeconfig::target(&kubeconfig, other_context).await?;

    // Checks first; nothing below writes until they all pass.
    let (a, b) = tokio::join!(reachable(&local), reachable(&remote));
    both(a, b)?;
    let (a, b) = tokio::join!(read_side(local), read_side(remote));
    let (mut local, mut remote) = both(a, b)?;
    let (local_mesh, remote_mesh) =
        preflight::plan_mesh_cidrs(&join_side(&local), &join_side(&remote), mesh_pools).map_err(
            |e| preflight::Refusals {
                local: local.name().to_owned(),
                remote: remote.name().to_owned(),
                refusals: vec![preflight::Refusal::MeshCidrs(e)],
            },
        )?;
    // What goes into each side's own ConfigMap: as read, with the new mesh CIDRs.
    let mut configs = Vec::new();
    for (side, mesh) in [(&mut local, local_mesh), (&mut remote, remote_mesh)] {
        if !mesh.is_empty() {
            side.info.mesh_cidrs = mesh;
            configs.push(side.info.clone());
        }
    }
    remote.info.host_cidrs = host_cidrs.to_vec();
    preflight::check_join(&join_side(&local), &join_side(&remote))?;
    say(format!(
        "checks passed: {} ({}) and {} ({}) are reachable, installed, distinctly named, and what each grants the other \
         leaves alone its own pod, service and host ranges, Node and API server addresses and other links",
        local.name(),
        comma_list(&local.info.pod_cidrs),
        remote.name(),
        comma_list(&remote.info.pod_cidrs)
    ));

    for (reader, target) in [(&local, &remote), (&remote, &local)] {
        let granted = if target.info.host_cidrs.is_empty() {
            "none (no host of it is accepted)".to_owned()
        } else {
            comma_list(&target.info.host_cidrs)
        };
        say(format!(
            "{}: hosts of {} accepted from {granted}",
            reader.name(),
            target.name()
        ));
    }
    for info in &configs {
        let side = if info.name == local.name() {
            &local
        } else {
            &remote
        };
        apply(
            &Api::<ConfigMap>::namespaced(side.target.client.clone(), SYSTEM_NAMESPACE),
            &install::cluster_configmap(info),
            side.name(),
            &format!("ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}"),
        )
        .await?;
    }
    if !configs.is_empty() {
        say(format!(
            "pod CIDRs overlap ({} and {}): translated to mesh CIDRs {} for {} and {} for {}; \
             pods reach the other cluster's pods at its mesh addresses (`meshctl status --resolve CLUSTER/POD_IP`)",
            comma_list(&local.info.pod_cidrs),
            comma_list(&remote.info.pod_cidrs),
            comma_list(&local.info.mesh_cidrs),
            local.name(),
            comma_list(&remote.info.mesh_cidrs),
            remote.name(),
        ));
    }
    grant_and_store(&local, &remote).await?;
    grant_and_store(&remote, &local).await?;
    say(format!("joined {} and {}", local.name(), remote.name()));
    Ok(())
}

/// Lets `reader` read `target`: the RBAC objects in `target`, a token, and in `reader` the
/// Secret holding it and the PeerCluster for `target`.
async fn grant_and_store(reader: &Side, target: &Side) -> Result<()> {
    let (r, t) = (reader.name(), target.name());
    let account = reader_name(r);
    let target_client = &target.target.client;

    apply(
        &Api::<ClusterRole>::all(target_client.clone()),
        &reader_role(),
        t,
        &format!("ClusterRole {PEER_READER_ROLE}"),
    )
    .await?;
    apply(
        &Api::<ServiceAccount>::namespaced(target_client.clone(), SYSTEM_NAMESPACE),
        &reader_service_account(r),
        t,
        &format!("ServiceAccount {SYSTEM_NAMESPACE}/{account}"),
    )
    .await?;
    apply(
        &Api::<ClusterRoleBinding>::all(target_client.clone()),
        &reader_binding(r),
        t,
        &format!("ClusterRoleBinding {account}"),
    )
    .await?;

    let secrets = Api::<Secret>::namespaced(reader.target.client.clone(), SYSTEM_NAMESPACE);
    let secret = secret_name(t);
    let existing = secrets
        .get_opt(&secret)
        .await
        .with_context(|| format!("{r}: reading Secret {SYSTEM_NAMESPACE}/{secret}"))?
        .and_then(|s| s.data?.remove("token"))
        .and_then(|token| String::from_utf8(token.0).ok());
    let token = match existing {
        Some(token) if token_works(&target.target, &token).await => {
            say(format!(
                "{r}: the token in Secret {SYSTEM_NAMESPACE}/{secret} still reads {t}'s MeshNodes; not re-minted"
            ));
            token
        }
        existing => {
            if existing.is_some() {
                say(format!(
                    "{r}: the token in Secret {SYSTEM_NAMESPACE}/{secret} no longer works against {t}; minting a new one"
                ));
            }
            mint_token(&target.target.client, t, &account).await?
        }
    };
    apply(
        &secrets,
        &peer_secret(t, &token),
        r,
        &format!("Secret {SYSTEM_NAMESPACE}/{secret}"),
    )
    .await?;
    apply(
        &Api::<PeerCluster>::all(reader.target.client.clone()),
        &peer_cluster(&target.info, &target.target),
        r,
        &format!("PeerCluster {t}"),
    )
    .await?;
    Ok(())
}

/// `meshctl unjoin OTHER_CONTEXT`: on each side, deletes the PeerCluster (and waits for it
/// to go), the Secret, the ServiceAccount and ClusterRoleBinding of the other side, and the
/// reader ClusterRole once no peer uses it. "Not found" counts as done.
pub(crate) async fn unjoin(args: &KubeArgs, other_context: &str, timeout: Duration) -> Result<()> {
    let (kubeconfig, context) = kubeconfig::load_with_context(args)?;
    ensure!(
        context != other_context,
        "cannot unjoin context {context} from itself"
    );
    let local = kubeconfig::target(&kubeconfig, &context).await?;
    let remote = kubeconfig::target(&kubeconfig, other_context).await?;
    reachable(&local).await?;
    let local_name = cluster_info(&local).await?.name;

    let mut problems = Vec::new();
    let remote_name = match reachable(&remote).await {
        Ok(()) => Some(cluster_info(&remote).await?.name),
        Err(e) => {
            problems.push(format!(
                "{e:#}; nothing was removed there: run `meshctl unjoin {other_context}` again once it is reachable"
            ));
            None
        }
    };
    let remote_name = match remote_name {
        Some(name) => name,
        // The remote is down: find its name in the link we hold.
        None => Api::<PeerCluster>::all(local.client.clone())
            .list(&ListParams::default())
            .await
            .with_context(|| format!("{local_name}: listing PeerClusters"))?
            .items
            .into_iter()
            .find(|p| p.spec.api_server.trim_end_matches('/') == remote.server.trim_end_matches('/'))
            .map(|p| p.spec.cluster_name)
            .ok_or_else(|| {
                anyhow!(
                    "{}\n{local_name} holds no PeerCluster for {}, so there is nothing to unjoin here",
                    problems.join("\n"),
                    remote.server
                )
            })?,
    };

    let mut sides = vec![(&local, local_name.as_str(), remote_name.as_str())];
    if problems.is_empty() {
        sides.push((&remote, remote_name.as_str(), local_name.as_str()));
    }
    for (target, name, other) in &sides {
        let api = Api::<PeerCluster>::all(target.client.clone());
        delete(&api, other, name, &format!("PeerCluster {other}")).await?;
    }
    let waits = sides.iter().map(|(target, name, other)| {
        wait_gone(
            Api::<PeerCluster>::all(target.client.clone()),
            name,
            other,
            timeout,
        )
    });
    for result in futures::future::join_all(waits).await {
        if let Err(e) = result {
            problems.push(format!("{e:#}"));
        }
    }
    for (target, name, other) in &sides {
        remove_credentials(target, name, other).await?;
    }
    if !problems.is_empty() {
        bail!(
            "unjoin of {local_name} and {remote_name} is incomplete:\n  - {}",
            problems.join("\n  - ")
        );
    }
    say(format!("unjoined {local_name} and {remote_name}"));
    Ok(())
}

/// In cluster `name`: the Secret for `other`, the ServiceAccount and binding `other` reads
/// through, and the reader ClusterRole if nothing is bound to it any more.
async fn remove_credentials(target: &Target, name: &str, other: &str) -> Result<()> {
    let client = &target.client;
    let secret = secret_name(other);
    delete(
        &Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE),
        &secret,
        name,
        &format!("Secret {SYSTEM_NAMESPACE}/{secret}"),
    )
    .await?;
    let account = reader_name(other);
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    delete(
        &bindings,
        &account,
        name,
        &format!("ClusterRoleBinding {account}"),
    )
    .await?;
    delete(
        &Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE),
        &account,
        name,
        &format!("ServiceAccount {SYSTEM_NAMESPACE}/{account}"),
    )
    .await?;
    let users: Vec<String> = bindings
        .list(&ListParams::default())
        .await
        .with_context(|| format!("{name}: listing ClusterRoleBindings"))?
        .items
        .into_iter()
        .filter(|b| b.role_ref.kind == "ClusterRole" && b.role_ref.name == PEER_READER_ROLE)
        .map(|b| b.name_any())
        .collect();
    if users.is_empty() {
        delete(
            &Api::<ClusterRole>::all(client.clone()),
            PEER_READER_ROLE,
            name,
            &format!("ClusterRole {PEER_READER_ROLE}"),
        )
        .await?;
    } else {
        say(format!(
            "{name}: ClusterRole {PEER_READER_ROLE} kept (still bound by {})",
            users.join(", ")
        ));
    }
    Ok(())
}

/// Reads `target`'s ConfigMap, PeerClusters, Node addresses and API server addresses.
async fn read_side(target: Target) -> Result<Side> {
    let info = cluster_info(&target).await?;
    let node_addresses = node_addresses(&target).await.with_context(|| {
        format!(
            "{}: listing Nodes in context {} (their addresses are never granted to a peer)",
            info.name, target.context
        )
    })?;
    let read = crate::reconcile::api_server_addresses(&target.client).await;
    ensure!(
        read.complete,
        "{}: cannot read Service and EndpointSlice default/kubernetes in context {} \
         (the API server's addresses are never granted to a peer)",
        info.name,
        target.context
    );
    let mut api_servers = read.addresses;
    api_servers.extend(server_address(&target.server));
    let peers = Api::<PeerCluster>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| match &e {
            kube::Error::Api(status) if status.is_not_found() => {
                anyhow::Error::new(e).context(format!(
                    "Wiremesh is not installed in context {}: the PeerCluster CRD is missing \
                 (run `meshctl install` there)",
                    target.context
                ))
            }
            _ => anyhow::Error::new(e).context(format!(
                "{}: listing PeerClusters in context {}",
                info.name, target.context
            )),
        })?
        .items;
    Ok(Side {
        target,
        info,
        peers,
        node_addresses,
        api_servers,
    })
}

/// Every Node's `InternalIP` and `ExternalIP`, listed in pages of 500.
async fn node_addresses(target: &Target) -> Result<Vec<(String, IpAddr)>> {
    let api = Api::<Node>::all(target.client.clone());
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        for node in &page.items {
            let name = node.name_any();
            out.extend(
                crate::plan::node_addresses(node)
                    .into_iter()
                    .map(|address| (name.clone(), address)),
            );
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

fn join_side(side: &Side) -> JoinSide {
    JoinSide {
        context: side.target.context.clone(),
        info: side.info.clone(),
        api_server: side.target.server.clone(),
        peers: side.peers.clone(),
        node_addresses: side.node_addresses.clone(),
        api_servers: side.api_servers.clone(),
    }
}

/// The address in an API server URL (`https://198.18.1.10:6443`, `https://[fd18::1]`),
/// if it names one rather than a host name.
fn server_address(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next()?;
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    host.split(':').next()?.parse().ok()
}

/// Both results, or an error naming every failure.
fn both<A, B>(a: Result<A>, b: Result<B>) -> Result<(A, B)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(anyhow!("{a:#}\n{b:#}")),
    }
}

/// One cheap authenticated request, bounded.
async fn reachable(target: &Target) -> Result<()> {
    let failed = || {
        format!(
            "cannot reach the API server of context {} ({})",
            target.context, target.server
        )
    };
    tokio::time::timeout(REACH_TIMEOUT, target.client.apiserver_version())
        .await
        .map_err(|_| anyhow!("no answer within {REACH_TIMEOUT:?}"))
        .with_context(failed)?
        .with_context(failed)?;
    Ok(())
}

/// Whether `token` can still list `target`'s MeshNodes.
async fn token_works(target: &Target, token: &str) -> bool {
    let Ok(client) =
        kubeconfig::token_client(&target.server, target.ca_data.as_deref(), token).await
    else {
        return false;
    };
    let api = Api::<MeshNode>::all(client);
    let params = ListParams::default().limit(1);
    matches!(
        tokio::time::timeout(REACH_TIMEOUT, api.list(&params)).await,
        Ok(Ok(_))
    )
}

/// Waits up to `timeout` for PeerCluster `name` to disappear.
async fn wait_gone(
    api: Api<PeerCluster>,
    cluster: &str,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut said = false;
    loop {
        let left = api
            .get_opt(name)
            .await
            .with_context(|| format!("{cluster}: reading PeerCluster {name}"))?;
        let Some(left) = left else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{cluster}: PeerCluster {name} still exists after {timeout:?} (finalizers: {}); \
                 wiremesh-controller removes its MeshPeers and then the finalizer: is it running in {cluster}?",
                left.finalizers().join(", ")
            );
        }
        if !said {
            say(format!(
                "{cluster}: waiting up to {timeout:?} for wiremesh-controller to remove the MeshPeers of {name}"
            ));
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The ClusterRole [`PEER_READER_ROLE`]: get, list and watch MeshNodes and
/// MeshServiceExports, nothing else.
pub fn reader_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(PEER_READER_ROLE, None, None),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![GROUP.to_owned()]),
            resources: Some(vec![
                "meshnodes".to_owned(),
                "meshserviceexports".to_owned(),
            ]),
            verbs: ["get", "list", "watch"].map(str::to_owned).to_vec(),
            ..PolicyRule::default()
        }]),
        ..ClusterRole::default()
    }
}

/// The ServiceAccount cluster `reader` reads through.
pub fn reader_service_account(reader: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(
            &reader_name(reader),
            Some(SYSTEM_NAMESPACE),
            Some((PEER_CLUSTER_LABEL, reader)),
        ),
        ..ServiceAccount::default()
    }
}

/// The binding of [`reader_service_account`] to [`reader_role`].
pub fn reader_binding(reader: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(
            &reader_name(reader),
            None,
            Some((PEER_CLUSTER_LABEL, reader)),
        ),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: PEER_READER_ROLE.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: reader_name(reader),
            namespace: Some(SYSTEM_NAMESPACE.to_owned()),
            ..Subject::default()
        }]),
    }
}

/// The Secret holding the token for peer cluster `peer`.
pub fn peer_secret(peer: &str, token: &str) -> Secret {
    Secret {
        metadata: meta(
            &secret_name(peer),
            Some(SYSTEM_NAMESPACE),
            Some((PEER_CLUSTER_LABEL, peer)),
        ),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The PeerCluster for the cluster `info` reached through `target`.
pub fn peer_cluster(info: &ClusterInfo, target: &Target) -> PeerCluster {
    let mut peer = PeerCluster::new(
        &info.name,
        PeerClusterSpec {
            cluster_name: info.name.clone(),
            api_server: target.server.clone(),
            ca_data: target.ca_data.clone(),
            credentials_secret: secret_name(&info.name),
            allowed_pod_cidrs: info.pod_cidrs.iter().map(ToString::to_string).collect(),
            mesh_cidrs: info.mesh_cidrs.iter().map(ToString::to_string).collect(),
            allowed_host_cidrs: info.host_cidrs.iter().map(ToString::to_string).collect(),
        },
    );
    peer.metadata.labels = meta(&info.name, None, None).labels;
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_role_only_reads_meshnodes_and_exports() {
        let role = reader_role();
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["wiremesh.io".to_owned()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["meshnodes".to_owned(), "meshserviceexports".to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    }

    #[test]
    fn the_api_server_address_is_read_from_its_url() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            server_address("https://198.18.1.10:6443"),
            ip("198.18.1.10")
        );
        assert_eq!(server_address("https://[fd18::1]:6443/"), ip("fd18::1"));
        assert_eq!(server_address("https://10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(server_address("https://api.example:6443"), None);
    }

    #[test]
    fn names_follow_the_convention() {
        assert_eq!(reader_name("cluster-a"), "wiremesh-peer-cluster-a");
        assert_eq!(secret_name("cluster-b"), "peer-cluster-b");
        let binding = reader_binding("cluster-a");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(subject.name, "wiremesh-peer-cluster-a");
        assert_eq!(subject.namespace.as_deref(), Some("wiremesh-system"));
        let secret = peer_secret("cluster-b", "t0k3n");
        assert_eq!(secret.data.unwrap()["token"].0, b"t0k3n");
        assert_eq!(
            secret.metadata.labels.unwrap()[PEER_CLUSTER_LABEL],
            "cluster-b"
        );
    }
}
