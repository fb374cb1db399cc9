//! Ctrl-C and SIGTERM: finish the current step, then return normally so the lab's `Drop`
//! stops every process and deletes every namespace. Dying on the signal would leave them
//! behind, since the lab's processes run in their own process groups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Catches SIGINT and SIGTERM from now on; [`requested`] turns true on the first.
///
/// # Errors
/// When the handlers cannot be installed.
pub fn install() -> Result<()> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("starting the signal runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let (mut term, mut int) = match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    (Ok(t), Ok(i)) => (t, i),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(anyhow!("installing handlers: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    REQUESTED.store(true, Ordering::SeqCst);
                    eprintln!("[bench] interrupted: finishing this step, then cleaning up");
                }
            });
        })
        .context("starting the signal thread")?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("the signal thread died"))?
}

/// Whether SIGINT or SIGTERM arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Fails once an interrupt was requested, so `?` unwinds to the lab's cleanup.
///
/// # Errors
/// After SIGINT or SIGTERM.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps for `duration` in short steps, returning early (with an error) on an interrupt.
///
/// # Errors
/// After SIGINT or SIGTERM.
pub fn sleep(duration: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + duration;
    loop {
        check()?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
}
