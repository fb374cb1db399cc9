//! Processes the lab started: a guard that signals only the PID it spawned, and bounded
//! one-shot commands.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// How long a process gets between SIGTERM and SIGKILL.
///
/// The agent removes its routes, TUN device and UAPI socket on SIGTERM; five seconds is far more
/// than that takes, and short enough that a hung process does not stall a test run.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How often a waiting loop looks at a child again.
const POLL: Duration = Duration::from_millis(10);

/// How long output readers may run on after their command ended, in case a grandchild still
/// holds the pipe.
const READER_GRACE: Duration = Duration::from_secs(2);

/// A process started by the lab. Dropping it stops the process (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]).
///
/// stdout and stderr go to files in the lab directory, so a chatty process never blocks on a
/// full pipe; read them with [`Proc::stdout`] and [`Proc::stderr`] at any time.
pub struct Proc {
    slot: Arc<ProcSlot>,
}

impl Proc {
    /// The PID of the process (the program itself: `ip netns exec`, `unshare` and `sh -c 'exec'`
    /// all replace themselves rather than fork). It leads its own process group.
    pub fn pid(&self) -> u32 {
        self.slot.pid
    }

    /// A short name for logs, such as `wiremesh-agent@wm1a2b-h-a`.
    pub fn label(&self) -> &str {
        &self.slot.label
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.slot.lock().poll(), Ok(None))
    }

    /// What the process wrote to stdout so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        read_lossy(&self.slot.stdout_path)
    }

    /// What the process wrote to stderr so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        read_lossy(&self.slot.stderr_path)
    }

    /// What the process wrote to stderr so far, without terminal colour sequences
    /// (`ESC [ ... m`), as tracing writes them: for matching log lines.
    pub fn stderr_plain(&self) -> String {
        strip_ansi(&self.stderr())
    }

    /// Waits up to `timeout` for the process to exit by itself and returns its status and
    /// output. On timeout the process keeps running (and is still stopped on drop).
    ///
    /// # Errors
    /// When the process is still running after `timeout`, or waiting on it fails.
    pub fn wait_with_timeout(&self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.slot.lock().poll()? {
                return Ok(self.slot.output(status));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}\nstderr:\n{}",
                    self.slot.label,
                    self.slot.pid,
                    tail(&self.stderr(), 40)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM to its process group, waits up to [`STOP_GRACE`] for it to exit, then
    /// SIGKILLs the group; returns the exit status and all output.
    ///
    /// # Errors
    /// When waiting for it fails.
    pub fn stop(&self) -> Result<Output> {
        self.slot.terminate(STOP_GRACE)
    }

    /// Sends a signal (a name `kill -s` knows, such as `HUP` or `TERM`) to the process's group,
    /// if it is still running.
    ///
    /// # Errors
    /// When the process already exited or `kill` fails.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let state = self.slot.lock();
        ensure!(
            !state.has_exited(self.slot.pid),
            "{} (pid {}) is not running",
            self.slot.label,
            self.slot.pid
        );
        signal_group(self.slot.pid, signal)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.slot.terminate(STOP_GRACE) {
            eprintln!("lab: stopping {}: {e:#}", self.slot.label);
        }
    }
}

/// The shared part of a [`Proc`]: the lab keeps one too, so it can stop what a test leaked.
pub(crate) struct ProcSlot {
    pid: u32,
    label: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    state: Mutex<ChildState>,
}

