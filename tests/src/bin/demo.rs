//! `make demo`: two hosts in network namespaces linked by Wiremesh, a ping and a
//! checksummed transfer between their pods, proof on the underlay that it was encrypted,
//! then teardown (or, with `KEEP=1`, the lab stays until Ctrl-C).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::{SigSet, Signal};
use wiremesh_lab::mesh::{IFACE, Node, capture_during};
use wiremesh_lab::{Lab, ping, transfer};

const MIB: u64 = 1 << 20;
/// What `ping -p` repeats in each echo payload; it must never be seen on the underlay.
const MARKER_HEX: &str = "57495245204d455348";
const MARKER: &[u8] = b"WIRE MESH";

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
    step("building the lab: an underlay bridge (198.18.0.0/16), two hosts, a pod behind each");
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    eprintln!("    lab prefix {}", lab.prefix());
    for n in [&a, &b] {
        eprintln!(
            "    host {}: underlay {}, pod CIDR {}, pod {} at {}",
            n.host.name(),
            n.host.underlay_ip(),
            n.host.pod_cidr(),
            n.pod.name(),
            n.pod.ip()
        );
    }

    step("without Wiremesh, pod a cannot reach pod b");
    let out = a
        .pod
        .exec(&["ping", "-n", "-c", "1", "-W", "1", &b.pod.ip().to_string()])?;
    ensure!(
        !out.status.success(),
        "pod b was reachable without a tunnel"
    );
    eprintln!("    ping {}: no answer, as expected", b.pod.ip());

    step("starting wiremesh-agent on both hosts (wg-quick style config, interface wm0)");
    a.start(&[b.as_peer(true)])?;
    b.start(&[a.as_peer(true)])?;

    step("ping between the pods, both ways");
    ping(&a.pod, b.pod.ip(), 3)?;
    ping(&b.pod, a.pod.ip(), 3)?;
    eprintln!("    {} <-> {}: ok", a.pod.ip(), b.pod.ip());

    step("64 MiB pod a -> pod b, checksummed, while watching the underlay");
    let target = b.pod.ip().to_string();
    let (capture, report) = capture_during(lab.default_underlay(), MARKER, || {
        a.pod.exec_ok(&[
            "ping", "-n", "-c", "5", "-i", "0.2", "-p", MARKER_HEX, &target,
        ])?;
        transfer(&a.pod, b.pod.ip(), 64 * MIB)
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
    ensure!(
        capture.other_ipv4 == 0,
        "unencrypted IPv4 crossed the underlay"
    );
    ensure!(capture.wireguard_data > 0, "no WireGuard traffic was seen");

    step("wg show wm0 on host a (the stock wireguard-tools, over our UAPI socket)");
    eprintln!("{}", a.wg(&["show", IFACE])?);

    if keep {
        let pid = a.agent.as_ref().map(|p| p.pid()).context("agent a")?;
        step("KEEP=1: the lab stays up until Ctrl-C");
        eprintln!(
            "    ip netns exec {} ping {}\n    nsenter -t {pid} -m -n wg show\n    ip netns exec {} curl -s 127.0.0.1:9586/metrics",
            wiremesh_lab::Netns::name(&a.pod),
            b.pod.ip(),
            wiremesh_lab::Netns::name(&a.host)
        );
        let _ = signals.wait();
    }
    step(&format!(
        "tearing down (demo took {:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    drop(lab);
    eprintln!("    done: no namespace, device or process left");
    Ok(())
}
