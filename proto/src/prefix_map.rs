//! The 1:1 mapping between a pod CIDR and the mesh CIDR that stands for it in the mesh
//! when clusters share pod CIDRs (issue 14): addresses and prefixes only. The packet
//! rewriting is `wiremesh_core::translate`.
//!
//! IPv4, and IPv6 prefixes longer than /48: the prefix is swapped, the host part kept.
//! IPv6 prefixes of /48 or shorter: NPTv6's checksum-neutral mapping (RFC 6296 §3.2), so
//! that no checksum changes: the prefix is swapped and the subnet word (bits 48..63) is
//! adjusted so that the ones' complement sum of the address stays the same. A subnet word
//! of 0xffff cannot be mapped (RFC 6296 §3.5).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::IpCidr;

/// The longest IPv6 prefix mapped checksum-neutrally through the subnet word (RFC 6296 §3.2).
pub const NEUTRAL_MAX_PREFIX: u8 = 48;
/// Byte offset of the NPTv6 subnet word (bits 48..63) in an IPv6 address.
const SUBNET_WORD: usize = 6;
/// Length of the prefix that ends with the subnet word.
const SUBNET_END: u8 = 64;

/// One pod CIDR and its mesh CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrefixMap {
    pod: IpCidr,
    mesh: IpCidr,
    /// For an IPv6 prefix of /48 or shorter: the NPTv6 adjustment of the subnet word,
    /// pod → mesh (mesh → pod is its ones' complement).
    neutral: Option<u16>,
}

/// Which way an address is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Towards {
    /// Pod → mesh.
    Mesh,
    /// Mesh → pod.
    Pod,
}

/// Why a pod CIDR and a mesh CIDR cannot be paired.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixMapError {
    /// They differ in family or length.
    #[error("mesh CIDR {mesh} does not have the family and length of pod CIDR {pod}")]
    Shape {
        /// The pod CIDR.
        pod: IpCidr,
        /// Its mesh CIDR.
        mesh: IpCidr,
    },
    /// They overlap: every address would be translated twice.
    #[error("mesh CIDR {mesh} overlaps pod CIDR {pod}")]
    Overlap {
        /// The pod CIDR.
        pod: IpCidr,
        /// Its mesh CIDR.
        mesh: IpCidr,
    },
}

/// An IPv6 address whose subnet word is 0xffff under a checksum-neutral mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} cannot be mapped checksum-neutrally (subnet 0xffff, RFC 6296 §3.5)")]
pub struct Unmappable(pub IpAddr);

impl PrefixMap {
    /// Pairs `pod` with `mesh`.
    ///
    /// # Errors
    /// When they differ in family or length, or overlap.
    pub fn new(pod: IpCidr, mesh: IpCidr) -> Result<PrefixMap, PrefixMapError> {
        if pod.addr().is_ipv4() != mesh.addr().is_ipv4() || pod.prefix_len() != mesh.prefix_len() {
            return Err(PrefixMapError::Shape { pod, mesh });
        }
        if pod.overlaps(&mesh) {
            return Err(PrefixMapError::Overlap { pod, mesh });
        }
        let neutral = match (pod.addr(), mesh.addr()) {
            (IpAddr::V6(p), IpAddr::V6(m)) if pod.prefix_len() <= NEUTRAL_MAX_PREFIX => {
                // adj = sum(pod prefix) - sum(mesh prefix) (RFC 6296 §3.2): host bits are
                // zero in both, so the first three words are the prefixes.
                Some(ones_add(prefix_sum(p), !prefix_sum(m)))
            }
            _ => None,
        };
        Ok(PrefixMap { pod, mesh, neutral })
    }

    /// The pod CIDR.
    pub fn pod(&self) -> IpCidr {
        self.pod
    }

    /// The mesh CIDR.
    pub fn mesh(&self) -> IpCidr {
        self.mesh
    }

    /// Whether IPv6 addresses are mapped checksum-neutrally (NPTv6).
    pub fn is_neutral(&self) -> bool {
        self.neutral.is_some()
    }

    /// The same pair the other way round: what maps mesh → pod as this maps pod → mesh.
    pub fn inverse(&self) -> PrefixMap {
        PrefixMap {
            pod: self.mesh,
            mesh: self.pod,
            neutral: self.neutral.map(|adj| !adj),
        }
    }

    /// The CIDR addresses are mapped from when going `towards`.
    pub fn source(&self, towards: Towards) -> IpCidr {
        match towards {
            Towards::Mesh => self.pod,
            Towards::Pod => self.mesh,
        }
    }

