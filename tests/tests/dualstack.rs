//! Dual-stack pods across two clusters in Kubernetes mode (needs root): every Node has an
//! IPv4 and an IPv6 pod CIDR, both clusters are installed with both of their ranges, and
//! after `meshctl join` a1's pod reaches b1's pod over IPv4 and over IPv6: with the nodes
//! on an IPv6-only underlay where every endpoint is IPv6, and on a dual-stack underlay
//! whose IPv4 side is too small for IPv6 (1300 bytes), where the agents start with a
//! derived MTU below 1280 and raise it to the IPv6 minimum when the other cluster's IPv6
//! pod CIDRs arrive. (`failclosed.rs` runs the plain dual-stack lab.)

// The tests print what they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::clusters::{CONVERGE, INTERFACE, Stack, TwoClusters, wait_for};
use wiremesh_lab::{MIB, ping, reachable, transfer};

/// Bytes each way per family.
const BYTES: u64 = 8 * MIB;

/// Joins the clusters and checks, for a1 and b1: the MeshPeers carry both pod CIDRs of
/// the other side's nodes, a1 has routes for b1's IPv4 and IPv6 pod CIDRs, the peers' endpoints
/// are of `endpoint_family`, and the pods reach each other both ways over both families
/// with checksummed transfers.
fn join_and_check(lab: &TwoClusters, endpoint_v6: bool) -> Result<()> {
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    let a6 = a1.pod.ip6().context("a1's pod has no IPv6 address")?;
    let b6 = b1.pod.ip6().context("b1's pod has no IPv6 address")?;
    ensure!(
        !reachable(&a1.pod, b6)?,
        "b1's pod reachable over IPv6 before join"
    );

    let start = Instant::now();
    let out = lab.join()?;
    println!("{out}");

    for (label, to) in [("IPv4", IpAddr::from(b1.pod.ip())), ("IPv6", b6.into())] {
        let took = wait_for(CONVERGE, || {
            ensure!(reachable(&a1.pod, to)?, "a1 -> b1 over {label}");
            Ok(())
        })?;
        println!(
            "a1 -> b1 over {label} ({to}): reachable {took:?} after waiting, {:?} after join started",
            start.elapsed()
        );
    }
    ping(&b1.pod, a1.pod.ip(), 3)?;
    ping(&b1.pod, a6, 3)?;
    ping(&a1.pod, b6, 3)?;

    // The MeshPeers mirror both families of the other side's Nodes.
    for (cluster, other) in [(&lab.a, &lab.b), (&lab.b, &lab.a)] {
        let peers = cluster.mesh_peers()?;
        for node in &other.nodes {
            let cidr6 = node.pod_cidr6().context("dual-stack node")?;
            let peer = peers
                .iter()
                .find(|p| p.spec.node == node.name)
                .with_context(|| {
                    format!("no MeshPeer for {} in {}", node.name, cluster.side.name())
                })?;
            ensure!(
                peer.spec.pod_cidrs.contains(&node.pod_cidr())
                    && peer.spec.pod_cidrs.contains(&cidr6),
                "MeshPeer {} in {} has pod CIDRs {:?}, wanted {} and {cidr6}",
                node.name,
                cluster.side.name(),
                peer.spec.pod_cidrs,
                node.pod_cidr()
            );
            let all_v6 = peer
                .spec
                .endpoints
                .iter()
                .all(|e| e.starts_with('[') == endpoint_v6);
            ensure!(
                !peer.spec.endpoints.is_empty() && all_v6,
                "MeshPeer {} has endpoints {:?}, wanted IPv{} ones",
                node.name,
                peer.spec.endpoints,
                if endpoint_v6 { 6 } else { 4 }
            );
            println!(
                "MeshPeer {} in {}: pod CIDRs {:?}, endpoints {:?}",
                node.name,
                cluster.side.name(),
                peer.spec.pod_cidrs,
                peer.spec.endpoints
            );
        }
    }

    // Routes for both of b1's pod CIDRs on a1, installed by the agent (proto 0x57).
    let routes4 = a1.routes()?;
    ensure!(
        routes4.contains(&b1.pod_cidr()),
        "a1 has no IPv4 route to {}: {routes4}",
        b1.pod_cidr()
    );
    let cidr6 = b1.pod_cidr6().context("dual-stack node")?;
    let routes6 = a1.host.ip(&["-6", "route", "show", "proto", "0x57"])?;
    ensure!(
        routes6.contains(&cidr6) && routes6.contains(INTERFACE),
        "a1 has no IPv6 route to {cidr6} on {INTERFACE}: {routes6}"
    );
    println!("a1's routes:\n{routes4}{routes6}");

    // The tunnel really goes to b1's endpoint of the expected family.
    let endpoints = a1.wg(&["show", INTERFACE, "endpoints"])?;
    let wanted = if endpoint_v6 {
        format!(
            "[{}]:51820",
            b1.host.underlay_ip6().context("IPv6 underlay")?
        )
    } else {
        format!("{}:51820", b1.host.underlay_ip())
    };
    ensure!(
        endpoints.contains(&wanted),
        "a1 should reach b1 at {wanted}: {endpoints}"
    );
    let mtu = a1.host.ip(&["-o", "link", "show", "dev", INTERFACE])?;
    println!(
        "a1 sees b1 at {wanted}; {INTERFACE}: {}",
        mtu.split_whitespace()
            .skip_while(|w| *w != "mtu")
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );

    for (label, there_to, back_to) in [
        ("IPv4", IpAddr::from(b1.pod.ip()), IpAddr::from(a1.pod.ip())),
        ("IPv6", IpAddr::from(b6), IpAddr::from(a6)),
    ] {
        let there = transfer(&a1.pod, there_to, BYTES)?;
        let back = transfer(&b1.pod, back_to, BYTES)?;
        println!("{label} pods, intact: a1->b1 {there}; b1->a1 {back}");
    }
    Ok(())
}

