//! Decide, then act: from every cluster's exported services (this cluster's too), the
//! local namespaces and what this cluster already holds, the `ServiceImport`s, derived
//! Services and EndpointSlices to apply and to delete, and the conflicts the exporting
//! clusters set on their `ServiceExport`s.
//!
//! Pure: no I/O and no clock. KEP-1645's rules ("Constraints and Conflict Resolution"):
//! - A service is the exports of one namespace and name across clusters, ordered by the
//!   export's `creationTimestamp`, oldest first (ties broken by cluster name).
//! - Whole-service properties (type, session affinity and its config, internal traffic
//!   policy, traffic distribution, IP families) come from the oldest export; an export
//!   that differs is a conflict.
//! - Ports are the union of every export's ports, merged by name, then by protocol and
//!   port: an export whose port reuses a name for another (port, protocol, appProtocol),
//!   or another name for a taken (protocol, port), loses that port to the older one.
//! - Each source cluster gets its own EndpointSlices, carrying only the ports its export
//!   contributed to the import, so a losing port never reaches that cluster's pods.
//! - Every exporting cluster sees the same conflicts (the plan is deterministic), so each
//!   sets `Conflict` on its own export: every exporter's, not only the newest's.
//!
//! The derived Service is named as upstream's controller names it
//! (`derived-` + 10 base32hex characters of SHA-256 of `<namespace>/<name>`). Its VIP is
//! the API server's to allocate: the plan keeps the one the existing Service has, and the
//! import's `ips` are that Service's, so a VIP lives as long as the import (a type change
//! between headless and not is the one exception: the Service is replaced).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort as CoreServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest as _, Sha256};
use wiremesh_proto::mcs::{
    ClusterStatus, ConflictReason, DERIVED_SERVICE_ANNOTATION, EndpointSliceObjects,
    ExportedEndpoint, ExportedService, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, ServiceImport,
    ServiceImportSpec, ServiceImportStatus, ServiceImportType, ServicePort,
};

/// Label on every object this plan writes (`app.kubernetes.io/managed-by`).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "wiremesh-mcs";
/// `endpointslice.kubernetes.io/managed-by`: the EndpointSlice controller leaves slices
/// with another value alone.
pub const SLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value for it (a label value: no `/`).
pub const SLICE_MANAGED_BY: &str = "mcs-controller.wiremesh.io";
/// `kubernetes.io/service-name`: the Service kube-proxy attaches a slice to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Most endpoints per EndpointSlice, the EndpointSlice controller's default
/// (`--max-endpoints-per-slice`); the API allows 1,000.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// KEP-1645/Kubernetes default ClientIP affinity timeout (`core/v1` `timeoutSeconds`).
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10_800;

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ObjectKey {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A derived Service as it exists here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExistingService {
    /// `spec.clusterIPs` (`["None"]` when headless; empty before allocation).
    pub cluster_ips: Vec<String>,
    /// `spec.ipFamilies`.
    pub ip_families: Vec<String>,
}

impl ExistingService {
    fn headless(&self) -> bool {
        self.cluster_ips.iter().any(|ip| ip == "None")
    }
}

/// What this cluster holds that the plan manages (listed by [`MANAGED_BY_LABEL`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Existing {
    /// `ServiceImport`s.
    pub imports: BTreeSet<ObjectKey>,
    /// Derived Services, by namespace and (derived) name.
    pub services: BTreeMap<ObjectKey, ExistingService>,
    /// Imported EndpointSlices.
    pub slices: BTreeSet<ObjectKey>,
}

/// What to do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// `ServiceImport`s to apply (spec, then status), sorted by namespace and name.
    pub imports: Vec<ServiceImport>,
    /// Derived Services to apply, in the same order.
    pub services: Vec<Service>,
    /// Derived Services to delete before they are applied again: their type changed
    /// between headless and not, and `clusterIP` cannot change in place.
    pub replace_services: Vec<ObjectKey>,
    /// EndpointSlices to apply, sorted by namespace and name.
    pub slices: Vec<EndpointSlice>,
    /// `ServiceImport`s to delete (unexported everywhere, or namespace gone).
    pub delete_imports: Vec<ObjectKey>,
    /// Derived Services to delete.
    pub delete_services: Vec<ObjectKey>,
    /// EndpointSlices to delete.
    pub delete_slices: Vec<ObjectKey>,
    /// Services whose exports disagree, whatever the local namespaces: each exporting
    /// cluster sets `Conflict` on its own export from this.
    pub conflicts: BTreeMap<ObjectKey, ServiceConflict>,
    /// Exports (or parts) that were ignored because they are malformed.
    pub rejected: Vec<Rejected>,
}

