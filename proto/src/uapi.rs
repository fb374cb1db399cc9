//! WireGuard's cross-platform userspace configuration protocol ("UAPI"), the text `wg(8)`
//! speaks over `/var/run/wireguard/<interface>.sock` to wireguard-go and boringtun.
//!
//! From <https://www.wireguard.com/xplatform/#configuration-protocol>: "A WireGuard
//! implementation must respond to two commands: `get` and `set`, both at version 1".
//!
//! ```text
//! get=1                     set=1
//! {empty line}              private_key=<64 hex digits>
//!                           listen_port=51820
//!                           replace_peers=true
//!                           public_key=<64 hex digits>
//!                           endpoint=198.18.0.2:51820
//!                           allowed_ip=10.1.0.0/24
//!                           {empty line}
//! ```
//!
//! Both are answered with `errno=N` and an empty line, a `get` with the device's
//! `key=value` lines before it. This module is the pure half: [`parse_request`] turns the
//! text of one request into a [`Request`] and [`GetResponse`] writes the answer to a `get`.
//! Reading the socket and applying a [`DeviceUpdate`] happen elsewhere.
//!
//! The rules follow wireguard-go's `device/uapi.go`: device keys come first, each
//! `public_key` starts a new peer, a line without `=`, an unknown key or a bad value
//! refuses the whole request, and an all-zero private or preshared key means "remove it".

use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::cidr::IpCidr;
use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// One request read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: answer with the device's configuration and statistics ([`GetResponse`]).
    Get,
    /// `set=1`: change the device as described, then answer `errno=0`.
    Set(DeviceUpdate),
}

/// The changes one `set=1` request asks for; a field that is `None` (or `false`) leaves
/// the device as it is.
///
/// When a device key is given twice, the later value is kept, as wireguard-go applies
/// them in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// `private_key`: `Some(None)` = private_key=<zeros> (remove key), `Some(Some(k))` = set.
    pub private_key: Option<Option<PrivateKey>>,
    /// `listen_port`: the UDP port to listen on; 0 lets the system pick one.
    pub listen_port: Option<u16>,
    /// `fwmark` for the underlay socket. `Some(0)` means remove the mark.
    pub fwmark: Option<u32>,
    /// `replace_peers=true`: remove every existing peer before applying [`Self::peers`]
    /// ("the subsequent peers (perhaps an empty list) should replace any existing peers").
    pub replace_peers: bool,
    /// One entry per `public_key=` line, in request order.
    ///
    /// The UAPI document says a public key may not repeat within one request, but
    /// wireguard-go accepts it and merges the later lines into the same peer. Here a
    /// repeated key yields a second [`PeerUpdate`]; applying the entries in order gives
    /// wireguard-go's result.
    pub peers: Vec<PeerUpdate>,
    /// Not part of the UAPI text protocol (the agent's key rotation sets it): a key the
    /// device keeps beside [`Self::private_key`] for a while, answering handshakes
    /// addressed to it. When it is the device's current key and `private_key` changes it,
    /// this is a rotation: the sessions made with it keep carrying traffic until each
    /// peer has a session with the new key.
    pub previous_key: Option<PreviousKey>,
}

/// A static key kept after a rotation ([`DeviceUpdate::previous_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousKey {
    /// The key rotated out.
    pub key: PrivateKey,
    /// The longest it is kept: it goes earlier once every peer that had a session has
    /// completed a handshake with the new key.
    pub grace: std::time::Duration,
}

/// The changes asked for one peer, from its `public_key=` line to the next one.
///
/// When a key is given twice within one peer, the later value is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    /// `public_key`: the peer this entry is about; it is created unless
    /// [`Self::update_only`] or [`Self::remove`] is set. wireguard-go silently ignores a
    /// peer whose key is the device's own public key; the applier should do the same.
    pub public_key: PublicKey,
    /// `remove=true`: remove the peer. The other fields are still parsed (and must be
    /// valid) but carry no meaning: the peer is removed wherever the line appears.
    pub remove: bool,
    /// `update_only=true`: change the peer only if it already exists; never create it.
    pub update_only: bool,
    /// `preshared_key`: `Some(None)` = all-zero key (remove), `Some(Some(k))` = set.
    pub preshared_key: Option<Option<PresharedKey>>,
    /// `endpoint`: `1.2.3.4:51820` or `[fd00::1]:51820`.
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval` in seconds; `Some(0)` = off.
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true`: drop the peer's existing allowed IPs before adding
    /// [`Self::allowed_ips`]. As in wireguard-go, `allowed_ip` lines that came before it
    /// within the same peer are dropped too, so they do not appear in
    /// [`Self::allowed_ips`].
    pub replace_allowed_ips: bool,
    /// `allowed_ip` lines, in order, host bits cleared. The UAPI document: "If an
    /// identical value already exists as part of a prior peer, the allowed IP entry will
    /// be removed from that peer and added to this peer."
    pub allowed_ips: Vec<IpCidr>,
    /// Not part of the UAPI text protocol (the agent's control loop sets it): when `Some`,
    /// replaces the prefixes accepted as sources from the peer without being routed to
    /// it. Failover groups use it: every gateway of a cluster may send from the cluster's
    /// pod CIDRs, while only the active one is routed to.
    pub accept_ips: Option<Vec<IpCidr>>,
    /// Not part of the UAPI text protocol: when `Some`, every endpoint the peer publishes,
    /// most preferred first. A handshake that goes unanswered moves on to the next. The
    /// endpoint in use is not changed (set [`Self::endpoint`] for that), except that a
    /// peer with none starts at the first.
    pub endpoints: Option<Vec<SocketAddr>>,
    /// Not part of the UAPI text protocol: the key this peer had until now (it rotated
    /// its key). The peer keeps its slot, allowed IPs and counters; its sessions under
    /// the old key keep carrying traffic until a session with the new key exists.
    /// Ignored unless a peer with that key exists and none with [`Self::public_key`].
    pub replaces: Option<PublicKey>,
}

