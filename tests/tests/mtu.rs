//! The tunnel MTU on an underlay of 1280 bytes (needs root): the agent derives it from the
//! underlay, TCP between pods comes through intact, and a ping too big for the tunnel with
//! DF set gets "fragmentation needed" instead of vanishing.

// The tests print what they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::mesh::{IFACE, Node};
use wiremesh_lab::{Lab, MIB, df_ping, output_text, ping, transfer};

/// The underlay's MTU: the IPv6 minimum, common on tunnels-over-tunnels and some clouds.
const UNDERLAY_MTU: u32 = 1280;
/// What the agent must derive: 1280 less WireGuard's 60 bytes over IPv4.
const TUNNEL_MTU: u32 = 1220;
/// ICMP payload for a 1400-byte IPv4 packet: 1400 − 20 (IP) − 8 (ICMP).
const BIG_PAYLOAD: u32 = 1372;
/// ICMP payload for a packet of exactly the tunnel MTU.
const FITTING_PAYLOAD: u32 = TUNNEL_MTU - 28;

#[test]
fn a_1280_byte_underlay_gives_a_1220_byte_tunnel_tcp_and_frag_needed() -> Result<()> {
    let lab = Lab::new()?;
    let underlay = lab.underlay("small", "198.19.12.0/24", UNDERLAY_MTU)?;
    let mut a = Node::on(&lab, &underlay, "a", Ipv4Addr::new(198, 19, 12, 1), 1)?;
    let mut b = Node::on(&lab, &underlay, "b", Ipv4Addr::new(198, 19, 12, 2), 2)?;
    a.start_with_mtu(&[b.as_peer(true)], None)?;
    b.start_with_mtu(&[a.as_peer(true)], None)?;

    // No MTU configured: each agent took the underlay's, less 60, and said so.
    for node in [&a, &b] {
        let mtu = node.host.link_mtu(IFACE)?;
        ensure!(
            mtu == TUNNEL_MTU,
            "{} has MTU {mtu} on {IFACE}, wanted {TUNNEL_MTU}",
            node.host.name()
        );
        let log = node.agent.as_ref().context("agent started")?.stderr_plain();
        ensure!(
            log.contains("MTU derived from the underlay")
                && log.contains(&format!("mtu={TUNNEL_MTU}")),
            "no derived MTU in the log of {}:\n{log}",
            node.host.name()
        );
    }
    println!("derived MTU {TUNNEL_MTU} on {IFACE} from an underlay of {UNDERLAY_MTU}");

    // A 1400-byte ping with DF set from a pod (whose own MTU is 1500) learns the tunnel's
    // MTU from an ICMP "fragmentation needed"; here the host's kernel sends it, as wm0's MTU
    // is the tunnel's. A ping that fits goes through.
    let frag_needed = format!("Frag needed and DF set (mtu = {TUNNEL_MTU})");
    let out = df_ping(&a.pod, b.pod.ip(), BIG_PAYLOAD, 3)?;
    let text = output_text(&out);
    ensure!(
        !out.status.success(),
        "a 1400-byte DF ping was answered:\n{text}"
    );
    ensure!(
        text.contains(&frag_needed),
        "no {frag_needed:?} in:\n{text}"
    );
    println!("1400-byte DF ping, wm0 at {TUNNEL_MTU}:\n{text}");
    let out = df_ping(&a.pod, b.pod.ip(), FITTING_PAYLOAD, 3)?;
    ensure!(out.status.success(), "{}", output_text(&out));

    // TCP between pods finds the tunnel's MTU and comes through intact.
    let there = transfer(&a.pod, b.pod.ip(), 64 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 64 * MIB)?;
    println!("a->b {there}; b->a {back}");

    // The agent's own answer. With wm0's MTU raised behind its back, the host forwards the
    // 1400-byte packet into the tunnel; the agent drops it, counts it and writes back a
    // "fragmentation needed" for MTU 1220, from the ping's destination, which the host routes
    // to the pod. A fresh pod has no path MTU cached.
    a.host.ip(&["link", "set", IFACE, "mtu", "1500"])?;
    let fresh = a.host.add_pod("a-q")?;
    let too_big = [("interface", IFACE), ("reason", "too_big")];
    let before = a.metric("wiremesh_drops_total", &too_big)?;
    let out = df_ping(&fresh, b.pod.ip(), BIG_PAYLOAD, 3)?;
    let text = output_text(&out);
    let after = a.metric_reaching("wiremesh_drops_total", &too_big, before + 1.0)?;
    ensure!(
        !out.status.success(),
        "a 1400-byte DF ping was answered:\n{text}"
    );
    ensure!(after > before, "too_big drops {before} -> {after}:\n{text}");
    let from_agent = format!("From {} icmp_seq=1 {frag_needed}", b.pod.ip());
    ensure!(
        text.contains(&from_agent),
        "no {from_agent:?} in (too_big drops {before} -> {after}):\n{text}"
    );
    println!("1400-byte DF ping, wm0 at 1500, too_big drops {before} -> {after}:\n{text}");
    let out = df_ping(&fresh, b.pod.ip(), FITTING_PAYLOAD, 3)?;
    ensure!(out.status.success(), "{}", output_text(&out));
    ping(&fresh, b.pod.ip(), 2)?;
    Ok(())
}
