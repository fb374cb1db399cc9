//! The namespace lab: underlay bridges, hosts and pods in network namespaces with a per-run
//! name prefix, processes in per-host mount namespaces, and a [`Drop`] that removes it all.
//!
//! Address plan: underlays live in 198.18.0.0/15 (RFC 2544 benchmarking range), pods in
//! 10.0.0.0/8, and both only inside namespaces the lab created. IPv6 underlays live in
//! fd18::/16 and IPv6 pod CIDRs in fd10::/16 (unique local addresses, RFC 4193), with
//! duplicate address detection off so that addresses are usable at once. Nothing is created
//! in the root network namespace: every veth is made inside a lab namespace with its peer
//! moved straight into another.
//!
//! ```text
//!  underlay ns "<prefix>u-ul": bridge br0 ── p0 ─┬─ ul0 198.18.0.1/16  host ns "<prefix>h-a"
//!                                                │    pods0 10.1.0.1/24 ── vp2 ── eth0 10.1.0.2/24  pod ns
//!                              ── p1 ─┴─ ul0 198.18.0.2/16  host ns "<prefix>h-b" ...
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand_core::{OsRng, RngCore};

use crate::Proc;
use crate::process::{ProcSlot, describe, run_with_timeout};
use crate::xfer::Summary;

/// Bound for one setup or query command (`ip`, `wg`, `ls`); they return in milliseconds.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The range underlay addresses must come from: RFC 2544's benchmarking block.
const UNDERLAY_RANGE: Ipv4Net = Ipv4Net {
    network: Ipv4Addr::new(198, 18, 0, 0),
    len: 15,
};

/// The range pod CIDRs must come from (RFC 1918), used only inside lab namespaces.
const POD_RANGE: Ipv4Net = Ipv4Net {
    network: Ipv4Addr::new(10, 0, 0, 0),
    len: 8,
};

/// The range IPv6 underlay prefixes must come from: unique local addresses (RFC 4193).
const UNDERLAY_RANGE6: Ipv6Net = Ipv6Net {
    network: Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 0),
    len: 16,
};

/// The range IPv6 pod CIDRs must come from: unique local addresses (RFC 4193).
const POD_RANGE6: Ipv6Net = Ipv6Net {
    network: Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 0),
    len: 16,
};

/// The smallest MTU of a link carrying IPv6 (RFC 8200).
const MIN_MTU6: u32 = 1280;

/// The default underlay of every lab.
const DEFAULT_UNDERLAY: (&str, &str, u32) = ("ul", "198.18.0.0/16", 1500);

/// Interface names in a host: the pod bridge, and the underlay veth stem (`ul0`, `ul1`, ...).
const POD_BRIDGE: &str = "pods0";
const UNDERLAY_BRIDGE: &str = "br0";

/// Where userspace WireGuard implementations and `wg` put and look for UAPI sockets.
const WIREGUARD_RUN_DIR: &str = "/var/run/wireguard";

/// Binds `$1` over `$2` in the (already private) mount namespace, then becomes `$3 ...`.
const PRIVATE_MOUNTS_SCRIPT: &str = r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#;

/// How long a private-mounts process may take to get its bind mount in place.
const MOUNT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The lower bound assumed for transfer throughput when choosing a timeout: 1 MiB/s is slower
/// than any working tunnel, debug builds included.
const TRANSFER_FLOOR_BYTES_PER_SEC: u64 = 1024 * 1024;

/// Fixed part of a transfer timeout: process start, handshake, connect retries.
const TRANSFER_BASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Tools the lab runs, and the Debian packages they come in.
const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("wg", "wireguard-tools"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
    ("kill", "procps"),
    ("ping", "iputils-ping"),
    ("sh", "dash"),
];

/// A lab run: every namespace, directory and process it creates carries its unique prefix,
/// and dropping it (also while a test panics) stops the processes, deletes the namespaces and
/// removes the directory.
pub struct Lab {
    inner: Arc<LabInner>,
    underlay: Underlay,
    _teardown: Teardown,
}

impl Lab {
    /// Creates a lab with a fresh prefix (`wm` + 4 hex digits + `-`), a temp directory
    /// `/tmp/wmXXXX/`, and the default underlay: bridge `br0` in namespace `<prefix>u-ul`,
    /// subnet 198.18.0.0/16, MTU 1500.
    ///
    /// # Errors
    /// When not root, a tool is missing, or any setup command fails (what was made is removed).
    pub fn new() -> Result<Lab> {
        require_root()?;
        require_tools()?;
        let (prefix, dir) = unique_prefix()?;
        let inner = Arc::new(LabInner {
            prefix,
            dir,
            namespaces: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
            addresses: Mutex::new(BTreeMap::new()),
            counter: AtomicU32::new(0),
            torn_down: AtomicBool::new(false),
        });
        let teardown = Teardown(inner.clone());
        let (name, cidr, mtu) = DEFAULT_UNDERLAY;
        let underlay = Underlay::create(&inner, name, cidr, mtu)?;
        Ok(Lab {
            inner,
            underlay,
            _teardown: teardown,
        })
    }

    /// The name prefix of this run, such as `wm1a2b-`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The run's temp directory, holding host directories and process logs.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The underlay made by [`Lab::new`] (198.18.0.0/16, MTU 1500).
    pub fn default_underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// Creates another underlay: a namespace `<prefix>u-<name>` holding a bridge with `mtu`,
    /// for hosts to attach to with addresses from `cidr`. An IPv6 `cidr` (inside fd18::/16)
    /// makes an IPv6-only underlay, for hosts from [`Lab::add_host_v6`].
    ///
    /// # Errors
    /// When `cidr` does not parse or is not inside 198.18.0.0/15 (IPv4) or fd18::/16 (IPv6),
    /// the MTU is outside 576..=9216 (1280..=9216 for IPv6), or a setup command fails.
    pub fn underlay(&self, name: &str, cidr: &str, mtu: u32) -> Result<Underlay> {
        Underlay::create(&self.inner, name, cidr, mtu)
    }

    /// Adds a host on the default underlay; see [`Lab::add_host_on`].
    ///
    /// # Errors
    /// As [`Lab::add_host_on`].
    pub fn add_host(&self, name: &str, underlay_ip: Ipv4Addr, pod_cidr: &str) -> Result<Host> {
        self.add_host_on(&self.underlay, name, underlay_ip, pod_cidr)
    }

