//! A per-source limit on handshake work, after the cookie.
//!
//! A cookie (mac2) proves only that the sender receives datagrams at its source address,
//! not that it holds a key: once it answers cookies, a flood from one address could
//! still make us compute a Diffie-Hellman for each initiation. As the kernel module
//! (`drivers/net/wireguard/ratelimiter.c`) and wireguard-go (`ratelimiter/ratelimiter.go`)
//! do, each source address gets a token bucket: [`PACKETS_PER_SECOND`] handshake
//! messages a second, bursts of [`PACKETS_BURST`]. IPv6 sources count by /64, which one
//! host usually holds whole. The table holds at most [`MAX_SOURCES`] addresses; a new
//! one evicts the one heard from longest ago, so memory stays bounded whatever the
//! number of sources.
//!
//! Many sources together get no more than [`MAX_HANDSHAKES_PER_SECOND`]: the data plane
//! runs on the thread that does the handshakes, and 1,000 addresses that each answer
//! cookies would otherwise buy 20,000 handshakes a second between them. So that such a
//! flood cannot starve the peers we know of their handshakes, a source that is a known
//! peer's endpoint (configured, or the last one a verified packet came from) may also draw
//! on a reserve of its own, [`KNOWN_HANDSHAKES_PER_SECOND`] ([`HandshakeLimiter::allow_known`]).
//!
//! Time is a parameter: the device passes the time of its latest timer tick.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake messages a second one source may have processed (the kernel's
/// `PACKETS_PER_SECOND`, also wireguard-go's `packetsPerSecond`).
pub const PACKETS_PER_SECOND: u32 = 20;
/// Handshake messages one source may send at once (`PACKETS_BURST` in both).
pub const PACKETS_BURST: u32 = 5;
/// Sources the table remembers: the kernel's table on a host with over 1 GiB of memory
/// has 8,192 buckets (and holds up to eight times that); an evicted source only starts
/// again with a full bucket.
pub const MAX_SOURCES: usize = 8_192;

/// Handshake messages with a cookie a second, from all sources together: a forged
/// initiation costs two X25519 computations (about 0.1 ms) on the data-plane thread, so
/// at most a twentieth of a core goes to them; 10,000 peers rekey every two minutes
/// (83/s) and all of them together within 20 s.
pub const MAX_HANDSHAKES_PER_SECOND: u32 = 500;

/// Handshake messages with a cookie a second reserved for sources that are a known peer's
/// endpoint, once the budget of all sources is spent: 10,000 peers rekeying every two
/// minutes need 83 a second; this leaves room for them all to rekey within a minute.
/// Spoofing a known endpoint needs the cookie for that address, so only an attacker on
/// the path to it can draw on this.
pub const KNOWN_HANDSHAKES_PER_SECOND: u32 = 200;

/// What one message costs, in the time it takes to earn it back.
const PACKET_COST: Duration = Duration::from_millis(1_000 / PACKETS_PER_SECOND as u64);
/// A full bucket.
const TOKEN_MAX: Duration =
    Duration::from_millis(PACKETS_BURST as u64 * 1_000 / PACKETS_PER_SECOND as u64);
/// What one message costs from the budget of all sources (a full budget is one second).
const GLOBAL_COST: Duration = Duration::from_micros(1_000_000 / MAX_HANDSHAKES_PER_SECOND as u64);
/// What one message costs from the reserve of known endpoints (a full reserve is one
/// second).
const KNOWN_COST: Duration = Duration::from_micros(1_000_000 / KNOWN_HANDSHAKES_PER_SECOND as u64);

/// The token buckets of the sources heard from recently.
#[derive(Debug, Default)]
pub struct HandshakeLimiter {
    buckets: BTreeMap<Source, Bucket>,
    /// The same sources, by the time they were last heard from (oldest first).
    by_age: BTreeSet<(Instant, Source)>,
    /// The budget of all sources together, from the first message on.
    global: Option<Bucket>,
    /// The reserve of the sources that are known peers' endpoints.
    known: Option<Bucket>,
}

impl HandshakeLimiter {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a handshake message from `source` at `now` may be processed (its source
    /// has a token left, and so has the budget of all sources); counts it.
    ///
    /// `now` should not go backwards; if it does, the buckets earn nothing.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        self.allow_source(source, now) && take(&mut self.global, now, GLOBAL_COST)
    }

