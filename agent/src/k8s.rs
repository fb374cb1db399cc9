//! Kubernetes mode (`wiremesh-agent kube`): publish this node's `MeshNode`, poll its Node,
//! and build the tunnels with the peer machinery host mode shares ([`crate::peers`]): to
//! the `MeshPeer`s the controller mirrors from linked clusters and to this cluster's hosts
//! (`MeshNode`s of kind Host).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use wiremesh_core::translate::Translation;
use wiremesh_proto::crd::{
    GATEWAY_LABEL, MeshNode, MeshNodeKind, MeshNodeSpec, ROTATE_KEYS_ANNOTATION,
};
use wiremesh_proto::uapi::DeviceUpdate;
use wiremesh_proto::{InterfaceAddress, IpCidr, PrivateKey, PublicKey};

use crate::control::Handle;
use crate::dataplane::{InterfaceSpec, Routing};
use crate::mesh::select::{LocalPeers, Selection};
use crate::metrics::Safety;
use crate::peers::{Context, MANAGER, load_cache, load_translation, run_data_plane};
use crate::rotation;

/// How often the MeshNode is applied again even without a change (level-triggered), and
/// the tunnel status refreshed.
const REPUBLISH: Duration = Duration::from_secs(30);
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
    /// Most peers the device holds (`--max-peers`).
    pub max_peers: usize,
    /// The taint to remove from this node's Node once its fail-closed routes are in place
    /// and its peers synced (`--startup-taint`), if any.
    pub startup_taint: Option<String>,
    /// Where the last known peers are kept, to come up with them when the API server is
    /// unreachable at start.
    pub state_dir: PathBuf,
    /// How long the old key is answered at most after a rotation.
    pub rotation_grace: Duration,
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
    // Building the client reads the configuration only; nothing is asked of the API
    // server before the data plane is up with the cached peers.
    let client = client(&options).await?;
    let public = public_of(&key);
    info!(node = %options.node_name, public_key = %public, "starting in Kubernetes mode");

    let cached = load_cache(&options.state_dir);
    let translation = load_translation(&options.state_dir);
    // A restart in the middle of a rotation keeps answering the previous key.
    let previous_key = rotation::load(&options.state_dir).previous_key(&key, rotation::now_secs());
    if previous_key.is_some() {
        info!("keeping the previous key of a rotation in progress");
    }
    let initial = DeviceUpdate {
        private_key: Some(Some(key)),
        listen_port: Some(options.listen_port),
        replace_peers: true,
        previous_key,
        ..DeviceUpdate::default()
    };
    let spec = InterfaceSpec {
        translation: translation.clone(),
        name: options.interface.clone(),
        mtu: options.mtu,
        addresses: options.addresses.clone(),
        uapi_dir: options.uapi_dir.clone(),
        fail_closed: Some(options.state_dir.clone()),
        attribution: None,
        routing: Routing::AllowedIps,
        safety: Arc::new(Safety::default()),
    };
    let safety = Arc::clone(&spec.safety);
    let metrics_addr = options.metrics_addr;
    run_data_plane(
        spec,
        initial,
        metrics_addr,
        options.max_peers,
        cached,
        move |handle| {
            setup(
                client,
                options,
                Keys {
                    current: key,
                    handle,
                },
                safety,
                translation,
            )
        },
    )
    .await
}

/// What the MeshNode publisher needs to rotate the key.
struct Keys {
    current: PrivateKey,
    handle: Handle,
}

