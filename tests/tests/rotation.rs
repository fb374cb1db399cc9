//! Keys rotate with no lost packet (issue 12 §5): `meshctl rotate-keys --all` on both
//! clusters at once, while a checksummed transfer and a counted ping stream cross them;
//! afterwards every node has a new key and an initiation to an old key gets no answer.
//! Needs root.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use boringtun::x25519::PublicKey as X25519Public;
use kube::Api;
use kube::api::ListParams;
use wiremesh_lab::clusters::{CONVERGE, Cluster, TwoClusters, wait_for};
use wiremesh_lab::forge::Forger;
use wiremesh_lab::k8s::{self, block_on};
use wiremesh_lab::mesh::{METRICS, http_get, in_netns};
use wiremesh_lab::metrics::Exposition;
use wiremesh_lab::{MIB, Pod, ping, transfer};
use wiremesh_proto::PublicKey;
use wiremesh_proto::crd::{MeshNode, MeshNodeKind};

/// The pods' rate, so that the transfer outlasts the rotation of both clusters.
const RATE: &str = "40mbit";
const TRANSFER: u64 = 64 * MIB;
/// Pings 10 ms apart: 30 s of them.
const PINGS: u32 = 3_000;

#[test]
fn every_node_of_both_clusters_rotates_its_key_with_no_lost_packet() -> Result<()> {
    let started = Instant::now();
    let lab = TwoClusters::new(2)?;
    println!("{}", lab.join()?);
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    for a in &lab.a.nodes {
        for b in &lab.b.nodes {
            wait_for(CONVERGE, || ping(&a.pod, b.pod.ip(), 1))?;
        }
    }
    let old_a = node_keys(&lab.a)?;
    let old_b = node_keys(&lab.b)?;
    println!("keys before: {old_a:?} {old_b:?}");
    for pod in [&a1.pod, &b1.pod] {
        pod.exec_ok(&[
            "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", RATE, "burst", "64kb",
            "latency", "200ms",
        ])?;
    }

    let (report, (sent, received), outputs) = thread::scope(|scope| -> Result<_> {
        let (from, to) = (a1.pod.clone(), b1.pod.ip());
        let sending = scope.spawn(move || transfer(&from, to, TRANSFER));
        let (from, to) = (b1.pod.clone(), a1.pod.ip());
        let pinging = scope.spawn(move || counted_pings(&from, to.to_string().as_str(), PINGS));
        thread::sleep(Duration::from_secs(2));
        let kubeconfig = lab.kubeconfig.to_string_lossy().into_owned();
        let rotate = |context: &'static str| {
            let kubeconfig = kubeconfig.clone();
            move || {
                k8s::meshctl(
                    &[
                        "--kubeconfig",
                        &kubeconfig,
                        "--context",
                        context,
                        "rotate-keys",
                        "--all",
                    ],
                    &[],
                )
            }
        };
        let on_a = scope.spawn(rotate("cluster-a"));
        let on_b = scope.spawn(rotate("cluster-b"));
        let mut outputs = Vec::new();
        for (name, handle) in [("cluster-a", on_a), ("cluster-b", on_b)] {
            let out = handle
                .join()
                .map_err(|_| anyhow!("meshctl on {name} panicked"))??;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                out.status.success(),
                "meshctl rotate-keys --all on {name}: {text}"
            );
            outputs.push(text);
        }
        let report = sending
            .join()
            .map_err(|_| anyhow!("the transfer panicked"))??;
        let counts = pinging
            .join()
            .map_err(|_| anyhow!("the pings panicked"))??;
        Ok((report, counts, outputs))
    })?;
    for text in &outputs {
        println!("{text}");
    }
    println!(
        "during the rotation of all 4 nodes: {} MiB a1 -> b1 intact ({:.0} Mbit/s); \
         pings b1 -> a1: {sent} sent, {received} answered",
        TRANSFER / MIB,
        report.mbit_per_s()
    );
    ensure!(
        sent == PINGS && received == sent,
        "{} of {sent} pings lost during the rotation",
        sent - received
    );

    // Every node has a new key.
    let new_a = node_keys(&lab.a)?;
    let new_b = node_keys(&lab.b)?;
    for (old, new) in [(&old_a, &new_a), (&old_b, &new_b)] {
        ensure!(old.len() == new.len(), "{old:?} -> {new:?}");
        for (node, key) in old {
            ensure!(
                new.get(node).is_some_and(|k| k != key),
                "{node} kept its key {key}"
            );
        }
    }

    // An initiation to b1's old key (naming a1's new key, valid mac1) gets no answer,
    // and b1 counts it, once b1 has let the old key go (every peer proved the new one).
    let old_b1: PublicKey = old_b["b1"].parse()?;
    let new_a1: PublicKey = new_a["a1"].parse()?;
    let forger = Forger::new(
        &X25519Public::from(*old_b1.as_bytes()),
        &X25519Public::from(*new_a1.as_bytes()),
    )?;
    let endpoint: SocketAddr = format!("{}:51820", b1.host.underlay_ip()).parse()?;
    let retired = |scrape: &Exposition| {
        scrape
            .value("wiremesh_drops_total", &[("reason", "retired_key")])
            .unwrap_or(0.0)
    };
    let scrape = || -> Result<Exposition> {
        http_get(&b1.host, METRICS, "/metrics")?
            .parse()
            .context("parsing b1's metrics")
    };
    let took = wait_for(Duration::from_secs(60), || {
        let initiation = forger.initiation(0x5157, None);
        let answers = in_netns(&a1.host, move || send_and_listen(endpoint, &initiation))?;
        ensure!(answers == 0, "b1 answered an initiation to its old key");
        thread::sleep(Duration::from_millis(1100));
        let count = retired(&scrape()?);
        ensure!(count >= 1.0, "b1 counted no retired_key drop yet");
        Ok(())
    })?;
    let before = retired(&scrape()?);
    let mut answers = 0;
    for i in 0..5 {
        let initiation = forger.initiation(0x5160 + i, None);
        answers += in_netns(&a1.host, move || send_and_listen(endpoint, &initiation))?;
    }
    thread::sleep(Duration::from_millis(1100));
    let after = retired(&scrape()?);
    println!(
        "initiations to b1's old key refused {took:?} after the rotation: 5 more sent, \
         {answers} answered, retired_key drops {before} -> {after}"
    );
    ensure!(answers == 0, "b1 answered initiations to its old key");
    ensure!(after >= before + 5.0, "retired_key {before} -> {after}");
    // Traffic goes on under the new keys.
    for a in &lab.a.nodes {
        for b in &lab.b.nodes {
            ping(&a.pod, b.pod.ip(), 1)?;
        }
    }
    transfer(&lab.a.node("a2")?.pod, lab.b.node("b2")?.pod.ip(), 4 * MIB)?;
    println!("took {:?} in all", started.elapsed());
    Ok(())
}