    /// As [`Self::allow`], for a `source` that is a known peer's endpoint: when the budget
    /// of all sources is spent (a flood from many addresses), it draws on the reserve of
    /// known endpoints instead.
    pub fn allow_known(&mut self, source: IpAddr, now: Instant) -> bool {
        self.allow_source(source, now)
            && (take(&mut self.global, now, GLOBAL_COST) || take(&mut self.known, now, KNOWN_COST))
    }

    fn allow_source(&mut self, source: IpAddr, now: Instant) -> bool {
        let key = Source::from(source);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            let heard = bucket.last;
            bucket.tokens = TOKEN_MAX.min(bucket.tokens + now.saturating_duration_since(heard));
            bucket.last = heard.max(now);
            let allowed = bucket.tokens >= PACKET_COST;
            if allowed {
                bucket.tokens -= PACKET_COST;
            }
            let last = bucket.last;
            self.by_age.remove(&(heard, key));
            self.by_age.insert((last, key));
            return allowed;
        }
        while self.buckets.len() >= MAX_SOURCES {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.buckets.remove(&oldest);
        }
        self.buckets.insert(
            key,
            Bucket {
                last: now,
                tokens: TOKEN_MAX - PACKET_COST,
            },
        );
        self.by_age.insert((now, key));
        true
    }

    /// Forgets the sources not heard from since their bucket filled up again (they
    /// would start with a full one anyway). Call now and then, e.g. at timer ticks.
    pub fn forget_idle(&mut self, now: Instant) {
        let Some(cutoff) = now.checked_sub(TOKEN_MAX) else {
            return;
        };
        while let Some(&(heard, key)) = self.by_age.first() {
            if heard > cutoff {
                break;
            }
            self.by_age.pop_first();
            self.buckets.remove(&key);
        }
    }

    /// How many sources the table holds.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Takes `cost` from a budget of one second's worth, refilled with time, full at the
/// first message; false when too little is left.
fn take(bucket: &mut Option<Bucket>, now: Instant, cost: Duration) -> bool {
    let budget = Duration::from_secs(1);
    let bucket = bucket.get_or_insert(Bucket {
        last: now,
        tokens: budget,
    });
    bucket.tokens = budget.min(bucket.tokens + now.saturating_duration_since(bucket.last));
    bucket.last = bucket.last.max(now);
    let allowed = bucket.tokens >= cost;
    if allowed {
        bucket.tokens -= cost;
    }
    allowed
}