impl DeviceUpdate {
    /// A whole configuration: `private_key`, `listen_port` and exactly `peers`, replacing
    /// any there were (`fwmark` unchanged).
    pub fn replace_all(private_key: PrivateKey, listen_port: u16, peers: Vec<PeerUpdate>) -> Self {
        Self {
            private_key: Some(Some(private_key)),
            listen_port: Some(listen_port),
            fwmark: None,
            replace_peers: true,
            peers,
            previous_key: None,
        }
    }
}

impl PeerUpdate {
    /// An entry for `public_key` that changes nothing yet.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
            accept_ips: None,
            endpoints: None,
            replaces: None,
        }
    }
}

/// Why a request was refused. Each variant names the 1-based line (line 1 is `get=1` or
/// `set=1`) and what is wrong with it. Secret values (`private_key`, `preshared_key`)
/// never appear in the error, and other text is cut to a few dozen characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// The first line is neither `get=1` nor `set=1`.
    #[error("line {line}: expected `get=1` or `set=1`, found {text:?}")]
    UnknownOperation {
        /// 1-based line number (always 1).
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A `get=1` request has more lines; it must be followed by the empty line alone.
    #[error("line {line}: a get request has no lines after `get=1`, found {text:?}")]
    TrailingGetLine {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// An empty line inside the request text. An empty line ends a request, so the caller
    /// must pass the text before it.
    #[error("line {line}: empty line inside a request (an empty line ends a request)")]
    EmptyLine {
        /// 1-based line number.
        line: usize,
    },
    /// A line without `=`.
    #[error("line {line}: expected `key=value`, found {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A key `set` does not have, including the read-only keys of a `get` response.
    #[error("line {line}: unknown key {key:?}")]
    UnknownKey {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// A peer key before the first `public_key` line.
    #[error("line {line}: {key} is a peer key but comes before any public_key line")]
    PeerKeyBeforePeer {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: &'static str,
    },
    /// A device key after the first `public_key` line.
    #[error("line {line}: {key} is a device key but comes after a public_key line")]
    DeviceKeyAfterPeer {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: &'static str,
    },
    /// A known key whose value does not parse.
    #[error("line {line}: {key}={value:?}: {reason}")]
    InvalidValue {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: &'static str,
        /// The offending value, redacted for secret keys.
        value: String,
        /// What the value should look like.
        reason: String,
    },
    /// `protocol_version` other than 1, the only version there is.
    #[error("line {line}: protocol_version={value:?}: only protocol version 1 is supported")]
    ProtocolVersion {
        /// 1-based line number.
        line: usize,
        /// The offending value.
        value: String,
    },
}

impl UapiError {
    /// The positive errno to answer with (`errno=N`): `EPROTO` when the text is not the
    /// protocol at all (not a request, a line without `=`, an empty line inside, a
    /// protocol version other than 1), `EINVAL` for an unknown or misplaced key or a bad
    /// value.
    ///
    /// The UAPI document: "If an error occurs, errno is the corresponding integer from
    /// errno.h". wireguard-go writes them negated; `wg(8)` accepts either sign.
    pub fn errno(&self) -> i32 {
        match self {
            Self::UnknownOperation { .. }
            | Self::EmptyLine { .. }
            | Self::Syntax { .. }
            | Self::ProtocolVersion { .. } => EPROTO,
            Self::TrailingGetLine { .. }
            | Self::UnknownKey { .. }
            | Self::PeerKeyBeforePeer { .. }
            | Self::DeviceKeyAfterPeer { .. }
            | Self::InvalidValue { .. } => EINVAL,
        }
    }

    /// The 1-based line the error is about.
    pub fn line(&self) -> usize {
        match self {
            Self::UnknownOperation { line, .. }
            | Self::TrailingGetLine { line, .. }
            | Self::EmptyLine { line }
            | Self::Syntax { line, .. }
            | Self::UnknownKey { line, .. }
            | Self::PeerKeyBeforePeer { line, .. }
            | Self::DeviceKeyAfterPeer { line, .. }
            | Self::InvalidValue { line, .. }
            | Self::ProtocolVersion { line, .. } => *line,
        }
    }
}

/// Parse one complete request (the text up to and excluding the blank line that ends it).
///
/// Lines are separated by `\n`; one trailing `\n` is allowed. Nothing is half-parsed: the
/// first bad line refuses the whole request.
///
/// # Errors
/// A [`UapiError`] naming the first offending line.
pub fn parse_request(text: &str) -> Result<Request, UapiError> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = body
        .split('\n')
        .zip(1usize..)
        .map(|(text, line)| (line, text));
    let Some((line, first)) = lines.next() else {
        return Err(UapiError::UnknownOperation {
            line: 1,
            text: String::new(),
        });
    };
    match first {
        "get=1" => match lines.next() {
            None => Ok(Request::Get),
            Some((line, "")) => Err(UapiError::EmptyLine { line }),
            Some((line, text)) => Err(UapiError::TrailingGetLine {
                line,
                text: excerpt(text),
            }),
        },
        "set=1" => parse_set(lines).map(Request::Set),
        _ => Err(UapiError::UnknownOperation {
            line,
            text: excerpt(first),
        }),
    }
}

/// Writer for a get response: helpers that format lines exactly as wireguard-go does.
///
/// wireguard-go writes, leaving out a zero private key, port or mark:
/// `private_key`, `listen_port`, `fwmark`, then for each peer `public_key`,
/// `preshared_key` (zeros when none), `protocol_version`, `endpoint` (when known),
/// `last_handshake_time_sec`, `last_handshake_time_nsec`, `tx_bytes`, `rx_bytes`,
/// `persistent_keepalive_interval` and one `allowed_ip` per prefix. Each method appends
/// its line(s) in call order; [`GetResponse::finish`] adds the `errno` line and the empty
/// line that ends the answer.
///
/// Its `Debug` is redacted: the text holds the private key.
#[derive(Clone, Default)]
pub struct GetResponse {
    text: String,
}

impl GetResponse {
    /// An empty response.
    pub fn new() -> Self {
        Self::default()
    }

    /// `private_key=<hex>`.
    pub fn private_key(&mut self, key: &PrivateKey) -> &mut Self {
        self.line("private_key", key.to_hex())
    }

    /// `listen_port=<port>`.
    pub fn listen_port(&mut self, port: u16) -> &mut Self {
        self.line("listen_port", port)
    }

    /// `fwmark=<mark>`.
    pub fn fwmark(&mut self, mark: u32) -> &mut Self {
        self.line("fwmark", mark)
    }

    /// `public_key=<hex>`: the lines after it are about this peer.
    pub fn peer(&mut self, key: &PublicKey) -> &mut Self {
        self.line("public_key", key.to_hex())
    }

    /// `preshared_key=<hex>` (wireguard-go writes zeros when the peer has none).
    pub fn preshared_key(&mut self, key: &PresharedKey) -> &mut Self {
        self.line("preshared_key", key.to_hex())
    }

    /// `endpoint=1.2.3.4:51820` or `endpoint=[fd00::1]:51820`.
    pub fn endpoint(&mut self, endpoint: SocketAddr) -> &mut Self {
        self.line("endpoint", endpoint)
    }

    /// `persistent_keepalive_interval=<seconds>` (0 = off).
    pub fn persistent_keepalive_interval(&mut self, seconds: u16) -> &mut Self {
        self.line("persistent_keepalive_interval", seconds)
    }

    /// `allowed_ip=10.1.0.0/24`.
    pub fn allowed_ip(&mut self, cidr: &IpCidr) -> &mut Self {
        self.line("allowed_ip", cidr)
    }

    /// `last_handshake_time_sec` and `last_handshake_time_nsec`: the time since the Unix
    /// epoch of the last completed handshake, both 0 when there was none.
    pub fn last_handshake(&mut self, sec: u64, nsec: u32) -> &mut Self {
        self.line("last_handshake_time_sec", sec)
            .line("last_handshake_time_nsec", nsec)
    }

    /// `rx_bytes=<n>`: bytes received from the peer.
    pub fn rx_bytes(&mut self, bytes: u64) -> &mut Self {
        self.line("rx_bytes", bytes)
    }

    /// `tx_bytes=<n>`: bytes sent to the peer.
    pub fn tx_bytes(&mut self, bytes: u64) -> &mut Self {
        self.line("tx_bytes", bytes)
    }

    /// `protocol_version=<n>` (wireguard-go always writes 1).
    pub fn protocol_version(&mut self, version: u32) -> &mut Self {
        self.line("protocol_version", version)
    }

    /// The whole answer: the lines so far, then `errno=<errno>` and the empty line.
    /// For a failed `get`, call it on an empty response.
    #[must_use]
    pub fn finish(self, errno: i32) -> String {
        let mut text = self.text;
        // Writing to a String cannot fail.
        let _ = write!(text, "errno={errno}\n\n");
        text
    }

    fn line(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "{key}={value}");
        self
    }
}

