//! The namespace lab: underlay bridges, hosts and pods in network namespaces with a per-run
//! name prefix, processes in per-host mount namespaces, and a [`Drop`] that removes it all.
//!
//! Address plan: underlays live in 198.18.0.0/15 (RFC 2544 benchmarking range), pods in
//! 10.0.0.0/8, and both only inside namespaces the lab created. IPv6 underlays live in
//! fd18::/16 and IPv6 pod CIDRs in fd10::/16 (unique local addresses, RFC 4193), with
//! duplicate address detection off so that addresses are usable at once. Nothing is created
//! in the root network namespace: every veth is made inside a lab namespace with its peer
//! moved straight into another.
//!
//! ```text
//!  underlay ns "<prefix>u-ul": bridge br0 ── p0 ─┬─ ul0 198.18.0.1/16  host ns "<prefix>h-a"
//!                                                │    pods0 10.1.0.1/24 ── vp2 ── eth0 10.1.0.2/24  pod ns
//!                              ── p1 ─┴─ ul0 198.18.0.2/16  host ns "<prefix>h-b" ...
//! ```
//!
//! Here: the [`Lab`] itself and its teardown. `net` holds the address plan, `netns`,
//! `underlay`, `host`, `pod` and `nat` what their names say, `mounts` the per-host
//! `/var/run/wireguard`, `process` the processes the lab started, `stats` interface
//! counters, `transfer` traffic checks, and `tools` what the lab needs from the machine.

mod host;
mod mounts;
mod nat;
mod net;
mod netns;
mod pod;
mod process;
mod stats;
mod tools;
mod transfer;
mod underlay;

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder};
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use std::{fmt, thread};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand_core::{OsRng, RngCore};

pub use self::host::Host;
pub use self::nat::NatMapping;
pub use self::netns::Netns;
pub use self::pod::Pod;
pub use self::process::{Proc, STOP_GRACE};
pub(crate) use self::process::{describe, run_with_timeout};
pub use self::stats::{Counters, LinkStats};
pub(crate) use self::tools::find_binary;
pub use self::tools::{agent_binary, require_root, require_tool, require_tools, xfer_binary};
pub use self::transfer::{
    MIB, TransferReport, df_ping, output_text, ping, reachable, transfer, transfer_between,
    transfer_paced, transfer_translated,
};
pub use self::underlay::Underlay;

use self::process::{ProcSlot, dump_logs, stop_all};

/// Bound for one setup or query command (`ip`, `wg`, `ls`); they return in milliseconds.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The default underlay of every lab.
const DEFAULT_UNDERLAY: (&str, &str, u32) = ("ul", "198.18.0.0/16", 1500);

/// A lab run: every namespace, directory and process it creates carries its unique prefix,
/// and dropping it (also while a test panics) stops the processes, deletes the namespaces and
/// removes the directory.
pub struct Lab {
    inner: Arc<LabInner>,
    underlay: Underlay,
    _teardown: Teardown,
}

impl Lab {
    /// Creates a lab with a fresh prefix (`wm` + 4 hex digits + `-`), a temp directory
    /// `/tmp/wmXXXX/`, and the default underlay: bridge `br0` in namespace `<prefix>u-ul`,
    /// subnet 198.18.0.0/16, MTU 1500.
    ///
    /// # Errors
    /// When not root, a tool is missing, or any setup command fails (what was made is removed).
    pub fn new() -> Result<Lab> {
        Self::with_underlay_mtu(DEFAULT_UNDERLAY.2)
    }

    /// As [`Lab::new`] with the default underlay's MTU `mtu` (576..=9216; 1280 is the IPv6
    /// minimum, common on tunnels over tunnels and some clouds).
    ///
    /// # Errors
    /// As [`Lab::new`].
    pub fn with_underlay_mtu(mtu: u32) -> Result<Lab> {
        require_root()?;
        require_tools()?;
        let (prefix, dir) = unique_prefix()?;
        let inner = Arc::new(LabInner {
            prefix,
            dir,
            namespaces: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
            addresses: Mutex::new(BTreeMap::new()),
            counter: AtomicU32::new(0),
            torn_down: AtomicBool::new(false),
        });
        let teardown = Teardown(inner.clone());
        let (name, cidr, _) = DEFAULT_UNDERLAY;
        let underlay = Underlay::create(&inner, name, cidr, mtu)?;
        Ok(Lab {
            inner,
            underlay,
            _teardown: teardown,
        })
    }

    /// The name prefix of this run, such as `wm1a2b-`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The run's temp directory, holding host directories and process logs.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The underlay made by [`Lab::new`] (198.18.0.0/16, MTU 1500 unless
    /// [`Lab::with_underlay_mtu`] said otherwise).
    pub fn default_underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// Creates another underlay: a namespace `<prefix>u-<name>` holding a bridge with `mtu`,
    /// for hosts to attach to with addresses from `cidr`. An IPv6 `cidr` (inside fd18::/16)
    /// makes an IPv6-only underlay, for hosts from [`Lab::add_host_v6`].
    ///
    /// # Errors
    /// When `cidr` does not parse or is not inside 198.18.0.0/15 (IPv4) or fd18::/16 (IPv6),
    /// the MTU is outside 576..=9216 (1280..=9216 for IPv6), or a setup command fails.
    pub fn underlay(&self, name: &str, cidr: &str, mtu: u32) -> Result<Underlay> {
        Underlay::create(&self.inner, name, cidr, mtu)
    }
    /// Every namespace this lab created so far, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.inner.namespaces).clone()
    }

    /// Deletes namespace `ns` now (a machine that dies): its veths go with it. Stop the
    /// processes in it first; the lab no longer tears it down.
    ///
    /// # Errors
    /// When `ip netns delete` fails.
    pub fn delete_namespace(&self, ns: &Netns) -> Result<()> {
        ip(&["netns", "delete", ns.name()])?;
        remove_etc_dir(ns.name());
        lock(&self.inner.namespaces).retain(|n| n != ns.name());
        Ok(())
    }
}

