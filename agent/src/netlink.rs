//! Everything the agent changes in the kernel's network state, over rtnetlink.
//!
//! Routes are reconciled, never flushed: [`RouteReconciler`] adds what is missing and deletes
//! what is extra, one route at a time, and only ever touches routes stamped with
//! [`ROUTE_PROTOCOL`], so the kernel's own prefix routes and anyone else's stay put.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
    RouteScope, RouteType,
};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use tokio::task::JoinHandle;
use wiremesh_proto::{InterfaceAddress, IpCidr};

use wiremesh_core::mtu::UnderlayPath;

/// The `rtm_protocol` value on every route Wiremesh installs (`ip route show proto 0x57`).
///
/// 0x57 is ASCII `W`. It is not assigned in `<linux/rtnetlink.h>` nor in iproute2's
/// `rt_protos`; RTPROT_STATIC (4) would collide with routes NetworkManager and admins add.
pub const ROUTE_PROTOCOL: u8 = 0x57;

/// The `rtm_protocol` value on the fail-closed routes (`ip route show proto 0x58`), see
/// [`crate::failclosed`].
///
/// Distinct from [`ROUTE_PROTOCOL`] so that the tunnel routes' reconciler, and its cleanup
/// on shutdown, never see them. 0x58 (ASCII `X`, next to ours) is not assigned in
/// `<linux/rtnetlink.h>` nor in iproute2's `rt_protos` either.
pub const FAIL_CLOSED_PROTOCOL: u8 = 0x58;

/// The metric of the fail-closed routes: the largest a route can have, less our 0x57 to
/// recognise it.
///
/// The tunnel routes have metric 0 (IPv4) or 1024 (IPv6: the kernel's default when none is
/// given), and the route with the lowest metric for a prefix wins: while a tunnel route
/// exists it carries the traffic; when it is gone (agent stopped, crashed, TUN device
/// deleted by the kernel, peer removed) the fail-closed route for the same prefix is next.
pub const FAIL_CLOSED_METRIC: u32 = u32::MAX - 0x57;

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;

/// Where a [`RouteReconciler`] keeps its routes: the interface, the table, and the
/// preferred sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    /// The interface index.
    pub index: u32,
    /// The routing table ([`MAIN_TABLE`] in every mode but a standalone `Table = <n>`).
    pub table: u32,
    /// Preferred source addresses: a route gets the first of its family (`src` in
    /// `ip route`); none lets the kernel choose.
    pub sources: Vec<IpAddr>,
}

impl RouteTarget {
    /// Routes through `index` in the main table, no preferred source.
    pub fn main(index: u32) -> Self {
        Self {
            index,
            table: MAIN_TABLE,
            sources: Vec::new(),
        }
    }

    /// The preferred source of the route to `dst`.
    fn source(&self, dst: IpCidr) -> Option<IpAddr> {
        self.sources
            .iter()
            .copied()
            .find(|s| s.is_ipv4() == dst.addr().is_ipv4())
    }
}

/// A connection to the kernel's routing netlink socket.
///
/// The connection task runs on the runtime that called [`Netlink::new`] and stops when this
/// value is dropped.
#[derive(Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    connection: JoinHandle<()>,
}

