//! A `PeerCluster`'s status from what the last sync saw: the conditions `Ready`, `Stale`
//! and `Conflict`, the node count and the last sync time, plus the transitions worth an
//! Event.
//!
//! Pure: the caller passes the previous status and `now`. A condition's
//! `lastTransitionTime` changes only when its status flips; an Event is due only on a
//! transition, so a controller that restarts or resyncs does not repeat them.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use wiremesh_proto::crd::PeerClusterStatus;

use crate::plan::Conflict;

/// Condition: the remote nodes are mirrored from a live watch.
pub const READY: &str = "Ready";
/// Condition: the remote API server cannot be read; the last known peers are kept.
pub const STALE: &str = "Stale";
/// Condition: at least one remote node was refused.
pub const CONFLICT: &str = "Conflict";

/// How often `lastSyncTime` is refreshed while nothing else changes. Every status write
/// wakes every watcher of PeerClusters, so not on every 10 s resync; `meshctl status`
/// shows minutes anyway.
pub const SYNC_HEARTBEAT: Duration = Duration::from_secs(30);

/// Longest condition message we write. The API allows 32 KiB; a few hundred conflicts
/// are already unreadable in `kubectl describe`.
const MAX_MESSAGE: usize = 4 << 10;

/// What a sync found.
#[derive(Debug, Clone, Copy)]
pub enum Observation<'a> {
    /// The remote was read and the plan applied.
    Synced {
        /// Remote nodes mirrored.
        node_count: usize,
        /// Remote nodes refused.
        conflicts: &'a [Conflict],
    },
    /// The remote could not be read (or the link is not usable); the `MeshPeer`s were left
    /// as they were.
    Stale {
        /// A CamelCase reason, such as `RemoteUnreachable` or `CredentialsMissing`.
        reason: &'a str,
        /// What went wrong, for people.
        message: &'a str,
    },
}

/// The status to write, if anything changed, and the Events due.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The new status.
    pub status: PeerClusterStatus,
    /// False when the status is the previous one (no write needed).
    pub changed: bool,
    /// Transitions to announce with an Event, in order.
    pub transitions: Vec<Transition>,
}

/// A change worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// `Ready` became True.
    Ready {
        /// The condition's message.
        message: String,
    },
    /// `Stale` became True.
    Stale {
        /// Its reason.
        reason: String,
        /// Its message.
        message: String,
    },
    /// `Conflict` became True, or its set of refused nodes changed.
    Conflict {
        /// The refused nodes and CIDRs.
        message: String,
    },
    /// `Conflict` became False.
    ConflictResolved,
}

impl Transition {
    /// `(Warning?, reason, note)` for a Kubernetes Event.
    pub fn event(&self) -> (bool, &'static str, String) {
        match self {
            Transition::Ready { message } => (false, "Ready", message.clone()),
            Transition::Stale { reason, message } => {
                (true, "Stale", format!("{reason}: {message}"))
            }
            Transition::Conflict { message } => (true, "Conflict", message.clone()),
            Transition::ConflictResolved => (
                false,
                "ConflictResolved",
                "no remote node is refused any more".to_owned(),
            ),
        }
    }
}

