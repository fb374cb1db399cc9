//! The mesh fails closed (issue 12 §2): whatever state an agent is in (stopped, crashed,
//! restarting, a rolling update, a peer removed by policy), no packet for a linked
//! cluster's pods crosses the underlay in plaintext; a restart in the middle of a transfer
//! costs a short gap and no byte; an agent restarted while its API server is down has its
//! tunnels from the cache. A linked cluster's whole granted range is closed from the
//! moment it is linked, before any of its nodes is routed.
//! Needs root.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use kube::Api;
use wiremesh_lab::clusters::{CONVERGE, Side, TwoClusters, wait_for};
use wiremesh_lab::k8s;
use wiremesh_lab::mesh::{self, IFACE, capture_during};
use wiremesh_lab::{MIB, Netns, Proc, agent_binary, ping, transfer};
use wiremesh_proto::crd::MeshNode;

/// What the marked pings carry; `ping -p` repeats it through the payload.
const MARKER: &[u8] = b"FAILCLOSED";
/// [`MARKER`] in hex, for `ping -p`.
const MARKER_HEX: &str = "4641494c434c4f534544";
/// The pods' rate during the transfers that outlive a restart: 40 MiB at 100 Mbit/s
/// last some 3.5 s, time to restart the agent in the middle.
const RATE: &str = "100mbit";
const TRANSFER: u64 = 40 * MIB;
/// The VXLAN device of step 0b, on a1 and on b1.
const VXLAN: &str = "wmvx0";

