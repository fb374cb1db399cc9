//! The Wiremesh control plane: the controller that mirrors linked clusters' nodes into
//! local `MeshPeer`s, and the library behind `meshctl`.

pub mod crdgen;
pub mod install;
pub mod leader;
pub mod limit;
pub mod liveness;
pub mod manifest;
pub mod mcs;
pub mod meshctl;
pub mod metrics;
pub mod nodes;
pub mod plan;
pub mod reconcile;
pub mod remote;
pub mod shared;
pub mod status;
#[cfg(test)]
mod testing;
