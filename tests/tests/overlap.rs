//! Two clusters with the same pod CIDR (10.244.0.0/16, a pod at 10.244.1.2 in each),
//! linked by `meshctl join`, which gives each a mesh CIDR; the agents translate the pods'
//! addresses statelessly at the edges (issue 14), over an underlay of 1280 bytes. A third cluster on a range of its own,
//! linked to both, keeps its pods' addresses and reaches both at their mesh addresses; an agent restarted while its API server
//! is down translates from its first packet (no packet for its mesh addresses leaves in
//! plaintext). One lab set-up for those scenarios; a second, smaller one has two dual-stack
//! clusters whose IPv6 pod CIDRs overlap too, mapped by NPTv6 (needs root).

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::clusters::{CONVERGE, Side, TwoClusters, wait_for};
use wiremesh_lab::mesh::{self, Capture, IFACE, capture_during};
use wiremesh_lab::{
    MIB, Netns, Pod, df_ping, output_text, ping, reachable, transfer_translated, xfer_binary,
};

/// The underlay's MTU: the IPv6 minimum, common on tunnels over tunnels and some clouds.
const UNDERLAY_MTU: u32 = 1280;
/// The tunnel MTU the agents derive from it: 1280 less WireGuard's 60 bytes over IPv4.
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 60;
/// Payload of a DF ping that fits the tunnel (1220) but not the 1200-byte path behind
/// cluster-b's node: 1182 + 28 bytes of headers.
const BETWEEN_PAYLOAD: u32 = 1182;
/// Payload of a DF ping of 1500 bytes, over the tunnel's MTU.
const BIG_PAYLOAD: u32 = 1472;
/// The MTU of the route to cluster-b's pod on its node.
const POD_ROUTE_MTU: u32 = 1200;
/// What the marked pings carry; `ping -p` repeats it through the payload.
const MARKER: &[u8] = b"OVERLAPPED";
/// [`MARKER`] in hex, for `ping -p`.
const MARKER_HEX: &str = "4f5645524c4150504544";