    /// Adds a host: namespace `<prefix>h-<name>` with lo up and IPv4 forwarding on, a veth
    /// `ul0` into `underlay`'s bridge with `underlay_ip`, a bridge `pods0` holding the first
    /// address of `pod_cidr` as the pods' gateway, and private directories
    /// `<lab dir>/<name>/run/wireguard` and `<lab dir>/<name>/state` (mode 0700).
    ///
    /// # Errors
    /// When the name is not `[A-Za-z0-9_-]{1,24}`, `underlay_ip` is not a host address of the
    /// underlay, `pod_cidr` is not inside 10.0.0.0/8 or is longer than /30, or a command fails.
    pub fn add_host_on(
        &self,
        underlay: &Underlay,
        name: &str,
        underlay_ip: Ipv4Addr,
        pod_cidr: &str,
    ) -> Result<Host> {
        self.create_host(underlay, name, IpAddr::V4(underlay_ip), pod_cidr, None)
    }

    fn create_host(
        &self,
        underlay: &Underlay,
        name: &str,
        underlay_ip: IpAddr,
        pod_cidr: &str,
        pod_net6: Option<Ipv6Net>,
    ) -> Result<Host> {
        check_name("host", name)?;
        let pod_net: Ipv4Net = pod_cidr.parse()?;
        ensure!(
            pod_net.within(&POD_RANGE),
            "pod CIDR {pod_net} is outside {POD_RANGE}, the only range pods may use"
        );
        ensure!(pod_net.len <= 30, "pod CIDR {pod_net} has no room for pods");
        let gateway = pod_net
            .host(1)
            .ok_or_else(|| anyhow!("pod CIDR {pod_net} has no gateway address"))?;

        let dir = self.inner.dir.join(name);
        let run_dir = dir.join("run/wireguard");
        let state_dir = dir.join("state");
        for d in [&dir, &run_dir, &state_dir] {
            private_dir(d)?;
        }

        let ns = self
            .inner
            .add_netns(&format!("{}h-{name}", self.inner.prefix))?;
        ns.exec_ok(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            .context("turning on IPv4 forwarding")?;
        let ipv6 = pod_net6.is_some() || underlay_ip.is_ipv6();
        if ipv6 {
            ns.disable_dad()?;
            ns.exec_ok(&[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
            ])
            .context("turning on IPv6 forwarding")?;
        }
        ns.ip(&["link", "add", POD_BRIDGE, "type", "bridge"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{gateway}/{}", pod_net.len),
            "dev",
            POD_BRIDGE,
        ])?;
        self.inner.register_address(gateway, ns.name());
        let gateway6 = match pod_net6 {
            Some(net6) => {
                let gateway6 = net6
                    .host(1)
                    .ok_or_else(|| anyhow!("pod CIDR {net6} has no gateway address"))?;
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{gateway6}/{}", net6.len),
                    "dev",
                    POD_BRIDGE,
                    "nodad",
                ])?;
                self.inner.register_address(gateway6, ns.name());
                Some(gateway6)
            }
            None => None,
        };
        ns.ip(&["link", "set", POD_BRIDGE, "up"])?;

        let (underlay_ip4, underlay_ip6) = match underlay_ip {
            IpAddr::V4(ip) => (ip, None),
            IpAddr::V6(ip) => (Ipv4Addr::UNSPECIFIED, Some(ip)),
        };
        let host = Host {
            inner: Arc::new(HostInner {
                ns,
                name: name.to_owned(),
                underlay_ip: underlay_ip4,
                underlay_ip6,
                pod_net,
                gateway,
                pod_net6,
                gateway6,
                dir,
                run_dir,
                state_dir,
                next_pod: AtomicU32::new(2),
                attachments: AtomicU32::new(0),
            }),
        };
        host.attach_ip(underlay, underlay_ip)?;
        Ok(host)
    }

    /// Adds a host on an IPv6-only `underlay` (from [`Lab::underlay`] with an IPv6 prefix)
    /// with dual-stack pods: as [`Lab::add_host_on`], plus IPv6 forwarding, the first address
    /// of `pod_cidr6` on `pods0` as the pods' IPv6 gateway, and an IPv6 address and default
    /// route in every pod. The host has no IPv4 address on the underlay:
    /// [`Host::underlay_ip`] is 0.0.0.0 and [`Host::underlay_ip6`] holds `underlay_ip6`.
    ///
    /// # Errors
    /// As [`Lab::add_host_on`], or when `underlay` is not an IPv6 underlay, `underlay_ip6`
    /// is not in its prefix, or `pod_cidr6` is not inside fd10::/16 or longer than /126.
    pub fn add_host_v6(
        &self,
        underlay: &Underlay,
        name: &str,
        underlay_ip6: Ipv6Addr,
        pod_cidr: &str,
        pod_cidr6: &str,
    ) -> Result<Host> {
        ensure!(
            underlay.is_ipv6(),
            "underlay {} is not an IPv6 underlay",
            underlay.name()
        );
        self.add_host_dual_stack(
            underlay,
            name,
            IpAddr::V6(underlay_ip6),
            pod_cidr,
            pod_cidr6,
        )
    }

    /// Adds a host with dual-stack pods on `underlay` of either family: as
    /// [`Lab::add_host_v6`] when `underlay_ip` is IPv6, and as [`Lab::add_host_on`] plus
    /// IPv6 forwarding and the IPv6 pod CIDR `pod_cidr6` when it is IPv4.
    ///
    /// # Errors
    /// As [`Lab::add_host_v6`].
    pub fn add_host_dual_stack(
        &self,
        underlay: &Underlay,
        name: &str,
        underlay_ip: IpAddr,
        pod_cidr: &str,
        pod_cidr6: &str,
    ) -> Result<Host> {
        let pod_net6: Ipv6Net = pod_cidr6.parse()?;
        ensure!(
            pod_net6.within(&POD_RANGE6),
            "IPv6 pod CIDR {pod_net6} is outside {POD_RANGE6}, the only range pods may use"
        );
        ensure!(
            pod_net6.len <= 126,
            "IPv6 pod CIDR {pod_net6} has no room for pods"
        );
        self.create_host(underlay, name, underlay_ip, pod_cidr, Some(pod_net6))
    }

    /// A NAT gateway between `private` and the default underlay, like a cloud NAT or a
    /// home router: a host `name` with `private_ip` on `private` and `public_ip` on the
    /// default underlay, forwarding, masquerading everything that leaves on the public
    /// side (nftables), and dropping every connection that starts on the public side. Hosts
    /// behind it get it as their default route with [`Host::set_default_route`].
    /// `pod_cidr` is the (unused) pod CIDR every lab host has.
    ///
    /// # Errors
    /// As [`Lab::add_host_on`] and [`Host::attach`], or when `nft` fails.
    pub fn add_nat_gateway(
        &self,
        private: &Underlay,
        name: &str,
        private_ip: Ipv4Addr,
        public_ip: Ipv4Addr,
        pod_cidr: &str,
    ) -> Result<Host> {
        self.nat_gateway(private, name, private_ip, public_ip, pod_cidr, false)
    }

    /// As [`Lab::add_nat_gateway`], but the NAT picks a random source port for every
    /// connection (`masquerade fully-random`, a "symmetric" NAT): the address a peer
    /// observes is of no use to anyone else, so no hole can be punched through it.
    ///
    /// # Errors
    /// As [`Lab::add_nat_gateway`].
    pub fn add_symmetric_nat_gateway(
        &self,
        private: &Underlay,
        name: &str,
        private_ip: Ipv4Addr,
        public_ip: Ipv4Addr,
        pod_cidr: &str,
    ) -> Result<Host> {
        self.nat_gateway(private, name, private_ip, public_ip, pod_cidr, true)
    }

    fn nat_gateway(
        &self,
        private: &Underlay,
        name: &str,
        private_ip: Ipv4Addr,
        public_ip: Ipv4Addr,
        pod_cidr: &str,
        fully_random: bool,
    ) -> Result<Host> {
        let router = self.add_host_on(private, name, private_ip, pod_cidr)?;
        let flags = if fully_random { " fully-random" } else { "" };
        let public = router.attach(&self.underlay, public_ip)?;
        let rules = format!(
            "table ip wmnat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{public}\" masquerade{flags}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{public}\" ct state established,related accept
    iifname \"{public}\" counter drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{public}\" ct state established,related accept
    iifname \"{public}\" icmp type echo-request accept
    iifname \"{public}\" counter drop
  }}
}}
"
        );
        let path = router.dir().join("nat.nft");
        fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        router
            .exec_ok(&["nft", "-f", path.to_str().context("lab paths are UTF-8")?])
            .context("loading the NAT rules")?;
        Ok(router)
    }

    /// Every namespace this lab created so far, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.inner.namespaces).clone()
    }

    /// Deletes namespace `ns` now (a machine that dies): its veths go with it. Stop the
    /// processes in it first; the lab no longer tears it down.
    ///
    /// # Errors
    /// When `ip netns delete` fails.
    pub fn delete_namespace(&self, ns: &Netns) -> Result<()> {
        ip(&["netns", "delete", ns.name()])?;
        lock(&self.inner.namespaces).retain(|n| n != ns.name());
        Ok(())
    }
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.inner.prefix)
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// A network namespace of the lab: run commands in it.
#[derive(Clone)]
pub struct Netns {
    name: String,
    lab: Arc<LabInner>,
}

