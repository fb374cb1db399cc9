//! Standalone mode: `wiremesh-agent up --config wm0.conf`, the way `wg-quick up` works.
//!
//! Routes as wg-quick adds them (`Table`, wg-quick(8)): at `up`, one per allowed IP of the
//! file's peers (`auto`, the default: in the main table, except those an interface
//! address's own subnet already routes; a number: in that table; `off`: none). `wg set` and
//! `wg setconf` later change peers, never routes, and `up --interface` without a file adds
//! none. Each route prefers the interface's first address of its family as source.

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use wiremesh_proto::IpCidr;
use wiremesh_proto::uapi::{DeviceUpdate, PeerUpdate};
use wiremesh_proto::wgconf::{Endpoint, MAIN_TABLE, Table, WgConfig};

use crate::dataplane::{self, InterfaceSpec, MTU_FROM_UNDERLAY, Routing};
use crate::metrics::AgentMetrics;
use wiremesh_core::translate::Translation;

/// The MTU when it is neither configured nor found on the underlay: wg-quick's default for
/// an underlay of 1500 bytes (1500 − 80).
pub const DEFAULT_MTU: u32 = wiremesh_core::mtu::DEFAULT_MTU;
/// Linux interface names: at most 15 bytes (IFNAMSIZ − 1).
const IFNAMSIZ: usize = 16;

/// What `up` was asked to do.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The config file; the interface is named after it.
    pub config: Option<PathBuf>,
    /// The interface name when there is no config file (then configure it with `wg`).
    pub interface: Option<String>,
    /// Key file used when the config has no `PrivateKey`.
    pub key_file: Option<PathBuf>,
    /// Directory of the UAPI socket.
    pub uapi_dir: PathBuf,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Route every peer's allowed IPs into the interface, following each change, as the
    /// `kube` and `host` modes do ([`Routing::AllowedIps`]), instead of the config file's
    /// routes fixed at `up` (the scale benchmark).
    pub route_allowed_ips: bool,
    /// `POD_CIDR=MESH_CIDR` pairs: this side's addresses as the peers know them
    /// ([`translation`]); none: no translation.
    pub translate: Vec<String>,
}

/// Everything `up` needs, read and checked before anything is created.
#[derive(Debug)]
pub struct Plan {
    /// The interface to create.
    pub spec: InterfaceSpec,
    /// The configuration to apply.
    pub update: DeviceUpdate,
}

/// Reads and checks the config file and key: errors here leave the system untouched.
///
/// # Errors
/// A message naming the file, line and field of the first problem.
pub fn plan(options: &UpOptions) -> Result<Plan> {
    let (name, config) = match (&options.config, &options.interface) {
        (Some(path), interface) => {
            let name = match interface {
                Some(name) => name.clone(),
                None => interface_name(path)?,
            };
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config: WgConfig = text
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (name, Some(config))
        }
        (None, Some(name)) => (name.clone(), None),
        (None, None) => bail!("give --config FILE or --interface NAME"),
    };
    check_name(&name)?;
    let mut update = DeviceUpdate {
        private_key: None,
        listen_port: None,
        fwmark: None,
        replace_peers: true,
        peers: Vec::new(),
        previous_key: None,
    };
    let mut spec = InterfaceSpec {
        name,
        mtu: MTU_FROM_UNDERLAY,
        addresses: Vec::new(),
        uapi_dir: options.uapi_dir.clone(),
        fail_closed: None,
        attribution: None,
        routing: Routing::Fixed {
            table: MAIN_TABLE,
            routes: BTreeSet::new(),
        },
        safety: Default::default(),
        translation: translation(&options.translate)?,
    };
    let key = match config.as_ref().and_then(|c| c.interface.private_key) {
        Some(key) => Some(key),
        None => match &options.key_file {
            Some(path) => Some(crate::keys::load_or_generate(path)?),
            None if config.is_some() => {
                bail!("the [Interface] section has no PrivateKey and no --key-file was given")
            }
            None => None,
        },
    };
    update.private_key = key.map(Some);
    if let Some(config) = config {
        let i = &config.interface;
        update.listen_port = i.listen_port;
        update.fwmark = i.fwmark;
        spec.addresses = i.addresses.clone();
        spec.mtu = i.mtu.unwrap_or(MTU_FROM_UNDERLAY);
        spec.routing = routing(&config);
        for peer in &config.peers {
            let endpoint = peer
                .endpoint
                .as_ref()
                .map(|e| resolve(e).with_context(|| format!("peer {}: Endpoint", peer.public_key)))
                .transpose()?;
            update.peers.push(PeerUpdate {
                public_key: peer.public_key,
                remove: false,
                update_only: false,
                preshared_key: peer.preshared_key.map(Some),
                endpoint,
                persistent_keepalive: peer.persistent_keepalive,
                replace_allowed_ips: true,
                allowed_ips: peer.allowed_ips.clone(),
                accept_ips: None,
                endpoints: None,
                replaces: None,
            });
        }
    }
    if options.route_allowed_ips {
        spec.routing = Routing::AllowedIps;
    }
    Ok(Plan { spec, update })
}

