//! Multi-Cluster Services objects as the tests write them: a namespace, a Service with the
//! EndpointSlice kube-controller-manager would derive for it (the lab has no
//! kube-controller-manager outside `mcs.rs`), a ServiceExport, and the slices an import
//! holds.

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use wiremesh_proto::mcs::{LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, ServiceExport};

use crate::k8s::block_on;

/// Creates namespace `name`.
pub fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    block_on(Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns))
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// Creates Service `name` in `ns` (TCP `port`, named `http`, selector `app=name`) and one
/// EndpointSlice for it with a ready endpoint per `(address, node)` of `pods`.
pub fn create_service(
    client: &Client,
    ns: &str,
    name: &str,
    port: i32,
    pods: &[(&str, &str)],
) -> Result<()> {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        },
    }))?;
    block_on(
        Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &service),
    )
    .with_context(|| format!("creating Service {name}"))?;
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(address, node)| {
            json!({
                "addresses": [address],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node,
            })
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{name}-x1"),
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?;
    block_on(
        Api::<EndpointSlice>::namespaced(client.clone(), ns).create(&PostParams::default(), &slice),
    )
    .with_context(|| format!("creating EndpointSlice of {name}"))?;
    Ok(())
}

/// Exports Service `name` of `ns` (a ServiceExport, as `kubectl apply` would write it).
pub fn export(client: &Client, ns: &str, name: &str) -> Result<()> {
    let export: ServiceExport = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
    }))?;
    block_on(
        Api::<ServiceExport>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &export),
    )
    .with_context(|| format!("creating ServiceExport {name}"))?;
    Ok(())
}

/// The EndpointSlices imported for `service` (by the MCS service-name label), ordered by
/// source cluster.
pub fn imported_slices(api: &Api<EndpointSlice>, service: &str) -> Result<Vec<EndpointSlice>> {
    let params = ListParams::default().labels(&format!("{LABEL_SERVICE_NAME}={service}"));
    let mut slices = block_on(api.list(&params))?.items;
    slices.sort_by_key(|s| s.labels().get(LABEL_SOURCE_CLUSTER).cloned());
    Ok(slices)
}

/// `address`'s ready condition in `slices`, if some slice lists it.
pub fn endpoint_ready(slices: &[EndpointSlice], address: &str) -> Option<bool> {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .find(|e| e.addresses.iter().any(|a| a == address))
        .map(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
}

/// Checks that ServiceExport `name` has condition `type_` with `status` and `reason`.
///
/// # Errors
/// When the export or the condition is missing, or differs (the message says how).
pub fn expect_condition(
    api: &Api<ServiceExport>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<()> {
    let export = block_on(api.get(name))?;
    let conditions = export.status.and_then(|s| s.conditions).unwrap_or_default();
    let c = conditions
        .iter()
        .find(|c| c.type_ == type_)
        .with_context(|| format!("{name}: no {type_} condition in {conditions:?}"))?;
    ensure!(
        c.status == status && c.reason == reason,
        "{name}: {type_} is {} ({}: {}), expected {status} ({reason})",
        c.status,
        c.reason,
        c.message
    );
    Ok(())
}
