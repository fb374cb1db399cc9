//! An IPv6-only underlay with dual-stack pods (needs root): two standalone agents reach
//! each other at `[fd18:6::N]:51820`, derive the tunnel MTU as the underlay's less 80, and
//! carry both IPv6 and IPv4 pod traffic, pings and checksummed TCP, through the same tunnel;
//! an IPv6 underlay of 1280 bytes, where the tunnel keeps the IPv6 minimum MTU and the
//! underlay fragments; and peers that know each other only by link-local addresses.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::mesh::{IFACE, Node, PORT, eventually};
use wiremesh_lab::{Lab, MIB, df_ping, output_text, ping, transfer};

/// The underlay's MTU.
const UNDERLAY_MTU: u32 = 1500;
/// What the agent must derive: 1500 less WireGuard's 80 bytes over IPv6.
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 80;
/// ICMPv6 payload for a 1460-byte packet: 1460 − 40 (IPv6) − 8 (ICMPv6).
const BIG_PAYLOAD: u32 = 1412;
/// ICMPv6 payload for a packet of exactly the tunnel MTU.
const FITTING_PAYLOAD: u32 = TUNNEL_MTU - 48;

#[test]
fn an_ipv6_underlay_carries_ipv6_and_ipv4_pods() -> Result<()> {
    let lab = Lab::new()?;
    let underlay = lab.underlay("v6", "fd18:6::/64", UNDERLAY_MTU)?;
    let a_ip: Ipv6Addr = "fd18:6::1".parse()?;
    let b_ip: Ipv6Addr = "fd18:6::2".parse()?;
    let mut a = Node::on_v6(&lab, &underlay, "a", a_ip, 1)?;
    let mut b = Node::on_v6(&lab, &underlay, "b", b_ip, 2)?;

    // The underlay is IPv6 only: the hosts reach each other over it, and have no IPv4 on it.
    ping(&a.host, b_ip, 1)?;
    for node in [&a, &b] {
        let v4 = node.host.ip(&["-4", "-o", "addr", "show", "dev", "ul0"])?;
        ensure!(
            v4.trim().is_empty(),
            "{} has IPv4 on ul0: {v4}",
            node.host.name()
        );
    }

    // No MTU configured: each agent derives it from its route to the peer's endpoint.
    let start = Instant::now();
    a.start_with_mtu(&[b.as_peer(true)], None)?;
    b.start_with_mtu(&[a.as_peer(true)], None)?;
    for (node, peer) in [(&a, &b), (&b, &a)] {
        let mtu = node.host.link_mtu(IFACE)?;
        ensure!(
            mtu == TUNNEL_MTU,
            "{} has MTU {mtu} on {IFACE}, wanted {TUNNEL_MTU} ({UNDERLAY_MTU} - 80)",
            node.host.name()
        );
        let routes = node.host.ip(&["-6", "route", "show", "dev", IFACE])?;
        let cidr6 = peer.host.pod_cidr6().context("dual-stack host")?;
        ensure!(
            routes.contains(&cidr6),
            "{} has no route to {cidr6} on {IFACE}: {routes}",
            node.host.name()
        );
    }
    println!("{IFACE} MTU {TUNNEL_MTU} derived from an IPv6 underlay of {UNDERLAY_MTU}");

    let (a6, b6) = (pod_ip6(&a)?, pod_ip6(&b)?);
    eventually(Duration::from_secs(20), || ping(&a.pod, b6, 1))?;
    println!("pod a -> pod b over IPv6 after {:?}", start.elapsed());
    ping(&b.pod, a6, 3)?;
    ping(&a.pod, b.pod.ip(), 3)?;
    ping(&b.pod, a.pod.ip(), 3)?;
    println!("ping6 and ping both ways between the pods");

    // The peers saw each other at their IPv6 underlay addresses.
    let endpoints = a.wg(&["show", IFACE, "endpoints"])?;
    ensure!(
        endpoints.contains(&format!("[{b_ip}]:")),
        "a should see b at [{b_ip}], sees: {endpoints}"
    );

    for (label, there_to, back_to) in [
        ("IPv6", IpAddr::V6(b6), IpAddr::V6(a6)),
        ("IPv4", IpAddr::V4(b.pod.ip()), IpAddr::V4(a.pod.ip())),
    ] {
        let (a_before, ul_before) = (a.host.link_stats(IFACE)?, a.host.link_stats("ul0")?);
        let b_before = b.host.link_stats(IFACE)?;
        let there = transfer(&a.pod, there_to, 16 * MIB)?;
        let sent = a.host.link_stats(IFACE)?.tx.since(&a_before.tx);
        let on_wire = a.host.link_stats("ul0")?.tx.since(&ul_before.tx);
        let written = b.host.link_stats(IFACE)?.rx.since(&b_before.rx);
        let back = transfer(&b.pod, back_to, 16 * MIB)?;
        println!("{label} pods over the IPv6 underlay, intact: a->b {there}; b->a {back}");
        println!(
            "  a->b: agent a read {} packets of {} bytes on average from {IFACE}, sent {} of \
             {} on ul0; agent b wrote {} of {} to {IFACE}",
            sent.packets,
            sent.average(),
            on_wire.packets,
            on_wire.average(),
            written.packets,
            written.average()
        );
        // Without TSO from the TUN device and coalescing towards it no packet on wm0
        // would be longer than its MTU.
        ensure!(
            sent.average() > u64::from(2 * TUNNEL_MTU)
                && written.average() > u64::from(2 * TUNNEL_MTU),
            "{label}: no super-packets on {IFACE}: read {sent:?}, written {written:?}"
        );
    }

    // A 1460-byte IPv6 ping does not fit the tunnel: the host answers "packet too big"
    // for its MTU instead of letting it vanish.
    let out = df_ping(&a.pod, b6, BIG_PAYLOAD, 2)?;
    let text = output_text(&out);
    let learned = ["mtu=", "mtu: ", "mtu = "]
        .iter()
        .any(|m| text.contains(&format!("{m}{TUNNEL_MTU}")));
    ensure!(
        !out.status.success() && learned,
        "a 1460-byte IPv6 ping should learn MTU {TUNNEL_MTU}:\n{text}"
    );
    println!(
        "1460-byte IPv6 ping, {IFACE} at {TUNNEL_MTU}: {}",
        text.lines().find(|l| l.contains("mtu")).unwrap_or("")
    );
    let out = df_ping(&a.pod, b6, FITTING_PAYLOAD, 2)?;
    ensure!(out.status.success(), "{}", output_text(&out));

    // The agent's own answer: with wm0's MTU raised behind its back, the host forwards the
    // 1460-byte packet into the tunnel; the agent drops it, counts it and writes back an
    // ICMPv6 "packet too big" for its tunnel MTU, from the ping's destination. A fresh pod
    // has no path MTU cached.
    a.host.ip(&["link", "set", IFACE, "mtu", "1500"])?;
    let fresh = a.host.add_pod("a-q")?;
    let too_big = [("interface", IFACE), ("reason", "too_big")];
    let before = a.metric("wiremesh_drops_total", &too_big)?;
    let out = df_ping(&fresh, b6, BIG_PAYLOAD, 2)?;
    let text = output_text(&out);
    let after = a.metric_reaching("wiremesh_drops_total", &too_big, before + 1.0)?;
    ensure!(
        !out.status.success(),
        "a 1460-byte ping was answered:\n{text}"
    );
    ensure!(after > before, "too_big drops {before} -> {after}:\n{text}");
    let from_agent = format!("From {b6} icmp_seq=1 Packet too big: mtu={TUNNEL_MTU}");
    ensure!(
        text.contains(&from_agent),
        "no {from_agent:?} in (too_big drops {before} -> {after}):\n{text}"
    );
    println!(
        "1460-byte IPv6 ping, {IFACE} at 1500, too_big drops {before} -> {after}: {from_agent}"
    );
    let out = df_ping(&fresh, b6, FITTING_PAYLOAD, 2)?;
    ensure!(out.status.success(), "{}", output_text(&out));
    Ok(())
}

