//! Micro-benchmarks of the packet path without I/O, through the core's public API:
//!
//! - `encapsulate/<bytes>`: `Device::handle_tun_packet` of an IPv4 packet on an
//!   established session (allowed-IPs lookup, peer, ChaCha20-Poly1305 seal);
//! - `encapsulate_padded/{copied,in_place}/<bytes>`: the same for packets that need
//!   padding to 16 bytes, copied to be padded (`handle_tun_packet`) or padded in the room
//!   after them in their buffer (`handle_tun_packet_in_place`, as the TUN reads are);
//! - `decapsulate/<bytes>`: `Device::handle_datagram` of a data message (receiver-index
//!   lookup, open, replay window, source check);
//! - `allowed_ips_lookup/<routes>`: `AllowedIps::lookup` in a table of 10, 1,000 and
//!   100,000 prefixes (/24s with some /32s and /16s), 7 in 8 lookups hitting;
//! - `peer_lookup/keepalive/<peers>`: `Device::handle_datagram` of a keepalive (a data
//!   message with no payload) among that many peers: index lookup plus the AEAD tag;
//! - `peer_lookup/unknown_index/<peers>`: a data message whose receiver index names no
//!   peer: the lookup alone, no cryptography.
//! - `offload/segment_64k`: `Segmenter` splitting a 64 KB TCP/IPv4 TSO read into 1,400-byte
//!   segments (headers, lengths, TCP checksum of each);
//! - `offload/gro_47`: `Gro` coalescing those 47 segments back into one super-packet and
//!   draining it.
//! - `translate/{encapsulate,decapsulate}/{plain,translated}/1420`: the in-place send
//!   path and the receive path of a 1,420-byte packet without and with a prefix
//!   translation (issue 14: the source mapped pod → mesh before encryption, the
//!   destination mesh → pod after decryption, checksums updated);
//!   `translate/outbound/1420` the translation alone, `translate/outbound_vnet_64k` once
//!   for a 64 KB TSO read.
//!
//! The other end of each session is a bare boringtun `Tunn`. Run with
//! `cargo bench -p wiremesh-core --bench packet_path`; `make bench` does.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wiremesh_core::offload::{Gro, GroPush, Segmenter};
use wiremesh_core::translate::Translation;
use wiremesh_core::{AllowedIps, DatagramVerdict, Device, TunVerdict};
use wiremesh_proto::uapi::{DeviceUpdate, PeerUpdate};
use wiremesh_proto::{IpCidr, PrivateKey, PublicKey};

/// The device's own address (where the remote sends from, in the remote's view).
const DEVICE_ADDR: [u8; 4] = [198, 18, 0, 1];
/// The remote's endpoint.
const REMOTE_ENDPOINT: ([u8; 4], u16) = ([198, 18, 0, 2], 51820);
/// Room for any datagram here (1420-byte packets plus 32 bytes of overhead).
const BUFFER: usize = 2048;

criterion_group! {
    name = benches;
    // Short runs: `make bench` also runs the peer comparison. Criterion's command line
    // (`-- --measurement-time 10`) overrides these.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = encapsulate, encapsulate_padded, decapsulate, allowed_ips_lookup, peer_lookup, offload, translate
}
criterion_main!(benches);

fn encapsulate(c: &mut Criterion) {
    let mut group = c.benchmark_group("encapsulate");
    for len in [64, 1420] {
        let mut link = Link::new(0, Initiator::Device);
        let packet = ipv4([10, 0, 1, 5], [10, 0, 2, 7], len);
        let mut out = vec![0u8; BUFFER];
        assert!(
            matches!(
                link.device.handle_tun_packet(&packet, &mut out),
                TunVerdict::Send { .. }
            ),
            "the session is up"
        );
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::from_parameter(len), |b| {
            b.iter(
                || match link.device.handle_tun_packet(black_box(&packet), &mut out) {
                    TunVerdict::Send { datagram, .. } => black_box(datagram.len()),
                    _ => 0,
                },
            );
        });
    }
    group.finish();
}

