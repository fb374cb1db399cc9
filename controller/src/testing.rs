//! Fixtures for the unit tests: CRD objects with the fields a test does not look at filled in.

use wiremesh_proto::PublicKey;
use wiremesh_proto::crd::{MeshNode, MeshNodeSpec};

/// The public key of 32 bytes `seed`, base64.
pub(crate) fn key(seed: u8) -> String {
    PublicKey::from([seed; 32]).to_base64()
}

/// A MeshNode of kind `Node` named `name` claiming `cidrs`, with the key of `key_seed` (none
/// when 0) and `endpoint` if given; no location, not a gateway or relay.
pub(crate) fn mesh_node(
    name: &str,
    key_seed: u8,
    endpoint: Option<&str>,
    cidrs: &[&str],
) -> MeshNode {
    MeshNode::new(
        name,
        MeshNodeSpec {
            public_key: if key_seed == 0 {
                String::new()
            } else {
                key(key_seed)
            },
            endpoints: endpoint.iter().map(|e| (*e).to_owned()).collect(),
            pod_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
            location: None,
            kind: Default::default(),
            gateway: false,
            relay: false,
            heartbeat: false,
        },
    )
}
