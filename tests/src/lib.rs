//! The Wiremesh end-to-end lab: hosts and pods in network namespaces on underlay bridges,
//! processes in per-host mount namespaces (each host its own `/var/run/wireguard`), a
//! checksummed transfer tool, and cleanup in `Drop`. Everything here needs root.

pub mod clusters;
pub mod deploy;
pub mod fixtures;
pub mod forge;
pub mod k8s;
pub mod kubelet;
pub mod lab;
pub mod mcs;
pub mod mesh;
pub mod metrics;
pub mod prometheus;
pub mod replica;
pub mod services;
pub mod xfer;

pub use lab::{
    EXEC_TIMEOUT, Host, Lab, MIB, Netns, Pod, Proc, STOP_GRACE, TransferReport, Underlay,
    agent_binary, df_ping, output_text, ping, reachable, require_root, require_tool, require_tools,
    transfer, transfer_between, transfer_translated, xfer_binary,
};