fn encapsulate_padded(c: &mut Criterion) {
    let mut group = c.benchmark_group("encapsulate_padded");
    for len in [100, 1000] {
        let mut link = Link::new(0, Initiator::Device);
        let packet = ipv4([10, 0, 1, 5], [10, 0, 2, 7], len);
        let mut out = vec![0u8; BUFFER];
        let mut buf = vec![0u8; BUFFER];
        buf[..len].copy_from_slice(&packet);
        assert!(
            matches!(
                link.device.handle_tun_packet(&packet, &mut out),
                TunVerdict::Send { .. }
            ),
            "the session is up"
        );
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("copied", len), |b| {
            b.iter(
                || match link.device.handle_tun_packet(black_box(&packet), &mut out) {
                    TunVerdict::Send { datagram, .. } => black_box(datagram.len()),
                    _ => 0,
                },
            );
        });
        group.bench_function(BenchmarkId::new("in_place", len), |b| {
            b.iter(|| {
                match link
                    .device
                    .handle_tun_packet_in_place(black_box(&mut buf), len, &mut out)
                {
                    TunVerdict::Send { datagram, .. } => black_box(datagram.len()),
                    _ => 0,
                }
            });
        });
    }
    group.finish();
}

fn decapsulate(c: &mut Criterion) {
    let mut group = c.benchmark_group("decapsulate");
    for len in [64, 1420] {
        let mut link = Link::new(0, Initiator::Remote);
        let packet = ipv4([10, 0, 2, 7], [10, 0, 1, 5], len);
        let mut out = vec![0u8; BUFFER];
        let first = link.remote_encapsulate(&packet);
        assert!(
            matches!(
                link.device
                    .handle_datagram(remote().into(), &first, &mut out),
                DatagramVerdict::Tunnel { .. }
            ),
            "the session is up"
        );
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::from_parameter(len), |b| {
            // Each datagram once, in order: the replay window refuses a repeat.
            b.iter_batched(
                || encrypt(&mut link.remote, &mut link.out, &packet),
                |datagram| {
                    black_box(
                        link.device
                            .handle_datagram(remote().into(), &datagram, &mut out),
                    )
                    .is_tunnel()
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn allowed_ips_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("allowed_ips_lookup");
    for routes in [10, 1_000, 100_000] {
        let (table, entries) = route_table(routes);
        let mut rng = XorShift(0x5eed_0000 + routes as u64);
        // 1024 addresses: 7 in 8 inside a random entry, the rest in 192.0.0.0/8 (absent).
        let addresses: Vec<IpAddr> = (0..1024)
            .map(|_| {
                let r = rng.next();
                if r.is_multiple_of(8) {
                    IpAddr::V4(Ipv4Addr::from(0xC000_0000 | (r >> 8) as u32 & 0x00ff_ffff))
                } else {
                    let (network, len) = entries[(r >> 3) as usize % entries.len()];
                    let host_bits = if len == 32 { 0 } else { u32::MAX >> len };
                    IpAddr::V4(Ipv4Addr::from(network | ((r >> 32) as u32 & host_bits)))
                }
            })
            .collect();
        let hits = addresses
            .iter()
            .filter(|a| table.lookup(**a).is_some())
            .count();
        assert!(hits > 800, "{hits} of 1024 lookups hit");
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::from_parameter(routes), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(table.lookup(black_box(addresses[i])))
            });
        });
    }
    group.finish();
}

fn peer_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("peer_lookup");
    group.throughput(Throughput::Elements(1));
    for peers in [1, 1_000, 10_000] {
        let mut link = Link::new(peers - 1, Initiator::Remote);
        let mut out = vec![0u8; BUFFER];
        let first = link.remote_encapsulate(&[]);
        assert!(
            matches!(
                link.device
                    .handle_datagram(remote().into(), &first, &mut out),
                DatagramVerdict::Done
            ),
            "a keepalive is accepted"
        );
        group.bench_function(BenchmarkId::new("keepalive", peers), |b| {
            b.iter_batched(
                || encrypt(&mut link.remote, &mut link.out, &[]),
                |datagram| {
                    black_box(
                        link.device
                            .handle_datagram(remote().into(), &datagram, &mut out),
                    )
                    .is_tunnel()
                },
                BatchSize::SmallInput,
            );
        });
        // A data message (type 4) for a receiver index no peer holds: boringtun puts the
        // peer's slot in the upper 24 bits.
        let absent = ((peers as u32 + 7) << 8).to_le_bytes();
        let mut unknown = vec![4, 0, 0, 0];
        unknown.extend_from_slice(&absent);
        unknown.extend_from_slice(&[0u8; 8 + 16]);
        assert!(matches!(
            link.device
                .handle_datagram(remote().into(), &unknown, &mut out),
            DatagramVerdict::Drop(_)
        ));
        group.bench_function(BenchmarkId::new("unknown_index", peers), |b| {
            b.iter(|| {
                black_box(link.device.handle_datagram(
                    remote().into(),
                    black_box(&unknown),
                    &mut out,
                ))
                .is_tunnel()
            });
        });
    }
    group.finish();
}

