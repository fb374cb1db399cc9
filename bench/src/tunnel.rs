//! The five data paths of the comparison, brought up one at a time between the same two
//! lab hosts.
//!
//! ```text
//!  pod a-p 10.1.0.2 ── host a ══ underlay 198.18.0.0/16 ══ host b ── pod b-p 10.2.0.2
//!                       wm0 (tunnel daemon, UDP 51820)        wm0
//! ```
//!
//! Every tunnel daemon creates `wm0` in its host and serves `/var/run/wireguard/wm0.sock`
//! (the host's private run directory); it is configured the same way for all of them, with
//! `wg setconf`, and the route to the other pod CIDR goes through `wm0`. Plain veth routing
//! sends the pod CIDR to the other host's underlay address instead.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use wiremesh_lab::Lab;
use wiremesh_lab::Proc;
use wiremesh_lab::lab::Host;
use wiremesh_lab::mesh::{IFACE, Node, PORT};

use crate::interrupt;
use crate::procfs;
use crate::tools::{Toolbox, path_str};

/// The tunnel MTU, as wg-quick sets it on a 1500-byte underlay (1500 − 80).
pub const TUNNEL_MTU: &str = "1420";

/// How long a daemon may take to create its UAPI socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a fresh tunnel may take to pass a ping (the handshake is one round trip;
/// wireguard-go retries an initiation after 5 s).
const REACHABLE_TIMEOUT: Duration = Duration::from_secs(20);

/// One data path between the two pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Impl {
    /// Plain routing over the underlay veths: no tunnel, no encryption (the ceiling).
    Veth,
    /// `wiremesh-agent up --interface wm0`.
    Wiremesh,
    /// Debian's `wireguard-go` (2022).
    WireguardGoDebian,
    /// The newest wireguard-go from the Go module proxy (TUN offloads, UDP GSO/GRO).
    WireguardGoLatest,
    /// `boringtun-cli` from crates.io, with its default threads.
    BoringtunCli,
    /// Another build of `wiremesh-agent` (`BENCH_BASE_AGENT`), run as `wiremesh` is: a
    /// before/after comparison in one run. Not in the default round.
    WiremeshBase,
    /// `wiremesh-agent up --translate`: each side's pod range translated statelessly to
    /// a mesh range ([`mesh_ip`]), as for clusters that share a pod CIDR (issue 14); the
    /// client reaches the server pod at its mesh address.
    WiremeshTranslated,
}

impl Impl {
    /// Every path, in the order of a round.
    pub const ALL: [Impl; 7] = [
        Impl::Veth,
        Impl::Wiremesh,
        Impl::WiremeshTranslated,
        Impl::WireguardGoDebian,
        Impl::WireguardGoLatest,
        Impl::BoringtunCli,
        Impl::WiremeshBase,
    ];

    /// The name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Veth => "veth",
            Impl::Wiremesh => "wiremesh",
            Impl::WireguardGoDebian => "wireguard-go-debian",
            Impl::WireguardGoLatest => "wireguard-go-latest",
            Impl::BoringtunCli => "boringtun-cli",
            Impl::WiremeshBase => "wiremesh-base",
            Impl::WiremeshTranslated => "wiremesh-translated",
        }
    }

    /// Whether the Wiremesh agent is the daemon (it sets its MTU and link itself).
    fn is_wiremesh(self) -> bool {
        matches!(
            self,
            Impl::Wiremesh | Impl::WiremeshBase | Impl::WiremeshTranslated
        )
    }
}

/// The mesh address of a bench pod address with `imp`: 10.N.0.H is 100.64.N.H when
/// translated (each host's pod range 10.N.0.0/24 is 100.64.N.0/24 in the mesh), itself
/// otherwise.
pub fn mesh_ip(imp: Impl, ip: Ipv4Addr) -> Ipv4Addr {
    let [_, n, _, h] = ip.octets();
    if imp == Impl::WiremeshTranslated {
        Ipv4Addr::new(100, 64, n, h)
    } else {
        ip
    }
}

/// [`mesh_ip`] for a host's pod range (`10.N.0.0/24`).
fn mesh_cidr(imp: Impl, cidr: &str) -> Result<String> {
    let (ip, len) = cidr
        .split_once('/')
        .with_context(|| format!("pod range {cidr:?}"))?;
    let ip: Ipv4Addr = ip.parse().with_context(|| format!("pod range {cidr:?}"))?;
    Ok(format!("{}/{len}", mesh_ip(imp, ip)))
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Impl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Impl::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .with_context(|| {
                let names: Vec<&str> = Impl::ALL.iter().map(|i| i.name()).collect();
                format!("unknown implementation {s:?}; known: {}", names.join(", "))
            })
    }
}

