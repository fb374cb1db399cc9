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
use wiremesh_proto::crd::{
    GATEWAY_LABEL, MeshNode, MeshNodeKind, MeshNodeSpec, MeshPeer, TunnelStatus,
};
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
/// Persistent keepalive towards a peer that may be relayed, when none is configured: it
/// keeps trying the direct path.
const RELAYED_KEEPALIVE: u16 = 25;
/// How often the failover groups' members are checked for signs of life.
const FAILOVER_CHECK: Duration = Duration::from_millis(500);

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
        gateway: is_labelled_gateway(&node),
        relay: false,
    };
    warn_unusable_gateway(&mesh_node);
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

/// A gateway label on a node nobody can reach is ignored everywhere; say so here.
fn warn_unusable_gateway(spec: &MeshNodeSpec) {
    if spec.gateway && !spec.is_gateway() {
        warn!(
            "this node is labelled {GATEWAY_LABEL}=true but publishes no endpoint: no other cluster could reach it, so it is not used as a gateway"
        );
    }
}

/// The Node carries `wiremesh.io/gateway=true`.
fn is_labelled_gateway(node: &Node) -> bool {
    node.labels().get(GATEWAY_LABEL).map(String::as_str) == Some("true")
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
            apply(&handle, &mut applied, peers, Some(&origins)).await;
        }
        let node_gone = tokio::spawn(publisher);
        tokio::spawn(report_status(
            self.client.clone(),
            self.selection.own_name.clone(),
            handle.clone(),
            origins.subscribe(),
        ));
        let peers = self.watch_peers(handle.clone(), applied, origins);
        tokio::pin!(peers);
        tokio::select! {
            () = &mut peers => {}
            _ = node_gone => {
                // Nobody builds tunnels to us any more: drop ours, and the cache, so a
                // restart does not bring them back.
                warn!("this machine left the mesh (its MeshNode was removed): dropping every tunnel");
                let update = DeviceUpdate {
                    replace_peers: true,
                    ..DeviceUpdate::default()
                };
                if let Err(e) = handle.apply(update).await {
                    warn!(error = %e, "dropping the tunnels");
                }
                if let Err(e) = std::fs::remove_file(self.state_dir.join(CACHE_FILE))
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    warn!(error = %e, "removing the peer cache");
                }
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
        let mut base: Option<Desired> = None;
        let mut active = mesh::Active::new();
        let mut failover = tokio::time::interval(FAILOVER_CHECK);
        failover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (source, event) = tokio::select! {
                next = stream.next() => match next {
                    Some(next) => next,
                    None => return,
                },
                _ = failover.tick() => {
                    if let Some(base) = base.as_ref().filter(|b| !b.groups.is_empty()) {
                        let before = applied.clone();
                        reconcile(&handle, &mut applied, base, &mut active, &origins).await;
                        if applied != before {
                            save_cache(&self.state_dir, &applied);
                        }
                    }
                    continue;
                }
            };
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
                    let desired = base.insert(self.selection.desired(
                        peers.state().iter().map(AsRef::as_ref),
                        nodes.state().iter().map(AsRef::as_ref),
                    ));
                    reconcile(&handle, &mut applied, desired, &mut active, &origins).await;
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

/// The peers and failover groups this machine should have.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Desired {
    pub(crate) peers: PeerSet,
    pub(crate) groups: mesh::Groups,
    /// The peers reached through a group, with no tunnel of their own (for status).
    pub(crate) via: Origins,
}

/// The failover group of this cluster's own gateways (on a node that is not one).
const LOCAL_GATEWAYS: &str = "local-gateways";

