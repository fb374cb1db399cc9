//! The WireGuard configuration file format that `wg-quick` users know.
//!
//! ```text
//! [Interface]
//! PrivateKey = <base64>
//! ListenPort = 51820
//! Address = 10.0.0.1/24, fd00::1/64
//! MTU = 1420
//! Table = auto
//!
//! [Peer]
//! PublicKey = <base64>
//! PresharedKey = <base64>
//! Endpoint = 198.18.0.2:51820
//! AllowedIPs = 10.0.1.0/24
//! PersistentKeepalive = 25
//! ```
//!
//! Field names are matched case-insensitively, `#` starts a comment, and a field that may
//! hold a list (`Address`, `AllowedIPs`) may repeat. Anything else is an error that names
//! the line and the field: nothing is half-parsed.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::cidr::{InterfaceAddress, IpCidr};
use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// A whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgConfig {
    /// The `[Interface]` section.
    pub interface: InterfaceConfig,
    /// The `[Peer]` sections, in file order.
    pub peers: Vec<PeerConfig>,
}

/// The `[Interface]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// `PrivateKey`; when absent the agent uses its key file.
    pub private_key: Option<PrivateKey>,
    /// `ListenPort`; when absent the kernel picks a port.
    pub listen_port: Option<u16>,
    /// `FwMark`, set on the underlay socket.
    pub fwmark: Option<u32>,
    /// `Address`, each put on the interface.
    pub addresses: Vec<InterfaceAddress>,
    /// `MTU` of the interface.
    pub mtu: Option<u32>,
    /// `Table`: which routes `up` adds for the peers' allowed IPs; absent is
    /// [`Table::Auto`], as in wg-quick.
    pub table: Option<Table>,
}

/// wg-quick's `Table` (wg-quick(8)): where the routes to the peers' allowed IPs go when the
/// interface comes up. Only `up` adds them, from the file; `wg set` and `wg setconf` later
/// add none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `auto` (the default): the main table, except a prefix that an interface address's
    /// own subnet already routes. A default route (`0.0.0.0/0`, `::/0`) is refused: wg-quick
    /// gives it its fwmark policy routing, which Wiremesh does not do.
    Auto,
    /// `off`: no routes at all.
    Off,
    /// A routing table by number (`main` is 254), default routes included.
    Id(u32),
}

/// The main routing table (`RT_TABLE_MAIN`, `rtnetlink.h`).
pub const MAIN_TABLE: u32 = 254;
/// The local routing table (`RT_TABLE_LOCAL`): the kernel's own, never ours.
const LOCAL_TABLE: u32 = 255;

impl FromStr for Table {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => return Ok(Self::Auto),
            "off" => return Ok(Self::Off),
            "main" => return Ok(Self::Id(MAIN_TABLE)),
            _ => {}
        }
        let id = text
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| text.parse::<u32>().ok())
            .flatten()
            .ok_or_else(|| format!("{text:?} is not `auto`, `off`, `main` or a table number"))?;
        if id == 0 || id == LOCAL_TABLE {
            return Err(format!(
                "table {id} is not a table routes can be added to (1-4294967295, not 255)"
            ));
        }
        Ok(Self::Id(id))
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Off => write!(f, "off"),
            Self::Id(id) => write!(f, "{id}"),
        }
    }
}

/// One `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// `PublicKey` (required).
    pub public_key: PublicKey,
    /// `PresharedKey`.
    pub preshared_key: Option<PresharedKey>,
    /// `Endpoint`.
    pub endpoint: Option<Endpoint>,
    /// `AllowedIPs`, all sections' lines together.
    pub allowed_ips: Vec<IpCidr>,
    /// `PersistentKeepalive` in seconds; 0 or absent means off.
    pub persistent_keepalive: Option<u16>,
}

