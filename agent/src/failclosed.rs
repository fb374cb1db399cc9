//! The mesh fails closed: no packet for a linked cluster's ranges (or a host's address)
//! leaves the node in plaintext, whatever state the agent is in.
//!
//! The tunnel routes live on the TUN device, so they go whenever it goes: on SIGTERM (the
//! agent's own cleanup), when the process dies (the kernel deletes the device), when a
//! peer is removed by policy, and before the agent has built them at start. Without
//! anything under them, traffic for those ranges follows the node's default route onto the
//! underlay, unencrypted. So for every range the agent has ever routed into the tunnel
//! it also installs an `unreachable` route in the main table, with a metric above the
//! tunnel route's (see [`FAIL_CLOSED_METRIC`](crate::netlink::FAIL_CLOSED_METRIC)): the
//! tunnel route wins while it exists, the unreachable route catches the traffic when it
//! does not. These routes are not on the TUN device, carry a protocol of their own
//! ([`FAIL_CLOSED_PROTOCOL`](crate::netlink::FAIL_CLOSED_PROTOCOL)) that the tunnel
//! routes' reconciler ignores, and the agent never deletes them while the range's cluster
//! is linked: a peer removed by policy stays refused. The set is kept in the state
//! directory ([`FILE`]), each range with its [`Owner`], and installed again first thing at
//! start, before the TUN device exists, so a reboot or a new node image is covered as soon
//! as the agent starts.
//!
//! Why routes and not a persistent TUN device or an nftables drop: a device outlives a
//! SIGTERM but not a crash of the process that holds its file descriptor; a drop rule
//! needs nftables in every node image and its own ownership rules. An unreachable route is
//! one more kernel object of the kind the agent already reconciles, works the same for
//! IPv4 and IPv6, and gives senders an immediate error instead of a timeout.
//!
//! They are removed only on the user's explicit choice. `meshctl unjoin` deletes the
//! cluster's PeerCluster; a node's agent, which watches PeerClusters, then deletes the
//! routes of that cluster's ranges once their tunnel routes are gone ([`FailClosed::unlinked`]).
//! It never does so because the API server does not answer: only a successful list or
//! watch tells it which clusters are linked ([`Attribution::linked`]). Ranges of this
//! cluster's own machines and of unknown owners stay; `wiremesh-agent cleanup` (what
//! uninstalling runs on each machine) deletes every such route and the file. A running
//! agent that finds the file gone starts the set again from the ranges it routes now.
//!
//! The decisions are pure functions ([`FailClosed`], [`parse`], [`print`]); [`load`], [`remove`],
//! [`save`], [`install`] and [`cleanup`] are the shell.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use tracing::{debug, info, warn};
use wiremesh_proto::IpCidr;

use crate::netlink::{Netlink, NetlinkError};

/// The file in the state directory that lists the fail-closed ranges, one per line with
/// its owner.
pub const FILE: &str = "fail-closed";

/// Whose range it is: what decides when its fail-closed route may go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// Not known: read from a file written before ranges had owners, or routed before
    /// the agent knew which peer it was for. Removed only by `wiremesh-agent cleanup`.
    Unknown,
    /// This cluster's own machines (its hosts; on a host, the cluster's nodes): no link
    /// to undo. Removed only by `wiremesh-agent cleanup`.
    Local,
    /// A linked cluster, by name: removed when the cluster is no longer linked
    /// (`meshctl unjoin` deleted its PeerCluster).
    Cluster(String),
}

impl Owner {
    /// The owner of a peer of `cluster` (a peer's origin; empty for this cluster's own).
    pub fn of_cluster(cluster: &str) -> Self {
        if cluster.is_empty() {
            Self::Local
        } else {
            Self::Cluster(cluster.to_owned())
        }
    }
}

