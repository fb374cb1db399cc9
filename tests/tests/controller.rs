//! `wiremesh-controller` as real processes against two real control planes (no agents):
//! cluster-b's MeshNodes, written here as its agents would, are mirrored into cluster-a's
//! MeshPeers and follow updates and deletions; a node claiming a CIDR of cluster-a is
//! refused with a Conflict condition and an Event naming node and CIDR, and so are hosts
//! claiming the metadata address, the API server's address, a Node's address or an
//! address outside the granted host range, and a pod CIDR holding a Node's address; a
//! token the remote
//! refuses, or cluster-b's API server stopped, leaves the MeshPeers in place (also across a
//! controller restart) and the PeerCluster Stale, and fixing it makes it Ready; when the
//! leading replica is killed the standby takes the Lease and mirrors a later change; a
//! deleted PeerCluster takes its MeshPeers with it.
//!
//! Needs `cargo build -p wiremesh-controller --bins` first (`make test` does it), and the
//! kube-apiserver and etcd of `tests/k8s/build.sh`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use wiremesh_lab::clusters::wait_for;
use wiremesh_lab::fixtures::mesh_node;
use wiremesh_lab::k8s::{ControlPlane, block_on, create_node, joined_planes};
use wiremesh_lab::replica::Replica;
use wiremesh_proto::crd::{
    MeshNode, MeshNodeKind, MeshPeer, PEER_CLUSTER_FINALIZER, PEER_CLUSTER_LABEL, PeerCluster,
    SYSTEM_NAMESPACE,
};

/// Short, so failover is quick: a standby takes over about this long after the leader died.
const LEASE_SECONDS: u64 = 4;
/// Mirroring is debounced by 200 ms and resynced every 10 s; a 2-core CI machine that is
/// also compiling needs slack on top.
const MIRROR: Duration = Duration::from_secs(30);
/// The `kubernetes` Service's cluster IP: the first of the control planes'
/// `--service-cluster-ip-range` (tests/k8s/controlplane.sh).
const API_SERVER_SERVICE_IP: &str = "10.0.0.1/32";
/// Stale needs the API server to stop (up to 20 s before SIGKILL) and a probe to fail.
const STALE: Duration = Duration::from_secs(60);

#[test]
fn controller_mirrors_refuses_fails_static_and_fails_over() -> Result<()> {
    let (planes, kubeconfig) = joined_planes()?;
    let (a, b) = (&planes[0], &planes[1]);

    let mut replicas = Vec::new();
    let result = scenario(a, b, &kubeconfig, &mut replicas);
    if result.is_err() {
        for replica in &replicas {
            eprintln!("--- {} log ---\n{}", replica.identity, replica.log_tail(60));
        }
    }
    result
}

