use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use wiremesh_proto::mcs::ExportedSlice;

use super::*;

#[test]
fn derived_name_is_upstreams() {
    // Python: "derived-" + base64.b32hexencode(sha256(b"demo/hello").digest()).lower()[:10]
    assert_eq!(derived_name("demo", "hello"), "derived-clkj3a8mu9");
    assert_eq!(derived_name("default", "serve"), "derived-0p6lqce99d");
}

#[test]
fn two_clusters_one_import_a_slice_each() {
    let exports = [
        export(
            "cluster-b",
            10,
            &[port("http", 8080)],
            &["10.2.0.5", "10.2.0.6"],
        ),
        export("cluster-c", 20, &[port("http", 8080)], &["10.3.0.5"]),
    ];
    let plan = plan(
        &exports,
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    assert!(
        plan.conflicts.is_empty() && plan.rejected.is_empty(),
        "{plan:#?}"
    );

    let [import] = plan.imports.as_slice() else {
        panic!("{:?}", plan.imports)
    };
    let derived = derived_name("demo", "hello");
    assert_eq!(import.metadata.name.as_deref(), Some("hello"));
    assert_eq!(
        import.metadata.annotations.as_ref().unwrap()[DERIVED_SERVICE_ANNOTATION],
        derived
    );
    let spec = import.spec.as_ref().unwrap();
    assert_eq!(spec.type_, ServiceImportType::ClusterSetIP);
    assert_eq!(spec.ports, [port("http", 8080)]);
    assert_eq!(spec.ips, None, "no VIP before the derived Service has one");
    assert_eq!(clusters(import), ["cluster-b", "cluster-c"]);

    let [service] = plan.services.as_slice() else {
        panic!()
    };
    assert_eq!(service.metadata.name.as_deref(), Some(derived.as_str()));
    let svc = service.spec.as_ref().unwrap();
    assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(svc.selector, None);
    assert_eq!(svc.cluster_ip, None);
    assert_eq!(svc.ports.as_ref().unwrap()[0].port, 8080);

    assert_eq!(plan.slices.len(), 2);
    for (slice, cluster, count) in [
        (&plan.slices[0], "cluster-b", 2),
        (&plan.slices[1], "cluster-c", 1),
    ] {
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_SERVICE_NAME], "hello");
        assert_eq!(labels[LABEL_SOURCE_CLUSTER], cluster);
        assert_eq!(labels[SERVICE_NAME_LABEL], derived);
        assert_eq!(labels[SLICE_MANAGED_BY_LABEL], SLICE_MANAGED_BY);
        assert_eq!(slice.endpoints.len(), count);
        assert_eq!(slice_ports(slice), [("http".to_owned(), 8080)]);
        assert_eq!(
            slice.metadata.name.as_deref(),
            Some(format!("{derived}-{cluster}-0").as_str())
        );
    }
}

