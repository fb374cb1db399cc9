//! Host mode (`wiremesh-agent host --bundle FILE`): a machine outside Kubernetes,
//! registered with `meshctl host add`, joins its cluster's mesh.
//!
//! The bundle holds the API server, its CA and a token that can only update the host's
//! own `MeshNode` and read MeshNodes and MeshPeers. The agent generates its key locally
//! (it never leaves the host), publishes the public key and endpoint on its MeshNode, and
//! then builds tunnels like a node does ([`crate::k8s`], [`crate::peers`]): to every node and host of its
//! cluster and to every MeshPeer (the nodes of the linked clusters), with routes to their
//! pod CIDRs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tracing::{debug, info, warn};
use wiremesh_proto::crd::{
    CLUSTER_CONFIGMAP, HostBundle, MeshNode, MeshNodeKind, SYSTEM_NAMESPACE,
};
use wiremesh_proto::uapi::DeviceUpdate;
use wiremesh_proto::{InterfaceAddress, IpCidr, PublicKey};

use crate::dataplane::{InterfaceSpec, Routing};
use crate::mesh::select::{LocalPeers, Selection};
use crate::peers::{Context, load_cache, run_data_plane};

/// Key of the cluster's name in the cluster ConfigMap (as `meshctl install` writes it).
const CLUSTER_NAME_KEY: &str = "clusterName";
/// Retry pause while the API server cannot be reached at start-up.
const RETRY: Duration = Duration::from_secs(2);
/// How often the public key and endpoint are written again (level-triggered: a
/// MeshNode edited by hand is put back).
const REPUBLISH: Duration = Duration::from_secs(30);
/// How often a host checks that it is still registered (its MeshNode exists).
const REMOVAL_CHECK: Duration = Duration::from_secs(3);
/// Refusals of the host's credential in a row that mean it was revoked (one could be a
/// passing failure of token review).
const REMOVAL_REFUSALS: u32 = 3;

/// What `wiremesh-agent host` was asked to do.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The bundle file from `meshctl host add`.
    pub bundle: PathBuf,
    /// The TUN device name.
    pub interface: String,
    /// The UDP port.
    pub listen_port: u16,
    /// The TUN device's MTU.
    pub mtu: u32,
    /// Endpoints to publish, most preferred first; none: keep those `meshctl host add`
    /// wrote (its `--endpoint`).
    pub endpoints: Vec<SocketAddr>,
    /// Persistent keepalive towards every peer, seconds (0: off).
    pub persistent_keepalive: u16,
    /// Directory of the private key (generated on first start, mode 0600) and state.
    pub state_dir: PathBuf,
    /// UAPI socket directory.
    pub uapi_dir: PathBuf,
    /// Where to serve metrics and health.
    pub metrics_addr: Option<SocketAddr>,
    /// Most peers the device holds (`--max-peers`).
    pub max_peers: usize,
}

/// A host's delivery rule: to its own addresses `own`, and, for a relay, on to another
/// peer.
fn host_translation(own: &[IpCidr], relay: bool) -> wiremesh_core::translate::Translation {
    let translation =
        wiremesh_core::translate::Translation::default().with_own_ranges(own.to_vec());
    if relay {
        translation
    } else {
        translation.without_passing_on()
    }
}

/// Runs the agent in host mode until SIGINT/SIGTERM.
///
/// # Errors
/// A bundle that is missing, truncated, malformed or for another cluster; a MeshNode that
/// is missing or not a host; a key, client or data plane that cannot be set up.
pub async fn run(options: HostOptions) -> Result<()> {
    let bundle = read_bundle(&options.bundle)?;
    crate::preflight()?;
    let client = client(&bundle).await?;
    let node = check_cluster(&client, &bundle, &options.bundle).await?;
    crate::keys::private_dir(&options.state_dir)?;
    let key = crate::keys::load_or_generate(&options.state_dir.join("private.key"))?;
    let public = {
        let secret = boringtun::x25519::StaticSecret::from(*key.as_bytes());
        PublicKey::from(*boringtun::x25519::PublicKey::from(&secret).as_bytes())
    };
    let own_cidrs: Vec<IpCidr> = node
        .spec
        .pod_cidrs
        .iter()
        .map(|c| {
            c.parse()
                .map_err(|e| anyhow!("MeshNode {}: address {c:?}: {e}", bundle.host_name))
        })
        .collect::<Result<_>>()?;
    let endpoints: Vec<String> = if options.endpoints.is_empty() {
        node.spec.endpoints.clone()
    } else {
        options.endpoints.iter().map(ToString::to_string).collect()
    };
    info!(host = %bundle.host_name, cluster = %bundle.cluster_name, public_key = %public, addresses = ?own_cidrs, ?endpoints, "starting in host mode");

    let addresses = own_cidrs
        .iter()
        .map(|c| format!("{}/{}", c.addr(), c.prefix_len()).parse::<InterfaceAddress>())
        .collect::<Result<Vec<_>, _>>()
        .context("the host's addresses")?;
    let spec = InterfaceSpec {
        // Hosts do not translate: only a cluster's nodes do, for its pods. A packet from a
        // peer is delivered only to the host's own addresses: never to the host's other
        // networks, its metadata service or beyond; and on to another peer only by a
        // relay (`meshctl host add --relay`, read at start).
        translation: host_translation(&own_cidrs, node.spec.relay),
        name: options.interface.clone(),
        mtu: options.mtu,
        addresses,
        uapi_dir: options.uapi_dir.clone(),
        fail_closed: Some(options.state_dir.clone()),
        attribution: None,
        routing: Routing::AllowedIps,
        safety: Default::default(),
    };
    let initial = DeviceUpdate {
        private_key: Some(Some(key)),
        listen_port: Some(options.listen_port),
        replace_peers: true,
        ..DeviceUpdate::default()
    };
    let context = Context {
        client: client.clone(),
        selection: Selection {
            own_name: bundle.host_name.clone(),
            local_peers: LocalPeers::All,
            own_cidrs,
            keepalive: options.persistent_keepalive,
        },
        state_dir: options.state_dir.clone(),
        watch_linked: false,
        synced: None,
    };
    let cached = load_cache(&options.state_dir);
    let publisher = publish(client, bundle.host_name.clone(), public, endpoints);
    run_data_plane(
        spec,
        initial,
        options.metrics_addr,
        options.max_peers,
        cached,
        move |_| async move { (context, publisher) },
    )
    .await
}