/// The lab of the comparison: two hosts with a pod each.
pub struct Topology {
    /// Host a (198.18.0.1) and its pod (10.1.0.2): the client side.
    pub a: Node,
    /// Host b (198.18.0.2) and its pod (10.2.0.2): the server side.
    pub b: Node,
    /// The lab; dropped last, it removes every namespace and process.
    pub lab: Lab,
}

impl Topology {
    /// Builds the lab.
    ///
    /// # Errors
    /// When the lab cannot be made (not root, tools missing).
    pub fn new() -> Result<Self> {
        let lab = Lab::new()?;
        let a = Node::new(&lab, "a", 1)?;
        let b = Node::new(&lab, "b", 2)?;
        Ok(Self { a, b, lab })
    }

    /// Brings up `imp` between the hosts and waits until pod a reaches pod b through it.
    ///
    /// # Errors
    /// When the daemon does not start, is refused its configuration, or no ping passes.
    pub fn up(&self, imp: Impl, tools: &Toolbox) -> Result<Tunnel<'_>> {
        let mut tunnel = Tunnel {
            imp,
            topology: self,
            procs: Vec::new(),
            routed: false,
        };
        if imp == Impl::Veth {
            self.a
                .host
                .add_route_via(&self.b.host.pod_cidr(), self.b.host.underlay_ip())?;
            self.b
                .host
                .add_route_via(&self.a.host.pod_cidr(), self.a.host.underlay_ip())?;
            tunnel.routed = true;
        } else {
            for (local, remote) in [(&self.a, &self.b), (&self.b, &self.a)] {
                let proc = spawn_daemon(imp, tools, &local.host)?;
                tunnel.procs.push(proc);
                configure(imp, local, remote)
                    .with_context(|| format!("configuring {imp} on host {}", local.host.name()))?;
            }
        }
        tunnel.wait_reachable()?;
        Ok(tunnel)
    }
}

/// A data path that is up; [`Tunnel::down`] (or dropping it) takes it down again.
pub struct Tunnel<'t> {
    imp: Impl,
    topology: &'t Topology,
    procs: Vec<Proc>,
    routed: bool,
}

impl Tunnel<'_> {
    /// The data path.
    pub fn imp(&self) -> Impl {
        self.imp
    }

    /// The tunnel daemons' PIDs (none for veth).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// The larger peak resident memory (`VmHWM`) of the two daemons so far, in MiB; 0 for
    /// veth, which has no process.
    ///
    /// # Errors
    /// When a daemon is gone.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        self.procs
            .iter()
            .map(|p| procfs::peak_rss_mib(p.pid()))
            .try_fold(0.0, |max: f64, v| Ok(max.max(v?)))
    }

    /// Whether every daemon is still running.
    pub fn alive(&self) -> bool {
        self.procs.iter().all(Proc::is_running)
    }

    /// Stops the daemons (SIGTERM, then SIGKILL) and waits until `wm0` is gone from both
    /// hosts, or removes the routes of the veth path.
    ///
    /// # Errors
    /// When a daemon cannot be stopped or its interface lingers.
    pub fn down(mut self) -> Result<()> {
        self.take_down()
    }

    fn take_down(&mut self) -> Result<()> {
        let t = self.topology;
        if std::mem::take(&mut self.routed) {
            t.a.host.ip(&["route", "del", &t.b.host.pod_cidr()])?;
            t.b.host.ip(&["route", "del", &t.a.host.pod_cidr()])?;
        }
        for proc in self.procs.drain(..) {
            proc.stop()?;
        }
        for host in [&t.a.host, &t.b.host] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while has_link(host, IFACE)? {
                if Instant::now() > deadline {
                    // A daemon that died without cleaning up leaves the TUN device behind
                    // only while a process holds it; remove it so the next one can start.
                    host.ip(&["link", "del", IFACE])
                        .with_context(|| format!("{IFACE} lingers on {}", host.name()))?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let socket = host.run_dir().join(format!("{IFACE}.sock"));
            if socket.exists() {
                std::fs::remove_file(&socket)
                    .with_context(|| format!("removing {}", socket.display()))?;
            }
        }
        Ok(())
    }

    fn wait_reachable(&self) -> Result<()> {
        let t = self.topology;
        let target = mesh_ip(self.imp, t.b.pod.ip()).to_string();
        let deadline = Instant::now() + REACHABLE_TIMEOUT;
        loop {
            interrupt::check()?;
            let out =
                t.a.pod
                    .exec(&["ping", "-n", "-c", "1", "-W", "1", &target])?;
            if out.status.success() {
                return Ok(());
            }
            if !self.alive() {
                bail!("{}: a daemon exited:\n{}", self.imp, self.stderr());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: pod a cannot reach pod b after {REACHABLE_TIMEOUT:?}\n{}",
                    self.imp,
                    self.stderr()
                );
            }
        }
    }

    fn stderr(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.label(), tail(&p.stderr(), 20)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Tunnel<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.take_down() {
            eprintln!("[bench] taking down {}: {e:#}", self.imp);
        }
    }
}

