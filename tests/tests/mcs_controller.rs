//! Multi-Cluster Services, the controllers' side, as real `wiremesh-controller` processes
//! against two real control planes (no agents, no kube-controller-manager: the test writes
//! the EndpointSlices as it would). A Service exported from cluster-b is imported in
//! cluster-a (ServiceImport with the derived Service's VIP, `status.clusters`, slices
//! with the KEP's labels) and its export gets Valid/Ready/Conflict; cluster-a exporting
//! the same name on another port makes `PortConflict` on both exports (and an Event) while
//! the import keeps the older port; a MeshServiceExport written in cluster-b with an
//! endpoint outside its grant is refused in cluster-a; unexport removes import, derived
//! Service and slices. Each step prints how long it took.
//!
//! Needs `cargo build -p wiremesh-controller --bins` first, and the kube-apiserver and
//! etcd of `tests/k8s/build.sh`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use wiremesh_lab::k8s::{block_on, joined_planes};
use wiremesh_lab::mcs::{
    create_namespace, create_service, expect_condition, export, imported_slices,
};
use wiremesh_lab::replica::Replica;
use wiremesh_proto::crd::{MeshServiceExport, MeshServiceExportSpec};
use wiremesh_proto::mcs::{
    DERIVED_SERVICE_ANNOTATION, ExportedEndpoint, ExportedService, ExportedSlice,
    LABEL_SOURCE_CLUSTER, ServiceExport, ServiceImport, ServiceImportType,
};

/// The controllers react to watch events within a debounce of 100 ms; a 2-core CI machine
/// that is also compiling needs slack on top.
const SETTLE: Duration = Duration::from_secs(20);
const NS: &str = "demo";

#[test]
fn services_are_exported_imported_conflict_refused_and_withdrawn() -> Result<()> {
    let started = Instant::now();
    let (planes, kubeconfig) = joined_planes()?;
    let (a, b) = (&planes[0], &planes[1]);
    let replicas = [
        replica(&kubeconfig, a.dir(), "cluster-a")?,
        replica(&kubeconfig, b.dir(), "cluster-b")?,
    ];
    eprintln!("set-up took {:?}", started.elapsed());
    let result = scenario(&a.client()?, &b.client()?, &replicas[0]);
    if result.is_err() {
        for r in &replicas {
            eprintln!("--- {} log ---\n{}", r.identity, r.log_tail(80));
        }
    }
    eprintln!("test took {:?}", started.elapsed());
    result
}

