//! Location topology with gateways (needs root): cluster-b makes two of its three nodes
//! gateways with `meshctl gateway add`; only they hold tunnels to cluster-a, and b's other
//! node reaches cluster-a through them. Then the active gateway dies (agent killed,
//! namespace deleted) and traffic resumes through the other one with no command.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::PostParams;
use wiremesh_lab::clusters::{CONVERGE, INTERFACE, Side, TwoClusters, wait_for};
use wiremesh_lab::fixtures::mesh_node;
use wiremesh_lab::k8s::{self, block_on};
use wiremesh_lab::{MIB, Netns, reachable, transfer};
use wiremesh_proto::crd::{GATEWAY_LABEL, MeshNode};

/// Polls `from -> to` every 100 ms until a ping answers; the time since `since`.
fn resumed(from: &Netns, to: Ipv4Addr, since: Instant) -> Result<Duration> {
    let deadline = since + CONVERGE;
    loop {
        if reachable(from, to)? {
            return Ok(since.elapsed());
        }
        ensure!(
            Instant::now() < deadline,
            "{to} unreachable from {} for {CONVERGE:?}",
            from.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn meshctl_b(lab: &TwoClusters, args: &[&str]) -> Result<(bool, String)> {
    let mut full = vec!["--context", "cluster-b"];
    full.extend_from_slice(args);
    let out = lab.meshctl(&full)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn labelled(lab: &TwoClusters, node: &str) -> Result<bool> {
    let node = block_on(Api::<Node>::all(lab.b.client()?).get(node))?;
    Ok(node
        .metadata
        .labels
        .unwrap_or_default()
        .contains_key(GATEWAY_LABEL))
}

/// The keys `node`'s agent has peers for, from `wg show`.
fn peers_of(lab: &TwoClusters, side: Side, node: &str) -> Result<Vec<String>> {
    let out = lab
        .cluster(side)
        .node(node)?
        .wg(&["show", INTERFACE, "peers"])?;
    let mut keys: Vec<String> = out.lines().map(str::to_owned).collect();
    keys.sort();
    Ok(keys)
}

fn key_of(lab: &TwoClusters, node: &str) -> Result<String> {
    let m = block_on(Api::<MeshNode>::all(lab.b.client()?).get(node))?;
    Ok(m.spec.public_key)
}

#[test]
fn gateways_carry_the_cluster_and_another_takes_over_when_one_dies() -> Result<()> {
    let mut lab = TwoClusters::new(1)?;
    lab.add_node(Side::B)?;
    lab.add_node(Side::B)?;
    // cluster-b's own network (its CNI): every node routes the others' pod CIDRs.
    for from in &lab.b.nodes {
        for to in lab.b.nodes.iter().filter(|n| n.name != from.name) {
            from.host
                .add_route_via(&to.pod_cidr(), to.host.underlay_ip())?;
        }
    }

    // Bad input first: each refused with its reason, nothing labelled.
    let (ok, text) = meshctl_b(&lab, &["gateway", "add", "b9"])?;
    ensure!(!ok && text.contains("node b9: no such Node"), "{text}");
    let client = lab.b.client()?;
    k8s::create_node(
        &client,
        "mute",
        "10.2.200.0/24",
        Ipv4Addr::new(198, 18, 2, 200),
    )?;
    let mute = mesh_node("mute").pod_cidr("10.2.200.0/24").build();
    block_on(Api::<MeshNode>::all(client.clone()).create(&PostParams::default(), &mute))?;
    let (ok, text) = meshctl_b(&lab, &["gateway", "add", "mute"])?;
    ensure!(
        !ok && text.contains("node mute: its MeshNode publishes no endpoint"),
        "{text}"
    );
    ensure!(!labelled(&lab, "mute")?, "the refused node was labelled");
    block_on(Api::<Node>::all(client.clone()).delete("mute", &Default::default()))?;
    block_on(Api::<MeshNode>::all(client.clone()).delete("mute", &Default::default()))?;

    for gateway in ["b2", "b3"] {
        let (ok, text) = meshctl_b(&lab, &["gateway", "add", gateway])?;
        println!("{}", text.trim());
        ensure!(ok && labelled(&lab, gateway)?, "{text}");
    }
    let (ok, text) = meshctl_b(&lab, &["gateway", "add", "b2"])?;
    ensure!(ok && text.contains("already a gateway"), "{text}");
    wait_for(CONVERGE, || {
        for gateway in ["b2", "b3"] {
            let m = block_on(Api::<MeshNode>::all(client.clone()).get(gateway))?;
            ensure!(
                m.spec.gateway,
                "{gateway}'s agent has not published the label yet"
            );
        }
        Ok(())
    })?;

    println!("{}", lab.join()?);
    let a1 = lab.a.node("a1")?;
    for b in &lab.b.nodes {
        let took = wait_for(CONVERGE, || {
            ensure!(reachable(&a1.pod, b.pod.ip())?, "a1 -> {}", b.name);
            ensure!(reachable(&b.pod, a1.pod.ip())?, "{} -> a1", b.name);
            Ok(())
        })?;
        println!("a1 <-> {}: reachable after {took:?}", b.name);
    }
    // Only the gateways hold tunnels to cluster-a, and b1 holds tunnels only to them.
    let (b2_key, b3_key) = (key_of(&lab, "b2")?, key_of(&lab, "b3")?);
    let mut gateways = vec![b2_key.clone(), b3_key.clone()];
    gateways.sort();
    ensure!(
        peers_of(&lab, Side::A, "a1")? == gateways,
        "a1 should have tunnels to b2 and b3 only"
    );
    ensure!(
        peers_of(&lab, Side::B, "b1")? == gateways,
        "b1 should have tunnels to its gateways only"
    );
    let b1_pod = lab.b.node("b1")?.pod.ip();
    let allowed = a1.wg(&["show", INTERFACE, "allowed-ips"])?;
    println!("a1's allowed IPs with b2 active:\n{allowed}");
    ensure!(
        allowed
            .lines()
            .any(|l| l.starts_with(&b2_key) && l.contains("10.2.1.0/24")),
        "b2 (first by name) should carry b1's pods:\n{allowed}"
    );
    let there = transfer(&a1.pod, b1_pod, 8 * MIB)?;
    let back = transfer(&lab.b.node("b1")?.pod, a1.pod.ip(), 8 * MIB)?;
    println!(
        "a1 <-> b1 through gateway b2: 8 MiB each way intact ({:.0}/{:.0} Mbit/s)",
        there.mbit_per_s(),
        back.mbit_per_s()
    );

    // Status says which path the peers take: b1 counts cluster-a's peers through b2.
    wait_for(CONVERGE, || {
        let b1 = block_on(Api::<MeshNode>::all(lab.b.client()?).get("b1"))?;
        let status = b1.status.unwrap_or_default();
        ensure!(
            status.tunnels.as_ref().is_some_and(|t| t
                .via_gateway
                .iter()
                .any(|g| g.gateway == "b2" && g.peers >= 1)),
            "b1's status should say peers go via b2: {status:?}"
        );
        Ok(())
    })?;
    let status = lab.meshctl(&["--context", "cluster-a", "status"])?;
    let text = String::from_utf8_lossy(&status.stdout);
    println!("{text}");
    ensure!(
        text.contains("via gateway cluster-b.b2") && text.contains("gateway (standby)"),
        "meshctl status should show the paths:\n{text}"
    );

    // The active gateway dies.
    let a1_pod = lab.a.node("a1")?.pod.clone();
    let b1_pod_ns = lab.b.node("b1")?.pod.clone();
    let b3_pod = lab.b.node("b3")?.pod.ip();
    let killed = Instant::now();
    lab.kill_node(Side::B, "b2")?;
    let a_to_b = resumed(&a1_pod, b1_pod, killed)?;
    let b_to_a = resumed(&b1_pod_ns, a1_pod.ip(), killed)?;
    let a_to_b3 = resumed(&a1_pod, b3_pod, killed)?;
    println!(
        "gateway b2 killed: a1 -> b1 resumed after {a_to_b:?}, b1 -> a1 after {b_to_a:?}, a1 -> b3 after {a_to_b3:?}"
    );
    let a1 = lab.a.node("a1")?;
    let allowed = a1.wg(&["show", INTERFACE, "allowed-ips"])?;
    ensure!(
        allowed
            .lines()
            .any(|l| l.starts_with(&b3_key) && l.contains("10.2.1.0/24")),
        "b3 should carry b1's pods now:\n{allowed}"
    );
    let there = transfer(&a1.pod, b1_pod, 8 * MIB)?;
    let back = transfer(&b1_pod_ns, a1.pod.ip(), 8 * MIB)?;
    println!(
        "a1 <-> b1 through gateway b3: 8 MiB each way intact ({:.0}/{:.0} Mbit/s)",
        there.mbit_per_s(),
        back.mbit_per_s()
    );
    wait_for(CONVERGE, || {
        let out = lab.meshctl(&["--context", "cluster-b", "status"])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // b1 counts the peers it reaches through each gateway: cluster-a's one, via b3.
        ensure!(
            text.lines()
                .any(|l| l.contains("1 peer ") && l.trim_end().ends_with("via gateway b3")),
            "b1 should go via b3 now:\n{text}"
        );
        println!("{text}");
        Ok(())
    })?;
    let _ = lab.b.node("b1").context("b1 is still there")?;
    Ok(())
}
