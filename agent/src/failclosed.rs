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
//! routes' reconciler ignores, and the agent never deletes them. The set is kept in the
//! state directory ([`FILE`]), and installed again first thing at start, before the TUN
//! device exists, so a reboot or a new node image is covered as soon as the agent starts.
//!
//! Why routes and not a persistent TUN device or an nftables drop: a device outlives a
//! SIGTERM but not a crash of the process that holds its file descriptor; a drop rule
//! needs nftables in every node image and its own ownership rules. An unreachable route is
//! one more kernel object of the kind the agent already reconciles, works the same for
//! IPv4 and IPv6, and gives senders an immediate error instead of a timeout.
//!
//! They are removed only on the user's explicit choice: `wiremesh-agent cleanup` (what
//! uninstalling, or unlinking a cluster, runs on each machine) deletes every such route
//! and the file. A running agent that finds the file gone starts the set again from the
//! ranges it routes now.
//!
//! The decisions are pure functions ([`FailClosed`], [`parse`], [`print`]); [`load`],
//! [`save`], [`install`] and [`cleanup`] are the shell.

use std::collections::BTreeSet;
use std::path::Path;

use tracing::{debug, info, warn};
use wiremesh_proto::IpCidr;

use crate::netlink::{Netlink, NetlinkError};

/// The file in the state directory that lists the fail-closed ranges, one per line.
pub const FILE: &str = "fail-closed";

/// The ranges that must never leave the node unencrypted: every range routed into the
/// tunnel since the set was last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailClosed {
    ranges: BTreeSet<IpCidr>,
}

impl FailClosed {
    /// A set starting from what was persisted.
    pub fn new(ranges: BTreeSet<IpCidr>) -> Self {
        Self { ranges }
    }

    /// The ranges.
    pub fn ranges(&self) -> &BTreeSet<IpCidr> {
        &self.ranges
    }

    /// Adds the ranges routed into the tunnel now; a range is never removed because it is
    /// no longer routed (a peer removed by policy, a tunnel torn down). True when the set
    /// grew (and must be persisted).
    #[must_use]
    pub fn extend(&mut self, routed: &BTreeSet<IpCidr>) -> bool {
        let before = self.ranges.len();
        self.ranges.extend(routed.iter().copied());
        self.ranges.len() != before
    }

    /// Starts again from the ranges routed now: the user removed the persisted set.
    pub fn reset(&mut self, routed: &BTreeSet<IpCidr>) {
        self.ranges = routed.clone();
    }

    /// The fail-closed routes to add, given those installed: the missing ones. Nothing is
    /// ever removed here; installed routes outside the set stay too.
    pub fn missing(&self, installed: &BTreeSet<IpCidr>) -> Vec<IpCidr> {
        self.ranges.difference(installed).copied().collect()
    }
}

/// A line of the fail-closed file that is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?} is not a CIDR: {reason}")]
pub struct ParseError {
    /// The line number, from 1.
    pub line: usize,
    /// The line.
    pub text: String,
    /// Why it was refused.
    pub reason: String,
}

/// Parses the fail-closed file: one CIDR per line; blank lines and `#` comments skipped.
/// Bad lines are returned as errors beside the valid ranges: failing closed means keeping
/// every range that can still be read.
pub fn parse(text: &str) -> (BTreeSet<IpCidr>, Vec<ParseError>) {
    let mut ranges = BTreeSet::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.parse::<IpCidr>() {
            Ok(cidr) => {
                ranges.insert(cidr);
            }
            Err(e) => errors.push(ParseError {
                line: i + 1,
                text: line.chars().take(64).collect(),
                reason: e.to_string(),
            }),
        }
    }
    (ranges, errors)
}

/// The fail-closed file's text for `ranges`.
pub fn print(ranges: &BTreeSet<IpCidr>) -> String {
    let mut text = String::from(
        "# Wiremesh fail-closed ranges: unreachable routes (proto 0x58) keep them off the\n\
         # underlay while no tunnel route exists. `wiremesh-agent cleanup` removes them.\n",
    );
    for range in ranges {
        text.push_str(&range.to_string());
        text.push('\n');
    }
    text
}

/// Reads the persisted set from `state_dir`: empty when there is none; bad lines are
/// logged (naming the line) and skipped.
pub fn load(state_dir: &Path) -> BTreeSet<IpCidr> {
    let path = state_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeSet::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the fail-closed ranges");
            return BTreeSet::new();
        }
    };
    let (ranges, errors) = parse(&text);
    for e in errors {
        warn!(path = %path.display(), error = %e, "skipping a fail-closed range");
    }
    ranges
}