/// What the peer machinery tells the route task about the ranges it routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Whose each routed range is (from the peers applied to the device).
    pub owners: BTreeMap<IpCidr, Owner>,
    /// The clusters linked now, from the last successful list or watch of PeerClusters;
    /// `None` while that is not known (before the API server answered, or in a mode that
    /// does not read PeerClusters): then nothing is ever removed.
    pub linked: Option<BTreeSet<String>>,
    /// What the linked clusters were granted at join (`spec.allowedPodCIDRs` and
    /// `spec.allowedHostCIDRs` of their PeerClusters), with their owners: closed from the
    /// moment a cluster is linked, before any of its nodes is routed, once [`screen`]ed.
    pub allowances: BTreeMap<IpCidr, Owner>,
    /// This cluster's own ranges (its pod, host and service CIDRs, this node's pod CIDRs),
    /// which no linked cluster's fail-closed route may overlap.
    pub local_ranges: Vec<IpCidr>,
    /// The endpoints of the peers applied: a fail-closed route over one would cut the
    /// underlay path to it.
    pub endpoints: BTreeSet<IpAddr>,
}

/// What a linked cluster's fail-closed route must never cover, or the node would cut
/// itself off: a linked cluster's allowance is granted at join from what its
/// administrator asked for, and an unreachable route over the underlay would black-hole it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    /// The addresses of this node's interfaces (its node and underlay addresses), its
    /// default routes' next hops, and the peers' endpoints.
    pub addresses: BTreeSet<IpAddr>,
    /// This cluster's own pod, host and service CIDRs (and this node's pod CIDRs).
    pub ranges: Vec<IpCidr>,
}

/// Why a linked cluster's range gets no fail-closed route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// `0.0.0.0/0` or `::/0`: it would refuse everything the node sends off-link.
    Default,
    /// It contains one of this node's addresses, a next hop or a peer's endpoint.
    Address(IpAddr),
    /// It overlaps one of this cluster's own ranges.
    Local(IpCidr),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("it is a default route"),
            Self::Address(ip) => write!(
                f,
                "it covers {ip}, an address of this node, a next hop or a peer's endpoint"
            ),
            Self::Local(cidr) => write!(f, "it overlaps this cluster's own {cidr}"),
        }
    }
}

/// Why `cidr` may not have a linked cluster's fail-closed route, if it may not.
pub fn refusal(cidr: &IpCidr, protected: &Protected) -> Option<Refusal> {
    if cidr.is_default() {
        return Some(Refusal::Default);
    }
    if let Some(ip) = protected.addresses.iter().find(|ip| cidr.contains(**ip)) {
        return Some(Refusal::Address(*ip));
    }
    protected
        .ranges
        .iter()
        .find(|own| own.overlaps(cidr))
        .map(|own| Refusal::Local(*own))
}

/// A linked cluster's range refused a fail-closed route: the range, its owner, and why.
pub type Refused = (IpCidr, Owner, Refusal);

/// Splits a linked cluster's `allowances` into the ranges that get fail-closed routes and
/// those refused, each with why (see [`Protected`]).
pub fn screen(
    allowances: &BTreeMap<IpCidr, Owner>,
    protected: &Protected,
) -> (BTreeMap<IpCidr, Owner>, Vec<Refused>) {
    let mut admitted = BTreeMap::new();
    let mut refused = Vec::new();
    for (cidr, owner) in allowances {
        match refusal(cidr, protected) {
            None => {
                admitted.insert(*cidr, owner.clone());
            }
            Some(why) => refused.push((*cidr, owner.clone(), why)),
        }
    }
    (admitted, refused)
}

/// The ranges that must never leave the node unencrypted, each with its owner: every
/// range routed into the tunnel since the set was last reset, less those of clusters that
/// were unlinked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailClosed {
    ranges: BTreeMap<IpCidr, Owner>,
}

impl FailClosed {
    /// A set starting from what was persisted.
    pub fn new(ranges: BTreeMap<IpCidr, Owner>) -> Self {
        Self { ranges }
    }

    /// The ranges and their owners.
    pub fn ranges(&self) -> &BTreeMap<IpCidr, Owner> {
        &self.ranges
    }