fn scenario(ca: &Client, cb: &Client, replica_a: &Replica) -> Result<()> {
    for client in [ca, cb] {
        create_namespace(client, NS)?;
    }
    let imports_a: Api<ServiceImport> = Api::namespaced(ca.clone(), NS);
    let services_a: Api<Service> = Api::namespaced(ca.clone(), NS);
    let slices_a: Api<EndpointSlice> = Api::namespaced(ca.clone(), NS);
    let exports_b: Api<ServiceExport> = Api::namespaced(cb.clone(), NS);
    let exports_a: Api<ServiceExport> = Api::namespaced(ca.clone(), NS);

    // cluster-b: Service hello (http 8080), two ready pods on node b1, exported.
    create_service(
        cb,
        NS,
        "hello",
        8080,
        &[("10.2.1.5", "b1"), ("10.2.1.6", "b1")],
    )?;
    let exported = Instant::now();
    export(cb, NS, "hello")?;
    let took = poll(SETTLE, || {
        let import = block_on(imports_a.get_opt("hello"))?.ok_or_else(|| anyhow!("no import"))?;
        let spec = import.spec.clone().unwrap_or_default();
        let ips = spec.ips.clone().unwrap_or_default();
        ensure!(!ips.is_empty(), "no VIP yet: {spec:?}");
        ensure!(spec.type_ == ServiceImportType::ClusterSetIP);
        ensure!(
            spec.ports.len() == 1 && spec.ports[0].port == 8080,
            "{spec:?}"
        );
        let clusters: Vec<String> = import
            .status
            .as_ref()
            .and_then(|s| s.clusters.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.cluster)
            .collect();
        ensure!(clusters == ["cluster-b"], "status.clusters {clusters:?}");
        let derived = import
            .annotations()
            .get(DERIVED_SERVICE_ANNOTATION)
            .cloned()
            .ok_or_else(|| anyhow!("no derived-service annotation"))?;
        let service = block_on(services_a.get(&derived))?;
        let svc = service.spec.unwrap_or_default();
        ensure!(svc.selector.is_none(), "derived Service has a selector");
        ensure!(
            svc.cluster_ips.unwrap_or_default() == ips,
            "VIP is not the Service's"
        );
        let slices = imported_slices(&slices_a, "hello")?;
        let [slice] = slices.as_slice() else {
            bail!("{} imported slices", slices.len())
        };
        let labels = slice.labels();
        ensure!(labels.get(LABEL_SOURCE_CLUSTER).map(String::as_str) == Some("cluster-b"));
        ensure!(labels.get("kubernetes.io/service-name") == Some(&derived));
        ensure!(
            labels
                .get("endpointslice.kubernetes.io/managed-by")
                .is_some(),
            "{labels:?}"
        );
        let addresses: Vec<&str> = slice
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().map(String::as_str))
            .collect();
        ensure!(addresses == ["10.2.1.5", "10.2.1.6"], "{addresses:?}");
        Ok(())
    })?;
    eprintln!(
        "export -> import with VIP, derived Service and slices in cluster-a: {took:?} ({:?} since the export)",
        exported.elapsed()
    );
    let vip = block_on(imports_a.get("hello"))?
        .spec
        .and_then(|s| s.ips)
        .unwrap_or_default();
    poll(SETTLE, || {
        expect_conditions(
            &exports_b,
            "hello",
            &[
                ("Valid", "True", "Valid"),
                ("Ready", "True", "Exported"),
                ("Conflict", "False", "NoConflicts"),
            ],
        )
    })?;

    // cluster-a exports the same name, newer, with `http` on 9090: PortConflict on both.
    create_service(ca, NS, "hello", 9090, &[("10.1.1.5", "a1")])?;
    // creationTimestamp has whole seconds, and equal ones are ordered by cluster name
    // (cluster-a first): make cluster-a's export a second newer.
    std::thread::sleep(Duration::from_millis(1_100).saturating_sub(exported.elapsed()));
    let conflicted = Instant::now();
    export(ca, NS, "hello")?;
    let took = poll(SETTLE, || {
        expect_condition(&exports_b, "hello", "Conflict", "True", "PortConflict")?;
        expect_condition(&exports_a, "hello", "Conflict", "True", "PortConflict")
    })?;
    eprintln!("conflicting export -> PortConflict on both exports: {took:?}");
    let import = block_on(imports_a.get("hello"))?;
    let spec = import.spec.unwrap_or_default();
    ensure!(
        spec.ports.len() == 1 && spec.ports[0].port == 8080,
        "the older port must win: {spec:?}"
    );
    ensure!(spec.ips.unwrap_or_default() == vip, "the VIP changed");
    poll(SETTLE, || {
        let events: Api<Event> = Api::namespaced(cb.clone(), NS);
        let found = block_on(events.list(&ListParams::default()))?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("PortConflict")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("hello")
            });
        ensure!(found, "no PortConflict Event on cluster-b's ServiceExport");
        Ok(())
    })?;
    // cluster-a's own slice carries none of the losing port.
    let slices = imported_slices(&slices_a, "hello")?;
    ensure!(slices.len() == 2, "{} slices", slices.len());
    for s in &slices {
        let ports: Vec<i32> = s.ports.iter().flatten().filter_map(|p| p.port).collect();
        match s.labels().get(LABEL_SOURCE_CLUSTER).map(String::as_str) {
            Some("cluster-b") => ensure!(ports == [8080], "{ports:?}"),
            Some("cluster-a") => ensure!(ports.is_empty(), "{ports:?}"),
            other => bail!("slice from {other:?}"),
        }
    }
    block_on(exports_a.delete("hello", &DeleteParams::default()))?;
    let took = poll(SETTLE, || {
        expect_condition(&exports_b, "hello", "Conflict", "False", "NoConflicts")?;
        ensure!(imported_slices(&slices_a, "hello")?.len() == 1);
        Ok(())
    })?;
    eprintln!(
        "conflict resolved {took:?} after cluster-a unexported ({:?} since it exported)",
        conflicted.elapsed()
    );

    // A compromised cluster-b publishes an endpoint outside the pod CIDRs it was granted.
    let rogue = rogue_export(&["10.2.1.7", "10.9.9.9"]);
    block_on(Api::<MeshServiceExport>::all(cb.clone()).create(&PostParams::default(), &rogue))?;
    let field = "spec.service.endpointSlices[0].endpoints[1].addresses[0]";
    let took = poll(SETTLE, || {
        let log = replica_a.log();
        ensure!(
            log.lines()
                .any(|l| l.contains("refused") && l.contains("demo.evil") && l.contains(field)),
            "cluster-a's controller did not refuse demo.evil naming {field}"
        );
        Ok(())
    })?;
    eprintln!("out-of-grant export refused in cluster-a after {took:?}");
    ensure!(
        block_on(imports_a.get_opt("evil"))?.is_none(),
        "an export with an endpoint outside cluster-b's grant was imported"
    );
    ensure!(
        imported_slices(&slices_a, "hello")?.len() == 1,
        "the peer's other export went"
    );

    // Unexport: import, derived Service and slices go.
    let derived = block_on(imports_a.get("hello"))?
        .annotations()
        .get(DERIVED_SERVICE_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    block_on(exports_b.delete("hello", &DeleteParams::default()))?;
    let took = poll(SETTLE, || {
        ensure!(
            block_on(imports_a.get_opt("hello"))?.is_none(),
            "import left"
        );
        ensure!(
            block_on(services_a.get_opt(&derived))?.is_none(),
            "derived Service left"
        );
        ensure!(
            imported_slices(&slices_a, "hello")?.is_empty(),
            "slices left"
        );
        Ok(())
    })?;
    eprintln!("unexport -> import, derived Service and slices gone in cluster-a: {took:?}");
    Ok(())
}