fn translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate");
    let len = 1420;
    // This cluster's pods 10.0.1.0/24 are 100.64.1.0/24 elsewhere.
    let table = Translation::new(&[(
        IpCidr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 0)), 24).expect("valid prefix"),
        IpCidr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 1, 0)), 24).expect("valid prefix"),
    )])
    .expect("a valid table");
    group.throughput(Throughput::Bytes(len as u64));
    for translated in [false, true] {
        let name = if translated { "translated" } else { "plain" };
        let mut link = Link::new(0, Initiator::Device);
        if translated {
            link.device.set_translation(table.clone());
        }
        let packet = ipv4([10, 0, 1, 5], [10, 0, 2, 7], len);
        let mut out = vec![0u8; BUFFER];
        // A fresh copy each time: the send path translates in place.
        group.bench_function(BenchmarkId::new(format!("encapsulate/{name}"), len), |b| {
            b.iter_batched_ref(
                || {
                    let mut buf = vec![0u8; BUFFER];
                    buf[..len].copy_from_slice(&packet);
                    buf
                },
                |buf| match link.device.handle_tun_packet_in_place(buf, len, &mut out) {
                    TunVerdict::Send { datagram, .. } => black_box(datagram.len()),
                    _ => 0,
                },
                BatchSize::SmallInput,
            );
        });
        let mut link = Link::new(0, Initiator::Remote);
        let to = if translated {
            [100, 64, 1, 5]
        } else {
            [10, 0, 1, 5]
        };
        if translated {
            link.device.set_translation(table.clone());
        }
        let packet = ipv4([10, 0, 2, 7], to, len);
        let first = link.remote_encapsulate(&packet);
        assert!(
            matches!(
                link.device.handle_datagram(remote().into(), &first, &mut out),
                DatagramVerdict::Tunnel { packet, .. } if packet[16..20] == [10, 0, 1, 5]
            ),
            "the session is up and the destination is the pod's"
        );
        group.bench_function(BenchmarkId::new(format!("decapsulate/{name}"), len), |b| {
            b.iter_batched(
                || encrypt(&mut link.remote, &mut link.out, &packet),
                |datagram| {
                    black_box(
                        link.device
                            .handle_datagram(remote().into(), &datagram, &mut out),
                    )
                    .is_tunnel()
                },
                BatchSize::SmallInput,
            );
        });
    }
    let packet = ipv4([10, 0, 1, 5], [10, 0, 2, 7], len);
    group.bench_function(BenchmarkId::new("outbound", len), |b| {
        b.iter_batched_ref(
            || packet.clone(),
            |p| black_box(table.outbound(p)),
            BatchSize::SmallInput,
        );
    });
    let mut read = tso_read(64_000, 1_400);
    read[10 + 12..10 + 16].copy_from_slice(&[10, 0, 1, 5]);
    group.throughput(Throughput::Bytes(read.len() as u64));
    group.bench_function("outbound_vnet_64k", |b| {
        b.iter_batched_ref(
            || read.clone(),
            |r| black_box(table.outbound_vnet(r)),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// Which side sends the handshake initiation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Initiator {
    Device,
    Remote,
}

/// A `Device` (10.0.1.0/24 behind it) with a session to a bare boringtun `Tunn`
/// (10.0.2.0/24 behind it), and `extra` idle peers besides.
struct Link {
    device: Device,
    remote: Tunn,
    out: Vec<u8>,
}

impl Link {
    fn new(extra: usize, initiator: Initiator) -> Self {
        let device_key = PrivateKey::from([1; 32]);
        let remote_secret = x25519::StaticSecret::from([2; 32]);
        let device_public =
            x25519::PublicKey::from(&x25519::StaticSecret::from(*device_key.as_bytes()));
        let remote_public = PublicKey::from(*x25519::PublicKey::from(&remote_secret).as_bytes());
        let mut peers: Vec<PeerUpdate> = (0..extra)
            .map(|i| {
                let mut seed = [3u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let secret = x25519::StaticSecret::from(seed);
                let public = PublicKey::from(*x25519::PublicKey::from(&secret).as_bytes());
                let address = Ipv4Addr::from(0x0A80_0000 + i as u32 + 1);
                peer(public, None, IpCidr::host(IpAddr::V4(address)))
            })
            .collect();
        let remote_net =
            IpCidr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 0)), 24).expect("valid prefix");
        peers.push(peer(remote_public, Some(remote()), remote_net));
        let mut device = Device::new();
        let _ = device
            .apply(&DeviceUpdate::replace_all(device_key, 51820, peers))
            .expect("the peers fit");
        let remote = Tunn::new(remote_secret, device_public, None, None, 1, None);
        let mut link = Self {
            device,
            remote,
            out: vec![0u8; BUFFER],
        };
        match initiator {
            Initiator::Device => link.device_initiates(),
            Initiator::Remote => link.remote_initiates(),
        }
        link
    }

    /// Device → initiation → remote → response → device → keepalive and the queued
    /// packet → remote.
    fn device_initiates(&mut self) {
        let mut out = vec![0u8; BUFFER];
        let packet = ipv4([10, 0, 1, 5], [10, 0, 2, 7], 64);
        let init = match self.device.handle_tun_packet(&packet, &mut out) {
            TunVerdict::Send { datagram, .. } => datagram.to_vec(),
            other => panic!("expected an initiation, got {other:?}"),
        };
        let response = self.remote_receive(&init);
        assert_eq!(response.len(), 1, "one handshake response");
        let (peer, keepalive) =
            match self
                .device
                .handle_datagram(remote().into(), &response[0], &mut out)
            {
                DatagramVerdict::Reply {
                    peer: Some(peer),
                    datagram,
                    ..
                } => (peer, datagram.to_vec()),
                other => panic!("expected a keepalive, got {other:?}"),
            };
        self.remote_receive(&keepalive);
        while let Some((_, queued)) = self.device.poll_queued(peer, &mut out) {
            let queued = queued.to_vec();
            self.remote_receive(&queued);
        }
    }

    /// Remote → initiation → device → response → remote → keepalive → device.
    fn remote_initiates(&mut self) {
        let mut out = vec![0u8; BUFFER];
        let init = match self
            .remote
            .format_handshake_initiation(&mut self.out, false)
        {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        let response = match self
            .device
            .handle_datagram(remote().into(), &init, &mut out)
        {
            DatagramVerdict::Reply { datagram, .. } => datagram.to_vec(),
            other => panic!("expected a response, got {other:?}"),
        };
        let keepalive = self.remote_receive(&response);
        assert_eq!(
            keepalive.len(),
            1,
            "the initiator confirms with a keepalive"
        );
        assert!(matches!(
            self.device
                .handle_datagram(remote().into(), &keepalive[0], &mut out),
            DatagramVerdict::Done
        ));
    }

    /// Hands a datagram to the remote; returns what it sends back (flushed).
    fn remote_receive(&mut self, datagram: &[u8]) -> Vec<Vec<u8>> {
        let from = IpAddr::V4(Ipv4Addr::from(DEVICE_ADDR));
        let mut sent = Vec::new();
        let mut result = self.remote.decapsulate(Some(from), datagram, &mut self.out);
        while let TunnResult::WriteToNetwork(d) = result {
            sent.push(d.to_vec());
            result = self.remote.decapsulate(None, &[], &mut self.out);
        }
        sent
    }

    fn remote_encapsulate(&mut self, packet: &[u8]) -> Vec<u8> {
        encrypt(&mut self.remote, &mut self.out, packet)
    }
}

/// The remote encrypts `packet` (empty: a keepalive) for the device.
fn encrypt(remote: &mut Tunn, buffer: &mut [u8], packet: &[u8]) -> Vec<u8> {
    match remote.encapsulate(packet, buffer) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("the remote has no session"),
    }
}