/// An IPv6 underlay of 1280 bytes, the IPv6 minimum: 1280 − 80 would be below the IPv6
/// minimum, and Linux turns IPv6 off on a device that small, so the agents keep wm0 at 1280
/// (and say so); the encrypted datagrams are then larger than the underlay's MTU and the
/// kernel fragments them, both for UDP GSO batches and single datagrams.
#[test]
fn a_1280_byte_ipv6_underlay_still_carries_ipv6_pods() -> Result<()> {
    const SMALL: u32 = 1280;
    let lab = Lab::new()?;
    let underlay = lab.underlay("small6", "fd18:9::/64", SMALL)?;
    let mut a = Node::on_v6(&lab, &underlay, "a", "fd18:9::1".parse()?, 1)?;
    let mut b = Node::on_v6(&lab, &underlay, "b", "fd18:9::2".parse()?, 2)?;
    a.start_with_mtu(&[b.as_peer(true)], None)?;
    b.start_with_mtu(&[a.as_peer(true)], None)?;
    for node in [&a, &b] {
        let mtu = node.host.link_mtu(IFACE)?;
        ensure!(
            mtu == SMALL,
            "{} has MTU {mtu} on {IFACE}, wanted the IPv6 minimum {SMALL}",
            node.host.name()
        );
        let log = node.agent.as_ref().context("agent started")?.stderr();
        ensure!(
            log.contains("below the IPv6 minimum"),
            "no warning about the IPv6 minimum in the log of {}:\n{log}",
            node.host.name()
        );
    }
    let (a6, b6) = (pod_ip6(&a)?, pod_ip6(&b)?);
    eventually(Duration::from_secs(20), || ping(&a.pod, b6, 1))?;
    ping(&b.pod, a6, 2)?;
    for (label, there_to, back_to) in [
        ("IPv6", IpAddr::V6(b6), IpAddr::V6(a6)),
        ("IPv4", IpAddr::V4(b.pod.ip()), IpAddr::V4(a.pod.ip())),
    ] {
        let there = transfer(&a.pod, there_to, 8 * MIB)?;
        let back = transfer(&b.pod, back_to, 8 * MIB)?;
        println!(
            "{label} pods over a {SMALL}-byte IPv6 underlay, {IFACE} at {SMALL}: 8 MiB each way \
             intact, fragmented underneath ({:.0}/{:.0} Mbit/s)",
            there.mbit_per_s(),
            back.mbit_per_s()
        );
    }
    let snmp6 = a.host.exec_ok(&["cat", "/proc/net/snmp6"])?;
    let created: u64 = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Ip6FragCreates"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Ip6FragCreates in /proc/net/snmp6:\n{snmp6}"))?;
    ensure!(created > 0, "host a fragmented nothing");
    println!("host a created {created} IPv6 fragments");
    Ok(())
}

