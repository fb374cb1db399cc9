//! A network namespace of the lab, and running commands in it.

use std::fmt;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};

use super::process::{Proc, describe, run_with_timeout};
use super::{EXEC_TIMEOUT, LabInner, ip, label};

/// A network namespace of the lab: run commands in it.
#[derive(Clone)]
pub struct Netns {
    pub(super) name: String,
    pub(super) lab: Arc<LabInner>,
}

impl Netns {
    /// The namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `args` in this namespace (`ip netns exec`) to completion, bounded by
    /// [`EXEC_TIMEOUT`]. A non-zero exit is not an error here; see [`Netns::exec_ok`].
    ///
    /// # Errors
    /// When the command cannot start or times out.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    /// [`Netns::exec`] with an explicit bound.
    ///
    /// # Errors
    /// When the command cannot start or times out.
    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        self.lab.check_alive()?;
        run_with_timeout(self.command(args, &[]), timeout)
            .with_context(|| format!("in {}: {}", self.name, args.join(" ")))
    }

    /// Runs `args` in this namespace and returns stdout.
    ///
    /// # Errors
    /// When the command fails to start, times out or exits non-zero (with its output).
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.exec(args)?;
        ensure!(
            output.status.success(),
            "in {}: {}: {}",
            self.name,
            args.join(" "),
            describe(&output)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `args` in this namespace in the background.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn(&self, args: &[&str]) -> Result<Proc> {
        self.spawn_with_env(args, &[])
    }

    /// Starts `args` in this namespace in the background with extra environment variables.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let program = args.first().ok_or_else(|| anyhow!("no command to spawn"))?;
        self.lab
            .spawn(self.command(args, env), &label(program, &self.name))
    }

    /// Runs `ip -n <this namespace> args...`, returning stdout.
    ///
    /// # Errors
    /// When `ip` fails (with its stderr).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Turns IPv6 duplicate address detection off for the namespace's interfaces, present
    /// and future (`accept_dad` 0 in `all` and `default`), so their addresses, link-local
    /// ones included, are usable at once.
    ///
    /// # Errors
    /// When the sysctls cannot be written.
    pub fn disable_dad(&self) -> Result<()> {
        self.exec_ok(&[
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
             echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad",
        ])
        .context("turning off IPv6 duplicate address detection")?;
        Ok(())
    }

    /// Writes `/etc/netns/<namespace>/<file>`, which `ip netns exec` (every command the lab
    /// runs here) mounts over `/etc/<file>`: a pod's own `resolv.conf`. Removed with the
    /// namespace.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn write_etc_file(&self, file: &str, contents: &str) -> Result<()> {
        ensure!(
            !file.contains('/') && !file.starts_with('.'),
            "{file:?} is not a plain file name"
        );
        let dir = super::etc_dir(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(file);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command.envs(env.iter().copied());
        command
    }
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Netns").field(&self.name).finish()
    }
}
