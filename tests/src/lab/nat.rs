//! NAT gateways: a host between a private underlay and the default one that masquerades.

use std::fs;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use super::{Host, Lab, Underlay};

impl Lab {
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
}
