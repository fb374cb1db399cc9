//! Underlays: a namespace holding a Linux bridge that hosts attach to.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use anyhow::{Result, ensure};

use wiremesh_proto::IpCidr;

use super::net::{LabPrefix, parse_v4, parse_v6, underlay_range, underlay_range6};
use super::{LabInner, Netns, check_name};

/// The smallest MTU of a link carrying IPv6 (RFC 8200).
const MIN_MTU6: u32 = 1280;

/// The bridge in an underlay's namespace that hosts' veths attach to.
pub(super) const UNDERLAY_BRIDGE: &str = "br0";

/// An underlay network: a namespace holding a Linux bridge that hosts attach to.
#[derive(Clone)]
pub struct Underlay {
    pub(super) inner: Arc<UnderlayInner>,
}

pub(super) struct UnderlayInner {
    pub(super) ns: Netns,
    pub(super) name: String,
    pub(super) net: IpCidr,
    pub(super) mtu: u32,
    pub(super) ports: AtomicU32,
}

impl Underlay {
    pub(super) fn create(
        lab: &Arc<LabInner>,
        name: &str,
        cidr: &str,
        mtu: u32,
    ) -> Result<Underlay> {
        check_name("underlay", name)?;
        let net = if cidr.contains(':') {
            let net = parse_v6(cidr)?;
            ensure!(
                net.within(&underlay_range6()),
                "underlay {net} is outside {}, the only IPv6 range the lab may use",
                underlay_range6()
            );
            ensure!(
                mtu >= MIN_MTU6,
                "underlay MTU {mtu} is below {MIN_MTU6}, the IPv6 minimum"
            );
            net
        } else {
            let net = parse_v4(cidr)?;
            ensure!(
                net.within(&underlay_range()),
                "underlay {net} is outside {} (RFC 2544), the only range the lab may use",
                underlay_range()
            );
            net
        };
        // 576: the smallest datagram every IPv4 host must accept (RFC 791); 9216: common
        // jumbo-frame maximum.
        ensure!(
            (576..=9216).contains(&mtu),
            "underlay MTU {mtu} is outside 576..=9216"
        );
        let ns = lab.add_netns(&format!("{}u-{name}", lab.prefix))?;
        if net.addr().is_ipv6() {
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
        if net.addr().is_ipv6() {
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
        self.inner.net.addr().is_ipv6()
    }

    /// The MTU of the bridge and of every veth attached to it.
    pub fn mtu(&self) -> u32 {
        self.inner.mtu
    }

    pub(super) fn name_of_ns(&self) -> &str {
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
