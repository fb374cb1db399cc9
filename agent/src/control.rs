//! The data plane's front door: the [`Command`]s the task that owns the device takes, the
//! [`Handle`] other tasks send them with, and the [`Snapshot`] it answers with.
//!
//! The packet loop ([`crate::dataplane`]) serves these; the UAPI server
//! ([`crate::uapi_server`]), the metrics endpoint ([`crate::metrics`]) and the peer
//! machinery ([`crate::peers`]) send them. None of those imports another for this.

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, oneshot};
use wiremesh_core::translate::Translation;
use wiremesh_core::{Counters, PeerView};
use wiremesh_proto::uapi::{DeviceUpdate, Request};

/// A request to the task that owns the device.
#[derive(Debug)]
pub enum Command {
    /// A parsed UAPI request; the reply is the full response text.
    Uapi(Request, oneshot::Sender<String>),
    /// Apply an update (Kubernetes mode); the reply says whether it was accepted.
    Apply(DeviceUpdate, oneshot::Sender<Result<(), String>>),
    /// A snapshot of the peers and counters.
    Snapshot(oneshot::Sender<Snapshot>),
    /// This cluster's prefix translation (pod CIDRs ↔ mesh CIDRs), from its cluster
    /// ConfigMap.
    SetTranslation(Translation),
}

/// A handle for other tasks to reach the device.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
}

impl Handle {
    /// A handle that sends to the task reading `commands`.
    pub(crate) fn new(commands: mpsc::Sender<Command>) -> Self {
        Self { commands }
    }

    /// Applies an update and waits for the verdict.
    ///
    /// # Errors
    /// When the data plane has stopped or refused the update.
    pub async fn apply(&self, update: DeviceUpdate) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Apply(update, tx))
            .await
            .context("data plane stopped")?;
        rx.await
            .context("data plane stopped")?
            .map_err(anyhow::Error::msg)
    }

    /// Sets this cluster's prefix translation.
    ///
    /// # Errors
    /// When the data plane has stopped.
    pub async fn set_translation(&self, translation: Translation) -> Result<()> {
        self.commands
            .send(Command::SetTranslation(translation))
            .await
            .context("data plane stopped")
    }

    /// A snapshot of the peers and counters.
    ///
    /// # Errors
    /// When the data plane has stopped.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Snapshot(tx))
            .await
            .context("data plane stopped")?;
        rx.await.context("data plane stopped")
    }
}

/// What the device looks like at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The interface name.
    pub interface: String,
    /// The peers, ordered by public key.
    pub peers: Vec<PeerView>,
    /// Drop and cookie counters.
    pub counters: Counters,
    /// Peers that hold noise state right now.
    pub live_tunnels: usize,
}
