//! What a Kubernetes node's MeshNode says about the node's role and addresses comes from
//! its `Node`, never from the node's own credential: the pod CIDRs from
//! `Node.spec.podCIDRs` and the gateway flag from the [`GATEWAY_LABEL`]. The admission
//! policy `wiremesh-agent-own-meshnode` lets an agent create its MeshNode only without
//! them and never change them; the controller writes them here, from the Node.
//!
//! Why the controller and not a policy alone: a ValidatingAdmissionPolicy sees only the
//! object written, not the Node, so it cannot check that the values match the Node; and
//! overwriting what an agent wrote would leave a window in which linked clusters mirror
//! the forged values. So an agent cannot write them at all, and the controller, which can
//! read Nodes, is their only writer.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use tracing::{debug, info, warn};
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::{GATEWAY_LABEL, MeshNode, MeshNodeKind};

/// How often the MeshNodes are compared with their Nodes (in memory; a write only on a
/// difference).
const PERIOD: Duration = Duration::from_secs(1);

/// What a Node says its MeshNode must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFields {
    /// `Node.spec.podCIDRs` (or the older `podCIDR`), canonical; entries that do not
    /// parse are left out.
    pub pod_cidrs: Vec<String>,
    /// The Node carries `wiremesh.io/gateway=true`.
    pub gateway: bool,
}

impl NodeFields {
    /// From a Node.
    pub fn of(node: &Node) -> Self {
        let spec = node.spec.as_ref();
        let mut texts = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if texts.is_empty()
            && let Some(cidr) = spec.and_then(|s| s.pod_cidr.clone())
        {
            texts.push(cidr);
        }
        Self {
            pod_cidrs: texts
                .iter()
                .filter_map(|c| c.parse::<IpCidr>().ok())
                .map(|c| c.to_string())
                .collect(),
            gateway: node.labels().get(GATEWAY_LABEL).map(String::as_str) == Some("true"),
        }
    }
}

/// The fields to write to `mesh_node` so that it says what `node` says, or `None` when
/// it does already. Only MeshNodes of kind `Node` are derived: a host's addresses are
/// `meshctl host add`'s.
pub fn drift(mesh_node: &MeshNode, node: &Node) -> Option<NodeFields> {
    if mesh_node.spec.kind != MeshNodeKind::Node {
        return None;
    }
    let want = NodeFields::of(node);
    (mesh_node.spec.pod_cidrs != want.pod_cidrs || mesh_node.spec.gateway != want.gateway)
        .then_some(want)
}

/// Keeps every Kubernetes node's MeshNode's pod CIDRs and gateway flag equal to its
/// Node's, until aborted.
pub(crate) async fn derive(client: Client, mesh_nodes: Store<MeshNode>) {
    let (nodes, writer) = reflector::store::<Node>();
    let watch = reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).default_backoff(),
    )
    .for_each(|event| {
        if let Err(e) = event {
            debug!(error = %e, "watch of Nodes failed; retrying");
        }
        futures::future::ready(())
    });
    tokio::spawn(watch);
    let api: Api<MeshNode> = Api::all(client);
    let mut written: BTreeMap<String, NodeFields> = BTreeMap::new();
    loop {
        tokio::time::sleep(PERIOD).await;
        for mesh_node in mesh_nodes.state() {
            let name = mesh_node.name_any();
            let Some(node) = nodes.get(&reflector::ObjectRef::new(&name)) else {
                continue;
            };
            let Some(want) = drift(&mesh_node, &node) else {
                written.remove(&name);
                continue;
            };
            // The cache may lag our own write by a moment: do not write the same twice.
            if written.get(&name) == Some(&want) {
                continue;
            }
            let patch = json!({ "spec": { "podCIDRs": want.pod_cidrs, "gateway": want.gateway } });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(node = %name, pod_cidrs = ?want.pod_cidrs, gateway = want.gateway, "MeshNode set from its Node");
                    written.insert(name, want);
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => warn!(node = %name, error = %e, "setting a MeshNode from its Node"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSpec;

    use super::*;
    use crate::testing::mesh_node;

    #[test]
    fn the_node_decides_pod_cidrs_and_gateway() {
        let node = node(&["10.1.1.0/24"], true);
        let forged = mesh_node("a1", 1, None, &["10.1.2.0/24"]);
        assert_eq!(
            drift(&forged, &node),
            Some(NodeFields {
                pod_cidrs: vec!["10.1.1.0/24".into()],
                gateway: true
            })
        );
        let mut right = mesh_node("a1", 1, None, &["10.1.1.0/24"]);
        right.spec.gateway = true;
        assert_eq!(drift(&right, &node), None);
        // A self-made gateway loses the flag.
        let mut self_made = mesh_node("a1", 1, None, &["10.1.1.0/24"]);
        self_made.spec.gateway = true;
        assert_eq!(
            drift(&self_made, &self::node(&["10.1.1.0/24"], false)).map(|f| f.gateway),
            Some(false)
        );
    }

    #[test]
    fn hosts_are_not_derived_and_bad_node_cidrs_are_left_out() {
        let mut host = mesh_node("h1", 1, None, &["10.250.0.5/32"]);
        host.spec.kind = MeshNodeKind::Host;
        assert_eq!(drift(&host, &node(&["10.1.1.0/24"], false)), None);
        let fields = NodeFields::of(&node(&["10.1.1.0/24", "nope"], false));
        assert_eq!(fields.pod_cidrs, ["10.1.1.0/24"]);
    }

    fn node(cidrs: &[&str], gateway: bool) -> Node {
        let mut node = Node {
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|c| (*c).to_owned()).collect()),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        if gateway {
            node.labels_mut()
                .insert(GATEWAY_LABEL.to_owned(), "true".to_owned());
        }
        node
    }
}
