//! Multi-Cluster Services (KEP-1645): the upstream CRDs `meshctl install` ships
//! ([`crds`]), the import plan every cluster computes from every cluster's exports
//! ([`plan`]), the conditions the exporting cluster sets on its `ServiceExport`s and
//! what it publishes ([`export`]), what a linked cluster may claim ([`admit`]), the
//! Corefile edit and CoreDNS checks for `clusterset.local` ([`dns`]): all pure.
//! [`controller`] runs them against the API servers (the leader only), and [`remote`]
//! watches each linked cluster's published exports.

pub mod admit;
pub mod controller;
pub mod crds;
pub mod dns;
pub mod export;
pub mod plan;
pub mod remote;