impl fmt::Debug for GetResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetResponse")
            .field(
                "text",
                &format_args!("<{} bytes, redacted>", self.text.len()),
            )
            .finish()
    }
}

/// `EINVAL`, "Invalid argument": 22 on Linux, macOS and the BSDs.
const EINVAL: i32 = 22;
/// `EPROTO`, "Protocol error": 71 on Linux (the only platform Wiremesh runs on; macOS uses
/// 100, FreeBSD 92).
const EPROTO: i32 = 71;

/// At most this many characters of offending text go into an error.
const EXCERPT_CHARS: usize = 48;

/// Device keys, in the order of the UAPI document.
const DEVICE_KEYS: &[&str] = &["private_key", "listen_port", "fwmark", "replace_peers"];

/// Peer keys other than `public_key`, in the order of the UAPI document.
const PEER_KEYS: &[&str] = &[
    "remove",
    "update_only",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
];

fn parse_set<'a>(lines: impl Iterator<Item = (usize, &'a str)>) -> Result<DeviceUpdate, UapiError> {
    let mut update = DeviceUpdate::default();
    let mut peer: Option<PeerUpdate> = None;
    for (line, text) in lines {
        if text.is_empty() {
            return Err(UapiError::EmptyLine { line });
        }
        let Some((key, value)) = text.split_once('=') else {
            return Err(UapiError::Syntax {
                line,
                text: excerpt(text),
            });
        };
        // "public_key: ... a new peer entry, which this command adds"; every key after
        // it is about that peer.
        if key == "public_key" {
            let public_key = PublicKey::from_hex(value)
                .map_err(|_| invalid(line, "public_key", value, HEX_KEY))?;
            if let Some(done) = peer.replace(PeerUpdate::new(public_key)) {
                update.peers.push(done);
            }
            continue;
        }
        match peer.as_mut() {
            None => device_line(&mut update, line, key, value)?,
            Some(peer) => peer_line(peer, line, key, value)?,
        }
    }
    update.peers.extend(peer);
    Ok(update)
}

