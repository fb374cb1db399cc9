//! Kubernetes mode (`wiremesh-agent kube`): publish this node's `MeshNode`, watch the
//! `MeshPeer`s the controller mirrors from linked clusters and this cluster's hosts
//! (`MeshNode`s of kind Host), and apply each change to the data plane incrementally.
//! Host mode ([`crate::host`]) runs the same peer machinery (`Context`, `Selection`).
//!
//! The data plane never waits for the API server: when it is unreachable the tunnels keep
//! what they have, and the watch catches up when it comes back.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, reflector};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use wiremesh_proto::crd::{MeshNode, MeshNodeKind, MeshNodeSpec, MeshPeer, TunnelStatus};
use wiremesh_proto::uapi::DeviceUpdate;
use wiremesh_proto::{InterfaceAddress, IpCidr, PublicKey};

use crate::dataplane::{self, Handle, InterfaceSpec};
use crate::mesh::{self, Origins, PeerOrigin, PeerSet};
use crate::metrics::AgentMetrics;

/// Field manager of everything the agent writes.
const MANAGER: &str = "wiremesh-agent";
/// How often the MeshNode is applied again even without a change (level-triggered), and
/// the tunnel status refreshed.
const REPUBLISH: Duration = Duration::from_secs(30);
/// How often tunnel statistics are written to the MeshNode status.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Retry pause while the API server cannot be reached at start-up.
const RETRY: Duration = Duration::from_secs(2);
/// How often the agent checks that its Node still exists (a deleted Node takes its
/// MeshNode, and so every remote tunnel to it, with it).
const NODE_CHECK: Duration = Duration::from_secs(3);

/// What `wiremesh-agent kube` was asked to do.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Kubeconfig file; in-cluster configuration when absent.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    pub context: Option<String>,
    /// This node's name (from the downward API).
    pub node_name: String,
    /// The TUN device name.
    pub interface: String,
    /// The UDP port.
    pub listen_port: u16,
    /// The TUN device's MTU.
    pub mtu: u32,
    /// Addresses to put on the TUN device (so the node's own traffic has a source).
    pub addresses: Vec<InterfaceAddress>,
    /// The private key file (generated on first start, mode 0600).
    pub key_file: PathBuf,
    /// Endpoints to publish instead of the Node's addresses.
    pub endpoints: Vec<SocketAddr>,
    /// Persistent keepalive towards every peer, seconds (0: off).
    pub persistent_keepalive: u16,
    /// UAPI socket directory.
    pub uapi_dir: PathBuf,
    /// Where to serve metrics and health.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the last known peers are kept, to come up with them when the API server is
    /// unreachable at start.
    pub state_dir: PathBuf,
}

/// Runs the agent in Kubernetes mode until SIGINT/SIGTERM.
///
/// # Errors
/// When the key, the client or the data plane cannot be set up.
pub async fn run(options: KubeOptions) -> Result<()> {
    crate::preflight()?;
    // The key directory is a hostPath the kubelet creates 0755; it is ours alone.
    crate::keys::private_dir(&options.state_dir)?;
    let key = crate::keys::load_or_generate(&options.key_file)?;
    let client = client(&options).await?;
    let node = wait_for_node(&client, &options.node_name).await?;
    let own_cidrs = node_pod_cidrs(&node);
    let endpoints = if options.endpoints.is_empty() {
        node_endpoints(&node, options.listen_port)
    } else {
        options.endpoints.clone()
    };
    if endpoints.is_empty() {
        warn!(node = %options.node_name, "the Node has no address; publishing no endpoint (peers must reach us first)");
    }
    let public = {
        let secret = boringtun::x25519::StaticSecret::from(*key.as_bytes());
        PublicKey::from(*boringtun::x25519::PublicKey::from(&secret).as_bytes())
    };
    info!(node = %options.node_name, public_key = %public, pod_cidrs = ?own_cidrs, ?endpoints, "starting in Kubernetes mode");

    let cached = load_cache(&options.state_dir);
    let initial = DeviceUpdate {
        private_key: Some(Some(key)),
        listen_port: Some(options.listen_port),
        replace_peers: true,
        ..DeviceUpdate::default()
    };
    let spec = InterfaceSpec {
        name: options.interface.clone(),
        mtu: options.mtu,
        addresses: options.addresses.clone(),
        uapi_dir: options.uapi_dir.clone(),
    };
    let mesh_node = MeshNodeSpec {
        public_key: public.to_string(),
        endpoints: endpoints.iter().map(ToString::to_string).collect(),
        pod_cidrs: own_cidrs.iter().map(ToString::to_string).collect(),
        location: node.labels().get("topology.kubernetes.io/zone").cloned(),
        kind: MeshNodeKind::Node,
    };
    let context = Context {
        client: client.clone(),
        selection: Selection {
            own_name: node.name_any(),
            local_peers: LocalPeers::Hosts,
            own_cidrs,
            keepalive: options.persistent_keepalive,
        },
        state_dir: options.state_dir.clone(),
    };
    let publisher = publish(client, node, mesh_node);
    run_data_plane(
        spec,
        initial,
        options.metrics_addr,
        context,
        cached,
        publisher,
    )
    .await
}

