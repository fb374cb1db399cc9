//! Threads inside lab namespaces, for load generators and probes that live in this
//! process (a network namespace is a per-thread attribute).

use std::thread::JoinHandle;

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};
use wiremesh_lab::Netns;

/// Runs `f` on a new thread that has entered `ns`'s network namespace.
///
/// # Errors
/// When the thread cannot be started; entering the namespace fails inside it (see
/// [`join`]).
pub fn spawn_in_netns<R: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<JoinHandle<Result<R>>> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::Builder::new()
        .name(format!("in-{}", ns.name()))
        .spawn(move || {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            f()
        })
        .context("starting a thread")
}

/// Waits for a thread from [`spawn_in_netns`] and returns its result.
///
/// # Errors
/// What the thread returned, or that it panicked.
pub fn join<R>(handle: JoinHandle<Result<R>>) -> Result<R> {
    handle
        .join()
        .map_err(|_| anyhow!("a namespace thread panicked"))?
}
