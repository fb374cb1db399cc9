//! Leader election through the `coordination.k8s.io/v1` Lease
//! `wiremesh-system/wiremesh-controller`, as client-go's `leaderelection` does it.
//!
//! Every replica looks at the Lease every `duration / 3`. The holder renews it; the others
//! take it over once they have seen no change to it for a whole `duration` on their own clock
//! (never comparing clocks across machines). Every write carries the `resourceVersion` that
//! was read, so two replicas cannot both win a takeover. The holder counts itself leader
//! only while its last successful renewal is younger than `duration * 2 / 3`, which ends
//! before anyone else may take over. On shutdown the holder releases the Lease so a
//! standby takes over at once.
//!
//! [`decide`] and [`State`] are the pure part; [`Elector::run`] does the I/O.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use wiremesh_proto::crd::SYSTEM_NAMESPACE;

/// The Lease's name (in [`SYSTEM_NAMESPACE`]).
pub const LEASE_NAME: &str = "wiremesh-controller";
/// client-go's default `LeaseDuration`.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

/// What to do after looking at the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// Someone else held it and let it expire, or released it: take it over.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it and renews it: stand by.
    Wait,
}

/// The Lease as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Its holder; `None` when released.
    pub holder: Option<String>,
    /// How long the holder's claim lasts.
    pub duration: Duration,
    /// Its `resourceVersion`, for optimistic concurrency.
    pub resource_version: Option<String>,
    /// When we (on our own clock) last saw it change.
    pub changed_at: Instant,
}

/// Decides what to do about the Lease at `now`.
pub fn decide(lease: Option<&Observed>, me: &str, now: Instant) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    match lease.holder.as_deref() {
        Some(holder) if holder == me => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(_) if now.saturating_duration_since(lease.changed_at) >= lease.duration => {
            Decision::Acquire
        }
        Some(_) => Decision::Wait,
    }
}

/// What an elector remembers between two looks at the Lease.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// The Lease as last seen (or written by us).
    pub observed: Option<Observed>,
    /// When our last successful write of the Lease as holder started.
    pub renewed_at: Option<Instant>,
}

impl State {
    /// Records a fresh read of the Lease at `now`; `default_duration` stands in for a Lease
    /// without `leaseDurationSeconds`.
    pub fn observe(&mut self, lease: Option<&Lease>, default_duration: Duration, now: Instant) {
        let Some(lease) = lease else {
            self.observed = None;
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let resource_version = lease.resource_version();
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != resource_version);
        let changed_at = match &self.observed {
            Some(o) if !changed => o.changed_at,
            _ => now,
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(default_duration, Duration::from_secs);
        self.observed = Some(Observed {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration,
            resource_version,
            changed_at,
        });
    }

    /// Records that we wrote `lease` as its holder; the write started at `started`.
    pub fn wrote(&mut self, lease: &Lease, default_duration: Duration, started: Instant) {
        self.observed = None;
        self.observe(Some(lease), default_duration, started);
        self.renewed_at = Some(started);
    }

    /// True while our claim is fresh enough to act on: renewed within `renew_deadline` and
    /// not taken by someone else since.
    pub fn leading(&self, me: &str, renew_deadline: Duration, now: Instant) -> bool {
        let holder_is_me = self
            .observed
            .as_ref()
            .and_then(|o| o.holder.as_deref())
            .is_some_and(|h| h == me);
        holder_is_me
            && self
                .renewed_at
                .is_some_and(|t| now.saturating_duration_since(t) < renew_deadline)
    }
}

/// Takes part in the election for one identity.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
}

impl Elector {
    /// An elector for `identity` (unique per replica, such as the pod name) with the given
    /// lease duration.
    pub fn new(client: Client, identity: impl Into<String>, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, SYSTEM_NAMESPACE),
            identity: identity.into(),
            duration: duration.max(Duration::from_secs(1)),
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How often the Lease is looked at and renewed.
    pub fn retry_period(&self) -> Duration {
        self.duration / 3
    }