impl Lab {
    /// Starts `args` in the root network namespace, where the control planes listen on
    /// loopback (kube-controller-manager), stopped by PID with the lab.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn_root(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("no command to spawn"))?;
        let mut command = Command::new(program);
        command.args(rest).envs(env.iter().copied());
        self.inner.spawn(command, &label(program, "root"))
    }
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.inner.prefix)
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// Removes every lab resource; runs when the [`Lab`] is dropped, panics included.
struct Teardown(Arc<LabInner>);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

pub(crate) struct LabInner {
    prefix: String,
    dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Arc<ProcSlot>>>,
    addresses: Mutex<BTreeMap<IpAddr, Vec<String>>>,
    counter: AtomicU32,
    torn_down: AtomicBool,
}

impl LabInner {
    fn check_alive(&self) -> Result<()> {
        ensure!(
            !self.torn_down.load(Ordering::SeqCst),
            "lab {} was already torn down",
            self.prefix
        );
        Ok(())
    }

    fn next_counter(&self) -> u32 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn add_netns(self: &Arc<Self>, name: &str) -> Result<Netns> {
        self.check_alive()?;
        ensure!(
            name.starts_with(&self.prefix),
            "namespace {name} lacks the lab prefix {}",
            self.prefix
        );
        ip(&["netns", "add", name])?;
        lock(&self.namespaces).push(name.to_owned());
        let ns = Netns {
            name: name.to_owned(),
            lab: self.clone(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn spawn(&self, command: Command, label: &str) -> Result<Proc> {
        self.check_alive()?;
        let logs = self.dir.join("logs");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .with_context(|| format!("creating {}", logs.display()))?;
        let base = logs.join(format!("{:03}-{label}", self.next_counter()));
        let (proc, slot) = ProcSlot::spawn(command, label.to_owned(), &base)?;
        lock(&self.procs).push(slot);
        Ok(proc)
    }

    fn register_address(&self, ip: impl Into<IpAddr>, ns: &str) {
        lock(&self.addresses)
            .entry(ip.into())
            .or_default()
            .push(ns.to_owned());
    }

    fn owner_of(self: &Arc<Self>, ip: IpAddr) -> Result<Netns> {
        let addresses = lock(&self.addresses);
        match addresses.get(&ip).map(Vec::as_slice) {
            Some([name]) => Ok(Netns {
                name: name.clone(),
                lab: self.clone(),
            }),
            Some(names) if names.len() > 1 => bail!(
                "{ip} is in several namespaces ({}); use transfer_between",
                names.join(", ")
            ),
            _ => bail!("no namespace of lab {} has address {ip}", self.prefix),
        }
    }

    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let procs = lock(&self.procs).clone();
        if thread::panicking() {
            dump_logs(&procs);
        }
        stop_all(&procs);
        let namespaces = lock(&self.namespaces).clone();
        for name in namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "delete", name]) {
                eprintln!("lab {}: {e:#}", self.prefix);
            }
            remove_etc_dir(name);
        }
        if std::env::var_os("WIREMESH_LAB_KEEP").is_some() {
            eprintln!("lab {}: keeping {}", self.prefix, self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lab {}: removing {}: {e}", self.prefix, self.dir.display());
        }
    }
}

/// Picks `wm` + 4 random hex digits + `-` and claims `/tmp/wmXXXX` for it; retries on the
/// rare clash with a directory or namespace already there.
fn unique_prefix() -> Result<(String, PathBuf)> {
    let existing = ip(&["netns", "list"])?;
    for _ in 0..16 {
        let stem = format!("wm{:04x}", OsRng.next_u32() & 0xffff);
        let prefix = format!("{stem}-");
        if existing.lines().any(|l| l.starts_with(&prefix)) {
            continue;
        }
        let dir = std::env::temp_dir().join(&stem);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok((prefix, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free lab prefix after 16 tries; remove stale /tmp/wm* directories and namespaces")
}

/// `/etc/netns/<name>`, the files `ip netns exec` mounts over `/etc` in namespace `name`
/// ([`Netns::write_etc_file`]).
fn etc_dir(name: &str) -> PathBuf {
    Path::new("/etc/netns").join(name)
}

fn remove_etc_dir(name: &str) {
    let dir = etc_dir(name);
    if dir.exists()
        && let Err(e) = fs::remove_dir_all(&dir)
    {
        eprintln!("lab: removing {}: {e}", dir.display());
    }
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    ensure!(
        (1..=24).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "{kind} name {name:?} must be 1 to 24 of [A-Za-z0-9_-]"
    );
    Ok(())
}

/// Runs `ip args...` in the root namespace, returning stdout.
fn ip(args: &[&str]) -> Result<String> {
    let mut command = Command::new("ip");
    command.args(args);
    let output = run_with_timeout(command, EXEC_TIMEOUT)?;
    ensure!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        describe(&output)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ok_stdout(output: &Output, args: &[&str]) -> Result<String> {
    ensure!(
        output.status.success(),
        "{}: {}",
        args.join(" "),
        describe(output)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

fn label(program: &str, ns: &str) -> String {
    let base = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    format!("{base}@{ns}")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Teardown must still work after a panic elsewhere poisoned a lock.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("host", "a-1_b").is_ok());
        assert!(check_name("host", "").is_err());
        assert!(check_name("host", "a b").is_err());
        assert!(check_name("host", "a/b").is_err());
    }
}