/// Why a multi-cluster service's exports conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConflict {
    /// The conflicts, in upstream's order.
    pub reasons: BTreeSet<ConflictReason>,
    /// The clusters exporting the service, oldest export first.
    pub clusters: Vec<String>,
    /// What differs and which export won, for people.
    pub message: String,
}

impl ServiceConflict {
    /// The condition reason: upstream's reasons joined with commas.
    pub fn reason(&self) -> String {
        self.reasons
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A malformed export, or a malformed part of one, that the plan ignored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejected {
    /// The exporting cluster.
    pub cluster: String,
    /// The service's namespace/name as given.
    pub service: String,
    /// The field at fault, such as `ports[1].port`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The derived Service's name for the import `namespace/name`: upstream's
/// (`pkg/controllers/common.go`: `"derived-"` + the first 10 characters of the lowercase,
/// unpadded base32hex of SHA-256 of `"<namespace>/<name>"`).
pub fn derived_name(namespace: &str, name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    // 10 characters of 5 bits: the top 50 bits of the first 7 bytes.
    let mut bits: u64 = 0;
    for byte in digest.iter().take(7) {
        bits = (bits << 8) | u64::from(*byte);
    }
    let mut out = String::with_capacity(18);
    out.push_str("derived-");
    for i in 0..10 {
        let index = (bits >> (56 - 5 * (i + 1))) & 0x1f;
        // Lossless: index < 32.
        out.push(char::from(ALPHABET[index as usize]));
    }
    out
}

/// Remote nodes the local agents cannot reach, as `(cluster, node)`: the endpoints they
/// host are imported with `ready` and `serving` false, whatever their own cluster says
/// (failover from the data plane; empty: every endpoint as its cluster publishes it).
pub type Unreachable = BTreeSet<(String, String)>;

/// Computes the plan. `exports` may come in any order and from every cluster;
/// `namespaces` are this cluster's (an import exists only where its namespace does);
/// `unreachable` nodes' endpoints are imported not ready.
pub fn plan(
    exports: &[ExportedService],
    namespaces: &BTreeSet<String>,
    existing: &Existing,
    unreachable: &Unreachable,
) -> Plan {
    let mut out = Plan::default();
    let mut services: BTreeMap<ObjectKey, Vec<Valid<'_>>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for export in exports {
        let Some(valid) = validate(export, &mut out.rejected) else {
            continue;
        };
        if !seen.insert((
            export.cluster.as_str(),
            export.namespace.as_str(),
            export.name.as_str(),
        )) {
            out.rejected.push(reject(
                export,
                "cluster",
                "exported twice by the same cluster; the first kept",
            ));
            continue;
        }
        services
            .entry(ObjectKey::new(&export.namespace, &export.name))
            .or_default()
            .push(valid);
    }

    let mut wanted_imports = BTreeSet::new();
    let mut wanted_services = BTreeSet::new();
    let mut wanted_slices = BTreeSet::new();
    for (key, mut members) in services {
        members.sort_by(|a, b| {
            (a.export.export_created.0, &a.export.cluster)
                .cmp(&(b.export.export_created.0, &b.export.cluster))
        });
        let merged = merge(&members);
        if !merged.conflict.reasons.is_empty() {
            out.conflicts.insert(key.clone(), merged.conflict.clone());
        }
        if !namespaces.contains(&key.namespace) {
            continue;
        }
        let derived = ObjectKey::new(&key.namespace, derived_name(&key.namespace, &key.name));
        let current = existing.services.get(&derived);
        let headless = merged.type_ == ServiceImportType::Headless;
        if current.is_some_and(|c| c.headless() != headless) {
            out.replace_services.push(derived.clone());
        }
        // A replaced Service gets a new VIP: do not promise the old one.
        let current = current.filter(|c| c.headless() == headless);
        let endpoint_slices = slices(&key, &derived.name, &members, &merged, unreachable);
        out.imports.push(import(
            &key,
            &derived.name,
            &merged,
            current,
            !endpoint_slices.is_empty(),
        ));
        out.services
            .push(service(&key, &derived.name, &merged, current));
        wanted_imports.insert(key);
        wanted_services.insert(derived);
        for slice in endpoint_slices {
            wanted_slices.insert(ObjectKey::new(
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            ));
            out.slices.push(slice);
        }
    }
    out.delete_imports = existing
        .imports
        .difference(&wanted_imports)
        .cloned()
        .collect();
    out.delete_services = existing
        .services
        .keys()
        .filter(|k| !wanted_services.contains(*k))
        .cloned()
        .collect();
    out.delete_slices = existing
        .slices
        .difference(&wanted_slices)
        .cloned()
        .collect();
    out.slices.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    out.rejected.sort();
    out
}

/// An export that passed validation, with its ports normalized (protocol `TCP` when
/// absent) and its endpoints' bad addresses dropped.
struct Valid<'a> {
    export: &'a ExportedService,
    ports: Vec<ServicePort>,
}

/// The service as imported.
struct Merged {
    type_: ServiceImportType,
    session_affinity: String,
    /// ClientIP timeout, when the affinity is ClientIP.
    affinity_timeout: Option<i32>,
    ip_families: Vec<String>,
    internal_traffic_policy: Option<String>,
    traffic_distribution: Option<String>,
    ports: Vec<ServicePort>,
    /// Per cluster, the (name, protocol) of the ports it contributed.
    contributed: BTreeMap<String, BTreeSet<(String, String)>>,
    clusters: BTreeSet<String>,
    conflict: ServiceConflict,
}

fn merge(members: &[Valid<'_>]) -> Merged {
    let mut merged = Merged {
        type_: ServiceImportType::ClusterSetIP,
        session_affinity: "None".to_owned(),
        affinity_timeout: None,
        ip_families: Vec::new(),
        internal_traffic_policy: None,
        traffic_distribution: None,
        ports: Vec::new(),
        contributed: BTreeMap::new(),
        clusters: BTreeSet::new(),
        conflict: ServiceConflict {
            reasons: BTreeSet::new(),
            clusters: members.iter().map(|m| m.export.cluster.clone()).collect(),
            message: String::new(),
        },
    };
    let mut notes = Vec::new();
    let Some(oldest) = members.first() else {
        return merged;
    };
    let winner = &oldest.export.cluster;
    merged.type_ = oldest.export.type_;
    merged.session_affinity = affinity(oldest.export);
    merged.affinity_timeout = affinity_timeout(oldest.export);
    merged.ip_families = oldest.export.ip_families.clone();
    merged.internal_traffic_policy = oldest.export.internal_traffic_policy.clone();
    merged.traffic_distribution = oldest.export.traffic_distribution.clone();

    for member in members {
        let export = member.export;
        let cluster = &export.cluster;
        merged.clusters.insert(cluster.clone());
        let mut differs = |reason: ConflictReason, what: &str, ours: String, theirs: String| {
            if ours != theirs {
                merged.conflict.reasons.insert(reason);
                notes.push(format!(
                    "{cluster} has {what} {theirs}, {winner} (oldest) {ours}"
                ));
            }
        };
        differs(
            ConflictReason::Type,
            "type",
            format!("{:?}", merged.type_),
            format!("{:?}", export.type_),
        );
        differs(
            ConflictReason::SessionAffinity,
            "session affinity",
            merged.session_affinity.clone(),
            affinity(export),
        );
        if affinity(export) == merged.session_affinity {
            differs(
                ConflictReason::SessionAffinityConfig,
                "ClientIP timeout",
                format!("{:?}", merged.affinity_timeout),
                format!("{:?}", affinity_timeout(export)),
            );
        }
        differs(
            ConflictReason::InternalTrafficPolicy,
            "internal traffic policy",
            merged
                .internal_traffic_policy
                .clone()
                .unwrap_or_else(|| "Cluster".to_owned()),
            export
                .internal_traffic_policy
                .clone()
                .unwrap_or_else(|| "Cluster".to_owned()),
        );
        differs(
            ConflictReason::TrafficDistribution,
            "traffic distribution",
            format!("{:?}", merged.traffic_distribution),
            format!("{:?}", export.traffic_distribution),
        );
        let families = |f: &[String]| f.iter().cloned().collect::<BTreeSet<_>>();
        differs(
            ConflictReason::IpFamily,
            "IP families",
            format!("{:?}", families(&merged.ip_families)),
            format!("{:?}", families(&export.ip_families)),
        );

        let contributed = merged.contributed.entry(cluster.clone()).or_default();
        for port in &member.ports {
            let name = port.name.clone().unwrap_or_default();
            let protocol = port.protocol.clone().unwrap_or_default();
            let same_name = merged
                .ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == name);
            let same_number = merged
                .ports
                .iter()
                .find(|p| p.port == port.port && p.protocol == port.protocol);
            match (same_name, same_number) {
                (Some(taken), _) if taken != port => {
                    merged.conflict.reasons.insert(ConflictReason::Port);
                    notes.push(format!(
                        "{cluster} has port {} as {}, an older export as {}",
                        show_name(&name),
                        show_port(port),
                        show_port(taken)
                    ));
                }
                (Some(_), _) => {
                    contributed.insert((name, protocol));
                }
                (None, Some(taken)) => {
                    merged.conflict.reasons.insert(ConflictReason::Port);
                    notes.push(format!(
                        "{cluster} names {} {}, an older export {}",
                        show_port(port),
                        show_name(&name),
                        show_name(&taken.name.clone().unwrap_or_default())
                    ));
                }
                (None, None) => {
                    merged.ports.push(port.clone());
                    contributed.insert((name, protocol));
                }
            }
        }
    }
    notes.dedup();
    merged.conflict.message = notes.join("; ");
    merged
}

fn affinity(export: &ExportedService) -> String {
    match export.session_affinity.as_deref() {
        Some("ClientIP") => "ClientIP".to_owned(),
        _ => "None".to_owned(),
    }
}

fn affinity_timeout(export: &ExportedService) -> Option<i32> {
    (affinity(export) == "ClientIP").then(|| {
        export
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    })
}

fn show_name(name: &str) -> String {
    if name.is_empty() {
        "(unnamed)".to_owned()
    } else {
        format!("{name:?}")
    }
}

fn show_port(port: &ServicePort) -> String {
    let mut text = format!(
        "{}/{}",
        port.port,
        port.protocol.as_deref().unwrap_or("TCP")
    );
    if let Some(app) = &port.app_protocol {
        text.push_str(&format!(" ({app})"));
    }
    text
}

fn import(
    key: &ObjectKey,
    derived: &str,
    merged: &Merged,
    current: Option<&ExistingService>,
    has_slices: bool,
) -> ServiceImport {
    let headless = merged.type_ == ServiceImportType::Headless;
    let ips = current
        .filter(|_| !headless)
        .map(|c| c.cluster_ips.clone())
        .filter(|ips| !ips.is_empty());
    let ip_families = current
        .map(|c| c.ip_families.clone())
        .filter(|f| !f.is_empty())
        .or_else(|| Some(merged.ip_families.clone()).filter(|f| !f.is_empty()));
    ServiceImport {
        metadata: ObjectMeta {
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                DERIVED_SERVICE_ANNOTATION.to_owned(),
                derived.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceImportSpec {
            ports: merged.ports.clone(),
            ips,
            type_: merged.type_,
            session_affinity: Some(merged.session_affinity.clone()),
            session_affinity_config: merged.affinity_timeout.map(affinity_config),
            ip_families,
            internal_traffic_policy: merged.internal_traffic_policy.clone(),
            traffic_distribution: merged.traffic_distribution.clone(),
        }),
        status: Some(ServiceImportStatus {
            endpoint_slice_objects: Some(if has_slices {
                EndpointSliceObjects::Present
            } else {
                EndpointSliceObjects::Absent
            }),
            clusters: Some(
                merged
                    .clusters
                    .iter()
                    .map(|cluster| ClusterStatus {
                        cluster: cluster.clone(),
                    })
                    .collect(),
            ),
            conditions: None,
        }),
    }
}

fn affinity_config(timeout: i32) -> SessionAffinityConfig {
    SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(timeout),
        }),
    }
}

