//! `deploy/wiremesh.yaml` (rendered from the Helm chart), embedded, parsed and applied with
//! server-side apply: what `meshctl install` puts in a cluster besides the CRDs and the
//! cluster ConfigMap (namespace, RBAC, admission policy, agent DaemonSet, controller
//! Deployment, PodDisruptionBudget, metrics Services).

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Client, ResourceExt as _};
use serde::Deserialize as _;

/// `deploy/wiremesh.yaml` as built into this binary (`make manifests` regenerates it).
pub const MANIFEST: &str = include_str!("../../deploy/wiremesh.yaml");

/// Why the manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A YAML document does not parse as a Kubernetes object.
    #[error("deploy/wiremesh.yaml: document {index}: {source}")]
    Parse {
        /// The document's position, from 1.
        index: usize,
        /// What the parser said.
        #[source]
        source: serde_yaml::Error,
    },
    /// A document has no apiVersion, kind or name.
    #[error("deploy/wiremesh.yaml: document {index}: {what} is missing")]
    Incomplete {
        /// The document's position, from 1.
        index: usize,
        /// The missing field.
        what: &'static str,
    },
    /// The image given is not `REPOSITORY[:TAG]`.
    #[error("--image {0:?}: expected REPOSITORY[:TAG] or REPOSITORY@DIGEST")]
    BadImage(String),
    /// The API server does not serve a kind the manifest uses.
    #[error("{kind}: the API server does not serve {api_version}")]
    Discovery {
        /// The object's kind and name.
        kind: String,
        /// Its apiVersion.
        api_version: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The API server refused an object.
    #[error("applying {kind} {name}")]
    Apply {
        /// The object's kind.
        kind: String,
        /// The object's namespace/name.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

/// The objects of `yaml` (a multi-document manifest), empty documents skipped.
///
/// # Errors
/// [`ManifestError::Parse`] or [`ManifestError::Incomplete`], naming the document.
pub fn parse(yaml: &str) -> Result<Vec<DynamicObject>, ManifestError> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let index = i + 1;
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|source| ManifestError::Parse { index, source })?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_yaml::from_value(value)
            .map_err(|source| ManifestError::Parse { index, source })?;
        let types = object.types.as_ref();
        if types.is_none_or(|t| t.api_version.is_empty()) {
            return Err(ManifestError::Incomplete {
                index,
                what: "apiVersion",
            });
        }
        if types.is_none_or(|t| t.kind.is_empty()) {
            return Err(ManifestError::Incomplete {
                index,
                what: "kind",
            });
        }
        if object.metadata.name.as_deref().is_none_or(str::is_empty) {
            return Err(ManifestError::Incomplete {
                index,
                what: "metadata.name",
            });
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The object's kind (empty if none).
pub fn kind(object: &DynamicObject) -> &str {
    object.types.as_ref().map_or("", |t| t.kind.as_str())
}

/// Replaces the image of every container of every workload in `objects`.
///
/// # Errors
/// [`ManifestError::BadImage`] when `image` is empty or has whitespace.
pub fn set_image(objects: &mut [DynamicObject], image: &str) -> Result<(), ManifestError> {
    if image.is_empty() || image.contains(char::is_whitespace) || image.starts_with([':', '@']) {
        return Err(ManifestError::BadImage(image.to_owned()));
    }
    for object in objects {
        let containers = object
            .data
            .pointer_mut("/spec/template/spec/containers")
            .and_then(serde_json::Value::as_array_mut);
        for container in containers.into_iter().flatten() {
            if let Some(slot) = container.get_mut("image") {
                *slot = serde_json::Value::String(image.to_owned());
            }
        }
    }
    Ok(())
}

/// Applies `objects` in order with server-side apply (field manager `manager`, forced);
/// returns "Kind namespace/name" of each.
///
/// # Errors
/// The first object the API server does not serve or refuses; the objects before it stay
/// applied (applying again is idempotent).
pub async fn apply(
    client: &Client,
    objects: &[DynamicObject],
    manager: &str,
) -> Result<Vec<String>, ManifestError> {
    let params = PatchParams::apply(manager).force();
    let mut applied = Vec::with_capacity(objects.len());
    for object in objects {
        let types = object.types.clone().unwrap_or_default();
        let name = object.name_any();
        let label = match object.namespace() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.clone(),
        };
        let gvk = GroupVersionKind::try_from(&types).map_err(|_| ManifestError::Incomplete {
            index: applied.len() + 1,
            what: "apiVersion",
        })?;
        let (resource, capabilities) =
            discovery::pinned_kind(client, &gvk)
                .await
                .map_err(|source| ManifestError::Discovery {
                    kind: format!("{} {label}", types.kind),
                    api_version: types.api_version.clone(),
                    source,
                })?;
        let api: Api<DynamicObject> = match (capabilities.scope, object.namespace()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &resource),
            (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .map_err(|source| ManifestError::Apply {
                kind: types.kind.clone(),
                name: label.clone(),
                source,
            })?;
        applied.push(format!("{} {label}", types.kind));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_manifest_parses_and_holds_every_component() {
        let objects = parse(MANIFEST).unwrap();
        let kinds: Vec<&str> = objects.iter().map(kind).collect();
        for want in [
            "CustomResourceDefinition",
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ValidatingAdmissionPolicy",
            "DaemonSet",
            "Deployment",
            "PodDisruptionBudget",
        ] {
            assert!(kinds.contains(&want), "{want} missing from {kinds:?}");
        }
    }

    #[test]
    fn set_image_replaces_every_container_image() {
        let mut objects = parse(MANIFEST).unwrap();
        set_image(&mut objects, "registry.example/wm:dev").unwrap();
        let images: Vec<&str> = objects
            .iter()
            .filter_map(|o| o.data.pointer("/spec/template/spec/containers"))
            .filter_map(serde_json::Value::as_array)
            .flatten()
            .filter_map(|c| c["image"].as_str())
            .collect();
        assert_eq!(images.len(), 2, "{images:?}");
        assert!(images.iter().all(|i| *i == "registry.example/wm:dev"));
        assert!(matches!(
            set_image(&mut objects, "a b"),
            Err(ManifestError::BadImage(_))
        ));
    }

    #[test]
    fn errors_name_the_document() {
        let err = parse("kind: ConfigMap\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Secret\napiVersion: v1\nmetadata: {}\n")
            .unwrap_err();
        assert!(err.to_string().contains("document 2"), "{err}");
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = parse("a: [").unwrap_err();
        assert!(err.to_string().contains("document 1"), "{err}");
    }
}