    /// Adds the ranges routed into the tunnel now, with the owner `owners` gives them
    /// ([`Owner::Unknown`] when it gives none); a known owner replaces the one recorded
    /// (a range read from an old file, or routed before its peer was known, gets its
    /// cluster), an unknown one never does. A range is never removed because it is no
    /// longer routed (a peer removed by policy, a tunnel torn down). True when the set
    /// changed (and must be persisted).
    #[must_use]
    pub fn extend(&mut self, routed: &BTreeSet<IpCidr>, owners: &BTreeMap<IpCidr, Owner>) -> bool {
        let mut changed = false;
        for cidr in routed {
            match (owners.get(cidr), self.ranges.get_mut(cidr)) {
                (None | Some(Owner::Unknown), Some(_)) => {}
                (Some(owner), Some(recorded)) => {
                    if recorded != owner {
                        *recorded = owner.clone();
                        changed = true;
                    }
                }
                (owner, None) => {
                    self.ranges
                        .insert(*cidr, owner.cloned().unwrap_or(Owner::Unknown));
                    changed = true;
                }
            }
        }
        changed
    }

    /// Starts again from the ranges routed now: the user removed the persisted set.
    pub fn reset(&mut self, routed: &BTreeSet<IpCidr>, owners: &BTreeMap<IpCidr, Owner>) {
        self.ranges.clear();
        let _ = self.extend(routed, owners);
    }

    /// The ranges of the clusters that are no longer `linked`: their fail-closed routes
    /// are to be deleted, then the ranges forgotten ([`Self::forget`]). `linked` must come
    /// from a successful list or watch of PeerClusters: an API server that does not answer
    /// tells nothing. A range still `routed` into the tunnel stays until its tunnel route
    /// is gone (the controller removes the cluster's MeshPeers as it unlinks it); ranges
    /// of this cluster's own machines and of unknown owners always stay.
    pub fn unlinked(&self, linked: &BTreeSet<String>, routed: &BTreeSet<IpCidr>) -> Vec<IpCidr> {
        self.ranges
            .iter()
            .filter(|(cidr, owner)| match owner {
                Owner::Cluster(name) => !linked.contains(name) && !routed.contains(cidr),
                Owner::Unknown | Owner::Local => false,
            })
            .map(|(cidr, _)| *cidr)
            .collect()
    }

    /// The ranges of linked clusters, not routed into the tunnel now, that cover what is
    /// [`Protected`] (a node address or endpoint that appeared after the range was
    /// closed): their fail-closed routes are to be deleted, then the ranges forgotten.
    /// Ranges of this cluster's own machines and of unknown owners are never touched.
    pub fn conflicting(&self, protected: &Protected, routed: &BTreeSet<IpCidr>) -> Vec<IpCidr> {
        self.ranges
            .iter()
            .filter(|(cidr, owner)| {
                matches!(owner, Owner::Cluster(_))
                    && !routed.contains(cidr)
                    && refusal(cidr, protected).is_some()
            })
            .map(|(cidr, _)| *cidr)
            .collect()
    }

    /// Forgets `ranges` (whose fail-closed routes were deleted). True when the set
    /// changed.
    #[must_use]
    pub fn forget(&mut self, ranges: &[IpCidr]) -> bool {
        let before = self.ranges.len();
        for cidr in ranges {
            self.ranges.remove(cidr);
        }
        self.ranges.len() != before
    }

    /// The fail-closed routes to add, given those installed: the missing ones. Nothing is
    /// ever removed here; installed routes outside the set stay too.
    pub fn missing(&self, installed: &BTreeSet<IpCidr>) -> Vec<IpCidr> {
        self.ranges
            .keys()
            .filter(|cidr| !installed.contains(cidr))
            .copied()
            .collect()
    }
}

/// Whether the fail-closed set is in force: each pass of the route task records whether
/// it could persist the set and install every route. A failure is not silent: it is
/// counted (`wiremesh_fail_closed_errors_total`), retried at every pass, and the agent is
/// not ready (`/readyz`) until a pass succeeds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// The last write of the set failed (or none was tried since it changed).
    unsaved: bool,
    /// Ranges without their route after the last pass; `None` when the routes could not
    /// even be listed.
    unrouted: Option<Vec<IpCidr>>,
    /// Failures since start: a write, a route, a listing each count one.
    errors: u64,
}

impl Standing {
    /// Whether the set is to be written at this pass: it `changed`, or the last write
    /// failed.
    pub fn must_save(&self, changed: bool) -> bool {
        changed || self.unsaved
    }