/// Reads and checks the bundle.
///
/// # Errors
/// When the file cannot be read, group or others may access it (it holds a token), it is
/// truncated or malformed (naming the line and column), lacks a field, or holds an empty
/// one.
pub fn read_bundle(path: &Path) -> Result<HostBundle> {
    let text = crate::keys::read_private(path)
        .with_context(|| format!("reading the bundle {}", path.display()))?;
    parse_bundle(&text).with_context(|| format!("bundle {}", path.display()))
}

/// Parses a bundle (JSON, as `meshctl host add` writes it).
///
/// # Errors
/// As [`read_bundle`].
pub fn parse_bundle(text: &str) -> Result<HostBundle> {
    let bundle: HostBundle = serde_json::from_str(text).map_err(|e| {
        if e.is_eof() {
            anyhow!(
                "truncated: it ends at line {} column {} ({e})",
                e.line(),
                e.column()
            )
        } else {
            anyhow!("malformed: {e}")
        }
    })?;
    for (field, value) in [
        ("apiServer", &bundle.api_server),
        ("token", &bundle.token),
        ("clusterName", &bundle.cluster_name),
        ("hostName", &bundle.host_name),
    ] {
        if value.trim().is_empty() {
            bail!("field {field} is empty");
        }
    }
    if !bundle.api_server.starts_with("https://") {
        bail!(
            "field apiServer: {:?} is not an https:// URL (the token is never sent in clear)",
            bundle.api_server
        );
    }
    Ok(bundle)
}

async fn client(bundle: &HostBundle) -> Result<Client> {
    let mut cluster = serde_json::json!({ "server": bundle.api_server });
    if let Some(ca) = &bundle.ca_data {
        cluster["certificate-authority-data"] = ca.clone().into();
    }
    let kubeconfig: Kubeconfig = serde_json::from_value(serde_json::json!({
        "clusters": [{ "name": "mesh", "cluster": cluster }],
        "users": [{ "name": "host", "user": { "token": bundle.token } }],
        "contexts": [{ "name": "mesh", "context": { "cluster": "mesh", "user": "host" } }],
        "current-context": "mesh",
    }))
    .context("building a kubeconfig from the bundle")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("building a client for {}", bundle.api_server))?;
    Client::try_from(config).context("building the Kubernetes client")
}

