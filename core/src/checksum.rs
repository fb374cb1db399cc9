//! The Internet checksum (RFC 1071) for IPv4 headers and TCP/UDP segments.
//!
//! Sums are kept unfolded in a `u64` so that pieces (pseudo-header, header, payload) can be
//! added together before one fold. Every piece but the last must have an even length.

use std::net::IpAddr;

/// The ones' complement sum of `data` as 16-bit big-endian words, unfolded.
///
/// An odd trailing byte counts as the high byte of a last word, as RFC 1071 says.
#[inline]
pub fn sum(data: &[u8]) -> u64 {
    // Summing native-endian 32-bit words and swapping the folded result is the same as
    // summing big-endian 16-bit words (RFC 1071 §2(B): the sum is byte-order independent).
    // Each word is below 2^32, so 2^32 of them cannot overflow the accumulator; a packet
    // has at most 2^14.
    let mut chunks = data.chunks_exact(4);
    let mut acc: u64 = 0;
    for c in &mut chunks {
        // Always 4 bytes (`chunks_exact`); the conversion compiles to a plain load.
        acc += u64::from(u32::from_ne_bytes(c.try_into().unwrap_or([0; 4])));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 4];
        if let Some(head) = last.get_mut(..rest.len()) {
            head.copy_from_slice(rest);
        }
        acc += u64::from(u32::from_ne_bytes(last));
    }
    u64::from(from_native(fold(acc)))
}

/// Folds an unfolded sum to 16 bits (the ones' complement sum, not yet inverted).
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The value to store in a checksum field for a region whose sum (with the field zeroed)
/// is `acc`: the inverted fold, with 0 sent as 0xffff (RFC 768, and what Linux's
/// `skb_checksum_help` does for every protocol).
#[inline]
pub fn finish(acc: u64) -> u16 {
    match !fold(acc) {
        0 => 0xffff,
        c => c,
    }
}

/// The sum of the TCP/UDP pseudo-header (RFC 793 §3.1, RFC 8200 §8.1) for a transport
/// segment of `len` bytes.
#[inline]
pub fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u64 {
    let addrs = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(&s.octets()) + sum(&d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum(&s.octets()) + sum(&d.octets()),
        // Mixed families never come out of one IP header.
        _ => 0,
    };
    addrs + u64::from(protocol) + len as u64
}

/// The pseudo-header sum of the packet `ip` (IPv4 or IPv6, addresses read from its
/// header) for a transport segment of `len` bytes.
#[inline]
pub fn pseudo_header_of(ip: &[u8], protocol: u8, len: usize) -> u64 {
    let addrs = if ip.first().is_some_and(|b| b >> 4 == 6) {
        ip.get(8..40).map_or(0, sum)
    } else {
        ip.get(12..20).map_or(0, sum)
    };
    addrs + u64::from(protocol) + len as u64
}

/// A native-endian folded sum as the big-endian value it stands for.
#[inline]
fn from_native(v: u16) -> u16 {
    if cfg!(target_endian = "little") {
        v.swap_bytes()
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// RFC 1071 word by word.
    fn naive(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn rfc_1071_example() {
        // RFC 1071 §3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
    }

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let c = finish(sum(&h));
        assert_eq!(c, 0xb861);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(fold(sum(&h)), 0xffff);
    }

    proptest! {
        #[test]
        fn matches_the_word_by_word_sum(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert_eq!(fold(sum(&data)), naive(&data));
        }

        #[test]
        fn even_pieces_add_up(a in proptest::collection::vec(any::<u8>(), 0..300), b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut a = a;
            if a.len() % 2 == 1 { a.pop(); }
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(fold(sum(&a) + sum(&b)), naive(&whole));
        }
    }
}