    /// How long a renewal counts.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Runs the election until `shutdown` turns true, publishing whether we lead on
    /// `leading` (and `reachable`: whether the last look at the Lease succeeded). On shutdown
    /// it stops leading first, then releases the Lease if it holds it.
    pub async fn run(
        self,
        leading: watch::Sender<bool>,
        reachable: watch::Sender<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut state = State::default();
        let mut seen_holder: Option<String> = None;
        let mut ticker = tokio::time::interval(self.retry_period());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let ok = match tokio::time::timeout(self.retry_period(), self.step(&mut state)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    debug!(error = %e, "leader election: lease request failed");
                    false
                }
                Err(_) => {
                    debug!("leader election: lease request timed out");
                    false
                }
            };
            reachable.send_if_modified(|r| std::mem::replace(r, ok) != ok);
            let holder = state.observed.as_ref().and_then(|o| o.holder.clone());
            if holder != seen_holder {
                if let Some(h) = holder.as_ref().filter(|h| **h != self.identity) {
                    info!(holder = %h, "standing by: another replica holds the lease");
                }
                seen_holder = holder;
            }
            let now_leading = state.leading(&self.identity, self.renew_deadline(), Instant::now());
            let was_leading = *leading.borrow();
            if now_leading != was_leading {
                if now_leading {
                    info!(identity = %self.identity, "became leader");
                } else {
                    warn!(identity = %self.identity, "lost the lease; stepping down");
                }
                leading.send_replace(now_leading);
            }
        }
        let was_leading = leading.send_replace(false);
        if was_leading || state.leading(&self.identity, self.duration, Instant::now()) {
            match tokio::time::timeout(self.retry_period(), self.release()).await {
                Ok(Ok(())) => info!(identity = %self.identity, "released the lease"),
                Ok(Err(e)) => warn!(error = %e, "releasing the lease"),
                Err(_) => warn!("releasing the lease timed out"),
            }
        }
    }

    /// One look at the Lease, and the write it calls for.
    async fn step(&self, state: &mut State) -> Result<(), kube::Error> {
        let started = Instant::now();
        let lease = self.api.get_opt(LEASE_NAME).await?;
        state.observe(lease.as_ref(), self.duration, started);
        let decision = decide(state.observed.as_ref(), &self.identity, started);
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let written = match (decision, lease) {
            (Decision::Wait, _) => return Ok(()),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.to_owned()),
                        namespace: Some(SYSTEM_NAMESPACE.to_owned()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    info!(identity = %self.identity, "taking over the lease");
                }
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(seconds);
                // `lease` carries the resourceVersion we read: a concurrent writer makes
                // this fail with 409 Conflict.
                self.api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                state.wrote(&lease, self.duration, started);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                debug!("leader election: lost a race for the lease");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up, if we still hold it, so a standby need not wait for it to expire.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "me", Instant::now()), Decision::Create);
    }

    #[test]
    fn own_lease_is_renewed() {
        let t0 = Instant::now();
        let lease = observed(Some("me"), t0);
        assert_eq!(decide(Some(&lease), "me", t0 + D * 10), Decision::Renew);
    }

    #[test]
    fn fresh_foreign_lease_is_respected() {
        let t0 = Instant::now();
        let lease = observed(Some("other"), t0);
        assert_eq!(decide(Some(&lease), "me", t0), Decision::Wait);
        assert_eq!(
            decide(Some(&lease), "me", t0 + D - Duration::from_millis(1)),
            Decision::Wait
        );
    }

    #[test]
    fn expired_foreign_lease_is_taken_over() {
        let t0 = Instant::now();
        let lease = observed(Some("other"), t0);
        assert_eq!(decide(Some(&lease), "me", t0 + D), Decision::Acquire);
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        assert_eq!(
            decide(Some(&observed(None, t0)), "me", t0),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&observed(Some(""), t0)), "me", t0),
            Decision::Acquire
        );
    }

    #[test]
    fn expiry_counts_from_the_last_change_we_saw() {
        let t0 = Instant::now();
        let mut state = State::default();
        state.observe(Some(&lease("other", "1")), D, t0);
        // The holder renews: a new resourceVersion restarts the clock.
        state.observe(Some(&lease("other", "2")), D, t0 + D / 2);
        assert_eq!(
            decide(state.observed.as_ref(), "me", t0 + D),
            Decision::Wait
        );
        // Nothing changes any more (the holder died).
        state.observe(Some(&lease("other", "2")), D, t0 + D);
        assert_eq!(
            decide(state.observed.as_ref(), "me", t0 + D + D / 2),
            Decision::Acquire
        );
    }

    #[test]
    fn the_holders_duration_counts() {
        let t0 = Instant::now();
        let mut state = State::default();
        let mut l = lease("other", "1");
        l.spec.as_mut().unwrap().lease_duration_seconds = Some(4);
        state.observe(Some(&l), D, t0);
        assert_eq!(
            decide(state.observed.as_ref(), "me", t0 + Duration::from_secs(4)),
            Decision::Acquire
        );
    }

    #[test]
    fn leadership_lasts_until_the_renew_deadline() {
        let t0 = Instant::now();
        let mut state = State::default();
        state.wrote(&lease("me", "5"), D, t0);
        let deadline = D * 2 / 3;
        assert!(state.leading("me", deadline, t0 + deadline - Duration::from_millis(1)));
        assert!(!state.leading("me", deadline, t0 + deadline));
        assert!(!state.leading("you", deadline, t0));
    }

    #[test]
    fn a_foreign_holder_ends_leadership_at_once() {
        let t0 = Instant::now();
        let mut state = State::default();
        state.wrote(&lease("me", "5"), D, t0);
        state.observe(Some(&lease("other", "6")), D, t0 + Duration::from_secs(1));
        assert!(!state.leading("me", D, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_standby_takes_over_only_after_the_leader_stepped_down() {
        // The leader renews at t0 and then dies. The standby saw that renewal at t0 + ε at
        // the earliest, so it takes over at t0 + D or later; the leader stopped at t0 + 2D/3.
        let t0 = Instant::now();
        let mut leader = State::default();
        leader.wrote(&lease("a", "7"), D, t0);
        let mut standby = State::default();
        standby.observe(Some(&lease("a", "7")), D, t0 + Duration::from_millis(10));
        let step_down = t0 + D * 2 / 3;
        assert!(!leader.leading("a", D * 2 / 3, step_down));
        assert_eq!(
            decide(standby.observed.as_ref(), "b", step_down),
            Decision::Wait
        );
        assert_eq!(
            decide(
                standby.observed.as_ref(),
                "b",
                t0 + D + Duration::from_millis(10)
            ),
            Decision::Acquire
        );
    }

    fn observed(holder: Option<&str>, at: Instant) -> Observed {
        Observed {
            holder: holder.map(str::to_owned),
            duration: D,
            resource_version: Some("1".into()),
            changed_at: at,
        }
    }

    fn lease(holder: &str, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
        }
    }
}
