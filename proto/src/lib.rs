//! Types shared by every part of Wiremesh.
//!
//! This crate is types and pure parsing only: no sockets, no async runtime, no Kubernetes
//! client (`kube` with only its derive feature). Whatever got past a `FromStr` here is valid.

pub mod cidr;
pub mod crd;
pub mod key;
pub mod mcs;
pub mod prefix_map;
pub mod uapi;
pub mod wgconf;

pub use cidr::{CidrError, InterfaceAddress, IpCidr};
pub use key::{Key, KeyError, PresharedKey, PrivateKey, PublicKey};
pub use prefix_map::{PrefixMap, PrefixMapError, Towards};
