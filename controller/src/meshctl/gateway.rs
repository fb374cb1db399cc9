//! `meshctl gateway add|remove NODE`: label a node
//! `node-restriction.kubernetes.io/wiremesh-gateway=true` ([`GATEWAY_LABEL`]; a label a
//! kubelet cannot set on its own Node), or not. Both also remove the old
//! [`LEGACY_GATEWAY_LABEL`], which no longer counts.
//!
//! When any node of a cluster is a gateway, only the gateways hold tunnels to the other
//! clusters; the cluster's other nodes reach them through a gateway, and when one dies
//! another takes over without any command. A gateway must be reachable from the other
//! side, so `add` checks first ([`check_add`], pure) and labels nothing if a check fails.

use std::fmt;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt as _};
use serde_json::json;
use wiremesh_proto::crd::{GATEWAY_LABEL, LEGACY_GATEWAY_LABEL, MeshNode, MeshNodeKind};

use super::common::say;
use super::kubeconfig::{self, KubeArgs};

/// Why a node cannot be a gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayRefusal {
    /// No Node of that name.
    #[error("node {node}: no such Node in context {context}")]
    NoNode {
        /// The node.
        node: String,
        /// The kubeconfig context.
        context: String,
    },
    /// The node has no MeshNode: no agent runs there (yet).
    #[error("node {node}: no MeshNode; the Wiremesh agent has not started on it")]
    NoMeshNode {
        /// The node.
        node: String,
    },
    /// The MeshNode is a host outside Kubernetes.
    #[error(
        "node {node}: a host outside Kubernetes cannot be a gateway (it is not on the cluster network the gateway forwards into)"
    )]
    Host {
        /// The host.
        node: String,
    },
    /// The agent has not published its key.
    #[error("node {node}: its agent has published no public key yet")]
    NoKey {
        /// The node.
        node: String,
    },
    /// Nothing can reach it.
    #[error(
        "node {node}: its MeshNode publishes no endpoint, so no other cluster could reach it; give the Node an address or the agent --endpoint first"
    )]
    NoEndpoint {
        /// The node.
        node: String,
    },
}

/// `meshctl gateway add` refused; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct GatewayRefusals(pub Vec<GatewayRefusal>);

impl fmt::Display for GatewayRefusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refusing to make a gateway; nothing was written:")?;
        for refusal in &self.0 {
            write!(f, "\n  - {refusal}")?;
        }
        Ok(())
    }
}

/// Whether `node` may become a gateway, from its Node's existence and its MeshNode.
///
/// # Errors
/// The reason, in a [`GatewayRefusals`].
pub fn check_add(
    node: &str,
    context: &str,
    node_exists: bool,
    mesh_node: Option<&MeshNode>,
) -> Result<(), GatewayRefusals> {
    let refusal = if !node_exists {
        Some(GatewayRefusal::NoNode {
            node: node.to_owned(),
            context: context.to_owned(),
        })
    } else {
        let node = node.to_owned();
        match mesh_node {
            None => Some(GatewayRefusal::NoMeshNode { node }),
            Some(m) if m.spec.kind == MeshNodeKind::Host => Some(GatewayRefusal::Host { node }),
            Some(m) if !m.spec.has_key() => Some(GatewayRefusal::NoKey { node }),
            Some(m) if m.spec.endpoints.is_empty() => Some(GatewayRefusal::NoEndpoint { node }),
            Some(_) => None,
        }
    };
    match refusal {
        Some(r) => Err(GatewayRefusals(vec![r])),
        None => Ok(()),
    }
}

/// `meshctl gateway add NODE`.
///
/// # Errors
/// A [`GatewayRefusals`] when a check fails, or the API error.
pub async fn add(args: &KubeArgs, node: &str) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let nodes: Api<Node> = Api::all(target.client.clone());
    let existing = nodes
        .get_opt(node)
        .await
        .with_context(|| format!("reading Node {node} in context {}", target.context))?;
    let mesh_node = Api::<MeshNode>::all(target.client.clone())
        .get_opt(node)
        .await
        .with_context(|| format!("reading MeshNode {node} in context {}", target.context))?;
    check_add(
        node,
        &target.context,
        existing.is_some(),
        mesh_node.as_ref(),
    )?;
    if existing.is_some_and(|n| {
        n.labels().get(GATEWAY_LABEL).map(String::as_str) == Some("true")
            && !n.labels().contains_key(LEGACY_GATEWAY_LABEL)
    }) {
        say(format!("node {node} is already a gateway; nothing to do"));
        return Ok(());
    }
    label(&nodes, node, Some("true")).await?;
    say(format!(
        "node {node} labelled {GATEWAY_LABEL}=true: the cluster's traffic to other clusters now goes through its gateways"
    ));
    Ok(())
}

/// `meshctl gateway remove NODE`.
///
/// # Errors
/// When the Node does not exist or cannot be patched.
pub async fn remove(args: &KubeArgs, node: &str) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let nodes: Api<Node> = Api::all(target.client.clone());
    let existing = nodes
        .get_opt(node)
        .await
        .with_context(|| format!("reading Node {node} in context {}", target.context))?
        .ok_or_else(|| GatewayRefusal::NoNode {
            node: node.to_owned(),
            context: target.context.clone(),
        })?;
    if !existing.labels().contains_key(GATEWAY_LABEL)
        && !existing.labels().contains_key(LEGACY_GATEWAY_LABEL)
    {
        say(format!("node {node} is not a gateway; nothing to do"));
        return Ok(());
    }
    label(&nodes, node, None).await?;
    say(format!("node {node} is no longer a gateway"));
    Ok(())
}

async fn label(nodes: &Api<Node>, node: &str, value: Option<&str>) -> Result<()> {
    let patch =
        json!({ "metadata": { "labels": { GATEWAY_LABEL: value, LEGACY_GATEWAY_LABEL: null } } });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("labelling Node {node}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;

    fn mesh_node(kind: MeshNodeKind, key: bool, endpoint: bool) -> MeshNode {
        let mut node = crate::testing::mesh_node(
            "b1",
            u8::from(key),
            endpoint.then_some("198.18.2.1:51820"),
            &["10.2.1.0/24"],
        );
        node.spec.kind = kind;
        node
    }

    #[test]
    fn each_refusal_names_the_node_and_the_problem() {
        let check = |exists, m: Option<MeshNode>| {
            check_add("b1", "cluster-b", exists, m.as_ref()).map_err(|e| e.to_string())
        };
        assert_eq!(
            check(true, Some(mesh_node(MeshNodeKind::Node, true, true))),
            Ok(())
        );
        let err = check(false, None).unwrap_err();
        assert!(
            err.contains("node b1: no such Node in context cluster-b"),
            "{err}"
        );
        let err = check(true, None).unwrap_err();
        assert!(err.contains("agent has not started"), "{err}");
        let err = check(true, Some(mesh_node(MeshNodeKind::Host, true, true))).unwrap_err();
        assert!(
            err.contains("host outside Kubernetes cannot be a gateway"),
            "{err}"
        );
        let err = check(true, Some(mesh_node(MeshNodeKind::Node, false, true))).unwrap_err();
        assert!(err.contains("no public key"), "{err}");
        let err = check(true, Some(mesh_node(MeshNodeKind::Node, true, false))).unwrap_err();
        assert!(err.contains("publishes no endpoint"), "{err}");
        assert!(err.starts_with("refusing to make a gateway; nothing was written"));
    }
}
