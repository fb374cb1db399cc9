//! Longest-prefix-match table for cryptokey routing.
//!
//! Entries are kept in a `BTreeMap` (the source of truth, iterated in order) and indexed by
//! prefix length: one hash map per length that occurs, searched from the longest length
//! down. A lookup costs one hash probe per distinct prefix length in use, which is a
//! handful in practice and at most 33 (IPv4) or 129 (IPv6).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use wiremesh_proto::IpCidr;

/// Maps IP prefixes to values; [`lookup`](Self::lookup) finds the longest prefix holding an
/// address.
#[derive(Debug, Clone)]
pub struct AllowedIps<T: Copy> {
    entries: BTreeMap<IpCidr, T>,
    v4: Vec<(u8, FastMap<u32, T>)>,
    v6: Vec<(u8, FastMap<u128, T>)>,
}

impl<T: Copy> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<T: Copy> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `cidr` to `value`, returning the value it replaced.
    pub fn insert(&mut self, cidr: IpCidr, value: T) -> Option<T> {
        match cidr.addr() {
            IpAddr::V4(a) => level(&mut self.v4, cidr.prefix_len()).insert(u32::from(a), value),
            IpAddr::V6(a) => level(&mut self.v6, cidr.prefix_len()).insert(u128::from(a), value),
        };
        self.entries.insert(cidr, value)
    }

    /// Removes `cidr`, returning its value.
    pub fn remove(&mut self, cidr: &IpCidr) -> Option<T> {
        let old = self.entries.remove(cidr)?;
        match cidr.addr() {
            IpAddr::V4(a) => unlevel(&mut self.v4, cidr.prefix_len(), &u32::from(a)),
            IpAddr::V6(a) => unlevel(&mut self.v6, cidr.prefix_len(), &u128::from(a)),
        }
        Some(old)
    }

    /// The value of the longest prefix that holds `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<T> {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                self.v4.iter().find_map(|(len, map)| {
                    let mask = if *len == 0 {
                        0
                    } else {
                        u32::MAX << (32 - u32::from(*len))
                    };
                    map.get(&(bits & mask)).copied()
                })
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                self.v6.iter().find_map(|(len, map)| {
                    let mask = if *len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - u32::from(*len))
                    };
                    map.get(&(bits & mask)).copied()
                })
            }
        }
    }

    /// The value stored for exactly `cidr`.
    pub fn exact(&self, cidr: &IpCidr) -> Option<T> {
        self.entries.get(cidr).copied()
    }

    /// Every entry, in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (IpCidr, T)> + '_ {
        self.entries.iter().map(|(c, v)| (*c, *v))
    }

    /// Removes every entry whose value fails `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpCidr, T) -> bool) {
        let doomed: Vec<IpCidr> = self
            .entries
            .iter()
            .filter(|(c, v)| !keep(c, **v))
            .map(|(c, _)| *c)
            .collect();
        for c in doomed {
            self.remove(&c);
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The map for prefix length `len`, created in longest-first order if missing.
#[allow(
    clippy::indexing_slicing,
    reason = "positions come from a binary search of the same vector; no packet data"
)]
fn level<K, T>(levels: &mut Vec<(u8, FastMap<K, T>)>, len: u8) -> &mut FastMap<K, T> {
    let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(pos) => pos,
        Err(pos) => {
            levels.insert(pos, (len, FastMap::default()));
            pos
        }
    };
    &mut levels[pos].1
}

#[allow(
    clippy::indexing_slicing,
    reason = "positions come from a binary search of the same vector; no packet data"
)]
fn unlevel<K: std::hash::Hash + Eq, T>(levels: &mut Vec<(u8, FastMap<K, T>)>, len: u8, key: &K) {
    if let Ok(pos) = levels.binary_search_by(|(l, _)| len.cmp(l)) {
        levels[pos].1.remove(key);
        if levels[pos].1.is_empty() {
            levels.remove(pos);
        }
    }
}