/// Checks that the API server is the bundle's cluster and that the host's MeshNode is
/// there; waits while the API server cannot be reached.
///
/// # Errors
/// When the cluster's name differs from the bundle's, or the MeshNode is missing or not a
/// host, or the API server refuses the token.
async fn check_cluster(client: &Client, bundle: &HostBundle, path: &Path) -> Result<MeshNode> {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let nodes: Api<MeshNode> = Api::all(client.clone());
    let mut logged = false;
    loop {
        let result = async {
            let cm = configmaps.get(CLUSTER_CONFIGMAP).await?;
            let node = nodes.get_opt(&bundle.host_name).await?;
            Ok::<_, kube::Error>((cm, node))
        }
        .await;
        match result {
            Ok((cm, node)) => {
                let name = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(CLUSTER_NAME_KEY))
                    .map(|n| n.trim().to_owned())
                    .unwrap_or_default();
                if name != bundle.cluster_name {
                    bail!(
                        "bundle {} is for cluster {:?}, but the API server at {} is cluster {name:?} \
                         (ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}); nothing was changed",
                        path.display(),
                        bundle.cluster_name,
                        bundle.api_server
                    );
                }
                let node = node.ok_or_else(|| {
                    anyhow!(
                        "cluster {name} has no MeshNode {:?}: was the host removed? \
                         (meshctl host add {} ... registers it)",
                        bundle.host_name,
                        bundle.host_name
                    )
                })?;
                if node.spec.kind != MeshNodeKind::Host {
                    bail!(
                        "MeshNode {:?} of cluster {name} is a Kubernetes node, not a host",
                        bundle.host_name
                    );
                }
                return Ok(node);
            }
            Err(kube::Error::Api(status)) => {
                return Err(kube::Error::Api(status)).with_context(|| {
                    format!(
                        "the API server at {} refused the bundle's token",
                        bundle.api_server
                    )
                });
            }
            Err(e) => {
                if !logged {
                    warn!(server = %bundle.api_server, error = %e, "waiting for the API server");
                    logged = true;
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Writes the public key and endpoints into the host's MeshNode now and every
/// [`REPUBLISH`]; returns when the host was removed (`meshctl host remove` deletes its
/// MeshNode and revokes its credential), checked every [`REMOVAL_CHECK`]. Only those two
/// fields are written: the addresses and the kind are `meshctl host add`'s.
async fn publish(client: Client, name: String, public: PublicKey, endpoints: Vec<String>) {
    let api: Api<MeshNode> = Api::all(client);
    let patch = serde_json::json!({
        "spec": { "publicKey": public.to_string(), "endpoints": endpoints }
    });
    // Once published, the host is registered; from then on a missing MeshNode, or a
    // credential refused several times in a row, means `meshctl host remove` ran.
    let mut registered = false;
    let mut refusals = 0u32;
    let mut last_publish: Option<tokio::time::Instant> = None;
    loop {
        if registered {
            match api.get_opt(&name).await {
                Ok(None) => return,
                Ok(Some(_)) => refusals = 0,
                // The ServiceAccount and its token go with the host.
                Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => {
                    refusals += 1;
                    if refusals >= REMOVAL_REFUSALS {
                        return;
                    }
                }
                Err(_) => {}
            }
        }
        let due = last_publish.is_none_or(|t| t.elapsed() >= REPUBLISH);
        if due {
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if !registered {
                        info!(host = %name, "public key and endpoint published");
                    }
                    registered = true;
                    last_publish = Some(tokio::time::Instant::now());
                }
                Err(kube::Error::Api(e)) if registered && e.code == 404 => return,
                Err(e) => {
                    if registered {
                        warn!(host = %name, error = %e, "publishing the public key and endpoint");
                    } else {
                        debug!(host = %name, error = %e, "publishing the public key and endpoint");
                    }
                    last_publish = None;
                }
            }
        }
        let pause = if registered { REMOVAL_CHECK } else { RETRY };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"apiServer":"https://127.0.0.1:6443","caData":"Q0E=","token":"t","clusterName":"cluster-a","hostName":"db-1"}"#;

    #[test]
    fn a_host_delivers_to_its_own_addresses_and_only_a_relay_passes_on() {
        let own: Vec<IpCidr> = vec!["10.250.0.5/32".parse().unwrap()];
        let host = host_translation(&own, false);
        assert!(host.limits_destinations() && !host.passes_on());
        assert!(host.delivers("10.250.0.5".parse().unwrap()));
        assert!(!host.delivers("169.254.169.254".parse().unwrap()));
        let relay = host_translation(&own, true);
        assert!(relay.limits_destinations() && relay.passes_on());
    }

    #[test]
    fn a_complete_bundle_parses() {
        let b = parse_bundle(GOOD).unwrap();
        assert_eq!(b.host_name, "db-1");
        assert_eq!(b.cluster_name, "cluster-a");
        assert!(!format!("{b:?}").contains("\"t\""), "the token is redacted");
    }

    #[test]
    fn a_bundle_group_or_others_may_read_is_refused_naming_the_file() {
        use std::os::unix::fs::PermissionsExt as _;

        let path = std::env::temp_dir().join(format!("wm-bundle-{}.json", std::process::id()));
        std::fs::write(&path, GOOD).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", read_bundle(&path).unwrap_err());
        assert!(err.contains(&*path.to_string_lossy()), "{err}");
        assert!(err.contains("mode 644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_bundle(&path).unwrap().host_name, "db-1");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_truncated_bundle_is_named_truncated() {
        let err = parse_bundle(&GOOD[..GOOD.len() / 2]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn missing_empty_or_unknown_fields_are_named() {
        let err =
            parse_bundle(r#"{"apiServer":"https://x","token":"t","clusterName":"a"}"#).unwrap_err();
        assert!(err.to_string().contains("hostName"), "{err}");
        let err = parse_bundle(&GOOD.replace(r#""token":"t""#, r#""token":"""#)).unwrap_err();
        assert!(err.to_string().contains("field token is empty"), "{err}");
        let err = parse_bundle(&GOOD.replace("https://", "http://")).unwrap_err();
        assert!(err.to_string().contains("apiServer"), "{err}");
        let err = parse_bundle(&GOOD.replace("hostName", "host")).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}
