//! The hand-written types against upstream's CRDs: every property of the served schema
//! round-trips through the Rust type under the same JSON name and type, a required
//! property is required in Rust too and an optional one may be absent (and stays absent),
//! and upstream's examples parse.

use kube::Resource as _;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;

const EXPORTS_CRD: &str =
    include_str!("../../../deploy/helm/wiremesh/crds/multicluster.x-k8s.io_serviceexports.yaml");
const IMPORTS_CRD: &str =
    include_str!("../../../deploy/helm/wiremesh/crds/multicluster.x-k8s.io_serviceimports.yaml");
const PROPERTIES_CRD: &str =
    include_str!("../../../deploy/helm/wiremesh/crds/about.k8s.io_clusterproperties.yaml");

#[test]
fn service_export_matches_the_upstream_schema() {
    check_against_schema::<ServiceExport>(EXPORTS_CRD, VERSION);
}

#[test]
fn service_import_matches_the_upstream_schema() {
    check_against_schema::<ServiceImport>(IMPORTS_CRD, VERSION);
}

#[test]
fn cluster_property_matches_the_upstream_schema() {
    check_against_schema::<ClusterProperty>(PROPERTIES_CRD, ABOUT_VERSION);
}

#[test]
fn resource_identity_matches_the_crds() {
    for (yaml, kind, group, version, plural, namespaced) in [
        (
            EXPORTS_CRD,
            ServiceExport::kind(&()),
            ServiceExport::group(&()),
            ServiceExport::version(&()),
            ServiceExport::plural(&()),
            true,
        ),
        (
            IMPORTS_CRD,
            ServiceImport::kind(&()),
            ServiceImport::group(&()),
            ServiceImport::version(&()),
            ServiceImport::plural(&()),
            true,
        ),
        (
            PROPERTIES_CRD,
            ClusterProperty::kind(&()),
            ClusterProperty::group(&()),
            ClusterProperty::version(&()),
            ClusterProperty::plural(&()),
            false,
        ),
    ] {
        let crd = crd(yaml);
        assert_eq!(crd["spec"]["names"]["kind"], *kind);
        assert_eq!(crd["spec"]["group"], *group);
        assert_eq!(crd["spec"]["names"]["plural"], *plural);
        assert_eq!(
            crd["spec"]["scope"],
            if namespaced { "Namespaced" } else { "Cluster" }
        );
        let served = crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == *version && v["served"] == true);
        assert!(served, "{kind} {version} is not served by its CRD");
    }
    assert_eq!(ServiceExport::group(&()), GROUP);
    assert_eq!(ServiceExport::version(&()), VERSION);
    assert_eq!(ClusterProperty::group(&()), ABOUT_GROUP);
    assert_eq!(ClusterProperty::version(&()), ABOUT_VERSION);
    // The MCS CRDs carry the release label `meshctl install` compares.
    for yaml in [EXPORTS_CRD, IMPORTS_CRD] {
        assert_eq!(
            crd(yaml)["metadata"]["labels"][RELEASE_VERSION_LABEL],
            "v0.5.2"
        );
    }
}

#[test]
fn upstream_examples_round_trip() {
    for yaml in [
        include_str!("../../testdata/mcs-api/serviceimport.yaml"),
        include_str!("../../testdata/mcs-api/serviceimport-with-vip.yaml"),
    ] {
        let value: Value = serde_yaml::from_str(yaml).unwrap();
        let import: ServiceImport = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(serde_json::to_value(&import).unwrap(), value);
        let spec = import.spec.unwrap();
        assert_eq!(spec.type_, ServiceImportType::ClusterSetIP);
        assert_eq!(spec.ports.first().map(|p| p.port), Some(80));
    }
}

#[test]
fn a_bare_service_export_parses_and_serializes_without_spec() {
    let bare = json!({
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": "ServiceExport",
        "metadata": {"name": "hello", "namespace": "demo"},
    });
    let export: ServiceExport = serde_json::from_value(bare.clone()).unwrap();
    assert_eq!(export.metadata.name.as_deref(), Some("hello"));
    assert_eq!(serde_json::to_value(&export).unwrap(), bare);
}

#[test]
fn a_wrong_type_is_refused_naming_the_field() {
    let bad = json!({"metadata": {"name": "a"}, "spec": {"type": "ClusterSetIP", "ports": [{"port": "80"}]}});
    let err = serde_json::from_value::<ServiceImport>(bad).unwrap_err();
    assert!(err.to_string().contains("invalid type"), "{err}");
    let bad = json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer", "ports": []}});
    let err = serde_json::from_value::<ServiceImport>(bad).unwrap_err();
    assert!(err.to_string().contains("LoadBalancer"), "{err}");
}

#[test]
fn reasons_are_upstreams_strings() {
    assert_eq!(ExportCondition::Valid.as_str(), "Valid");
    assert_eq!(ExportCondition::Ready.as_str(), "Ready");
    assert_eq!(ExportCondition::Conflict.as_str(), "Conflict");
    assert_eq!(ConflictReason::Port.as_str(), "PortConflict");
    assert_eq!(ConflictReason::Type.as_str(), "TypeConflict");
    assert_eq!(ConflictReason::IpFamily.as_str(), "IPFamilyConflict");
    assert_eq!(
        ConflictReason::SessionAffinityConfig.as_str(),
        "SessionAffinityConfigConflict"
    );
}

