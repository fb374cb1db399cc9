//! What the lab needs from the machine: root, tools on `PATH`, and our binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail, ensure};

/// Tools the lab runs, and the Debian packages they come in.
const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("wg", "wireguard-tools"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
    ("kill", "procps"),
    ("ping", "iputils-ping"),
    ("sh", "dash"),
];

/// Checks that the process runs as root (effective UID 0).
///
/// # Errors
/// When it does not, saying how to run the lab tests.
pub fn require_root() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    ensure!(
        euid == "0",
        "the Wiremesh lab creates network and mount namespaces and must run as root \
         (effective UID is {euid}); run e.g. `sudo -E cargo test -p wiremesh-lab`"
    );
    Ok(())
}

/// Checks that every tool the lab runs is on `PATH`.
///
/// # Errors
/// When some are missing, naming them and the packages to install.
pub fn require_tools() -> Result<()> {
    let missing: Vec<_> = REQUIRED_TOOLS
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let tools: Vec<_> = missing.iter().map(|(t, _)| *t).collect();
    let mut packages: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
    packages.dedup();
    bail!(
        "the lab needs {} on PATH; install them with `apt-get install {}`",
        tools.join(", "),
        packages.join(" ")
    )
}

/// Checks that one more tool (such as `wireguard-go` or `iperf3`) is on `PATH`.
///
/// # Errors
/// When it is not, naming the package.
pub fn require_tool(tool: &str, package: &str) -> Result<PathBuf> {
    find_in_path(tool).ok_or_else(|| {
        anyhow!("{tool} is not on PATH; install it with `apt-get install {package}`")
    })
}

/// Where the `wiremesh-agent` binary is: `$WIREMESH_AGENT_BIN`, else next to the running
/// executable (`target/<profile>/` or its parent, for test binaries in `deps/`).
///
/// # Errors
/// When it is not there, saying to run `cargo build -p wiremesh-agent`.
pub fn agent_binary() -> Result<PathBuf> {
    find_binary(
        "wiremesh-agent",
        "WIREMESH_AGENT_BIN",
        "cargo build -p wiremesh-agent",
    )
}

/// Where the `wm-xfer` binary is, found like [`agent_binary`] (`$WIREMESH_XFER_BIN`).
///
/// # Errors
/// When it is not there, saying how to build it.
pub fn xfer_binary() -> Result<PathBuf> {
    find_binary(
        "wm-xfer",
        "WIREMESH_XFER_BIN",
        "cargo build -p wiremesh-lab --bin wm-xfer",
    )
}

pub(crate) fn find_binary(name: &str, env_var: &str, build_hint: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "{env_var} is {}, which is not a file",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "{name} not found (looked at {}); run `{build_hint}` with the same profile, \
                 or set {env_var}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