/// The status after `observation`, given the previous one.
pub fn next(
    previous: Option<&PeerClusterStatus>,
    generation: Option<i64>,
    observation: &Observation<'_>,
    now: Timestamp,
) -> Update {
    let previous = previous.cloned().unwrap_or_default();
    let mut status = previous.clone();
    status.observed_generation = generation;
    let mut transitions = Vec::new();
    let set =
        |status: &mut PeerClusterStatus, type_: &str, on: bool, reason: &str, message: String| {
            set_condition(
                &mut status.conditions,
                type_,
                on,
                reason,
                message,
                generation,
                now,
            )
        };
    match *observation {
        Observation::Synced {
            node_count,
            conflicts,
        } => {
            status.node_count = i32::try_from(node_count).unwrap_or(i32::MAX);
            let ready_message = format!("{node_count} remote nodes mirrored");
            if set(&mut status, READY, true, "Synced", ready_message.clone()) {
                transitions.push(Transition::Ready {
                    message: ready_message,
                });
            }
            set(
                &mut status,
                STALE,
                false,
                "Live",
                "the remote API server answers".to_owned(),
            );
            let was_conflict = is_true(&previous, CONFLICT);
            if conflicts.is_empty() {
                if set(
                    &mut status,
                    CONFLICT,
                    false,
                    "NoConflict",
                    "every remote node is mirrored".to_owned(),
                ) && was_conflict
                {
                    transitions.push(Transition::ConflictResolved);
                }
            } else {
                let message = conflict_message(conflicts);
                let old_message = condition(&previous, CONFLICT).map(|c| c.message.as_str());
                set(&mut status, CONFLICT, true, "NodeRefused", message.clone());
                if !was_conflict || old_message != Some(message.as_str()) {
                    transitions.push(Transition::Conflict { message });
                }
            }
        }
        Observation::Stale { reason, message } => {
            if set(&mut status, STALE, true, reason, message.to_owned()) {
                transitions.push(Transition::Stale {
                    reason: reason.to_owned(),
                    message: message.to_owned(),
                });
            }
            set(
                &mut status,
                READY,
                false,
                reason,
                format!("keeping the last known peers: {message}"),
            );
        }
    }
    let heartbeat_due = matches!(observation, Observation::Synced { .. })
        && previous.last_sync_time.as_ref().is_none_or(|t| {
            now.duration_since(t.0) >= SignedDuration::try_from(SYNC_HEARTBEAT).unwrap_or_default()
        });
    let changed = status != previous || heartbeat_due;
    if changed && matches!(observation, Observation::Synced { .. }) {
        status.last_sync_time = Some(Time(now));
    }
    Update {
        status,
        changed,
        transitions,
    }
}

/// The condition of `type_`, if set.
pub fn condition<'a>(status: &'a PeerClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of `type_` is set to True.
pub fn is_true(status: &PeerClusterStatus, type_: &str) -> bool {
    condition(status, type_).is_some_and(|c| c.status == "True")
}

/// One line per refused node and CIDR, cut at [`MAX_MESSAGE`].
fn conflict_message(conflicts: &[Conflict]) -> String {
    let mut message = format!(
        "{} remote node{} refused: ",
        conflicts.len(),
        if conflicts.len() == 1 { "" } else { "s" }
    );
    for (i, conflict) in conflicts.iter().enumerate() {
        let line = conflict.to_string();
        if message.len() + line.len() + 2 > MAX_MESSAGE {
            message.push_str(&format!("; and {} more", conflicts.len() - i));
            break;
        }
        if i > 0 {
            message.push_str("; ");
        }
        message.push_str(&line);
    }
    message
}

