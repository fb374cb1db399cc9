//! The Wiremesh agent.
//!
//! The protocol logic (peers, cryptokey routing, packet verdicts) with no I/O is the
//! `wiremesh-core` crate; [`dataplane`] is the shell that drives it with a TUN device, a UDP socket,
//! netlink routes and the UAPI socket; [`standalone`] turns a wg-quick config file into
//! a running interface.

pub mod control;
pub mod dataplane;
pub mod failclosed;
pub mod host;
pub mod k8s;
pub mod keys;
pub mod mesh;
pub mod metrics;
pub mod netlink;
pub mod peers;
pub mod rotation;
pub mod standalone;
pub mod state;
pub mod tun;
pub mod uapi_server;

use anyhow::{Result, bail};

/// Sets up the one tracing subscriber of the binary: `RUST_LOG` filter (default `info`),
/// human or JSON lines on stderr.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Checks what the agent needs before it creates anything, and says what to do.
///
/// # Errors
/// When `/dev/net/tun` is missing or we lack `CAP_NET_ADMIN`.
pub fn preflight() -> Result<()> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        bail!(
            "/dev/net/tun does not exist: load the tun module (modprobe tun) or mount the device into the container"
        );
    }
    if !has_net_admin() {
        bail!("the agent needs CAP_NET_ADMIN (run as root, or grant the capability)");
    }
    Ok(())
}

/// `CAP_NET_ADMIN` is bit 12 of the effective capability set (linux/capability.h).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we cannot shut down cleanly; run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