impl Netlink {
    /// Opens the rtnetlink socket in the calling thread's network namespace and spawns its
    /// connection task with [`tokio::spawn`].
    ///
    /// # Errors
    /// [`NetlinkError::Connect`] when the socket cannot be opened.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn new() -> Result<Self, NetlinkError> {
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Connect { source })?;
        let connection = tokio::spawn(connection);
        Ok(Self { handle, connection })
    }

    /// The index of the interface called `name`.
    ///
    /// # Errors
    /// [`NetlinkError::LinkNotFound`] when there is no such interface;
    /// [`NetlinkError::LinkLookup`] when the request fails.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let lookup = |source| NetlinkError::LinkLookup {
            name: name.to_owned(),
            source,
        };
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::LinkNotFound {
                name: name.to_owned(),
            }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Err(NetlinkError::LinkNotFound {
                name: name.to_owned(),
            }),
            Err(e) => Err(lookup(e)),
        }
    }

    /// The MTU of interface `index`.
    ///
    /// # Errors
    /// [`NetlinkError::LinkMtu`] when the interface cannot be read or reports no MTU.
    pub async fn link_mtu(&self, index: u32) -> Result<u32, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| NetlinkError::LinkMtu {
                index,
                source: Some(source),
            })?;
        link.and_then(|link| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
        })
        .ok_or(NetlinkError::LinkMtu {
            index,
            source: None,
        })
    }

    /// The MTU of the way to `dst` on the underlay, as `ip route get <dst> mark <mark>`
    /// finds it: the route's `mtu` (one configured on the route, or a path MTU the kernel
    /// learned), else its output interface's.
    ///
    /// # Errors
    /// [`NetlinkError::RouteLookup`] when the kernel has no route (or the request fails),
    /// [`NetlinkError::LinkMtu`] when the output interface cannot be read.
    pub async fn path_mtu(&self, dst: IpAddr, mark: u32) -> Result<UnderlayPath, NetlinkError> {
        let dst = dst.to_canonical();
        let mut message = match dst {
            IpAddr::V4(addr) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(addr, 32)
                .build(),
            IpAddr::V6(addr) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(addr, 128)
                .build(),
        };
        if mark != 0 {
            message.attributes.push(RouteAttribute::Mark(mark));
        }
        let mut replies = self.handle.route().get(message).execute();
        let route = replies
            .try_next()
            .await
            .map_err(|source| NetlinkError::RouteLookup {
                dst,
                source: Some(source),
            })?
            .ok_or(NetlinkError::RouteLookup { dst, source: None })?;
        let mtu = match route_mtu(&route) {
            Some(mtu) => mtu,
            None => {
                let index =
                    route_oif(&route).ok_or(NetlinkError::RouteLookup { dst, source: None })?;
                self.link_mtu(index).await?
            }
        };
        Ok(UnderlayPath {
            ipv6: dst.is_ipv6(),
            mtu,
        })
    }

    /// The MTU of the default route in the main table (IPv4 first, then IPv6; the lowest
    /// metric of each), or `None` when there is no default route.
    ///
    /// # Errors
    /// [`NetlinkError::ListRoutes`] when a dump fails, [`NetlinkError::LinkMtu`] when the
    /// route's interface cannot be read.
    pub async fn default_route_mtu(&self) -> Result<Option<UnderlayPath>, NetlinkError> {
        let dumps = [
            (false, RouteMessageBuilder::<Ipv4Addr>::new().build()),
            (true, RouteMessageBuilder::<Ipv6Addr>::new().build()),
        ];
        for (ipv6, request) in dumps {
            let mut best: Option<(u32, RouteMessage)> = None;
            let mut stream = self.handle.route().get(request).execute();
            while let Some(route) = stream
                .try_next()
                .await
                .map_err(|source| NetlinkError::ListRoutes { index: 0, source })?
            {
                if !is_main_default(&route) || route_oif(&route).is_none() {
                    continue;
                }
                let priority = route_priority(&route);
                if best.as_ref().is_none_or(|(p, _)| priority < *p) {
                    best = Some((priority, route));
                }
            }
            if let Some((_, route)) = best {
                let mtu = match (route_mtu(&route), route_oif(&route)) {
                    (Some(mtu), _) => mtu,
                    (None, Some(index)) => self.link_mtu(index).await?,
                    (None, None) => continue,
                };
                return Ok(Some(UnderlayPath { ipv6, mtu }));
            }
        }
        Ok(None)
    }

    /// Sets the MTU of interface `index` and brings it up.
    ///
    /// # Errors
    /// [`NetlinkError::SetLink`] when the kernel refuses (no such interface, MTU out of range).
    pub async fn set_mtu_and_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| NetlinkError::SetLink { index, mtu, source })?;
        tracing::debug!(index, mtu, "link up");
        Ok(())
    }

    /// Adds `addr` to interface `index`; an address already there counts as success.
    ///
    /// IPv6 addresses are added with `IFA_F_NODAD`, so they are usable at once.
    ///
    /// # Errors
    /// [`NetlinkError::AddAddress`] when the kernel refuses.
    pub async fn add_address(
        &self,
        index: u32,
        addr: InterfaceAddress,
    ) -> Result<(), NetlinkError> {
        let mut request = self.handle.address().add(index, addr.addr, addr.len);
        if addr.addr.is_ipv6() {
            // Without IFA_F_NODAD the address stays tentative until the DAD work item runs
            // (even on NOARP devices, where DAD is then skipped), and sending from it fails
            // with EADDRNOTAVAIL meanwhile. DAD is pointless on a point-to-point tunnel.
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => {
                tracing::info!(index, %addr, "address added");
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                tracing::debug!(index, %addr, "address already present");
                Ok(())
            }
            Err(source) => Err(NetlinkError::AddAddress {
                index,
                addr,
                source,
            }),
        }
    }

    /// Adds a device route for `dst` through interface `index` in the main table, with scope
    /// link and protocol [`ROUTE_PROTOCOL`]. A route already there counts as success.
    ///
    /// `EEXIST` is also what the kernel answers when someone else's route with the same
    /// destination and metric exists; that route is then left alone and is not reported by
    /// [`Netlink::routes_on`].
    ///
    /// # Errors
    /// [`NetlinkError::AddRoute`] when the kernel refuses.
    pub async fn add_route(&self, target: &RouteTarget, dst: IpCidr) -> Result<(), NetlinkError> {
        let index = target.index;
        let mut message = target_message(target, dst);
        if let Some(src) = target.source(dst) {
            message
                .attributes
                .push(RouteAttribute::PrefSource(match src {
                    IpAddr::V4(a) => RouteAddress::Inet(a),
                    IpAddr::V6(a) => RouteAddress::Inet6(a),
                }));
        }
        match self.handle.route().add(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                tracing::debug!(index, %dst, "route already present");
                Ok(())
            }
            Err(source) => Err(NetlinkError::AddRoute { index, dst, source }),
        }
    }

    /// Deletes our route for `dst` through the target's interface and table (whatever its
    /// preferred source); a route already gone counts as success. Routes with another
    /// protocol or interface are never matched.
    ///
    /// # Errors
    /// [`NetlinkError::DelRoute`] when the kernel refuses.
    pub async fn del_route(&self, target: &RouteTarget, dst: IpCidr) -> Result<(), NetlinkError> {
        let index = target.index;
        let message = target_message(target, dst);
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)) => {
                tracing::debug!(index, %dst, "route already gone");
                Ok(())
            }
            Err(source) => Err(NetlinkError::DelRoute { index, dst, source }),
        }
    }

    /// The destinations of our routes (protocol [`ROUTE_PROTOCOL`]) in the target's table
    /// whose output interface is the target's, IPv4 and IPv6.
    ///
    /// The kernel's own prefix routes for the interface addresses (protocol kernel) and
    /// routes added by others are not listed.
    ///
    /// # Errors
    /// [`NetlinkError::ListRoutes`] when a dump fails.
    pub async fn routes_on(&self, target: &RouteTarget) -> Result<BTreeSet<IpCidr>, NetlinkError> {
        let (index, table) = (target.index, target.table);
        self.route_destinations(index, |route| match table_destination(route, table)? {
            (dst, Some(oif)) if oif == index && is_ours(route) => Some(dst),
            _ => None,
        })
        .await
    }

    /// What `pick` returns for each route of the IPv4 and IPv6 dumps; `index` names the
    /// interface in the error.
    async fn route_destinations(
        &self,
        index: u32,
        pick: impl Fn(&RouteMessage) -> Option<IpCidr>,
    ) -> Result<BTreeSet<IpCidr>, NetlinkError> {
        let list = |source| NetlinkError::ListRoutes { index, source };
        let mut routes = BTreeSet::new();
        let dumps = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for request in dumps {
            let mut stream = self.handle.route().get(request).execute();
            while let Some(route) = stream.try_next().await.map_err(list)? {
                routes.extend(pick(&route));
            }
        }
        Ok(routes)
    }

    /// Adds the fail-closed `unreachable` route for `dst` (main table, protocol
    /// [`FAIL_CLOSED_PROTOCOL`], metric [`FAIL_CLOSED_METRIC`], no interface). A route
    /// already there counts as success.
    ///
    /// # Errors
    /// [`NetlinkError::AddFailClosed`] when the kernel refuses.
    pub async fn add_fail_closed(&self, dst: IpCidr) -> Result<(), NetlinkError> {
        match self
            .handle
            .route()
            .add(fail_closed_message(dst))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(source) => Err(NetlinkError::AddFailClosed { dst, source }),
        }
    }

    /// Deletes the fail-closed route for `dst`; a route already gone counts as success.
    /// Only a route with our protocol, type and metric is matched.
    ///
    /// # Errors
    /// [`NetlinkError::DelFailClosed`] when the kernel refuses.
    pub async fn del_fail_closed(&self, dst: IpCidr) -> Result<(), NetlinkError> {
        match self
            .handle
            .route()
            .del(fail_closed_message(dst))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(source) => Err(NetlinkError::DelFailClosed { dst, source }),
        }
    }

    /// The destinations of the fail-closed routes in the main table, IPv4 and IPv6.
    ///
    /// # Errors
    /// [`NetlinkError::ListRoutes`] when a dump fails.
    pub async fn fail_closed_routes(&self) -> Result<BTreeSet<IpCidr>, NetlinkError> {
        self.route_destinations(0, fail_closed_destination).await
    }

    /// What a linked cluster's fail-closed route must not cover on this node: the addresses
    /// of every interface (node, underlay, loopback, link-local) and the next hops of the
    /// main table's default routes.
    ///
    /// # Errors
    /// [`NetlinkError::ListAddresses`] or [`NetlinkError::ListRoutes`] when a dump fails.
    pub async fn own_addresses(&self) -> Result<BTreeSet<IpAddr>, NetlinkError> {
        let mut own = BTreeSet::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(|source| NetlinkError::ListAddresses { source })?
        {
            for attr in &message.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                    own.insert(*ip);
                }
            }
        }
        let dumps = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for request in dumps {
            let mut stream = self.handle.route().get(request).execute();
            while let Some(route) = stream
                .try_next()
                .await
                .map_err(|source| NetlinkError::ListRoutes { index: 0, source })?
            {
                if !is_main_default(&route) {
                    continue;
                }
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                            own.insert(IpAddr::V4(*a));
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            own.insert(IpAddr::V6(*a));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(own)
    }

    /// Deletes interface `index`; an interface already gone counts as success.
    ///
    /// # Errors
    /// [`NetlinkError::DelLink`] when the kernel refuses.
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                tracing::info!(index, "link deleted");
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(source) => Err(NetlinkError::DelLink { index, source }),
        }
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Keeps the routes on one interface equal to a desired set.
///
/// Each [`RouteReconciler::reconcile`] reads the routes actually installed, so a route
/// someone deleted is put back; it adds the missing ones, then deletes the extra ones, one at
/// a time, and never flushes.
#[derive(Debug)]
pub struct RouteReconciler {
    target: RouteTarget,
    index: u32,
    applied: BTreeSet<IpCidr>,
}

