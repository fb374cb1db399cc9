//! `make demo`: two Kubernetes clusters (real control planes, lab hosts as nodes) linked
//! with `meshctl join`, a checksummed pod-to-pod transfer across them, proof on the
//! underlay that it was encrypted, `meshctl status`, a Service exported from cluster-b and
//! called by its `clusterset.local` name from a pod in cluster-a, then teardown (or, with
//! `KEEP=1`, the lab stays until Ctrl-C).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::{SigSet, Signal};
use wiremesh_lab::clusters::{Side, TwoClusters, wait_for};
use wiremesh_lab::mesh::{IFACE, capture_during};
use wiremesh_lab::services::{self, Binaries, ClusterServices};
use wiremesh_lab::{MIB, output_text, ping, transfer};

/// What `ping -p` repeats in each echo payload; it must never be seen on the underlay.
const MARKER_HEX: &str = "57495245204d455348";
const MARKER: &[u8] = b"WIRE MESH";
/// The port of the demo's exported Service.
const HELLO_PORT: u16 = 8080;

fn main() -> ExitCode {
    // Block SIGINT/SIGTERM now so that, with KEEP=1, we can wait for them and still tear
    // the lab down (threads inherit the mask).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    let keep = std::env::var("KEEP").is_ok_and(|v| v == "1");
    if keep && signals.thread_block().is_err() {
        eprintln!("error: cannot block signals");
        return ExitCode::FAILURE;
    }
    match run(keep, &signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(text: &str) {
    eprintln!("\n==> {text}");
}

fn run(keep: bool, signals: &SigSet) -> Result<()> {
    let started = Instant::now();
    step(
        "two Kubernetes clusters: real etcd + kube-apiserver each, two nodes each (lab hosts on one underlay), a pod per node",
    );
    let lab = TwoClusters::new(2)?;
    for cluster in [&lab.a, &lab.b] {
        eprintln!(
            "    {} (pods {}): API server {}",
            cluster.side.name(),
            cluster.side.pod_range(),
            cluster.plane.server()
        );
        for n in &cluster.nodes {
            eprintln!(
                "      node {}: underlay {}, pod CIDR {}, pod at {}, agent in Kubernetes mode",
                n.name,
                n.host.underlay_ip(),
                n.pod_cidr(),
                n.pod.ip()
            );
        }
    }
    let (a1, b2) = (lab.a.node("a1")?, lab.b.node("b2")?);

    step("before the join, pod a1 cannot reach pod b2");
    let out = a1
        .pod
        .exec(&["ping", "-n", "-c", "1", "-W", "1", &b2.pod.ip().to_string()])?;
    ensure!(
        !out.status.success(),
        "pod b2 was reachable before the join"
    );
    eprintln!("    ping {}: no answer, as expected", b2.pod.ip());

    step("meshctl join cluster-b --context cluster-a");
    eprint!("{}", lab.join()?);

    step("waiting for the controllers to mirror the nodes and the agents to build tunnels");
    let took = wait_for(Duration::from_secs(60), || {
        ping(&a1.pod, b2.pod.ip(), 1)?;
        Ok(())
    })?;
    eprintln!(
        "    pod a1 reaches pod b2 {:.1} s after the join",
        took.as_secs_f64()
    );
    ping(&b2.pod, a1.pod.ip(), 2)?;

    step("64 MiB pod a1 -> pod b2, checksummed, while watching the underlay");
    let target = b2.pod.ip().to_string();
    let (capture, report) = capture_during(lab.lab.default_underlay(), MARKER, || {
        a1.pod.exec_ok(&[
            "ping", "-n", "-c", "5", "-i", "0.2", "-p", MARKER_HEX, &target,
        ])?;
        transfer(&a1.pod, b2.pod.ip(), 64 * MIB)
    })?;
    eprintln!(
        "    {} bytes, SHA-256 {} on both ends, {:.0} Mbit/s",
        report.bytes,
        report.sha256,
        report.mbit_per_s()
    );
    eprintln!(
        "    underlay: {} frames, {} WireGuard UDP/51820 ({} data messages), {} other IPv4; plaintext {:?} seen {} times",
        capture.frames,
        capture.wireguard,
        capture.wireguard_data,
        capture.other_ipv4,
        String::from_utf8_lossy(MARKER),
        capture.marker_hits
    );
    ensure!(capture.marker_hits == 0, "plaintext crossed the underlay");
    ensure!(capture.wireguard_data > 0, "no WireGuard traffic was seen");

    step("meshctl status --context cluster-a");
    // The agents write their tunnel status every 10 s.
    std::thread::sleep(Duration::from_secs(10));
    let status = lab.meshctl(&["--context", "cluster-a", "status"])?;
    eprint!("{}", String::from_utf8_lossy(&status.stdout));

    step("wg show wm0 on node a1 (the stock wireguard-tools, over our UAPI socket)");
    eprintln!("{}", a1.wg(&["show", IFACE])?);

    step(
        "Services: kube-controller-manager, kube-proxy and CoreDNS in each cluster; meshctl install --configure-dns",
    );
    let bins = Binaries::build()?;
    let machinery = [Side::A, Side::B]
        .into_iter()
        .map(|side| ClusterServices::start(&lab, side, &bins))
        .collect::<Result<Vec<_>>>()?;
    step("cluster-b: Service demo/hello on pod b2-hello; meshctl export hello -n demo");
    let b2 = lab.b.node("b2")?;
    let client_b = lab.b.client()?;
    let hello_pod = services::hello_pod(&client_b, b2, "demo", "b2-hello", "hello", HELLO_PORT)?;
    services::hello_service(&client_b, "demo", "hello", HELLO_PORT)?;
    let out = lab.meshctl(&["--context", "cluster-b", "export", "hello", "-n", "demo"])?;
    ensure!(
        out.status.success(),
        "meshctl export: {}",
        output_text(&out)
    );
    eprint!("{}", output_text(&out));
    let exported = Instant::now();
    // A service is imported only where its namespace exists.
    services::create_namespace(&lab.a.client()?, "demo")?;
    step("pod a1: hello.demo.svc.clusterset.local, by name (namespace demo exists in cluster-a)");
    let name = "hello.demo.svc.clusterset.local";
    let mut vip = None;
    wait_for(Duration::from_secs(30), || {
        let out = a1.pod.exec(&["getent", "ahostsv4", name])?;
        vip = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok());
        ensure!(vip.is_some(), "{name} does not resolve yet");
        Ok(())
    })?;
    let vip = vip.context("no address")?;
    let hello = services::hello_binary()?;
    let to = format!("{vip}:{HELLO_PORT}");
    let mut answers = String::new();
    wait_for(Duration::from_secs(20), || {
        answers = a1.pod.exec_ok(&[
            hello.to_str().context("path")?,
            "get",
            "--to",
            &to,
            "--count",
            "3",
            "--interval-ms",
            "100",
        ])?;
        ensure!(
            answers.lines().count() == 3 && answers.lines().all(|l| l.ends_with(" ok b2-hello")),
            "answers: {answers}"
        );
        Ok(())
    })?;
    eprintln!(
        "    {name} -> {vip} (the ServiceImport's VIP in cluster-a); 3 calls answered by b2-hello, {:.1} s after the export",
        exported.elapsed().as_secs_f64()
    );

    if keep {
        let pid = a1.agent.as_ref().map(|p| p.pid()).context("agent a1")?;
        step("KEEP=1: the lab stays up until Ctrl-C");
        eprintln!(
            "    ip netns exec {} ping {}\n    nsenter -t {pid} -m -n wg show\n    meshctl --kubeconfig {} --context cluster-a status",
            wiremesh_lab::Netns::name(&a1.pod),
            b2.pod.ip(),
            lab.kubeconfig.display()
        );
        let _ = signals.wait();
    }
    step(&format!(
        "tearing down (demo took {:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    drop(hello_pod);
    drop(machinery);
    drop(lab);
    eprintln!("    done: no namespace, device or process left");
    Ok(())
}