/// Node name -> public key of every MeshNode of kind Node in `cluster`.
fn node_keys(cluster: &Cluster) -> Result<BTreeMap<String, String>> {
    let nodes: Api<MeshNode> = Api::all(cluster.client()?);
    Ok(block_on(nodes.list(&ListParams::default()))?
        .items
        .into_iter()
        .filter(|n| n.spec.kind == MeshNodeKind::Node)
        .map(|n| (kube::ResourceExt::name_any(&n), n.spec.public_key))
        .collect())
}

/// `count` pings 10 ms apart from `pod` to `to`: (transmitted, received).
fn counted_pings(pod: &Pod, to: &str, count: u32) -> Result<(u32, u32)> {
    let count_s = count.to_string();
    let deadline = Duration::from_secs(u64::from(count) / 100 + 30);
    let out = pod.exec_timeout(
        &[
            "ping", "-q", "-n", "-i", "0.01", "-W", "2", "-c", &count_s, to,
        ],
        deadline,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no ping summary in {text}"))?;
    let number = |word: &str| -> Result<u32> {
        let before = summary
            .split(',')
            .find(|part| part.contains(word))
            .ok_or_else(|| anyhow!("no {word:?} in {summary}"))?;
        before
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow!("no count in {summary}"))?
            .parse()
            .with_context(|| format!("parsing {summary}"))
    };
    Ok((number("transmitted")?, number("received")?))
}

/// Sends `datagram` to `to` from a fresh socket and counts what comes back within 1 s.
fn send_and_listen(to: SocketAddr, datagram: &[u8]) -> Result<usize> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    socket.send_to(datagram, to)?;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut answers = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if socket.recv_from(&mut buf).is_ok() {
            answers += 1;
        }
    }
    Ok(answers)
}