trait IsTunnel {
    fn is_tunnel(&self) -> bool;
}

impl IsTunnel for DatagramVerdict<'_> {
    fn is_tunnel(&self) -> bool {
        matches!(self, DatagramVerdict::Tunnel { .. })
    }
}

fn remote() -> SocketAddr {
    SocketAddr::from(REMOTE_ENDPOINT)
}

fn peer(key: PublicKey, endpoint: Option<SocketAddr>, cidr: IpCidr) -> PeerUpdate {
    let mut p = PeerUpdate::new(key);
    p.endpoint = endpoint;
    p.replace_allowed_ips = true;
    p.allowed_ips = vec![cidr];
    p
}

fn offload(c: &mut Criterion) {
    const MSS: u16 = 1400;
    let mut group = c.benchmark_group("offload");
    let read = tso_read(65_000, MSS);
    let mut work = read.clone();
    group.throughput(Throughput::Bytes(read.len() as u64));
    group.bench_function("segment_64k", |b| {
        b.iter(|| {
            work.copy_from_slice(&read);
            let mut segmenter = Segmenter::new(&mut work).expect("a valid TSO read");
            let mut bytes = 0;
            while let Some(segment) = segmenter.next_segment() {
                bytes += segment.len();
            }
            black_box(bytes)
        });
    });
    let mut segments = Vec::new();
    let mut split = read.clone();
    let mut segmenter = Segmenter::new(&mut split).expect("a valid TSO read");
    while let Some(segment) = segmenter.next_segment() {
        segments.push(segment.to_vec());
    }
    let mut gro = Gro::new();
    group.bench_function(format!("gro_{}", segments.len()), |b| {
        b.iter(|| {
            for segment in &segments {
                assert_eq!(gro.push(segment), GroPush::Added);
            }
            let mut bytes = 0;
            gro.drain(|p| bytes += p.len());
            black_box(bytes)
        });
    });
    group.finish();
}

