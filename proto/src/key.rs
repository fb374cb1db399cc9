//! WireGuard keys: 32 bytes, written as base64 (config files, `wg`) or hex (UAPI).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a key did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not valid base64, or not 32 bytes once decoded.
    #[error("not a WireGuard key: expected 44 characters of base64 encoding 32 bytes")]
    Base64,
    /// Not 64 hex digits.
    #[error("not a WireGuard key: expected 64 hexadecimal digits")]
    Hex,
}

/// 32 raw key bytes with the two text encodings WireGuard uses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Parse the base64 form used by config files and `wg`.
    ///
    /// # Errors
    /// [`KeyError::Base64`] when the text is not 32 bytes of base64.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        if text.len() != 44 {
            return Err(KeyError::Base64);
        }
        let bytes = STANDARD.decode(text).map_err(|_| KeyError::Base64)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Base64)?;
        Ok(Self(bytes))
    }

    /// Parse the lower-case hex form used by the UAPI.
    ///
    /// # Errors
    /// [`KeyError::Hex`] when the text is not 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return Err(KeyError::Hex);
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or(KeyError::Hex)?;
            let lo = hex_digit(pair[1]).ok_or(KeyError::Hex)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The lower-case hex form.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 0x0f)] as char);
        }
        out
    }

    /// True for the all-zero key, which the UAPI uses to mean "none".
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

impl fmt::Debug for Key {
    /// Redacted: a bare `Key` may hold secret material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

macro_rules! key_newtype {
    ($(#[$doc:meta])* $name:ident, redacted = $redacted:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub Key);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &(self.0).0
            }
            /// Parse the lower-case hex form used by the UAPI.
            ///
            /// # Errors
            /// [`KeyError::Hex`] when the text is not 64 hex digits.
            pub fn from_hex(text: &str) -> Result<Self, KeyError> {
                Key::from_hex(text).map(Self)
            }
            /// The hex form used by the UAPI.
            pub fn to_hex(&self) -> String {
                self.0.to_hex()
            }
            /// The base64 form used by config files.
            pub fn to_base64(&self) -> String {
                self.0.to_base64()
            }
        }

        impl From<[u8; 32]> for $name {
            fn from(bytes: [u8; 32]) -> Self {
                Self(Key(bytes))
            }
        }

        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(text: &str) -> Result<Self, KeyError> {
                Key::from_base64(text.trim()).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if $redacted {
                    write!(f, concat!(stringify!($name), "(<redacted>)"))
                } else {
                    write!(f, concat!(stringify!($name), "({})"), self.0.to_base64())
                }
            }
        }
    };
}

key_newtype!(
    /// A peer's or our own public key. Shown in full in logs and status.
    PublicKey,
    redacted = false
);
key_newtype!(
    /// A Curve25519 private key. Its `Debug` is redacted and it has no `Display`:
    /// it must never reach a log line.
    PrivateKey,
    redacted = true
);
key_newtype!(
    /// An optional symmetric key mixed into the handshake. Redacted like [`PrivateKey`].
    PresharedKey,
    redacted = true
);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_base64())
    }
}

impl PublicKey {
    /// The first characters of the base64 form, for log spans.
    pub fn short(&self) -> String {
        let mut s = self.0.to_base64();
        s.truncate(8);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let k = Key([7u8; 32]);
        assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
    }

    #[test]
    fn short_or_bad_keys_are_refused() {
        assert_eq!(Key::from_base64("abc"), Err(KeyError::Base64));
        assert_eq!(Key::from_hex(&"z".repeat(64)), Err(KeyError::Hex));
        assert_eq!(Key::from_hex("00"), Err(KeyError::Hex));
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let k = PrivateKey::from([1u8; 32]);
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
