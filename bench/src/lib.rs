//! Wiremesh benchmarks.
//!
//! - [`compare`]: Wiremesh against plain veth routing, Debian's and the newest
//!   wireguard-go and boringtun-cli, in one lab, alternating round by round (`make bench`).
//! - [`scale`]: the agent with thousands of peers, and how soon a peer added through the
//!   UAPI passes its first packet (`make bench-scale`).
//! - [`mesh`]: K real control planes with N simulated nodes each and the real controller:
//!   how fast a node change reaches every cluster, and what it costs (`make bench-mesh`).
//! - [`apply`]: the agent taking thousands of routed peers at once and one at a time, and
//!   its route reconciler's pass over them (`make bench-scale`).
//! - `core/benches/packet_path.rs` (in `wiremesh-core`): criterion micro-benchmarks of the core without I/O.
//!
//! Everything runs inside the namespace lab of `wiremesh_lab` (underlay 198.18.0.0/16,
//! pods in 10.0.0.0/8, a per-run name prefix, all removed on exit); it needs root.

pub mod apply;
pub mod chart;
pub mod compare;
pub mod interrupt;
pub mod measure;
pub mod mesh;
pub mod mesh_chart;
pub mod micro;
pub mod netns;
pub mod procfs;
pub mod promtext;
pub mod report;
pub mod responder;
pub mod scale;
pub mod stats;
pub mod tools;
pub mod tunnel;

/// Prints a progress line on stderr (stdout carries the tables).
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[bench] {}", format_args!($($arg)*))
    };
}
