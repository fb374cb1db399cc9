//! A `wiremesh-controller` process outside any lab namespace, against a control plane on
//! loopback (`controller.rs`, `mcs_controller.rs`): started with a kubeconfig context and
//! an identity, its output in a log file, stopped in `Drop`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};

/// One `wiremesh-controller` replica; SIGTERM then SIGKILL in `Drop`.
pub struct Replica {
    child: Child,
    /// Its `--identity` (the Lease holder it writes).
    pub identity: String,
    log: PathBuf,
}

impl Replica {
    /// Starts a replica for `context` of `kubeconfig` as `identity`, with `args` after
    /// those and `RUST_LOG` = `rust_log` (unset: the controller's default); its log is
    /// `dir/<identity>.log`.
    ///
    /// # Errors
    /// When the binary is not built or does not start.
    pub fn start(
        kubeconfig: &Path,
        dir: &Path,
        context: &str,
        identity: &str,
        args: &[&str],
        rust_log: Option<&str>,
    ) -> Result<Self> {
        let binary = controller_binary()?;
        let log = dir.join(format!("{identity}.log"));
        let out = File::create(&log)?;
        let kubeconfig = kubeconfig
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", kubeconfig.display()))?;
        let mut command = Command::new(&binary);
        command
            .args([
                "--kubeconfig",
                kubeconfig,
                "--context",
                context,
                "--identity",
                identity,
            ])
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            identity: identity.to_owned(),
            log,
        })
    }

    /// Its process id (for `/proc` figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all.get(all.len().saturating_sub(lines)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// SIGTERM, as Kubernetes stops a pod: the replica releases the Lease and exits 0.
    ///
    /// # Errors
    /// When it exits with another status or is still running after 10 s.
    pub fn stop(&mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "{} exited with {status}", self.identity);
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} ignored SIGTERM",
                self.identity
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: a crash, not a shutdown (the Lease is not released).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            self.kill();
        }
    }
}

/// `$WIREMESH_CONTROLLER_BIN`, else next to the test executable (`target/<profile>/`).
///
/// # Errors
/// When neither is there.
pub fn controller_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WIREMESH_CONTROLLER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("wiremesh-controller"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "wiremesh-controller not found next to {}; run `cargo build --workspace --bins`",
                exe.display()
            )
        })
}
