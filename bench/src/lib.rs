//! Benchmarks land with their own issue; this crate reserves the place in the workspace.
