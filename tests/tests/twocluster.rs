//! The two-cluster lab end to end: real control planes, agents in Kubernetes mode, the
//! controller and `meshctl join` (needs root).

// The tests print what they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::PostParams;
use wiremesh_lab::clusters::{CONVERGE, INTERFACE, Side, TwoClusters, wait_for};
use wiremesh_lab::fixtures::mesh_node;
use wiremesh_lab::k8s::{self, block_on};
use wiremesh_lab::{MIB, ping, reachable, transfer};
use wiremesh_proto::crd::{MeshNode, SYSTEM_NAMESPACE};

/// Joined, and every pod of a reaches every pod of b.
fn joined(nodes: usize) -> Result<TwoClusters> {
    let lab = TwoClusters::new(nodes)?;
    let out = lab.join()?;
    println!("{out}");
    for a in &lab.a.nodes {
        for b in &lab.b.nodes {
            wait_for(CONVERGE, || {
                ensure!(reachable(&a.pod, b.pod.ip())?, "{} -> {}", a.name, b.name);
                Ok(())
            })?;
        }
    }
    Ok(lab)
}

#[test]
fn join_links_every_pod_pair_across_the_clusters() -> Result<()> {
    let lab = TwoClusters::new(2)?;
    let (a1, b2) = (lab.a.node("a1")?, lab.b.node("b2")?);
    ensure!(!reachable(&a1.pod, b2.pod.ip())?, "reachable before join");

    let out = lab.join()?;
    println!("{out}");
    for a in &lab.a.nodes {
        for b in &lab.b.nodes {
            let took = wait_for(CONVERGE, || {
                ensure!(reachable(&a.pod, b.pod.ip())?, "{} -> {}", a.name, b.name);
                Ok(())
            })?;
            println!("{} -> {}: reachable after {took:?}", a.name, b.name);
            ping(&b.pod, a.pod.ip(), 2)?;
            let there = transfer(&a.pod, b.pod.ip(), 8 * MIB)?;
            let back = transfer(&b.pod, a.pod.ip(), 8 * MIB)?;
            println!(
                "{} <-> {}: 8 MiB each way intact ({:.0}/{:.0} Mbit/s)",
                a.name,
                b.name,
                there.mbit_per_s(),
                back.mbit_per_s()
            );
        }
    }
    // A second join changes nothing and traffic goes on.
    let again = lab.join()?;
    ensure!(
        !again.contains("created"),
        "second join created something:\n{again}"
    );
    ping(&a1.pod, b2.pod.ip(), 2)?;
    let status = lab.meshctl(&["--context", "cluster-a", "status"])?;
    println!("{}", String::from_utf8_lossy(&status.stdout));
    ensure!(status.status.success(), "meshctl status failed");

    // a1's agent recorded the tunnel to b2 coming up as an Event on its MeshNode (with
    // the pod-bound token and the RBAC of deploy/wiremesh.yaml).
    let events: Api<Event> = Api::namespaced(lab.a.client()?, SYSTEM_NAMESPACE);
    wait_for(Duration::from_secs(30), || {
        let list = block_on(events.list(&Default::default()))?;
        ensure!(
            list.items.iter().any(|e| {
                e.reason.as_deref() == Some("TunnelUp")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("a1")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("cluster-b/b2"))
            }),
            "no TunnelUp Event for a1 -> cluster-b/b2 among {} Events",
            list.items.len()
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_node_added_later_is_reachable_without_a_command_and_a_deleted_one_is_dropped() -> Result<()> {
    let mut lab = joined(1)?;
    let b2 = lab.add_node(Side::B)?;
    let (b2_ip, b2_cidr, b2_name) = (b2.pod.ip(), b2.pod_cidr(), b2.name.clone());
    let a1 = lab.a.node("a1")?;
    let took = wait_for(CONVERGE, || {
        ensure!(reachable(&a1.pod, b2_ip)?, "a1 -> b2");
        Ok(())
    })?;
    println!("node b2 added to cluster-b: reachable from cluster-a's pods after {took:?}");
    transfer(&a1.pod, b2_ip, 8 * MIB)?;

    k8s::delete_node(&lab.b.client()?, &b2_name)?;
    let took = wait_for(CONVERGE, || {
        let routes = a1.routes()?;
        ensure!(!routes.contains(&b2_cidr), "route still there: {routes}");
        Ok(())
    })?;
    println!("Node b2 deleted: its route left cluster-a after {took:?}");
    let peers = a1.wg(&["show", INTERFACE, "allowed-ips"])?;
    ensure!(!peers.contains(&b2_cidr), "{peers}");
    ensure!(
        lab.a
            .node("a1")?
            .routes()?
            .contains(&lab.b.node("b1")?.pod_cidr())
    );
    Ok(())
}

#[test]
fn traffic_keeps_flowing_while_a_control_plane_is_down() -> Result<()> {
    let lab = joined(1)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    lab.b.plane.pause()?;
    let took = wait_for(Duration::from_secs(60), || {
        let (status, message) = lab.a.condition("cluster-b", "Stale")?;
        ensure!(status == "True", "Stale={status}: {message}");
        Ok(())
    })?;
    println!("cluster-b's API server down: PeerCluster Stale after {took:?}");
    ping(&a1.pod, b1.pod.ip(), 3)?;
    ping(&b1.pod, a1.pod.ip(), 3)?;
    transfer(&a1.pod, b1.pod.ip(), 16 * MIB)?;
    transfer(&b1.pod, a1.pod.ip(), 16 * MIB)?;
    ensure!(!lab.a.mesh_peers()?.is_empty(), "MeshPeers were dropped");

    lab.b.plane.resume()?;
    let took = wait_for(Duration::from_secs(60), || {
        let (status, message) = lab.a.condition("cluster-b", "Ready")?;
        ensure!(status == "True", "Ready={status}: {message}");
        let (stale, _) = lab.a.condition("cluster-b", "Stale")?;
        ensure!(stale == "False", "still stale");
        Ok(())
    })?;
    println!("cluster-b's API server back: Ready after {took:?}");
    ping(&a1.pod, b1.pod.ip(), 2)?;
    Ok(())
}

#[test]
fn a_remote_node_claiming_our_cidr_is_refused_everywhere() -> Result<()> {
    let lab = joined(1)?;
    let a1 = lab.a.node("a1")?;
    let stolen = a1.pod_cidr();
    let evil_key = wiremesh_lab::mesh::Keypair::generate().public;
    let evil = mesh_node("evil")
        .key(evil_key.clone())
        .endpoint("198.18.2.99:51820")
        .pod_cidr(stolen.clone())
        .build();
    block_on(Api::<MeshNode>::all(lab.b.client()?).create(&PostParams::default(), &evil))?;
    wait_for(CONVERGE, || {
        let (status, message) = lab.a.condition("cluster-b", "Conflict")?;
        ensure!(status == "True", "Conflict={status}");
        ensure!(
            message.contains("evil") && message.contains(&stolen),
            "the message names neither node nor CIDR: {message}"
        );
        Ok(())
    })?;
    ensure!(
        !lab.a.mesh_peers()?.iter().any(|p| p.spec.node == "evil"),
        "the evil node was mirrored"
    );
    // Give the agents time to act on anything, then check that no node has a tunnel to
    // the forged node and no cluster-a node routes its own CIDR away. (cluster-b's nodes
    // route that CIDR to a1, rightly.)
    std::thread::sleep(Duration::from_secs(3));
    for node in lab.all_nodes() {
        let peers = node.wg(&["show", INTERFACE, "peers"])?;
        ensure!(
            !peers.contains(&evil_key),
            "{}: a tunnel to evil",
            node.name
        );
    }
    for node in &lab.a.nodes {
        let routes = node.routes()?;
        ensure!(!routes.contains(&stolen), "{}: {routes}", node.name);
    }
    ping(&a1.pod, lab.b.node("b1")?.pod.ip(), 2)?;
    Ok(())
}

#[test]
fn unjoin_leaves_no_route_or_peer_on_any_node() -> Result<()> {
    let lab = joined(2)?;
    // Each node refuses the other cluster's pod CIDRs when their tunnels are gone (fail
    // closed, issue 12 §2)...
    for (near, far) in [(&lab.a, &lab.b), (&lab.b, &lab.a)] {
        for node in &near.nodes {
            let closed = node.fail_closed_routes()?;
            for remote in &far.nodes {
                ensure!(
                    closed.contains(&remote.pod_cidr()),
                    "{}: no fail-closed route for {}'s {}: {closed}",
                    node.name,
                    remote.name,
                    remote.pod_cidr()
                );
            }
        }
    }
    let out = lab.meshctl(&["--context", "cluster-a", "unjoin", "cluster-b"])?;
    ensure!(
        out.status.success(),
        "unjoin failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(CONVERGE, || {
        for node in lab.all_nodes() {
            let routes = node.routes()?;
            ensure!(
                routes.trim().is_empty(),
                "{}: routes left: {routes}",
                node.name
            );
            let peers = node.wg(&["show", INTERFACE, "peers"])?;
            ensure!(
                peers.trim().is_empty(),
                "{}: peers left: {peers}",
                node.name
            );
            // ...until the link is undone: then nothing of the other cluster is refused.
            let closed = node.fail_closed_routes()?;
            ensure!(
                closed.trim().is_empty(),
                "{}: fail-closed routes left: {closed}",
                node.name
            );
        }
        Ok(())
    })?;
    ensure!(lab.a.peer_cluster("cluster-b")?.is_none());
    ensure!(lab.b.peer_cluster("cluster-a")?.is_none());
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    if reachable(&a1.pod, b1.pod.ip())? {
        bail!("still reachable after unjoin");
    }
    Ok(())
}

#[test]
fn the_controllers_standby_takes_over_when_the_leader_dies() -> Result<()> {
    let mut lab = joined(1)?;
    lab.start_controller(Side::A)?;
    std::thread::sleep(Duration::from_secs(2));
    // Kill the first replica, which has held the lease since the start.
    lab.a.controllers[0].kill();
    let b2 = lab.add_node(Side::B)?;
    let b2_ip = b2.pod.ip();
    let a1 = lab.a.node("a1")?;
    let took = wait_for(Duration::from_secs(60), || {
        ensure!(reachable(&a1.pod, b2_ip)?, "a1 -> b2");
        Ok(())
    })
    .context("the standby did not mirror b2")?;
    println!("leader killed; b2 mirrored by the standby after {took:?}");
    Ok(())
}