impl Netns {
    /// The namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `args` in this namespace (`ip netns exec`) to completion, bounded by
    /// [`EXEC_TIMEOUT`]. A non-zero exit is not an error here; see [`Netns::exec_ok`].
    ///
    /// # Errors
    /// When the command cannot start or times out.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    /// [`Netns::exec`] with an explicit bound.
    ///
    /// # Errors
    /// When the command cannot start or times out.
    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        self.lab.check_alive()?;
        run_with_timeout(self.command(args, &[]), timeout)
            .with_context(|| format!("in {}: {}", self.name, args.join(" ")))
    }

    /// Runs `args` in this namespace and returns stdout.
    ///
    /// # Errors
    /// When the command fails to start, times out or exits non-zero (with its output).
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.exec(args)?;
        ensure!(
            output.status.success(),
            "in {}: {}: {}",
            self.name,
            args.join(" "),
            describe(&output)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `args` in this namespace in the background.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn(&self, args: &[&str]) -> Result<Proc> {
        self.spawn_with_env(args, &[])
    }

    /// Starts `args` in this namespace in the background with extra environment variables.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let program = args.first().ok_or_else(|| anyhow!("no command to spawn"))?;
        self.lab
            .spawn(self.command(args, env), &label(program, &self.name))
    }

    /// Runs `ip -n <this namespace> args...`, returning stdout.
    ///
    /// # Errors
    /// When `ip` fails (with its stderr).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Turns IPv6 duplicate address detection off for the namespace's interfaces, present
    /// and future (`accept_dad` 0 in `all` and `default`), so their addresses, link-local
    /// ones included, are usable at once.
    ///
    /// # Errors
    /// When the sysctls cannot be written.
    pub fn disable_dad(&self) -> Result<()> {
        self.exec_ok(&[
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
             echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad",
        ])
        .context("turning off IPv6 duplicate address detection")?;
        Ok(())
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command.envs(env.iter().copied());
        command
    }
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Netns").field(&self.name).finish()
    }
}

/// An underlay network: a namespace holding a Linux bridge that hosts attach to.
#[derive(Clone)]
pub struct Underlay {
    inner: Arc<UnderlayInner>,
}

struct UnderlayInner {
    ns: Netns,
    name: String,
    net: UnderlayNet,
    mtu: u32,
    ports: AtomicU32,
}

impl Underlay {
    fn create(lab: &Arc<LabInner>, name: &str, cidr: &str, mtu: u32) -> Result<Underlay> {
        check_name("underlay", name)?;
        let net = if cidr.contains(':') {
            let net: Ipv6Net = cidr.parse()?;
            ensure!(
                net.within(&UNDERLAY_RANGE6),
                "underlay {net} is outside {UNDERLAY_RANGE6}, the only IPv6 range the lab may use"
            );
            ensure!(
                mtu >= MIN_MTU6,
                "underlay MTU {mtu} is below {MIN_MTU6}, the IPv6 minimum"
            );
            UnderlayNet::V6(net)
        } else {
            let net: Ipv4Net = cidr.parse()?;
            ensure!(
                net.within(&UNDERLAY_RANGE),
                "underlay {net} is outside {UNDERLAY_RANGE} (RFC 2544), the only range the lab may use"
            );
            UnderlayNet::V4(net)
        };
        // 576: the smallest datagram every IPv4 host must accept (RFC 791); 9216: common
        // jumbo-frame maximum.
        ensure!(
            (576..=9216).contains(&mtu),
            "underlay MTU {mtu} is outside 576..=9216"
        );
        let ns = lab.add_netns(&format!("{}u-{name}", lab.prefix))?;
        if matches!(net, UnderlayNet::V6(_)) {
            ns.disable_dad()?;
        }
        let mtu_s = mtu.to_string();
        let mut bridge = vec![
            "link",
            "add",
            UNDERLAY_BRIDGE,
            "mtu",
            &mtu_s,
            "type",
            "bridge",
            "stp_state",
            "0",
        ];
        if matches!(net, UnderlayNet::V6(_)) {
            // Neighbour discovery is multicast: flood it rather than rely on MLD snooping.
            bridge.extend(["mcast_snooping", "0"]);
        }
        ns.ip(&bridge)?;
        ns.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
        Ok(Underlay {
            inner: Arc::new(UnderlayInner {
                ns,
                name: name.to_owned(),
                net,
                mtu,
                ports: AtomicU32::new(0),
            }),
        })
    }