/// A read from a vnet-header TUN device: a TCP/IPv4 TSO super-packet of `payload` bytes to
/// be cut into `mss`-byte segments, its checksum left partial as the kernel leaves it.
fn tso_read(payload: usize, mss: u16) -> Vec<u8> {
    let total = 40 + payload;
    // virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    let mut p = vec![0u8; 10 + total];
    p[0] = 0x01;
    p[1] = 0x01;
    p[2..4].copy_from_slice(&40u16.to_ne_bytes());
    p[4..6].copy_from_slice(&mss.to_ne_bytes());
    p[6..8].copy_from_slice(&20u16.to_ne_bytes());
    p[8..10].copy_from_slice(&16u16.to_ne_bytes());
    let ip = &mut p[10..];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total.min(0xffff) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 1, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 2, 0, 2]);
    ip[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&5201u16.to_be_bytes());
    ip[32] = 5 << 4;
    ip[33] = 0x10;
    for (i, b) in ip[40..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// An IPv4/UDP packet of `len` bytes in all (no checksums: nothing checks them here).
fn ipv4(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let len = len.max(28);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    p
}

/// A table of `n` prefixes: 6 in 8 are /24s (10.0.0.0 upwards), 1 in 8 /32s
/// (100.64.0.0 upwards), 1 in 8 /16s (20.0.0.0 upwards); the value is the index.
fn route_table(n: usize) -> (AllowedIps<u32>, Vec<(u32, u8)>) {
    let mut table = AllowedIps::new();
    let mut entries = Vec::with_capacity(n);
    for i in 0..n as u32 {
        let (network, len) = match i % 8 {
            0 => (0x6440_0000 + i, 32),
            1 => (0x1400_0000 + ((i / 8) << 16), 16),
            _ => (0x0A00_0000 + (i << 8), 24),
        };
        let cidr = IpCidr::new(IpAddr::V4(Ipv4Addr::from(network)), len).expect("valid prefix");
        table.insert(cidr, i);
        entries.push((network, len));
    }
    (table, entries)
}

/// A small deterministic generator, so every run looks up the same addresses.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