#[test]
fn the_mesh_fails_closed_and_a_restart_loses_nothing() -> Result<()> {
    let started = Instant::now();
    let mut lab = TwoClusters::dual_stack(1)?;
    println!("{}", lab.join()?);
    let underlay = lab.lab.default_underlay().clone();
    let (b1_ip, b1_ip6, b1_cidr, b1_cidr6, b1_underlay) = {
        let b1 = lab.b.node("b1")?;
        (
            b1.pod.ip(),
            b1.pod.ip6().context("b1's pod has no IPv6 address")?,
            b1.pod_cidr(),
            b1.pod_cidr6().context("b1 has no IPv6 pod CIDR")?,
            b1.host.underlay_ip(),
        )
    };
    let took = wait_for(CONVERGE, || ping(&lab.a.node("a1")?.pod, b1_ip, 1))?;
    println!("a1 -> b1 reachable {took:?} after the join");

    // 0. A compromised b1 (root on the node: it sets its own agent's allowed IPs and
    // routes) sends into its tunnel to a1 a packet for a1's link-local "metadata service"
    // (169.254.169.254, which answers on a1) from b1's pod: a1 delivers only to its
    // cluster's own ranges, or on to another peer, so it drops them as bad_destination and
    // nothing answers. Without that rule a1 would route them anywhere it reaches.
    {
        let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
        a1.host
            .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
        let a1_key = a1.wg(&["show", IFACE, "public-key"])?.trim().to_owned();
        let allowed = b1.wg(&["show", IFACE, "allowed-ips"])?;
        let current = allowed
            .lines()
            .find(|l| l.starts_with(&a1_key))
            .and_then(|l| l.split_once('\t'))
            .map(|(_, ips)| ips.split_whitespace().collect::<Vec<_>>().join(","))
            .context("b1 has no allowed IPs for a1")?;
        let widened = format!("{current},169.254.169.254/32");
        b1.wg(&["set", IFACE, "peer", &a1_key, "allowed-ips", &widened])?;
        b1.host
            .ip(&["route", "replace", "169.254.169.254/32", "dev", IFACE])?;
        let drops = || mesh::drops(&a1.host, "bad_destination");
        let before = drops()?;
        let metadata: IpAddr = "169.254.169.254".parse()?;
        let out = mesh::marked_pings(&b1.pod, metadata, 3, MARKER_HEX, "1")?;
        let after = drops()?;
        b1.host
            .ip(&["route", "del", "169.254.169.254/32", "dev", IFACE])?;
        b1.wg(&["set", IFACE, "peer", &a1_key, "allowed-ips", &current])?;
        println!(
            "compromised b1 -> a1's 169.254.169.254 through the tunnel: {}; a1 counted bad_destination {before} -> {after}",
            if out.status.success() {
                "ANSWERED"
            } else {
                "no answer"
            }
        );
        ensure!(
            !out.status.success(),
            "a peer reached a1's link-local address through the tunnel"
        );
        ensure!(after >= before + 3.0, "bad_destination {before} -> {after}");
        ping(&b1.pod, lab.a.node("a1")?.pod.ip(), 1)?;
    }

    // 0b. The same b1 wraps a frame in VXLAN on flannel's port 8472, from its own pod
    // gateway (a source it holds) to a1's (in cluster-a's pod range), as flannel's
    // `flannel.1` would unwrap it on any address of its node: the inner packet could
    // claim any source. a1 runs such a device; it must never see one of them
    // (`encapsulated`), while b1's pod still reaches a1's.
    {
        let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
        let (a1_gw, b1_gw) = (
            a1.host.pod_gateway().to_string(),
            b1.host.pod_gateway().to_string(),
        );
        fn vxlan(local: &str) -> [&str; 12] {
            [
                "link",
                "add",
                VXLAN,
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "8472",
                "local",
                local,
                "nolearning",
            ]
        }
        a1.host.ip(&vxlan(&a1_gw))?;
        a1.host.ip(&["link", "set", VXLAN, "up"])?;
        b1.host.ip(&vxlan(&b1_gw))?;
        b1.host.ip(&["link", "set", VXLAN, "up"])?;
        b1.host
            .ip(&["addr", "add", "10.250.0.9/24", "dev", VXLAN])?;
        b1.host.ip(&[
            "neigh",
            "add",
            "10.250.0.1",
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            VXLAN,
            "nud",
            "permanent",
        ])?;
        b1.host.exec(&[
            "bridge",
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            VXLAN,
            "dst",
            &a1_gw,
        ])?;
        let unwrapped = || -> Result<u64> {
            let out = a1.host.exec(&[
                "cat",
                &format!("/sys/class/net/{VXLAN}/statistics/rx_packets"),
            ])?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
        };
        let drops = || mesh::drops(&a1.host, "encapsulated");
        let before = drops()?;
        let a1_pod_ip: IpAddr = a1.pod.ip().into();
        let _ = b1.host.exec_timeout(
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "3",
                "-i",
                "0.05",
                "-W",
                "0.3",
                "10.250.0.1",
            ],
            Duration::from_secs(5),
        )?;
        // The agent's counters reach /metrics on its next tick.
        let counted = wait_for(Duration::from_secs(5), || {
            let after = drops()?;
            ensure!(after >= before + 3.0, "encapsulated {before} -> {after}");
            Ok(())
        });
        let (after, seen) = (drops()?, unwrapped()?);
        b1.host.ip(&["link", "del", VXLAN])?;
        a1.host.ip(&["link", "del", VXLAN])?;
        println!(
            "compromised b1 -> VXLAN to a1's pod gateway {a1_gw}:8472: a1 unwrapped {seen}; a1 counted encapsulated {before} -> {after}"
        );
        ensure!(seen == 0, "a1 unwrapped {seen} VXLAN frames from a peer");
        counted?;
        ping(&b1.pod, a1_pod_ip, 1)?;
    }

    {
        let a1 = lab.a.node("a1")?;
        // a1's default route leads onto the underlay, to b1's underlay address, as a cloud
        // VM's leads to its VPC router: without a route of Wiremesh's, b1's pods are
        // reachable that way, in plaintext.
        a1.host.set_default_route(b1_underlay)?;
        let closed = a1.host.ip(&["route", "show", "proto", "0x58"])?;
        ensure!(closed.contains(&b1_cidr), "no fail-closed route: {closed}");
        let closed6 = a1.host.ip(&["-6", "route", "show", "proto", "0x58"])?;
        ensure!(
            closed6.contains(&b1_cidr6),
            "no IPv6 fail-closed route: {closed6}"
        );
        ping(&a1.pod, b1_ip6, 1)?;
        // Both clusters' pods limited, so that a transfer lasts a few seconds.
        for pod in [&a1.pod, &lab.b.node("b1")?.pod] {
            pod.exec_ok(&[
                "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", RATE, "burst",
                "64kb", "latency", "50ms",
            ])?;
        }
    }

    // 1. The agent stopped (SIGTERM: it removes its routes and its device), then crashed
    // (SIGKILL: the kernel removes them): marked pings to b1's pod while it is down.
    for signal in ["TERM", "KILL"] {
        let (capture, ()) = capture_during(&underlay, MARKER, || {
            lab.stop_agent(Side::A, "a1", signal)?;
            let a1 = lab.a.node("a1")?;
            marked_pings(&a1.pod, b1_ip.into(), 100)?;
            marked_pings(&a1.pod, b1_ip6.into(), 20)?;
            // The unreachable route answers the lookup itself.
            let lookup = a1
                .host
                .exec(&["ip", "-6", "route", "get", &b1_ip6.to_string()])?;
            let said = String::from_utf8_lossy(&lookup.stderr);
            ensure!(
                !lookup.status.success() && said.contains("No route to host"),
                "IPv6 route to b1's pod with the agent down: {}{said}",
                String::from_utf8_lossy(&lookup.stdout)
            );
            Ok(())
        })?;
        println!(
            "SIG{signal}, agent down, 120 marked pings: {} frames on the underlay, plaintext seen {} times",
            capture.frames, capture.marker_hits
        );
        ensure!(
            capture.marker_hits == 0,
            "SIG{signal}: plaintext for b1's pod crossed the underlay {} times",
            capture.marker_hits
        );
        lab.restart_agent(Side::A, "a1")?;
        wait_for(CONVERGE, || ping(&lab.a.node("a1")?.pod, b1_ip, 1))?;
    }

    // 2. Restarts in the middle of a transfer, with marked pings all along.
    for signal in ["TERM", "KILL"] {
        let (capture, (report, gap)) = capture_during(&underlay, MARKER, || {
            let pings = spawn_marked_pings(&lab.a.node("a1")?.pod, b1_ip, 500)?;
            let result = thread::scope(|scope| -> Result<_> {
                let a1_pod = lab.a.node("a1")?.pod.clone();
                let sending = scope.spawn(move || transfer(&a1_pod, b1_ip, TRANSFER));
                thread::sleep(Duration::from_millis(1500));
                let host = lab.a.node("a1")?.host.clone();
                let old = link_index(&host);
                let (exited, _) = lab.stop_agent(Side::A, "a1", signal)?;
                let first = scope.spawn(move || first_packet_through(&host, old, exited));
                lab.restart_agent(Side::A, "a1")?;
                let gap = first
                    .join()
                    .map_err(|_| anyhow::anyhow!("the packet watch panicked"))??;
                let report = sending
                    .join()
                    .map_err(|_| anyhow::anyhow!("the transfer panicked"))??;
                Ok((report, gap))
            });
            let _ = pings.wait_with_timeout(Duration::from_secs(20));
            result
        })?;
        println!(
            "SIG{signal} then start during a {} MiB transfer: intact (SHA-256 {}), gap from the old agent's exit to the first packet through the new one: {:.0} ms; plaintext seen {} times",
            report.bytes / MIB,
            report.sha256,
            gap.as_secs_f64() * 1000.0,
            capture.marker_hits
        );
        ensure!(
            capture.marker_hits == 0,
            "restart after SIG{signal}: plaintext crossed the underlay {} times",
            capture.marker_hits
        );
    }

    // 3. A DaemonSet rolling update: each node's agent stopped and the new one started,
    // one node at a time, under a long transfer; b1's default route leads onto the
    // underlay too, so that its replies would show there.
    let a1_underlay = lab.a.node("a1")?.host.underlay_ip();
    lab.b.node("b1")?.host.set_default_route(a1_underlay)?;
    let (capture, report) = capture_during(&underlay, MARKER, || {
        let pings = spawn_marked_pings(&lab.a.node("a1")?.pod, b1_ip, 700)?;
        let result = thread::scope(|scope| -> Result<_> {
            let a1_pod = lab.a.node("a1")?.pod.clone();
            let sending = scope.spawn(move || transfer(&a1_pod, b1_ip, 2 * TRANSFER));
            for (side, name) in [(Side::A, "a1"), (Side::B, "b1")] {
                thread::sleep(Duration::from_millis(1500));
                lab.stop_agent(side, name, "TERM")?;
                lab.restart_agent(side, name)?;
            }
            sending
                .join()
                .map_err(|_| anyhow::anyhow!("the transfer panicked"))?
        });
        let _ = pings.wait_with_timeout(Duration::from_secs(20));
        result
    })?;
    println!(
        "rolling update (a1 then b1) during a {} MiB transfer: intact (SHA-256 {}); {} WireGuard data frames, plaintext seen {} times",
        report.bytes / MIB,
        report.sha256,
        capture.wireguard_data,
        capture.marker_hits
    );
    ensure!(
        capture.marker_hits == 0,
        "rolling update: plaintext crossed the underlay {} times",
        capture.marker_hits
    );

    // 4. A restart while the API server is down: the tunnels come from the cache.
    lab.a.plane.pause()?;
    let outage = (|| -> Result<Duration> {
        lab.stop_agent(Side::A, "a1", "TERM")?;
        let restarted = Instant::now();
        lab.restart_agent(Side::A, "a1")?;
        wait_for(Duration::from_secs(20), || {
            ping(&lab.a.node("a1")?.pod, b1_ip, 1)
        })?;
        let took = restarted.elapsed();
        let a1 = lab.a.node("a1")?;
        let report = transfer(&a1.pod, b1_ip, 4 * MIB)?;
        ensure!(report.bytes == 4 * MIB);
        Ok(took)
    })();
    lab.a.plane.resume()?;
    let took = outage?;
    println!(
        "agent restarted with cluster-a's API server down: b1's pod reachable {took:?} after the start, from the cached peers"
    );
    wait_for(CONVERGE, || ping(&lab.a.node("a1")?.pod, b1_ip, 1))?;

    // 5. The peer removed by policy: b1's Node is deleted, so its MeshNode, and cluster-a's
    // MeshPeer for it, go; a1 drops the tunnel and its route.
    k8s::delete_node(&lab.b.client()?, "b1")?;
    wait_for(CONVERGE, || {
        let routes = lab.a.node("a1")?.routes()?;
        ensure!(!routes.contains(&b1_cidr), "route still there: {routes}");
        Ok(())
    })?;
    let (capture, ()) = capture_during(&underlay, MARKER, || {
        marked_pings(&lab.a.node("a1")?.pod, b1_ip.into(), 100)
    })?;
    println!(
        "MeshPeer b1 deleted: 100 marked pings, plaintext seen {} times",
        capture.marker_hits
    );
    ensure!(
        capture.marker_hits == 0,
        "peer removed: plaintext crossed the underlay {} times",
        capture.marker_hits
    );

    // 6. `wiremesh-agent cleanup`, the user's explicit choice, removes them.
    lab.stop_agent(Side::A, "a1", "TERM")?;
    let a1 = lab.a.node("a1")?;
    let state = a1.host.state_dir().to_path_buf();
    ensure!(state.join("fail-closed").exists(), "no fail-closed file");
    let state_arg = state.to_str().context("state dir")?;
    // Run to completion: `cleanup` may be done before a spawned process's mounts are
    // checked.
    let agent = agent_binary()?;
    let agent = agent.to_str().context("agent path")?;
    let cleanup = a1
        .host
        .exec_private_mounts(&[agent, "cleanup", "--state-dir", state_arg])?;
    ensure!(
        cleanup.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    let left = a1.host.ip(&["route", "show", "proto", "0x58"])?
        + &a1.host.ip(&["-6", "route", "show", "proto", "0x58"])?;
    ensure!(left.trim().is_empty(), "fail-closed routes left: {left}");
    ensure!(!state.join("fail-closed").exists(), "the file is left");
    println!("whole test: {:?}", started.elapsed());
    Ok(())
}