/// Brings the data plane up and, once it answers, runs `context` (with `publisher`,
/// which ends when this machine leaves the mesh) until SIGINT/SIGTERM.
pub(crate) async fn run_data_plane(
    spec: InterfaceSpec,
    initial: DeviceUpdate,
    metrics_addr: Option<SocketAddr>,
    context: Context,
    cached: Option<PeerSet>,
    publisher: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = crate::metrics::bind(metrics_addr).await?;
    let (origins_tx, origins_rx) = watch::channel(Origins::new());
    let ready = move |handle: Handle| {
        crate::metrics::spawn(metrics, AgentMetrics::new(handle.clone(), origins_rx));
        tokio::spawn(context.run(handle, cached, origins_tx, publisher));
    };
    dataplane::run(spec, initial, ready, crate::shutdown_signal()).await
}

async fn client(options: &KubeOptions) -> Result<Client> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &KubeConfigOptions {
                    context: options.context.clone(),
                    ..KubeConfigOptions::default()
                },
            )
            .await
            .context("loading the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and no in-cluster configuration")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// The Node object; waits while the API server is unreachable or the Node not there yet.
async fn wait_for_node(client: &Client, name: &str) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut logged = false;
    loop {
        match nodes.get_opt(name).await {
            Ok(Some(node)) => return Ok(node),
            Ok(None) if !logged => {
                warn!(node = name, "waiting for the Node object to exist");
                logged = true;
            }
            Err(e) if !logged => {
                warn!(node = name, error = %e, "waiting for the API server");
                logged = true;
            }
            _ => {}
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn node_pod_cidrs(node: &Node) -> Vec<IpCidr> {
    let spec = node.spec.clone().unwrap_or_default();
    let mut texts = spec.pod_cidrs.unwrap_or_default();
    if texts.is_empty()
        && let Some(c) = spec.pod_cidr
    {
        texts.push(c);
    }
    texts.iter().filter_map(|c| c.parse().ok()).collect()
}

/// ExternalIPs first, then InternalIPs: the most widely reachable address is preferred.
fn node_endpoints(node: &Node, port: u16) -> Vec<SocketAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for kind in ["ExternalIP", "InternalIP"] {
        for a in addresses.iter().filter(|a| a.type_ == kind) {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                let endpoint = SocketAddr::new(ip, port);
                if !out.contains(&endpoint) {
                    out.push(endpoint);
                }
            }
        }
    }
    out
}

/// Which MeshNodes of this cluster get a tunnel (besides every MeshPeer): a node's
/// pods reach the other nodes of its cluster through the cluster's own network, but a
/// host outside Kubernetes only through the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalPeers {
    /// On a Kubernetes node: the cluster's hosts.
    Hosts,
    /// On a host: every node and every other host of the cluster.
    All,
}

/// What the tunnel-building tasks of both modes share.
pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) selection: Selection,
    pub(crate) state_dir: PathBuf,
}

/// Which peers this machine gets, from the MeshPeers and this cluster's MeshNodes (pure).
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    /// This machine's MeshNode, which gets no tunnel to itself.
    pub(crate) own_name: String,
    pub(crate) local_peers: LocalPeers,
    /// This machine's own pod CIDRs (or a host's addresses): no peer may claim them.
    pub(crate) own_cidrs: Vec<IpCidr>,
    pub(crate) keepalive: u16,
}

