//! The prefix translator ([`wiremesh_core::translate`]) on any bytes, both ways, with and
//! without a vnet header in front, for an IPv4 table, an IPv6 table that maps
//! checksum-neutrally (/48) and one that does not (/56).
//!
//! Checks that a packet reported untouched is unchanged; the rest is no panic and no
//! out-of-bounds access.

use std::sync::OnceLock;

use wiremesh_core::translate::{Translated, Translation};
use wiremesh_proto::IpCidr;

/// Runs one input; see the module documentation.
pub fn translate(data: &[u8]) {
    let Some((&mode, packet)) = data.split_first() else {
        return;
    };
    let tables = tables();
    let Some(table) = tables.get(usize::from(mode >> 4) % tables.len()) else {
        return;
    };
    let mut p = packet.to_vec();
    let result = match mode & 0x3 {
        0 => table.outbound(&mut p),
        1 => table.inbound(&mut p),
        2 => table.outbound_vnet(&mut p),
        _ => table.inbound_vnet(&mut p),
    };
    if result == Ok(Translated::Untouched) {
        assert_eq!(p, packet, "an untouched packet changed");
    }
}

fn tables() -> &'static [Translation; 2] {
    static TABLES: OnceLock<[Translation; 2]> = OnceLock::new();
    TABLES.get_or_init(|| {
        let table = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(IpCidr, IpCidr)> = pairs
                .iter()
                .filter_map(|(p, m)| Some((p.parse().ok()?, m.parse().ok()?)))
                .collect();
            Translation::new(&pairs).unwrap_or_default()
        };
        [
            table(&[
                ("10.244.0.0/16", "100.64.0.0/16"),
                ("fd00:10:244::/48", "fd64:aaaa:1::/48"),
            ]),
            table(&[
                ("10.244.0.0/24", "100.64.7.0/24"),
                ("fd00:20:244:100::/56", "fd64:aaaa:2:300::/56"),
            ]),
        ]
    })
}