#[test]
fn clusters_with_the_same_pod_cidr_reach_each_other_at_their_mesh_addresses() -> Result<()> {
    let start = Instant::now();
    let mut lab = TwoClusters::with_same_pod_range(1, true, UNDERLAY_MTU)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    let pod_ip: IpAddr = "10.244.1.2".parse()?;
    ensure!(
        IpAddr::V4(a1.pod.ip()) == pod_ip && IpAddr::V4(b1.pod.ip()) == pod_ip,
        "both pods should be {pod_ip}: {} and {}",
        a1.pod.ip(),
        b1.pod.ip()
    );

    // join sees the overlap, allocates a mesh CIDR for each and says so.
    let out = lab.join()?;
    println!("{out}");
    ensure!(
        out.contains("translated to mesh CIDRs"),
        "join said:\n{out}"
    );
    let b_mesh = lab.resolve_mesh(Side::A, "cluster-b/10.244.1.2")?;
    let a_mesh = lab.resolve_mesh(Side::B, "cluster-a/10.244.1.2")?;
    ensure!(a_mesh != b_mesh && a_mesh != pod_ip, "{a_mesh} {b_mesh}");
    println!("cluster-a's pod is {a_mesh} in the mesh, cluster-b's {b_mesh}");
    let took = wait_for(CONVERGE, || {
        ensure!(reachable(&a1.pod, b_mesh)?, "a1 -> {b_mesh}");
        Ok(())
    })?;
    println!("reachable after {took:?}");

    // Ping both ways; 64 MiB checksummed each way.
    ping(&a1.pod, b_mesh, 2)?;
    ping(&b1.pod, a_mesh, 2)?;
    let there = transfer_translated(&a1.pod, &b1.pod, pod_ip, b_mesh, 64 * MIB)?;
    let back = transfer_translated(&b1.pod, &a1.pod, pod_ip, a_mesh, 64 * MIB)?;
    println!(
        "64 MiB each way intact over the {UNDERLAY_MTU}-byte underlay: {:.0} and {:.0} Mbit/s",
        there.mbit_per_s(),
        back.mbit_per_s()
    );

    // UDP both ways; each receiver sees the sender's mesh address as the source, each
    // sender the answer from the receiver's mesh address.
    udp(&a1.pod, &b1.pod, pod_ip, b_mesh, a_mesh)?;
    udp(&b1.pod, &a1.pod, pod_ip, a_mesh, b_mesh)?;
    println!("UDP both ways: sources are mesh addresses");

    // Inside cluster-a, 10.244.1.2 is still its own pod: another pod on a1 reaches it
    // directly, and no route of Wiremesh covers cluster-a's pod range.
    let neighbour = a1.host.add_pod("a1-q")?;
    ping(&neighbour, pod_ip, 2)?;
    let routes = a1.routes()?;
    let b_node_mesh = node_range(b_mesh);
    ensure!(
        !routes.contains("10.244.") && routes.contains(&b_node_mesh),
        "a1's Wiremesh routes, wanted {b_node_mesh} and nothing of 10.244.0.0/16: {routes}"
    );

    // A DF packet that fits the tunnel but not the path to cluster-b's pod: cluster-b's
    // node answers "fragmentation needed" from its mesh address, with a quote whose
    // addresses are translated back, so the ping in cluster-a's pod matches it.
    b1.host.ip(&[
        "route",
        "replace",
        "10.244.1.2/32",
        "dev",
        "pods0",
        "mtu",
        "lock",
        &POD_ROUTE_MTU.to_string(),
    ])?;
    let out = df_ping(&a1.pod, b_mesh, BETWEEN_PAYLOAD, 3)?;
    let text = output_text(&out);
    let expected = format!("Frag needed and DF set (mtu = {POD_ROUTE_MTU})");
    ensure!(
        !out.status.success() && text.contains(&expected),
        "no {expected:?} for a {BETWEEN_PAYLOAD}-byte DF ping:\n{text}"
    );
    println!("DF ping over the far side's MTU:\n{text}");

    // The agent's own answer: with a1's TUN device raised to 1500 behind the agent's back,
    // a1 forwards a 1500-byte DF packet into the tunnel; the agent's MTU guard drops it and
    // writes back "fragmentation needed" from the ping's destination, quoting the packet
    // as the pod sent it (before its source was translated), so the pod's ping matches it.
    let tunnel_mtu = a1.host.link_mtu(IFACE)?;
    ensure!(
        tunnel_mtu == TUNNEL_MTU,
        "a1's {IFACE} has MTU {tunnel_mtu}, wanted {TUNNEL_MTU} from the {UNDERLAY_MTU}-byte underlay"
    );
    a1.host.ip(&["link", "set", IFACE, "mtu", "1500"])?;
    let out = df_ping(&neighbour, b_mesh, BIG_PAYLOAD, 3);
    a1.host
        .ip(&["link", "set", IFACE, "mtu", &tunnel_mtu.to_string()])?;
    let out = out?;
    let text = output_text(&out);
    let expected = format!("From {b_mesh} icmp_seq=1 Frag needed and DF set (mtu = {tunnel_mtu})");
    ensure!(
        !out.status.success() && text.contains(&expected),
        "no {expected:?} from a1's agent for a 1500-byte DF ping:\n{text}"
    );
    println!("DF ping over the tunnel's MTU, answered by a1's agent:\n{text}");

    // cluster-c, on 10.3.0.0/16, linked to both: nothing to translate for it, so join
    // allocates nothing; its pod keeps its address in the mesh, and every pair works.
    for other in [Side::A, Side::B] {
        let out = lab.join_pair(Side::C, other)?;
        ensure!(
            !out.contains("translated to mesh CIDRs"),
            "joining cluster-c and {} translated something:\n{out}",
            other.name()
        );
    }
    let c1 = lab.cluster(Side::C).node("c1")?;
    let c_ip = IpAddr::V4(c1.pod.ip());
    let took = wait_for(CONVERGE, || {
        for (from, to) in [(&a1.pod, c_ip), (&b1.pod, c_ip), (&c1.pod, a_mesh)] {
            ensure!(reachable(from, to)?, "{} -> {to}", from.name());
        }
        ping(&c1.pod, b_mesh, 1)
    })?;
    println!("cluster-c joined to both; every pair reachable after {took:?}");
    // The receiver sees each sender as the mesh knows it: cluster-c's pod by its own
    // address, the others by their mesh addresses.
    udp(&a1.pod, &c1.pod, c_ip, c_ip, a_mesh)?;
    udp(&c1.pod, &b1.pod, pod_ip, b_mesh, c_ip)?;
    let to_c = transfer_translated(&b1.pod, &c1.pod, c_ip, c_ip, 16 * MIB)?;
    let from_c = transfer_translated(&c1.pod, &a1.pod, pod_ip, a_mesh, 16 * MIB)?;
    println!(
        "cluster-c: UDP with a and b, sources as the mesh knows them; 16 MiB b -> c and c -> a intact ({:.0} and {:.0} Mbit/s)",
        to_c.mbit_per_s(),
        from_c.mbit_per_s()
    );
    let c_routes = c1.routes()?;
    let wanted = [node_range(a_mesh), node_range(b_mesh)];
    ensure!(
        wanted.iter().all(|r| c_routes.contains(r.as_str())) && !c_routes.contains("10.244."),
        "c1's Wiremesh routes, wanted {wanted:?} and nothing of 10.244.0.0/16: {c_routes}"
    );

    // An agent restarted while its API server is down translates from its first packet:
    // its translation is restored from the state directory with the cached peers. a1's
    // default route leads onto the underlay, as a cloud VM's does, so a packet for a1's
    // mesh address that reached its TUN device untranslated would leave in plaintext.
    let underlay = lab.lab.default_underlay().clone();
    let b1_underlay = b1.host.underlay_ip();
    a1.host.set_default_route(b1_underlay)?;
    lab.a.plane.pause()?;
    let outage = restart_during_outage(&mut lab, &underlay, a_mesh, b_mesh);
    lab.a.plane.resume()?;
    let (capture, reached) = outage?;
    println!(
        "a1's agent restarted with cluster-a's API server down: 100 marked pings from b1's pod to {a_mesh}, {} frames on the underlay, plaintext seen {} times",
        capture.frames, capture.marker_hits
    );
    ensure!(
        capture.marker_hits == 0,
        "after a restart, b1's packets for {a_mesh} crossed the underlay in plaintext {} times",
        capture.marker_hits
    );
    let took = reached?;
    println!("both pods reachable {took:?} after the restart, translated from the cache");
    println!("overlap lab test took {:?}", start.elapsed());
    Ok(())
}