impl Context {
    async fn run(
        self,
        handle: Handle,
        cached: Option<PeerSet>,
        origins: watch::Sender<Origins>,
        publisher: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut applied = PeerSet::new();
        if let Some(peers) = cached {
            info!(
                peers = peers.len(),
                "restoring the last known peers until the API server answers"
            );
            apply(&handle, &mut applied, peers, &origins).await;
        }
        let node_gone = tokio::spawn(publisher);
        tokio::spawn(report_status(
            self.client.clone(),
            self.selection.own_name.clone(),
            handle.clone(),
            origins.subscribe(),
        ));
        let peers = self.watch_peers(handle, applied, origins);
        tokio::pin!(peers);
        tokio::select! {
            () = &mut peers => {}
            _ = node_gone => {
                info!("this machine left the mesh; its MeshNode was removed");
            }
        }
    }

    /// Mirrors MeshPeers and this cluster's MeshNodes (those [`LocalPeers`] selects) into
    /// the device until the task ends. Nothing changes until both lists were read once,
    /// so a restart never drops the tunnels of the list that answers second.
    async fn watch_peers(
        &self,
        handle: Handle,
        mut applied: PeerSet,
        origins: watch::Sender<Origins>,
    ) {
        let (peers, peers_writer) = reflector::store();
        let peer_events = reflector(
            peers_writer,
            watcher::watcher(
                Api::<MeshPeer>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|e| (Source::MeshPeers, e.map(|e| changed(&e))));
        let (nodes, nodes_writer) = reflector::store();
        let node_events = reflector(
            nodes_writer,
            watcher::watcher(
                Api::<MeshNode>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|e| (Source::MeshNodes, e.map(|e| changed(&e))));
        let stream = futures::stream::select(peer_events, node_events);
        tokio::pin!(stream);
        let mut failing = [false; 2];
        let mut listed = [false; 2];
        while let Some((source, event)) = stream.next().await {
            let i = source as usize;
            match event {
                Ok(Some(initial)) => {
                    if failing[i] {
                        info!(watch = ?source, "watch restored");
                        failing[i] = false;
                    }
                    listed[i] |= initial;
                    if listed != [true; 2] {
                        continue;
                    }
                    let desired = self.selection.desired(
                        peers.state().iter().map(AsRef::as_ref),
                        nodes.state().iter().map(AsRef::as_ref),
                    );
                    apply(&handle, &mut applied, desired, &origins).await;
                    save_cache(&self.state_dir, &applied);
                }
                Ok(None) => {}
                Err(e) => {
                    if !failing[i] {
                        warn!(watch = ?source, error = %e, "watch failed; keeping the current tunnels");
                        failing[i] = true;
                    }
                }
            }
        }
    }
}

impl Selection {
    fn desired<'a>(
        &self,
        peers: impl Iterator<Item = &'a MeshPeer>,
        nodes: impl Iterator<Item = &'a MeshNode>,
    ) -> PeerSet {
        let mut set = PeerSet::new();
        let locals = nodes.filter(|n| {
            n.name_any() != self.own_name
                && n.spec.has_key()
                && (self.local_peers == LocalPeers::All || n.spec.kind == MeshNodeKind::Host)
        });
        for node in locals {
            let name = node.name_any();
            // `meshctl host add` registers single addresses; anything wider on a host is
            // a forged or broken MeshNode that could take traffic meant for others.
            if node.spec.kind == MeshNodeKind::Host
                && !node.spec.pod_cidrs.iter().all(|c| is_single_address(c))
            {
                warn!(host = %name, cidrs = ?node.spec.pod_cidrs, "host refused: a host has single addresses only");
                continue;
            }
            let origin = PeerOrigin {
                name: name.clone(),
                cluster: String::new(),
                node: name,
            };
            self.insert(
                &mut set,
                origin,
                &node.spec.public_key,
                &node.spec.endpoints,
                &node.spec.pod_cidrs,
            );
        }
        for peer in peers {
            let origin = PeerOrigin {
                name: peer.name_any(),
                cluster: peer.spec.cluster.clone(),
                node: peer.spec.node.clone(),
            };
            self.insert(
                &mut set,
                origin,
                &peer.spec.public_key,
                &peer.spec.endpoints,
                &peer.spec.pod_cidrs,
            );
        }
        set
    }

    fn insert(
        &self,
        set: &mut PeerSet,
        origin: PeerOrigin,
        public_key: &str,
        endpoints: &[String],
        pod_cidrs: &[String],
    ) {
        match mesh::desired_peer(
            &origin,
            public_key,
            endpoints,
            pod_cidrs,
            self.keepalive,
            &self.own_cidrs,
        ) {
            Ok((key, desired)) => {
                if let Some(previous) = set.insert(key, desired) {
                    warn!(peer = %origin.name, other = %previous.origin.name, "two peers with one key; keeping the later");
                }
            }
            Err(e) => warn!(error = %e, "peer refused"),
        }
    }
}

/// `10.250.0.5/32` or `fd00::5/128`.
fn is_single_address(text: &str) -> bool {
    text.parse::<IpCidr>()
        .is_ok_and(|c| c.prefix_len() == if c.addr().is_ipv4() { 32 } else { 128 })
}

/// Which watch an event came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    MeshPeers = 0,
    MeshNodes = 1,
}

