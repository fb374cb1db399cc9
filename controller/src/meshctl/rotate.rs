//! `meshctl rotate-keys [NODE|--all]`: rotate the WireGuard key of one node or of every
//! node of a cluster, with no lost packet.
//!
//! meshctl sets [`ROTATE_KEYS_ANNOTATION`] to a new request id on each MeshNode; each
//! node's agent (`agent/src/rotation.rs`) generates a key, keeps answering the old one
//! until every peer has a session under the new one (at most its `--rotation-grace`),
//! and publishes the new key, which the controllers mirror to the linked clusters. meshctl
//! waits until every MeshNode shows a new key, then names each host of this cluster that
//! runs stock WireGuard: its wg-quick config names the old keys and must be fetched again.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt as _};
use serde_json::json;
use wiremesh_proto::crd::{MeshNode, MeshNodeKind, ROTATE_KEYS_ANNOTATION};

use super::common::{cluster_info, list, say};
use super::kubeconfig::{self, KubeArgs};

/// The agent's field manager: a host MeshNode whose key it wrote runs our agent.
const AGENT_MANAGER: &str = "wiremesh-agent";
/// The agents' default `--rotation-grace`.
const DEFAULT_GRACE: Duration = Duration::from_secs(600);
/// How often the MeshNodes are read while waiting.
const POLL: Duration = Duration::from_millis(500);

/// Which nodes to rotate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// One node by name.
    Node(String),
    /// Every node (MeshNode of kind Node) of the cluster.
    All,
}

/// The MeshNodes to rotate, with their keys now: every node for [`Which::All`], or the
/// one named. Hosts are not rotated by meshctl (a host agent keeps its key; a stock host's
/// key is its own).
///
/// # Errors
/// When the named node does not exist, is a host, or has published no key yet.
pub fn select(nodes: &[MeshNode], which: &Which) -> Result<BTreeMap<String, String>> {
    let is_node = |n: &&MeshNode| n.spec.kind == MeshNodeKind::Node && n.spec.has_key();
    match which {
        Which::All => Ok(nodes
            .iter()
            .filter(is_node)
            .map(|n| (n.name_any(), n.spec.public_key.clone()))
            .collect()),
        Which::Node(name) => {
            let Some(node) = nodes.iter().find(|n| n.name_any() == *name) else {
                bail!("no MeshNode {name:?} in this cluster");
            };
            if node.spec.kind != MeshNodeKind::Node {
                bail!(
                    "MeshNode {name} is a host: its key belongs to the host (a host agent keeps its own; stock WireGuard: change it there and `meshctl host add --public-key` again)"
                );
            }
            if !node.spec.has_key() {
                bail!("node {name}: its agent has published no public key yet");
            }
            Ok(BTreeMap::from([(
                name.clone(),
                node.spec.public_key.clone(),
            )]))
        }
    }
}

/// Hosts of this cluster that run stock WireGuard: a host MeshNode whose key our agent
/// never wrote (`meshctl host add --public-key` did).
pub fn stock_hosts(nodes: &[MeshNode]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.spec.kind == MeshNodeKind::Host && n.spec.has_key())
        .filter(|n| {
            !n.managed_fields()
                .iter()
                .any(|f| f.manager.as_deref() == Some(AGENT_MANAGER))
        })
        .map(|n| n.name_any())
        .collect()
}

/// The message for a stock WireGuard host after `rotated` nodes changed their keys.
pub fn stock_host_message(host: &str, rotated: &[String], grace_end: &str) -> Vec<String> {
    rotated
        .iter()
        .map(|node| {
            format!(
                "host {host} runs stock WireGuard: its config names the old key of node {node}; fetch it again with `meshctl host config {host}` before {grace_end}"
            )
        })
        .collect()
}