/// Starts the daemon of `imp` on `host` and waits for its UAPI socket.
fn spawn_daemon(imp: Impl, tools: &Toolbox, host: &Host) -> Result<Proc> {
    let log = host.dir().join(format!("{}.log", imp.name()));
    let log = path_str(&log).to_owned();
    let threads = std::env::var("BENCH_BORINGTUN_THREADS").unwrap_or_default();
    let own = host.pod_cidr();
    let translate = format!("{own}={}", mesh_cidr(Impl::WiremeshTranslated, &own)?);
    let (program, args, env): (&std::path::Path, Vec<&str>, Vec<(&str, &str)>) = match imp {
        Impl::Veth => bail!("veth has no daemon"),
        Impl::Wiremesh | Impl::WiremeshBase => (
            if imp == Impl::Wiremesh {
                tools.agent.as_path()
            } else {
                tools
                    .base_agent
                    .as_deref()
                    .context("wiremesh-base needs BENCH_BASE_AGENT: the path of another wiremesh-agent build")?
            },
            vec!["up", "--interface", IFACE],
            vec![("RUST_LOG", "warn")],
        ),
        Impl::WiremeshTranslated => (
            tools.agent.as_path(),
            vec!["up", "--interface", IFACE, "--translate", &translate],
            vec![("RUST_LOG", "warn")],
        ),
        Impl::WireguardGoDebian | Impl::WireguardGoLatest => (
            if imp == Impl::WireguardGoDebian {
                &tools.wireguard_go_debian
            } else {
                &tools.wireguard_go_latest
            },
            vec!["-f", IFACE],
            vec![("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "error")],
        ),
        Impl::BoringtunCli => {
            let mut args = vec!["-f", "--disable-drop-privileges", "-l", &log];
            if !threads.is_empty() {
                args.extend(["--threads", &threads]);
            }
            args.push(IFACE);
            (&tools.boringtun_cli, args, vec![])
        }
    };
    let proc = host.spawn_in_private_mounts(path_str(program), &args, &env)?;
    let socket = host.run_dir().join(format!("{IFACE}.sock"));
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !socket.exists() {
        if !proc.is_running() || Instant::now() > deadline {
            bail!(
                "{imp} on {} did not create {}:\n{}",
                host.name(),
                socket.display(),
                tail(&proc.stderr(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}

/// Gives `local`'s daemon its key and `remote` as its one peer, all through `wg setconf`,
/// and the route, as a wg-quick user would (`up --interface` adds none); for the
/// wireguard-go and boringtun daemons also MTU and link, which the Wiremesh agent sets
/// itself.
fn configure(imp: Impl, local: &Node, remote: &Node) -> Result<()> {
    let remote_range = mesh_cidr(imp, &remote.host.pod_cidr())?;
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\n\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}\n",
        local.keys.private,
        remote.keys.public,
        remote.endpoint(),
        remote_range
    );
    let path = local
        .host
        .dir()
        .join(format!("{IFACE}-{}.conf", imp.name()));
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    local.host.wg(&["setconf", IFACE, path_str(&path)])?;
    let host = &local.host;
    if !imp.is_wiremesh() {
        host.ip(&["link", "set", IFACE, "mtu", TUNNEL_MTU, "up"])?;
    }
    host.ip(&["route", "replace", &remote_range, "dev", IFACE])?;
    Ok(())
}

fn has_link(host: &Host, name: &str) -> Result<bool> {
    Ok(host
        .exec(&["ip", "link", "show", "dev", name])?
        .status
        .success())
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
