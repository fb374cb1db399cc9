//! Processes in a host's private mount namespace, where the host's own directory is
//! `/var/run/wireguard`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::process::{Proc, run_with_timeout};
use super::{EXEC_TIMEOUT, Host, agent_binary, label, ok_stdout, path_str};

/// Where userspace WireGuard implementations and `wg` put and look for UAPI sockets.
const WIREGUARD_RUN_DIR: &str = "/var/run/wireguard";

/// Binds `$1` over `$2` in the (already private) mount namespace, then becomes `$3 ...`.
const PRIVATE_MOUNTS_SCRIPT: &str = r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#;

/// How long a private-mounts process may take to get its bind mount in place.
const MOUNT_READY_TIMEOUT: Duration = Duration::from_secs(10);

impl Host {
    /// Starts the agent binary ([`agent_binary`]) with [`Host::spawn_in_private_mounts`].
    ///
    /// # Errors
    /// As [`agent_binary`] and [`Host::spawn_in_private_mounts`].
    pub fn spawn_agent(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let agent = agent_binary()?;
        self.spawn_in_private_mounts(path_str(&agent)?, args, env)
    }

    /// Starts `program args...` in the host's network namespace and in a private mount
    /// namespace where [`Host::run_dir`] is bind-mounted over `/var/run/wireguard`; returns
    /// once that mount is in place, so `nsenter -t <pid> -m` sees it.
    ///
    /// # Errors
    /// When it cannot start, exits before the mount is in place, or the mount does not
    /// appear within 10 s.
    pub fn spawn_in_private_mounts(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let lab = &self.inner.ns.lab;
        let mut command = self.private_mounts_command(program, args)?;
        command.envs(env.iter().copied());
        let proc = lab.spawn(command, &label(program, &self.inner.ns.name))?;
        self.wait_for_private_mount(&proc)?;
        Ok(proc)
    }

    /// Waits until `proc`, started with [`Host::spawn_in_private_mounts`], has created the
    /// UAPI socket of `iface` in [`Host::run_dir`].
    ///
    /// # Errors
    /// When `proc` exits first, or the socket is not there within `timeout`.
    pub fn wait_for_uapi_socket(&self, iface: &str, proc: &Proc, timeout: Duration) -> Result<()> {
        let socket = self.run_dir().join(format!("{iface}.sock"));
        let deadline = Instant::now() + timeout;
        while !socket.exists() {
            if !proc.is_running() || Instant::now() > deadline {
                bail!(
                    "no {} after {timeout:?}:\n{}",
                    socket.display(),
                    proc.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts a WireGuard implementation nobody here wrote, `command` (a `wireguard-go`
    /// binary and its arguments, in the foreground), with `env`, in private mounts, and
    /// waits for its UAPI socket of `iface`: configure it with `wg` next.
    ///
    /// # Errors
    /// As [`Host::spawn_in_private_mounts`] and [`Host::wait_for_uapi_socket`].
    pub fn spawn_wireguard_go(
        &self,
        command: &[&str],
        iface: &str,
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| anyhow!("no command to run"))?;
        let proc = self.spawn_in_private_mounts(program, args, env)?;
        self.wait_for_uapi_socket(iface, &proc, Duration::from_secs(10))?;
        Ok(proc)
    }

    /// Runs `args` to completion in the host's network namespace and a fresh private mount
    /// namespace with the host's `/var/run/wireguard`: the same view a process from
    /// [`Host::spawn_in_private_mounts`] has.
    ///
    /// # Errors
    /// When the command cannot start or times out (a non-zero exit is returned, not an error).
    pub fn exec_private_mounts(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("no command to run"))?;
        self.inner.ns.lab.check_alive()?;
        run_with_timeout(self.private_mounts_command(program, rest)?, EXEC_TIMEOUT)
            .with_context(|| format!("in host {}: {}", self.inner.name, args.join(" ")))
    }

    /// Runs the stock `wg` tool with `args` in the host's network namespace and its own
    /// `/var/run/wireguard`, so it talks to the UAPI sockets of this host's processes only;
    /// returns stdout.
    ///
    /// # Errors
    /// When `wg` fails or exits non-zero (with its output).
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        ok_stdout(&self.exec_private_mounts(&full)?, &full)
    }

    /// Runs `args` in the mount and network namespaces of process `pid`
    /// (`nsenter -t <pid> -m -n`), such as an agent from [`Host::spawn_agent`].
    ///
    /// # Errors
    /// When the command cannot start or times out (a non-zero exit is returned, not an error).
    pub fn exec_in_agent_ns(&self, pid: u32, args: &[&str]) -> Result<Output> {
        self.inner.ns.lab.check_alive()?;
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &pid.to_string(), "-m", "-n", "--"])
            .args(args);
        run_with_timeout(command, EXEC_TIMEOUT)
            .with_context(|| format!("in the namespaces of pid {pid}: {}", args.join(" ")))
    }

    /// Runs `wg args...` in the mount and network namespaces of process `pid`; returns stdout.
    ///
    /// # Errors
    /// When `wg` fails or exits non-zero (with its output).
    pub fn wg_in(&self, pid: u32, args: &[&str]) -> Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        ok_stdout(&self.exec_in_agent_ns(pid, &full)?, &full)
    }

    fn private_mounts_command(&self, program: &str, args: &[&str]) -> Result<Command> {
        let mountpoint = wireguard_mountpoint()?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.inner.ns.name])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", PRIVATE_MOUNTS_SCRIPT, "wm-private-mounts"])
            .arg(&self.inner.run_dir)
            .arg(&mountpoint)
            .arg(program)
            .args(args);
        Ok(command)
    }

    /// Waits until the process sees the host's run dir at `/var/run/wireguard`: looked up
    /// through `/proc/<pid>/root`, which resolves paths in the process's mount namespace.
    fn wait_for_private_mount(&self, proc: &Proc) -> Result<()> {
        let want = fs::metadata(&self.inner.run_dir)
            .with_context(|| format!("stat {}", self.inner.run_dir.display()))?;
        let seen = format!(
            "/proc/{}/root{}",
            proc.pid(),
            wireguard_mountpoint()?.display()
        );
        let deadline = Instant::now() + MOUNT_READY_TIMEOUT;
        loop {
            if !proc.is_running() {
                bail!(
                    "{} exited before its private mounts were ready\nstderr:\n{}",
                    proc.label(),
                    proc.stderr()
                );
            }
            if let Ok(meta) = fs::metadata(&seen)
                && meta.dev() == want.dev()
                && meta.ino() == want.ino()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} has no private /var/run/wireguard after {MOUNT_READY_TIMEOUT:?}\n\
                     stderr:\n{}",
                    proc.label(),
                    proc.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Makes sure `/var/run/wireguard` exists in the root mount namespace and returns its real
/// path (`/var/run` is usually a symlink to `/run`). It is left in place afterwards: another
/// lab running in parallel may be about to mount over it.
fn wireguard_mountpoint() -> Result<PathBuf> {
    fs::create_dir_all(WIREGUARD_RUN_DIR)
        .with_context(|| format!("creating the mount point {WIREGUARD_RUN_DIR}"))?;
    fs::canonicalize(WIREGUARD_RUN_DIR).with_context(|| format!("resolving {WIREGUARD_RUN_DIR}"))
}
