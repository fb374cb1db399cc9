//! The programs a benchmark runs, and their versions for the record.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, ensure};
use wiremesh_lab::{agent_binary, require_tool};

/// Where `bench/install.sh` puts boringtun-cli and the newest wireguard-go (in `bin/`):
/// `target/bench-tools` of this workspace. `--tools` or `$WIREMESH_BENCH_TOOLS` (read by
/// the command line) say otherwise.
pub fn default_tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tools")
}

/// The tunnel programs of the comparison.
#[derive(Debug, Clone)]
pub struct Toolbox {
    /// `wiremesh-agent` (release build, next to the benchmark binary).
    pub agent: PathBuf,
    /// Debian's `wireguard-go`.
    pub wireguard_go_debian: PathBuf,
    /// The newest wireguard-go, built by `bench/install.sh`.
    pub wireguard_go_latest: PathBuf,
    /// `boringtun-cli`, installed by `bench/install.sh`.
    pub boringtun_cli: PathBuf,
    /// Another `wiremesh-agent` build to compare with (`BENCH_BASE_AGENT`), if given.
    pub base_agent: Option<PathBuf>,
    tools_dir: PathBuf,
}

impl Toolbox {
    /// Finds every program; boringtun-cli and wireguard-go-latest in `tools_dir/bin`.
    ///
    /// # Errors
    /// When one is missing, saying how to get it.
    pub fn locate(tools_dir: &Path) -> Result<Self> {
        let tools_dir = tools_dir.join("bin");
        let tools_dir = tools_dir.as_path();
        require_tool("iperf3", "iperf3")?;
        let agent = agent_binary()?;
        let wireguard_go_debian = require_tool("wireguard-go", "wireguard-go")?;
        let wireguard_go_latest = tools_dir.join("wireguard-go-latest");
        let boringtun_cli = tools_dir.join("boringtun-cli");
        for path in [&wireguard_go_latest, &boringtun_cli] {
            ensure!(
                path.is_file(),
                "{} is missing: run bench/install.sh (or set WIREMESH_BENCH_TOOLS)",
                path.display()
            );
        }
        let base_agent = std::env::var_os("BENCH_BASE_AGENT").map(PathBuf::from);
        if let Some(path) = &base_agent {
            ensure!(
                path.is_file(),
                "BENCH_BASE_AGENT: {} is no file",
                path.display()
            );
        }
        Ok(Self {
            agent,
            wireguard_go_debian,
            wireguard_go_latest,
            boringtun_cli,
            base_agent,
            tools_dir: tools_dir.to_owned(),
        })
    }

    /// A version line for each program, keyed by implementation name.
    pub fn versions(&self) -> BTreeMap<String, String> {
        let mut versions = BTreeMap::new();
        let git = first_line(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "describe",
                "--always",
                "--dirty",
            ],
        );
        versions.insert(
            "wiremesh".to_owned(),
            format!(
                "{} (git {})",
                first_line(path_str(&self.agent), &["--version"]),
                git
            ),
        );
        let debian = first_line("dpkg-query", &["-W", "-f", "${Version}", "wireguard-go"]);
        versions.insert(
            "wireguard-go-debian".to_owned(),
            format!(
                "{} (Debian package {debian})",
                first_line(path_str(&self.wireguard_go_debian), &["--version"])
            ),
        );
        let pinned = fs::read_to_string(self.tools_dir.join("wireguard-go-latest.version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        versions.insert(
            "wireguard-go-latest".to_owned(),
            format!(
                "{} (golang.zx2c4.com/wireguard {pinned})",
                first_line(path_str(&self.wireguard_go_latest), &["--version"])
            ),
        );
        versions.insert(
            "boringtun-cli".to_owned(),
            first_line(path_str(&self.boringtun_cli), &["--version"]),
        );
        if let Some(base) = &self.base_agent {
            versions.insert(
                "wiremesh-base".to_owned(),
                format!(
                    "{} ({})",
                    first_line(path_str(base), &["--version"]),
                    base.display()
                ),
            );
        }
        versions.insert("iperf3".to_owned(), first_line("iperf3", &["--version"]));
        versions.insert("kernel".to_owned(), first_line("uname", &["-r"]));
        versions
    }
}

/// The first line a short command prints, or `unknown`. Bounded by `timeout 10`.
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new("timeout")
        .arg("10")
        .arg(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A path as `&str` for command lines (lossy for non-UTF-8, which the tools never are).
pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap_or("?")
}
