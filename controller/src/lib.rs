//! The Wiremesh controller: exchanges node keys, endpoints and pod CIDRs between linked
//! clusters. The Kubernetes control plane lands with its own issue; this crate holds the
//! command-line shells so the workspace layout is final.

/// What the binaries can do today.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes control plane is not built yet.
    #[error("{0} is not implemented yet: the Kubernetes control plane is a later milestone")]
    NotYet(&'static str),
}