/// Restarts a1's agent (its API server is paused) and, watching `underlay`, waits until
/// b1's pod and a1's pod reach each other at their mesh addresses, then sends 100 marked
/// pings from b1's pod to a1's; returns the capture and how long after the start both
/// pods were reachable (an error if they were not within 20 s or no marked ping was
/// answered).
fn restart_during_outage(
    lab: &mut TwoClusters,
    underlay: &Netns,
    a_mesh: IpAddr,
    b_mesh: IpAddr,
) -> Result<(Capture, Result<Duration>)> {
    lab.stop_agent(Side::A, "a1", "TERM")?;
    let restarted = Instant::now();
    lab.restart_agent(Side::A, "a1")?;
    let lab = &*lab;
    capture_during(underlay, MARKER, || {
        let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
        let reached = wait_for(Duration::from_secs(20), || {
            marked_pings(&b1.pod, a_mesh, 1)?;
            ping(&a1.pod, b_mesh, 1)
        })
        .map(|_| restarted.elapsed());
        // Sent either way, so that a leak is counted.
        let answered = marked_pings(&b1.pod, a_mesh, 100);
        Ok(reached.and_then(|took| answered.map(|()| took)))
    })
}

/// Sends `count` pings carrying [`MARKER`] from `from` to `to`, 10 ms apart; succeeds when
/// any is answered.
fn marked_pings(from: &Pod, to: IpAddr, count: u32) -> Result<()> {
    let out = mesh::marked_pings(from, to, count, MARKER_HEX, "1")?;
    ensure!(
        out.status.success(),
        "{count} marked pings to {to}:\n{}",
        output_text(&out)
    );
    Ok(())
}

/// The /24 of a pod's IPv4 address: its node's pod CIDR in the lab (an IPv6 address as
/// it is).
fn node_range(pod: IpAddr) -> String {
    match pod {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(ip) => ip.to_string(),
    }
}