/// What a bucket is kept for: an IPv4 address, or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.octets()),
            // An IPv4-mapped address is the IPv4 host it maps.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => {
                    let [a, b, c, d, ..] = v6.segments();
                    let mut prefix = [0u8; 8];
                    for (chunk, segment) in prefix.chunks_exact_mut(2).zip([a, b, c, d]) {
                        chunk.copy_from_slice(&segment.to_be_bytes());
                    }
                    Self::V6(prefix)
                }
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// When the source was last heard from.
    last: Instant,
    /// Credit, in time: each message costs [`PACKET_COST`], at most [`TOKEN_MAX`].
    tokens: Duration,
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn a_burst_passes_and_the_next_message_in_the_same_instant_is_refused() {
        let mut limiter = HandshakeLimiter::new();
        let now = Instant::now();
        let source = ip("198.18.0.9");
        for i in 0..PACKETS_BURST {
            assert!(limiter.allow(source, now), "message {i} of the burst");
        }
        assert!(!limiter.allow(source, now), "one over the burst");
        assert!(!limiter.allow(source, now));
        // Another source is not affected.
        assert!(limiter.allow(ip("198.18.0.10"), now));
    }

    #[test]
    fn a_source_earns_one_message_per_cost_and_a_full_burst_after_a_second() {
        let mut limiter = HandshakeLimiter::new();
        let t0 = Instant::now();
        let source = ip("198.18.0.9");
        while limiter.allow(source, t0) {}
        assert!(!limiter.allow(source, t0 + PACKET_COST / 2));
        assert!(limiter.allow(source, t0 + PACKET_COST));
        assert!(!limiter.allow(source, t0 + PACKET_COST));
        // Over any second it gets no more than the rate plus one burst.
        let mut allowed = 0;
        for ms in 0..1_000 {
            if limiter.allow(source, t0 + Duration::from_millis(1_000 + ms)) {
                allowed += 1;
            }
        }
        assert!(
            allowed <= PACKETS_PER_SECOND + PACKETS_BURST,
            "{allowed} in one second"
        );
        let later = t0 + Duration::from_secs(5);
        for i in 0..PACKETS_BURST {
            assert!(limiter.allow(source, later), "message {i} after a pause");
        }
        assert!(!limiter.allow(source, later));
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let mut limiter = HandshakeLimiter::new();
        let t0 = Instant::now() + Duration::from_secs(10);
        let source = ip("198.18.0.9");
        while limiter.allow(source, t0) {}
        assert!(!limiter.allow(source, t0 - Duration::from_secs(5)));
        assert!(!limiter.allow(source, t0));
    }

    #[test]
    fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let mut limiter = HandshakeLimiter::new();
        let now = Instant::now();
        for i in 0..PACKETS_BURST {
            assert!(limiter.allow(ip(&format!("fd00:1:2:3::{i}")), now));
        }
        assert!(!limiter.allow(ip("fd00:1:2:3:ffff::1"), now), "same /64");
        assert!(limiter.allow(ip("fd00:1:2:4::1"), now), "another /64");
        let v4 = Ipv4Addr::new(198, 18, 0, 7);
        while limiter.allow(IpAddr::V4(v4), now) {}
        assert!(!limiter.allow(IpAddr::V6(v4.to_ipv6_mapped()), now));
    }

    #[test]
    fn all_sources_together_get_a_bounded_number_per_second() {
        let mut limiter = HandshakeLimiter::new();
        let t0 = Instant::now();
        let mut allowed = 0;
        for i in 0..2_000u32 {
            let source = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i));
            for _ in 0..PACKETS_BURST {
                allowed += u32::from(limiter.allow(source, t0));
            }
        }
        assert_eq!(allowed, MAX_HANDSHAKES_PER_SECOND);
        // The budget comes back with time, for new and old sources alike.
        let later = t0 + Duration::from_millis(100);
        assert!(limiter.allow(ip("198.19.0.1"), later));
        let mut more = 1;
        while limiter.allow(IpAddr::V4(Ipv4Addr::from(0xc613_0100 + more)), later) {
            more += 1;
        }
        assert_eq!(more, MAX_HANDSHAKES_PER_SECOND / 10);
    }

    #[test]
    fn a_flood_from_many_sources_leaves_known_endpoints_their_reserve() {
        let mut limiter = HandshakeLimiter::new();
        let t0 = Instant::now();
        // 8,000 spoofed sources that answer cookies spend the budget of all sources.
        let mut allowed = 0;
        for i in 0..8_000u32 {
            let source = IpAddr::V4(Ipv4Addr::from(0xc612_4000 + i));
            allowed += u32::from(limiter.allow(source, t0));
        }
        assert_eq!(allowed, MAX_HANDSHAKES_PER_SECOND);
        assert!(!limiter.allow(ip("198.19.9.9"), t0), "budget spent");
        // A known peer's endpoint is still answered, from the reserve ...
        let peer = ip("198.18.2.1");
        assert!(limiter.allow_known(peer, t0));
        // ... which is bounded too: known endpoints together get at most the reserve.
        let mut known = 1;
        for i in 0..1_000u32 {
            let source = IpAddr::V4(Ipv4Addr::from(0xc612_8000 + i));
            known += u32::from(limiter.allow_known(source, t0));
        }
        assert_eq!(known, KNOWN_HANDSHAKES_PER_SECOND);
        // The per-source limit still holds for a known endpoint.
        let mut fresh = HandshakeLimiter::new();
        for _ in 0..PACKETS_BURST {
            assert!(fresh.allow_known(peer, t0));
        }
        assert!(!fresh.allow_known(peer, t0));
    }

    #[test]
    fn a_hundred_thousand_sources_stay_bounded() {
        let mut limiter = HandshakeLimiter::new();
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            let source = IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64));
            let now = t0 + Duration::from_micros(u64::from(i));
            // Most are refused by the budget of all sources; each is remembered.
            let _ = limiter.allow(source, now);
            assert!(limiter.len() <= MAX_SOURCES);
        }
        assert_eq!(limiter.len(), MAX_SOURCES);
        assert_eq!(limiter.by_age.len(), MAX_SOURCES);
        // The newest are the ones kept.
        let newest = IpAddr::V6(Ipv6Addr::from(99_999u128 << 64));
        while limiter.allow(newest, t0 + Duration::from_millis(100)) {}
        assert_eq!(limiter.len(), MAX_SOURCES, "still there: refused, not new");
        // And all of them go once idle.
        limiter.forget_idle(t0 + Duration::from_secs(2));
        assert!(limiter.is_empty() && limiter.by_age.is_empty());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
}
