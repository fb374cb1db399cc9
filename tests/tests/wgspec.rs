//! Behave as WireGuard and wg-quick specify (issue 12 §6), against a peer nobody here wrote
//! (Debian's `wireguard-go`) in network namespaces (needs root):
//!
//! - sticky source address: on a host with two underlay addresses, a peer that sends to
//!   the second one is answered from it, so its recorded endpoint stays the second one; when
//!   that address is removed, the agent falls back to the kernel's choice and the peer roams
//!   to the first;
//! - standalone routes follow wg-quick's `Table`: `up --interface` and `wg set` add none
//!   (not even for `0.0.0.0/0`); `up --config` with `Table = auto` routes the peers' allowed
//!   IPs with the interface address as source; `Table = off` routes nothing.

// The tests print what they saw (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::mesh::{
    IFACE, Keypair, METRICS, Node, PORT, eventually, start_agent, write_config,
};
use wiremesh_lab::{Lab, MIB, Netns, ping, transfer};

/// The address the peer sends to: a second address on host a's underlay interface.
const SECOND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
/// How long a change may take to show (the agent's route task runs on every change).
const SETTLE: Duration = Duration::from_secs(2);

/// wireguard-go's endpoint for the agent, from `wg show wm0 endpoints`.
fn endpoint_seen_by(wg_go: &Node, agent: &Node) -> Result<String> {
    let out = wg_go.wg(&["show", IFACE, "endpoints"])?;
    let line = out
        .lines()
        .find(|l| l.starts_with(&agent.keys.public))
        .with_context(|| format!("no line for the agent in {out:?}"))?;
    Ok(line.split('\t').nth(1).unwrap_or_default().to_owned())
}

#[test]
fn replies_leave_from_the_address_the_peer_sent_to_and_fall_back_when_it_goes() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let b = Node::new(&lab, "b", 2)?;
    let prefix = lab
        .default_underlay()
        .cidr()
        .split_once('/')
        .map(|(_, len)| len.to_owned())
        .context("underlay CIDR")?;
    let second = format!("{SECOND}/{prefix}");
    a.host.ip(&["addr", "add", &second, "dev", "ul0"])?;
    // The agent does not know b's endpoint: b speaks first, to the second address.
    a.start(&[b.as_peer(false)])?;
    let _wggo = b.start_wireguard_go(
        &["wireguard-go", "-f", IFACE],
        &[("LOG_LEVEL", "error")],
        &a,
        false,
    )?;
    let to_second = format!("{SECOND}:{PORT}");
    b.wg(&["set", IFACE, "peer", &a.keys.public, "endpoint", &to_second])?;

    ping(&b.pod, a.pod.ip(), 3)?;
    ping(&a.pod, b.pod.ip(), 3)?;
    let report = transfer(&a.pod, b.pod.ip(), 8 * MIB)?;
    let seen = endpoint_seen_by(&b, &a)?;
    println!(
        "wireguard-go sees the agent at {seen} (sent to {to_second}); 8 MiB sha256 {}",
        report.sha256
    );
    ensure!(
        seen == to_second,
        "wireguard-go moved the agent's endpoint to {seen}: replies left from another \
         address than the one it sent to ({to_second})"
    );

    // The second address goes: the agent's next send from it fails, it lets the kernel
    // choose, and wireguard-go roams to the first address.
    a.host.ip(&["addr", "del", &second, "dev", "ul0"])?;
    ping(&a.pod, b.pod.ip(), 3)?;
    ping(&b.pod, a.pod.ip(), 3)?;
    let first = a.endpoint().to_string();
    let seen = endpoint_seen_by(&b, &a)?;
    println!("after removing {SECOND}: wireguard-go sees the agent at {seen}");
    ensure!(seen == first, "expected {first}, wireguard-go has {seen}");
    Ok(())
}

/// `ip route show` and `ip -6 route show` in `ns`.
fn all_routes(ns: &Netns) -> Result<String> {
    Ok(format!(
        "{}{}",
        ns.ip(&["route", "show"])?,
        ns.ip(&["-6", "route", "show"])?
    ))
}