const HEX_KEY: &str = "expected 64 hexadecimal digits";
const TRUE_ONLY: &str = "the only valid value is `true`";

fn device_line(
    update: &mut DeviceUpdate,
    line: usize,
    key: &str,
    value: &str,
) -> Result<(), UapiError> {
    match key {
        // "The value may be an all zero string ..., in which case it indicates that the
        // private key should be removed."
        "private_key" => {
            let k = PrivateKey::from_hex(value)
                .map_err(|_| invalid(line, "private_key", value, HEX_KEY))?;
            update.private_key = Some((!k.0.is_zero()).then_some(k));
        }
        "listen_port" => {
            update.listen_port = Some(
                decimal(value)
                    .ok_or_else(|| invalid(line, "listen_port", value, "expected 0 to 65535"))?,
            );
        }
        // "The value may 0 ..., in which case it indicates that the fwmark should be
        // removed."
        "fwmark" => {
            update.fwmark = Some(decimal(value).ok_or_else(|| {
                invalid(
                    line,
                    "fwmark",
                    value,
                    "expected a number from 0 to 4294967295",
                )
            })?);
        }
        "replace_peers" => update.replace_peers = flag(line, "replace_peers", value)?,
        _ => {
            return Err(match PEER_KEYS.iter().find(|k| **k == key) {
                Some(k) => UapiError::PeerKeyBeforePeer { line, key: k },
                None => UapiError::UnknownKey {
                    line,
                    key: excerpt(key),
                },
            });
        }
    }
    Ok(())
}

fn peer_line(peer: &mut PeerUpdate, line: usize, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "remove" => peer.remove = flag(line, "remove", value)?,
        "update_only" => peer.update_only = flag(line, "update_only", value)?,
        "preshared_key" => {
            let k = PresharedKey::from_hex(value)
                .map_err(|_| invalid(line, "preshared_key", value, HEX_KEY))?;
            peer.preshared_key = Some((!k.0.is_zero()).then_some(k));
        }
        // "either IP:port for IPv4 or [IP]:port for IPv6"
        "endpoint" => {
            let endpoint = value.parse().map_err(|_| {
                invalid(
                    line,
                    "endpoint",
                    value,
                    "expected IPv4:port or [IPv6]:port, such as 198.18.0.2:51820 or [fd00::2]:51820",
                )
            })?;
            peer.endpoint = Some(endpoint);
        }
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = Some(decimal(value).ok_or_else(|| {
                invalid(
                    line,
                    "persistent_keepalive_interval",
                    value,
                    "expected seconds from 0 (off) to 65535",
                )
            })?);
        }
        "replace_allowed_ips" => {
            peer.replace_allowed_ips = flag(line, "replace_allowed_ips", value)?;
            peer.allowed_ips.clear();
        }
        "allowed_ip" => {
            let cidr =
                allowed_ip(value).map_err(|reason| invalid(line, "allowed_ip", value, &reason))?;
            peer.allowed_ips.push(cidr);
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::ProtocolVersion {
                    line,
                    value: excerpt(value),
                });
            }
        }
        _ => {
            return Err(match DEVICE_KEYS.iter().find(|k| **k == key) {
                Some(k) => UapiError::DeviceKeyAfterPeer { line, key: k },
                None => UapiError::UnknownKey {
                    line,
                    key: excerpt(key),
                },
            });
        }
    }
    Ok(())
}

