//! Which remote nodes with a heartbeat this machine no longer hears (pure): what it
//! reports in its MeshNode's `status.unreachable`, from which the controller withdraws
//! the imported endpoints those nodes host (`controller/src/liveness.rs`).
//!
//! A node that hosts endpoints of an exported service keeps every tunnel alive with a
//! 1 s keepalive ([`super::GATEWAY_KEEPALIVE`], `MeshPeer.spec.heartbeat`): a WireGuard
//! peer that sends nothing cannot be told from a dead one, so the watched node is the one
//! that sends. Here it counts as unreachable once nothing authenticated came from it for
//! [`UNREACHABLE_AFTER`], and as back only once heard again for [`RECOVER_AFTER`], so a
//! node at the edge of the threshold does not make the report (and the imports) flap.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use wiremesh_proto::PublicKey;
use wiremesh_proto::crd::MAX_UNREACHABLE;

use super::{DEAD_AFTER, Seen};

/// Silent this long: unreachable. Three missed keepalives, as for gateways.
pub const UNREACHABLE_AFTER: Duration = DEAD_AFTER;

/// A watched peer never heard from this long after it was first watched is unreachable:
/// time for its first handshake to complete (WireGuard's Rekey-Timeout, 5 s, whitepaper
/// §6.1) and one keepalive to arrive.
pub const FIRST_HEARD_WITHIN: Duration = Duration::from_secs(6);

/// An unreachable peer counts as back once it was heard continuously (at every look) for
/// this long: one keepalive period, so that a single late datagram does not flip it.
pub const RECOVER_AFTER: Duration = Duration::from_secs(1);

/// The watched peers' state between looks.
#[derive(Debug, Clone, Default)]
pub struct Judge {
    peers: BTreeMap<PublicKey, Watch>,
}

#[derive(Debug, Clone, Copy)]
struct Watch {
    /// When it was first watched.
    since: Instant,
    /// Judged unreachable.
    unreachable: bool,
    /// While unreachable: since when it was heard at every look.
    heard_since: Option<Instant>,
}

impl Judge {
    /// Looks at the `watched` peers (key -> MeshPeer name) with what the device last saw
    /// of them (`seen`, at `now`) and answers the names of those judged unreachable:
    /// sorted, at most [`MAX_UNREACHABLE`]. A watched peer the device does not hold (not
    /// applied yet, over `--max-peers`) gets no opinion.
    pub fn judge(
        &mut self,
        watched: &BTreeMap<PublicKey, String>,
        seen: &BTreeMap<PublicKey, Seen>,
        now: Instant,
    ) -> Vec<String> {
        self.peers
            .retain(|key, _| watched.contains_key(key) && seen.contains_key(key));
        let mut out = BTreeSet::new();
        for (key, name) in watched {
            let Some(seen) = seen.get(key) else {
                continue;
            };
            let watch = self.peers.entry(*key).or_insert(Watch {
                since: now,
                unreachable: false,
                heard_since: None,
            });
            let heard = seen.since_receive.is_some_and(|d| d < UNREACHABLE_AFTER);
            let silent = match seen.since_receive {
                Some(d) => d >= UNREACHABLE_AFTER,
                None => now.saturating_duration_since(watch.since) >= FIRST_HEARD_WITHIN,
            };
            if watch.unreachable {
                if heard {
                    let since = *watch.heard_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= RECOVER_AFTER {
                        watch.unreachable = false;
                        watch.heard_since = None;
                    }
                } else {
                    watch.heard_since = None;
                }
            } else if silent {
                watch.unreachable = true;
                watch.heard_since = None;
            }
            if watch.unreachable {
                out.insert(name.clone());
            }
        }
        out.into_iter().take(MAX_UNREACHABLE).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey::from([b; 32])
    }

    fn watched(keys: &[u8]) -> BTreeMap<PublicKey, String> {
        keys.iter()
            .map(|k| (key(*k), format!("cluster-b.b{k}")))
            .collect()
    }

    /// What the device saw: key -> milliseconds since the last datagram (None: never).
    fn seen(pairs: &[(u8, Option<u64>)]) -> BTreeMap<PublicKey, Seen> {
        pairs
            .iter()
            .map(|(k, ms)| {
                let seen = Seen {
                    since_receive: ms.map(Duration::from_millis),
                    since_handshake: None,
                };
                (key(*k), seen)
            })
            .collect()
    }