/// `Some(true)` when the event completes a (re)list, `Some(false)` for another change,
/// `None` while a relist is still streaming in.
fn changed<K>(event: &Event<K>) -> Option<bool> {
    match event {
        Event::InitDone => Some(true),
        Event::Apply(_) | Event::Delete(_) => Some(false),
        Event::Init | Event::InitApply(_) => None,
    }
}

/// Moves the device from `applied` to `desired`; on success publishes where each peer came
/// from (for the status reporter and the metric labels).
async fn apply(
    handle: &Handle,
    applied: &mut PeerSet,
    desired: PeerSet,
    origins: &watch::Sender<Origins>,
) {
    let Some(update) = mesh::diff(applied, &desired) else {
        return;
    };
    match handle.apply(update).await {
        Ok(()) => {
            debug!(peers = desired.len(), "peers applied");
            origins.send_replace(
                desired
                    .iter()
                    .map(|(k, p)| (*k, p.origin.clone()))
                    .collect(),
            );
            *applied = desired;
        }
        Err(e) => warn!(error = %e, "the data plane refused the peers"),
    }
}

/// Applies this node's MeshNode (owned by its Node) now and every [`REPUBLISH`]; returns
/// when the Node is gone, after deleting the MeshNode.
async fn publish(client: Client, node: Node, spec: MeshNodeSpec) {
    let name = node.name_any();
    let api: Api<MeshNode> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let mut object = MeshNode::new(&name, spec);
    object.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Node".to_owned(),
        name: name.clone(),
        uid: node.uid().unwrap_or_default(),
        ..OwnerReference::default()
    }]);
    let params = PatchParams::apply(MANAGER).force();
    let mut published = false;
    let mut last_publish: Option<tokio::time::Instant> = None;
    loop {
        if let Ok(None) = nodes.get_opt(&name).await {
            if let Err(e) = api.delete(&name, &Default::default()).await {
                debug!(error = %e, "deleting the MeshNode");
            }
            return;
        }
        let due = !published || last_publish.is_none_or(|t| t.elapsed() >= REPUBLISH);
        if due {
            match api.patch(&name, &params, &Patch::Apply(&object)).await {
                Ok(_) => {
                    if !published {
                        info!(node = %name, "MeshNode published");
                    }
                    published = true;
                    last_publish = Some(tokio::time::Instant::now());
                }
                Err(e) => {
                    published = false;
                    warn!(node = %name, error = %e, "publishing the MeshNode");
                }
            }
        }
        tokio::time::sleep(if published { NODE_CHECK } else { RETRY }).await;
    }
}

