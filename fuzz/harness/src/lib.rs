//! What each fuzz target runs, as plain functions: the `cargo fuzz` targets in `fuzz/`
//! call them with libFuzzer's inputs, and `tests/replay.rs` calls them with every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`, so that plain `cargo test`
//! replays the corpus and every crash found so far.
//!
//! A harness panics only when the code under test panics or breaks an invariant the
//! harness checks; any input is fine otherwise.

mod datagram;
mod inner_packet;
mod plan;
mod session;
mod text;
mod translate;

pub use datagram::datagram;
pub use inner_packet::inner_packet;
pub use plan::plan;
pub use text::{uapi, wgconf};
pub use translate::translate;

/// A harness: runs one input.
pub type Harness = fn(&[u8]);

/// Every target by name (its folder under `fuzz/corpus/` and `fuzz/regressions/`).
pub const TARGETS: [(&str, Harness); 6] = [
    ("inner_packet", inner_packet),
    ("datagram", datagram),
    ("uapi", uapi),
    ("wgconf", wgconf),
    ("plan", plan),
    ("translate", translate),
];