/// Checks `T` against the `openAPIV3Schema` of `version` in `crd_yaml`.
fn check_against_schema<T: DeserializeOwned + Serialize>(crd_yaml: &str, version: &str) {
    let crd = crd(crd_yaml);
    let schema = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("no version {version}"))["schema"]["openAPIV3Schema"]
        .clone();
    let api_version = format!("{}/{version}", crd["spec"]["group"].as_str().unwrap());
    let kind = crd["spec"]["names"]["kind"].clone();

    let mut full = instance(&schema);
    full["apiVersion"] = json!(api_version);
    full["kind"] = kind;
    full["metadata"] = json!({"name": "n"});
    let parsed: T = serde_json::from_value(full.clone())
        .unwrap_or_else(|e| panic!("the full instance does not parse: {e}\n{full:#}"));
    let back = serde_json::to_value(&parsed).unwrap();
    assert_eq!(
        back,
        full,
        "a property is lost or renamed in the round trip: {}",
        first_difference(&full, &back, "")
    );

    let mut checked = 0;
    for (pointer, required) in properties(&schema, "") {
        if ["/apiVersion", "/kind", "/metadata"].contains(&pointer.as_str()) {
            continue;
        }
        let mut without = full.clone();
        remove(&mut without, &pointer);
        let result = serde_json::from_value::<T>(without.clone());
        if required {
            match result {
                Err(_) => {}
                // k8s-openapi's Condition defaults its missing strings; it still never
                // writes one without them.
                Ok(parsed) if pointer.contains("/conditions/0/") => {
                    let back = serde_json::to_value(&parsed).unwrap();
                    assert!(back.pointer(&pointer).is_some(), "{pointer} not written");
                }
                Ok(_) => panic!("{pointer} is required upstream, optional in Rust"),
            }
        } else {
            let parsed = result.unwrap_or_else(|e| {
                panic!("{pointer} is optional upstream, required in Rust: {e}")
            });
            let back = serde_json::to_value(&parsed).unwrap();
            assert_eq!(
                back,
                without,
                "{pointer} absent does not stay absent: {}",
                first_difference(&without, &back, "")
            );
        }
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} properties checked");
}

fn crd(yaml: &str) -> Value {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(docs.len(), 1, "one CRD per file");
    docs.into_iter().next().unwrap()
}

/// An instance with every property of `schema` set.
fn instance(schema: &Value) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    match schema["type"].as_str() {
        Some("object") => {
            if let Some(properties) = schema["properties"].as_object() {
                Value::Object(
                    properties
                        .iter()
                        .map(|(k, v)| (k.clone(), instance(v)))
                        .collect(),
                )
            } else if schema["additionalProperties"].is_object() {
                json!({"key": instance(&schema["additionalProperties"])})
            } else {
                json!({})
            }
        }
        Some("array") => json!([instance(&schema["items"])]),
        Some("string") if schema["format"] == "date-time" => json!("2025-06-01T12:00:00Z"),
        Some("string") => json!("Value1"),
        Some("integer") => json!(7),
        Some("boolean") => json!(true),
        other => panic!("schema type {other:?} not handled"),
    }
}

/// Each property below `schema` as a JSON pointer into [`instance`]'s value (arrays at
/// index 0), with whether its parent requires it.
fn properties(schema: &Value, at: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    match schema["type"].as_str() {
        Some("object") => {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (name, sub) in schema["properties"].as_object().into_iter().flatten() {
                let pointer = format!("{at}/{name}");
                out.push((pointer.clone(), required.contains(&name.as_str())));
                out.extend(properties(sub, &pointer));
            }
        }
        Some("array") => out.extend(properties(&schema["items"], &format!("{at}/0"))),
        _ => {}
    }
    out
}

fn remove(value: &mut Value, pointer: &str) {
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let parent = value.pointer_mut(parent).unwrap();
    parent.as_object_mut().unwrap().remove(last);
}

fn first_difference(want: &Value, have: &Value, at: &str) -> String {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            for key in w.keys().chain(h.keys()) {
                if w.get(key) != h.get(key) {
                    return match (w.get(key), h.get(key)) {
                        (Some(w), Some(h)) => first_difference(w, h, &format!("{at}/{key}")),
                        (w, h) => format!("{at}/{key}: want {w:?}, have {h:?}"),
                    };
                }
            }
            String::new()
        }
        (Value::Array(w), Value::Array(h)) if w.len() == h.len() => w
            .iter()
            .zip(h)
            .enumerate()
            .find(|(_, (w, h))| w != h)
            .map(|(i, (w, h))| first_difference(w, h, &format!("{at}/{i}")))
            .unwrap_or_default(),
        _ => format!("{at}: want {want}, have {have}"),
    }
}