/// Hash maps keyed by addresses we chose to store: no attacker picks the key set, so
/// a fast non-keyed hash is fine (the lookup keys come from packets, but only probe).
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The multiply-rotate hash of rustc's `FxHasher`.
#[derive(Default)]
struct FxHasher(u64);

/// From rustc-hash: a 64-bit odd constant with good bit dispersion.
const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(FX_SEED);
    }
    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn c(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    #[test]
    fn longer_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(c("10.0.0.0/8"), 1);
        t.insert(c("10.1.0.0/16"), 2);
        t.insert(c("10.1.2.3/32"), 3);
        assert_eq!(t.lookup("10.9.9.9".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("10.1.9.9".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(3));
        assert_eq!(t.lookup("11.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn default_route_and_families_are_separate() {
        let mut t = AllowedIps::new();
        t.insert(c("0.0.0.0/0"), 1);
        assert_eq!(t.lookup("203.0.113.1".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), None);
        t.insert(c("::/0"), 2);
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), Some(2));
    }

    #[test]
    fn removal_falls_back_to_shorter_prefix() {
        let mut t = AllowedIps::new();
        t.insert(c("10.0.0.0/8"), 1);
        t.insert(c("10.1.0.0/16"), 2);
        assert_eq!(t.remove(&c("10.1.0.0/16")), Some(2));
        assert_eq!(t.lookup("10.1.0.1".parse().unwrap()), Some(1));
        assert_eq!(t.remove(&c("10.1.0.0/16")), None);
    }

    #[test]
    fn retain_drops_one_peers_prefixes() {
        let mut t = AllowedIps::new();
        t.insert(c("10.0.0.0/24"), 1);
        t.insert(c("10.0.1.0/24"), 2);
        t.insert(c("fd00::/64"), 1);
        t.retain(|_, v| v != 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), None);
        assert_eq!(t.lookup("10.0.1.1".parse().unwrap()), Some(2));
    }

    fn naive(entries: &[(IpCidr, u32)], ip: IpAddr) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        let mut table = BTreeMap::new();
        for (c, v) in entries {
            table.insert(*c, *v);
        }
        for (c, v) in table {
            if c.contains(ip) && best.is_none_or(|(l, _)| c.prefix_len() > l) {
                best = Some((c.prefix_len(), v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn v4_cidr() -> impl Strategy<Value = IpCidr> {
        // A small address space so that prefixes nest and collide often.
        (0u32..16, 0u8..=32)
            .prop_map(|(a, l)| IpCidr::new(IpAddr::V4((a << 28 | a << 4).into()), l).unwrap())
    }

    fn v6_cidr() -> impl Strategy<Value = IpCidr> {
        (0u128..16, 0u8..=128)
            .prop_map(|(a, l)| IpCidr::new(IpAddr::V6((a << 124 | a).into()), l).unwrap())
    }

    proptest! {
        #[test]
        fn agrees_with_a_naive_longest_prefix_scan(
            entries in proptest::collection::vec((prop_oneof![v4_cidr(), v6_cidr()], 0u32..5), 0..40),
            removals in proptest::collection::vec(0usize..40, 0..10),
            probes in proptest::collection::vec(prop_oneof![
                (0u32..16, any::<u32>()).prop_map(|(a, r)| IpAddr::V4((a << 28 | (r & 0xff)).into())),
                (0u128..16, any::<u16>()).prop_map(|(a, r)| IpAddr::V6((a << 124 | u128::from(r)).into())),
            ], 1..40),
        ) {
            let mut table = AllowedIps::new();
            let mut kept: Vec<(IpCidr, u32)> = Vec::new();
            for (c, v) in &entries {
                table.insert(*c, *v);
                kept.retain(|(k, _)| k != c);
                kept.push((*c, *v));
            }
            for r in removals {
                if let Some((c, _)) = kept.get(r).copied() {
                    table.remove(&c);
                    kept.retain(|(k, _)| *k != c);
                }
            }
            prop_assert_eq!(table.len(), kept.len());
            for ip in probes {
                prop_assert_eq!(table.lookup(ip), naive(&kept, ip), "ip {}", ip);
            }
        }
    }
}