fn scenario(
    a: &ControlPlane,
    b: &ControlPlane,
    kubeconfig: &Path,
    replicas: &mut Vec<Replica>,
) -> Result<()> {
    let (ca, cb) = (a.client()?, b.client()?);
    let nodes_b: Api<MeshNode> = Api::all(cb.clone());
    let peers_a: Api<MeshPeer> = Api::all(ca.clone());
    let pcs_a: Api<PeerCluster> = Api::all(ca.clone());

    // The agents of cluster-b publish two nodes before any controller runs.
    create_mesh_node(&nodes_b, "b1", "10.2.1.0/24", "198.18.2.1:51820")?;
    create_mesh_node(&nodes_b, "b2", "10.2.2.0/24", "198.18.2.2:51820")?;

    replicas.push(replica(kubeconfig, a.dir(), "a-controller-0")?);
    let took = wait_for(MIRROR, || {
        expect_peers(&peers_a, &["cluster-b.b1", "cluster-b.b2"])?;
        expect_condition(&pcs_a, "Ready", "True")
    })?;
    eprintln!("remote nodes mirrored {took:?} after the controller started");
    let b1 = block_on(peers_a.get("cluster-b.b1"))?;
    ensure!(
        b1.spec.cluster == "cluster-b" && b1.spec.node == "b1",
        "{b1:?}"
    );
    ensure!(b1.spec.pod_cidrs == ["10.2.1.0/24"], "{b1:?}");
    ensure!(
        b1.labels().get(PEER_CLUSTER_LABEL).map(String::as_str) == Some("cluster-b"),
        "{b1:?}"
    );
    let pc = block_on(pcs_a.get("cluster-b"))?;
    ensure!(
        b1.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == pc.metadata.uid.as_ref()),
        "MeshPeer not owned by its PeerCluster: {b1:?}"
    );
    ensure!(
        pc.finalizers().iter().any(|f| f == PEER_CLUSTER_FINALIZER),
        "no finalizer on {pc:?}"
    );
    let status = pc.status.clone().unwrap_or_default();
    ensure!(status.node_count == 2, "{status:?}");
    ensure!(status.last_sync_time.is_some(), "{status:?}");
    ensure!(
        status
            .conditions
            .iter()
            .all(|c| c.observed_generation == pc.metadata.generation),
        "{status:?}"
    );

    // An update in cluster-b is mirrored; a deletion too.
    let mut moved = block_on(nodes_b.get("b1"))?;
    moved.spec.endpoints = vec!["198.18.2.101:51820".into()];
    block_on(nodes_b.replace("b1", &PostParams::default(), &moved))?;
    block_on(nodes_b.delete("b2", &DeleteParams::default()))?;
    wait_for(MIRROR, || {
        expect_peers(&peers_a, &["cluster-b.b1"])?;
        let b1 = block_on(peers_a.get("cluster-b.b1"))?;
        ensure!(b1.spec.endpoints == ["198.18.2.101:51820"], "{:?}", b1.spec);
        Ok(())
    })?;

    // A node of cluster-b claiming a CIDR of cluster-a is not mirrored.
    create_mesh_node(&nodes_b, "evil", "10.1.5.0/24", "198.18.2.66:51820")?;
    wait_for(MIRROR, || {
        let (status, message) = condition(&pcs_a, "Conflict")?;
        ensure!(status == "True", "Conflict is {status}: {message}");
        ensure!(
            message.contains("evil") && message.contains("10.1.5.0/24"),
            "the message names neither node nor CIDR: {message}"
        );
        Ok(())
    })?;
    expect_peers(&peers_a, &["cluster-b.b1"])?;
    wait_for(MIRROR, || {
        let events: Api<Event> = Api::namespaced(ca.clone(), "default");
        let found = block_on(events.list(&ListParams::default()))?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("Conflict")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("cluster-b")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("evil") && n.contains("10.1.5.0/24"))
            });
        ensure!(found, "no Conflict Event on PeerCluster cluster-b");
        Ok(())
    })?;
    block_on(nodes_b.delete("evil", &DeleteParams::default()))?;
    wait_for(MIRROR, || expect_condition(&pcs_a, "Conflict", "False"))?;

    // Hosts of cluster-b claiming single addresses: the cloud metadata address, cluster-a's
    // API server (the `kubernetes` Service's cluster IP), one outside any granted host
    // range (cluster-b was installed without one), and the address of a Node of
    // cluster-a; and a node whose pod CIDR, inside cluster-b's granted range, holds that
    // Node's address. None is mirrored.
    create_node(&ca, "a9", "10.1.9.0/24", Ipv4Addr::new(10, 2, 77, 7))?;
    let hosts = [
        ("meta", "169.254.169.254/32", "link-local"),
        ("apisvc", API_SERVER_SERVICE_IP, "API server"),
        ("stray", "10.250.9.9/32", "host range"),
        ("nodeaddr", "10.2.77.7/32", "local Node a9"),
        ("podnet", "10.2.77.0/24", "local Node a9"),
    ];
    for (i, (name, address, _)) in hosts.iter().enumerate() {
        let kind = if *name == "podnet" {
            MeshNodeKind::Node
        } else {
            MeshNodeKind::Host
        };
        let host = mesh_node(name)
            .kind(kind)
            .endpoint(format!("198.18.2.{}:51820", 70 + i))
            .pod_cidr(*address)
            .build();
        block_on(nodes_b.create(&PostParams::default(), &host))
            .with_context(|| format!("creating MeshNode {name}"))?;
    }
    wait_for(MIRROR, || {
        let (status, message) = condition(&pcs_a, "Conflict")?;
        ensure!(status == "True", "Conflict is {status}: {message}");
        for (name, address, why) in hosts {
            ensure!(
                message.contains(&format!("node {name}: "))
                    && message.contains(address)
                    && message.contains(why),
                "the message does not refuse {name} ({address}, {why}): {message}"
            );
        }
        Ok(())
    })?;
    expect_peers(&peers_a, &["cluster-b.b1"])?;
    wait_for(MIRROR, || {
        let events: Api<Event> = Api::namespaced(ca.clone(), "default");
        let notes: Vec<String> = block_on(events.list(&ListParams::default()))?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Conflict"))
            .filter_map(|e| e.note)
            .collect();
        for (name, address, _) in hosts {
            ensure!(
                notes
                    .iter()
                    .any(|n| n.contains(&format!("node {name}: ")) && n.contains(address)),
                "no Conflict Event names {name} and {address}: {notes:?}"
            );
        }
        Ok(())
    })?;
    for (name, _, _) in hosts {
        block_on(nodes_b.delete(name, &DeleteParams::default()))?;
    }
    wait_for(MIRROR, || expect_condition(&pcs_a, "Conflict", "False"))?;

    // A token the remote refuses: Stale, MeshPeers kept; the right one again: Ready.
    let secrets: Api<Secret> = Api::namespaced(ca.clone(), SYSTEM_NAMESPACE);
    let secret_name = block_on(pcs_a.get("cluster-b"))?.spec.credentials_secret;
    let token = block_on(secrets.get(&secret_name))?
        .data
        .and_then(|d| d.get("token").cloned())
        .ok_or_else(|| anyhow!("Secret {secret_name} has no token"))?;
    let patch = |data: serde_json::Value| {
        block_on(secrets.patch(&secret_name, &PatchParams::default(), &Patch::Merge(data)))
            .with_context(|| format!("patching Secret {secret_name}"))
    };
    patch(json!({ "stringData": { "token": "not-a-token" } }))?;
    let took = wait_for(STALE, || {
        let (status, message) = condition(&pcs_a, "Stale")?;
        ensure!(status == "True", "Stale is {status}: {message}");
        ensure!(message.contains("Unauthorized"), "{message}");
        Ok(())
    })?;
    eprintln!("Stale {took:?} after the token was replaced by a bad one");
    expect_peers(&peers_a, &["cluster-b.b1"])?;
    patch(json!({ "data": { "token": token } }))?;
    wait_for(STALE, || expect_condition(&pcs_a, "Ready", "True"))?;

    // Fail static: cluster-b's API server goes away; the MeshPeers stay, the link is Stale.
    b.pause()?;
    let took = wait_for(STALE, || {
        expect_condition(&pcs_a, "Stale", "True")?;
        expect_condition(&pcs_a, "Ready", "False")
    })?;
    eprintln!("Stale {took:?} after cluster-b's API server stopped");
    // A controller that starts during the outage (the old one stopped cleanly and released
    // the Lease) deletes nothing either.
    replicas[0].stop()?;
    replicas.push(replica(kubeconfig, a.dir(), "a-controller-1")?);
    let leases: Api<Lease> = Api::namespaced(ca.clone(), SYSTEM_NAMESPACE);
    wait_for(Duration::from_secs(3 * LEASE_SECONDS), || {
        let holder = lease_holder(&leases)?;
        ensure!(
            holder.as_deref() == Some("a-controller-1"),
            "holder {holder:?}"
        );
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(5));
    expect_peers(&peers_a, &["cluster-b.b1"])?;
    expect_condition(&pcs_a, "Stale", "True")?;
    b.resume()?;
    let took = wait_for(STALE, || {
        expect_condition(&pcs_a, "Stale", "False")?;
        expect_condition(&pcs_a, "Ready", "True")
    })?;
    eprintln!("Ready {took:?} after cluster-b's API server came back");
    expect_peers(&peers_a, &["cluster-b.b1"])?;

    // Two replicas: one leads, the other stands by; killing the leader hands over.
    replicas.push(replica(kubeconfig, a.dir(), "a-controller-2")?);
    std::thread::sleep(Duration::from_secs(2 * LEASE_SECONDS));
    ensure!(lease_holder(&leases)?.as_deref() == Some("a-controller-1"));
    ensure!(
        !replicas[2].log().contains("starting the reconcilers"),
        "the standby reconciles while the leader lives:\n{}",
        replicas[2].log()
    );
    replicas[1].kill();
    let took = wait_for(Duration::from_secs(6 * LEASE_SECONDS), || {
        let holder = lease_holder(&leases)?;
        ensure!(
            holder.as_deref() == Some("a-controller-2"),
            "holder {holder:?}"
        );
        Ok(())
    })?;
    eprintln!("the standby took the lease {took:?} after the leader was killed");
    create_mesh_node(&nodes_b, "b3", "10.2.3.0/24", "198.18.2.3:51820")?;
    let took = wait_for(MIRROR, || {
        expect_peers(&peers_a, &["cluster-b.b1", "cluster-b.b3"])
    })?;
    eprintln!("a remote change mirrored {took:?} after it was made, by the new leader");

    // Deleting the PeerCluster deletes its MeshPeers, then the finalizer lets it go.
    block_on(pcs_a.delete("cluster-b", &DeleteParams::default()))?;
    wait_for(MIRROR, || {
        expect_peers(&peers_a, &[])?;
        ensure!(
            block_on(pcs_a.get_opt("cluster-b"))?.is_none(),
            "PeerCluster cluster-b is still there"
        );
        Ok(())
    })?;
    Ok(())
}