/// Peers that know each other only by link-local underlay addresses: a is told b's
/// `[fe80::..%ul0]` endpoint, b knows no endpoint for a and answers where a's handshake came
/// from, which only works if the agent keeps the scope (interface) of that source address.
#[test]
fn link_local_endpoints_keep_their_scope() -> Result<()> {
    let lab = Lab::new()?;
    let underlay = lab.underlay("ll", "fd18:7::/64", UNDERLAY_MTU)?;
    let mut a = Node::on_v6(&lab, &underlay, "a", "fd18:7::1".parse()?, 1)?;
    let mut b = Node::on_v6(&lab, &underlay, "b", "fd18:7::2".parse()?, 2)?;
    let b_link_local = b.host.link_local("ul0")?;
    let endpoint = SocketAddrV6::new(b_link_local, PORT, 0, a.host.link_index("ul0")?);
    let mut b_as_peer = b.as_peer(false);
    b_as_peer.endpoint = Some(SocketAddr::V6(endpoint));
    a.start_with_mtu(&[b_as_peer], None)?;
    b.start_with_mtu(&[a.as_peer(false)], None)?;

    let start = Instant::now();
    let b6 = pod_ip6(&b)?;
    eventually(Duration::from_secs(20), || ping(&a.pod, b6, 1))?;
    println!("a -> b at {endpoint} after {:?}", start.elapsed());
    ping(&b.pod, pod_ip6(&a)?, 2)?;
    ping(&b.pod, a.pod.ip(), 2)?;
    let seen = b.wg(&["show", IFACE, "endpoints"])?;
    let a_link_local = a.host.link_local("ul0")?;
    ensure!(
        seen.contains(&format!("[{a_link_local}%")),
        "b should see a at its scoped link-local address {a_link_local}, sees: {seen}"
    );
    let there = transfer(&a.pod, b6, 4 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 4 * MIB)?;
    println!(
        "b sees a at {}; 4 MiB each way intact ({:.0}/{:.0} Mbit/s)",
        seen.split_whitespace().nth(1).unwrap_or(""),
        there.mbit_per_s(),
        back.mbit_per_s()
    );
    Ok(())
}

fn pod_ip6(node: &Node) -> Result<Ipv6Addr> {
    node.pod
        .ip6()
        .with_context(|| format!("pod of {} has no IPv6 address", node.host.name()))
}
