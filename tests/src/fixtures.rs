//! Builders for the Wiremesh objects tests create by hand.

use wiremesh_proto::crd::{MeshNode, MeshNodeKind, MeshNodeSpec};

use crate::mesh::Keypair;

/// A `MeshNode` named `name`: a fresh public key, kind `Node`, no endpoints, no pod CIDRs,
/// no location, neither gateway nor relay. Set what the test needs, then
/// [`MeshNodeBuilder::build`] (or [`MeshNodeBuilder::spec`] for the spec alone).
///
/// ```no_run
/// # use wiremesh_lab::fixtures::mesh_node;
/// let node = mesh_node("a1")
///     .endpoint("198.18.1.1:51820")
///     .pod_cidr("10.1.1.0/24")
///     .build();
/// ```
pub fn mesh_node(name: &str) -> MeshNodeBuilder {
    MeshNodeBuilder {
        name: name.to_owned(),
        spec: MeshNodeSpec {
            public_key: Keypair::generate().public,
            endpoints: Vec::new(),
            pod_cidrs: Vec::new(),
            location: None,
            kind: MeshNodeKind::Node,
            gateway: false,
            relay: false,
            heartbeat: false,
        },
    }
}

/// A `MeshNode` under construction; see [`mesh_node`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MeshNodeBuilder {
    name: String,
    spec: MeshNodeSpec,
}

impl MeshNodeBuilder {
    /// The public key, in place of the fresh one (any string: tests of validation set bad ones).
    pub fn key(mut self, public_key: impl Into<String>) -> Self {
        self.spec.public_key = public_key.into();
        self
    }

    /// Adds an endpoint after those set so far.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.spec.endpoints.push(endpoint.into());
        self
    }

    /// Replaces the endpoints with `endpoints`.
    pub fn endpoints<S: Into<String>>(mut self, endpoints: impl IntoIterator<Item = S>) -> Self {
        self.spec.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a pod CIDR after those set so far.
    pub fn pod_cidr(mut self, cidr: impl Into<String>) -> Self {
        self.spec.pod_cidrs.push(cidr.into());
        self
    }

    /// Replaces the pod CIDRs with `cidrs`.
    pub fn pod_cidrs<S: Into<String>>(mut self, cidrs: impl IntoIterator<Item = S>) -> Self {
        self.spec.pod_cidrs = cidrs.into_iter().map(Into::into).collect();
        self
    }

    /// The kind, in place of `Node`.
    pub fn kind(mut self, kind: MeshNodeKind) -> Self {
        self.spec.kind = kind;
        self
    }

    /// Whether the node is a relay.
    pub fn relay(mut self, relay: bool) -> Self {
        self.spec.relay = relay;
        self
    }

    /// The location.
    pub fn location(mut self, location: impl Into<String>) -> Self {
        self.spec.location = Some(location.into());
        self
    }

    /// The spec alone.
    pub fn spec(self) -> MeshNodeSpec {
        self.spec
    }

    /// The `MeshNode`.
    pub fn build(self) -> MeshNode {
        MeshNode::new(&self.name, self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_mesh_node_is_a_keyed_node_with_nothing_else() {
        let node = mesh_node("a1").build();
        assert_eq!(node.metadata.name.as_deref(), Some("a1"));
        assert_eq!(node.spec.public_key.len(), 44);
        assert!(node.spec.endpoints.is_empty() && node.spec.pod_cidrs.is_empty());
        assert_eq!(node.spec.kind, MeshNodeKind::Node);
        assert!(node.spec.location.is_none() && !node.spec.gateway && !node.spec.relay);
    }

    #[test]
    fn singular_setters_add_and_plural_ones_replace() {
        let spec = mesh_node("a1")
            .endpoint("198.18.0.1:51820")
            .endpoint("[fd00::1]:51820")
            .pod_cidr("10.1.1.0/24")
            .pod_cidrs(["10.1.0.1/24"])
            .key("not-a-key")
            .location("lab")
            .spec();
        assert_eq!(spec.endpoints, ["198.18.0.1:51820", "[fd00::1]:51820"]);
        assert_eq!(spec.pod_cidrs, ["10.1.0.1/24"]);
        assert_eq!(spec.public_key, "not-a-key");
        assert_eq!(spec.location.as_deref(), Some("lab"));
        let spec = mesh_node("a1").endpoint("x").endpoints(["y"]).spec();
        assert_eq!(spec.endpoints, ["y"]);
    }
}
