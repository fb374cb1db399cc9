//! The Wiremesh control plane: the controller that mirrors linked clusters' nodes into
//! local `MeshPeer`s, and the library behind `meshctl`.

pub mod crdgen;
