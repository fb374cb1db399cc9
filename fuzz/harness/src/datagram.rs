//! `Device::handle_datagram` with whatever the underlay brings: arbitrary datagrams from
//! any address (before and after a session exists), arbitrary payloads the peer encrypted
//! in a real session, datagrams of that session cut short or changed, timer ticks and
//! the flush of queued packets in between.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use wiremesh_core::DatagramVerdict;

use crate::session::{OUT_BUF, Session, Sources};

/// Runs one input; see the module documentation.
pub fn datagram(data: &[u8]) {
    let _ = run(&mut Unstructured::new(data));
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let handshake: bool = u.arbitrary()?;
    let mut session = Session::new(Sources::Narrow, handshake);
    let mut out = vec![0u8; OUT_BUF];
    let mut now = Instant::now();
    while !u.is_empty() {
        match u.int_in_range(0..=4u8)? {
            0 => {
                let from = address(u)?;
                let len = usize::from(u.arbitrary::<u16>()?);
                let datagram = u.bytes(len.min(u.len()))?.to_vec();
                handle(&mut session, from, &datagram, &mut out);
            }
            1 if handshake => {
                let len = usize::from(u.arbitrary::<u16>()?);
                let payload = u.bytes(len.min(u.len()))?.to_vec();
                let datagram = session.seal(&payload);
                let from = session.remote_addr;
                handle(&mut session, from, &datagram, &mut out);
            }
            2 if handshake => {
                // A real data message, cut or with one byte changed.
                let len = u.int_in_range(0..=64)?;
                let payload = u.bytes(len.min(u.len()))?.to_vec();
                let mut datagram = session.seal(&payload);
                let at = u.choose_index(datagram.len())?;
                if u.arbitrary()? {
                    datagram.truncate(at);
                } else if let Some(b) = datagram.get_mut(at) {
                    *b ^= u.arbitrary::<u8>()?.max(1);
                }
                let from = session.remote_addr;
                handle(&mut session, from, &datagram, &mut out);
            }
            3 => {
                now += Duration::from_millis(u.int_in_range(0..=30_000)?);
                session.device.update_timers(now, &mut out, |_, _| {});
            }
            _ => {
                let peer = session.peer;
                let mut n = 0;
                while session.device.poll_queued(peer, &mut out).is_some() {
                    n += 1;
                    assert!(n <= 1_000_000, "the queue never ends");
                }
            }
        }
    }
    Ok(())
}

fn handle(session: &mut Session, from: SocketAddr, datagram: &[u8], out: &mut [u8]) {
    match session.device.handle_datagram(from.into(), datagram, out) {
        DatagramVerdict::Tunnel { packet, .. } => {
            assert!(
                packet.len() <= datagram.len(),
                "decrypted more than received"
            );
        }
        DatagramVerdict::Reply {
            datagram: reply, ..
        } => {
            assert!(
                !reply.is_empty() && reply.len() <= 148,
                "a reply of {}",
                reply.len()
            );
        }
        DatagramVerdict::Done | DatagramVerdict::Drop(_) => {}
    }
}

/// The peer's own address, or another one (an attacker, a roaming peer).
fn address(u: &mut Unstructured<'_>) -> Result<SocketAddr> {
    let ip = match u.int_in_range(0..=2u8)? {
        0 => {
            return Ok(crate::session::REMOTE_ADDR
                .parse()
                .expect("a valid constant"));
        }
        1 => IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?)),
        _ => IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?)),
    };
    Ok(SocketAddr::new(ip, u.arbitrary()?))
}