impl RouteReconciler {
    /// A reconciler for the routes of `target`.
    pub fn new(target: RouteTarget) -> Self {
        Self {
            index: target.index,
            target,
            applied: BTreeSet::new(),
        }
    }

    /// The routes installed as of the last reconcile.
    pub fn applied(&self) -> &BTreeSet<IpCidr> {
        &self.applied
    }

    /// Moves the interface's routes towards `desired` and reports what changed.
    ///
    /// A route that cannot be added or deleted is recorded in [`RouteDiff::failed`] and the
    /// others are still applied; the next call tries it again.
    ///
    /// # Errors
    /// [`NetlinkError::ListRoutes`] when the installed routes cannot be read; nothing is
    /// changed then.
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        desired: &BTreeSet<IpCidr>,
    ) -> Result<RouteDiff, NetlinkError> {
        let actual = nl.routes_on(&self.target).await?;
        let plan = plan_routes(desired, &actual);
        let mut diff = RouteDiff::default();
        let mut installed = actual;

        for dst in plan.add {
            match nl.add_route(&self.target, dst).await {
                Ok(()) => {
                    let restored = self.applied.contains(&dst);
                    tracing::info!(index = self.index, %dst, restored, "route installed");
                    installed.insert(dst);
                    diff.added.push(dst);
                }
                Err(e) => {
                    tracing::debug!(index = self.index, %dst, error = %e, "route not installed");
                    diff.failed.push((dst, e.to_string()));
                }
            }
        }
        for dst in plan.remove {
            match nl.del_route(&self.target, dst).await {
                Ok(()) => {
                    tracing::info!(index = self.index, %dst, "route removed");
                    installed.remove(&dst);
                    diff.removed.push(dst);
                }
                Err(e) => {
                    tracing::debug!(index = self.index, %dst, error = %e, "route not removed");
                    diff.failed.push((dst, e.to_string()));
                }
            }
        }
        self.applied = installed;
        Ok(diff)
    }

    /// Deletes every route of ours on the interface, one by one.
    ///
    /// Fine to call when nothing was ever applied or the interface is gone.
    ///
    /// # Errors
    /// [`NetlinkError::ListRoutes`] when the installed routes cannot be read;
    /// [`NetlinkError::RoutesLeft`] when some routes could not be deleted (after trying all).
    pub async fn remove_all(&mut self, nl: &Netlink) -> Result<(), NetlinkError> {
        let diff = self.reconcile(nl, &BTreeSet::new()).await?;
        if diff.failed.is_empty() {
            Ok(())
        } else {
            Err(NetlinkError::RoutesLeft {
                index: self.index,
                failed: diff.failed,
            })
        }
    }
}