    /// Records a write of the set.
    pub fn saved(&mut self, ok: bool) {
        self.unsaved = !ok;
        self.errors += u64::from(!ok);
    }

    /// Records an install pass: the ranges whose route could not be added, or `None` when
    /// the installed routes could not be listed.
    pub fn installed(&mut self, failed: Option<Vec<IpCidr>>) {
        self.errors += failed.as_ref().map_or(1, |f| f.len() as u64);
        self.unrouted = failed;
    }

    /// Failures since start.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Why the set is not in force, if it is not: what `/readyz` says.
    pub fn problem(&self) -> Option<String> {
        let routes = match &self.unrouted {
            None => {
                Some("the fail-closed routes are not installed yet or cannot be listed".to_owned())
            }
            Some(failed) if failed.is_empty() => None,
            Some(failed) => Some(format!(
                "no fail-closed route yet for {}",
                failed
                    .iter()
                    .take(8)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        let file = self
            .unsaved
            .then(|| format!("the fail-closed ranges are not persisted in {FILE}"));
        match (routes, file) {
            (None, None) => None,
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        }
    }
}

/// A line of the fail-closed file that is not a CIDR and an owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?}: {reason}")]
pub struct ParseError {
    /// The line number, from 1.
    pub line: usize,
    /// The line.
    pub text: String,
    /// Why it was refused.
    pub reason: String,
}

/// The owner field of a line for a linked cluster: `cluster=<name>`.
const CLUSTER_PREFIX: &str = "cluster=";
/// The owner field of a line for this cluster's own machines.
const LOCAL: &str = "local";

/// Parses the fail-closed file: one range per line, `<cidr> [local|cluster=<name>]`; a
/// line with a CIDR alone (the format before owners) is [`Owner::Unknown`]. Blank lines
/// and `#` comments skipped. Bad lines are returned as errors beside the valid ranges:
/// failing closed means keeping every range that can still be read, so a line whose CIDR
/// parses but whose owner does not keeps its range, as unknown.
pub fn parse(text: &str) -> (BTreeMap<IpCidr, Owner>, Vec<ParseError>) {
    let mut ranges = BTreeMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let error = |reason: String| ParseError {
            line: i + 1,
            text: line.chars().take(64).collect(),
            reason,
        };
        let mut fields = line.split_whitespace();
        let cidr = match fields.next().unwrap_or_default().parse::<IpCidr>() {
            Ok(cidr) => cidr,
            Err(e) => {
                errors.push(error(format!("not a CIDR: {e}")));
                continue;
            }
        };
        let owner = match (fields.next(), fields.next()) {
            (None, _) => Owner::Unknown,
            (Some(LOCAL), None) => Owner::Local,
            (Some(field), None) => match field.strip_prefix(CLUSTER_PREFIX) {
                Some(name) if is_cluster_name(name) => Owner::Cluster(name.to_owned()),
                _ => {
                    errors.push(error(format!(
                        "owner {:?} is neither {LOCAL:?} nor {CLUSTER_PREFIX}<cluster name>; kept as unknown",
                        field.chars().take(64).collect::<String>()
                    )));
                    Owner::Unknown
                }
            },
            (Some(_), Some(_)) => {
                errors.push(error(
                    "more than a CIDR and an owner; kept as unknown".to_owned(),
                ));
                Owner::Unknown
            }
        };
        ranges.insert(cidr, owner);
    }
    (ranges, errors)
}

/// A cluster name as a PeerCluster's `clusterName` allows: a DNS label.
fn is_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The fail-closed file's text for `ranges`.
pub fn print(ranges: &BTreeMap<IpCidr, Owner>) -> String {
    let mut text = String::from(
        "# Wiremesh fail-closed ranges: unreachable routes (proto 0x58) keep them off the\n\
         # underlay while no tunnel route exists. `<cidr> [local|cluster=<name>]`; a\n\
         # cluster's go when it is unlinked, `wiremesh-agent cleanup` removes them all.\n",
    );
    for (range, owner) in ranges {
        text.push_str(&range.to_string());
        match owner {
            Owner::Unknown => {}
            Owner::Local => {
                text.push(' ');
                text.push_str(LOCAL);
            }
            Owner::Cluster(name) => {
                text.push(' ');
                text.push_str(CLUSTER_PREFIX);
                text.push_str(name);
            }
        }
        text.push('\n');
    }
    text
}

/// Reads the persisted set from `state_dir`: empty when there is none; bad lines are
/// logged (naming the line) and skipped.
pub fn load(state_dir: &Path) -> BTreeMap<IpCidr, Owner> {
    let path = state_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the fail-closed ranges");
            return BTreeMap::new();
        }
    };
    let (ranges, errors) = parse(&text);
    for e in errors {
        warn!(path = %path.display(), error = %e, "a bad line in the fail-closed file");
    }
    ranges
}

