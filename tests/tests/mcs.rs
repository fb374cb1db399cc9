//! Multi-Cluster Services end to end (issue 13), on one three-cluster lab with real
//! Services: kube-controller-manager, kube-proxy (nftables) and CoreDNS per cluster
//! (`wiremesh_lab::services`), configured by `meshctl install --configure-dns`. Needs root
//! and the binaries of `scripts/deps.sh --k8s`. Every measured time is printed.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use wiremesh_lab::clusters::{CONVERGE, Side, TwoClusters, wait_for};
use wiremesh_lab::services::{
    self, Binaries, ClusterServices, apply_cluster, bind_pod, cluster_ip, object,
};
use wiremesh_lab::{Pod, Proc, reachable};

/// The service every scenario calls, on TCP 8080 named `http`.
const NAMESPACE: &str = "demo";
const HELLO: &str = "hello";
const PORT: u16 = 8080;
/// Its second port, `xfer`, for checksummed transfers (`wm-xfer`).
const XFER_PORT: u16 = 9000;

#[test]
fn multi_cluster_services() -> Result<()> {
    let started = Instant::now();
    let bins = Binaries::build()?;
    let lab = TwoClusters::three(1)?;
    for (x, y) in [(Side::A, Side::B), (Side::A, Side::C), (Side::B, Side::C)] {
        lab.join_pair(x, y)?;
    }
    let took = converge(&lab)?;
    println!("three clusters joined, every pod pair reachable after {took:.1?}");
    let mut services = Vec::new();
    for side in [Side::A, Side::B, Side::C] {
        let s = ClusterServices::start(&lab, side, &bins)?;
        ensure!(
            s.install_output.contains("clusterset.local added")
                && s.install_output.contains("serviceimports"),
            "meshctl install --configure-dns did not configure CoreDNS:\n{}",
            s.install_output
        );
        services.push(s);
    }
    println!(
        "lab with Services up after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let again = lab.meshctl(&[
        "--context",
        "cluster-a",
        "install",
        "--cluster-name",
        "cluster-a",
        "--pod-cidr",
        &Side::A.pod_range(),
        "--host-cidr",
        &Side::A.host_range(),
    ])?;
    let again = String::from_utf8_lossy(&again.stdout).into_owned();
    ensure!(
        again.contains("CoreDNS 1.15.0 answers clusterset.local"),
        "a second install does not see CoreDNS configured:\n{again}"
    );

    local_service(&lab, Side::B)?;

    println!("mcs: whole test {:.1} s", started.elapsed().as_secs_f64());
    drop(services);
    Ok(())
}

/// A Service inside one cluster, through the lab's own machinery: its name from CoreDNS,
/// its VIP from kube-proxy, its endpoints from the EndpointSlice controller, and a pod that
/// goes NotReady leaves the rotation.
fn local_service(lab: &TwoClusters, side: Side) -> Result<()> {
    let cluster = lab.cluster(side);
    let client = cluster.client()?;
    let node = cluster.nodes.first().context("no node")?;
    let backends = hello_pods(lab, side, &client, 2)?;
    create_hello_service(&client)?;
    let started = Instant::now();
    let name = format!("{HELLO}.{NAMESPACE}.svc.cluster.local");
    let vip = cluster_ip(&client, NAMESPACE, HELLO)?;
    wait_for(Duration::from_secs(20), || {
        ensure!(
            resolve(&node.pod, &name)? == Some(vip),
            "{name} not yet {vip}"
        );
        Ok(())
    })?;
    let answers = calls(&node.pod, vip, 200)?;
    println!(
        "{}: {name} -> {vip} after {:.2} s; 200 calls: {answers:?}",
        side.name(),
        started.elapsed().as_secs_f64()
    );
    for (pod, _) in &backends {
        ensure!(
            answers.get(pod.name()).copied().unwrap_or(0) > 0,
            "{} got no call: {answers:?}",
            pod.name()
        );
    }
    let pods: Vec<&Pod> = backends.iter().map(|(p, _)| p).collect();
    let took = Instant::now();
    let receiver = transfer_via(&node.pod, vip, XFER_PORT, &pods)?;
    println!(
        "{}: 8 MiB through {vip}:{XFER_PORT} to {receiver} intact in {:.2} s",
        side.name(),
        took.elapsed().as_secs_f64()
    );
    let (first, _) = backends.first().context("no backend")?;
    services::set_pod_ready(&client, NAMESPACE, first.name(), false)?;
    let out = Instant::now();
    wait_for(Duration::from_secs(10), || {
        let answers = calls(&node.pod, vip, 20)?;
        ensure!(
            !answers.contains_key(first.name()),
            "{} still answers: {answers:?}",
            first.name()
        );
        Ok(())
    })?;
    println!(
        "{}: NotReady pod out of the VIP's rotation after {:.2} s",
        side.name(),
        out.elapsed().as_secs_f64()
    );
    services::set_pod_ready(&client, NAMESPACE, first.name(), true)?;
    Ok(())
}