fn rogue_export(addresses: &[&str]) -> MeshServiceExport {
    MeshServiceExport::new(
        "demo.evil",
        MeshServiceExportSpec {
            service: ExportedService {
                cluster: "cluster-b".into(),
                namespace: NS.into(),
                name: "evil".into(),
                export_created: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                type_: ServiceImportType::ClusterSetIP,
                ports: vec![wiremesh_proto::mcs::ServicePort {
                    name: Some("http".into()),
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                    port: 80,
                }],
                session_affinity: None,
                session_affinity_config: None,
                ip_families: vec!["IPv4".into()],
                internal_traffic_policy: None,
                traffic_distribution: None,
                endpoint_slices: vec![ExportedSlice {
                    address_type: "IPv4".into(),
                    ports: Vec::new(),
                    endpoints: addresses
                        .iter()
                        .map(|a| ExportedEndpoint {
                            addresses: vec![(*a).to_owned()],
                            ready: Some(true),
                            ..ExportedEndpoint::default()
                        })
                        .collect(),
                }],
            },
        },
    )
}

fn expect_conditions(
    api: &Api<ServiceExport>,
    name: &str,
    want: &[(&str, &str, &str)],
) -> Result<()> {
    for (type_, status, reason) in want {
        expect_condition(api, name, type_, status, reason)?;
    }
    Ok(())
}

/// Polls `check` every 50 ms until it passes; how long that took.
fn poll(timeout: Duration, mut check: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() > timeout => bail!("not within {timeout:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `cluster`'s controller, its MCS module logging at debug.
fn replica(kubeconfig: &Path, dir: &Path, cluster: &str) -> Result<Replica> {
    let identity = format!("{cluster}-0");
    let log = Some("info,wiremesh_controller::mcs=debug");
    Replica::start(kubeconfig, dir, cluster, &identity, &[], log)
}
