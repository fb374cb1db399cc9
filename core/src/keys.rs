//! Checks on X25519 keys that the noise state machine does not make.
//!
//! - [`is_low_order`]: a public key whose shared secret with any private key is all zeros
//!   (a point of small order). The whitepaper's handshake (§5.4.2) mixes `DH(S_priv, S_pub)`
//!   into the chaining key; with such a key it is a constant everybody knows, so the kernel
//!   (`wg_noise_precompute_static_static`) and wireguard-go refuse to start a handshake
//!   with it. We refuse the key itself, with an error naming it.
//! - [`clamp`]: a private key as the kernel and wireguard-go store it, and `wg` prints it.

use wiremesh_proto::{PrivateKey, PublicKey};

/// Whether X25519 with `key` as the peer's public value gives the all-zero shared secret
/// for every private key: `key` is, modulo p = 2^255 - 19 and ignoring the top bit (RFC 7748
/// §5 masks it), the u-coordinate of one of the points of order 1, 2, 4 or 8. A clamped
/// private scalar is a multiple of the cofactor 8, so it sends each of them to zero.
pub fn is_low_order(key: &PublicKey) -> bool {
    let mut u = *key.as_bytes();
    u[31] &= 0x7f;
    // Below 2^255, so at most p + 18: subtracting p once reduces it.
    if u[31] == 0x7f && u[1..31].iter().all(|b| *b == 0xff) && u[0] >= 0xed {
        u = [0; 32];
        u[0] = key.as_bytes()[0].wrapping_sub(0xed);
    }
    LOW_ORDER.contains(&u)
}

/// `key` clamped as X25519 uses it (RFC 7748 §5: the low 3 bits and the top bit cleared,
/// bit 254 set). The same key in effect; the form the kernel and wireguard-go keep and
/// `wg show private-key` prints.
pub fn clamp(key: &PrivateKey) -> PrivateKey {
    let mut bytes = *key.as_bytes();
    bytes[0] &= 0xf8;
    bytes[31] &= 0x7f;
    bytes[31] |= 0x40;
    PrivateKey::from(bytes)
}

/// The u-coordinates below p of the points of small order on Curve25519 and its twist (the
/// list in libsodium's `x25519_ref10.c`, reduced): 0 (order 4), 1 (order 1), the two of
/// order 8, and p - 1 (order 2).
const LOW_ORDER: [[u8; 32]; 5] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

#[cfg(test)]
mod tests {
    use boringtun::x25519;
    use proptest::prelude::*;

    use super::*;

    /// Every encoding of each point: canonical, plus p when that stays below 2^255, each
    /// also with the top bit set.
    fn encodings() -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        for point in LOW_ORDER {
            let mut variants = vec![point];
            if let Some(plus_p) = add_p(point) {
                variants.push(plus_p);
            }
            for v in variants {
                out.push(v);
                let mut top = v;
                top[31] |= 0x80;
                out.push(top);
            }
        }
        out
    }

    /// `u + p` if below 2^255.
    fn add_p(u: [u8; 32]) -> Option<[u8; 32]> {
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let s = u16::from(u[i]) + u16::from(p[i]) + carry;
            out[i] = s as u8;
            carry = s >> 8;
        }
        (carry == 0 && out[31] & 0x80 == 0).then_some(out)
    }

    /// The oracle: the shared secret with a (clamped) private key.
    fn shared_is_zero(private: [u8; 32], public: [u8; 32]) -> bool {
        let secret = x25519::StaticSecret::from(private);
        !secret
            .diffie_hellman(&x25519::PublicKey::from(public))
            .was_contributory()
    }

    #[test]
    fn the_known_low_order_points_give_a_zero_shared_secret_and_are_refused() {
        let all = encodings();
        // 5 points, 0 and 1 also as u + p, each with and without the top bit.
        assert_eq!(all.len(), 14);
        for point in all {
            assert!(shared_is_zero([7; 32], point), "{point:02x?}");
            assert!(shared_is_zero([200; 32], point), "{point:02x?}");
            assert!(is_low_order(&PublicKey::from(point)), "{point:02x?}");
        }
    }

    #[test]
    fn ordinary_keys_pass() {
        for seed in 1..=50u8 {
            let public = x25519::PublicKey::from(&x25519::StaticSecret::from([seed; 32]));
            assert!(!is_low_order(&PublicKey::from(*public.as_bytes())));
        }
        let mut two = [0u8; 32];
        two[0] = 2;
        assert!(!is_low_order(&PublicKey::from(two)));
    }

    #[test]
    fn clamping_is_what_x25519_does_and_idempotent() {
        let key = PrivateKey::from([0xff; 32]);
        let clamped = clamp(&key);
        assert_eq!(clamped.as_bytes()[0], 0xf8);
        assert_eq!(clamped.as_bytes()[31], 0x7f);
        assert_eq!(clamp(&clamped), clamped);
        let public = |k: &PrivateKey| {
            *x25519::PublicKey::from(&x25519::StaticSecret::from(*k.as_bytes())).as_bytes()
        };
        assert_eq!(public(&key), public(&clamped));
    }

    proptest! {
        #[test]
        fn low_order_is_exactly_a_zero_shared_secret(
            public in any::<[u8; 32]>(),
            private in any::<[u8; 32]>(),
            pick in 0usize..14,
            use_known in any::<bool>(),
        ) {
            let public = if use_known { encodings()[pick] } else { public };
            prop_assert_eq!(
                is_low_order(&PublicKey::from(public)),
                shared_is_zero(private, public)
            );
        }
    }
}
