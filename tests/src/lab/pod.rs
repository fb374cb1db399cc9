//! Pods: a namespace behind a host, with addresses from the host's pod CIDRs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::sync::atomic::Ordering;

use anyhow::{Result, anyhow};

use super::host::POD_BRIDGE;
use super::net::LabPrefix;
use super::{Host, Netns, check_name};

impl Host {
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
            .nth_v4(index)
            .filter(|ip| IpAddr::V4(*ip) != net.last())
            .ok_or_else(|| anyhow!("pod CIDR {net} of host {} is full", self.inner.name))?;
        let ip6 =
            match self.inner.pod_net6 {
                Some(net6) => Some(net6.nth_v6(index).ok_or_else(|| {
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
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{}", net.prefix_len()),
            "dev",
            "eth0",
        ])?;
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
                &format!("{ip6}/{}", net6.prefix_len()),
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