    /// `ip` mapped `towards` mesh or pod; `Ok(None)` when it is not in the source CIDR.
    ///
    /// # Errors
    /// [`Unmappable`] for an IPv6 address whose subnet word is 0xffff under a neutral
    /// mapping.
    pub fn map(&self, ip: IpAddr, towards: Towards) -> Result<Option<IpAddr>, Unmappable> {
        let (from, to) = match towards {
            Towards::Mesh => (self.pod, self.mesh),
            Towards::Pod => (self.mesh, self.pod),
        };
        if !from.contains(ip) {
            return Ok(None);
        }
        match (ip, to.addr()) {
            (IpAddr::V4(a), IpAddr::V4(t)) => {
                let host = u32::from(a) & host_mask32(from.prefix_len());
                Ok(Some(IpAddr::V4(Ipv4Addr::from(u32::from(t) | host))))
            }
            (IpAddr::V6(a), IpAddr::V6(t)) => {
                let host = u128::from(a) & host_mask128(from.prefix_len());
                let mut out = (u128::from(t) | host).to_be_bytes();
                if let Some(adj) = self.neutral {
                    let adj = match towards {
                        Towards::Mesh => adj,
                        Towards::Pod => !adj,
                    };
                    let [hi, lo] = out
                        .get(SUBNET_WORD..SUBNET_WORD + 2)
                        .and_then(|w| <[u8; 2]>::try_from(w).ok())
                        .unwrap_or([0xff, 0xff]);
                    let w = u16::from_be_bytes([hi, lo]);
                    if w == 0xffff {
                        return Err(Unmappable(ip));
                    }
                    // 0xffff and 0 are both zero in ones' complement: 0 keeps the subnet
                    // word from ever being 0xffff.
                    let n = match ones_add(w, adj) {
                        0xffff => 0,
                        n => n,
                    };
                    if let Some(word) = out.get_mut(SUBNET_WORD..SUBNET_WORD + 2) {
                        word.copy_from_slice(&n.to_be_bytes());
                    }
                }
                Ok(Some(IpAddr::V6(Ipv6Addr::from(out))))
            }
            _ => Ok(None),
        }
    }

    /// A CIDR inside the source CIDR (a node's share of the pod CIDR) mapped `towards`
    /// mesh or pod; `None` when it is not inside, or when its image is not one prefix: under
    /// a neutral IPv6 mapping, a CIDR between /49 and /63 (its subnet words move by the
    /// adjustment, modulo 0xffff, and need not stay one aligned block).
    pub fn map_cidr(&self, cidr: IpCidr, towards: Towards) -> Option<IpCidr> {
        let from = self.source(towards);
        if !from.covers(&cidr) {
            return None;
        }
        if self.neutral.is_some()
            && cidr.prefix_len() > NEUTRAL_MAX_PREFIX
            && cidr.prefix_len() < SUBNET_END
        {
            return None;
        }
        let mapped = if self.neutral.is_some() && cidr.prefix_len() <= NEUTRAL_MAX_PREFIX {
            // The subnet word takes every value inside: only the prefix moves.
            let host = match cidr.addr() {
                IpAddr::V6(a) => u128::from(a) & host_mask128(from.prefix_len()),
                IpAddr::V4(_) => return None,
            };
            let to = match towards {
                Towards::Mesh => self.mesh,
                Towards::Pod => self.pod,
            };
            match to.addr() {
                IpAddr::V6(t) => IpAddr::V6(Ipv6Addr::from(u128::from(t) | host)),
                IpAddr::V4(_) => return None,
            }
        } else {
            self.map(cidr.addr(), towards).ok().flatten()?
        };
        IpCidr::new(mapped, cidr.prefix_len()).ok()
    }
}

/// The ones' complement sum of the first three 16-bit words of `a` (a /48 prefix).
fn prefix_sum(a: Ipv6Addr) -> u16 {
    let s = a.segments();
    s.iter().take(3).fold(0u16, |acc, w| ones_add(acc, *w))
}

/// Ones' complement addition of two 16-bit words.
fn ones_add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

fn host_mask32(len: u8) -> u32 {
    u32::MAX.checked_shr(u32::from(len)).unwrap_or(0)
}