/// Records an Event on this node's MeshNode for each tunnel that went up or down.
async fn record_transitions(
    recorder: &Recorder,
    node: &ObjectReference,
    changes: &[(PublicKey, bool)],
    origins: &Origins,
) {
    for (key, up) in changes {
        let peer = origins
            .get(key)
            .map_or_else(|| key.to_string(), |o| format!("{}/{}", o.cluster, o.node));
        let (type_, reason, note) = if *up {
            (
                EventType::Normal,
                "TunnelUp",
                format!("tunnel to {peer} is up (handshake completed)"),
            )
        } else {
            (
                EventType::Warning,
                "TunnelDown",
                format!(
                    "tunnel to {peer} is down: no handshake for {}s",
                    mesh::TUNNEL_UP_WITHIN.as_secs()
                ),
            )
        };
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Handshake".to_owned(),
            // The MeshPeer is the related object: Events with the same reason on the
            // same MeshNode are merged into one series unless this differs.
            secondary: origins.get(key).map(|o| ObjectReference {
                api_version: Some(MeshPeer::api_version(&()).into_owned()),
                kind: Some(MeshPeer::kind(&()).into_owned()),
                name: Some(o.name.clone()),
                ..ObjectReference::default()
            }),
        };
        if let Err(e) = recorder.publish(&event, node).await {
            debug!(error = %e, reason, "recording an Event");
        }
    }
}

/// Writes the tunnels' state into the MeshNode status every [`STATUS_INTERVAL`], and
/// records an Event on it when a tunnel goes up or down.
async fn report_status(
    client: Client,
    name: String,
    handle: Handle,
    origins: watch::Receiver<Origins>,
) {
    let api: Api<MeshNode> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(name.clone()),
        },
    );
    let reference = ObjectReference {
        api_version: Some(MeshNode::api_version(&()).into_owned()),
        kind: Some(MeshNode::kind(&()).into_owned()),
        name: Some(name.clone()),
        ..ObjectReference::default()
    };
    let mut tunnels: BTreeMap<PublicKey, bool> = BTreeMap::new();
    let mut ready_since: Option<Time> = None;
    loop {
        if let Ok(snapshot) = handle.snapshot().await {
            let now = k8s_openapi::jiff::Timestamp::now();
            let origins = origins.borrow().clone();
            let (changes, state) = mesh::tunnel_transitions(&tunnels, &snapshot.peers);
            tunnels = state;
            record_transitions(&recorder, &reference, &changes, &origins).await;
            let peers: Vec<TunnelStatus> = snapshot
                .peers
                .iter()
                .map(|p| TunnelStatus {
                    name: origins
                        .get(&p.public_key)
                        .map_or_else(|| p.public_key.to_string(), |o| o.name.clone()),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    latest_handshake_time: p.since_handshake.and_then(|d| {
                        let d = k8s_openapi::jiff::SignedDuration::try_from(d).ok()?;
                        now.checked_sub(d).ok().map(Time)
                    }),
                    rx_bytes: i64::try_from(p.rx_bytes).unwrap_or(i64::MAX),
                    tx_bytes: i64::try_from(p.tx_bytes).unwrap_or(i64::MAX),
                })
                .collect();
            let since = ready_since.get_or_insert(Time(now)).clone();
            let status = serde_json::json!({
                "apiVersion": MeshNode::api_version(&()),
                "kind": MeshNode::kind(&()),
                "status": {
                    "conditions": [Condition {
                        type_: "Ready".to_owned(),
                        status: "True".to_owned(),
                        reason: "DataPlaneConfigured".to_owned(),
                        message: format!("{} tunnels configured", peers.len()),
                        last_transition_time: since,
                        observed_generation: None,
                    }],
                    "peers": peers,
                    "lastUpdateTime": Time(now),
                }
            });
            if let Err(e) = api
                .patch_status(&name, &params, &Patch::Apply(&status))
                .await
            {
                debug!(error = %e, "writing the MeshNode status");
            }
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    }
}

const CACHE_FILE: &str = "peers.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedPeer {
    public_key: String,
    name: String,
    /// Absent in caches written before peers carried their origin.
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    node: String,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<String>,
    persistent_keepalive: u16,
}

fn save_cache(dir: &std::path::Path, peers: &PeerSet) {
    let list: Vec<CachedPeer> = peers
        .iter()
        .map(|(k, p)| CachedPeer {
            public_key: k.to_string(),
            name: p.origin.name.clone(),
            cluster: p.origin.cluster.clone(),
            node: p.origin.node.clone(),
            endpoint: p.endpoint,
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            persistent_keepalive: p.persistent_keepalive,
        })
        .collect();
    let write = || -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{CACHE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
        std::fs::rename(tmp, dir.join(CACHE_FILE))?;
        Ok(())
    };
    if let Err(e) = write() {
        debug!(error = %e, "saving the peer cache");
    }
}