#[test]
fn port_conflict_oldest_wins_and_the_loser_slice_has_no_port() {
    let exports = [
        export("cluster-c", 20, &[port("http", 9090)], &["10.3.0.5"]),
        export("cluster-b", 10, &[port("http", 8080)], &["10.2.0.5"]),
    ];
    let plan = plan(
        &exports,
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let conflict = &plan.conflicts[&ObjectKey::new("demo", "hello")];
    assert_eq!(conflict.reason(), "PortConflict");
    assert_eq!(
        conflict.clusters,
        ["cluster-b", "cluster-c"],
        "every exporter, oldest first"
    );
    assert!(
        conflict.message.contains("9090") && conflict.message.contains("8080"),
        "{}",
        conflict.message
    );
    assert_eq!(
        plan.imports[0].spec.as_ref().unwrap().ports,
        [port("http", 8080)]
    );
    let by_cluster = slices_by_cluster(&plan);
    assert_eq!(
        slice_ports(by_cluster["cluster-b"]),
        [("http".to_owned(), 8080)]
    );
    assert!(
        slice_ports(by_cluster["cluster-c"]).is_empty(),
        "C's pods must not get the port"
    );
}

#[test]
fn ports_are_merged_by_name_then_protocol_and_number() {
    let c = export(
        "cluster-c",
        20,
        &[port("http", 8080), port("grpc", 9000)],
        &["10.3.0.5"],
    );
    let udp = ServicePort {
        protocol: Some("UDP".into()),
        ..port("dns", 8080)
    };
    let d = export(
        "cluster-d",
        30,
        &[port("web", 8080), udp.clone()],
        &["10.4.0.5"],
    );
    let exports = [
        export("cluster-b", 10, &[port("http", 8080)], &["10.2.0.5"]),
        c,
        d,
    ];
    let plan = plan(
        &exports,
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let spec = plan.imports[0].spec.as_ref().unwrap();
    // D's "web" is http's 8080/TCP under another name: refused. 8080/UDP is another port.
    assert_eq!(spec.ports, [port("http", 8080), port("grpc", 9000), udp]);
    assert_eq!(
        plan.conflicts[&ObjectKey::new("demo", "hello")].reason(),
        "PortConflict"
    );
    let by_cluster = slices_by_cluster(&plan);
    assert_eq!(
        slice_ports(by_cluster["cluster-b"]),
        [("http".to_owned(), 8080)]
    );
    assert_eq!(
        slice_ports(by_cluster["cluster-c"]),
        [("grpc".to_owned(), 9000), ("http".to_owned(), 8080)]
    );
    assert_eq!(
        slice_ports(by_cluster["cluster-d"]),
        [("dns".to_owned(), 8080)],
        "D's pods get the port it contributed, not the refused one"
    );
}

#[test]
fn type_and_affinity_come_from_the_oldest_export() {
    let mut b = export("cluster-b", 10, &[port("http", 8080)], &["10.2.0.5"]);
    b.session_affinity = Some("ClientIP".into());
    b.session_affinity_config = Some(affinity_config(300));
    b.internal_traffic_policy = Some("Local".into());
    let mut c = export("cluster-c", 20, &[port("http", 8080)], &["10.3.0.5"]);
    c.type_ = ServiceImportType::Headless;
    c.ip_families = vec!["IPv6".into()];
    let plan = plan(
        &[c, b],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let conflict = &plan.conflicts[&ObjectKey::new("demo", "hello")];
    assert_eq!(
        conflict.reason(),
        "TypeConflict,SessionAffinityConflict,InternalTrafficPolicyConflict,IPFamilyConflict"
    );
    let spec = plan.imports[0].spec.as_ref().unwrap();
    assert_eq!(spec.type_, ServiceImportType::ClusterSetIP);
    assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
    assert_eq!(spec.session_affinity_config, Some(affinity_config(300)));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(spec.ip_families.as_deref(), Some(&["IPv4".to_owned()][..]));
    // The losing type still serves: its endpoints are imported.
    assert_eq!(plan.slices.len(), 2);
}

#[test]
fn same_affinity_other_timeout_is_a_config_conflict() {
    let mut b = export("cluster-b", 10, &[port("http", 8080)], &[]);
    b.session_affinity = Some("ClientIP".into());
    let mut c = b.clone();
    c.cluster = "cluster-c".into();
    c.export_created = at(20);
    c.session_affinity_config = Some(affinity_config(60));
    let plan = plan(
        &[b, c],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    assert_eq!(
        plan.conflicts[&ObjectKey::new("demo", "hello")].reason(),
        "SessionAffinityConfigConflict"
    );
    // The oldest had no config: the default timeout, written out.
    let spec = plan.imports[0].spec.as_ref().unwrap();
    assert_eq!(
        spec.session_affinity_config,
        Some(affinity_config(DEFAULT_AFFINITY_TIMEOUT))
    );
}

#[test]
fn equal_creation_times_are_ordered_by_cluster_name() {
    let exports = [
        export("cluster-z", 10, &[port("http", 1)], &[]),
        export("cluster-a", 10, &[port("http", 2)], &[]),
    ];
    let plan = plan(
        &exports,
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    assert_eq!(
        plan.imports[0].spec.as_ref().unwrap().ports,
        [port("http", 2)]
    );
    assert_eq!(
        plan.conflicts[&ObjectKey::new("demo", "hello")].clusters,
        ["cluster-a", "cluster-z"]
    );
}

#[test]
fn headless_import_has_no_vip_and_keeps_hostnames() {
    let mut b = export("cluster-b", 10, &[port("http", 8080)], &["10.2.0.5"]);
    b.type_ = ServiceImportType::Headless;
    b.endpoint_slices[0].endpoints[0].hostname = Some("web-0".into());
    b.endpoint_slices[0].endpoints[0].node_name = Some("node-1".into());
    b.endpoint_slices[0].endpoints[0].zone = Some("z1".into());
    let existing = Existing {
        services: BTreeMap::from([(
            ObjectKey::new("demo", derived_name("demo", "hello")),
            ExistingService {
                cluster_ips: vec!["None".into()],
                ip_families: vec!["IPv4".into()],
            },
        )]),
        ..Existing::default()
    };
    let plan = plan(&[b], &namespaces(), &existing, &Unreachable::new());
    let spec = plan.imports[0].spec.as_ref().unwrap();
    assert_eq!(spec.type_, ServiceImportType::Headless);
    assert_eq!(spec.ips, None);
    let svc = plan.services[0].spec.as_ref().unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc.cluster_ips.as_deref(), Some(&["None".to_owned()][..]));
    assert!(plan.replace_services.is_empty());
    let endpoint = &plan.slices[0].endpoints[0];
    assert_eq!(endpoint.hostname.as_deref(), Some("web-0"));
    assert_eq!(endpoint.zone.as_deref(), Some("z1"));
    assert_eq!(
        endpoint.node_name, None,
        "a remote node name means nothing here"
    );
}

#[test]
fn endpoint_conditions_are_carried() {
    let mut b = export(
        "cluster-b",
        10,
        &[port("http", 8080)],
        &["10.2.0.5", "10.2.0.6"],
    );
    b.endpoint_slices[0].endpoints[1].ready = Some(false);
    b.endpoint_slices[0].endpoints[1].serving = Some(true);
    b.endpoint_slices[0].endpoints[1].terminating = Some(true);
    let plan = plan(
        &[b],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let conditions: Vec<_> = plan.slices[0]
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap();
            (e.addresses[0].as_str(), c.ready, c.serving, c.terminating)
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("10.2.0.5", Some(true), Some(true), Some(false)),
            ("10.2.0.6", Some(false), Some(true), Some(true)),
        ]
    );
}

#[test]
fn endpoints_on_unreachable_nodes_are_neither_ready_nor_serving() {
    let mut b = export(
        "cluster-b",
        10,
        &[port("http", 8080)],
        &["10.2.0.5", "10.2.0.6"],
    );
    b.endpoint_slices[0].endpoints[0].node_name = Some("b1".into());
    b.endpoint_slices[0].endpoints[1].node_name = Some("b2".into());
    let mut c = export("cluster-c", 20, &[port("http", 8080)], &["10.3.0.5"]);
    // The same node name in another cluster is another node.
    c.endpoint_slices[0].endpoints[0].node_name = Some("b1".into());
    let down = Unreachable::from([("cluster-b".to_owned(), "b1".to_owned())]);
    let plan = plan(&[b, c], &namespaces(), &Existing::default(), &down);
    let conditions: Vec<_> = plan
        .slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .map(|e| {
            let c = e.conditions.clone().unwrap();
            (e.addresses[0].as_str(), c.ready, c.serving)
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("10.2.0.5", Some(false), Some(false)),
            ("10.2.0.6", Some(true), Some(true)),
            ("10.3.0.5", Some(true), Some(true)),
        ]
    );
    // Empty: as published.
    let mut b = export("cluster-b", 10, &[port("http", 8080)], &["10.2.0.5"]);
    b.endpoint_slices[0].endpoints[0].node_name = Some("b1".into());
    let again = super::plan(
        &[b],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let c = again.slices[0].endpoints[0].conditions.clone().unwrap();
    assert_eq!((c.ready, c.serving), (Some(true), Some(true)));
}

#[test]
fn vip_of_the_existing_derived_service_is_kept() {
    let derived = ObjectKey::new("demo", derived_name("demo", "hello"));
    let existing = Existing {
        imports: BTreeSet::from([ObjectKey::new("demo", "hello")]),
        services: BTreeMap::from([(
            derived.clone(),
            ExistingService {
                cluster_ips: vec!["10.96.0.42".into()],
                ip_families: vec!["IPv4".into()],
            },
        )]),
        slices: BTreeSet::new(),
    };
    let plan = plan(
        &[export("cluster-b", 10, &[port("http", 8080)], &[])],
        &namespaces(),
        &existing,
        &Unreachable::new(),
    );
    assert_eq!(
        plan.imports[0].spec.as_ref().unwrap().ips,
        Some(vec!["10.96.0.42".to_owned()])
    );
    let svc = plan.services[0].spec.as_ref().unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("10.96.0.42"));
    assert!(plan.delete_imports.is_empty() && plan.delete_services.is_empty());

    // Made headless: the Service is replaced, and the old VIP is not promised.
    let mut headless = export("cluster-b", 10, &[port("http", 8080)], &[]);
    headless.type_ = ServiceImportType::Headless;
    let plan = super::plan(&[headless], &namespaces(), &existing, &Unreachable::new());
    assert_eq!(plan.replace_services, [derived]);
    assert_eq!(plan.imports[0].spec.as_ref().unwrap().ips, None);
}

#[test]
fn no_namespace_no_import_but_conflicts_still_count() {
    let exports = [
        export("cluster-b", 10, &[port("http", 8080)], &["10.2.0.5"]),
        export("cluster-c", 20, &[port("http", 9090)], &["10.3.0.5"]),
    ];
    let existing = Existing {
        imports: BTreeSet::from([ObjectKey::new("demo", "hello")]),
        services: BTreeMap::from([(
            ObjectKey::new("demo", derived_name("demo", "hello")),
            ExistingService::default(),
        )]),
        slices: BTreeSet::from([ObjectKey::new("demo", "old-slice")]),
    };
    let plan = plan(
        &exports,
        &BTreeSet::from(["other".to_owned()]),
        &existing,
        &Unreachable::new(),
    );
    assert!(plan.imports.is_empty() && plan.services.is_empty() && plan.slices.is_empty());
    assert_eq!(
        plan.conflicts.len(),
        1,
        "exporters still need their Conflict condition"
    );
    assert_eq!(plan.delete_imports, [ObjectKey::new("demo", "hello")]);
    assert_eq!(plan.delete_services.len(), 1);
    assert_eq!(plan.delete_slices, [ObjectKey::new("demo", "old-slice")]);
}

#[test]
fn unexport_deletes_import_service_and_slices() {
    let first = plan(
        &[export(
            "cluster-b",
            10,
            &[port("http", 8080)],
            &["10.2.0.5"],
        )],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let existing = applied(&first);
    let second = plan(&[], &namespaces(), &existing, &Unreachable::new());
    assert!(second.imports.is_empty());
    assert_eq!(second.delete_imports, [ObjectKey::new("demo", "hello")]);
    assert_eq!(
        second.delete_services,
        [ObjectKey::new("demo", derived_name("demo", "hello"))]
    );
    assert_eq!(second.delete_slices.len(), 1);
}

#[test]
fn many_endpoints_are_split_into_slices_of_a_hundred() {
    let addresses: Vec<String> = (0..250)
        .map(|i| format!("10.2.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let plan = plan(
        &[export("cluster-b", 10, &[port("http", 8080)], &refs)],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let sizes: Vec<_> = plan.slices.iter().map(|s| s.endpoints.len()).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let names: BTreeSet<_> = plan
        .slices
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names.len(), 3);
}

#[test]
fn malformed_exports_are_rejected_naming_the_field() {
    let mut bad_cluster = export("Cluster_B", 10, &[port("http", 8080)], &[]);
    bad_cluster.name = "hello".into();
    let mut bad_port = export(
        "cluster-c",
        20,
        &[port("http", 0), port("ok", 80)],
        &["10.3.0.5", "not-an-ip", "fd00::1"],
    );
    bad_port.ports.push(ServicePort {
        protocol: Some("ICMP".into()),
        ..port("icmp", 7)
    });
    let mut bad_type = export("cluster-d", 30, &[port("ok", 80)], &["10.4.0.1"]);
    bad_type.endpoint_slices[0].address_type = "Bogus".into();
    let twice = export("cluster-c", 40, &[port("ok", 80)], &[]);
    let plan = plan(
        &[bad_cluster, bad_port, bad_type, twice],
        &namespaces(),
        &Existing::default(),
        &Unreachable::new(),
    );
    let fields: Vec<_> = plan
        .rejected
        .iter()
        .map(|r| (r.cluster.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("Cluster_B", "cluster"),
            ("cluster-c", "cluster"),
            ("cluster-c", "endpointSlices[0].endpoints[1].addresses[0]"),
            ("cluster-c", "endpointSlices[0].endpoints[2].addresses[0]"),
            ("cluster-c", "ports[0].port"),
            ("cluster-c", "ports[2].protocol"),
            ("cluster-d", "endpointSlices[0].addressType"),
        ]
    );
    // What is left is still imported.
    let spec = plan.imports[0].spec.as_ref().unwrap();
    assert_eq!(spec.ports, [port("ok", 80)]);
    assert_eq!(clusters(&plan.imports[0]), ["cluster-c", "cluster-d"]);
    let addresses: Vec<_> = plan
        .slices
        .iter()
        .flat_map(|s| s.endpoints.iter().map(|e| e.addresses[0].clone()))
        .collect();
    assert_eq!(addresses, ["10.3.0.5"]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plans_never_panic_keep_vips_and_slices_carry_only_their_clusters_ports(
        first in prop::collection::vec(arb_export(), 0..8),
        changes in prop::collection::vec(arb_export(), 0..8),
        present in prop::collection::btree_set(prop::sample::select(vec!["demo", "other"]), 0..3),
    ) {
        let namespaces: BTreeSet<String> = present.iter().map(|s| (*s).to_owned()).collect();
        let one = plan(&first, &namespaces, &Existing::default(), &Unreachable::new());
        check_slices(&first, &one)?;

        // Re-plan after the API server allocated VIPs, with other endpoints and ports but
        // the same types: every VIP stays.
        let existing = applied(&one);
        let again: Vec<ExportedService> = first
            .iter()
            .map(|e| {
                let other = changes.iter().find(|c| c.cluster == e.cluster).unwrap_or(e);
                ExportedService { ports: other.ports.clone(), endpoint_slices: other.endpoint_slices.clone(), ..e.clone() }
            })
            .collect();
        let two = plan(&again, &namespaces, &existing, &Unreachable::new());
        check_slices(&again, &two)?;
        prop_assert!(two.replace_services.is_empty());
        for import in &two.imports {
            let spec = import.spec.as_ref().unwrap();
            let derived = ObjectKey::new(import.metadata.namespace.clone().unwrap(), derived_name(
                import.metadata.namespace.as_deref().unwrap(), import.metadata.name.as_deref().unwrap()));
            let vip = existing.services.get(&derived).map(|s| s.cluster_ips.clone());
            match spec.type_ {
                ServiceImportType::ClusterSetIP => prop_assert_eq!(spec.ips.clone(), vip),
                ServiceImportType::Headless => prop_assert_eq!(spec.ips.clone(), None),
            }
        }
        // Applying the same plan twice deletes nothing.
        let three = plan(&again, &namespaces, &applied(&two), &Unreachable::new());
        prop_assert!(three.delete_imports.is_empty() && three.delete_services.is_empty() && three.delete_slices.is_empty());
    }
}

/// Every slice's ports are ports its source cluster exported and the import carries
/// identically; every slice belongs to an import.
fn check_slices(exports: &[ExportedService], plan: &Plan) -> Result<(), TestCaseError> {
    for slice in &plan.slices {
        let labels = slice.metadata.labels.as_ref().unwrap();
        let (service, cluster) = (&labels[LABEL_SERVICE_NAME], &labels[LABEL_SOURCE_CLUSTER]);
        let namespace = slice.metadata.namespace.as_ref().unwrap();
        let import = plan.imports.iter().find(|i| {
            i.metadata.name.as_ref() == Some(service)
                && i.metadata.namespace.as_ref() == Some(namespace)
        });
        prop_assert!(import.is_some());
        let import_ports = &import.unwrap().spec.as_ref().unwrap().ports;
        let export = exports
            .iter()
            .find(|e| &e.cluster == cluster && &e.name == service && &e.namespace == namespace)
            .unwrap();
        for p in slice.ports.iter().flatten() {
            let contributed = export.ports.iter().any(|e| {
                let protocol = e.protocol.clone().or(Some("TCP".into()));
                let normalized = ServicePort {
                    protocol: protocol.clone(),
                    ..e.clone()
                };
                e.name == p.name && protocol == p.protocol && import_ports.contains(&normalized)
            });
            prop_assert!(
                contributed,
                "{cluster} slice has {p:?}: not a port it gave the import"
            );
        }
        prop_assert!(slice.endpoints.len() <= MAX_ENDPOINTS_PER_SLICE);
        let name = slice.metadata.name.as_deref().unwrap();
        prop_assert!(is_dns_subdomain(name), "{name}");
    }
    Ok(())
}

fn arb_export() -> impl Strategy<Value = ExportedService> {
    let port = (
        prop::sample::select(vec!["", "http", "grpc", "Bad"]),
        prop::sample::select(vec![0, 80, 8080, 70_000]),
        prop::sample::select(vec![None, Some("TCP"), Some("UDP"), Some("XTP")]),
    )
        .prop_map(|(name, number, protocol)| ServicePort {
            name: Some(name.to_owned()).filter(|n| !n.is_empty()),
            protocol: protocol.map(str::to_owned),
            app_protocol: None,
            port: number,
        });
    let endpoint = (
        prop::sample::select(vec!["10.2.0.1", "10.2.0.2", "fd00::1", "x"]),
        any::<Option<bool>>(),
        prop::option::of(prop::sample::select(vec!["web-0", "web-1"])),
    )
        .prop_map(|(address, ready, hostname)| ExportedEndpoint {
            addresses: vec![address.to_owned()],
            ready,
            hostname: hostname.map(str::to_owned),
            ..ExportedEndpoint::default()
        });
    (
        prop::sample::select(vec!["cluster-a", "cluster-b", "cluster-c", "Bad!"]),
        prop::sample::select(vec!["demo", "other"]),
        prop::sample::select(vec!["hello", "world"]),
        0..4i64,
        any::<bool>(),
        prop::collection::vec(port, 0..4),
        prop::sample::select(vec!["IPv4", "IPv6", "FQDN", "Bogus"]),
        prop::collection::vec(endpoint, 0..5),
        prop::sample::subsequence(vec!["http", "grpc", "Bad"], 0..3),
        prop::option::of(prop::sample::select(vec!["ClientIP", "None"])),
    )
        .prop_map(
            |(
                cluster,
                namespace,
                name,
                created,
                headless,
                ports,
                address_type,
                endpoints,
                slice_ports,
                affinity,
            )| {
                ExportedService {
                    cluster: cluster.to_owned(),
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    export_created: at(created),
                    type_: if headless {
                        ServiceImportType::Headless
                    } else {
                        ServiceImportType::ClusterSetIP
                    },
                    ports,
                    session_affinity: affinity.map(str::to_owned),
                    session_affinity_config: None,
                    ip_families: vec!["IPv4".to_owned()],
                    internal_traffic_policy: None,
                    traffic_distribution: None,
                    endpoint_slices: vec![ExportedSlice {
                        address_type: address_type.to_owned(),
                        ports: slice_ports.iter().map(|n| endpoint_port(n, 8080)).collect(),
                        endpoints,
                    }],
                }
            },
        )
}

/// The objects `plan` leaves, with a VIP allocated to each non-headless Service.
fn applied(plan: &Plan) -> Existing {
    let key = |m: &ObjectMeta| {
        ObjectKey::new(
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    Existing {
        imports: plan.imports.iter().map(|i| key(&i.metadata)).collect(),
        services: plan
            .services
            .iter()
            .enumerate()
            .map(|(n, s)| {
                let spec = s.spec.clone().unwrap_or_default();
                let cluster_ips = spec
                    .cluster_ips
                    .unwrap_or_else(|| vec![format!("10.96.0.{}", n + 1)]);
                (
                    key(&s.metadata),
                    ExistingService {
                        cluster_ips,
                        ip_families: vec!["IPv4".into()],
                    },
                )
            })
            .collect(),
        slices: plan.slices.iter().map(|s| key(&s.metadata)).collect(),
    }
}

fn export(
    cluster: &str,
    created: i64,
    ports: &[ServicePort],
    addresses: &[&str],
) -> ExportedService {
    ExportedService {
        cluster: cluster.into(),
        namespace: "demo".into(),
        name: "hello".into(),
        export_created: at(created),
        type_: ServiceImportType::ClusterSetIP,
        ports: ports.to_vec(),
        session_affinity: None,
        session_affinity_config: None,
        ip_families: vec!["IPv4".into()],
        internal_traffic_policy: None,
        traffic_distribution: None,
        endpoint_slices: vec![ExportedSlice {
            address_type: "IPv4".into(),
            ports: ports
                .iter()
                .map(|p| EndpointPort {
                    protocol: p.protocol.clone(),
                    ..endpoint_port(p.name.as_deref().unwrap_or(""), p.port)
                })
                .collect(),
            endpoints: addresses
                .iter()
                .map(|a| ExportedEndpoint {
                    addresses: vec![(*a).to_owned()],
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                    ..ExportedEndpoint::default()
                })
                .collect(),
        }],
    }
}

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        protocol: Some("TCP".into()),
        app_protocol: None,
        port: number,
    }
}

/// The source slice's port for service port `name` (target port = service port here).
fn endpoint_port(name: &str, service_port: i32) -> EndpointPort {
    EndpointPort {
        name: Some(name.to_owned()).filter(|n| !n.is_empty()),
        protocol: Some("TCP".into()),
        port: Some(service_port),
        app_protocol: None,
    }
}

fn namespaces() -> BTreeSet<String> {
    BTreeSet::from(["demo".to_owned()])
}

fn clusters(import: &ServiceImport) -> Vec<String> {
    import
        .status
        .as_ref()
        .unwrap()
        .clusters
        .clone()
        .unwrap()
        .into_iter()
        .map(|c| c.cluster)
        .collect()
}

fn slice_ports(slice: &EndpointSlice) -> Vec<(String, i32)> {
    slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or_default(),
            )
        })
        .collect()
}

fn slices_by_cluster(plan: &Plan) -> BTreeMap<&str, &EndpointSlice> {
    plan.slices
        .iter()
        .map(|s| {
            (
                s.metadata.labels.as_ref().unwrap()[LABEL_SOURCE_CLUSTER].as_str(),
                s,
            )
        })
        .collect()
}

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(1_750_000_000 + seconds).unwrap())
}
