//! End-to-end tests of the data plane: real agents in network namespaces (needs root).

// The tests print the throughput they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use boringtun::noise::{Tunn, TunnResult};
use wiremesh_lab::mesh::{IFACE, Keypair, Node, PORT, in_netns};
use wiremesh_lab::{Lab, MIB, Netns, agent_binary, ping, reachable, transfer};

/// Two hosts, a pod behind each, agents that know each other.
fn pair(lab: &Lab) -> Result<(Node, Node)> {
    let mut a = Node::new(lab, "a", 1)?;
    let mut b = Node::new(lab, "b", 2)?;
    a.start(&[b.as_peer(true)])?;
    b.start(&[a.as_peer(true)])?;
    Ok((a, b))
}

/// Our routes (protocol 0x57) in a host's main table.
fn wiremesh_routes(host: &Netns) -> Result<String> {
    host.ip(&["route", "show", "proto", "0x57"])
}

#[test]
fn two_hosts_ping_both_ways_and_carry_64_mib_intact() -> Result<()> {
    let lab = Lab::new()?;
    let (a, b) = pair(&lab)?;
    ping(&a.pod, b.pod.ip(), 3)?;
    ping(&b.pod, a.pod.ip(), 3)?;
    let there = transfer(&a.pod, b.pod.ip(), 64 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 64 * MIB)?;
    println!(
        "64 MiB a->b {:.0} Mbit/s, b->a {:.0} Mbit/s (sha256 {})",
        there.mbit_per_s(),
        back.mbit_per_s(),
        there.sha256
    );
    // The host's own traffic goes through the tunnel too (source: its wm0 address).
    ping(&a.host, b.pod.ip(), 1)?;
    Ok(())
}

#[test]
fn wg_show_lists_the_peer_and_wg_set_removes_and_restores_it() -> Result<()> {
    let lab = Lab::new()?;
    let (a, b) = pair(&lab)?;
    ping(&a.pod, b.pod.ip(), 2)?;

    let human = a.wg(&["show", IFACE])?;
    ensure!(
        human.contains(&format!("peer: {}", b.keys.public)),
        "{human}"
    );
    ensure!(human.contains("latest handshake:"), "{human}");
    let dump = a.wg(&["show", IFACE, "dump"])?;
    let line = dump
        .lines()
        .find(|l| l.starts_with(&b.keys.public))
        .with_context(|| format!("no peer line in {dump}"))?;
    let fields: Vec<&str> = line.split('\t').collect();
    // public-key preshared-key endpoint allowed-ips latest-handshake rx tx keepalive
    ensure!(fields.len() == 8, "{line}");
    ensure!(fields[2] == b.endpoint().to_string(), "{line}");
    ensure!(fields[3] == b.host.pod_cidr(), "{line}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let handshake: u64 = fields[4].parse()?;
    ensure!(
        handshake > 0 && now.abs_diff(handshake) < 60,
        "stale handshake: {line}"
    );
    ensure!(
        fields[5].parse::<u64>()? > 0 && fields[6].parse::<u64>()? > 0,
        "{line}"
    );

    ensure!(wiremesh_routes(&a.host)?.contains(&b.host.pod_cidr()));
    a.wg(&["set", IFACE, "peer", &b.keys.public, "remove"])?;
    let peers = a.wg(&["show", IFACE, "peers"])?;
    ensure!(!peers.contains(&b.keys.public), "{peers}");
    // As with wg-quick, routes come from the file at `up`: `wg set` leaves them, and
    // without the peer the tunnel drops what they carry.
    std::thread::sleep(Duration::from_secs(1));
    ensure!(wiremesh_routes(&a.host)?.contains(&b.host.pod_cidr()));
    ensure!(
        !reachable(&a.pod, b.pod.ip())?,
        "b reachable without a peer"
    );

    // `wg set` brings it back, and `wg setconf` replaces the whole configuration (a file
    // without PrivateKey would remove the key, as with the kernel module).
    a.wg(&[
        "set",
        IFACE,
        "peer",
        &b.keys.public,
        "endpoint",
        &b.endpoint().to_string(),
        "allowed-ips",
        &b.host.pod_cidr(),
    ])?;
    ping(&a.pod, b.pod.ip(), 2)?;
    let stranger = Keypair::generate();
    let conf = a.host.dir().join("setconf.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\n\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.99.0.0/24\n",
            a.keys.private,
            b.keys.public,
            b.endpoint(),
            b.host.pod_cidr(),
            stranger.public
        ),
    )?;
    a.wg(&["setconf", IFACE, conf.to_str().context("utf-8 path")?])?;
    let peers = a.wg(&["show", IFACE, "peers"])?;
    ensure!(peers.lines().count() == 2, "{peers}");
    ping(&a.pod, b.pod.ip(), 2)?;
    // `wg setconf` adds no route either (tests/tests/wgspec.rs covers routes in full).
    let routes = wiremesh_routes(&a.host)?;
    ensure!(!routes.contains("10.99.0.0/24"), "{routes}");
    Ok(())
}