/// cluster-b's only agent is stopped and its MeshNode deleted before the join, as if its
/// agents had not published yet: a1 has no tunnel to b1, yet marked traffic to b1's pod
/// is refused (b1's whole granted range has a fail-closed route from the moment
/// cluster-b is linked), never sent in plaintext; the granted host range, which is also
/// cluster-a's own, gets none. Once b1 publishes, its tunnel route wins.
#[test]
fn a_linked_clusters_ranges_are_closed_before_any_of_its_nodes_is_routed() -> Result<()> {
    let started = Instant::now();
    let mut lab = TwoClusters::new(1)?;
    lab.stop_agent(Side::B, "b1", "TERM")?;
    let meshnodes: Api<MeshNode> = Api::all(lab.b.client()?);
    k8s::block_on(meshnodes.delete("b1", &Default::default()))?;
    println!("{}", lab.join()?);
    let underlay = lab.lab.default_underlay().clone();
    let b_range = Side::B.pod_range();
    let (b1_ip, b1_cidr, b1_underlay) = {
        let b1 = lab.b.node("b1")?;
        (b1.pod.ip(), b1.pod_cidr(), b1.host.underlay_ip())
    };
    {
        let a1 = lab.a.node("a1")?;
        let took = wait_for(CONVERGE, || {
            let closed = a1.fail_closed_routes()?;
            ensure!(
                closed.contains(&b_range),
                "no fail-closed route for {b_range}: {closed}"
            );
            Ok(())
        })?;
        println!("{b_range} closed on a1 {took:?} after the join");
        let closed = a1.fail_closed_routes()?;
        ensure!(
            !closed.contains(&Side::A.host_range()),
            "cluster-a's own host range was closed: {closed}"
        );
        let routes = a1.routes()?;
        ensure!(!routes.contains(&b1_cidr), "b1 is routed already: {routes}");
        // As in the test above: a1's default route leads to b1's underlay address, which
        // would carry the pings to b1's pod in plaintext.
        a1.host.set_default_route(b1_underlay)?;
        let (capture, ()) = capture_during(&underlay, MARKER, || {
            marked_pings(&a1.pod, b1_ip.into(), 100)
        })?;
        println!(
            "no MeshPeer for cluster-b yet: 100 marked pings to b1's pod, {} frames on the underlay, plaintext seen {} times",
            capture.frames, capture.marker_hits
        );
        ensure!(
            capture.marker_hits == 0,
            "plaintext for b1's pod crossed the underlay {} times before b1 was routed",
            capture.marker_hits
        );
    }
    lab.restart_agent(Side::B, "b1")?;
    let took = wait_for(CONVERGE, || ping(&lab.a.node("a1")?.pod, b1_ip, 1))?;
    println!("b1 published: reachable through the tunnel {took:?} after its agent started");
    println!("whole test: {:?}", started.elapsed());
    Ok(())
}