#[test]
fn wg_set_on_an_interface_without_config_adds_no_route() -> Result<()> {
    let lab = Lab::new()?;
    let a = Node::new(&lab, "a", 1)?;
    let b = Node::new(&lab, "b", 2)?;
    let before = all_routes(&a.host)?;
    let _agent = start_agent(&a.host, &["up", "--interface", IFACE])?;
    a.wg(&[
        "set",
        IFACE,
        "peer",
        &b.keys.public,
        "allowed-ips",
        "0.0.0.0/0,10.99.0.0/24,::/0",
        "endpoint",
        &b.endpoint().to_string(),
    ])?;
    let allowed = a.wg(&["show", IFACE, "allowed-ips"])?;
    ensure!(allowed.contains("10.99.0.0/24"), "{allowed}");
    std::thread::sleep(SETTLE);
    let on_device = a.host.ip(&["route", "show", "dev", IFACE])?;
    let on_device6 = a.host.ip(&["-6", "route", "show", "dev", IFACE])?;
    println!("routes on {IFACE}: {on_device:?} {on_device6:?}");
    ensure!(
        on_device.trim().is_empty(),
        "`wg set` made the agent route through {IFACE}: {on_device}"
    );
    // IPv6 link-local and multicast routes the kernel gives every device are not ours.
    ensure!(
        !on_device6.contains("proto 0x57") && !on_device6.contains("default"),
        "{on_device6}"
    );
    let after = all_routes(&a.host)?;
    let kept = |routes: &str| -> Vec<String> {
        routes
            .lines()
            .filter(|l| !l.contains(IFACE))
            .map(str::to_owned)
            .collect()
    };
    ensure!(
        kept(&before) == kept(&after),
        "the namespace's routes changed:\nbefore:\n{before}\nafter:\n{after}"
    );
    Ok(())
}

/// Writes host a's config for `peer` with `table_line` in `[Interface]`, and starts the
/// agent on it.
fn start_with_table(a: &Node, peer: &Node, table_line: &str) -> Result<wiremesh_lab::lab::Proc> {
    let path = write_config(&a.host, &a.keys, &[peer.as_peer(true)])?;
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        text.replacen("[Interface]\n", &format!("[Interface]\n{table_line}\n"), 1),
    )?;
    let path = path_str(&path)?;
    start_agent(
        &a.host,
        &["up", "--config", path, "--metrics-addr", METRICS],
    )
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("lab paths are UTF-8")
}

#[test]
fn config_routes_follow_table_with_the_interface_address_as_source() -> Result<()> {
    let lab = Lab::new()?;
    let a = Node::new(&lab, "a", 1)?;
    let b = Node::new(&lab, "b", 2)?;
    let c = Node::new(&lab, "c", 3)?;

    // Table = auto: b's pod CIDR is routed, from a's interface address.
    let _agent = start_with_table(&a, &b, "Table = auto")?;
    let _wggo = b.start_wireguard_go(
        &["wireguard-go", "-f", IFACE],
        &[("LOG_LEVEL", "error")],
        &a,
        true,
    )?;
    let route = eventually(SETTLE, || {
        let route = a.host.ip(&["route", "show", &b.host.pod_cidr()])?;
        ensure!(route.contains(IFACE), "no route yet: {route:?}");
        Ok(route)
    })?;
    println!("Table = auto: {}", route.trim());
    ensure!(
        route.contains(&format!("src {}", a.host.pod_gateway())),
        "the route has not the interface address as source: {route}"
    );
    ping(&a.pod, b.pod.ip(), 3)?;
    // The host's own traffic leaves from the interface address, which b allows.
    ping(&a.host, b.pod.ip(), 2)?;
    let report = transfer(&a.pod, b.pod.ip(), 16 * MIB)?;
    println!("16 MiB through wireguard-go, sha256 {}", report.sha256);

    // `wg set` later adds no route, as with wg-quick.
    let stranger = Keypair::generate();
    a.wg(&[
        "set",
        IFACE,
        "peer",
        &stranger.public,
        "allowed-ips",
        "10.99.0.0/24",
    ])?;
    std::thread::sleep(SETTLE);
    let extra = a.host.ip(&["route", "show", "10.99.0.0/24"])?;
    ensure!(extra.trim().is_empty(), "`wg set` added a route: {extra}");

    // Table = off: the peer is configured, nothing is routed.
    let _off = start_with_table(&c, &b, "Table = off")?;
    let allowed = c.wg(&["show", IFACE, "allowed-ips"])?;
    ensure!(allowed.contains(&b.host.pod_cidr()), "{allowed}");
    std::thread::sleep(SETTLE);
    let routes = c.host.ip(&["route", "show", "dev", IFACE])?;
    println!("Table = off: routes on {IFACE}: {routes:?}");
    ensure!(routes.trim().is_empty(), "Table = off routed: {routes}");
    Ok(())
}
