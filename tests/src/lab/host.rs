//! Hosts: a namespace on one or more underlays, with a bridge for its pods.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, anyhow, ensure};

use wiremesh_proto::IpCidr;

use super::net::{LabPrefix, parse_v4, parse_v6, pod_range, pod_range6};
use super::underlay::UNDERLAY_BRIDGE;
use super::{Lab, Netns, Underlay, check_name};

/// The bridge in a host that its pods' veths attach to.
pub(super) const POD_BRIDGE: &str = "pods0";

impl Lab {
    /// Adds a host on the default underlay; see [`Lab::add_host_on`].
    ///
    /// # Errors
    /// As [`Lab::add_host_on`].
    pub fn add_host(&self, name: &str, underlay_ip: Ipv4Addr, pod_cidr: &str) -> Result<Host> {
        self.add_host_on(&self.underlay, name, underlay_ip, pod_cidr)
    }

    /// Adds a host: namespace `<prefix>h-<name>` with lo up and IPv4 forwarding on, a veth
    /// `ul0` into `underlay`'s bridge with `underlay_ip`, a bridge `pods0` holding the first
    /// address of `pod_cidr` as the pods' gateway (its MAC fixed: 02:00 and that address),
    /// and private directories
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
        pod_net6: Option<IpCidr>,
    ) -> Result<Host> {
        check_name("host", name)?;
        let pod_net = parse_v4(pod_cidr)?;
        ensure!(
            pod_net.within(&pod_range()),
            "pod CIDR {pod_net} is outside {}, the only range pods may use",
            pod_range()
        );
        ensure!(
            pod_net.prefix_len() <= 30,
            "pod CIDR {pod_net} has no room for pods"
        );
        let gateway = pod_net
            .nth_v4(1)
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
        // A fixed MAC: a bridge without one takes its ports' lowest, so a pod added later
        // whose veth has a lower (random) MAC would change the pods' gateway's MAC, and a
        // pod that cached the old one would have its frames dropped as "other host" until
        // its neighbour entry re-resolved (up to a minute).
        let [g0, g1, g2, g3] = gateway.octets();
        let mac = format!("02:00:{g0:02x}:{g1:02x}:{g2:02x}:{g3:02x}");
        ns.ip(&["link", "add", POD_BRIDGE, "address", &mac, "type", "bridge"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{gateway}/{}", pod_net.prefix_len()),
            "dev",
            POD_BRIDGE,
        ])?;
        self.inner.register_address(gateway, ns.name());
        let gateway6 = match pod_net6 {
            Some(net6) => {
                let gateway6 = net6
                    .nth_v6(1)
                    .ok_or_else(|| anyhow!("pod CIDR {net6} has no gateway address"))?;
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{gateway6}/{}", net6.prefix_len()),
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
        let pod_net6 = parse_v6(pod_cidr6)?;
        ensure!(
            pod_net6.within(&pod_range6()),
            "IPv6 pod CIDR {pod_net6} is outside {}, the only range pods may use",
            pod_range6()
        );
        ensure!(
            pod_net6.prefix_len() <= 126,
            "IPv6 pod CIDR {pod_net6} has no room for pods"
        );
        self.create_host(underlay, name, underlay_ip, pod_cidr, Some(pod_net6))
    }
}

/// A host: a network namespace on one or more underlays, with pods behind it and its own
/// `/var/run/wireguard` for processes started with private mounts.
#[derive(Clone)]
pub struct Host {
    pub(super) inner: Arc<HostInner>,
}

pub(super) struct HostInner {
    pub(super) ns: Netns,
    pub(super) name: String,
    pub(super) underlay_ip: Ipv4Addr,
    pub(super) underlay_ip6: Option<Ipv6Addr>,
    pub(super) pod_net: IpCidr,
    pub(super) gateway: Ipv4Addr,
    pub(super) pod_net6: Option<IpCidr>,
    pub(super) gateway6: Option<Ipv6Addr>,
    pub(super) dir: PathBuf,
    pub(super) run_dir: PathBuf,
    pub(super) state_dir: PathBuf,
    pub(super) next_pod: AtomicU32,
    pub(super) attachments: AtomicU32,
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
        let addr = format!("{ip}/{}", net.prefix_len());
        let mut add = vec!["addr", "add", addr.as_str(), "dev", iface.as_str()];
        if ip.is_ipv6() {
            add.push("nodad");
        }
        ns.ip(&add)?;
        ns.ip(&["link", "set", &iface, "up"])?;
        ns.lab.register_address(ip, ns.name());
        Ok(iface)
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

fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}