/// A child and, once reaped, its status. Until it is reaped its PID (and process group, which
/// it leads) cannot be handed to anyone else, so signals go only while `status` is `None`.
struct ChildState {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildState {
    /// The exit status, reaping the child if it has exited.
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for pid {}", self.child.id()))?;
        }
        Ok(self.status)
    }

    /// Whether it has exited, without reaping it.
    fn has_exited(&self, pid: u32) -> bool {
        self.status.is_some() || is_zombie(pid)
    }

    /// SIGKILLs the process group (stragglers included, even when the leader already exited)
    /// and reaps the leader.
    fn kill_and_reap(&mut self, label: &str) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let exited = is_zombie(self.child.id());
        if let Err(e) = signal_group(self.child.id(), "KILL")
            && !exited
        {
            eprintln!("lab: {e:#}");
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {label} (pid {})", self.child.id()))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl ProcSlot {
    /// Starts `command` in its own process group, with stdin closed and stdout/stderr into
    /// `log_base.out` / `.err`.
    pub(crate) fn spawn(
        mut command: Command,
        label: String,
        log_base: &Path,
    ) -> Result<(Proc, Arc<ProcSlot>)> {
        let stdout_path = log_base.with_extension("out");
        let stderr_path = log_base.with_extension("err");
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        // Its own group, so a stop also reaches whatever it started (`sh -c`, a helper).
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {label}: {command:?}"))?;
        let slot = Arc::new(ProcSlot {
            pid: child.id(),
            label,
            stdout_path,
            stderr_path,
            state: Mutex::new(ChildState {
                child,
                status: None,
            }),
        });
        Ok((Proc { slot: slot.clone() }, slot))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn stderr_tail(&self, lines: usize) -> String {
        tail(&read_lossy(&self.stderr_path), lines)
    }

    pub(crate) fn stdout_tail(&self, lines: usize) -> String {
        tail(&read_lossy(&self.stdout_path), lines)
    }

    fn lock(&self) -> MutexGuard<'_, ChildState> {
        // A panic while holding this lock leaves the state intact; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it has exited (reaped or not).
    pub(crate) fn has_exited(&self) -> bool {
        self.lock().has_exited(self.pid)
    }

    /// SIGTERM to its group if still running; returns whether it was running.
    pub(crate) fn send_term(&self) -> bool {
        let state = self.lock();
        if state.has_exited(self.pid) {
            return false;
        }
        if let Err(e) = signal_group(self.pid, "TERM") {
            eprintln!("lab: {e:#}");
        }
        true
    }

    /// SIGKILL to its group, then reap.
    pub(crate) fn kill_and_reap(&self) -> Result<ExitStatus> {
        self.lock().kill_and_reap(&self.label)
    }

    fn terminate(&self, grace: Duration) -> Result<Output> {
        if self.send_term() {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && !self.has_exited() {
                thread::sleep(POLL);
            }
        }
        let status = self.kill_and_reap()?;
        Ok(self.output(status))
    }

    fn output(&self, status: ExitStatus) -> Output {
        Output {
            status,
            stdout: fs::read(&self.stdout_path).unwrap_or_default(),
            stderr: fs::read(&self.stderr_path).unwrap_or_default(),
        }
    }
}

/// Runs `command` to completion with piped output, killing it after `timeout`.
///
/// # Errors
/// When it cannot be started, or is still running after `timeout` (the error carries the
/// output so far).
pub(crate) fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = spawn_reader(child.stdout.take());
    let stderr = spawn_reader(child.stderr.take());
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    while !is_zombie(pid) && Instant::now() < deadline {
        thread::sleep(POLL);
    }
    let timed_out = !is_zombie(pid);
    // Not reaped yet, so the group is still ours: nothing it started outlives it.
    let _ = signal_group(pid, "KILL");
    let _ = child.kill();
    let status = child
        .wait()
        .with_context(|| format!("waiting for {command:?}"))?;
    let status = (!timed_out).then_some(status);
    let stdout = stdout.recv_timeout(READER_GRACE).unwrap_or_default();
    let stderr = stderr.recv_timeout(READER_GRACE).unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{command:?} still running after {timeout:?}, killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Describes an output for an error message: status, stdout and stderr.
pub(crate) fn describe(output: &Output) -> String {
    let status = match (output.status.code(), output.status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".to_owned(),
    };
    format!(
        "{status}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end()
    )
}

/// Whether `pid`, a child of ours not yet reaped, has exited: its state in `/proc/<pid>/stat`
/// (after the parenthesised command name) is `Z`. Unreadable counts as exited.
fn is_zombie(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// Signals the process group led by `pid` (a child we spawned with `process_group(0)` and
/// have not reaped) with the `kill` tool: the lab has no `unsafe` for `libc::kill`.
fn signal_group(pid: u32, signal: &str) -> Result<()> {
    let group = format!("-{pid}");
    let mut command = Command::new("kill");
    command.args(["-s", signal, "--", &group]);
    let output = command
        .output()
        .with_context(|| format!("running kill -s {signal} -- {group}"))?;
    ensure!(
        output.status.success(),
        "kill -s {signal} -- {group}: {}",
        describe(&output)
    );
    Ok(())
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
/// SIGTERM to every live process at once, one shared grace period, then SIGKILL.
pub(super) fn stop_all(procs: &[Arc<ProcSlot>]) {
    let running: Vec<_> = procs.iter().filter(|p| p.send_term()).collect();
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && running.iter().any(|p| !p.has_exited()) {
        thread::sleep(Duration::from_millis(10));
    }
    for p in procs {
        if let Err(e) = p.kill_and_reap() {
            eprintln!("lab: stopping {} (pid {}): {e:#}", p.label(), p.pid());
        }
    }
}

pub(super) fn dump_logs(procs: &[Arc<ProcSlot>]) {
    for p in procs {
        eprintln!(
            "---- {} (pid {}) stdout, last lines ----\n{}\n---- stderr ----\n{}",
            p.label(),
            p.pid(),
            p.stdout_tail(30),
            p.stderr_tail(60)
        );
    }
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
