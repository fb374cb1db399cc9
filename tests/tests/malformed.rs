//! Malformed inner packets from both sides of a tunnel (issue 12 §1), against a real agent
//! in network namespaces (needs root):
//!
//! - a peer nobody here wrote (Debian's `wireguard-go` on host b) encrypts thousands of
//!   malformed IPv4 packets that b writes into its own TUN device through an `AF_PACKET`
//!   socket: lengths shorter than the header (the 7-byte case that used to panic the data
//!   plane), lengths that lie, header lengths out of range, TCP data offsets past the end,
//!   fragments, sources outside b's allowed IPs, random bytes;
//! - a pod behind the agent sends malformed TCP and UDP through a raw socket towards b.
//!
//! The agent keeps running, counts what it refuses (`wiremesh_drops_total{reason=...}`)
//! and carries a checksummed transfer both ways afterwards.

// The test prints what it sent and counted (shown with --nocapture).
#![allow(clippy::print_stdout)]
// One `sockaddr_ll` for the `AF_PACKET` socket: nix has no safe constructor for it, and a
// TUN device has no link address for `getifaddrs` to hand out.
#![allow(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
    SockaddrLike as _, sendto, socket,
};
use wiremesh_lab::mesh::{IFACE, Node, eventually, in_netns};
use wiremesh_lab::{Lab, MIB, ping, transfer};

/// Malformed packets b's TUN device takes, per kind.
const PER_KIND: usize = 400;
/// Malformed packets the pod sends.
const FROM_POD: usize = 1000;
/// No part may take longer than this.
const BUDGET: Duration = Duration::from_secs(60);

#[test]
fn malformed_inner_packets_from_a_foreign_peer_and_a_pod_are_survived_and_counted() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let b = Node::new(&lab, "b", 2)?;
    a.start(&[b.as_peer(false)])?;

    let _wggo = b.start_wireguard_go(
        &["wireguard-go", "-f", IFACE],
        &[("LOG_LEVEL", "error")],
        &a,
        true,
    )?;
    ping(&b.pod, a.pod.ip(), 2)?;
    ping(&a.pod, b.pod.ip(), 2)?;

    let before = a.scrape()?;
    let count = |e: &wiremesh_lab::metrics::Exposition, reason: &str| {
        e.value("wiremesh_drops_total", &[("reason", reason)])
    };
    let (bad_source_0, bad_packet_0) =
        (count(&before, "bad_source")?, count(&before, "bad_packet")?);

    // b -> a: through wireguard-go, which routes anything IPv4 of 20 bytes or more by its
    // destination and encrypts it as it is.
    let packets = foreign_packets(b.pod.ip(), a.pod.ip());
    let sent = packets.len();
    in_netns(&b.host, move || write_into_tun(IFACE, &packets))?;
    println!("b's TUN device took {sent} malformed packets for a");

    // a's pod -> b: through the agent's TUN read path, segmentation and encryption.
    let (from, to) = (a.pod.ip(), b.pod.ip());
    let pod_sent = in_netns(&a.pod, move || send_raw(from, to))?;
    println!("a's pod sent {pod_sent} malformed packets to b");

    // Counted once they arrived: sources outside b's allowed IPs, lengths that lie (a few
    // may be lost on the way, in wireguard-go's queues).
    let started = Instant::now();
    let want = PER_KIND as f64 * 0.9;
    eventually(Duration::from_secs(10), || {
        let now = a.scrape()?;
        let bad_source = count(&now, "bad_source")? - bad_source_0;
        let bad_packet = count(&now, "bad_packet")? - bad_packet_0;
        ensure!(
            bad_source >= want && bad_packet >= want,
            "bad_source +{bad_source}, bad_packet +{bad_packet}"
        );
        println!("a counted bad_source +{bad_source}, bad_packet +{bad_packet}");
        Ok(())
    })?;
    ensure!(started.elapsed() < BUDGET, "counting took too long");
    ensure!(
        a.agent.as_ref().is_some_and(|p| p.is_running()),
        "the agent died"
    );
    ping(&a.pod, b.pod.ip(), 2)?;
    let there = transfer(&a.pod, b.pod.ip(), 16 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 16 * MIB)?;
    println!(
        "then 16 MiB a->b and b->a intact (sha256 {} / {})",
        there.sha256, back.sha256
    );
    Ok(())
}