/// On failure, what the agents, controllers and API servers say.
fn explain(lab: &TwoClusters, result: Result<()>) -> Result<()> {
    if result.is_err() {
        for node in lab.all_nodes() {
            if let Some(agent) = &node.agent {
                println!("--- agent {}:\n{}", node.name, agent.stderr());
            }
            println!("--- wg show on {}:\n{:?}", node.name, node.wg(&["show"]));
        }
        for cluster in [&lab.a, &lab.b] {
            for controller in &cluster.controllers {
                println!(
                    "--- {} {}:\n{}",
                    cluster.side.name(),
                    controller.name,
                    controller.log()
                );
            }
            println!(
                "--- MeshPeers in {}: {:?}",
                cluster.side.name(),
                cluster
                    .mesh_peers()
                    .map(|p| p.into_iter().map(|p| p.spec).collect::<Vec<_>>())
            );
        }
    }
    result
}

#[test]
fn dual_stack_pods_over_an_ipv6_only_underlay() -> Result<()> {
    let lab = TwoClusters::dual_stack_v6_underlay(1)?;
    ensure!(lab.stack == Stack::DualStackV6Underlay);
    let a1 = lab.a.node("a1")?;
    let v4 = a1.host.ip(&["-4", "-o", "addr", "show", "dev", "ul0"])?;
    ensure!(v4.trim().is_empty(), "a1 has IPv4 on ul0: {v4}");
    explain(&lab, join_and_check(&lab, true))
}

/// Also the plain dual-stack case (both families over a dual-stack underlay), on an
/// underlay with a small MTU: one lab instead of two.
#[test]
fn dual_stack_pods_reach_each_other_and_ipv6_peers_raise_a_small_derived_mtu() -> Result<()> {
    const SMALL: u32 = 1300;
    let lab = TwoClusters::dual_stack_small_underlay(1, SMALL)?;
    ensure!(lab.stack == Stack::DualStackSmallUnderlay);
    let a1 = lab.a.node("a1")?;
    let before = a1.host.link_mtu(INTERFACE)?;
    ensure!(
        before == SMALL - 60,
        "a1's {INTERFACE} starts at MTU {before}, wanted {} (default route {SMALL} - 60)",
        SMALL - 60
    );
    println!("before join: {INTERFACE} MTU {before} (derived from a {SMALL}-byte default route)");
    explain(&lab, join_and_check(&lab, false))?;
    let after = a1.host.link_mtu(INTERFACE)?;
    ensure!(
        after == 1280,
        "a1's {INTERFACE} has MTU {after} after join, wanted 1280"
    );
    println!("after join: {INTERFACE} MTU {after}");
    Ok(())
}