/// What one [`RouteReconciler::reconcile`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Routes installed (missing before, including ones someone deleted).
    pub added: Vec<IpCidr>,
    /// Routes deleted (ours, no longer desired).
    pub removed: Vec<IpCidr>,
    /// Routes that could not be added or deleted, with the reason.
    pub failed: Vec<(IpCidr, String)>,
}

impl RouteDiff {
    /// True when nothing was changed and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.failed.is_empty()
    }
}

/// The route changes that take `actual` to `desired`, each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Desired but not installed.
    pub add: Vec<IpCidr>,
    /// Installed but not desired.
    pub remove: Vec<IpCidr>,
}

/// Computes the routes to add and to remove to go from `actual` to `desired`.
pub fn plan_routes(desired: &BTreeSet<IpCidr>, actual: &BTreeSet<IpCidr>) -> RoutePlan {
    RoutePlan {
        add: desired.difference(actual).copied().collect(),
        remove: actual.difference(desired).copied().collect(),
    }
}

/// Why a netlink operation failed. Variant names double as metric labels.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The rtnetlink socket could not be opened.
    #[error("cannot open the rtnetlink socket")]
    Connect {
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// No interface has that name.
    #[error("no network interface named {name:?}")]
    LinkNotFound {
        /// The name looked up.
        name: String,
    },
    /// Looking up an interface failed.
    #[error("cannot look up network interface {name:?}")]
    LinkLookup {
        /// The name looked up.
        name: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Setting the MTU or the up flag failed.
    #[error("cannot set MTU {mtu} and up on interface {index}")]
    SetLink {
        /// The interface index.
        index: u32,
        /// The requested MTU.
        mtu: u32,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Adding an interface address failed.
    #[error("cannot add address {addr} to interface {index}")]
    AddAddress {
        /// The interface index.
        index: u32,
        /// The address.
        addr: InterfaceAddress,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Adding a route failed.
    #[error("cannot add route {dst} via interface {index}")]
    AddRoute {
        /// The interface index.
        index: u32,
        /// The destination.
        dst: IpCidr,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Deleting a route failed.
    #[error("cannot delete route {dst} via interface {index}")]
    DelRoute {
        /// The interface index.
        index: u32,
        /// The destination.
        dst: IpCidr,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Listing routes failed.
    #[error("cannot list routes of interface {index}")]
    ListRoutes {
        /// The interface index.
        index: u32,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Listing the interfaces' addresses failed.
    #[error("cannot list the interfaces' addresses")]
    ListAddresses {
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Some routes could not be deleted while removing them all.
    #[error(
        "cannot delete routes from interface {index}: {}",
        describe_failures(failed)
    )]
    RoutesLeft {
        /// The interface index.
        index: u32,
        /// Each route left behind, with the reason.
        failed: Vec<(IpCidr, String)>,
    },
    /// Reading an interface's MTU failed.
    #[error("cannot read the MTU of interface {index}")]
    LinkMtu {
        /// The interface index.
        index: u32,
        /// The netlink error, if the request failed (else the reply had no MTU).
        #[source]
        source: Option<rtnetlink::Error>,
    },
    /// Looking up the route to an address failed.
    #[error("cannot find a route to {dst}")]
    RouteLookup {
        /// The destination looked up.
        dst: IpAddr,
        /// The netlink error, if the request failed (else the reply had no interface).
        #[source]
        source: Option<rtnetlink::Error>,
    },
    /// Adding a fail-closed route failed.
    #[error("cannot add the fail-closed route unreachable {dst}")]
    AddFailClosed {
        /// The destination.
        dst: IpCidr,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Deleting a fail-closed route failed.
    #[error("cannot delete the fail-closed route unreachable {dst}")]
    DelFailClosed {
        /// The destination.
        dst: IpCidr,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Deleting an interface failed.
    #[error("cannot delete interface {index}")]
    DelLink {
        /// The interface index.
        index: u32,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
}

/// A route message for `dst` in the main table, the rest left to the caller.
fn main_table_message(dst: IpCidr) -> RouteMessage {
    table_message(dst, MAIN_TABLE)
}

/// A route message for `dst` in `table`, the rest left to the caller.
fn table_message(dst: IpCidr, table: u32) -> RouteMessage {
    let mut message = match dst.addr() {
        IpAddr::V4(addr) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, dst.prefix_len())
            .build(),
        IpAddr::V6(addr) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(addr, dst.prefix_len())
            .build(),
    };
    // A table past 255 only fits the attribute (the header then says RT_TABLE_UNSPEC).
    match u8::try_from(table) {
        Ok(t) => message.header.table = t,
        Err(_) => {
            message.header.table = RouteHeader::RT_TABLE_UNSPEC;
            message.attributes.push(RouteAttribute::Table(table));
        }
    }
    message
}

/// The message that adds, or deletes, our device route for `dst` through `index` in the
/// main table.
#[cfg(test)]
fn route_message(index: u32, dst: IpCidr) -> RouteMessage {
    target_message(&RouteTarget::main(index), dst)
}

/// The message that adds, or deletes, our device route for `dst` through the target's
/// interface, in its table (the preferred source is added by [`Netlink::add_route`]).
///
/// Add and delete use the same message so that deletion matches exactly our route: the
/// kernel compares protocol, scope (IPv4) and output interface when they are set.
fn target_message(target: &RouteTarget, dst: IpCidr) -> RouteMessage {
    let (index, table) = (target.index, target.table);
    let mut message = table_message(dst, table);
    // IPv6 has no route scopes; the kernel reports every route as universe.
    if dst.addr().is_ipv4() {
        message.header.scope = RouteScope::Link;
    }
    message.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    message.header.kind = RouteType::Unicast;
    message.attributes.push(RouteAttribute::Oif(index));
    message
}

/// The message that adds, or deletes, the fail-closed route for `dst`: `unreachable`, so
/// that a sender gets an ICMP error (or `EHOSTUNREACH`) at once instead of waiting for a
/// timeout, with no output interface (the kernel puts it on `lo`), so it outlives the TUN
/// device.
fn fail_closed_message(dst: IpCidr) -> RouteMessage {
    let mut message = main_table_message(dst);
    message.header.protocol = RouteProtocol::from(FAIL_CLOSED_PROTOCOL);
    message.header.kind = RouteType::Unreachable;
    message.header.scope = RouteScope::Universe;
    message
        .attributes
        .push(RouteAttribute::Priority(FAIL_CLOSED_METRIC));
    message
}

/// The destination of `route` when it is a fail-closed route: main table, protocol
/// [`FAIL_CLOSED_PROTOCOL`], unreachable.
fn fail_closed_destination(route: &RouteMessage) -> Option<IpCidr> {
    let header = &route.header;
    if u8::from(header.protocol) != FAIL_CLOSED_PROTOCOL || header.kind != RouteType::Unreachable {
        return None;
    }
    main_table_destination(route).map(|(dst, _)| dst)
}

/// The destination of `route` when it is one of ours: main table, our protocol, unicast,
/// output interface `index`.
#[cfg(test)]
fn our_route_destination(route: &RouteMessage, index: u32) -> Option<IpCidr> {
    if !is_ours(route) {
        return None;
    }
    match main_table_destination(route)? {
        (dst, Some(oif)) if oif == index => Some(dst),
        _ => None,
    }
}

/// Whether `route` is one of our tunnel routes: our protocol, unicast.
fn is_ours(route: &RouteMessage) -> bool {
    u8::from(route.header.protocol) == ROUTE_PROTOCOL && route.header.kind == RouteType::Unicast
}

/// The destination and output interface of `route` when it is in the main table.
fn main_table_destination(route: &RouteMessage) -> Option<(IpCidr, Option<u32>)> {
    table_destination(route, MAIN_TABLE)
}

/// The destination and output interface of `route` when it is in `wanted`.
fn table_destination(route: &RouteMessage, wanted: u32) -> Option<(IpCidr, Option<u32>)> {
    let header = &route.header;
    let mut table = u32::from(header.table);
    let mut oif = None;
    let mut dst = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    if table != wanted {
        return None;
    }
    // A default route carries no destination attribute.
    let addr = match (dst, header.address_family) {
        (Some(addr), _) => addr,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    let dst = IpCidr::new(addr, header.destination_prefix_length).ok()?;
    Some((dst, oif))
}

/// The `mtu` metric of a route (`RTAX_MTU`: configured, or a learned path MTU), if set.
fn route_mtu(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Metrics(metrics) => metrics.iter().find_map(|m| match m {
            RouteMetric::Mtu(mtu) if *mtu != 0 => Some(*mtu),
            _ => None,
        }),
        _ => None,
    })
}

/// The output interface of a route.
fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

/// The metric (`RTA_PRIORITY`) of a route; 0 when absent, as the kernel reads it.
fn route_priority(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// Whether `route` is a unicast default route (prefix length 0) of the main table.
fn is_main_default(route: &RouteMessage) -> bool {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    route.header.destination_prefix_length == 0
        && route.header.kind == RouteType::Unicast
        && table == u32::from(RouteHeader::RT_TABLE_MAIN)
}

fn describe_failures(failed: &[(IpCidr, String)]) -> String {
    failed
        .iter()
        .map(|(dst, reason)| format!("{dst} ({reason})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The errno in a netlink error reply, as a positive number.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io().raw_os_error(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_routes_are_added_and_extra_ones_removed() {
        let plan = plan_routes(
            &set(&["10.1.0.0/16", "10.2.0.0/16", "fd00::/64"]),
            &set(&["10.2.0.0/16", "10.3.0.0/16"]),
        );
        assert_eq!(plan.add, cidrs(&["10.1.0.0/16", "fd00::/64"]));
        assert_eq!(plan.remove, cidrs(&["10.3.0.0/16"]));
    }

    #[test]
    fn equal_sets_plan_nothing() {
        let routes = set(&["10.1.0.0/16", "0.0.0.0/0", "::/0"]);
        assert_eq!(plan_routes(&routes, &routes), RoutePlan::default());
    }

    #[test]
    fn empty_desired_removes_everything() {
        let plan = plan_routes(&BTreeSet::new(), &set(&["::/0", "10.0.0.0/8"]));
        assert!(plan.add.is_empty());
        assert_eq!(plan.remove, cidrs(&["10.0.0.0/8", "::/0"]));
    }

    #[test]
    fn same_prefix_with_other_length_is_a_different_route() {
        let plan = plan_routes(&set(&["10.0.0.0/8"]), &set(&["10.0.0.0/16"]));
        assert_eq!(plan.add, cidrs(&["10.0.0.0/8"]));
        assert_eq!(plan.remove, cidrs(&["10.0.0.0/16"]));
    }

    #[test]
    fn our_default_route_without_destination_is_recognised() {
        let mut route = route_message(7, "0.0.0.0/0".parse().unwrap());
        route
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Destination(_)));
        assert_eq!(
            our_route_destination(&route, 7),
            Some("0.0.0.0/0".parse().unwrap())
        );
    }

    #[test]
    fn kernel_and_foreign_routes_are_not_ours() {
        let dst: IpCidr = "fd00::/64".parse().unwrap();
        assert_eq!(our_route_destination(&route_message(7, dst), 7), Some(dst));
        assert_eq!(our_route_destination(&route_message(7, dst), 8), None);
        let mut kernel = route_message(7, dst);
        kernel.header.protocol = RouteProtocol::Kernel;
        assert_eq!(our_route_destination(&kernel, 7), None);
        let mut other_table = route_message(7, dst);
        other_table.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(our_route_destination(&other_table, 7), None);
    }

    #[test]
    fn routes_of_a_numbered_table_are_ours_only_there() {
        let dst: IpCidr = "10.99.0.0/24".parse().unwrap();
        for table in [100, 51_820] {
            let target = RouteTarget {
                index: 7,
                table,
                sources: vec!["fd00::1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            };
            let message = target_message(&target, dst);
            assert_eq!(table_destination(&message, table), Some((dst, Some(7))));
            assert_eq!(table_destination(&message, MAIN_TABLE), None);
            assert_eq!(our_route_destination(&message, 7), None);
            assert_eq!(target.source(dst), Some("10.0.0.1".parse().unwrap()));
        }
        assert_eq!(RouteTarget::main(7).source(dst), None);
    }

    #[test]
    fn a_route_mtu_comes_from_its_metrics_and_a_default_is_recognised() {
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(3)
            .priority(100)
            .build();
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.kind = RouteType::Unicast;
        assert_eq!(route_mtu(&route), None);
        assert_eq!(route_oif(&route), Some(3));
        assert_eq!(route_priority(&route), 100);
        assert!(is_main_default(&route));
        route
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(1280)]));
        assert_eq!(route_mtu(&route), Some(1280));
        let specific = route_message(3, "10.0.0.0/8".parse().unwrap());
        assert!(!is_main_default(&specific));
    }

    #[test]
    fn fail_closed_routes_are_told_apart_from_tunnel_routes() {
        for text in ["10.2.1.0/24", "fd10:2:0:1::/64", "0.0.0.0/0"] {
            let dst: IpCidr = text.parse().unwrap();
            let fail_closed = fail_closed_message(dst);
            assert_eq!(fail_closed_destination(&fail_closed), Some(dst));
            assert_eq!(our_route_destination(&fail_closed, 0), None);
            assert_eq!(route_priority(&fail_closed), FAIL_CLOSED_METRIC);
            let tunnel = route_message(7, dst);
            assert_eq!(fail_closed_destination(&tunnel), None);
        }
        let mut other = fail_closed_message("10.0.0.0/8".parse().unwrap());
        other.header.protocol = RouteProtocol::Static;
        assert_eq!(fail_closed_destination(&other), None);
    }

    fn cidrs(texts: &[&str]) -> Vec<IpCidr> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn set(texts: &[&str]) -> BTreeSet<IpCidr> {
        cidrs(texts).into_iter().collect()
    }
}
