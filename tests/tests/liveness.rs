//! Failover from the data plane (issue 13), the part below the imports: a node of
//! cluster-b that hosts exported endpoints keeps a heartbeat; when its agent dies,
//! cluster-a's agents stop hearing it and cluster-a's leader puts it in its unreachable
//! set (`PeerCluster.status.unreachableNodes`) and its endpoint in cluster-a's imported
//! EndpointSlice turns not ready; when it comes back it leaves the set and serves again.
//! Real agents, controllers and API servers (needs root); the EndpointSlices are written
//! by the test as kube-controller-manager would. Traffic through the VIP and the
//! API-server-only outage are `mcs.rs`'s.

// The tests print what they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use wiremesh_lab::clusters::{CONVERGE, Side, TwoClusters, wait_for};
use wiremesh_lab::k8s::block_on;
use wiremesh_lab::mcs::{
    create_namespace, create_service, endpoint_ready, export, imported_slices,
};
use wiremesh_lab::mesh::IFACE;
use wiremesh_proto::crd::MeshNode;

/// The namespace of the exported service.
const NS: &str = "demo";

/// The PeerCluster cluster-a holds for cluster-b.
const PEER: &str = "cluster-b";

/// What cluster-a's leader says of cluster-b's nodes.
fn unreachable_nodes(lab: &TwoClusters) -> Result<Vec<String>> {
    let pc = lab
        .a
        .peer_cluster(PEER)?
        .context("no PeerCluster cluster-b")?;
    Ok(pc.status.map(|s| s.unreachable_nodes).unwrap_or_default())
}

#[test]
fn a_dead_heartbeat_node_becomes_unreachable_in_seconds_and_leaves_when_back() -> Result<()> {
    let started = Instant::now();
    let mut lab = TwoClusters::new(2)?;
    println!("{}", lab.join()?);

    // Service hello of namespace demo, one ready endpoint on b1 (b1's pod), exported from
    // cluster-b: cluster-b's MCS controller gives b1 a heartbeat, cluster-a imports it.
    let (b1_pod, b1_node) = {
        let b1 = lab.b.node("b1")?;
        (b1.pod.ip().to_string(), b1.name.clone())
    };
    let (ca, cb) = (lab.a.client()?, lab.b.client()?);
    for client in [&ca, &cb] {
        create_namespace(client, NS)?;
    }
    create_service(&cb, NS, "hello", 8080, &[(&b1_pod, &b1_node)])?;
    export(&cb, NS, "hello")?;
    let slices_a: Api<EndpointSlice> = Api::namespaced(ca.clone(), NS);
    let imported = |ready: bool| {
        let slices = imported_slices(&slices_a, "hello")?;
        let now = endpoint_ready(&slices, &b1_pod);
        ensure!(
            now == Some(ready),
            "b1's endpoint {b1_pod} in cluster-a's import: {now:?}, want ready={ready}"
        );
        Ok(())
    };
    wait_for(CONVERGE, || imported(true))?;
    // Mirrored into cluster-a's MeshPeer; b1 keeps every tunnel alive every second.
    let took = wait_for(CONVERGE, || {
        ensure!(
            lab.a.mesh_peer("b1")?.spec.heartbeat,
            "b1's MeshPeer has no heartbeat"
        );
        ensure!(
            !lab.a.mesh_peer("b2")?.spec.heartbeat,
            "b2's MeshPeer has a heartbeat"
        );
        let b1 = lab.b.node("b1")?;
        let keepalives = b1.wg(&["show", IFACE, "persistent-keepalive"])?;
        let a_keys = lab.a.nodes.len();
        let every_second = keepalives.lines().filter(|l| l.ends_with("\t1")).count();
        ensure!(every_second >= a_keys, "b1's keepalives: {keepalives}");
        Ok(())
    })?;
    println!("heartbeat mirrored and kept after {took:?}");
    // Steady state: every tunnel answers, nothing reported.
    let a_nodes: Api<MeshNode> = Api::all(lab.a.client()?);
    wait_for(CONVERGE, || {
        for node in &lab.a.nodes {
            let mn = block_on(a_nodes.get(&node.name))?;
            let status = mn.status.unwrap_or_default();
            // b1 is cluster-b's heartbeat node: the agent counts its tunnel to it there.
            ensure!(
                status.tunnels.as_ref().is_some_and(|t| t
                    .clusters
                    .iter()
                    .any(|c| c.cluster == "cluster-b" && c.heartbeat > 0)),
                "{} counts no watched tunnel to cluster-b yet: {:?}",
                node.name,
                status.tunnels
            );
            ensure!(
                status.unreachable.is_empty(),
                "{}: {:?}",
                node.name,
                status.unreachable
            );
        }
        Ok(())
    })?;
    ensure!(unreachable_nodes(&lab)?.is_empty());

    // b1's agent dies: nothing answers from b1 any more.
    let (killed, _) = lab.stop_agent(Side::B, "b1", "KILL")?;
    wait_for(Duration::from_secs(20), || {
        let now = unreachable_nodes(&lab)?;
        ensure!(now == ["b1"], "unreachable: {now:?}");
        Ok(())
    })?;
    let detected = killed.elapsed();
    println!("b1 killed -> in cluster-a's unreachable set after {detected:?}");
    wait_for(Duration::from_secs(5), || imported(false))?;
    println!(
        "b1 killed -> its endpoint not ready in cluster-a's import after {:?}",
        killed.elapsed()
    );
    ensure!(
        detected < Duration::from_secs(6),
        "detection took {detected:?}, more than 6 s"
    );
    // Every node of a reports it, and only it (b2 has no heartbeat and answers).
    for node in &lab.a.nodes {
        let status = block_on(a_nodes.get(&node.name))?
            .status
            .unwrap_or_default();
        ensure!(
            status.unreachable == ["cluster-b.b1"],
            "{}: {:?}",
            node.name,
            status.unreachable
        );
    }

    // b1 comes back: heard again, out of the set.
    let restarted = Instant::now();
    lab.restart_agent(Side::B, "b1")?;
    wait_for(Duration::from_secs(30), || {
        let now = unreachable_nodes(&lab)?;
        ensure!(now.is_empty(), "unreachable: {now:?}");
        Ok(())
    })?;
    let back = restarted.elapsed();
    println!("b1 restarted -> out of the unreachable set after {back:?}");
    wait_for(Duration::from_secs(5), || imported(true))?;
    ensure!(back < Duration::from_secs(15), "recovery took {back:?}");
    // It stays out: no flapping over a few keepalive periods.
    std::thread::sleep(Duration::from_secs(4));
    ensure!(unreachable_nodes(&lab)?.is_empty(), "b1 flapped back in");
    imported(true)?;
    println!("test took {:?}", started.elapsed());
    Ok(())
}
