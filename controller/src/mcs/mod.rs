//! Multi-Cluster Services (KEP-1645): the upstream CRDs `meshctl install` ships
//! ([`crds`]), the import plan every cluster computes from every cluster's exports
//! ([`plan`]) and the conditions the exporting cluster sets on its `ServiceExport`s
//! ([`export`]), and the Corefile edit and CoreDNS checks for `clusterset.local`
//! ([`dns`]). All pure; the watches that feed them are not wired yet.

pub mod crds;
pub mod dns;
pub mod export;
pub mod plan;