    /// The underlay's name (as given to [`Lab::underlay`]).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The subnet, such as `198.18.0.0/16` (or `fd18:1::/64` for an IPv6 underlay).
    pub fn cidr(&self) -> String {
        self.inner.net.to_string()
    }

    /// Whether the underlay is IPv6-only.
    pub fn is_ipv6(&self) -> bool {
        matches!(self.inner.net, UnderlayNet::V6(_))
    }

    /// The MTU of the bridge and of every veth attached to it.
    pub fn mtu(&self) -> u32 {
        self.inner.mtu
    }

    fn name_of_ns(&self) -> &str {
        &self.inner.ns.name
    }
}

impl fmt::Debug for Underlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Underlay")
            .field("name", &self.inner.name)
            .field("netns", &self.inner.ns.name)
            .field("cidr", &self.inner.net)
            .field("mtu", &self.inner.mtu)
            .finish()
    }
}

impl Deref for Underlay {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.inner.ns
    }
}

/// A host: a network namespace on one or more underlays, with pods behind it and its own
/// `/var/run/wireguard` for processes started with private mounts.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

struct HostInner {
    ns: Netns,
    name: String,
    underlay_ip: Ipv4Addr,
    underlay_ip6: Option<Ipv6Addr>,
    pod_net: Ipv4Net,
    gateway: Ipv4Addr,
    pod_net6: Option<Ipv6Net>,
    gateway6: Option<Ipv6Addr>,
    dir: PathBuf,
    run_dir: PathBuf,
    state_dir: PathBuf,
    next_pod: AtomicU32,
    attachments: AtomicU32,
}