/// Wiremesh on host a, Debian's wireguard-go configured with `wg` on host b. Only the
/// initiator knows the other's endpoint, so the handshake must come from that side and
/// the responder learns the endpoint from it.
fn interop_with_wireguard_go(wiremesh_initiates: bool) -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let b = Node::new(&lab, "b", 2)?;
    a.start(&[b.as_peer(wiremesh_initiates)])?;

    let _wggo = b.start_wireguard_go(
        &["wireguard-go", "-f", IFACE],
        &[("LOG_LEVEL", "error")],
        &a,
        !wiremesh_initiates,
    )?;

    let (first, second) = if wiremesh_initiates {
        (&a, &b)
    } else {
        (&b, &a)
    };
    ping(&first.pod, second.pod.ip(), 3)?;
    ping(&second.pod, first.pod.ip(), 3)?;
    let there = transfer(&a.pod, b.pod.ip(), 32 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 32 * MIB)?;
    println!(
        "wiremesh<->wireguard-go: {:.0} / {:.0} Mbit/s",
        there.mbit_per_s(),
        back.mbit_per_s()
    );
    // Both sides report the handshake.
    let theirs = b.wg(&["show", IFACE, "latest-handshakes"])?;
    ensure!(
        theirs.contains(&a.keys.public) && !theirs.contains("\t0"),
        "{theirs}"
    );
    let ours = a.wg(&["show", IFACE, "endpoints"])?;
    ensure!(ours.contains(&b.endpoint().to_string()), "{ours}");
    Ok(())
}

#[test]
fn interop_wiremesh_initiates_to_wireguard_go() -> Result<()> {
    interop_with_wireguard_go(true)
}

#[test]
fn interop_wireguard_go_initiates_to_wiremesh() -> Result<()> {
    interop_with_wireguard_go(false)
}

#[test]
fn inner_source_outside_the_peers_allowed_ips_is_dropped_and_counted() -> Result<()> {
    let lab = Lab::new()?;
    let (a, b) = pair(&lab)?;
    ping(&a.pod, b.pod.ip(), 1)?;
    let before = a.metric("wiremesh_drops_total", &[("reason", "bad_source")])?;
    // b's kernel sends from an address outside b's allowed IPs at a; b's agent
    // encrypts it (it routes by destination), a must refuse it after decryption.
    b.host.ip(&["addr", "add", "10.66.0.1/32", "dev", "lo"])?;
    let out = b.host.exec(&[
        "ping",
        "-n",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.66.0.1",
        &a.pod.ip().to_string(),
    ])?;
    ensure!(
        !out.status.success(),
        "a spoofed source got through: {out:?}"
    );
    let after = a.metric_reaching(
        "wiremesh_drops_total",
        &[("reason", "bad_source")],
        before + 3.0,
    )?;
    ensure!(after >= before + 3.0, "bad_source {before} -> {after}");
    ping(&b.pod, a.pod.ip(), 1)?;
    Ok(())
}