/// The prefix translation `up --translate` asks for: each `POD_CIDR=MESH_CIDR` maps this
/// side's addresses in `POD_CIDR` (sources of packets into the tunnel, destinations of
/// packets out of it) to the same place in `MESH_CIDR`, a range of the same length: how
/// two sites whose ranges overlap reach each other (the Kubernetes mode's mesh CIDRs).
///
/// # Errors
/// A pair that is not `CIDR=CIDR`, or a table [`Translation::new`] refuses (lengths that
/// differ, ranges that overlap); the message names the flag and the pair.
pub fn translation(pairs: &[String]) -> Result<Translation> {
    let mut parsed = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (pod, mesh) = pair
            .split_once('=')
            .with_context(|| format!("--translate {pair:?}: expected POD_CIDR=MESH_CIDR"))?;
        let cidr = |text: &str| -> Result<IpCidr> {
            text.trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("--translate {pair:?}: {text:?}: {e}"))
        };
        parsed.push((cidr(pod)?, cidr(mesh)?));
    }
    Translation::new(&parsed).map_err(|e| anyhow::anyhow!("--translate: {e}"))
}

/// Brings the interface up and serves until SIGINT or SIGTERM.
///
/// # Errors
/// When the plan is refused or the interface cannot be brought up.
pub async fn up(options: UpOptions) -> Result<()> {
    let plan = plan(&options)?;
    crate::preflight()?;
    let metrics = crate::metrics::bind(options.metrics_addr).await?;
    let ready = move |handle| crate::metrics::spawn(metrics, AgentMetrics::standalone(handle));
    dataplane::run(plan.spec, plan.update, ready, crate::shutdown_signal()).await
}

/// The routes `up` adds for `config` (wg-quick's `add_route` for each allowed IP): none
/// with `Table = off`; in the main table with `auto`, except a prefix inside an interface
/// address's subnet (wg-quick skips one a route on the device already matches: at `up`,
/// the kernel's connected routes); every one in a numbered table. The parser already
/// refused a default route with `auto`.
fn routing(config: &WgConfig) -> Routing {
    let allowed = config
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied());
    let connected = |cidr: &IpCidr| {
        config
            .interface
            .addresses
            .iter()
            .any(|a| a.network().covers(cidr))
    };
    let (table, routes) = match config.interface.table.unwrap_or(Table::Auto) {
        Table::Off => (MAIN_TABLE, BTreeSet::new()),
        Table::Auto => (MAIN_TABLE, allowed.filter(|c| !connected(c)).collect()),
        Table::Id(table) => (table, allowed.collect()),
    };
    Routing::Fixed { table, routes }
}

/// wg-quick's rule: the interface is named after the file, less `.conf`.
fn interface_name(path: &Path) -> Result<String> {
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".conf").unwrap_or(n))
        .with_context(|| {
            format!(
                "{}: cannot name an interface after this path",
                path.display()
            )
        })?;
    Ok(stem.to_owned())
}

fn check_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'=' | b'+' | b'.' | b'-'));
    if !valid {
        bail!(
            "interface name {name:?} is not valid: 1 to 15 characters of letters, digits and _=+.-"
        );
    }
    Ok(())
}