impl Host {
    /// The host's name (as given to [`Lab::add_host`]).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The address on the first underlay; 0.0.0.0 for a host from [`Lab::add_host_v6`].
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.inner.underlay_ip
    }

    /// The IPv6 address on the first underlay, for a host from [`Lab::add_host_v6`].
    pub fn underlay_ip6(&self) -> Option<Ipv6Addr> {
        self.inner.underlay_ip6
    }

    /// The address on the first underlay, whichever its family.
    pub fn underlay_addr(&self) -> IpAddr {
        match self.inner.underlay_ip6 {
            Some(ip6) => IpAddr::V6(ip6),
            None => IpAddr::V4(self.inner.underlay_ip),
        }
    }

    /// The pod CIDR, such as `10.1.0.0/24`.
    pub fn pod_cidr(&self) -> String {
        self.inner.pod_net.to_string()
    }

    /// The pods' gateway: the first address of the pod CIDR, on bridge `pods0`.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        self.inner.gateway
    }

    /// The IPv6 pod CIDR, such as `fd10:1::/64`, of a host from [`Lab::add_host_v6`].
    pub fn pod_cidr6(&self) -> Option<String> {
        self.inner.pod_net6.map(|net| net.to_string())
    }

    /// The pods' IPv6 gateway: the first address of the IPv6 pod CIDR, on bridge `pods0`.
    pub fn pod_gateway6(&self) -> Option<Ipv6Addr> {
        self.inner.gateway6
    }

    /// The host's private directory, `<lab dir>/<name>`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The directory bind-mounted over `/var/run/wireguard` for this host's processes.
    pub fn run_dir(&self) -> &Path {
        &self.inner.run_dir
    }

    /// A private directory (0700) for the host's keys and state.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Sends everything without a more specific route to `gateway` (an address on one of
    /// the host's underlays), e.g. a NAT gateway from [`Lab::add_nat_gateway`].
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn set_default_route(&self, gateway: Ipv4Addr) -> Result<()> {
        self.inner
            .ns
            .ip(&["route", "replace", "default", "via", &gateway.to_string()])?;
        Ok(())
    }

    /// Attaches the host to another underlay with address `ip`; returns the interface name
    /// in the host (`ul1`, `ul2`, ...; the first underlay is `ul0`).
    ///
    /// # Errors
    /// When `ip` is not a host address of `underlay`, or a command fails.
    pub fn attach(&self, underlay: &Underlay, ip: Ipv4Addr) -> Result<String> {
        self.attach_ip(underlay, IpAddr::V4(ip))
    }

    fn attach_ip(&self, underlay: &Underlay, ip: IpAddr) -> Result<String> {
        let net = underlay.inner.net;
        ensure!(
            net.is_host(ip),
            "{ip} is not a host address of underlay {} ({net})",
            underlay.inner.name
        );
        let iface = format!(
            "ul{}",
            self.inner.attachments.fetch_add(1, Ordering::Relaxed)
        );
        let port = format!("p{}", underlay.inner.ports.fetch_add(1, Ordering::Relaxed));
        let mtu = underlay.inner.mtu.to_string();
        let ns = &self.inner.ns;
        ns.ip(&[
            "link",
            "add",
            &iface,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "mtu",
            &mtu,
            "netns",
            underlay.name_of_ns(),
        ])?;
        underlay.ip(&["link", "set", &port, "master", UNDERLAY_BRIDGE, "up"])?;
        let addr = format!("{ip}/{}", net.len());
        let mut add = vec!["addr", "add", addr.as_str(), "dev", iface.as_str()];
        if ip.is_ipv6() {
            add.push("nodad");
        }
        ns.ip(&add)?;
        ns.ip(&["link", "set", &iface, "up"])?;
        ns.lab.register_address(ip, ns.name());
        Ok(iface)
    }

    /// Adds a pod: namespace `<prefix>p-<host>-<pod>`, a veth `eth0` holding the next free
    /// address of the pod CIDR (.2, .3, ...) with a default route via the host's gateway,
    /// its peer `vpN` on the host's pod bridge. On a host with an IPv6 pod CIDR the pod also
    /// gets the same-numbered address of it and an IPv6 default route via the host.
    ///
    /// # Errors
    /// When the name is bad, the pod CIDR is full, or a command fails.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        check_name("pod", name)?;
        let index = self.inner.next_pod.fetch_add(1, Ordering::Relaxed);
        let net = self.inner.pod_net;
        let ip = net
            .host(index)
            .filter(|ip| *ip != net.broadcast())
            .ok_or_else(|| anyhow!("pod CIDR {net} of host {} is full", self.inner.name))?;
        let ip6 =
            match self.inner.pod_net6 {
                Some(net6) => Some(net6.host(index).ok_or_else(|| {
                    anyhow!("pod CIDR {net6} of host {} is full", self.inner.name)
                })?),
                None => None,
            };
        let lab = &self.inner.ns.lab;
        let ns = lab.add_netns(&format!("{}p-{}-{name}", lab.prefix, self.inner.name))?;
        if ip6.is_some() {
            ns.disable_dad()?;
        }
        let host_end = format!("vp{index}");
        self.inner.ns.ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.inner
            .ns
            .ip(&["link", "set", &host_end, "master", POD_BRIDGE, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/{}", net.len), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.inner.gateway.to_string(),
        ])?;
        lab.register_address(ip, ns.name());
        if let (Some(ip6), Some(net6), Some(gateway6)) =
            (ip6, self.inner.pod_net6, self.inner.gateway6)
        {
            ns.ip(&[
                "addr",
                "add",
                &format!("{ip6}/{}", net6.len),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6.to_string(),
            ])?;
            lab.register_address(ip6, ns.name());
        }
        Ok(Pod {
            ns,
            name: name.to_owned(),
            host: self.inner.name.clone(),
            ip,
            gateway: self.inner.gateway,
            ip6,
        })
    }

    /// Adds (or replaces) a route in the host: `ip route replace <cidr> via <gateway>`.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn add_route_via(&self, cidr: &str, gateway: Ipv4Addr) -> Result<()> {
        self.inner
            .ns
            .ip(&["route", "replace", cidr, "via", &gateway.to_string()])?;
        Ok(())
    }

    /// Starts the agent binary ([`agent_binary`]) with [`Host::spawn_in_private_mounts`].
    ///
    /// # Errors
    /// As [`agent_binary`] and [`Host::spawn_in_private_mounts`].
    pub fn spawn_agent(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let agent = agent_binary()?;
        self.spawn_in_private_mounts(path_str(&agent)?, args, env)
    }

    /// Starts `program args...` in the host's network namespace and in a private mount
    /// namespace where [`Host::run_dir`] is bind-mounted over `/var/run/wireguard`; returns
    /// once that mount is in place, so `nsenter -t <pid> -m` sees it.
    ///
    /// # Errors
    /// When it cannot start, exits before the mount is in place, or the mount does not
    /// appear within 10 s.
    pub fn spawn_in_private_mounts(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let lab = &self.inner.ns.lab;
        let mut command = self.private_mounts_command(program, args)?;
        command.envs(env.iter().copied());
        let proc = lab.spawn(command, &label(program, &self.inner.ns.name))?;
        self.wait_for_private_mount(&proc)?;
        Ok(proc)
    }

    /// Runs `args` to completion in the host's network namespace and a fresh private mount
    /// namespace with the host's `/var/run/wireguard`: the same view a process from
    /// [`Host::spawn_in_private_mounts`] has.
    ///
    /// # Errors
    /// When the command cannot start or times out (a non-zero exit is returned, not an error).
    pub fn exec_private_mounts(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("no command to run"))?;
        self.inner.ns.lab.check_alive()?;
        run_with_timeout(self.private_mounts_command(program, rest)?, EXEC_TIMEOUT)
            .with_context(|| format!("in host {}: {}", self.inner.name, args.join(" ")))
    }

    /// Runs the stock `wg` tool with `args` in the host's network namespace and its own
    /// `/var/run/wireguard`, so it talks to the UAPI sockets of this host's processes only;
    /// returns stdout.
    ///
    /// # Errors
    /// When `wg` fails or exits non-zero (with its output).
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        ok_stdout(&self.exec_private_mounts(&full)?, &full)
    }

    /// Runs `args` in the mount and network namespaces of process `pid`
    /// (`nsenter -t <pid> -m -n`), such as an agent from [`Host::spawn_agent`].
    ///
    /// # Errors
    /// When the command cannot start or times out (a non-zero exit is returned, not an error).
    pub fn exec_in_agent_ns(&self, pid: u32, args: &[&str]) -> Result<Output> {
        self.inner.ns.lab.check_alive()?;
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &pid.to_string(), "-m", "-n", "--"])
            .args(args);
        run_with_timeout(command, EXEC_TIMEOUT)
            .with_context(|| format!("in the namespaces of pid {pid}: {}", args.join(" ")))
    }

    /// Runs `wg args...` in the mount and network namespaces of process `pid`; returns stdout.
    ///
    /// # Errors
    /// When `wg` fails or exits non-zero (with its output).
    pub fn wg_in(&self, pid: u32, args: &[&str]) -> Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        ok_stdout(&self.exec_in_agent_ns(pid, &full)?, &full)
    }

    fn private_mounts_command(&self, program: &str, args: &[&str]) -> Result<Command> {
        let mountpoint = wireguard_mountpoint()?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.inner.ns.name])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", PRIVATE_MOUNTS_SCRIPT, "wm-private-mounts"])
            .arg(&self.inner.run_dir)
            .arg(&mountpoint)
            .arg(program)
            .args(args);
        Ok(command)
    }

    /// Waits until the process sees the host's run dir at `/var/run/wireguard`: looked up
    /// through `/proc/<pid>/root`, which resolves paths in the process's mount namespace.
    fn wait_for_private_mount(&self, proc: &Proc) -> Result<()> {
        let want = fs::metadata(&self.inner.run_dir)
            .with_context(|| format!("stat {}", self.inner.run_dir.display()))?;
        let seen = format!(
            "/proc/{}/root{}",
            proc.pid(),
            wireguard_mountpoint()?.display()
        );
        let deadline = Instant::now() + MOUNT_READY_TIMEOUT;
        loop {
            if !proc.is_running() {
                bail!(
                    "{} exited before its private mounts were ready\nstderr:\n{}",
                    proc.label(),
                    proc.stderr()
                );
            }
            if let Ok(meta) = fs::metadata(&seen)
                && meta.dev() == want.dev()
                && meta.ino() == want.ino()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} has no private /var/run/wireguard after {MOUNT_READY_TIMEOUT:?}\n\
                     stderr:\n{}",
                    proc.label(),
                    proc.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Deref for Host {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.inner.ns
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.inner.name)
            .field("netns", &self.inner.ns.name)
            .field("underlay_ip", &self.inner.underlay_ip)
            .field("underlay_ip6", &self.inner.underlay_ip6)
            .field("pod_cidr", &self.inner.pod_net)
            .field("pod_cidr6", &self.inner.pod_net6)
            .finish()
    }
}

