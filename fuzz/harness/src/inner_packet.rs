//! The inner packet path as the data-plane thread runs it, both ways:
//!
//! - receive: a payload the peer encrypted (any bytes) → `Device::handle_datagram`
//!   (decryption, source check, and for a cluster's agent the destination and
//!   tunnel-in-tunnel checks) → `Gro::push` → `Gro::drain` → the TUN write;
//! - send: a TUN read (vnet header and packet, any bytes) → `Segmenter` → `MtuGuard` for a
//!   single packet → `Device::handle_tun_packet` → `GsoBatch` → the peer decrypts it.
//!
//! Checks that everything GRO writes to the TUN device carries a vnet header that the
//! offload code itself would take back (the kernel reads it the same way).

use std::time::Instant;

use arbitrary::{Result, Unstructured};
use wiremesh_core::mtu::{MAX_ICMP_LEN, MtuGuard, MtuVerdict};
use wiremesh_core::offload::{
    BatchPush, Gro, GroPush, GsoBatch, MAX_GSO_SEGMENTS, MAX_IP_PACKET, Segmenter, VNET_HDR_LEN,
};
use wiremesh_core::translate::Translation;
use wiremesh_core::{DatagramVerdict, TunVerdict, encap};

use crate::session::{OUT_BUF, Session, Sources};

/// Runs one input; see the module documentation.
pub fn inner_packet(data: &[u8]) {
    let _ = run(&mut Unstructured::new(data));
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let sources = if u.arbitrary()? {
        Sources::Any
    } else {
        Sources::Narrow
    };
    let mut session = Session::new(sources, true);
    // A cluster's agent, which knows its own ranges, delivers no other tunnel's packet.
    let limited: bool = u.arbitrary()?;
    if limited {
        let own = ["10.0.0.0/8", "fd00::/8"].map(|c| c.parse().expect("a CIDR"));
        session
            .device
            .set_translation(Translation::default().with_own_ranges(own.to_vec()));
    }
    let mut guard = MtuGuard::new(u.int_in_range(0..=70_000)?);
    let mut gro = Gro::new();
    let mut tx = GsoBatch::new(MAX_GSO_SEGMENTS);
    let mut out = vec![0u8; OUT_BUF];
    let mut icmp = vec![0u8; MAX_ICMP_LEN];
    let now = Instant::now();
    while !u.is_empty() {
        let receive: bool = u.arbitrary()?;
        let len = usize::from(u.arbitrary::<u16>()?);
        let bytes = u.bytes(len.min(u.len()))?;
        if receive {
            let datagram = session.seal(bytes);
            let from = session.remote_addr;
            if let DatagramVerdict::Tunnel { packet, .. } =
                session
                    .device
                    .handle_datagram(from.into(), &datagram, &mut out)
            {
                assert!(
                    !(limited && encap::carries_tunnel(packet)),
                    "another tunnel's packet delivered: {:02x?}",
                    packet.get(..packet.len().min(60))
                );
                push(&mut gro, packet);
            }
        } else {
            let mut read = bytes.to_vec();
            let Ok(mut segments) = Segmenter::new(&mut read) else {
                continue;
            };
            let single = !segments.is_gso();
            while let Some(packet) = segments.next_segment() {
                if single {
                    match guard.check(packet, now, &mut icmp) {
                        MtuVerdict::Fits => {}
                        MtuVerdict::TooBig(answer) => {
                            assert!(answer.len() <= MAX_ICMP_LEN);
                            continue;
                        }
                        MtuVerdict::TooBigSilently => continue,
                    }
                }
                encrypt(&mut session, &mut tx, packet);
            }
        }
    }
    drain(&mut gro);
    flush(&mut session, &mut tx);
    Ok(())
}

/// As the agent's `deliver`: a full coalescer is written out and the packet pushed again.
fn push(gro: &mut Gro, packet: &[u8]) {
    assert!(packet.len() <= MAX_IP_PACKET);
    if gro.push(packet) == GroPush::Full {
        drain(gro);
        assert_ne!(
            gro.push(packet),
            GroPush::Full,
            "an empty coalescer is full"
        );
    }
}

/// Writes out what GRO holds; each write must be a TUN read the offload code takes back.
fn drain(gro: &mut Gro) {
    gro.drain(|written| {
        let mut again = written.to_vec();
        match Segmenter::new(&mut again) {
            Ok(mut segments) => {
                let mut n = 0;
                while segments.next_segment().is_some() {
                    n += 1;
                    assert!(n <= MAX_IP_PACKET, "segments never end");
                }
            }
            Err(e) => panic!(
                "GRO wrote a vnet header the offload code refuses ({e}): {:02x?}",
                written.get(..written.len().min(VNET_HDR_LEN + 60))
            ),
        }
    });
}

/// As the agent's `encrypt`: the datagram joins the GSO batch, which goes out when it must.
fn encrypt(session: &mut Session, tx: &mut GsoBatch, packet: &[u8]) {
    let (to, len) = match session.device.handle_tun_packet(packet, tx.space()) {
        TunVerdict::Send { to, datagram, .. } => (to, datagram.len()),
        TunVerdict::Queued | TunVerdict::Drop(_) => return,
    };
    if tx.push(to, len) == BatchPush::FlushFirst {
        flush(session, tx);
    }
    if tx.is_full() {
        flush(session, tx);
    }
}

/// Sends the batch: the remote peer takes each datagram of it.
fn flush(session: &mut Session, tx: &mut GsoBatch) {
    if let Some(batch) = tx.pending() {
        assert_eq!(batch.to.addr, session.remote_addr);
        let data = batch.data.to_vec();
        for datagram in data.chunks(batch.segment.max(1)) {
            session.remote_receives(datagram);
        }
    }
    tx.clear();
}
