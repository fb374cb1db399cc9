//! The TUN device and the netlink layer against a real kernel, inside a private network
//! namespace that disappears with the test's thread. Skipped unless running as root.
//!
//! `unshare(2)` has no safe wrapper, hence the one `unsafe` block outside `tun.rs`.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::net::UdpSocket;
use wiremesh_agent::netlink::{Netlink, NetlinkError, RouteDiff, RouteReconciler, RouteTarget};
use wiremesh_agent::tun::{Tun, TunError};
use wiremesh_proto::{InterfaceAddress, IpCidr};

#[test]
fn tun_addresses_and_routes_in_a_private_netns() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping tun_addresses_and_routes_in_a_private_netns: needs root");
        return;
    }
    let thread = std::thread::spawn(|| -> Result<()> {
        // Only this thread moves to the new namespace; it is freed when the thread exits
        // and the last descriptor into it (TUN, sockets) is closed.
        // SAFETY: unshare takes no pointers; CLONE_NEWNET changes only this thread's netns.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the runtime")?;
        runtime.block_on(scenario())
    });
    match thread.join() {
        Ok(result) => result.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn scenario() -> Result<()> {
    let nl = Netlink::new().await?;

    // Name checks that never reach the kernel.
    ensure!(matches!(
        Tun::create("wiremesh-too-long0"),
        Err(TunError::InvalidName { .. })
    ));

    let tun = Tun::create("wmtest0")?;
    ensure!(tun.name() == "wmtest0", "kernel named it {}", tun.name());
    let second = Tun::create("wmtest0");
    ensure!(
        matches!(second, Err(TunError::NameInUse { .. })),
        "second open of wmtest0: {second:?}"
    );
    let lo = Tun::create("lo");
    ensure!(
        matches!(lo, Err(TunError::NameInUse { .. })),
        "TUN named lo: {lo:?}"
    );

    let index = nl.link_index("wmtest0").await?;
    nl.set_mtu_and_up(index, 1380).await?;
    for addr in ["10.99.0.1/24", "fd99::1/64"] {
        let addr: InterfaceAddress = addr.parse()?;
        nl.add_address(index, addr).await?;
        nl.add_address(index, addr)
            .await
            .context("adding an address twice")?;
    }

    let target = RouteTarget::main(index);
    let mut reconciler = RouteReconciler::new(target.clone());
    let desired = cidrs(&["10.98.0.0/16", "10.97.1.0/24", "fd98::/64"]);
    let diff = reconciler.reconcile(&nl, &desired).await?;
    ensure!(
        diff == added(&["10.97.1.0/24", "10.98.0.0/16", "fd98::/64"]),
        "{diff:?}"
    );
    // Only our routes: not the kernel's 10.99.0.0/24, fd99::/64 and fe80::/64.
    ensure!(nl.routes_on(&target).await? == desired);
    ensure!(reconciler.reconcile(&nl, &desired).await?.is_empty());

    // Idempotent single operations.
    nl.add_route(&target, cidr("10.98.0.0/16")).await?;
    nl.del_route(&target, cidr("10.96.0.0/16")).await?;
    nl.del_route(&target, cidr("fd96::/64")).await?;

    // Someone deletes a route; the next pass puts it back.
    nl.del_route(&target, cidr("10.97.1.0/24")).await?;
    ensure!(!nl.routes_on(&target).await?.contains(&cidr("10.97.1.0/24")));
    let diff = reconciler.reconcile(&nl, &desired).await?;
    ensure!(diff == added(&["10.97.1.0/24"]), "{diff:?}");
    ensure!(nl.routes_on(&target).await? == desired);

    // A smaller set removes exactly the extra routes.
    let smaller = cidrs(&["10.98.0.0/16", "fd98::/64"]);
    let diff = reconciler.reconcile(&nl, &smaller).await?;
    ensure!(
        diff == RouteDiff {
            removed: vec![cidr("10.97.1.0/24")],
            ..RouteDiff::default()
        },
        "{diff:?}"
    );
    ensure!(nl.routes_on(&target).await? == smaller);

    // Default routes of both families.
    let with_defaults = cidrs(&["10.98.0.0/16", "fd98::/64", "0.0.0.0/0", "::/0"]);
    let diff = reconciler.reconcile(&nl, &with_defaults).await?;
    ensure!(diff == added(&["0.0.0.0/0", "::/0"]), "{diff:?}");
    ensure!(nl.routes_on(&target).await? == with_defaults);
    reconciler.reconcile(&nl, &smaller).await?;
    ensure!(nl.routes_on(&target).await? == smaller);

    packets_flow_through_the_tun(&tun).await?;

    reconciler.remove_all(&nl).await?;
    ensure!(nl.routes_on(&target).await?.is_empty());
    reconciler
        .remove_all(&nl)
        .await
        .context("remove_all twice")?;

    // delete_link on another device; deleting it again is fine.
    let other = Tun::create("wmtest1")?;
    let other_index = nl.link_index("wmtest1").await?;
    nl.delete_link(other_index).await?;
    ensure!(matches!(
        nl.link_index("wmtest1").await,
        Err(NetlinkError::LinkNotFound { .. })
    ));
    nl.delete_link(other_index).await?;
    drop(other);

    // Closing the descriptor removes a non-persistent device.
    drop(tun);
    ensure!(matches!(
        nl.link_index("wmtest0").await,
        Err(NetlinkError::LinkNotFound { .. })
    ));
    Ok(())
}

/// Datagrams routed to the device come out of `try_recv`; a packet given to `send` reaches
/// a local socket.
async fn packets_flow_through_the_tun(tun: &Tun) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    socket.send_to(b"to peer", "10.98.0.5:9").await?;
    let packet = next_packet(tun, |p| p.len() >= 20 && p[0] >> 4 == 4).await?;
    ensure!(packet[9] == 17, "IPv4 protocol {}", packet[9]);
    ensure!(
        packet[12..16] == [10, 99, 0, 1],
        "source {:?}",
        &packet[12..16]
    );
    ensure!(
        packet[16..20] == [10, 98, 0, 5],
        "destination {:?}",
        &packet[16..20]
    );

    let socket6 = UdpSocket::bind("[::]:0").await?;
    socket6.send_to(b"to peer", "[fd98::5]:9").await?;
    // Skip the router solicitations and MLD reports the kernel sends on a new link.
    let packet = next_packet(tun, |p| p.len() >= 40 && p[0] >> 4 == 6 && p[6] == 17).await?;
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40])?);
    ensure!(dst == "fd98::5".parse::<Ipv6Addr>()?, "destination {dst}");

    let local = UdpSocket::bind("10.99.0.1:0").await?;
    let port = local.local_addr()?.port();
    let incoming = ipv4_udp([10, 98, 0, 5], 4242, [10, 99, 0, 1], port, b"from peer");
    let written = tun.send(&incoming).await?;
    ensure!(written == incoming.len());
    let mut buf = [0u8; 64];
    let (len, from) = tokio::time::timeout(Duration::from_secs(5), local.recv_from(&mut buf))
        .await
        .context("no datagram from the TUN device")??;
    ensure!(&buf[..len] == b"from peer");
    ensure!(from == SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 98, 0, 5)), 4242));

    ensure!(tun.try_send(&incoming)?.is_some());
    tokio::time::timeout(Duration::from_secs(5), local.recv_from(&mut buf))
        .await
        .context("no datagram after try_send")??;
    Ok(())
}

/// The next packet from `tun` that `wanted` accepts, waiting with `readable`/`try_recv`.
async fn next_packet(tun: &Tun, wanted: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 1500];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        while let Some(len) = tun.try_recv(&mut buf)? {
            if wanted(&buf[..len]) {
                return Ok(buf[..len].to_vec());
            }
        }
        if tokio::time::timeout_at(deadline, tun.readable())
            .await
            .is_err()
        {
            bail!("no matching packet from the TUN device within 5 s");
        }
    }
}

/// An IPv4 UDP packet with a valid header checksum and no UDP checksum (RFC 768 allows 0).
fn ipv4_udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let sum = p
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn added(texts: &[&str]) -> RouteDiff {
    RouteDiff {
        added: texts.iter().map(|t| cidr(t)).collect(),
        ..RouteDiff::default()
    }
}

fn cidrs(texts: &[&str]) -> BTreeSet<IpCidr> {
    texts.iter().map(|t| cidr(t)).collect()
}

fn cidr(text: &str) -> IpCidr {
    text.parse().expect("test prefixes are valid")
}