/// Sets a condition; returns true when its status flipped (or it is new and True).
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if on { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let flipped = c.status != status;
            if flipped {
                c.status = status.to_owned();
                c.last_transition_time = Time(now);
            }
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = generation;
            flipped
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                observed_generation: generation,
                last_transition_time: Time(now),
            });
            conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
            on
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::plan::Reason;

    use super::*;

    #[test]
    fn first_sync_is_ready_with_one_event() {
        let u = next(None, Some(1), &synced(3, &[]), t(0));
        assert!(u.changed);
        assert!(is_true(&u.status, READY));
        assert!(!is_true(&u.status, STALE));
        assert!(!is_true(&u.status, CONFLICT));
        assert_eq!(u.status.node_count, 3);
        assert_eq!(u.status.last_sync_time, Some(Time(t(0))));
        assert_eq!(u.status.observed_generation, Some(1));
        assert!(
            u.status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(1))
        );
        assert_eq!(
            u.transitions,
            [Transition::Ready {
                message: "3 remote nodes mirrored".into()
            }]
        );
    }

    #[test]
    fn resync_without_change_writes_nothing_until_the_heartbeat() {
        let first = next(None, Some(1), &synced(3, &[]), t(0)).status;
        let again = next(Some(&first), Some(1), &synced(3, &[]), t(10));
        assert!(!again.changed);
        assert!(again.transitions.is_empty());
        assert_eq!(again.status, first);
        let later = next(Some(&first), Some(1), &synced(3, &[]), t(31));
        assert!(later.changed);
        assert!(later.transitions.is_empty());
        assert_eq!(later.status.last_sync_time, Some(Time(t(31))));
        // The conditions did not flip.
        assert_eq!(later.status.conditions, first.conditions);
    }

    #[test]
    fn stale_keeps_node_count_and_sync_time_and_flips_ready() {
        let live = next(None, Some(1), &synced(3, &[]), t(0)).status;
        let stale = next(Some(&live), Some(1), &unreachable(), t(5));
        assert!(stale.changed);
        assert!(is_true(&stale.status, STALE));
        assert!(!is_true(&stale.status, READY));
        assert_eq!(stale.status.node_count, 3);
        assert_eq!(stale.status.last_sync_time, Some(Time(t(0))));
        assert_eq!(
            condition(&stale.status, STALE)
                .unwrap()
                .last_transition_time,
            Time(t(5))
        );
        assert_eq!(
            stale.transitions,
            [Transition::Stale {
                reason: "RemoteUnreachable".into(),
                message: "connection refused".into()
            }]
        );
        // Still stale: no new event, no new transition time.
        let still = next(Some(&stale.status), Some(1), &unreachable(), t(15));
        assert!(still.transitions.is_empty());
        assert!(!still.changed);
        // Back: Ready again, one event.
        let back = next(Some(&stale.status), Some(1), &synced(3, &[]), t(20));
        assert!(is_true(&back.status, READY) && !is_true(&back.status, STALE));
        assert_eq!(back.transitions.len(), 1);
        assert_eq!(
            condition(&back.status, READY).unwrap().last_transition_time,
            Time(t(20))
        );
        assert_eq!(back.status.last_sync_time, Some(Time(t(20))));
    }

    #[test]
    fn conflict_names_node_and_cidr_and_fires_on_change_only() {
        let one = [conflict("evil", "10.1.0.0/24")];
        let u = next(None, Some(1), &synced(2, &one), t(0));
        assert!(is_true(&u.status, CONFLICT));
        let message = &condition(&u.status, CONFLICT).unwrap().message;
        assert!(
            message.contains("evil") && message.contains("10.1.0.0/24"),
            "{message}"
        );
        assert!(matches!(&u.transitions[1], Transition::Conflict { message: m } if m == message));
        let same = next(Some(&u.status), Some(1), &synced(2, &one), t(1));
        assert!(same.transitions.is_empty());
        let two = [
            conflict("evil", "10.1.0.0/24"),
            conflict("worse", "10.1.1.0/24"),
        ];
        let more = next(Some(&u.status), Some(1), &synced(2, &two), t(2));
        assert_eq!(more.transitions.len(), 1);
        // Still True: the transition time stays.
        assert_eq!(
            condition(&more.status, CONFLICT)
                .unwrap()
                .last_transition_time,
            Time(t(0))
        );
        let gone = next(Some(&more.status), Some(1), &synced(2, &[]), t(3));
        assert_eq!(gone.transitions, [Transition::ConflictResolved]);
        assert!(!is_true(&gone.status, CONFLICT));
    }

    #[test]
    fn stale_keeps_the_conflict_condition() {
        let one = [conflict("evil", "10.1.0.0/24")];
        let live = next(None, Some(1), &synced(2, &one), t(0)).status;
        let stale = next(Some(&live), Some(1), &unreachable(), t(1)).status;
        assert!(is_true(&stale, CONFLICT));
    }

    #[test]
    fn long_conflict_lists_are_cut() {
        let many: Vec<Conflict> = (0..1000)
            .map(|i| conflict(&format!("node-{i}"), "10.1.0.0/24"))
            .collect();
        let u = next(None, Some(1), &synced(0, &many), t(0));
        let message = &condition(&u.status, CONFLICT).unwrap().message;
        assert!(message.len() <= MAX_MESSAGE + 32, "{}", message.len());
        assert!(message.starts_with("1000 remote nodes refused"));
        assert!(message.ends_with("more"));
    }

    #[test]
    fn generation_is_observed() {
        let first = next(None, Some(1), &synced(1, &[]), t(0)).status;
        let u = next(Some(&first), Some(2), &synced(1, &[]), t(1));
        assert!(u.changed);
        assert_eq!(u.status.observed_generation, Some(2));
        assert!(
            u.status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
    }

    fn synced<'a>(node_count: usize, conflicts: &'a [Conflict]) -> Observation<'a> {
        Observation::Synced {
            node_count,
            conflicts,
        }
    }

    fn unreachable() -> Observation<'static> {
        Observation::Stale {
            reason: "RemoteUnreachable",
            message: "connection refused",
        }
    }

    fn conflict(node: &str, cidr: &str) -> Conflict {
        Conflict {
            node: node.into(),
            cidr: Some(cidr.into()),
            reason: Reason::Overlaps {
                other: "10.1.0.0/16".parse().unwrap(),
                owner: crate::plan::Owner::LocalCluster {
                    cluster: "cluster-a".into(),
                },
            },
        }
    }

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }
}