/// Malformed IPv4 packets from `src` to `dst`, [`PER_KIND`] of each kind; every one is at
/// least 20 bytes with version 4 so that wireguard-go routes it.
fn foreign_packets(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<Vec<u8>> {
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let mut out = Vec::new();
    for i in 0..PER_KIND {
        let payload = 20 + i % 200;
        // Total length shorter than the header: boringtun cuts the packet to it.
        for short in [7u16, 1, 19] {
            let mut p = tcp(src, dst, payload);
            p[2..4].copy_from_slice(&short.to_be_bytes());
            out.push(p);
        }
        // A total length past the end: refused after decryption (bad_packet).
        let mut p = tcp(src, dst, payload);
        // (More than wireguard-go's padding of up to 15 bytes, which would make it true.)
        let lie = p.len() as u16 + 16 + (i as u16 % 1000);
        p[2..4].copy_from_slice(&lie.to_be_bytes());
        out.push(p);
        // Header lengths below 20 and past the packet.
        for ihl in [0u8, 4, 15] {
            let mut p = tcp(src, dst, 0);
            p[0] = 0x40 | ihl;
            out.push(p);
        }
        // TCP data offsets of 0 and past the end, and a cut TCP header.
        for offset in [0u8, 0xf0] {
            let mut p = tcp(src, dst, 4);
            p[32] = offset;
            out.push(p);
        }
        let mut p = tcp(src, dst, 0);
        p.truncate(20 + 7);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        out.push(p);
        // A fragment of a TCP segment.
        let mut p = tcp(src, dst, payload);
        p[6] = 0x20;
        out.push(p);
        // A source outside b's allowed IPs: refused after decryption (bad_source).
        out.push(tcp(Ipv4Addr::new(10, 66, 0, 1), dst, payload));
        // Random bytes behind a plausible start.
        let len = 20 + (rng.next() % 1380) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        p[0] = 0x40 | (p[0] & 0x0f);
        p[16..20].copy_from_slice(&dst.octets());
        out.push(p);
    }
    out
}

/// A TCP/IPv4 ACK with `payload` bytes (checksums left zero: nobody verifies them before
/// the parsers under test).
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let total = 40 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p
}

/// Writes each packet into the TUN device `iface` of the current namespace: an
/// `AF_PACKET` datagram socket hands it to the device as it is, as if routed there.
fn write_into_tun(iface: &str, packets: &[Vec<u8>]) -> Result<()> {
    let index = nix::net::if_::if_nametoindex(iface).with_context(|| format!("no {iface}"))?;
    let raw = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_IP as u16).to_be(),
        sll_ifindex: i32::try_from(index)?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    let len = u32::try_from(size_of::<libc::sockaddr_ll>())?;
    // SAFETY: `raw` is a live, fully initialized `sockaddr_ll` of `len` bytes, which
    // `from_raw` copies.
    let link =
        unsafe { LinkAddr::from_raw(std::ptr::from_ref(&raw).cast::<libc::sockaddr>(), Some(len)) }
            .context("a sockaddr_ll")?;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthIp,
    )
    .context("AF_PACKET socket")?;
    let started = Instant::now();
    for (i, packet) in packets.iter().enumerate() {
        ensure!(started.elapsed() < BUDGET, "writing took too long");
        sendto(fd.as_raw_fd(), packet, &link, MsgFlags::empty())
            .with_context(|| format!("writing packet {i} into {iface}"))?;
        // Paced, so that wireguard-go's queues never drop what the test counts on.
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

/// Sends [`FROM_POD`] malformed TCP and UDP packets from `src` to `dst` through a raw
/// socket (`IPPROTO_RAW`: we write the IP header; the kernel fills in its length and
/// checksum); returns how many it sent.
fn send_raw(src: Ipv4Addr, dst: Ipv4Addr) -> Result<usize> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )
    .context("raw socket")?;
    let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
    let mut rng = XorShift(0x0dd_ba11);
    let started = Instant::now();
    for i in 0..FROM_POD {
        ensure!(started.elapsed() < BUDGET, "sending took too long");
        let mut p = match i % 4 {
            // TCP data offset past the end.
            0 => {
                let mut p = tcp(src, dst, 8);
                p[32] = 0xf0;
                p
            }
            // A TCP header cut short.
            1 => {
                let mut p = tcp(src, dst, 0);
                p.truncate(20 + 9);
                p
            }
            // UDP whose length field lies.
            2 => {
                let mut p = tcp(src, dst, 12);
                p[9] = 17;
                p[24..26].copy_from_slice(&0xffffu16.to_be_bytes());
                p
            }
            // Random transport bytes, up to a full-size packet.
            _ => {
                let mut p = tcp(src, dst, 0);
                p.truncate(20);
                p[9] = (rng.next() % 2) as u8 * 11 + 6;
                let len = (rng.next() % 1380) as usize;
                p.extend((0..len).map(|_| rng.next() as u8));
                p
            }
        };
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        sendto(fd.as_raw_fd(), &p, &to, MsgFlags::empty())
            .with_context(|| format!("sending packet {i}"))?;
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(FROM_POD)
}

/// A small deterministic generator, so that every run sends the same packets.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