/// A peer's UDP endpoint: an address, or a host name resolved when the interface comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `198.18.0.2:51820` or `[fd00::2]:51820`.
    Addr(SocketAddr),
    /// `host.example:51820`.
    Host(String, u16),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no :port"))?;
        // Digits only: `u16::from_str` also takes a leading `+`, which would print back
        // without it (found by the wgconf fuzz target).
        let port: u16 = port
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| port.parse().ok())
            .flatten()
            .ok_or_else(|| format!("{port:?} is not a port number"))?;
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid_host {
            return Err(format!("{host:?} is neither an IP address nor a host name"));
        }
        Ok(Self::Host(host.to_owned(), port))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A line is neither a section header, a `Key = Value` pair, a comment nor blank.
    #[error("line {line}: expected `[Interface]`, `[Peer]` or `Field = Value`, found {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A section other than `[Interface]` and `[Peer]`.
    #[error("line {line}: unknown section [{section}]")]
    UnknownSection {
        /// 1-based line number.
        line: usize,
        /// The section name.
        section: String,
    },
    /// A field before any section.
    #[error("line {line}: field {field} is outside any [Interface] or [Peer] section")]
    OutsideSection {
        /// 1-based line number.
        line: usize,
        /// The field name.
        field: String,
    },
    /// A field this section does not have.
    #[error("line {line}: unknown field {field} in [{section}]")]
    UnknownField {
        /// 1-based line number.
        line: usize,
        /// The section name.
        section: &'static str,
        /// The field name.
        field: String,
    },
    /// A `wg-quick` field (scripts, DNS, routing table) that Wiremesh does not act on.
    #[error(
        "line {line}: field {field} is a wg-quick setting that Wiremesh does not support; remove it"
    )]
    Unsupported {
        /// 1-based line number.
        line: usize,
        /// The field name.
        field: String,
    },
    /// A field given twice where only one is allowed.
    #[error("line {line}: field {field} is given a second time")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The field name.
        field: String,
    },
    /// A value that does not parse.
    #[error("line {line}: field {field}: {reason}")]
    Value {
        /// 1-based line number.
        line: usize,
        /// The field name.
        field: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// A required field is absent.
    #[error("line {line}: [{section}] section has no {field}")]
    Missing {
        /// 1-based line number of the section header.
        line: usize,
        /// The section name.
        section: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// Two peers with one public key, or with overlapping allowed IPs.
    #[error("line {line}: field {field}: {reason}")]
    Conflict {
        /// 1-based line number of the later definition.
        line: usize,
        /// The field name.
        field: &'static str,
        /// What conflicts with what.
        reason: String,
    },
    /// No `[Interface]` section, or more than one.
    #[error("the file must have exactly one [Interface] section (found {0})")]
    InterfaceCount(usize),
    /// A default route in `AllowedIPs` while `Table` is `auto`.
    #[error(
        "line {line}: field AllowedIPs: the [Peer] {peer} allows {cidr}, a default route, and \
         Table is auto: wg-quick would route it with fwmark policy routing, which Wiremesh does \
         not do; set `Table = off` in [Interface] and route it yourself, or give a table number"
    )]
    DefaultRoute {
        /// 1-based line number of the `AllowedIPs` line.
        line: usize,
        /// The peer's public key.
        peer: PublicKey,
        /// `0.0.0.0/0` or `::/0`.
        cidr: IpCidr,
    },
}

impl ConfigError {
    /// The 1-based line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. }
            | Self::UnknownSection { line, .. }
            | Self::OutsideSection { line, .. }
            | Self::UnknownField { line, .. }
            | Self::Unsupported { line, .. }
            | Self::Duplicate { line, .. }
            | Self::Value { line, .. }
            | Self::Missing { line, .. }
            | Self::Conflict { line, .. }
            | Self::DefaultRoute { line, .. } => Some(*line),
            Self::InterfaceCount(_) => None,
        }
    }
}

/// wg-quick fields that only drive its shell scripts or resolver.
const WG_QUICK_ONLY: &[&str] = &[
    "dns",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
];

#[derive(Default)]
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<PresharedKey>,
    endpoint: Option<Endpoint>,
    allowed_ips: Vec<IpCidr>,
    persistent_keepalive: Option<u16>,
    /// The first `AllowedIPs` line with a default route, and that route.
    default_route: Option<(usize, IpCidr)>,
}

enum Section {
    None,
    Interface,
    Peer(PeerDraft),
}