/// Writes the set to `state_dir` atomically.
///
/// # Errors
/// When the file cannot be written.
pub fn save(state_dir: &Path, ranges: &BTreeSet<IpCidr>) -> std::io::Result<()> {
    crate::state::write_atomic(&state_dir.join(FILE), print(ranges).as_bytes())
}

/// Whether the persisted set exists (the user removes it with `wiremesh-agent cleanup`).
pub fn persisted(state_dir: &Path) -> bool {
    state_dir.join(FILE).exists()
}

/// Adds the fail-closed routes of `set` that are not installed; a route that cannot be
/// added is logged and tried again next time.
///
/// # Errors
/// [`NetlinkError::ListRoutes`] when the installed routes cannot be read.
pub async fn install(nl: &Netlink, set: &FailClosed) -> Result<usize, NetlinkError> {
    let installed = nl.fail_closed_routes().await?;
    let mut added = 0;
    for dst in set.missing(&installed) {
        match nl.add_fail_closed(dst).await {
            Ok(()) => {
                debug!(%dst, "fail-closed route installed");
                added += 1;
            }
            Err(e) => warn!(%dst, error = %e, "fail-closed route not installed"),
        }
    }
    Ok(added)
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
        assert!(set.extend(&cidrs(&["10.2.1.0/24", "10.2.2.0/24"])));
        // The peer behind 10.2.2.0/24 was removed by policy: its range stays.
        assert!(!set.extend(&cidrs(&["10.2.1.0/24"])));
        assert_eq!(set.ranges(), &cidrs(&["10.2.1.0/24", "10.2.2.0/24"]));
        // A new range joins the set.
        assert!(set.extend(&cidrs(&["fd10:2:0:3::/64"])));
        assert_eq!(set.ranges().len(), 3);
    }

    #[test]
    fn a_restart_starts_from_the_persisted_set() {
        let (persisted, errors) = parse(&print(&cidrs(&["10.2.1.0/24", "fd10:2::/64"])));
        assert!(errors.is_empty());
        let mut set = FailClosed::new(persisted);
        // No route yet at start: the persisted ranges are all to be installed.
        assert_eq!(
            set.missing(&BTreeSet::new()),
            vec![
                "10.2.1.0/24".parse::<IpCidr>().unwrap(),
                "fd10:2::/64".parse().unwrap()
            ]
        );
        assert!(!set.extend(&cidrs(&["10.2.1.0/24"])));
    }

    #[test]
    fn only_missing_routes_are_added_and_none_removed() {
        let set = FailClosed::new(cidrs(&["10.2.1.0/24", "10.2.2.0/24"]));
        let installed = cidrs(&["10.2.1.0/24", "10.9.0.0/16"]);
        assert_eq!(
            set.missing(&installed),
            vec!["10.2.2.0/24".parse::<IpCidr>().unwrap()]
        );
    }

    #[test]
    fn a_reset_keeps_only_what_is_routed_now() {
        let mut set = FailClosed::new(cidrs(&["10.2.1.0/24", "10.2.2.0/24"]));
        set.reset(&cidrs(&["10.2.1.0/24"]));
        assert_eq!(set.ranges(), &cidrs(&["10.2.1.0/24"]));
    }

    #[test]
    fn bad_lines_are_named_and_the_rest_kept() {
        let (ranges, errors) = parse("# comment\n10.2.1.0/24\n\nnot-a-cidr\n10.2.0.0/33\n::/0\n");
        assert_eq!(ranges, cidrs(&["10.2.1.0/24", "::/0"]));
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].line, 4);
        assert_eq!(errors[0].text, "not-a-cidr");
        assert_eq!(errors[1].line, 5);
        assert!(errors[1].to_string().starts_with("line 5: \"10.2.0.0/33\""));
    }

    #[test]
    fn print_then_parse_is_the_identity() {
        let ranges = cidrs(&["0.0.0.0/0", "10.2.1.0/24", "::/0", "fd10:2:0:1::/64"]);
        assert_eq!(parse(&print(&ranges)), (ranges, Vec::new()));
    }

    fn cidrs(texts: &[&str]) -> BTreeSet<IpCidr> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }
}