/// What needs the API server: the Node (pod CIDRs, addresses, zone, gateway label), then
/// the peer machinery's [`Context`] and the MeshNode publisher.
async fn setup(
    client: Client,
    options: KubeOptions,
    keys: Keys,
    safety: Arc<Safety>,
    translation: Translation,
) -> (Context, impl Future<Output = ()> + Send + 'static) {
    let public = public_of(&keys.current);
    let node = wait_for_node(&client, &options.node_name).await;
    let synced = options.startup_taint.clone().map(|key| {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(remove_startup_taint(
            client.clone(),
            options.node_name.clone(),
            key,
            safety,
            rx,
        ));
        tx
    });
    // Before the Context reads any MeshPeer.
    crate::peers::start_translation(
        client.clone(),
        keys.handle.clone(),
        options.state_dir.clone(),
        translation,
    )
    .await;
    let own_cidrs = node_pod_cidrs(&node);
    let endpoints = if options.endpoints.is_empty() {
        node_endpoints(&node, options.listen_port)
    } else {
        options.endpoints.clone()
    };
    if endpoints.is_empty() {
        warn!(node = %options.node_name, "the Node has no address; publishing no endpoint (peers must reach us first)");
    }
    info!(node = %options.node_name, pod_cidrs = ?own_cidrs, ?endpoints, "Node read");
    let mesh_node = MeshNodeSpec {
        public_key: public.to_string(),
        endpoints: endpoints.iter().map(ToString::to_string).collect(),
        pod_cidrs: own_cidrs.iter().map(ToString::to_string).collect(),
        location: node.labels().get("topology.kubernetes.io/zone").cloned(),
        kind: MeshNodeKind::Node,
        gateway: is_labelled_gateway(&node),
        relay: false,
        heartbeat: false,
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
        watch_linked: true,
        synced,
    };
    let rotator = Rotator {
        keys,
        key_file: options.key_file.clone(),
        state_dir: options.state_dir.clone(),
        grace: options.rotation_grace,
    };
    (context, publish(client, node, mesh_node, rotator))
}

fn public_of(key: &PrivateKey) -> PublicKey {
    let secret = boringtun::x25519::StaticSecret::from(*key.as_bytes());
    PublicKey::from(*boringtun::x25519::PublicKey::from(&secret).as_bytes())
}

/// Rotates the key when the MeshNode asks for it ([`ROTATE_KEYS_ANNOTATION`]).
struct Rotator {
    keys: Keys,
    key_file: PathBuf,
    state_dir: PathBuf,
    grace: Duration,
}

