//! NAT gateways: a host between a private underlay and the default one that masquerades.

use std::fs;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use super::{Host, Lab, Underlay};

/// How a NAT gateway maps the source ports of connections from behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatMapping {
    /// Keeps a connection's source port where it can (plain `masquerade`), as most cloud
    /// NATs and home routers do: hole punching works.
    PortPreserving,
    /// A random source port for every connection (`masquerade fully-random`).
    Symmetric,
}

impl Lab {
    /// A NAT gateway between `private` and the default underlay, like a cloud NAT or a
    /// home router: a host `name` with `private_ip` on `private` and `public_ip` on the
    /// default underlay, forwarding, masquerading everything that leaves on the public
    /// side (nftables), and dropping every connection that starts on the public side. Hosts
    /// behind it get it as their default route with [`Host::set_default_route`].
    /// `pod_cidr` is the (unused) pod CIDR every lab host has.
    ///
    /// With [`NatMapping::Symmetric`] the NAT picks a random source port for every
    /// connection (`masquerade fully-random`): the address a peer observes is of no use to
    /// anyone else, so no hole can be punched through it.
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
        mapping: NatMapping,
    ) -> Result<Host> {
        let router = self.add_host_on(private, name, private_ip, pod_cidr)?;
        let flags = match mapping {
            NatMapping::PortPreserving => "",
            NatMapping::Symmetric => " fully-random",
        };
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
}