/// `meshctl rotate-keys`.
///
/// # Errors
/// When the cluster cannot be read or written, the node is unknown, or some node did not
/// publish a new key within `timeout`.
pub(crate) async fn rotate_keys(args: &KubeArgs, which: &Which, timeout: Duration) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let cluster = cluster_info(&target).await?.name;
    let nodes = list::<MeshNode>(&target, "MeshNodes").await?;
    let old = select(&nodes, which)?;
    if old.is_empty() {
        say(format!(
            "{cluster}: no node has published a key; nothing to rotate"
        ));
        return Ok(());
    }
    let request = Timestamp::now().to_string();
    let api = Api::<MeshNode>::all(target.client.clone());
    for name in old.keys() {
        let patch = json!({"metadata": {"annotations": {ROTATE_KEYS_ANNOTATION: request}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("{cluster}: asking node {name} to rotate its key"))?;
        say(format!(
            "{cluster}: node {name}: rotation requested ({request})"
        ));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut waiting = old.clone();
    while !waiting.is_empty() {
        for node in list::<MeshNode>(&target, "MeshNodes").await? {
            let name = node.name_any();
            if let Some(before) = waiting.get(&name)
                && node.spec.has_key()
                && node.spec.public_key != *before
            {
                say(format!(
                    "{cluster}: node {name}: new key {} (the old one is still answered until every peer has moved)",
                    node.spec.public_key
                ));
                waiting.remove(&name);
            }
        }
        if waiting.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let names: Vec<&str> = waiting.keys().map(String::as_str).collect();
            bail!(
                "{cluster}: no new key from {} within {}s (is the agent running there?)",
                names.join(", "),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let rotated: Vec<String> = old.into_keys().collect();
    let grace_end = Timestamp::from_second(
        Timestamp::now().as_second() + i64::try_from(DEFAULT_GRACE.as_secs()).unwrap_or(0),
    )
    .map_or_else(|_| "the grace ends".to_owned(), |t| t.to_string());
    let grace_end = format!("{grace_end} (the agents' --rotation-grace, 10 minutes by default)");
    for host in stock_hosts(&nodes) {
        for line in stock_host_message(&host, &rotated, &grace_end) {
            say(line);
        }
    }
    say(format!("{cluster}: {} node(s) rotated", rotated.len()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use wiremesh_proto::crd::MeshNodeSpec;

    use super::*;

    const KEY_A: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const KEY_B: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    fn node(name: &str, kind: MeshNodeKind, key: &str, manager: Option<&str>) -> MeshNode {
        let mut n = MeshNode::new(
            name,
            MeshNodeSpec {
                public_key: key.to_owned(),
                endpoints: Vec::new(),
                pod_cidrs: Vec::new(),
                location: None,
                kind,
                gateway: false,
                relay: false,
                heartbeat: false,
            },
        );
        n.metadata.managed_fields = manager.map(|m| {
            vec![ManagedFieldsEntry {
                manager: Some(m.to_owned()),
                ..ManagedFieldsEntry::default()
            }]
        });
        n
    }

    fn nodes() -> Vec<MeshNode> {
        vec![
            node("n1", MeshNodeKind::Node, KEY_A, Some(AGENT_MANAGER)),
            node("n2", MeshNodeKind::Node, KEY_B, Some(AGENT_MANAGER)),
            node("n3", MeshNodeKind::Node, "", None),
            node("stock", MeshNodeKind::Host, KEY_A, Some("meshctl")),
            node("agent-host", MeshNodeKind::Host, KEY_B, Some(AGENT_MANAGER)),
        ]
    }

    #[test]
    fn all_is_every_node_with_a_key_and_no_host() {
        let selected = select(&nodes(), &Which::All).unwrap();
        assert_eq!(
            selected.keys().map(String::as_str).collect::<Vec<_>>(),
            ["n1", "n2"]
        );
        assert_eq!(selected["n1"], KEY_A);
    }

    #[test]
    fn a_named_node_must_exist_be_a_node_and_have_a_key() {
        assert_eq!(
            select(&nodes(), &Which::Node("n2".into())).unwrap().len(),
            1
        );
        for (name, words) in [
            ("nope", "no MeshNode"),
            ("stock", "is a host"),
            ("n3", "no public key"),
        ] {
            let e = select(&nodes(), &Which::Node(name.into())).unwrap_err();
            assert!(e.to_string().contains(words), "{name}: {e}");
        }
    }

    #[test]
    fn only_hosts_whose_key_no_agent_wrote_get_the_message() {
        assert_eq!(stock_hosts(&nodes()), ["stock"]);
        let lines = stock_host_message("stock", &["n1".into()], "2026-12-07T00:10:00Z");
        assert_eq!(
            lines,
            [
                "host stock runs stock WireGuard: its config names the old key of node n1; fetch it again with `meshctl host config stock` before 2026-12-07T00:10:00Z"
            ]
        );
    }
}