/// `true`, the only value `replace_peers`, `remove`, `update_only` and
/// `replace_allowed_ips` take.
fn flag(line: usize, key: &'static str, value: &str) -> Result<bool, UapiError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(invalid(line, key, value, TRUE_ONLY))
    }
}

/// A decimal-string integer as Go's `strconv.ParseUint(value, 10, bits)` reads it: ASCII
/// digits only (no sign, no spaces), leading zeros allowed.
fn decimal<T: TryFrom<u64>>(value: &str) -> Option<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u64>().ok().and_then(|n| T::try_from(n).ok())
}

/// `IP/cidr` as Go's `netip.ParsePrefix` reads it: the length is required, decimal, and
/// without a leading zero or spaces.
fn allowed_ip(value: &str) -> Result<IpCidr, String> {
    let Some((_, len)) = value.split_once('/') else {
        return Err("expected address/prefix-length, such as 10.1.0.0/24".to_owned());
    };
    let len_ok = !len.is_empty()
        && len.bytes().all(|b| b.is_ascii_digit())
        && (len.len() == 1 || !len.starts_with('0'));
    if !len_ok || value.trim() != value {
        return Err("expected address/prefix-length, such as 10.1.0.0/24".to_owned());
    }
    value.parse().map_err(|e| format!("{e}"))
}

fn invalid(line: usize, key: &'static str, value: &str, reason: &str) -> UapiError {
    let value = if matches!(key, "private_key" | "preshared_key") {
        format!("<{} characters, redacted>", value.chars().count())
    } else {
        excerpt(value)
    };
    UapiError::InvalidValue {
        line,
        key,
        value,
        reason: reason.to_owned(),
    }
}