/// Writes the set to `state_dir` atomically.
///
/// # Errors
/// When the file cannot be written.
pub fn save(state_dir: &Path, ranges: &BTreeMap<IpCidr, Owner>) -> std::io::Result<()> {
    crate::state::write_atomic(&state_dir.join(FILE), print(ranges).as_bytes())
}

/// Whether the persisted set exists (the user removes it with `wiremesh-agent cleanup`).
pub fn persisted(state_dir: &Path) -> bool {
    state_dir.join(FILE).exists()
}

/// Adds the fail-closed routes of `set` that are not installed, and returns those that
/// could not be added (each logged; tried again at the next pass).
///
/// # Errors
/// [`NetlinkError::ListRoutes`] when the installed routes cannot be read.
pub async fn install(nl: &Netlink, set: &FailClosed) -> Result<Vec<IpCidr>, NetlinkError> {
    let installed = nl.fail_closed_routes().await?;
    let mut failed = Vec::new();
    for dst in set.missing(&installed) {
        match nl.add_fail_closed(dst).await {
            Ok(()) => debug!(%dst, "fail-closed route installed"),
            Err(e) => {
                warn!(%dst, error = %e, "fail-closed route not installed");
                failed.push(dst);
            }
        }
    }
    Ok(failed)
}

/// Deletes the fail-closed routes of `ranges` (those of an unlinked cluster) and returns
/// those deleted (or already gone); one the kernel refuses is logged and left, to be
/// tried again next time.
pub async fn remove(nl: &Netlink, ranges: &[IpCidr]) -> Vec<IpCidr> {
    let mut removed = Vec::new();
    for &dst in ranges {
        match nl.del_fail_closed(dst).await {
            Ok(()) => {
                info!(%dst, "fail-closed route removed: its cluster is no longer linked");
                removed.push(dst);
            }
            Err(e) => {
                warn!(%dst, error = %e, "fail-closed route of an unlinked cluster not removed")
            }
        }
    }
    removed
}

/// `wiremesh-agent cleanup`: removes the persisted set, then every fail-closed route.
///
/// # Errors
/// When the file cannot be removed, the routes cannot be listed, or some route cannot be
/// deleted (after trying them all).
pub async fn cleanup(nl: &Netlink, state_dir: &Path) -> anyhow::Result<usize> {
    let path = state_dir.join(FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::Error::new(e).context(format!("removing {}", path.display()))),
    }
    let mut removed = 0;
    let mut failed = Vec::new();
    for dst in nl.fail_closed_routes().await? {
        match nl.del_fail_closed(dst).await {
            Ok(()) => {
                info!(%dst, "fail-closed route removed");
                removed += 1;
            }
            Err(e) => failed.push(format!("{dst}: {e}")),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("fail-closed routes left: {}", failed.join(", "));
    }
    Ok(removed)
}