pub(crate) fn load_cache(dir: &std::path::Path) -> Option<PeerSet> {
    let text = std::fs::read(dir.join(CACHE_FILE)).ok()?;
    let list: Vec<CachedPeer> = serde_json::from_slice(&text).ok()?;
    let mut set = PeerSet::new();
    for p in list {
        let key: PublicKey = p.public_key.parse().ok()?;
        let allowed_ips = p
            .allowed_ips
            .iter()
            .map(|c| c.parse().ok())
            .collect::<Option<Vec<IpCidr>>>()?;
        set.insert(
            key,
            mesh::DesiredPeer {
                origin: PeerOrigin {
                    name: p.name,
                    cluster: p.cluster,
                    node: p.node,
                },
                endpoint: p.endpoint,
                allowed_ips,
                persistent_keepalive: p.persistent_keepalive,
            },
        );
    }
    Some(set)
}

/// Checks `NODE_NAME` was given.
///
/// # Errors
/// When it is empty.
pub fn check_node_name(name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("NODE_NAME is empty: set it from the downward API (spec.nodeName)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use wiremesh_proto::crd::MeshPeerSpec;

    use super::*;

    fn key(seed: u8) -> PublicKey {
        PublicKey::from([seed; 32])
    }

    fn mesh_node(name: &str, kind: MeshNodeKind, seed: u8, cidr: &str) -> MeshNode {
        MeshNode::new(
            name,
            MeshNodeSpec {
                public_key: if seed == 0 {
                    String::new()
                } else {
                    key(seed).to_base64()
                },
                endpoints: vec![format!("198.18.1.{seed}:51820")],
                pod_cidrs: vec![cidr.to_owned()],
                location: None,
                kind,
            },
        )
    }

    fn mesh_peer(seed: u8, cidr: &str) -> MeshPeer {
        MeshPeer::new(
            "cluster-b.b1",
            MeshPeerSpec {
                cluster: "cluster-b".into(),
                node: "b1".into(),
                public_key: key(seed).to_base64(),
                endpoints: vec!["198.18.2.1:51820".into()],
                pod_cidrs: vec![cidr.into()],
                location: None,
                kind: MeshNodeKind::Node,
            },
        )
    }

    fn selection(own: &str, local_peers: LocalPeers, own_cidr: &str) -> Selection {
        Selection {
            own_name: own.into(),
            local_peers,
            own_cidrs: vec![own_cidr.parse().unwrap()],
            keepalive: 25,
        }
    }

    fn cluster() -> Vec<MeshNode> {
        vec![
            mesh_node("a1", MeshNodeKind::Node, 1, "10.1.1.0/24"),
            mesh_node("a2", MeshNodeKind::Node, 2, "10.1.2.0/24"),
            mesh_node("db1", MeshNodeKind::Host, 3, "10.250.1.1/32"),
            // Registered, no agent yet: not ready.
            mesh_node("db2", MeshNodeKind::Host, 0, "10.250.2.1/32"),
            // A forged host claiming a network.
            mesh_node("evil", MeshNodeKind::Host, 4, "10.250.0.0/16"),
        ]
    }

    #[test]
    fn a_node_gets_the_mesh_peers_and_the_clusters_ready_hosts_only() {
        let peers = [mesh_peer(9, "10.2.1.0/24")];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), cluster().iter());
        let keys: Vec<_> = set.keys().copied().collect();
        assert_eq!(keys, [key(3), key(9)]);
        assert_eq!(set[&key(3)].origin.node, "db1");
        assert_eq!(set[&key(3)].allowed_ips, ["10.250.1.1/32".parse().unwrap()]);
    }

    #[test]
    fn a_host_gets_every_node_and_host_but_itself() {
        let peers = [mesh_peer(9, "10.2.1.0/24")];
        let set = selection("db1", LocalPeers::All, "10.250.1.1/32")
            .desired(peers.iter(), cluster().iter());
        let keys: Vec<_> = set.keys().copied().collect();
        assert_eq!(keys, [key(1), key(2), key(9)]);
    }
}