fn create_mesh_node(api: &Api<MeshNode>, name: &str, cidr: &str, endpoint: &str) -> Result<()> {
    let node = mesh_node(name).endpoint(endpoint).pod_cidr(cidr).build();
    block_on(api.create(&PostParams::default(), &node))
        .with_context(|| format!("creating MeshNode {name}"))?;
    Ok(())
}

/// Exactly these MeshPeers of cluster-b exist.
fn expect_peers(api: &Api<MeshPeer>, names: &[&str]) -> Result<()> {
    let selector = ListParams::default().labels(&format!("{PEER_CLUSTER_LABEL}=cluster-b"));
    let mut have: Vec<String> = block_on(api.list(&selector))?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    have.sort();
    ensure!(have == names, "MeshPeers are {have:?}, expected {names:?}");
    Ok(())
}

/// `(status, message)` of condition `type_` of PeerCluster cluster-b.
fn condition(api: &Api<PeerCluster>, type_: &str) -> Result<(String, String)> {
    let pc = block_on(api.get("cluster-b"))?;
    let status = pc.status.unwrap_or_default();
    let c = status
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .ok_or_else(|| anyhow!("PeerCluster cluster-b has no {type_} condition"))?;
    Ok((c.status, c.message))
}

fn expect_condition(api: &Api<PeerCluster>, type_: &str, want: &str) -> Result<()> {
    let (status, message) = condition(api, type_)?;
    ensure!(
        status == want,
        "{type_} is {status} ({message}), expected {want}"
    );
    Ok(())
}

fn lease_holder(api: &Api<Lease>) -> Result<Option<String>> {
    let lease = block_on(api.get("wiremesh-controller"))?;
    Ok(lease.spec.and_then(|s| s.holder_identity))
}

/// A replica of cluster-a's controller as `identity`, with a short Lease.
fn replica(kubeconfig: &Path, dir: &Path, identity: &str) -> Result<Replica> {
    let lease = LEASE_SECONDS.to_string();
    let args = ["--lease-duration-seconds", lease.as_str()];
    Replica::start(kubeconfig, dir, "cluster-a", identity, &args, None)
}