impl FromStr for WgConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let mut interface = InterfaceConfig::default();
        let mut interface_count = 0usize;
        let mut peers: Vec<(usize, PeerConfig)> = Vec::new();
        let mut default_routes: Vec<(usize, PublicKey, IpCidr)> = Vec::new();
        let mut section = Section::None;
        let mut seen: BTreeSet<String> = BTreeSet::new();

        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            if let Some(rest) = content.strip_prefix('[') {
                let name = rest.strip_suffix(']').ok_or_else(|| ConfigError::Syntax {
                    line,
                    text: raw.to_owned(),
                })?;
                finish_section(&mut section, &mut peers, &mut default_routes)?;
                seen.clear();
                section = match name.trim().to_ascii_lowercase().as_str() {
                    "interface" => {
                        interface_count += 1;
                        Section::Interface
                    }
                    "peer" => Section::Peer(PeerDraft {
                        line,
                        ..PeerDraft::default()
                    }),
                    _ => {
                        return Err(ConfigError::UnknownSection {
                            line,
                            section: name.trim().to_owned(),
                        });
                    }
                };
                continue;
            }
            let (field, value) = content.split_once('=').ok_or_else(|| ConfigError::Syntax {
                line,
                text: raw.to_owned(),
            })?;
            let field = field.trim();
            let value = value.trim();
            let lower = field.to_ascii_lowercase();
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(ConfigError::Syntax {
                    line,
                    text: raw.to_owned(),
                });
            }
            let repeatable = matches!(lower.as_str(), "address" | "allowedips");
            if !repeatable && !seen.insert(lower.clone()) {
                return Err(ConfigError::Duplicate {
                    line,
                    field: field.to_owned(),
                });
            }
            let bad = |reason: String| ConfigError::Value {
                line,
                field: field.to_owned(),
                reason,
            };
            match &mut section {
                Section::None => {
                    return Err(ConfigError::OutsideSection {
                        line,
                        field: field.to_owned(),
                    });
                }
                Section::Interface => match lower.as_str() {
                    "privatekey" => {
                        interface.private_key =
                            Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                    }
                    "listenport" => {
                        interface.listen_port = Some(value.parse().map_err(|_| {
                            bad(format!("{value:?} is not a port number (0-65535)"))
                        })?);
                    }
                    "fwmark" => {
                        interface.fwmark = if value.eq_ignore_ascii_case("off") {
                            None
                        } else {
                            Some(parse_u32(value).map_err(bad)?)
                        };
                    }
                    "address" => {
                        for item in list(value) {
                            interface
                                .addresses
                                .push(item.parse().map_err(|e| bad(format!("{item:?}: {e}")))?);
                        }
                    }
                    "mtu" => {
                        let mtu: u32 = value
                            .parse()
                            .map_err(|_| bad(format!("{value:?} is not a number")))?;
                        if !(576..=65_535).contains(&mtu) {
                            return Err(bad(format!("{mtu} is outside 576..=65535")));
                        }
                        interface.mtu = Some(mtu);
                    }
                    "table" => {
                        interface.table = Some(value.parse().map_err(bad)?);
                    }
                    _ if WG_QUICK_ONLY.contains(&lower.as_str()) => {
                        return Err(ConfigError::Unsupported {
                            line,
                            field: field.to_owned(),
                        });
                    }
                    _ => {
                        return Err(ConfigError::UnknownField {
                            line,
                            section: "Interface",
                            field: field.to_owned(),
                        });
                    }
                },
                Section::Peer(draft) => match lower.as_str() {
                    "publickey" => {
                        draft.public_key = Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                    }
                    "presharedkey" => {
                        draft.preshared_key = Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                    }
                    "endpoint" => {
                        draft.endpoint = Some(value.parse().map_err(bad)?);
                    }
                    "allowedips" => {
                        for item in list(value) {
                            let cidr: IpCidr =
                                item.parse().map_err(|e| bad(format!("{item:?}: {e}")))?;
                            if cidr.is_default() && draft.default_route.is_none() {
                                draft.default_route = Some((line, cidr));
                            }
                            draft.allowed_ips.push(cidr);
                        }
                    }
                    "persistentkeepalive" => {
                        let secs = if value.eq_ignore_ascii_case("off") {
                            0
                        } else {
                            value.parse::<u16>().map_err(|_| {
                                bad(format!("{value:?} is not a number of seconds (0-65535)"))
                            })?
                        };
                        draft.persistent_keepalive = (secs != 0).then_some(secs);
                    }
                    _ => {
                        return Err(ConfigError::UnknownField {
                            line,
                            section: "Peer",
                            field: field.to_owned(),
                        });
                    }
                },
            }
        }
        finish_section(&mut section, &mut peers, &mut default_routes)?;
        if interface_count != 1 {
            return Err(ConfigError::InterfaceCount(interface_count));
        }
        check_peers(&peers)?;
        if matches!(interface.table, None | Some(Table::Auto))
            && let Some((line, peer, cidr)) = default_routes.into_iter().next()
        {
            return Err(ConfigError::DefaultRoute { line, peer, cidr });
        }
        Ok(Self {
            interface,
            peers: peers.into_iter().map(|(_, p)| p).collect(),
        })
    }
}