fn service(
    key: &ObjectKey,
    derived: &str,
    merged: &Merged,
    current: Option<&ExistingService>,
) -> Service {
    let headless = merged.type_ == ServiceImportType::Headless;
    let cluster_ips = if headless {
        Some(vec!["None".to_owned()])
    } else {
        current
            .map(|c| c.cluster_ips.clone())
            .filter(|ips| !ips.is_empty())
    };
    let families = current
        .map(|c| c.ip_families.clone())
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| merged.ip_families.clone());
    let family_policy = match families.len() {
        0 => None,
        1 => Some("SingleStack".to_owned()),
        _ => Some("PreferDualStack".to_owned()),
    };
    Service {
        metadata: ObjectMeta {
            name: Some(derived.to_owned()),
            namespace: Some(key.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (LABEL_SERVICE_NAME.to_owned(), key.name.clone()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            cluster_ip: cluster_ips.as_ref().and_then(|ips| ips.first().cloned()),
            cluster_ips,
            ports: Some(
                merged
                    .ports
                    .iter()
                    .map(|p| CoreServicePort {
                        name: p.name.clone(),
                        protocol: p.protocol.clone(),
                        app_protocol: p.app_protocol.clone(),
                        port: p.port,
                        ..CoreServicePort::default()
                    })
                    .collect::<Vec<_>>(),
            )
            .filter(|p| !p.is_empty()),
            session_affinity: Some(merged.session_affinity.clone()),
            session_affinity_config: merged.affinity_timeout.map(affinity_config),
            ip_families: Some(families).filter(|f| !f.is_empty()),
            ip_family_policy: family_policy,
            internal_traffic_policy: merged.internal_traffic_policy.clone(),
            traffic_distribution: merged.traffic_distribution.clone(),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Each source cluster's EndpointSlices: its endpoints grouped by address type and port
/// set, [`MAX_ENDPOINTS_PER_SLICE`] a slice, with only the ports it contributed.
fn slices(
    key: &ObjectKey,
    derived: &str,
    members: &[Valid<'_>],
    merged: &Merged,
    unreachable: &Unreachable,
) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for member in members {
        let cluster = &member.export.cluster;
        let contributed = merged.contributed.get(cluster);
        let mut groups: BTreeMap<(String, Vec<PortKey>), BTreeSet<ExportedEndpoint>> =
            BTreeMap::new();
        for slice in &member.export.endpoint_slices {
            let Some(family) = AddressFamily::parse(&slice.address_type) else {
                continue;
            };
            let ports: Vec<PortKey> = slice
                .ports
                .iter()
                .filter(|p| {
                    let name = p.name.clone().unwrap_or_default();
                    let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
                    contributed.is_some_and(|c| c.contains(&(name, protocol)))
                })
                .map(PortKey::from)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let group = groups
                .entry((slice.address_type.clone(), ports))
                .or_default();
            for endpoint in &slice.endpoints {
                let addresses: Vec<String> = endpoint
                    .addresses
                    .iter()
                    .filter(|a| family.accepts(a))
                    .cloned()
                    .collect();
                if !addresses.is_empty() {
                    group.insert(ExportedEndpoint {
                        addresses,
                        ..endpoint.clone()
                    });
                }
            }
        }
        let mut index = 0;
        for ((address_type, ports), endpoints) in groups {
            let endpoints: Vec<_> = endpoints.into_iter().collect();
            for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
                out.push(EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some(format!("{derived}-{cluster}-{index}")),
                        namespace: Some(key.namespace.clone()),
                        labels: Some(BTreeMap::from([
                            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                            (LABEL_SERVICE_NAME.to_owned(), key.name.clone()),
                            (LABEL_SOURCE_CLUSTER.to_owned(), cluster.clone()),
                            (SERVICE_NAME_LABEL.to_owned(), derived.to_owned()),
                            (
                                SLICE_MANAGED_BY_LABEL.to_owned(),
                                SLICE_MANAGED_BY.to_owned(),
                            ),
                        ])),
                        ..ObjectMeta::default()
                    },
                    address_type: address_type.clone(),
                    endpoints: chunk
                        .iter()
                        .map(|e| {
                            let down = e.node_name.as_ref().is_some_and(|node| {
                                unreachable.contains(&(cluster.clone(), node.clone()))
                            });
                            endpoint(e, down)
                        })
                        .collect(),
                    ports: Some(ports.iter().map(PortKey::to_endpoint_port).collect()),
                });
                index += 1;
            }
        }
    }
    out
}

/// The local Endpoint for a remote one (`down`: its node cannot be reached from here, so
/// neither ready nor serving). `nodeName` is left out: a remote node's name means nothing
/// here, and one equal to a local node's would make kube-proxy treat the endpoint as
/// local (internalTrafficPolicy `Local`, topology).
fn endpoint(remote: &ExportedEndpoint, down: bool) -> Endpoint {
    Endpoint {
        addresses: remote.addresses.clone(),
        conditions: Some(EndpointConditions {
            ready: if down { Some(false) } else { remote.ready },
            serving: if down { Some(false) } else { remote.serving },
            terminating: remote.terminating,
        }),
        hostname: remote.hostname.clone(),
        zone: remote.zone.clone(),
        ..Endpoint::default()
    }
}

/// An EndpointPort as an ordered key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey {
    name: Option<String>,
    protocol: String,
    port: Option<i32>,
    app_protocol: Option<String>,
}