/// Two dual-stack clusters whose IPv6 pod CIDRs overlap too (fd10:244::/48 in both, a pod
/// at fd10:244:0:1::2 in each): join gives each an IPv6 mesh /48 beside its IPv4 one, and
/// the agents map the prefixes checksum-neutrally (NPTv6, RFC 6296): ping, UDP and a
/// checksummed transfer each way over IPv6, each receiver seeing the sender's mesh address.
#[test]
fn overlapping_ipv6_pod_cidrs_are_translated_with_nptv6() -> Result<()> {
    let start = Instant::now();
    let lab = TwoClusters::with_same_pod_range_dual_stack(1)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    let pod6 = a1.pod.ip6().context("a1's pod has no IPv6 address")?;
    ensure!(
        b1.pod.ip6() == Some(pod6),
        "both pods should be {pod6}: b1's is {:?}",
        b1.pod.ip6()
    );
    let pod6 = IpAddr::V6(pod6);
    let out = lab.join()?;
    ensure!(
        out.contains("translated to mesh CIDRs"),
        "join said:\n{out}"
    );
    let b_mesh = lab.resolve_mesh(Side::A, &format!("cluster-b/{pod6}"))?;
    let a_mesh = lab.resolve_mesh(Side::B, &format!("cluster-a/{pod6}"))?;
    ensure!(
        a_mesh.is_ipv6() && b_mesh.is_ipv6() && a_mesh != b_mesh && a_mesh != pod6,
        "mesh addresses {a_mesh} {b_mesh}"
    );
    ensure!(
        sum16(a_mesh) == sum16(pod6) && sum16(b_mesh) == sum16(pod6),
        "NPTv6 keeps the one's complement sum: {pod6} {a_mesh} {b_mesh}"
    );
    println!("IPv6: cluster-a's pod is {a_mesh} in the mesh, cluster-b's {b_mesh}");
    let took = wait_for(CONVERGE, || {
        ensure!(reachable(&a1.pod, b_mesh)?, "a1 -> {b_mesh}");
        Ok(())
    })?;
    println!("reachable over IPv6 after {took:?}");
    ping(&a1.pod, b_mesh, 2)?;
    ping(&b1.pod, a_mesh, 2)?;
    udp(&a1.pod, &b1.pod, pod6, b_mesh, a_mesh)?;
    udp(&b1.pod, &a1.pod, pod6, a_mesh, b_mesh)?;
    let there = transfer_translated(&a1.pod, &b1.pod, pod6, b_mesh, 16 * MIB)?;
    let back = transfer_translated(&b1.pod, &a1.pod, pod6, a_mesh, 16 * MIB)?;
    println!(
        "16 MiB each way intact over IPv6: {:.0} and {:.0} Mbit/s; UDP sources are mesh addresses",
        there.mbit_per_s(),
        back.mbit_per_s()
    );
    println!("NPTv6 lab test took {:?}", start.elapsed());
    Ok(())
}

/// The one's complement sum of an address's 16-bit words (what NPTv6 keeps).
fn sum16(ip: IpAddr) -> u16 {
    let IpAddr::V6(ip) = ip else { return 0 };
    let mut sum: u32 = ip.segments().iter().map(|w| u32::from(*w)).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0)
}

/// Three UDP datagrams from `from` to `to` (known there as `to_mesh`, listening on
/// `listen`), echoed: the echo sees `from_mesh` as their source, `from` sees the echoes
/// come from `to_mesh`.
fn udp(from: &Pod, to: &Pod, listen: IpAddr, to_mesh: IpAddr, from_mesh: IpAddr) -> Result<()> {
    let xfer = xfer_binary()?;
    let xfer = xfer.to_str().context("wm-xfer path")?;
    let listen = SocketAddr::new(listen, 7000).to_string();
    let echo = to.spawn(&[
        xfer,
        "udp-echo",
        "--listen",
        &listen,
        "--count",
        "3",
        "--timeout",
        "20",
    ])?;
    let target = SocketAddr::new(to_mesh, 7000).to_string();
    let sent = from.exec_timeout(
        &[
            xfer,
            "udp-ping",
            "--to",
            &target,
            "--count",
            "3",
            "--timeout",
            "15",
        ],
        Duration::from_secs(20),
    )?;
    let echoed = echo.wait_with_timeout(Duration::from_secs(10))?;
    let (sent_text, echoed_text) = (output_text(&sent), output_text(&echoed));
    ensure!(
        sent.status.success() && echoed.status.success(),
        "udp-ping:\n{sent_text}\nudp-echo:\n{echoed_text}"
    );
    let sources = |text: &str| -> Vec<IpAddr> {
        text.lines()
            .filter_map(|l| l.trim().parse::<SocketAddr>().ok().map(|a| a.ip()))
            .collect()
    };
    let (replies, seen) = (sources(&sent_text), sources(&echoed_text));
    ensure!(
        replies.len() == 3 && replies.iter().all(|s| *s == to_mesh),
        "echoes came from {replies:?}, wanted {to_mesh}"
    );
    ensure!(
        seen.len() == 3 && seen.iter().all(|s| *s == from_mesh),
        "the echo saw {seen:?}, wanted {from_mesh}"
    );
    Ok(())
}
