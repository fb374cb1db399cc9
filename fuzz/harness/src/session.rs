//! A device under test with one peer that is a bare boringtun `Tunn`, handshaken, so that
//! the remote end can encrypt any bytes at all (a peer nobody here wrote may send any
//! payload) and decrypt whatever the device sends.

use std::net::SocketAddr;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use wiremesh_core::offload::MAX_IP_PACKET;
use wiremesh_core::{DatagramVerdict, Device, PeerId};
use wiremesh_proto::uapi::{DeviceUpdate, PeerUpdate};
use wiremesh_proto::{IpCidr, PrivateKey, PublicKey};

/// The agent's decryption buffer (`dataplane::OUT_BUF`): the largest IP packet, plus
/// boringtun's 148-byte handshake initiation.
pub(crate) const OUT_BUF: usize = MAX_IP_PACKET + 1 + 148;

/// Where the device is and where its peer is, on the underlay.
pub(crate) const DEVICE_ADDR: &str = "198.18.0.1:51820";
pub(crate) const REMOTE_ADDR: &str = "198.18.0.2:51820";

/// The device and its one peer.
pub(crate) struct Session {
    pub(crate) device: Device,
    pub(crate) remote: Tunn,
    pub(crate) peer: PeerId,
    pub(crate) remote_addr: SocketAddr,
    device_addr: SocketAddr,
    buf: Vec<u8>,
}

/// Which sources the peer may send from: few (most inner packets fail the source check)
/// or every address (most pass it and reach GRO).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sources {
    Narrow,
    Any,
}

impl Session {
    /// A device that knows the remote peer; `handshake` completes a session first.
    pub(crate) fn new(sources: Sources, handshake: bool) -> Session {
        let (device_key, remote_key) = (PrivateKey::from([1; 32]), PrivateKey::from([2; 32]));
        let remote_secret = x25519::StaticSecret::from(*remote_key.as_bytes());
        let remote_public = PublicKey::from(*x25519::PublicKey::from(&remote_secret).as_bytes());
        let device_public =
            x25519::PublicKey::from(&x25519::StaticSecret::from(*device_key.as_bytes()));
        let remote_addr = parse(REMOTE_ADDR);
        let mut peer = PeerUpdate::new(remote_public);
        peer.endpoint = Some(remote_addr);
        peer.replace_allowed_ips = true;
        peer.allowed_ips = match sources {
            Sources::Narrow => vec![cidr("10.0.2.0/24"), cidr("fd00:2::/64")],
            Sources::Any => vec![cidr("0.0.0.0/0"), cidr("::/0")],
        };
        let mut device = Device::new();
        // A fresh device with one peer: far below any limit.
        let _ = device
            .apply(&DeviceUpdate::replace_all(device_key, 51820, vec![peer]))
            .expect("one peer fits");
        let peer = device.peer_id(&remote_public).expect("the peer was added");
        let remote = Tunn::new(remote_secret, device_public, None, None, 7, None);
        let mut session = Session {
            device,
            remote,
            peer,
            remote_addr,
            device_addr: parse(DEVICE_ADDR),
            buf: vec![0u8; OUT_BUF],
        };
        if handshake {
            session.handshake();
        }
        session
    }

    /// The remote peer initiates; the device answers; the remote's keepalive confirms.
    fn handshake(&mut self) {
        let mut init = vec![0u8; OUT_BUF];
        let init = match self.remote.format_handshake_initiation(&mut init, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("the remote peer made no initiation"),
        };
        let mut out = vec![0u8; OUT_BUF];
        let response = match self
            .device
            .handle_datagram(self.remote_addr.into(), &init, &mut out)
        {
            DatagramVerdict::Reply {
                peer: Some(_),
                datagram,
                ..
            } => datagram.to_vec(),
            other => panic!("the device did not answer the initiation: {other:?}"),
        };
        let keepalive =
            match self
                .remote
                .decapsulate(Some(self.device_addr.ip()), &response, &mut self.buf)
            {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("the remote peer did not confirm the handshake"),
            };
        match self
            .device
            .handle_datagram(self.remote_addr.into(), &keepalive, &mut out)
        {
            DatagramVerdict::Done => {}
            other => panic!("the device refused the confirming keepalive: {other:?}"),
        }
    }

    /// `payload` encrypted by the remote peer as a data message (any bytes: boringtun
    /// encrypts without looking).
    pub(crate) fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        match self.remote.encapsulate(payload, &mut self.buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("the remote peer has no session"),
        }
    }

    /// Hands a datagram the device sent to the remote peer, which must decrypt it.
    pub(crate) fn remote_receives(&mut self, datagram: &[u8]) {
        match self
            .remote
            .decapsulate(Some(self.device_addr.ip()), datagram, &mut self.buf)
        {
            // What it decrypted is no IP packet it would write (a length field that lies):
            // the remote's own business.
            TunnResult::Err(WireGuardError::InvalidPacket) => {}
            TunnResult::Err(e) => panic!("the remote peer refused a datagram: {e:?}"),
            TunnResult::Done
            | TunnResult::WriteToNetwork(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {}
        }
    }
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse().expect("a valid constant address")
}

fn cidr(text: &str) -> IpCidr {
    text.parse().expect("a valid constant CIDR")
}
