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
//!
//! The label is one a kubelet cannot set on its own Node (NodeRestriction); the older
//! [`LEGACY_GATEWAY_LABEL`], which it could, is ignored with a warning naming the Node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use tracing::{info, warn};
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::{GATEWAY_LABEL, LEGACY_GATEWAY_LABEL, MeshNode, MeshNodeKind};

/// How often the MeshNodes are compared with their Nodes (in memory; a write only on a
/// difference).
const PERIOD: Duration = Duration::from_secs(1);

/// Whether `node` carries the [`LEGACY_GATEWAY_LABEL`], which no longer makes it a
/// gateway (a kubelet can set it on its own Node).
pub fn has_legacy_gateway_label(node: &Node) -> bool {
    node.labels().contains_key(LEGACY_GATEWAY_LABEL)
}

/// What a Node says its MeshNode must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFields {
    /// `Node.spec.podCIDRs` (or the older `podCIDR`), canonical; entries that do not
    /// parse are left out.
    pub pod_cidrs: Vec<String>,
    /// The Node carries [`GATEWAY_LABEL`]`=true`.
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
/// `nodes` is the controller's cache of Nodes.
pub(crate) async fn derive(client: Client, mesh_nodes: Store<MeshNode>, nodes: Store<Node>) {
    let api: Api<MeshNode> = Api::all(client);
    let mut written: BTreeMap<String, NodeFields> = BTreeMap::new();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::time::sleep(PERIOD).await;
        let legacy: BTreeSet<String> = nodes
            .state()
            .iter()
            .filter(|n| has_legacy_gateway_label(n))
            .map(|n| n.name_any())
            .collect();
        for name in legacy.difference(&warned) {
            warn!(
                node = %name,
                "Node {name} carries the label {LEGACY_GATEWAY_LABEL}, which no longer makes a gateway \
                 (a kubelet can set it on its own Node): ignored; label it {GATEWAY_LABEL}=true \
                 (`meshctl gateway add {name}`) to keep it a gateway"
            );
        }
        warned = legacy;
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

    #[test]
    fn the_old_gateway_label_a_kubelet_can_set_makes_no_gateway() {
        let mut labelled = node(&["10.1.1.0/24"], false);
        labelled
            .labels_mut()
            .insert(LEGACY_GATEWAY_LABEL.to_owned(), "true".to_owned());
        assert!(has_legacy_gateway_label(&labelled));
        assert!(!NodeFields::of(&labelled).gateway);
        // A MeshNode made a gateway through the old label loses the flag.
        let mut was_gateway = mesh_node("a1", 1, None, &["10.1.1.0/24"]);
        was_gateway.spec.gateway = true;
        assert_eq!(
            drift(&was_gateway, &labelled).map(|f| f.gateway),
            Some(false)
        );
        // The new label, which NodeRestriction keeps from kubelets, does make one.
        assert!(GATEWAY_LABEL.starts_with("node-restriction.kubernetes.io/"));
        assert!(NodeFields::of(&node(&["10.1.1.0/24"], true)).gateway);
        assert!(!has_legacy_gateway_label(&node(&["10.1.1.0/24"], true)));
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