fn host_mask128(len: u8) -> u128 {
    u128::MAX.checked_shr(u32::from(len)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn map(pod: &str, mesh: &str) -> PrefixMap {
        PrefixMap::new(pod.parse().unwrap(), mesh.parse().unwrap()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    fn word_sum(a: IpAddr) -> u16 {
        match a {
            IpAddr::V6(a) => a.segments().iter().fold(0, |acc, w| ones_add(acc, *w)),
            IpAddr::V4(_) => unreachable!(),
        }
    }

    #[test]
    fn ipv4_swaps_the_prefix_and_keeps_the_host_part() {
        let m = map("10.244.0.0/16", "100.64.0.0/16");
        assert_eq!(
            m.map(ip("10.244.1.7"), Towards::Mesh),
            Ok(Some(ip("100.64.1.7")))
        );
        assert_eq!(
            m.map(ip("100.64.1.7"), Towards::Pod),
            Ok(Some(ip("10.244.1.7")))
        );
        assert_eq!(m.map(ip("10.245.1.7"), Towards::Mesh), Ok(None));
        assert_eq!(
            m.map_cidr(cidr("10.244.3.0/24"), Towards::Mesh),
            Some(cidr("100.64.3.0/24"))
        );
        assert_eq!(m.map_cidr(cidr("10.0.0.0/8"), Towards::Mesh), None);
    }

    #[test]
    fn pairs_of_other_shapes_or_overlapping_are_refused() {
        let e = PrefixMap::new(cidr("10.244.0.0/16"), cidr("100.64.0.0/17")).unwrap_err();
        assert!(e.to_string().contains("100.64.0.0/17"), "{e}");
        let e = PrefixMap::new(cidr("10.244.0.0/16"), cidr("10.244.0.0/16")).unwrap_err();
        assert!(matches!(e, PrefixMapError::Overlap { .. }));
        assert!(PrefixMap::new(cidr("10.0.0.0/8"), cidr("fd00::/8")).is_err());
    }

    #[test]
    fn a_neutral_ipv6_mapping_keeps_the_sum_and_the_interface_identifier() {
        let m = map("fd00:10:244::/48", "fd64:aaaa:1::/48");
        let pod = ip("fd00:10:244:1::2");
        let mesh = m.map(pod, Towards::Mesh).unwrap().unwrap();
        assert!(cidr("fd64:aaaa:1::/48").contains(mesh));
        assert_eq!(word_sum(pod) % 0xffff, word_sum(mesh) % 0xffff);
        assert_eq!(m.map(mesh, Towards::Pod), Ok(Some(pod)));
        assert_eq!(
            m.map(ip("fd00:10:244:ffff::1"), Towards::Mesh),
            Err(Unmappable(ip("fd00:10:244:ffff::1")))
        );
        // A node's /64 maps to a /64; a /56 is not one prefix once mapped.
        let slice = m
            .map_cidr(cidr("fd00:10:244:1::/64"), Towards::Mesh)
            .unwrap();
        assert!(slice.contains(mesh));
        assert_eq!(
            m.map_cidr(cidr("fd00:10:244:100::/56"), Towards::Mesh),
            None
        );
        assert_eq!(
            m.map_cidr(cidr("fd00:10:244::/48"), Towards::Mesh),
            Some(cidr("fd64:aaaa:1::/48"))
        );
    }

    proptest! {
        #[test]
        fn mapping_then_back_is_the_identity(host in any::<u128>(), len in 8u8..=96) {
            let pod = IpCidr::new(ip("fd00:10:244:100::"), len).unwrap();
            let mesh = IpCidr::new(ip("fd64:aaaa:bbbb:cc00::"), len).unwrap();
            prop_assume!(!pod.overlaps(&mesh));
            let m = PrefixMap::new(pod, mesh).unwrap();
            let a = IpAddr::V6(Ipv6Addr::from(
                u128::from(match pod.addr() { IpAddr::V6(p) => p, IpAddr::V4(_) => unreachable!() })
                    | (host & host_mask128(len)),
            ));
            match m.map(a, Towards::Mesh) {
                Ok(Some(b)) => {
                    prop_assert!(mesh.contains(b));
                    if m.is_neutral() {
                        prop_assert_eq!(word_sum(a) % 0xffff, word_sum(b) % 0xffff);
                    }
                    prop_assert_eq!(m.map(b, Towards::Pod), Ok(Some(a)));
                    prop_assert_eq!(m.inverse().map(b, Towards::Mesh), Ok(Some(a)));
                }
                Err(_) => prop_assert!(m.is_neutral()),
                Ok(None) => prop_assert!(false, "{a} is in {pod}"),
            }
        }
    }
}