fn finish_section(
    section: &mut Section,
    peers: &mut Vec<(usize, PeerConfig)>,
    default_routes: &mut Vec<(usize, PublicKey, IpCidr)>,
) -> Result<(), ConfigError> {
    if let Section::Peer(draft) = std::mem::replace(section, Section::None) {
        let public_key = draft.public_key.ok_or(ConfigError::Missing {
            line: draft.line,
            section: "Peer",
            field: "PublicKey",
        })?;
        if let Some((line, cidr)) = draft.default_route {
            default_routes.push((line, public_key, cidr));
        }
        let mut allowed_ips = draft.allowed_ips;
        allowed_ips.sort();
        allowed_ips.dedup();
        peers.push((
            draft.line,
            PeerConfig {
                public_key,
                preshared_key: draft.preshared_key,
                endpoint: draft.endpoint,
                allowed_ips,
                persistent_keepalive: draft.persistent_keepalive,
            },
        ));
    }
    Ok(())
}

/// Two peers may not share a key, nor an allowed-IPs prefix: the kernel would silently
/// move the prefix to the later peer, and a config that means two things is refused.
fn check_peers(peers: &[(usize, PeerConfig)]) -> Result<(), ConfigError> {
    for (i, (line, peer)) in peers.iter().enumerate() {
        for (other_line, other) in &peers[..i] {
            if other.public_key == peer.public_key {
                return Err(ConfigError::Conflict {
                    line: *line,
                    field: "PublicKey",
                    reason: format!("same key as the [Peer] on line {other_line}"),
                });
            }
            for c in &peer.allowed_ips {
                if other.allowed_ips.contains(c) {
                    return Err(ConfigError::Conflict {
                        line: *line,
                        field: "AllowedIPs",
                        reason: format!(
                            "{c} is already allowed for the [Peer] on line {other_line}"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_u32(value: &str) -> Result<u32, String> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| format!("{value:?} is not a 32-bit number"))
}

impl fmt::Display for WgConfig {
    /// Writes the file form. It contains the private key: write it only to a file of mode
    /// 0600 or to a terminal the user asked for it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.interface;
        writeln!(f, "[Interface]")?;
        if let Some(k) = &i.private_key {
            writeln!(f, "PrivateKey = {}", k.to_base64())?;
        }
        if let Some(p) = i.listen_port {
            writeln!(f, "ListenPort = {p}")?;
        }
        if let Some(m) = i.fwmark {
            writeln!(f, "FwMark = {m}")?;
        }
        if !i.addresses.is_empty() {
            writeln!(f, "Address = {}", join(&i.addresses))?;
        }
        if let Some(m) = i.mtu {
            writeln!(f, "MTU = {m}")?;
        }
        if let Some(t) = i.table {
            writeln!(f, "Table = {t}")?;
        }
        for p in &self.peers {
            writeln!(f, "\n[Peer]")?;
            writeln!(f, "PublicKey = {}", p.public_key)?;
            if let Some(k) = &p.preshared_key {
                writeln!(f, "PresharedKey = {}", k.to_base64())?;
            }
            if let Some(e) = &p.endpoint {
                writeln!(f, "Endpoint = {e}")?;
            }
            if !p.allowed_ips.is_empty() {
                writeln!(f, "AllowedIPs = {}", join(&p.allowed_ips))?;
            }
            if let Some(k) = p.persistent_keepalive {
                writeln!(f, "PersistentKeepalive = {k}")?;
            }
        }
        Ok(())
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn sample() -> String {
        format!(
            "# comment\n[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nAddress = 10.0.0.1/24, fd00::1/64\nMTU = 1420\n\n[Peer]\nPublicKey = {KEY_B}\nEndpoint = 198.18.0.2:51820\nAllowedIPs = 10.0.1.0/24\nallowedips = 10.0.2.0/24 # more\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn an_endpoint_port_is_digits_only() {
        // Regression (wgconf fuzz target): `+1820` parsed as a host name's port 1820 and
        // printed back as `198.18.0.2:1820`, an address: not the same configuration.
        assert!("198.18.0.2:+1820".parse::<Endpoint>().is_err());
        assert!("peer.example:+1820".parse::<Endpoint>().is_err());
        assert!("peer.example:".parse::<Endpoint>().is_err());
        assert_eq!(
            "peer.example:1820".parse::<Endpoint>(),
            Ok(Endpoint::Host("peer.example".to_owned(), 1820))
        );
    }

    #[test]
    fn parses_a_full_file() {
        let c: WgConfig = sample().parse().unwrap();
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.interface.mtu, Some(1420));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert_eq!(
            c.peers[0].endpoint,
            Some(Endpoint::Addr("198.18.0.2:51820".parse().unwrap()))
        );
    }

    #[test]
    fn print_then_parse_is_identity() {
        let c: WgConfig = sample().parse().unwrap();
        let again: WgConfig = c.to_string().parse().unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn bad_key_names_line_and_field() {
        let text = sample().replace(KEY_B, "not-a-key");
        let err = text.parse::<WgConfig>().unwrap_err();
        assert_eq!(err.line(), Some(9));
        assert!(err.to_string().contains("PublicKey"), "{err}");
    }

    #[test]
    fn bad_cidr_names_line_and_field() {
        let text = sample().replace("10.0.1.0/24", "10.0.1.0/40");
        let err = text.parse::<WgConfig>().unwrap_err();
        assert_eq!(err.line(), Some(11));
        assert!(err.to_string().contains("AllowedIPs"), "{err}");
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let text = sample().replace("MTU = 1420", "Colour = blue");
        let err = text.parse::<WgConfig>().unwrap_err();
        assert_eq!(err.line(), Some(6));
        assert!(err.to_string().contains("Colour"), "{err}");
    }

    #[test]
    fn wg_quick_scripts_are_refused() {
        let text = sample().replace("MTU = 1420", "PostUp = iptables -F");
        let err = text.parse::<WgConfig>().unwrap_err();
        assert!(
            matches!(err, ConfigError::Unsupported { line: 6, .. }),
            "{err}"
        );
    }

    #[test]
    fn table_is_auto_off_main_or_a_number() {
        let table = |value: &str| {
            sample()
                .replace("MTU = 1420", &format!("Table = {value}"))
                .parse::<WgConfig>()
                .map(|c| c.interface.table)
        };
        assert_eq!(table("auto"), Ok(Some(Table::Auto)));
        assert_eq!(table("off"), Ok(Some(Table::Off)));
        assert_eq!(table("main"), Ok(Some(Table::Id(MAIN_TABLE))));
        assert_eq!(table("1234"), Ok(Some(Table::Id(1234))));
        assert_eq!(sample().parse::<WgConfig>().unwrap().interface.table, None);
        for bad in ["0", "255", "+7", "local", "4294967296", ""] {
            let err = table(bad).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Value { line: 6, field, .. } if field == "Table"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_default_route_needs_table_off_or_a_number() {
        let text = sample().replace("AllowedIPs = 10.0.1.0/24", "AllowedIPs = 10.0.1.0/24, ::/0");
        let err = text.parse::<WgConfig>().unwrap_err();
        assert_eq!(err.line(), Some(11), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(KEY_B) && message.contains("::/0") && message.contains("Table = off"),
            "{message}"
        );
        let explicit = text.replace("MTU = 1420", "Table = auto");
        assert!(matches!(
            explicit.parse::<WgConfig>(),
            Err(ConfigError::DefaultRoute { line: 11, .. })
        ));
        for table in ["off", "main", "51820"] {
            let text = text.replace("MTU = 1420", &format!("Table = {table}"));
            let config: WgConfig = text.parse().unwrap();
            assert_eq!(config.to_string().parse::<WgConfig>(), Ok(config.clone()));
        }
    }

    #[test]
    fn duplicate_peer_and_overlapping_ips_are_refused() {
        let mut text = sample();
        text.push_str(&format!("[Peer]\nPublicKey = {KEY_B}\n"));
        assert!(matches!(
            text.parse::<WgConfig>(),
            Err(ConfigError::Conflict {
                field: "PublicKey",
                ..
            })
        ));
        let mut text = sample();
        text.push_str(&format!(
            "[Peer]\nPublicKey = {KEY_A}\nAllowedIPs = 10.0.1.0/24\n"
        ));
        assert!(matches!(
            text.parse::<WgConfig>(),
            Err(ConfigError::Conflict {
                field: "AllowedIPs",
                ..
            })
        ));
    }

    #[test]
    fn missing_interface_or_peer_key_is_refused() {
        assert_eq!(
            "[Peer]\n".parse::<WgConfig>(),
            Err(ConfigError::Missing {
                line: 1,
                section: "Peer",
                field: "PublicKey"
            })
        );
        assert_eq!("".parse::<WgConfig>(), Err(ConfigError::InterfaceCount(0)));
    }

    #[test]
    fn garbage_lines_are_syntax_errors() {
        let err = "[Interface]\nthis is not a field\n"
            .parse::<WgConfig>()
            .unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 2, .. }));
        let err = "[Interface\n".parse::<WgConfig>().unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 1, .. }));
    }

    mod prop {
        use proptest::prelude::*;

        use super::super::*;

        fn cidr() -> impl Strategy<Value = IpCidr> {
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, l)| IpCidr::new(std::net::Ipv4Addr::from(a).into(), l).unwrap())
        }

        fn config() -> impl Strategy<Value = WgConfig> {
            let peer = (
                any::<[u8; 32]>(),
                proptest::collection::vec(cidr(), 0..4),
                proptest::option::of(1u16..),
            )
                .prop_map(|(k, ips, ka)| {
                    let mut ips = ips;
                    ips.sort();
                    ips.dedup();
                    PeerConfig {
                        public_key: PublicKey::from(k),
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: ips,
                        persistent_keepalive: ka,
                    }
                });
            (
                any::<[u8; 32]>(),
                proptest::option::of(any::<u16>()),
                proptest::option::of(576u32..9000),
                proptest::collection::vec(peer, 0..4),
                prop_oneof![
                    Just(None),
                    Just(Some(Table::Auto)),
                    Just(Some(Table::Off)),
                    (1u32..255).prop_map(|t| Some(Table::Id(t))),
                    (256u32..).prop_map(|t| Some(Table::Id(t))),
                ],
            )
                .prop_map(|(k, port, mtu, peers, table)| {
                    let mut seen = Vec::new();
                    let mut kept = Vec::new();
                    for mut p in peers {
                        // A default route needs a table (or none) when Table is auto.
                        if matches!(table, None | Some(Table::Auto)) {
                            p.allowed_ips.retain(|c| !c.is_default());
                        }
                        if seen.iter().any(|(key, ips): &(PublicKey, Vec<IpCidr>)| {
                            *key == p.public_key || ips.iter().any(|c| p.allowed_ips.contains(c))
                        }) {
                            continue;
                        }
                        seen.push((p.public_key, p.allowed_ips.clone()));
                        kept.push(p);
                    }
                    WgConfig {
                        interface: InterfaceConfig {
                            private_key: Some(PrivateKey::from(k)),
                            listen_port: port,
                            fwmark: None,
                            addresses: vec![],
                            mtu,
                            table,
                        },
                        peers: kept,
                    }
                })
        }

        proptest! {
            #[test]
            fn printed_config_parses_back(c in config()) {
                let again: WgConfig = c.to_string().parse().unwrap();
                prop_assert_eq!(c, again);
            }

            #[test]
            fn parser_never_panics(text in "\\PC{0,200}") {
                let _ = text.parse::<WgConfig>();
            }
        }
    }
}