/// A pod: a network namespace behind a host, with one address from the host's pod CIDR
/// (and one from its IPv6 pod CIDR, if it has one).
#[derive(Clone)]
pub struct Pod {
    ns: Netns,
    name: String,
    host: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
}

impl Pod {
    /// The pod's name (as given to [`Host::add_pod`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the host it is behind.
    pub fn host_name(&self) -> &str {
        &self.host
    }

    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its default gateway, the host's pod bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Its IPv6 address, on a host with an IPv6 pod CIDR ([`Lab::add_host_v6`]).
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }
}

impl Deref for Pod {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl fmt::Debug for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.name)
            .field("netns", &self.ns.name)
            .field("ip", &self.ip)
            .field("ip6", &self.ip6)
            .finish()
    }
}

/// The outcome of a [`transfer`]: both sides agreed on the byte count and SHA-256.
#[derive(Debug, Clone)]
pub struct TransferReport {
    /// Bytes received (equal to bytes sent).
    pub bytes: u64,
    /// Their SHA-256 in lowercase hex.
    pub sha256: String,
    /// Seed of the byte stream; [`crate::xfer::expected`] recomputes the hash offline.
    pub seed: u64,
    /// From starting the sender until the receiver had everything.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Goodput in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Sends `bytes` checksummed bytes over TCP from `from` to `to_ip`, received in the lab
/// namespace that holds `to_ip`; see [`transfer_between`].
///
/// # Errors
/// When no namespace, or more than one, of the lab holds `to_ip`, or as [`transfer_between`].
pub fn transfer(from: &Netns, to_ip: impl Into<IpAddr>, bytes: u64) -> Result<TransferReport> {
    let to_ip = to_ip.into();
    let to = from.lab.owner_of(to_ip)?;
    transfer_between(from, &to, to_ip, bytes)
}

/// Runs `wm-xfer recv` on `to_ip` in `to` and `wm-xfer send` in `from`, and checks both saw
/// the same byte count (`bytes`) and SHA-256. The timeout allows 30 s plus 1 MiB/s.
///
/// # Errors
/// When either side fails or times out, or they disagree; the error holds both sides' output.
pub fn transfer_between(
    from: &Netns,
    to: &Netns,
    to_ip: impl Into<IpAddr>,
    bytes: u64,
) -> Result<TransferReport> {
    let to_ip = to_ip.into();
    let xfer = xfer_binary()?;
    let xfer = path_str(&xfer)?;
    let n = from.lab.next_counter();
    // A fresh port per transfer, so a listener never meets the TIME_WAIT of the last one.
    let port = u16::try_from(40_000 + n % 20_000).unwrap_or(40_000);
    let seed = u64::from(n) + 1;
    let seed_s = seed.to_string();
    let listen = SocketAddr::new(to_ip, port).to_string();
    let timeout = TRANSFER_BASE_TIMEOUT + Duration::from_secs(bytes / TRANSFER_FLOOR_BYTES_PER_SEC);
    let secs = timeout.as_secs().to_string();
    let bytes_s = bytes.to_string();

    let receiver = to.spawn(&[xfer, "recv", "--listen", &listen, "--timeout", &secs])?;
    let start = Instant::now();
    let sent = from.exec_timeout(
        &[
            xfer,
            "send",
            "--to",
            &listen,
            "--bytes",
            &bytes_s,
            "--seed",
            &seed_s,
            "--timeout",
            &secs,
        ],
        timeout + Duration::from_secs(5),
    );
    let sent = match sent {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            let received = receiver.stop()?;
            bail!(
                "transfer {} -> {listen} failed\nsender: {}\nreceiver: {}",
                from.name,
                describe(&output),
                describe(&received)
            );
        }
        Err(e) => {
            let received = receiver.stop()?;
            return Err(e.context(format!(
                "transfer {} -> {listen}; receiver: {}",
                from.name,
                describe(&received)
            )));
        }
    };
    let received = receiver
        .wait_with_timeout(Duration::from_secs(10))
        .with_context(|| {
            format!(
                "transfer {} -> {listen}: sender done ({}) but receiver not",
                from.name,
                describe(&sent)
            )
        })?;
    let elapsed = start.elapsed();
    let both = || {
        format!(
            "sender: {}\nreceiver: {}",
            describe(&sent),
            describe(&received)
        )
    };
    ensure!(
        received.status.success(),
        "transfer {} -> {listen}: receiver failed\n{}",
        from.name,
        both()
    );
    let parse = |output: &Output| -> Result<Summary> {
        String::from_utf8_lossy(&output.stdout).trim().parse()
    };
    let (sent_summary, received_summary) = match (parse(&sent), parse(&received)) {
        (Ok(s), Ok(r)) => (s, r),
        (s, r) => bail!(
            "transfer {} -> {listen}: unreadable summary ({:?}, {:?})\n{}",
            from.name,
            s.err(),
            r.err(),
            both()
        ),
    };
    ensure!(
        sent_summary == received_summary && received_summary.bytes == bytes,
        "transfer {} -> {listen}: sent {sent_summary}, received {received_summary} \
         (wanted {bytes} bytes)\n{}",
        from.name,
        both()
    );
    Ok(TransferReport {
        bytes,
        sha256: received_summary.sha256,
        seed,
        elapsed,
    })
}

/// Pings `to` (IPv4 or IPv6) from `from` until `count` replies came back (0.2 s apart),
/// within `count + 5` seconds.
///
/// # Errors
/// When fewer replies came back in time (with ping's output).
pub fn ping(from: &Netns, to: impl Into<IpAddr>, count: u32) -> Result<()> {
    let to = to.into();
    let count_s = count.to_string();
    let deadline = (count + 5).to_string();
    let target = to.to_string();
    let args = [
        "ping", "-n", "-c", &count_s, "-i", "0.2", "-w", &deadline, &target,
    ];
    let output = from.exec_timeout(&args, Duration::from_secs(u64::from(count) + 15))?;
    ensure!(
        output.status.success(),
        "ping {to} from {}: {}",
        from.name,
        describe(&output)
    );
    Ok(())
}

/// Checks that the process runs as root (effective UID 0).
///
/// # Errors
/// When it does not, saying how to run the lab tests.
pub fn require_root() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    ensure!(
        euid == "0",
        "the Wiremesh lab creates network and mount namespaces and must run as root \
         (effective UID is {euid}); run e.g. `sudo -E cargo test -p wiremesh-lab`"
    );
    Ok(())
}