fn resolve(endpoint: &Endpoint) -> Result<SocketAddr> {
    match endpoint {
        Endpoint::Addr(addr) => Ok(*addr),
        Endpoint::Host(host, port) => (host.as_str(), *port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_is_named_after_the_file() {
        assert_eq!(interface_name(Path::new("/etc/wm0.conf")).unwrap(), "wm0");
        assert!(check_name("a-very-long-interface-name").is_err());
        assert!(check_name("bad/name").is_err());
    }

    #[test]
    fn config_becomes_a_replacing_update() {
        let dir = std::env::temp_dir().join(format!("wm-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wm7.conf");
        std::fs::write(
            &path,
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nListenPort = 51000\nAddress = 10.9.0.1/24\n\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 198.18.0.9:51820\nAllowedIPs = 10.9.1.0/24\n",
        )
        .unwrap();
        let plan = plan(&UpOptions {
            config: Some(path.clone()),
            interface: None,
            key_file: None,
            uapi_dir: dir.clone(),
            metrics_addr: None,
            route_allowed_ips: false,
            translate: Vec::new(),
        })
        .unwrap();
        assert_eq!(plan.spec.name, "wm7");
        assert_eq!(plan.spec.mtu, MTU_FROM_UNDERLAY);
        assert!(plan.update.replace_peers);
        assert_eq!(plan.update.listen_port, Some(51000));
        assert_eq!(plan.update.peers.len(), 1);
        assert!(plan.update.peers[0].replace_allowed_ips);

        // An MTU in the file is kept as it is.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("ListenPort", "MTU = 1380\nListenPort")).unwrap();
        let explicit = super::plan(&UpOptions {
            config: Some(path),
            interface: None,
            key_file: None,
            uapi_dir: dir.clone(),
            metrics_addr: None,
            route_allowed_ips: false,
            translate: Vec::new(),
        })
        .unwrap();
        assert_eq!(explicit.spec.mtu, 1380);
        assert_eq!(
            explicit.spec.routing,
            Routing::Fixed {
                table: MAIN_TABLE,
                routes: ["10.9.1.0/24".parse().unwrap()].into()
            }
        );
        // Without a file: an interface with no routes, whatever `wg set` adds later.
        let bare = super::plan(&UpOptions {
            config: None,
            interface: Some("wm8".into()),
            key_file: None,
            uapi_dir: dir.clone(),
            metrics_addr: None,
            route_allowed_ips: false,
            translate: Vec::new(),
        })
        .unwrap();
        assert_eq!(
            bare.spec.routing,
            Routing::Fixed {
                table: MAIN_TABLE,
                routes: BTreeSet::new()
            }
        );
        // --route-allowed-ips: the routes follow the allowed IPs, as in `kube` mode.
        let following = super::plan(&UpOptions {
            config: None,
            interface: Some("wm8".into()),
            key_file: None,
            uapi_dir: dir.clone(),
            metrics_addr: None,
            route_allowed_ips: true,
            translate: Vec::new(),
        })
        .unwrap();
        assert_eq!(following.spec.routing, Routing::AllowedIps);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn routes_follow_table_as_wg_quick_does() {
        let config = |table: &str| -> WgConfig {
            format!(
                "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 10.9.0.1/24\nAddress = fd09::1/64\n{table}\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs = 10.9.0.0/24, 10.9.0.7/32, 10.99.0.0/24, fd99::/64\n"
            )
            .parse()
            .unwrap()
        };
        let set = |cidrs: &[&str]| -> BTreeSet<IpCidr> {
            cidrs.iter().map(|c| c.parse().unwrap()).collect()
        };
        // auto: the interface's own subnet (and what is inside it) stays the kernel's.
        for table in ["", "Table = auto"] {
            assert_eq!(
                routing(&config(table)),
                Routing::Fixed {
                    table: MAIN_TABLE,
                    routes: set(&["10.99.0.0/24", "fd99::/64"])
                }
            );
        }
        assert_eq!(
            routing(&config("Table = off")),
            Routing::Fixed {
                table: MAIN_TABLE,
                routes: BTreeSet::new()
            }
        );
        assert_eq!(
            routing(&config("Table = 1234")),
            Routing::Fixed {
                table: 1234,
                routes: set(&["10.9.0.0/24", "10.9.0.7/32", "10.99.0.0/24", "fd99::/64"])
            }
        );
    }

    #[test]
    fn translate_pairs_are_checked_and_name_the_flag() {
        let pairs = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let t = translation(&pairs(&["10.1.0.0/24=100.64.1.0/24"])).unwrap();
        assert_eq!(
            t.pod_to_mesh("10.1.0.2".parse().unwrap()),
            Some("100.64.1.2".parse().unwrap())
        );
        assert!(translation(&[]).unwrap().is_empty());
        for (bad, said) in [
            ("10.1.0.0/24", "POD_CIDR=MESH_CIDR"),
            ("10.1.0.0/24=nope", "\"nope\""),
            ("10.1.0.0/24=100.64.0.0/16", "--translate"),
        ] {
            let e = format!("{:#}", translation(&pairs(&[bad])).unwrap_err());
            assert!(e.contains(said) && e.contains("--translate"), "{bad}: {e}");
        }
        let e = translation(&pairs(&[
            "10.1.0.0/24=100.64.1.0/24",
            "10.1.0.0/25=100.64.2.0/25",
        ]))
        .unwrap_err();
        assert!(format!("{e:#}").contains("--translate"), "{e:#}");
    }
}