impl From<&EndpointPort> for PortKey {
    fn from(p: &EndpointPort) -> Self {
        Self {
            name: p.name.clone().filter(|n| !n.is_empty()),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            port: p.port,
            app_protocol: p.app_protocol.clone(),
        }
    }
}

impl PortKey {
    fn to_endpoint_port(&self) -> EndpointPort {
        EndpointPort {
            name: self.name.clone(),
            protocol: Some(self.protocol.clone()),
            port: self.port,
            app_protocol: self.app_protocol.clone(),
        }
    }
}

#[derive(Clone, Copy)]
enum AddressFamily {
    V4,
    V6,
    Fqdn,
}

impl AddressFamily {
    fn parse(address_type: &str) -> Option<Self> {
        match address_type {
            "IPv4" => Some(Self::V4),
            "IPv6" => Some(Self::V6),
            "FQDN" => Some(Self::Fqdn),
            _ => None,
        }
    }

    fn accepts(self, address: &str) -> bool {
        match self {
            Self::V4 => address.parse::<Ipv4Addr>().is_ok(),
            Self::V6 => address.parse::<Ipv6Addr>().is_ok(),
            Self::Fqdn => is_dns_subdomain(address),
        }
    }
}

/// Checks an export; a malformed one (or part) is recorded in `rejected`. Returns the
/// export with its ports normalized, or `None` when it cannot be imported at all.
fn validate<'a>(export: &'a ExportedService, rejected: &mut Vec<Rejected>) -> Option<Valid<'a>> {
    for (field, value) in [
        ("cluster", &export.cluster),
        ("namespace", &export.namespace),
        ("name", &export.name),
    ] {
        if !is_dns_label(value) {
            rejected.push(reject(
                export,
                field,
                &format!("{value:?} is not a DNS label"),
            ));
            return None;
        }
    }
    if export.ip_families.len() > 2
        || export
            .ip_families
            .iter()
            .any(|f| f != "IPv4" && f != "IPv6")
    {
        rejected.push(reject(
            export,
            "ipFamilies",
            &format!("{:?}: at most IPv4 and IPv6", export.ip_families),
        ));
        return None;
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(export.ports.len());
    for (i, port) in export.ports.iter().enumerate() {
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
        let problem = if !(1..=65_535).contains(&port.port) {
            Some(("port", format!("{} is not a port number", port.port)))
        } else if !["TCP", "UDP", "SCTP"].contains(&protocol.as_str()) {
            Some(("protocol", format!("{protocol:?} is not TCP, UDP or SCTP")))
        } else if port
            .name
            .as_deref()
            .is_some_and(|n| !n.is_empty() && !is_dns_label(n))
        {
            Some(("name", format!("{:?} is not a DNS label", port.name)))
        } else {
            None
        };
        let normalized = ServicePort {
            name: port.name.clone().filter(|n| !n.is_empty()),
            protocol: Some(protocol),
            ..port.clone()
        };
        let duplicate = ports.iter().any(|p| {
            p.name.clone().unwrap_or_default() == normalized.name.clone().unwrap_or_default()
                || (p.port == normalized.port && p.protocol == normalized.protocol)
        });
        match problem {
            Some((field, reason)) => {
                rejected.push(reject(export, &format!("ports[{i}].{field}"), &reason))
            }
            None if duplicate => rejected.push(reject(
                export,
                &format!("ports[{i}]"),
                "repeats the name or number of an earlier port",
            )),
            None => ports.push(normalized),
        }
    }
    for (s, slice) in export.endpoint_slices.iter().enumerate() {
        let Some(family) = AddressFamily::parse(&slice.address_type) else {
            rejected.push(reject(
                export,
                &format!("endpointSlices[{s}].addressType"),
                &format!("{:?} is not IPv4, IPv6 or FQDN", slice.address_type),
            ));
            continue;
        };
        for (e, endpoint) in slice.endpoints.iter().enumerate() {
            for (a, address) in endpoint.addresses.iter().enumerate() {
                if !family.accepts(address) {
                    rejected.push(reject(
                        export,
                        &format!("endpointSlices[{s}].endpoints[{e}].addresses[{a}]"),
                        &format!("{address:?} is not an {} address", slice.address_type),
                    ));
                }
            }
        }
    }
    Some(Valid { export, ports })
}

fn reject(export: &ExportedService, field: &str, reason: &str) -> Rejected {
    Rejected {
        cluster: export.cluster.clone(),
        service: format!("{}/{}", export.namespace, export.name),
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

/// RFC 1123 label: 1 to 63 of `[a-z0-9-]`, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// RFC 1123 subdomain: labels joined by dots, 253 characters at most.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests;