/// Checks that every tool the lab runs is on `PATH`.
///
/// # Errors
/// When some are missing, naming them and the packages to install.
pub fn require_tools() -> Result<()> {
    let missing: Vec<_> = REQUIRED_TOOLS
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let tools: Vec<_> = missing.iter().map(|(t, _)| *t).collect();
    let mut packages: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
    packages.dedup();
    bail!(
        "the lab needs {} on PATH; install them with `apt-get install {}`",
        tools.join(", "),
        packages.join(" ")
    )
}

/// Checks that one more tool (such as `wireguard-go` or `iperf3`) is on `PATH`.
///
/// # Errors
/// When it is not, naming the package.
pub fn require_tool(tool: &str, package: &str) -> Result<PathBuf> {
    find_in_path(tool).ok_or_else(|| {
        anyhow!("{tool} is not on PATH; install it with `apt-get install {package}`")
    })
}

/// Where the `wiremesh-agent` binary is: `$WIREMESH_AGENT_BIN`, else next to the running
/// executable (`target/<profile>/` or its parent, for test binaries in `deps/`).
///
/// # Errors
/// When it is not there, saying to run `cargo build -p wiremesh-agent`.
pub fn agent_binary() -> Result<PathBuf> {
    find_binary(
        "wiremesh-agent",
        "WIREMESH_AGENT_BIN",
        "cargo build -p wiremesh-agent",
    )
}

/// Where the `wm-xfer` binary is, found like [`agent_binary`] (`$WIREMESH_XFER_BIN`).
///
/// # Errors
/// When it is not there, saying how to build it.
pub fn xfer_binary() -> Result<PathBuf> {
    find_binary(
        "wm-xfer",
        "WIREMESH_XFER_BIN",
        "cargo build -p wiremesh-lab --bin wm-xfer",
    )
}

/// Removes every lab resource; runs when the [`Lab`] is dropped, panics included.
struct Teardown(Arc<LabInner>);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

pub(crate) struct LabInner {
    prefix: String,
    dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Arc<ProcSlot>>>,
    addresses: Mutex<BTreeMap<IpAddr, Vec<String>>>,
    counter: AtomicU32,
    torn_down: AtomicBool,
}

impl LabInner {
    fn check_alive(&self) -> Result<()> {
        ensure!(
            !self.torn_down.load(Ordering::SeqCst),
            "lab {} was already torn down",
            self.prefix
        );
        Ok(())
    }

    fn next_counter(&self) -> u32 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn add_netns(self: &Arc<Self>, name: &str) -> Result<Netns> {
        self.check_alive()?;
        ensure!(
            name.starts_with(&self.prefix),
            "namespace {name} lacks the lab prefix {}",
            self.prefix
        );
        ip(&["netns", "add", name])?;
        lock(&self.namespaces).push(name.to_owned());
        let ns = Netns {
            name: name.to_owned(),
            lab: self.clone(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn spawn(&self, command: Command, label: &str) -> Result<Proc> {
        self.check_alive()?;
        let logs = self.dir.join("logs");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .with_context(|| format!("creating {}", logs.display()))?;
        let base = logs.join(format!("{:03}-{label}", self.next_counter()));
        let (proc, slot) = ProcSlot::spawn(command, label.to_owned(), &base)?;
        lock(&self.procs).push(slot);
        Ok(proc)
    }

    fn register_address(&self, ip: impl Into<IpAddr>, ns: &str) {
        lock(&self.addresses)
            .entry(ip.into())
            .or_default()
            .push(ns.to_owned());
    }

    fn owner_of(self: &Arc<Self>, ip: IpAddr) -> Result<Netns> {
        let addresses = lock(&self.addresses);
        match addresses.get(&ip).map(Vec::as_slice) {
            Some([name]) => Ok(Netns {
                name: name.clone(),
                lab: self.clone(),
            }),
            Some(names) if names.len() > 1 => bail!(
                "{ip} is in several namespaces ({}); use transfer_between",
                names.join(", ")
            ),
            _ => bail!("no namespace of lab {} has address {ip}", self.prefix),
        }
    }

    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let procs = lock(&self.procs).clone();
        if thread::panicking() {
            dump_logs(&procs);
        }
        stop_all(&procs);
        let namespaces = lock(&self.namespaces).clone();
        for name in namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "delete", name]) {
                eprintln!("lab {}: {e:#}", self.prefix);
            }
        }
        if std::env::var_os("WIREMESH_LAB_KEEP").is_some() {
            eprintln!("lab {}: keeping {}", self.prefix, self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lab {}: removing {}: {e}", self.prefix, self.dir.display());
        }
    }
}

/// SIGTERM to every live process at once, one shared grace period, then SIGKILL.
fn stop_all(procs: &[Arc<ProcSlot>]) {
    let running: Vec<_> = procs.iter().filter(|p| p.send_term()).collect();
    let deadline = Instant::now() + crate::process::STOP_GRACE;
    while Instant::now() < deadline && running.iter().any(|p| !p.has_exited()) {
        thread::sleep(Duration::from_millis(10));
    }
    for p in procs {
        if let Err(e) = p.kill_and_reap() {
            eprintln!("lab: stopping {} (pid {}): {e:#}", p.label(), p.pid());
        }
    }
}

fn dump_logs(procs: &[Arc<ProcSlot>]) {
    for p in procs {
        eprintln!(
            "---- {} (pid {}) stdout, last lines ----\n{}\n---- stderr ----\n{}",
            p.label(),
            p.pid(),
            p.stdout_tail(30),
            p.stderr_tail(60)
        );
    }
}

/// An IPv4 prefix with host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ipv4Net {
    network: Ipv4Addr,
    len: u8,
}

impl Ipv4Net {
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.network)
    }

    fn within(&self, outer: &Ipv4Net) -> bool {
        self.len >= outer.len && outer.contains(self.network)
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask(self.len))
    }

    /// The `n`th address of the prefix, if inside it.
    fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from(u32::from(self.network).checked_add(n)?);
        self.contains(ip).then_some(ip)
    }
}

impl FromStr for Ipv4Net {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("{s:?} is not an IPv4 CIDR like 10.1.0.0/24"))?;
        let addr: Ipv4Addr = addr.parse().with_context(|| format!("address in {s:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("prefix length in {s:?}"))?;
        ensure!(len <= 32, "prefix length {len} in {s:?} is longer than 32");
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// An IPv6 prefix with host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ipv6Net {
    network: Ipv6Addr,
    len: u8,
}

impl Ipv6Net {
    fn mask(len: u8) -> u128 {
        u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }

    fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask(self.len) == u128::from(self.network)
    }

    fn within(&self, outer: &Ipv6Net) -> bool {
        self.len >= outer.len && outer.contains(self.network)
    }

    /// The `n`th address of the prefix, if inside it.
    fn host(&self, n: u32) -> Option<Ipv6Addr> {
        let ip = Ipv6Addr::from(u128::from(self.network).checked_add(u128::from(n))?);
        self.contains(ip).then_some(ip)
    }
}