impl Rotator {
    /// Rotates for `request` if it is new; the new public key when it did.
    async fn rotate(&mut self, request: Option<&str>) -> Option<PublicKey> {
        let done = rotation::load(&self.state_dir);
        if !rotation::is_new(request, &done, &self.keys.current) {
            return None;
        }
        let request = request?;
        let rotated = match rotation::rotate(
            &self.state_dir,
            &self.key_file,
            &self.keys.current,
            request,
            self.grace,
        ) {
            Ok(rotated) => rotated,
            Err(e) => {
                warn!(error = %e, "writing the rotated key; keeping the current one");
                return None;
            }
        };
        // The key file holds the new key now: a restart uses it whatever happens here.
        if let Err(e) = self.keys.handle.apply(rotated.update).await {
            warn!(error = %e, "the data plane refused the rotated key");
            return None;
        }
        self.keys.current = rotated.key;
        let public = public_of(&rotated.key);
        info!(request, public_key = %public, grace_secs = self.grace.as_secs(), "key rotated; the previous one is still answered");
        Some(public)
    }
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

/// The Node object; waits while the API server is unreachable or the Node not there yet
/// (the data plane runs meanwhile, with the cached peers).
async fn wait_for_node(client: &Client, name: &str) -> Node {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut logged = false;
    loop {
        match nodes.get_opt(name).await {
            Ok(Some(node)) => return node,
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

/// Removes the startup taint `key` from Node `name` once this node is safe to schedule
/// pods on: its peers `synced` (listed and applied) and, after that, a pass of the route
/// task left every fail-closed range (the linked clusters' grants included) installed and
/// persisted. Until then the taint (which the user registers the kubelet with) keeps pods
/// off a node whose traffic for linked clusters could still leave in plaintext: after a
/// reboot the kernel has no fail-closed routes until the agent runs.
async fn remove_startup_taint(
    client: Client,
    name: String,
    key: String,
    safety: Arc<Safety>,
    mut synced: watch::Receiver<bool>,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let at_sync = safety.closed_passes();
    while !untaint_due(at_sync, safety.closed_passes()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let nodes: Api<Node> = Api::all(client);
    let mut logged = false;
    loop {
        let result = match nodes.get(&name).await {
            Ok(node) => match without_taint(&node, &key) {
                None => {
                    info!(node = %name, taint = %key, "no startup taint to remove");
                    return;
                }
                // The resourceVersion makes the patch fail if the taints changed since
                // they were read; the next try reads them again.
                Some(taints) => nodes
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({
                            "metadata": { "resourceVersion": node.resource_version() },
                            "spec": { "taints": taints },
                        })),
                    )
                    .await
                    .map(|_| ()),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                info!(node = %name, taint = %key, "fail-closed routes in place and peers synced: startup taint removed");
                return;
            }
            Err(e) if !logged => {
                warn!(node = %name, taint = %key, error = %e, "removing the startup taint; retrying");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Whether the startup taint may go: a complete fail-closed pass (see
/// [`Safety::closed_passes`]) happened after the peers were synced, when it stood at
/// `at_sync`.
fn untaint_due(at_sync: u64, now: u64) -> bool {
    now > at_sync
}

/// The Node's taints without those with `key`; `None` when it has none.
fn without_taint(node: &Node, key: &str) -> Option<Vec<Taint>> {
    let taints = node.spec.as_ref()?.taints.as_ref()?;
    if !taints.iter().any(|t| t.key == key) {
        return None;
    }
    Some(taints.iter().filter(|t| t.key != key).cloned().collect())
}

/// A gateway label on a node nobody can reach is ignored everywhere; say so here.
fn warn_unusable_gateway(spec: &MeshNodeSpec) {
    if spec.gateway && !spec.is_gateway() {
        warn!(
            "this node is labelled {GATEWAY_LABEL}=true but publishes no endpoint: no other cluster could reach it, so it is not used as a gateway"
        );
    }
}

/// The Node carries [`GATEWAY_LABEL`]`=true`.
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

/// Applies this node's MeshNode (owned by its Node) now and every [`REPUBLISH`]; returns
/// when the Node is gone, after deleting the MeshNode.
async fn publish(client: Client, node: Node, spec: MeshNodeSpec, mut rotator: Rotator) {
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
        // Our own MeshNode only, in our own cluster: a rotation request.
        if let Ok(Some(current)) = api.get_opt(&name).await {
            let request = current.annotations().get(ROTATE_KEYS_ANNOTATION).cloned();
            if let Some(public) = rotator.rotate(request.as_deref()).await {
                object.spec.public_key = public.to_string();
                published = false;
            }
        }
        let due = !published || last_publish.is_none_or(|t| t.elapsed() >= REPUBLISH);
        if due {
            match api
                .patch(&name, &params, &Patch::Apply(&without_node_fields(&object)))
                .await
            {
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

/// The MeshNode as the agent applies it: without the pod CIDRs, the gateway flag and the
/// heartbeat flag, which the controller sets (the first two from the Node; the admission
/// policy refuses them from the agent).
fn without_node_fields(object: &MeshNode) -> serde_json::Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(spec) = value
        .get_mut("spec")
        .and_then(serde_json::Value::as_object_mut)
    {
        spec.remove("podCIDRs");
        spec.remove("gateway");
        spec.remove("heartbeat");
    }
    value
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
    use k8s_openapi::api::core::v1::NodeSpec;

    use super::*;

    const KEY: &str = "wiremesh.io/agent-not-ready";

    #[test]
    fn the_startup_taint_goes_only_after_a_complete_pass_since_the_sync() {
        // Passes before the peers were synced do not count.
        assert!(!untaint_due(3, 3));
        assert!(untaint_due(3, 4));
    }

    #[test]
    fn only_the_startup_taint_is_removed() {
        let taint = |key: &str, effect: &str| Taint {
            key: key.to_owned(),
            effect: effect.to_owned(),
            ..Taint::default()
        };
        let node = |taints: Option<Vec<Taint>>| Node {
            spec: Some(NodeSpec {
                taints,
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        let other = taint("node.kubernetes.io/unschedulable", "NoSchedule");
        let tainted = node(Some(vec![
            taint(KEY, "NoSchedule"),
            other.clone(),
            taint(KEY, "NoExecute"),
        ]));
        assert_eq!(without_taint(&tainted, KEY), Some(vec![other.clone()]));
        assert_eq!(
            without_taint(&node(Some(vec![taint(KEY, "NoSchedule")])), KEY),
            Some(Vec::new())
        );
        assert_eq!(without_taint(&node(Some(vec![other])), KEY), None);
        assert_eq!(without_taint(&node(None), KEY), None);
        assert_eq!(without_taint(&Node::default(), KEY), None);
    }
}