/// `count` pods behind `side`'s first node running `wm-hello` (named after their pod),
/// with Pod objects labelled `app=hello` in namespace `demo` (created if absent).
fn hello_pods(
    lab: &TwoClusters,
    side: Side,
    client: &Client,
    count: usize,
) -> Result<Vec<(Pod, Proc)>> {
    let node = lab.cluster(side).nodes.first().context("no node")?;
    apply_cluster(
        client,
        &object::<Namespace>(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NAMESPACE },
        }))?,
    )?;
    let hello = services::hello_binary()?;
    let hello = hello.to_str().context("path")?.to_owned();
    let mut pods = Vec::new();
    for i in 0..count {
        let name = format!("{}-hello{i}", node.name);
        let pod = node.host.add_pod(&name)?;
        let listen = SocketAddr::from((pod.ip(), PORT)).to_string();
        let server = pod.spawn(&[&hello, "serve", "--listen", &listen, "--name", &name])?;
        bind_pod(
            client,
            NAMESPACE,
            &name,
            &[("app", HELLO)],
            &pod,
            &node.name,
            None,
        )?;
        pods.push((pod, server));
    }
    Ok(pods)
}

fn create_hello_service(client: &Client) -> Result<Service> {
    services::apply(
        client,
        NAMESPACE,
        &object::<Service>(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": HELLO, "namespace": NAMESPACE },
            "spec": {
                "selector": { "app": HELLO },
                "ports": [
                    { "name": "http", "port": PORT, "protocol": "TCP", "targetPort": PORT },
                    { "name": "xfer", "port": XFER_PORT, "protocol": "TCP", "targetPort": XFER_PORT },
                ],
            },
        }))?,
    )
}

/// `getent ahostsv4 name` in `pod`: the first address, `None` when it does not resolve.
fn resolve(pod: &Pod, name: &str) -> Result<Option<Ipv4Addr>> {
    let out = pod.exec(&["getent", "ahostsv4", name])?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok()))
}

/// `count` calls of `wm-hello get` to `vip:8080` from `pod`, 5 ms apart: answers by name;
/// any failure is an error.
fn calls(pod: &Pod, vip: Ipv4Addr, count: u32) -> Result<BTreeMap<String, u32>> {
    let hello = services::hello_binary()?;
    let to = SocketAddr::from((vip, PORT)).to_string();
    let count_s = count.to_string();
    let out = pod.exec_ok(&[
        hello.to_str().context("path")?,
        "get",
        "--to",
        &to,
        "--count",
        &count_s,
        "--interval-ms",
        "5",
    ])?;
    let mut answers = BTreeMap::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, _, "ok", name] => *answers.entry((*name).to_owned()).or_insert(0) += 1,
            _ => anyhow::bail!("a call to {to} failed: {line}"),
        }
    }
    Ok(answers)
}

/// Waits until every node's pod reaches every other cluster's; returns how long it took.
fn converge(lab: &TwoClusters) -> Result<Duration> {
    let start = Instant::now();
    let nodes: Vec<_> = lab.all_nodes().collect();
    for x in &nodes {
        for y in nodes.iter().filter(|y| y.side != x.side) {
            wait_for(CONVERGE, || {
                ensure!(reachable(&x.pod, y.pod.ip())?, "{} -> {}", x.name, y.name);
                Ok(())
            })?;
        }
    }
    Ok(start.elapsed())
}

/// Sends 8 MiB with `wm-xfer` from `from` to `vip:port`, with a receiver on every pod of
/// `backends` (whichever kube-proxy picks takes it); checks byte count and SHA-256 agree.
fn transfer_via(from: &Pod, vip: Ipv4Addr, port: u16, backends: &[&Pod]) -> Result<String> {
    let xfer = wiremesh_lab::xfer_binary()?;
    let xfer = xfer.to_str().context("path")?;
    let mut receivers = Vec::new();
    for pod in backends {
        let listen = SocketAddr::from((pod.ip(), port)).to_string();
        receivers.push((
            pod.name().to_owned(),
            pod.spawn(&[xfer, "recv", "--listen", &listen, "--timeout", "60"])?,
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    let to = SocketAddr::from((vip, port)).to_string();
    let bytes = (8 * wiremesh_lab::MIB).to_string();
    let sent = from.exec_ok(&[
        xfer,
        "send",
        "--to",
        &to,
        "--bytes",
        &bytes,
        "--timeout",
        "60",
    ])?;
    let sent = sent.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (name, receiver) in &receivers {
            if !receiver.is_running() {
                let got = receiver.stdout();
                ensure!(
                    got.trim() == sent,
                    "through {to}: sent {sent}, {name} received {}",
                    got.trim()
                );
                return Ok(name.clone());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no receiver finished the transfer through {to}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