impl FromStr for Ipv6Net {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("{s:?} is not an IPv6 CIDR like fd10:1::/64"))?;
        let addr: Ipv6Addr = addr.parse().with_context(|| format!("address in {s:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("prefix length in {s:?}"))?;
        ensure!(
            len <= 128,
            "prefix length {len} in {s:?} is longer than 128"
        );
        Ok(Self {
            network: Ipv6Addr::from(u128::from(addr) & Self::mask(len)),
            len,
        })
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// The prefix of an underlay: IPv4, or IPv6 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UnderlayNet {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl UnderlayNet {
    fn len(&self) -> u8 {
        match self {
            UnderlayNet::V4(net) => net.len,
            UnderlayNet::V6(net) => net.len,
        }
    }

    /// Whether `ip` may be a host's address: inside the prefix, of its family, and neither
    /// the network address nor (IPv4) the broadcast address.
    fn is_host(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (UnderlayNet::V4(net), IpAddr::V4(ip)) => {
                net.contains(ip) && ip != net.network && ip != net.broadcast()
            }
            (UnderlayNet::V6(net), IpAddr::V6(ip)) => net.contains(ip) && ip != net.network,
            _ => false,
        }
    }
}

impl fmt::Display for UnderlayNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnderlayNet::V4(net) => net.fmt(f),
            UnderlayNet::V6(net) => net.fmt(f),
        }
    }
}

/// Picks `wm` + 4 random hex digits + `-` and claims `/tmp/wmXXXX` for it; retries on the
/// rare clash with a directory or namespace already there.
fn unique_prefix() -> Result<(String, PathBuf)> {
    let existing = ip(&["netns", "list"])?;
    for _ in 0..16 {
        let stem = format!("wm{:04x}", OsRng.next_u32() & 0xffff);
        let prefix = format!("{stem}-");
        if existing.lines().any(|l| l.starts_with(&prefix)) {
            continue;
        }
        let dir = std::env::temp_dir().join(&stem);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok((prefix, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free lab prefix after 16 tries; remove stale /tmp/wm* directories and namespaces")
}

fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}

/// Makes sure `/var/run/wireguard` exists in the root mount namespace and returns its real
/// path (`/var/run` is usually a symlink to `/run`). It is left in place afterwards: another
/// lab running in parallel may be about to mount over it.
fn wireguard_mountpoint() -> Result<PathBuf> {
    fs::create_dir_all(WIREGUARD_RUN_DIR)
        .with_context(|| format!("creating the mount point {WIREGUARD_RUN_DIR}"))?;
    fs::canonicalize(WIREGUARD_RUN_DIR).with_context(|| format!("resolving {WIREGUARD_RUN_DIR}"))
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    ensure!(
        (1..=24).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "{kind} name {name:?} must be 1 to 24 of [A-Za-z0-9_-]"
    );
    Ok(())
}

/// Runs `ip args...` in the root namespace, returning stdout.
fn ip(args: &[&str]) -> Result<String> {
    let mut command = Command::new("ip");
    command.args(args);
    let output = run_with_timeout(command, EXEC_TIMEOUT)?;
    ensure!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        describe(&output)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ok_stdout(output: &Output, args: &[&str]) -> Result<String> {
    ensure!(
        output.status.success(),
        "{}: {}",
        args.join(" "),
        describe(output)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn find_binary(name: &str, env_var: &str, build_hint: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "{env_var} is {}, which is not a file",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "{name} not found (looked at {}); run `{build_hint}` with the same profile, \
                 or set {env_var}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

fn label(program: &str, ns: &str) -> String {
    let base = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    format!("{base}@{ns}")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Teardown must still work after a panic elsewhere poisoned a lock.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_clears_host_bits() {
        let net: Ipv4Net = "10.1.2.3/24".parse().unwrap();
        assert_eq!(net.to_string(), "10.1.2.0/24");
        assert_eq!(net.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(net.host(1), Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(net.host(256), None);
    }

    #[test]
    fn only_benchmarking_range_is_an_underlay() {
        let ok: Ipv4Net = "198.19.4.0/24".parse().unwrap();
        let bad: Ipv4Net = "192.168.0.0/16".parse().unwrap();
        let too_wide: Ipv4Net = "198.16.0.0/12".parse().unwrap();
        assert!(ok.within(&UNDERLAY_RANGE));
        assert!(!bad.within(&UNDERLAY_RANGE));
        assert!(!too_wide.within(&UNDERLAY_RANGE));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert!("10.0.0.0".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("x/8".parse::<Ipv4Net>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().len, 0);
    }

    #[test]
    fn ipv6_prefixes_parse_and_stay_in_their_ranges() {
        let net: Ipv6Net = "fd10:1::5/64".parse().unwrap();
        assert_eq!(net.to_string(), "fd10:1::/64");
        assert_eq!(net.host(1), Some("fd10:1::1".parse().unwrap()));
        assert!(net.within(&POD_RANGE6));
        assert!(!net.within(&UNDERLAY_RANGE6));
        let tiny: Ipv6Net = "fd10:1::/127".parse().unwrap();
        assert_eq!(tiny.host(2), None);
        let ul: Ipv6Net = "fd18:1::/64".parse().unwrap();
        assert!(ul.within(&UNDERLAY_RANGE6));
        assert!(
            !"2001:db8::/64"
                .parse::<Ipv6Net>()
                .unwrap()
                .within(&UNDERLAY_RANGE6)
        );
        assert!(
            !"fd00::/8"
                .parse::<Ipv6Net>()
                .unwrap()
                .within(&UNDERLAY_RANGE6)
        );
        assert!("fd10::/129".parse::<Ipv6Net>().is_err());
        assert_eq!("::/0".parse::<Ipv6Net>().unwrap().len, 0);
        let underlay = UnderlayNet::V6(ul);
        assert!(underlay.is_host("fd18:1::2".parse().unwrap()));
        assert!(!underlay.is_host("fd18:1::".parse().unwrap()));
        assert!(!underlay.is_host("198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("host", "a-1_b").is_ok());
        assert!(check_name("host", "").is_err());
        assert!(check_name("host", "a b").is_err());
        assert!(check_name("host", "a/b").is_err());
    }
}
