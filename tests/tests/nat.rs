//! A node behind NAT with no inbound connections (nftables masquerade on a gateway, every
//! connection from outside dropped): it initiates, keeps the mapping open with persistent
//! keepalive, and the other side follows the endpoint it observes (roaming). Needs root.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::clusters::{BareHost, INTERFACE, NAT_PUBLIC, Side, TwoClusters};
use wiremesh_lab::lab::NatMapping;
use wiremesh_lab::mesh::{Keypair, Node, eventually};
use wiremesh_lab::{Lab, MIB, Pod, ping, transfer};

/// 8 MiB from `a` to `b` and back, checksummed; prints the rates under `what`.
fn each_way(a: &Pod, b: &Pod, what: &str) -> Result<()> {
    let there = transfer(a, b.ip(), 8 * MIB)?;
    let back = transfer(b, a.ip(), 8 * MIB)?;
    println!(
        "{what}: 8 MiB each way intact ({:.0}/{:.0} Mbit/s)",
        there.mbit_per_s(),
        back.mbit_per_s()
    );
    Ok(())
}

#[test]
fn a_node_behind_nat_with_no_inbound_reaches_and_is_reached() -> Result<()> {
    let lab = Lab::new()?;
    let private = lab.underlay("natb", "198.19.2.0/24", 1500)?;
    let gateway = Ipv4Addr::new(198, 19, 2, 254);
    let public = Ipv4Addr::new(198, 18, 2, 254);
    let _nat = lab.add_nat_gateway(
        &private,
        "gw",
        gateway,
        public,
        "10.254.0.0/30",
        NatMapping::PortPreserving,
    )?;

    let mut a = Node::new(&lab, "a", 1)?;
    let host_b = lab.add_host_on(&private, "b", Ipv4Addr::new(198, 19, 2, 1), "10.2.0.0/24")?;
    host_b.set_default_route(gateway)?;
    let pod_b = host_b.add_pod("b-p")?;
    let mut b = Node {
        host: host_b,
        pod: pod_b,
        keys: Keypair::generate(),
        agent: None,
    };
    // The NAT lets b out (and nothing in): b reaches a's underlay address; a has no route
    // to b's private one.
    ping(&b.host, a.host.underlay_ip(), 1)?;

    // a does not know where b is; b knows a and keeps the mapping open.
    a.start(&[b.as_peer(false)])?;
    b.start(&[a.as_peer(true)])?;
    let start = Instant::now();
    b.wg(&[
        "set",
        "wm0",
        "peer",
        &a.keys.public,
        "persistent-keepalive",
        "5",
    ])?;

    // a -> b works once b's keepalive has opened the way.
    eventually(Duration::from_secs(30), || ping(&a.pod, b.pod.ip(), 1))?;
    println!("a -> b through the NAT after {:?}", start.elapsed());
    let endpoints = a.wg(&["show", "wm0", "endpoints"])?;
    ensure!(
        endpoints.contains(&format!("{public}:")),
        "a should see b at the NAT's public address, sees: {endpoints}"
    );
    // Both ways, with checksums.
    let there = transfer(&a.pod, b.pod.ip(), 16 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 16 * MIB)?;
    println!(
        "16 MiB each way through the NAT intact ({:.0}/{:.0} Mbit/s)",
        there.mbit_per_s(),
        back.mbit_per_s()
    );
    Ok(())
}

/// cluster-b's nodes behind NAT in the two-cluster lab: their published endpoints are
/// private, nothing gets in; pod-to-pod traffic still works both ways after `meshctl join`.
#[test]
fn a_cluster_behind_nat_links_both_ways() -> Result<()> {
    let lab = TwoClusters::with_b_behind_nat(2)?;
    lab.join()?;
    let start = Instant::now();
    for a in &lab.a.nodes {
        for b in &lab.b.nodes {
            eventually(Duration::from_secs(45), || ping(&a.pod, b.pod.ip(), 1))?;
            println!(
                "{} -> {} (behind NAT) reachable {:?} after join",
                a.name,
                b.name,
                start.elapsed()
            );
            each_way(&a.pod, &b.pod, &format!("{} <-> {}", a.name, b.name))?;
        }
        // a sees cluster-b's nodes at the NAT's public address, not the private ones
        // they published.
        let endpoints = a.wg(&["show", INTERFACE, "endpoints"])?;
        ensure!(
            endpoints.contains(&format!("{NAT_PUBLIC}:")) && !endpoints.contains("198.19."),
            "{}: endpoints {endpoints}",
            a.name
        );
    }
    Ok(())
}

/// Every node publishes an `ExternalIP` first that nothing answers at, then its
/// `InternalIP`: neither side's first handshake can complete, and each falls back to the
/// next endpoint after one unanswered initiation (REKEY_TIMEOUT, 5 s).
#[test]
fn an_unreachable_preferred_endpoint_falls_back_to_the_next() -> Result<()> {
    let lab = TwoClusters::with_dead_external_ips(1)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    lab.join()?;
    let start = Instant::now();
    eventually(Duration::from_secs(45), || ping(&a1.pod, b1.pod.ip(), 1))?;
    println!(
        "a1 -> b1 reachable {:?} after join, past the dead endpoint",
        start.elapsed()
    );
    let b1_peer = lab.a.mesh_peer("b1")?;
    ensure!(
        b1_peer.spec.endpoints
            == [
                "198.18.102.1:51820".to_owned(),
                "198.18.2.1:51820".to_owned()
            ],
        "b1 should publish the dead ExternalIP first: {:?}",
        b1_peer.spec.endpoints
    );
    let endpoints = a1.wg(&["show", INTERFACE, "endpoints"])?;
    ensure!(
        endpoints.contains("198.18.2.1:51820"),
        "a1 should use b1's second endpoint: {endpoints}"
    );
    each_way(&a1.pod, &b1.pod, "a1 <-> b1")?;
    Ok(())
}