/// Sends `count` marked pings 10 ms apart, each waited for at most 0.2 s; none need
/// answer.
fn marked_pings(from: &Netns, to: IpAddr, count: u32) -> Result<()> {
    mesh::marked_pings(from, to, count, MARKER_HEX, "0.2")?;
    Ok(())
}

/// How long after `exited` the new TUN device (another index than `old`) first handed
/// the kernel a packet from the tunnel (its RX counter starts at 0 with the device);
/// polled every 10 ms for 20 s.
fn first_packet_through(host: &Netns, old: Option<u32>, exited: Instant) -> Result<Duration> {
    let deadline = exited + Duration::from_secs(20);
    loop {
        if let Some(index) = link_index(host)
            && Some(index) != old
            && let Ok(stats) = host.link_stats(IFACE)
            && stats.rx.packets > 0
        {
            return Ok(exited.elapsed());
        }
        ensure!(
            Instant::now() < deadline,
            "no packet through the new agent 20 s after the old one exited"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The TUN device's interface index, if it exists (`ip -o link` prints `N: wm0: ...`).
fn link_index(host: &Netns) -> Option<u32> {
    let line = host.ip(&["-o", "link", "show", "dev", IFACE]).ok()?;
    line.split(':').next()?.trim().parse().ok()
}

/// Starts `count` marked pings from `from` to `to`, 10 ms apart, in the background.
fn spawn_marked_pings(from: &Netns, to: impl Into<IpAddr>, count: u32) -> Result<Proc> {
    let (count, to) = (count.to_string(), to.into().to_string());
    from.spawn(&[
        "ping", "-n", "-q", "-i", "0.01", "-c", &count, "-p", MARKER_HEX, &to,
    ])
}