impl Selection {
    /// Which peers this machine gets.
    ///
    /// - A remote cluster with gateways ([`MeshNodeSpec::is_gateway`], mirrored as
    ///   `MeshPeer.spec.gateway`) is reached through them: one failover group per such
    ///   cluster holds the pod CIDRs of all its nodes; its other nodes get no tunnel.
    ///   Its hosts are still reached directly.
    /// - When this cluster has gateways, a node that is not one tunnels only to them (one
    ///   group holding every remote prefix) and to the cluster's hosts. A gateway tunnels
    ///   to every remote peer and accepts from each node of its cluster that node's pods
    ///   (the answers come back through the cluster network, so nothing is routed to
    ///   them); it keeps every tunnel alive with [`mesh::GATEWAY_KEEPALIVE`], which is how
    ///   the others notice when it dies.
    fn desired<'a>(
        &self,
        peers: impl Iterator<Item = &'a MeshPeer>,
        nodes: impl Iterator<Item = &'a MeshNode>,
    ) -> Desired {
        // Sorted by name: a group's members are preferred in this order, as the other
        // side (which sorts MeshPeers by node name) prefers them.
        let mut nodes: Vec<&MeshNode> = nodes.collect();
        nodes.sort_by_key(|n| n.name_any());
        let peers: Vec<&MeshPeer> = peers.collect();
        let mut out = Desired::default();
        let on_node = self.local_peers == LocalPeers::Hosts;
        let is_gateway = |n: &&MeshNode| n.spec.is_gateway();
        let local_gateways: Vec<&MeshNode> = nodes.iter().copied().filter(is_gateway).collect();
        let me_gateway = on_node && local_gateways.iter().any(|n| n.name_any() == self.own_name);
        let behind_gateway = on_node && !me_gateway && !local_gateways.is_empty();
        let keepalive = if me_gateway {
            mesh::GATEWAY_KEEPALIVE
        } else {
            self.keepalive
        };

        for node in &nodes {
            let name = node.name_any();
            if name == self.own_name || !node.spec.has_key() {
                continue;
            }
            let host = node.spec.kind == MeshNodeKind::Host;
            let role = if host || self.local_peers == LocalPeers::All {
                Role::Direct
            } else if behind_gateway && node.spec.is_gateway() {
                Role::Member(LOCAL_GATEWAYS.to_owned())
            } else if me_gateway && !node.spec.is_gateway() {
                Role::AcceptOnly
            } else {
                continue;
            };
            // `meshctl host add` registers single addresses; anything wider on a host is
            // a forged or broken MeshNode that could take traffic meant for others.
            if host && !node.spec.pod_cidrs.iter().all(|c| is_single_address(c)) {
                warn!(host = %name, cidrs = ?node.spec.pod_cidrs, "host refused: a host has single addresses only");
                continue;
            }
            let origin = PeerOrigin {
                name: name.clone(),
                cluster: String::new(),
                node: name,
                path: mesh::PeerPath::Direct,
            };
            let spec = &node.spec;
            self.insert(
                &mut out,
                origin,
                role,
                keepalive,
                &spec.public_key,
                &spec.endpoints,
                &spec.pod_cidrs,
            );
        }

        let relay_peers: Vec<PublicKey> = peers
            .iter()
            .filter(|p| p.spec.relay)
            .filter_map(|p| p.spec.public_key.parse().ok())
            .collect();
        let gateway_clusters: std::collections::BTreeSet<&str> = peers
            .iter()
            .filter(|p| p.spec.gateway && p.spec.kind == MeshNodeKind::Node)
            // A gateway we would refuse (bad key, our own CIDRs) carries nothing: a
            // cluster with no usable gateway keeps its direct tunnels.
            .filter(|p| {
                let spec = &p.spec;
                mesh::desired_peer(
                    &PeerOrigin::default(),
                    &spec.public_key,
                    &spec.endpoints,
                    &spec.pod_cidrs,
                    0,
                    &self.own_cidrs,
                )
                .is_ok()
            })
            .map(|p| p.spec.cluster.as_str())
            .collect();
        // Sorted by node name within a cluster, as the other side sorts its gateways.
        let mut peers = peers;
        peers.sort_by(|a, b| (&a.spec.cluster, &a.spec.node).cmp(&(&b.spec.cluster, &b.spec.node)));
        for peer in peers {
            let spec = &peer.spec;
            let behind_remote =
                spec.kind == MeshNodeKind::Node && gateway_clusters.contains(spec.cluster.as_str());
            let role = if behind_gateway {
                Role::Via(LOCAL_GATEWAYS.to_owned())
            } else if behind_remote && spec.gateway {
                Role::Member(format!("cluster/{}", spec.cluster))
            } else if behind_remote {
                Role::Via(format!("cluster/{}", spec.cluster))
            } else {
                Role::Direct
            };
            let origin = PeerOrigin {
                name: peer.name_any(),
                cluster: spec.cluster.clone(),
                node: spec.node.clone(),
                path: mesh::PeerPath::Direct,
            };
            self.insert(
                &mut out,
                origin,
                role,
                keepalive,
                &spec.public_key,
                &spec.endpoints,
                &spec.pod_cidrs,
            );
        }
        self.add_relay_groups(&mut out, &nodes, &relay_peers);
        for group in out.groups.values_mut() {
            group.cidrs.sort();
            group.cidrs.dedup();
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        out: &mut Desired,
        origin: PeerOrigin,
        role: Role,
        keepalive: u16,
        public_key: &str,
        endpoints: &[String],
        pod_cidrs: &[String],
    ) {
        let (key, mut desired) = match mesh::desired_peer(
            &origin,
            public_key,
            endpoints,
            pod_cidrs,
            keepalive,
            &self.own_cidrs,
        ) {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!(error = %e, "peer refused");
                return;
            }
        };
        match role {
            Role::Direct => {}
            Role::AcceptOnly => {
                desired.accept_ips = std::mem::take(&mut desired.allowed_ips);
                desired.origin.path = mesh::PeerPath::Forwarding;
            }
            Role::Member(group) => {
                let group = out.groups.entry(group).or_default();
                group.members.push(key);
                // A local gateway's own pods are reached through the cluster network.
                if origin.cluster.is_empty() {
                    desired.allowed_ips.clear();
                } else {
                    group.cidrs.append(&mut desired.allowed_ips);
                }
            }
            Role::Via(group) => {
                out.groups
                    .entry(group.clone())
                    .or_default()
                    .cidrs
                    .append(&mut desired.allowed_ips);
                let origin = PeerOrigin {
                    path: mesh::PeerPath::Via { group },
                    ..origin
                };
                out.via.insert(key, origin);
                return;
            }
        }
        if let Some(previous) = out.peers.insert(key, desired) {
            warn!(peer = %origin.name, other = %previous.origin.name, "two peers with one key; keeping the later");
        }
    }

    /// A remote peer this machine cannot reach directly (both behind NAT, and no hole
    /// punched) is reached through a relay: each remote peer with a tunnel of its own
    /// gets a group of itself, then the relays that may stand in for it (this cluster's
    /// and its own cluster's, never a third cluster's, whose prefixes were not validated
    /// for it); it is routed through a relay only while it has no session and the relay
    /// has one. A relay does not relay through others.
    fn add_relay_groups(&self, out: &mut Desired, nodes: &[&MeshNode], relay_peers: &[PublicKey]) {
        let me_relay = nodes
            .iter()
            .any(|n| n.name_any() == self.own_name && n.spec.is_relay());
        // (cluster, name, key); "" is this cluster.
        let mut relays: Vec<(String, String, PublicKey)> = nodes
            .iter()
            .filter(|n| n.spec.is_relay() && n.name_any() != self.own_name)
            .filter_map(|n| Some((String::new(), n.name_any(), n.spec.public_key.parse().ok()?)))
            .collect();
        relays.extend(relay_peers.iter().filter_map(|k| {
            let origin = &out.peers.get(k)?.origin;
            Some((origin.cluster.clone(), origin.name.clone(), *k))
        }));
        relays.sort();
        relays.retain(|(_, _, k)| out.peers.contains_key(k));
        if me_relay || relays.is_empty() {
            return;
        }
        let relay_keys: Vec<PublicKey> = relays.iter().map(|(_, _, k)| *k).collect();
        let candidates: Vec<PublicKey> = out
            .peers
            .iter()
            .filter(|(k, p)| {
                !p.origin.cluster.is_empty()
                    && p.origin.path == mesh::PeerPath::Direct
                    && !relay_keys.contains(k)
                    && !out.groups.values().any(|g| g.members.contains(k))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in candidates {
            let Some(peer) = out.peers.get_mut(&key) else {
                continue;
            };
            let usable: Vec<PublicKey> = relays
                .iter()
                .filter(|(cluster, _, _)| cluster.is_empty() || *cluster == peer.origin.cluster)
                .map(|(_, _, k)| *k)
                .collect();
            if usable.is_empty() {
                continue;
            }
            // Handshakes must keep being tried while the peer is relayed (nothing else is
            // sent to it then), or it would never come back to direct.
            if peer.persistent_keepalive == 0 {
                peer.persistent_keepalive = RELAYED_KEEPALIVE;
            }
            let cidrs = std::mem::take(&mut peer.allowed_ips);
            let mut members = vec![key];
            members.extend(usable);
            out.groups.insert(
                format!("relay/{}", peer.origin.name),
                mesh::Group {
                    members,
                    cidrs,
                    liveness: mesh::Liveness::Session,
                },
            );
        }
    }
}

/// How a MeshNode or MeshPeer enters the device.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// A tunnel of its own, routed its prefixes.
    Direct,
    /// A tunnel whose prefixes are accepted but not routed (a gateway's own cluster).
    AcceptOnly,
    /// A member of a failover group; its prefixes join the group's.
    Member(String),
    /// No tunnel: its prefixes join the group that reaches it.
    Via(String),
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

/// Picks each failover group's active member from what the device heard lately, then
/// applies the result.
async fn reconcile(
    handle: &Handle,
    applied: &mut PeerSet,
    desired: &Desired,
    active: &mut mesh::Active,
    origins: &watch::Sender<Origins>,
) {
    let chosen = if desired.groups.is_empty() {
        mesh::Active::new()
    } else {
        let heard = match handle.snapshot().await {
            Ok(snapshot) => snapshot
                .peers
                .iter()
                .map(|p| (p.public_key, mesh::Seen::of(p)))
                .collect(),
            Err(_) => return,
        };
        mesh::choose_active(&desired.groups, &heard, active)
    };
    for (group, key) in &chosen {
        if active.get(group) != Some(key) {
            let via = desired.peers.get(key).map(|p| p.origin.name.as_str());
            match active.get(group) {
                Some(_) => {
                    warn!(group = %group, via, "failover: routing the group through another member")
                }
                None => info!(group = %group, via, "routing the group through this member"),
            }
        }
    }
    *active = chosen;
    let target = mesh::materialize(&desired.peers, &desired.groups, active);
    apply(handle, applied, target, None).await;
    // One map, sent once: the tunnels' origins, and the peers reached through a gateway
    // (no tunnel of their own; status still names them).
    let mut all: Origins = applied
        .iter()
        .map(|(k, p)| (*k, p.origin.clone()))
        .collect();
    for (key, origin) in &desired.via {
        all.entry(*key).or_insert_with(|| origin.clone());
    }
    origins.send_if_modified(|o| {
        let changed = *o != all;
        if changed {
            *o = all;
        }
        changed
    });
}

/// Moves the device from `applied` to `desired`; on success publishes, if given
/// `origins`, where each peer came from (for the status reporter and the metric labels).
async fn apply(
    handle: &Handle,
    applied: &mut PeerSet,
    desired: PeerSet,
    origins: Option<&watch::Sender<Origins>>,
) {
    let Some(update) = mesh::diff(applied, &desired) else {
        return;
    };
    match handle.apply(update).await {
        Ok(()) => {
            debug!(peers = desired.len(), "peers applied");
            if let Some(origins) = origins {
                origins.send_replace(
                    desired
                        .iter()
                        .map(|(k, p)| (*k, p.origin.clone()))
                        .collect(),
                );
            }
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
        match nodes.get_opt(&name).await {
            Ok(None) => {
                if let Err(e) = api.delete(&name, &Default::default()).await {
                    debug!(error = %e, "deleting the MeshNode");
                }
                return;
            }
            Ok(Some(node)) if is_labelled_gateway(&node) != object.spec.gateway => {
                object.spec.gateway = !object.spec.gateway;
                info!(node = %name, gateway = object.spec.gateway, "the gateway label changed");
                warn_unusable_gateway(&object.spec);
                published = false;
            }
            _ => {}
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
    let mut last_error: Option<String> = None;
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
                    observed_endpoint: p.observed_endpoint.map(|e| e.to_string()),
                    latest_handshake_time: p.since_handshake.and_then(|d| {
                        let d = k8s_openapi::jiff::SignedDuration::try_from(d).ok()?;
                        now.checked_sub(d).ok().map(Time)
                    }),
                    rx_bytes: i64::try_from(p.rx_bytes).unwrap_or(i64::MAX),
                    tx_bytes: i64::try_from(p.tx_bytes).unwrap_or(i64::MAX),
                    path: origins
                        .get(&p.public_key)
                        .map(|o| mesh::tunnel_path(&o.path))
                        .unwrap_or_default(),
                    via: origins.get(&p.public_key).and_then(|o| match &o.path {
                        mesh::PeerPath::Relayed { via } => Some(via.clone()),
                        _ => None,
                    }),
                })
                .collect();
            let via_gateway = mesh::via_gateways(&origins);
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
                    "viaGateway": via_gateway,
                    "lastUpdateTime": Time(now),
                }
            });
            match api
                .patch_status(&name, &params, &Patch::Apply(&status))
                .await
            {
                Ok(_) => last_error = None,
                // Each new error once: the MeshNode may not exist yet at the first try.
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        warn!(error = %text, "writing the MeshNode status");
                    }
                    last_error = Some(text);
                }
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
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
    allowed_ips: Vec<String>,
    #[serde(default)]
    accept_ips: Vec<String>,
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
            endpoints: p.endpoints.clone(),
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            accept_ips: p.accept_ips.iter().map(ToString::to_string).collect(),
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
        let accept_ips = p
            .accept_ips
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
                    path: mesh::PeerPath::Direct,
                },
                endpoint: p.endpoint,
                endpoints: p.endpoints,
                allowed_ips,
                accept_ips,
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
                gateway: false,
                relay: false,
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
                gateway: false,
                relay: false,
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
        assert!(set.groups.is_empty());
        let set = set.peers;
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
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(keys, [key(1), key(2), key(9)]);
    }

    fn remote(seed: u8, node: &str, cidr: &str, gateway: bool) -> MeshPeer {
        let mut p = mesh_peer(seed, cidr);
        p.metadata.name = Some(format!("cluster-b.{node}"));
        p.spec.node = node.into();
        p.spec.gateway = gateway;
        p
    }

    fn cidrs(list: &[&str]) -> Vec<IpCidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn a_cluster_with_gateways_is_reached_through_them() {
        let mut host = remote(14, "h1", "10.250.9.1/32", false);
        host.spec.kind = MeshNodeKind::Host;
        let peers = [
            remote(12, "b2", "10.2.2.0/24", true),
            remote(11, "b1", "10.2.1.0/24", true),
            remote(13, "b3", "10.2.3.0/24", false),
            host,
        ];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), std::iter::empty());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(keys, [key(11), key(12), key(14)], "no tunnel to b3");
        assert!(set.peers[&key(11)].allowed_ips.is_empty());
        assert_eq!(set.peers[&key(14)].allowed_ips, cidrs(&["10.250.9.1/32"]));
        let group = &set.groups["cluster/cluster-b"];
        assert_eq!(group.members, [key(11), key(12)], "sorted by node name");
        assert_eq!(
            group.cidrs,
            cidrs(&["10.2.1.0/24", "10.2.2.0/24", "10.2.3.0/24"])
        );
    }

    #[test]
    fn a_relay_stands_in_only_for_its_own_clusters_peers() {
        let mut relay = remote(20, "rb", "10.250.9.1/32", false);
        relay.spec.kind = MeshNodeKind::Host;
        relay.spec.relay = true;
        let mut c1 = remote(30, "c1", "10.3.1.0/24", false);
        c1.spec.cluster = "cluster-c".into();
        c1.metadata.name = Some("cluster-c.c1".into());
        let peers = [remote(11, "b1", "10.2.1.0/24", false), relay, c1];
        let mut sel = selection("a1", LocalPeers::Hosts, "10.1.1.0/24");
        sel.keepalive = 0;
        let set = sel.desired(peers.iter(), std::iter::empty());
        let group = &set.groups["relay/cluster-b.b1"];
        assert_eq!(group.members, [key(11), key(20)]);
        assert_eq!(group.cidrs, cidrs(&["10.2.1.0/24"]));
        assert_eq!(group.liveness, mesh::Liveness::Session);
        // A relayed peer keeps trying the direct path even with keepalive off.
        assert_eq!(set.peers[&key(11)].persistent_keepalive, RELAYED_KEEPALIVE);
        // cluster-b's relay never carries cluster-c's prefixes.
        assert!(
            !set.groups.contains_key("relay/cluster-c.c1"),
            "{:?}",
            set.groups
        );
        assert_eq!(set.peers[&key(30)].allowed_ips, cidrs(&["10.3.1.0/24"]));
        assert_eq!(set.peers[&key(30)].persistent_keepalive, 0);
    }

    #[test]
    fn a_cluster_whose_gateways_are_all_refused_keeps_its_direct_tunnels() {
        // The only gateway claims our own CIDR: refused, so no gateway mode.
        let peers = [
            remote(11, "b1", "10.1.1.0/24", true),
            remote(13, "b3", "10.2.3.0/24", false),
        ];
        let set = selection("a1", LocalPeers::Hosts, "10.1.1.0/24")
            .desired(peers.iter(), std::iter::empty());
        assert!(set.groups.is_empty(), "{:?}", set.groups);
        assert_eq!(set.peers[&key(13)].allowed_ips, cidrs(&["10.2.3.0/24"]));
    }

    fn gateway_cluster() -> Vec<MeshNode> {
        let mut nodes = vec![
            mesh_node("b1", MeshNodeKind::Node, 1, "10.2.1.0/24"),
            mesh_node("b2", MeshNodeKind::Node, 2, "10.2.2.0/24"),
            mesh_node("b3", MeshNodeKind::Node, 3, "10.2.3.0/24"),
            mesh_node("db1", MeshNodeKind::Host, 4, "10.250.1.1/32"),
        ];
        nodes[0].spec.gateway = true;
        nodes[1].spec.gateway = true;
        nodes
    }

    #[test]
    fn a_gateway_tunnels_to_the_remote_peers_and_accepts_its_clusters_pods() {
        let peers = [mesh_peer(9, "10.1.1.0/24")];
        let set = selection("b1", LocalPeers::Hosts, "10.2.1.0/24")
            .desired(peers.iter(), gateway_cluster().iter());
        assert!(set.groups.is_empty());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(
            keys,
            [key(3), key(4), key(9)],
            "b3, the host, the remote node"
        );
        let b3 = &set.peers[&key(3)];
        assert!(
            b3.allowed_ips.is_empty(),
            "b3's pods are reached through the cluster"
        );
        assert_eq!(b3.accept_ips, cidrs(&["10.2.3.0/24"]));
        assert!(
            set.peers
                .values()
                .all(|p| p.persistent_keepalive == mesh::GATEWAY_KEEPALIVE)
        );
        assert_eq!(set.peers[&key(9)].allowed_ips, cidrs(&["10.1.1.0/24"]));
    }

    #[test]
    fn a_node_behind_gateways_tunnels_only_to_them_and_the_hosts() {
        let peers = [mesh_peer(9, "10.1.1.0/24")];
        // In any order from the store: the members are preferred by node name.
        let set = selection("b3", LocalPeers::Hosts, "10.2.3.0/24")
            .desired(peers.iter(), gateway_cluster().iter().rev());
        let keys: Vec<_> = set.peers.keys().copied().collect();
        assert_eq!(keys, [key(1), key(2), key(4)]);
        assert!(set.peers[&key(1)].allowed_ips.is_empty());
        assert_eq!(set.peers[&key(1)].persistent_keepalive, 25);
        let group = &set.groups[LOCAL_GATEWAYS];
        assert_eq!(group.members, [key(1), key(2)]);
        assert_eq!(group.cidrs, cidrs(&["10.1.1.0/24"]));
        // A gateway with no endpoint cannot be reached: it is no gateway.
        let mut nodes = gateway_cluster();
        nodes[0].spec.endpoints.clear();
        nodes[1].spec.endpoints.clear();
        let set =
            selection("b3", LocalPeers::Hosts, "10.2.3.0/24").desired(peers.iter(), nodes.iter());
        assert!(set.groups.is_empty());
        assert!(set.peers.contains_key(&key(9)), "back to direct tunnels");
    }
}