    #[test]
    fn a_peer_silent_for_three_seconds_is_unreachable_until_heard_for_a_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut judge = Judge::default();
        let w = watched(&[1, 2]);
        // Keepalives every second: nothing to report.
        assert!(
            judge
                .judge(&w, &seen(&[(1, Some(900)), (2, Some(100))]), at(0))
                .is_empty()
        );
        assert!(
            judge
                .judge(&w, &seen(&[(1, Some(2900)), (2, Some(100))]), at(2000))
                .is_empty()
        );
        // b1 silent for 3 s.
        assert_eq!(
            judge.judge(&w, &seen(&[(1, Some(3000)), (2, Some(100))]), at(2100)),
            vec!["cluster-b.b1"]
        );
        // Heard once: not back yet.
        assert_eq!(
            judge.judge(&w, &seen(&[(1, Some(0)), (2, Some(100))]), at(2600)),
            vec!["cluster-b.b1"]
        );
        // Silent again before a second passed: the count starts over.
        assert_eq!(
            judge.judge(&w, &seen(&[(1, Some(3100)), (2, Some(100))]), at(3100)),
            vec!["cluster-b.b1"]
        );
        assert_eq!(
            judge.judge(&w, &seen(&[(1, Some(0)), (2, Some(100))]), at(3600)),
            vec!["cluster-b.b1"]
        );
        // Heard at every look for a second: back.
        assert_eq!(
            judge.judge(&w, &seen(&[(1, Some(500)), (2, Some(100))]), at(4100)),
            vec!["cluster-b.b1"]
        );
        assert!(
            judge
                .judge(&w, &seen(&[(1, Some(400)), (2, Some(100))]), at(4600))
                .is_empty()
        );
    }

    #[test]
    fn a_peer_never_heard_gets_time_for_its_first_handshake() {
        let t0 = Instant::now();
        let mut judge = Judge::default();
        let w = watched(&[1]);
        assert!(judge.judge(&w, &seen(&[(1, None)]), t0).is_empty());
        let later = t0 + FIRST_HEARD_WITHIN - Duration::from_millis(1);
        assert!(judge.judge(&w, &seen(&[(1, None)]), later).is_empty());
        assert_eq!(
            judge.judge(&w, &seen(&[(1, None)]), t0 + FIRST_HEARD_WITHIN),
            vec!["cluster-b.b1"]
        );
    }

    #[test]
    fn only_watched_peers_the_device_holds_are_judged() {
        let t0 = Instant::now();
        let mut judge = Judge::default();
        // b3 is silent but not watched (no heartbeat); b2 is watched but not in the device.
        let silent = seen(&[(1, Some(9000)), (3, Some(9000))]);
        assert_eq!(
            judge.judge(&watched(&[1, 2]), &silent, t0),
            vec!["cluster-b.b1"]
        );
        // No longer watched: forgotten, and judged afresh if watched again.
        assert!(judge.judge(&watched(&[2]), &silent, t0).is_empty());
        assert!(judge.peers.is_empty());
    }

    #[test]
    fn the_report_is_sorted_and_bounded() {
        let t0 = Instant::now();
        let mut judge = Judge::default();
        let w: BTreeMap<PublicKey, String> = (0..=u8::MAX)
            .flat_map(|a| (0..2u8).map(move |b| (a, b)))
            .map(|(a, b)| {
                let mut k = [a; 32];
                k[0] = b;
                (PublicKey::from(k), format!("cluster-b.n{a:03}-{b}"))
            })
            .collect();
        let silent: BTreeMap<PublicKey, Seen> = w
            .keys()
            .map(|k| {
                let seen = Seen {
                    since_receive: Some(Duration::from_secs(60)),
                    since_handshake: None,
                };
                (*k, seen)
            })
            .collect();
        let report = judge.judge(&w, &silent, t0);
        assert_eq!(report.len(), MAX_UNREACHABLE);
        assert!(report.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(report[0], "cluster-b.n000-0");
    }
}