#[test]
fn garbage_truncated_and_replayed_datagrams_are_counted_and_the_tunnel_survives() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    // c runs no agent: this test speaks WireGuard for it, from its namespace.
    let c = Node::new(&lab, "c", 3)?;
    a.start(&[b.as_peer(true), c.as_peer(false)])?;
    b.start(&[a.as_peer(true)])?;

    let to = a.endpoint();
    let c_secret = c.keys.secret();
    let a_public = a.keys.public_key();
    let (c_pod, a_pod) = (c.pod.ip(), a.pod.ip());
    in_netns(&c.host, move || {
        let sock = UdpSocket::bind("0.0.0.0:40000")?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = vec![0u8; 2048];
        let mut buf = vec![0u8; 2048];
        sock.send_to(b"\x01\x00garbage", to)?;
        sock.send_to(&[0xff; 200], to)?;

        let mut tunn = Tunn::new(c_secret, a_public, None, None, 7, None);
        let init = match tunn.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => bail!("no initiation: {other:?}"),
        };
        sock.send_to(&init[..100], to)?; // truncated
        sock.send_to(&init, to)?;
        let (n, _) = sock.recv_from(&mut buf).context("no handshake response")?;
        match tunn.decapsulate(None, &buf[..n], &mut out) {
            TunnResult::WriteToNetwork(keepalive) => {
                sock.send_to(keepalive, to)?;
            }
            other => bail!("handshake response refused: {other:?}"),
        }
        sock.send_to(&init, to)?; // a replayed initiation

        let echo = icmp_echo(c_pod, a_pod, 0x4242);
        let data = match tunn.encapsulate(&echo, &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => bail!("no data packet: {other:?}"),
        };
        sock.send_to(&data, to)?;
        sock.send_to(&data, to)?; // a replayed data packet
        // The first one reached a's pod, whose echo reply comes back through the tunnel.
        for _ in 0..5 {
            let (n, _) = sock.recv_from(&mut buf).context("no echo reply")?;
            if let TunnResult::WriteToTunnelV4(packet, src) =
                tunn.decapsulate(None, &buf[..n], &mut out)
            {
                ensure!(src == a_pod, "reply from {src}");
                ensure!(packet[20] == 0, "not an echo reply: type {}", packet[20]);
                return Ok(());
            }
        }
        bail!("no echo reply among 5 datagrams")
    })?;

    let drops = a.scrape()?;
    let bad_packet = drops.value("wiremesh_drops_total", &[("reason", "bad_packet")])?;
    let replay = drops.value("wiremesh_drops_total", &[("reason", "replay")])?;
    let bad_handshake = drops.value("wiremesh_drops_total", &[("reason", "bad_handshake")])?;
    ensure!(bad_packet >= 3.0, "bad_packet {bad_packet}");
    ensure!(replay >= 1.0, "replay {replay}");
    ensure!(bad_handshake >= 1.0, "bad_handshake {bad_handshake}");
    ensure!(
        a.agent.as_ref().is_some_and(|p| p.is_running()),
        "agent died"
    );
    ping(&a.pod, b.pod.ip(), 2)?;
    ping(&b.pod, a.pod.ip(), 2)?;
    Ok(())
}

#[test]
fn a_peer_added_during_a_transfer_leaves_the_transfer_intact() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    let mut c = Node::new(&lab, "c", 3)?;
    a.start(&[b.as_peer(true)])?;
    b.start(&[a.as_peer(true)])?;
    c.start(&[a.as_peer(true)])?;
    ping(&a.pod, b.pod.ip(), 1)?;

    let from: Netns = (*a.pod).clone();
    let to = b.pod.ip();
    let running = std::thread::spawn(move || transfer(&from, to, 512 * MIB));
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !running.is_finished(),
        "the transfer ended before the change"
    );
    a.wg(&[
        "set",
        IFACE,
        "peer",
        &c.keys.public,
        "endpoint",
        &c.endpoint().to_string(),
        "allowed-ips",
        &c.host.pod_cidr(),
    ])?;
    // `wg set` adds no route (wg-quick's semantics): route it as a wg-quick user would.
    a.host
        .ip(&["route", "add", &c.host.pod_cidr(), "dev", IFACE])?;
    ping(&a.pod, c.pod.ip(), 2)?;
    let overlapped = !running.is_finished();
    let report = running
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
    println!(
        "512 MiB during the change: {:.0} Mbit/s, overlapped: {overlapped}",
        report.mbit_per_s()
    );
    ensure!(
        overlapped,
        "the transfer ended before the new peer answered"
    );
    Ok(())
}

#[test]
fn bad_config_files_are_refused_with_line_and_field_and_leave_no_device() -> Result<()> {
    let lab = Lab::new()?;
    let a = Node::new(&lab, "a", 1)?;
    let good = Keypair::generate();
    let cases = [
        ("PublicKey = not-a-key", "line 7", "PublicKey"),
        ("AllowedIPs = 10.5.0.0/33", "line 7", "AllowedIPs"),
        ("Colour = blue", "line 7", "Colour"),
    ];
    let agent = agent_binary()?;
    let agent = agent.to_str().context("utf-8 path")?;
    for (bad_line, want_line, want_field) in cases {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\nAddress = 10.1.0.1/32\n\n[Peer]\n{bad_line}\nPublicKey = {}\nAllowedIPs = 10.2.0.0/24\n",
            good.private, good.public
        );
        let path = a.host.dir().join(format!("{IFACE}.conf"));
        std::fs::write(&path, text)?;
        let out = a.host.exec_private_mounts(&[
            agent,
            "up",
            "--config",
            path.to_str().context("utf-8 path")?,
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{bad_line}: accepted");
        ensure!(
            stderr.contains(want_line) && stderr.contains(want_field),
            "{bad_line}: {stderr}"
        );
        let links = a.host.link_names()?;
        ensure!(
            !links.iter().any(|l| l == IFACE),
            "{bad_line}: a device was left: {links:?}"
        );
    }
    Ok(())
}

/// An IPv4 ICMP echo request with valid checksums.
fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let payload = b"wiremesh-lab-probe";
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&id.to_be_bytes());
    p[26..28].copy_from_slice(&1u16.to_be_bytes());
    p[28..].copy_from_slice(payload);
    let sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