/// Both clusters behind NAT, a relay host with a public endpoint registered in
/// cluster-a (`meshctl host add --relay`), and the link joined; returns the lab, the
/// relay and when the join finished.
fn both_behind_nat(b_symmetric: bool) -> Result<(TwoClusters, BareHost, Instant)> {
    let lab = TwoClusters::with_both_behind_nat(1, b_symmetric)?;
    let mut relay = lab.add_bare_host(Side::A, "relay", 9)?;
    let bundle = lab.lab.dir().join("relay-bundle.json");
    let (address, endpoint) = (relay.address_cidr(), relay.endpoint());
    let out = lab.meshctl(&[
        "--context",
        "cluster-a",
        "host",
        "add",
        "relay",
        "--address",
        &address,
        "--endpoint",
        &endpoint,
        "--relay",
        "--bundle",
        bundle.to_str().context("UTF-8 path")?,
    ])?;
    ensure!(
        out.status.success(),
        "host add --relay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    relay.start_agent(&bundle)?;
    lab.join()?;
    Ok((lab, relay, Instant::now()))
}

/// Waits until `meshctl status -o json` in cluster-a says a1 reaches cluster-b.b1 by
/// `path` (through `via`); returns the table form. The agent names a tunnel only when it
/// is down or heard from an address the peer does not publish: a connected direct one
/// may be only counted (every tunnel to cluster-b connected, none relayed).
fn status_shows(lab: &TwoClusters, path: &str, via: Option<&str>) -> Result<String> {
    let mut last = serde_json::Value::Null;
    let found = eventually(Duration::from_secs(45), || {
        let out = lab.meshctl(&["--context", "cluster-a", "status", "-o", "json"])?;
        last = serde_json::from_slice(&out.stdout)?;
        let a1 = last["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == "a1")
            .context("no node a1")?;
        let named = a1["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == "cluster-b.b1");
        let Some(tunnel) = named else {
            let counts = a1["counts"]["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["cluster"] == "cluster-b")
                .context("a1 counts no tunnel to cluster-b")?;
            ensure!(
                path == "Direct"
                    && counts["relayed"].is_null()
                    && counts["connected"] == counts["tunnels"],
                "a1 names no tunnel to cluster-b.b1 and counts {counts}"
            );
            return Ok(());
        };
        ensure!(
            tunnel["path"] == path && tunnel["via"].as_str() == via,
            "a1 -> cluster-b.b1: {tunnel}"
        );
        Ok(())
    });
    found.with_context(|| format!("meshctl status -o json:\n{last:#}"))?;
    let out = lab.meshctl(&["--context", "cluster-a", "status"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Both clusters behind NAT: the relay (public) hears every node at its NAT's address and
/// reports it through the control plane; each side adds it to the other's endpoints and
/// the handshakes punch through both NATs, so traffic goes direct.
#[test]
fn both_clusters_behind_nat_punch_through_with_endpoints_a_relay_observed() -> Result<()> {
    let (lab, _relay, joined) = both_behind_nat(false)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    eventually(Duration::from_secs(90), || {
        let endpoints = a1.wg(&["show", INTERFACE, "endpoints"])?;
        ensure!(
            endpoints.contains(&format!("{NAT_PUBLIC}:")),
            "a1 has not reached b1 at its NAT's address yet: {endpoints}"
        );
        ping(&a1.pod, b1.pod.ip(), 1)
    })?;
    println!(
        "a1 -> b1 direct through both NATs {:?} after join",
        joined.elapsed()
    );
    let b1_peer = lab.a.mesh_peer("b1")?;
    ensure!(
        b1_peer
            .spec
            .endpoints
            .iter()
            .any(|e| e.starts_with(&NAT_PUBLIC.to_string())),
        "the observed endpoint should be mirrored: {:?}",
        b1_peer.spec.endpoints
    );
    let status = status_shows(&lab, "Direct", None)?;
    println!("{status}");
    each_way(&a1.pod, &b1.pod, "a1 <-> b1 direct")?;
    Ok(())
}

/// Both behind NAT and cluster-b's NAT symmetric (a random port per connection): no hole
/// can be punched, so a1 and b1 reach each other through the relay.
#[test]
fn both_clusters_behind_nat_fall_back_to_the_relay_when_punching_fails() -> Result<()> {
    let (lab, relay, joined) = both_behind_nat(true)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    eventually(Duration::from_secs(90), || ping(&a1.pod, b1.pod.ip(), 1))?;
    println!(
        "a1 -> b1 reachable {:?} after join (both behind NAT, b's symmetric)",
        joined.elapsed()
    );
    let status = status_shows(&lab, "Relayed", Some("relay"))?;
    println!("{status}");
    let relay_peers = relay.host.wg(&["show", INTERFACE, "transfer"])?;
    each_way(&a1.pod, &b1.pod, "a1 <-> b1 through the relay")?;
    let after = relay.host.wg(&["show", INTERFACE, "transfer"])?;
    println!("relay transfer before:\n{relay_peers}\nafter:\n{after}");
    ensure!(relay_peers != after, "the relay carried nothing");
    Ok(())
}