/// `wiremesh-agent cleanup`: [`cleanup`] on a netlink socket of its own.
///
/// # Errors
/// When the agent lacks `CAP_NET_ADMIN`, or as [`cleanup`].
pub async fn run_cleanup(state_dir: &Path) -> anyhow::Result<usize> {
    crate::preflight()?;
    let nl = Netlink::new().await?;
    cleanup(&nl, state_dir).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_stays_when_it_is_no_longer_routed() {
        let mut set = FailClosed::default();
        let owners = owned("b", &["10.2.1.0/24", "10.2.2.0/24"]);
        assert!(set.extend(&cidrs(&["10.2.1.0/24", "10.2.2.0/24"]), &owners));
        // The peer behind 10.2.2.0/24 was removed by policy: its range stays.
        assert!(!set.extend(&cidrs(&["10.2.1.0/24"]), &owned("b", &["10.2.1.0/24"])));
        assert_eq!(set.ranges(), &owners);
        // Its cluster is still linked: nothing is to be removed.
        assert!(
            set.unlinked(&names(&["b"]), &cidrs(&["10.2.1.0/24"]))
                .is_empty()
        );
        // A new range joins the set.
        assert!(set.extend(&cidrs(&["fd10:2:0:3::/64"]), &BTreeMap::new()));
        assert_eq!(set.ranges().len(), 3);
    }

    #[test]
    fn an_unlinked_clusters_ranges_go_once_no_longer_routed() {
        let mut set = FailClosed::default();
        let mut owners = owned("b", &["10.2.1.0/24", "10.2.2.0/24"]);
        owners.extend(owned("c", &["10.3.1.0/24"]));
        owners.insert("10.250.0.5/32".parse().unwrap(), Owner::Local);
        let all = owners.keys().copied().collect();
        assert!(set.extend(&all, &owners));
        set.ranges
            .insert("10.9.0.0/16".parse().unwrap(), Owner::Unknown);
        // `meshctl unjoin b`: its PeerCluster is gone, its MeshPeers not yet.
        let linked = names(&["c"]);
        assert!(set.unlinked(&linked, &all).is_empty());
        // The controller removed b's MeshPeers: b's ranges, and only those, go.
        let routed = cidrs(&["10.3.1.0/24", "10.250.0.5/32"]);
        let gone = set.unlinked(&linked, &routed);
        assert_eq!(gone, vec![cidr("10.2.1.0/24"), cidr("10.2.2.0/24")]);
        assert!(set.forget(&gone));
        assert_eq!(
            set.ranges().keys().copied().collect::<BTreeSet<_>>(),
            cidrs(&["10.250.0.5/32", "10.3.1.0/24", "10.9.0.0/16"])
        );
        // No cluster linked at all: this cluster's hosts and the unknown ones still stay.
        let gone = set.unlinked(&BTreeSet::new(), &BTreeSet::new());
        assert_eq!(gone, vec![cidr("10.3.1.0/24")]);
        assert!(set.forget(&gone));
        assert!(!set.forget(&gone));
        assert_eq!(set.ranges().len(), 2);
    }

    #[test]
    fn a_known_owner_replaces_an_unknown_one_never_the_reverse() {
        // An old file: a CIDR a line, owner unknown.
        let (persisted, errors) = parse("10.2.1.0/24\n10.2.2.0/24\n");
        assert!(errors.is_empty());
        assert!(persisted.values().all(|o| *o == Owner::Unknown));
        let mut set = FailClosed::new(persisted);
        // The restored peers say whose 10.2.1.0/24 is.
        assert!(set.extend(&cidrs(&["10.2.1.0/24"]), &owned("b", &["10.2.1.0/24"])));
        assert_eq!(
            set.ranges()[&cidr("10.2.1.0/24")],
            Owner::Cluster("b".into())
        );
        // Routed again before the owners caught up: the owner stays.
        assert!(!set.extend(&cidrs(&["10.2.1.0/24"]), &BTreeMap::new()));
        assert_eq!(
            set.ranges()[&cidr("10.2.1.0/24")],
            Owner::Cluster("b".into())
        );
        // Written back in the new format, read back the same.
        let text = print(set.ranges());
        assert!(text.contains("\n10.2.1.0/24 cluster=b\n"), "{text}");
        assert!(text.contains("\n10.2.2.0/24\n"), "{text}");
        assert_eq!(parse(&text), (set.ranges().clone(), Vec::new()));
        // Nobody claims 10.2.2.0/24: unlinking every cluster leaves it.
        assert_eq!(
            set.unlinked(&BTreeSet::new(), &BTreeSet::new()),
            vec![cidr("10.2.1.0/24")]
        );
    }

    #[test]
    fn a_restart_starts_from_the_persisted_set() {
        let (persisted, errors) = parse(&print(&owned("b", &["10.2.1.0/24", "fd10:2::/64"])));
        assert!(errors.is_empty());
        let mut set = FailClosed::new(persisted);
        // No route yet at start: the persisted ranges are all to be installed.
        assert_eq!(
            set.missing(&BTreeSet::new()),
            vec![cidr("10.2.1.0/24"), cidr("fd10:2::/64")]
        );
        assert!(!set.extend(&cidrs(&["10.2.1.0/24"]), &owned("b", &["10.2.1.0/24"])));
    }

    #[test]
    fn only_missing_routes_are_added_and_none_removed() {
        let set = FailClosed::new(owned("b", &["10.2.1.0/24", "10.2.2.0/24"]));
        let installed = cidrs(&["10.2.1.0/24", "10.9.0.0/16"]);
        assert_eq!(set.missing(&installed), vec![cidr("10.2.2.0/24")]);
    }

    #[test]
    fn a_reset_keeps_only_what_is_routed_now() {
        let mut set = FailClosed::new(owned("b", &["10.2.1.0/24", "10.2.2.0/24"]));
        set.reset(&cidrs(&["10.2.1.0/24"]), &owned("c", &["10.2.1.0/24"]));
        assert_eq!(set.ranges(), &owned("c", &["10.2.1.0/24"]));
    }

    #[test]
    fn bad_lines_are_named_and_the_rest_kept() {
        let (ranges, errors) = parse(
            "# comment\n10.2.1.0/24 cluster=b\n\nnot-a-cidr\n10.2.0.0/33\n::/0 local\n\
             10.4.0.0/16 cluster=Bad_Name\n10.5.0.0/16 cluster=e extra\n10.6.0.0/16 cluster=\n",
        );
        assert_eq!(ranges.len(), 5);
        assert_eq!(ranges[&cidr("10.2.1.0/24")], Owner::Cluster("b".into()));
        assert_eq!(ranges[&cidr("::/0")], Owner::Local);
        // A CIDR with a bad owner is kept, as unknown: failing closed.
        assert_eq!(ranges[&cidr("10.4.0.0/16")], Owner::Unknown);
        assert_eq!(ranges[&cidr("10.5.0.0/16")], Owner::Unknown);
        assert_eq!(ranges[&cidr("10.6.0.0/16")], Owner::Unknown);
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 5, 7, 8, 9]);
        assert_eq!(errors[0].text, "not-a-cidr");
        assert!(errors[1].to_string().starts_with("line 5: \"10.2.0.0/33\""));
        assert!(errors[2].to_string().contains("Bad_Name"), "{}", errors[2]);
    }

    #[test]
    fn print_then_parse_is_the_identity() {
        let mut ranges = owned("b", &["0.0.0.0/0", "10.2.1.0/24"]);
        ranges.insert(cidr("::/0"), Owner::Unknown);
        ranges.insert(cidr("fd10:2:0:1::/64"), Owner::Local);
        assert_eq!(parse(&print(&ranges)), (ranges, Vec::new()));
    }

    #[test]
    fn an_owner_is_local_for_this_clusters_own_machines() {
        assert_eq!(Owner::of_cluster(""), Owner::Local);
        assert_eq!(Owner::of_cluster("b"), Owner::Cluster("b".into()));
    }

    #[test]
    fn a_linked_clusters_allowance_never_covers_the_node_or_this_cluster() {
        let protected = Protected {
            addresses: ["198.18.1.1", "198.18.1.254", "198.18.2.1", "fd18:1::1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            ranges: vec![cidr("10.1.0.0/16"), cidr("10.96.0.0/12")],
        };
        let mut allowances = owned("b", &["10.2.0.0/16", "fd10:2::/48", "192.0.2.0/24"]);
        allowances.extend(owned(
            "evil",
            &[
                "0.0.0.0/0",
                "::/0",
                "198.18.1.0/24",
                "198.18.2.1/32",
                "fd18::/16",
                "10.0.0.0/8",
                "10.1.7.0/24",
                "10.100.0.0/16",
            ],
        ));
        let (admitted, refused) = screen(&allowances, &protected);
        assert_eq!(
            admitted,
            owned("b", &["10.2.0.0/16", "fd10:2::/48", "192.0.2.0/24"])
        );
        let refused: BTreeMap<IpCidr, Refusal> = refused
            .into_iter()
            .map(|(c, owner, why)| {
                assert_eq!(owner, Owner::Cluster("evil".into()));
                (c, why)
            })
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(refused[&cidr("0.0.0.0/0")], Refusal::Default);
        assert_eq!(refused[&cidr("::/0")], Refusal::Default);
        // A node address and the default gateway.
        assert_eq!(
            refused[&cidr("198.18.1.0/24")],
            Refusal::Address(ip("198.18.1.1"))
        );
        // A peer's endpoint.
        assert_eq!(
            refused[&cidr("198.18.2.1/32")],
            Refusal::Address(ip("198.18.2.1"))
        );
        assert_eq!(
            refused[&cidr("fd18::/16")],
            Refusal::Address(ip("fd18:1::1"))
        );
        // Over, inside, or over the service CIDR: all overlap.
        assert_eq!(
            refused[&cidr("10.0.0.0/8")],
            Refusal::Local(cidr("10.1.0.0/16"))
        );
        assert_eq!(
            refused[&cidr("10.1.7.0/24")],
            Refusal::Local(cidr("10.1.0.0/16"))
        );
        assert_eq!(
            refused[&cidr("10.100.0.0/16")],
            Refusal::Local(cidr("10.96.0.0/12"))
        );
        assert_eq!(refused.len(), 8);
        assert!(
            Refusal::Address(ip("198.18.1.1"))
                .to_string()
                .contains("198.18.1.1")
        );
    }

    #[test]
    fn a_closed_range_that_comes_to_cover_the_node_goes_unless_routed() {
        let mut set = FailClosed::new(owned("b", &["10.2.0.0/16", "198.18.9.0/24"]));
        set.ranges.insert(cidr("198.18.8.0/24"), Owner::Local);
        set.ranges.insert(cidr("198.18.7.0/24"), Owner::Unknown);
        let protected = Protected {
            addresses: ["198.18.9.1", "198.18.8.1", "198.18.7.1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            ranges: Vec::new(),
        };
        // Routed now: its tunnel route covers it anyway; it stays until it is not.
        assert!(
            set.conflicting(&protected, &cidrs(&["198.18.9.0/24"]))
                .is_empty()
        );
        assert_eq!(
            set.conflicting(&protected, &BTreeSet::new()),
            vec![cidr("198.18.9.0/24")]
        );
    }

    #[test]
    fn a_failed_install_or_save_is_retried_counted_and_not_ready() {
        let mut standing = Standing::default();
        assert!(!standing.must_save(false));
        assert!(standing.must_save(true));
        // The write fails: the next pass writes again even with no change.
        standing.saved(false);
        assert!(standing.must_save(false));
        assert!(standing.problem().unwrap().contains("not persisted"));
        // And a route could not be added.
        standing.installed(Some(vec![cidr("10.2.0.0/16")]));
        let problem = standing.problem().unwrap();
        assert!(
            problem.contains("10.2.0.0/16") && problem.contains("not persisted"),
            "{problem}"
        );
        assert_eq!(standing.errors(), 2);
        // Routes that cannot even be listed.
        standing.installed(None);
        assert!(standing.problem().unwrap().contains("cannot be listed"));
        assert_eq!(standing.errors(), 3);
        assert!(
            Standing::default().problem().is_some(),
            "not ready before a first pass"
        );
        // The next pass succeeds: ready, nothing more to write.
        standing.saved(true);
        standing.installed(Some(Vec::new()));
        assert_eq!(standing.problem(), None);
        assert!(!standing.must_save(false));
        assert_eq!(standing.errors(), 3);
    }

    fn cidr(text: &str) -> IpCidr {
        text.parse().unwrap()
    }

    fn cidrs(texts: &[&str]) -> BTreeSet<IpCidr> {
        texts.iter().map(|t| cidr(t)).collect()
    }

    fn owned(cluster: &str, texts: &[&str]) -> BTreeMap<IpCidr, Owner> {
        texts
            .iter()
            .map(|t| (cidr(t), Owner::of_cluster(cluster)))
            .collect()
    }

    fn names(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }
}