/// The start of `text`, cut so an error message stays short whatever was sent.
fn excerpt(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    const A: [u8; 32] = [0xa1; 32];
    const B: [u8; 32] = [0xb2; 32];
    const PRIV: [u8; 32] = [0x11; 32];
    const PSK: [u8; 32] = [0x3c; 32];

    #[test]
    fn setconf_request_with_two_peers() {
        let text = format!(
            "set=1\n\
             private_key={priv_}\n\
             listen_port=51820\n\
             fwmark=0\n\
             replace_peers=true\n\
             public_key={a}\n\
             preshared_key={psk}\n\
             protocol_version=1\n\
             endpoint=198.18.0.2:51820\n\
             persistent_keepalive_interval=25\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.1.0.0/24\n\
             allowed_ip=fd00:1::/64\n\
             public_key={b}\n\
             endpoint=[fd00::2]:51821\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.2.3.4/16\n",
            priv_ = hex(PRIV),
            a = hex(A),
            psk = hex(PSK),
            b = hex(B).to_uppercase(),
        );
        let mut first = PeerUpdate::new(PublicKey::from(A));
        first.preshared_key = Some(Some(PresharedKey::from(PSK)));
        first.endpoint = Some("198.18.0.2:51820".parse().unwrap());
        first.persistent_keepalive = Some(25);
        first.replace_allowed_ips = true;
        first.allowed_ips = vec![cidr("10.1.0.0/24"), cidr("fd00:1::/64")];
        let mut second = PeerUpdate::new(PublicKey::from(B));
        second.endpoint = Some("[fd00::2]:51821".parse().unwrap());
        second.replace_allowed_ips = true;
        second.allowed_ips = vec![cidr("10.2.0.0/16")];
        let expected = DeviceUpdate {
            private_key: Some(Some(PrivateKey::from(PRIV))),
            listen_port: Some(51820),
            fwmark: Some(0),
            replace_peers: true,
            peers: vec![first, second],
            previous_key: None,
        };
        assert_eq!(parse_request(&text), Ok(Request::Set(expected)));
    }

    #[test]
    fn get_is_one_line() {
        assert_eq!(parse_request("get=1\n"), Ok(Request::Get));
        assert_eq!(parse_request("get=1"), Ok(Request::Get));
    }

    #[test]
    fn empty_set_changes_nothing() {
        assert_eq!(
            parse_request("set=1\n"),
            Ok(Request::Set(DeviceUpdate::default()))
        );
    }

    #[test]
    fn remove_peer() {
        let text = format!("set=1\npublic_key={}\nremove=true\n", hex(A));
        let mut peer = PeerUpdate::new(PublicKey::from(A));
        peer.remove = true;
        assert_eq!(parse_set_ok(&text).peers, vec![peer]);
    }

    #[test]
    fn zero_keys_mean_remove() {
        let text = format!(
            "set=1\nprivate_key={z}\npublic_key={a}\npreshared_key={z}\n",
            z = hex([0; 32]),
            a = hex(A)
        );
        let update = parse_set_ok(&text);
        assert_eq!(update.private_key, Some(None));
        assert_eq!(update.peers[0].preshared_key, Some(None));
    }

    #[test]
    fn replace_allowed_ips_drops_earlier_lines_of_the_same_peer() {
        let text = format!(
            "set=1\npublic_key={}\nallowed_ip=10.0.0.0/8\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/16\n",
            hex(A)
        );
        let peer = &parse_set_ok(&text).peers[0];
        assert!(peer.replace_allowed_ips);
        assert_eq!(peer.allowed_ips, vec![cidr("10.1.0.0/16")]);
    }

    #[test]
    fn repeated_peer_gives_entries_in_order() {
        let text = format!(
            "set=1\npublic_key={a}\nupdate_only=true\npublic_key={b}\npublic_key={a}\nremove=true\n",
            a = hex(A),
            b = hex(B)
        );
        let peers = parse_set_ok(&text).peers;
        let flags: Vec<_> = peers
            .iter()
            .map(|p| (p.public_key, p.update_only, p.remove))
            .collect();
        assert_eq!(
            flags,
            vec![
                (PublicKey::from(A), true, false),
                (PublicKey::from(B), false, false),
                (PublicKey::from(A), false, true),
            ]
        );
    }

    #[test]
    fn later_value_wins_within_a_section() {
        let text = format!(
            "set=1\nlisten_port=1\nlisten_port=2\npublic_key={}\nendpoint=1.2.3.4:5\nendpoint=[::1]:6\n",
            hex(A)
        );
        let update = parse_set_ok(&text);
        assert_eq!(update.listen_port, Some(2));
        assert_eq!(update.peers[0].endpoint, Some("[::1]:6".parse().unwrap()));
    }

    #[test]
    fn every_error_names_its_line_and_key() {
        let a = hex(A);
        let cases: Vec<(String, usize, i32, &str)> = vec![
            ("".into(), 1, EPROTO, "get=1"),
            ("bogus=1\n".into(), 1, EPROTO, "bogus"),
            ("get=2".into(), 1, EPROTO, "get=2"),
            ("get=1\nlisten_port=1".into(), 2, EINVAL, "listen_port"),
            ("get=1\n\n".into(), 2, EPROTO, "empty line"),
            ("set=1\nlisten_port".into(), 2, EPROTO, "listen_port"),
            ("set=1\n\nlisten_port=1".into(), 2, EPROTO, "empty line"),
            ("set=1\nlisten_port=65536".into(), 2, EINVAL, "listen_port"),
            ("set=1\nlisten_port=+1".into(), 2, EINVAL, "listen_port"),
            ("set=1\nlisten_port= 1".into(), 2, EINVAL, "listen_port"),
            ("set=1\nfwmark=-1".into(), 2, EINVAL, "fwmark"),
            ("set=1\nfwmark=4294967296".into(), 2, EINVAL, "fwmark"),
            (
                "set=1\nreplace_peers=false".into(),
                2,
                EINVAL,
                "replace_peers",
            ),
            ("set=1\nprivate_key=abc".into(), 2, EINVAL, "private_key"),
            ("set=1\nendpoint=1.2.3.4:5".into(), 2, EINVAL, "endpoint"),
            ("set=1\n=1".into(), 2, EINVAL, "\"\""),
            ("set=1\nmtu=1420".into(), 2, EINVAL, "mtu"),
            ("set=1\npublic_key=xyz".into(), 2, EINVAL, "public_key"),
            (
                format!("set=1\npublic_key={a}\nlisten_port=1"),
                3,
                EINVAL,
                "listen_port",
            ),
            (
                format!("set=1\npublic_key={a}\nprivate_key={a}"),
                3,
                EINVAL,
                "private_key",
            ),
            (
                format!("set=1\npublic_key={a}\nremove=yes"),
                3,
                EINVAL,
                "remove",
            ),
            (
                format!("set=1\npublic_key={a}\nupdate_only=1"),
                3,
                EINVAL,
                "update_only",
            ),
            (
                format!("set=1\npublic_key={a}\npreshared_key={a}0"),
                3,
                EINVAL,
                "preshared_key",
            ),
            (
                format!("set=1\npublic_key={a}\nendpoint=host:51820"),
                3,
                EINVAL,
                "endpoint",
            ),
            (
                format!("set=1\npublic_key={a}\nendpoint=::1:51820"),
                3,
                EINVAL,
                "endpoint",
            ),
            (
                format!("set=1\npublic_key={a}\npersistent_keepalive_interval=65536"),
                3,
                EINVAL,
                "persistent_keepalive_interval",
            ),
            (
                format!("set=1\npublic_key={a}\nreplace_allowed_ips=TRUE"),
                3,
                EINVAL,
                "replace_allowed_ips",
            ),
            (
                format!("set=1\npublic_key={a}\nallowed_ip=10.0.0.1"),
                3,
                EINVAL,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={a}\nallowed_ip=10.0.0.0/33"),
                3,
                EINVAL,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={a}\nallowed_ip=10.0.0.0/08"),
                3,
                EINVAL,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={a}\nallowed_ip= 10.0.0.0/8"),
                3,
                EINVAL,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={a}\nprotocol_version=2"),
                3,
                EPROTO,
                "protocol_version",
            ),
            (
                format!("set=1\npublic_key={a}\nprotocol_version=01"),
                3,
                EPROTO,
                "protocol_version",
            ),
            (
                format!("set=1\npublic_key={a}\nrx_bytes=1"),
                3,
                EINVAL,
                "rx_bytes",
            ),
            (
                format!("set=1\npublic_key={a}\nendpoint=1.2.3.4:5\r"),
                3,
                EINVAL,
                "endpoint",
            ),
        ];
        for (text, line, errno, key) in cases {
            let err = parse_request(&text).expect_err(&text);
            let message = err.to_string();
            assert_eq!(err.line(), line, "{text:?}: {message}");
            assert_eq!(err.errno(), errno, "{text:?}: {message}");
            assert!(
                message.starts_with(&format!("line {line}: ")),
                "{text:?}: {message}"
            );
            assert!(message.contains(key), "{text:?}: {message} lacks {key}");
        }
    }

    #[test]
    fn errno_values_are_linux_ones() {
        assert_eq!(EINVAL, 22);
        assert_eq!(EPROTO, 71);
        let bad_value = parse_request("set=1\nlisten_port=x").unwrap_err();
        assert_eq!(bad_value.errno(), 22);
        let bad_version =
            parse_request(&format!("set=1\npublic_key={}\nprotocol_version=3", hex(A)))
                .unwrap_err();
        assert_eq!(bad_version.errno(), 71);
    }

    #[test]
    fn secret_values_stay_out_of_errors() {
        let almost = &hex(PRIV)[..63];
        for key in ["private_key", "preshared_key"] {
            let text = format!("set=1\npublic_key={}\n{key}={almost}", hex(A));
            let text = if key == "private_key" {
                format!("set=1\n{key}={almost}")
            } else {
                text
            };
            let err = parse_request(&text).unwrap_err();
            assert!(!err.to_string().contains(almost), "{err}");
            assert!(!format!("{err:?}").contains(almost), "{err:?}");
            assert!(err.to_string().contains("63 characters, redacted"), "{err}");
        }
    }

    #[test]
    fn long_input_is_cut_in_errors() {
        let err = parse_request(&format!("set=1\n{}", "é".repeat(10_000))).unwrap_err();
        assert!(err.to_string().chars().count() < 120, "{err}");
    }

    #[test]
    fn get_response_matches_wireguard_go() {
        let mut response = GetResponse::new();
        response
            .private_key(&PrivateKey::from(PRIV))
            .listen_port(51820)
            .fwmark(0x1234)
            .peer(&PublicKey::from(A))
            .preshared_key(&PresharedKey::from([0; 32]))
            .protocol_version(1)
            .endpoint("[fd00::2]:51820".parse().unwrap())
            .last_handshake(1_700_000_000, 123_456_789)
            .tx_bytes(1_024)
            .rx_bytes(2_048)
            .persistent_keepalive_interval(25)
            .allowed_ip(&cidr("10.1.0.0/24"))
            .allowed_ip(&cidr("fd00:1::/64"))
            .peer(&PublicKey::from(B))
            .preshared_key(&PresharedKey::from(PSK))
            .protocol_version(1)
            .endpoint("198.18.0.3:51820".parse().unwrap())
            .last_handshake(0, 0)
            .tx_bytes(0)
            .rx_bytes(0)
            .persistent_keepalive_interval(0);
        let expected = format!(
            "private_key={priv_}\n\
             listen_port=51820\n\
             fwmark=4660\n\
             public_key={a}\n\
             preshared_key={zero}\n\
             protocol_version=1\n\
             endpoint=[fd00::2]:51820\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=123456789\n\
             tx_bytes=1024\n\
             rx_bytes=2048\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.1.0.0/24\n\
             allowed_ip=fd00:1::/64\n\
             public_key={b}\n\
             preshared_key={psk}\n\
             protocol_version=1\n\
             endpoint=198.18.0.3:51820\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             errno=0\n\
             \n",
            priv_ = "1111111111111111111111111111111111111111111111111111111111111111",
            a = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1",
            zero = "0000000000000000000000000000000000000000000000000000000000000000",
            b = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2",
            psk = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c",
        );
        assert!(!format!("{response:?}").contains(&hex(PRIV)));
        assert_eq!(response.finish(0), expected);
    }

    #[test]
    fn failed_get_is_errno_alone() {
        assert_eq!(GetResponse::new().finish(EINVAL), "errno=22\n\n");
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let _ = parse_request(&text);
        }

        #[test]
        fn near_miss_requests_never_panic(text in near_miss_request()) {
            let _ = parse_request(&text);
        }

        #[test]
        fn rendered_update_parses_back(update in device_update()) {
            let text = render(&update);
            prop_assert_eq!(parse_request(&text), Ok(Request::Set(update)));
        }
    }

    fn parse_set_ok(text: &str) -> DeviceUpdate {
        match parse_request(text) {
            Ok(Request::Set(update)) => update,
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    fn hex(bytes: [u8; 32]) -> String {
        crate::key::Key(bytes).to_hex()
    }

    fn cidr(text: &str) -> IpCidr {
        text.parse().unwrap()
    }

    /// The set text for `update`, as `wg setconf` would write it.
    fn render(update: &DeviceUpdate) -> String {
        let zero = hex([0; 32]);
        let mut out = String::from("set=1\n");
        let mut line = |key: &str, value: &dyn fmt::Display| {
            out.push_str(&format!("{key}={value}\n"));
        };
        match &update.private_key {
            Some(Some(k)) => line("private_key", &k.to_hex()),
            Some(None) => line("private_key", &zero),
            None => {}
        }
        if let Some(port) = update.listen_port {
            line("listen_port", &port);
        }
        if let Some(mark) = update.fwmark {
            line("fwmark", &mark);
        }
        if update.replace_peers {
            line("replace_peers", &"true");
        }
        for peer in &update.peers {
            line("public_key", &peer.public_key.to_hex());
            if peer.remove {
                line("remove", &"true");
            }
            if peer.update_only {
                line("update_only", &"true");
            }
            match &peer.preshared_key {
                Some(Some(k)) => line("preshared_key", &k.to_hex()),
                Some(None) => line("preshared_key", &zero),
                None => {}
            }
            if let Some(endpoint) = peer.endpoint {
                line("endpoint", &endpoint);
            }
            if let Some(seconds) = peer.persistent_keepalive {
                line("persistent_keepalive_interval", &seconds);
            }
            line("protocol_version", &1);
            if peer.replace_allowed_ips {
                line("replace_allowed_ips", &"true");
            }
            for cidr in &peer.allowed_ips {
                line("allowed_ip", cidr);
            }
        }
        out
    }

    fn nonzero_key() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>().prop_filter("the zero key means none", |k| *k != [0; 32])
    }

    fn arb_cidr() -> impl Strategy<Value = IpCidr> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, len)| IpCidr::new(IpAddr::from(a), len)),
            (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, len)| IpCidr::new(IpAddr::from(a), len)),
        ]
        .prop_map(|c| c.unwrap())
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::from((Ipv6Addr::from(a), p))),
        ]
    }

    fn peer_update() -> impl Strategy<Value = PeerUpdate> {
        (
            any::<[u8; 32]>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(proptest::option::of(nonzero_key())),
            proptest::option::of(arb_endpoint()),
            proptest::option::of(any::<u16>()),
            any::<bool>(),
            proptest::collection::vec(arb_cidr(), 0..4),
        )
            .prop_map(
                |(key, remove, update_only, psk, endpoint, keepalive, replace, ips)| PeerUpdate {
                    public_key: PublicKey::from(key),
                    remove,
                    update_only,
                    preshared_key: psk.map(|k| k.map(PresharedKey::from)),
                    endpoint,
                    persistent_keepalive: keepalive,
                    replace_allowed_ips: replace,
                    allowed_ips: ips,
                    accept_ips: None,
                    endpoints: None,
                    replaces: None,
                },
            )
    }

    fn device_update() -> impl Strategy<Value = DeviceUpdate> {
        (
            proptest::option::of(proptest::option::of(nonzero_key())),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            proptest::collection::vec(peer_update(), 0..4),
        )
            .prop_map(
                |(key, listen_port, fwmark, replace_peers, peers)| DeviceUpdate {
                    private_key: key.map(|k| k.map(PrivateKey::from)),
                    listen_port,
                    fwmark,
                    replace_peers,
                    peers,
                    previous_key: None,
                },
            )
    }

    /// Requests made of real keys with plausible and broken values, to get past the first
    /// line and exercise every branch.
    fn near_miss_request() -> impl Strategy<Value = String> {
        let keys: Vec<&'static str> = DEVICE_KEYS
            .iter()
            .chain(PEER_KEYS)
            .chain(&["public_key", "rx_bytes", ""])
            .copied()
            .collect();
        let value = prop_oneof![
            Just("true".to_owned()),
            Just("1".to_owned()),
            "[0-9a-fA-F]{62,66}",
            "[0-9]{0,12}",
            "[0-9a-f:.\\[\\]/%]{0,48}",
            any::<String>(),
        ];
        let line = prop_oneof![
            (proptest::sample::select(keys), value).prop_map(|(k, v)| format!("{k}={v}")),
            any::<String>(),
        ];
        (
            prop_oneof![Just("set=1"), Just("get=1")],
            proptest::collection::vec(line, 0..12),
        )
            .prop_map(|(first, lines)| {
                let mut text = format!("{first}\n");
                for l in lines {
                    text.push_str(&l);
                    text.push('\n');
                }
                text
            })
    }
}
