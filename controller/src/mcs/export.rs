//! The conditions the exporting cluster sets on a `ServiceExport`, as mcs-api v0.5.2
//! defines them (`pkg/apis/v1beta1/serviceexport.go`):
//! - `Valid`: False with `NoService` when no Service has the export's name, False with
//!   `InvalidServiceType` for an ExternalName Service (the KEP's one unexportable type),
//!   True with `Valid` otherwise;
//! - `Ready`: True with `Exported` once published, Unknown with `Pending` until then,
//!   False with `Failed` when the export is not valid;
//! - `Conflict` (valid exports only): True with the reasons of the import plan's conflict
//!   joined by commas, False with `NoConflicts`.
//!
//! Pure: the caller passes the export's current conditions and `now`; a condition's
//! `lastTransitionTime` changes only when its status does. [`exported`] is what the
//! cluster publishes about a valid export.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use wiremesh_proto::mcs::{
    ExportCondition, ExportedEndpoint, ExportedService, ExportedSlice, REASON_EXPORTED,
    REASON_FAILED, REASON_INVALID_SERVICE_TYPE, REASON_NO_CONFLICTS, REASON_NO_SERVICE,
    REASON_PENDING, REASON_VALID, ServiceExport, ServiceImportType, ServicePort,
};

use super::admit::MAX_ENDPOINTS;

/// What cluster `cluster` publishes about `export` of `service`, whose EndpointSlices
/// are `slices` (those labelled `kubernetes.io/service-name` with its name, in its
/// namespace): ports, type and properties, and the endpoints with their conditions,
/// hostname, zone and node. At most [`MAX_ENDPOINTS`] endpoints (what importers accept),
/// ready ones first. `None` when the export has no creation time yet.
pub fn exported(
    cluster: &str,
    export: &ServiceExport,
    service: &Service,
    slices: &[&EndpointSlice],
) -> Option<ExportedService> {
    let spec = service.spec.clone().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut budget = MAX_ENDPOINTS;
    let mut sorted: Vec<&&EndpointSlice> = slices.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut endpoint_slices = Vec::new();
    for slice in sorted {
        let mut endpoints: Vec<ExportedEndpoint> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                ExportedEndpoint {
                    addresses: e.addresses.clone(),
                    // Unset ready means ready (the EndpointSlice API).
                    ready: Some(c.ready.unwrap_or(true)),
                    serving: Some(c.serving.or(c.ready).unwrap_or(true)),
                    terminating: Some(c.terminating.unwrap_or(false)),
                    hostname: e.hostname.clone(),
                    zone: e.zone.clone(),
                    node_name: e.node_name.clone(),
                }
            })
            .collect();
        endpoints.sort_by_key(|e| (e.ready != Some(true), e.addresses.clone()));
        endpoints.truncate(budget);
        budget -= endpoints.len();
        endpoint_slices.push(ExportedSlice {
            address_type: slice.address_type.clone(),
            ports: slice.ports.clone().unwrap_or_default(),
            endpoints,
        });
    }
    Some(ExportedService {
        cluster: cluster.to_owned(),
        namespace: export.metadata.namespace.clone()?,
        name: export.metadata.name.clone()?,
        export_created: export.metadata.creation_timestamp.clone()?,
        type_: if headless {
            ServiceImportType::Headless
        } else {
            ServiceImportType::ClusterSetIP
        },
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| ServicePort {
                name: p.name,
                protocol: p.protocol,
                app_protocol: p.app_protocol,
                port: p.port,
            })
            .collect(),
        session_affinity: spec.session_affinity,
        session_affinity_config: spec.session_affinity_config,
        ip_families: spec.ip_families.unwrap_or_default(),
        internal_traffic_policy: spec.internal_traffic_policy,
        traffic_distribution: spec.traffic_distribution,
        endpoint_slices,
    })
}

use super::plan::ServiceConflict;

/// Whether a Service can be exported, with upstream's reason when it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validity {
    /// It can.
    Valid,
    /// It cannot: `(reason, message)`.
    Invalid(&'static str, String),
}

/// Checks the Service named by `export` (`None`: there is none).
pub fn validity(export: &ServiceExport, service: Option<&Service>) -> Validity {
    let name = format!(
        "{}/{}",
        export.metadata.namespace.as_deref().unwrap_or_default(),
        export.metadata.name.as_deref().unwrap_or_default()
    );
    match service {
        None => Validity::Invalid(REASON_NO_SERVICE, format!("Service {name} not found")),
        Some(s) if s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName") => {
            Validity::Invalid(
                REASON_INVALID_SERVICE_TYPE,
                format!("Service {name} is of type ExternalName, which cannot be exported"),
            )
        }
        Some(_) => Validity::Valid,
    }
}

/// The export's conditions: `Valid`, `Ready` and (when valid) `Conflict`, in that order;
/// other condition types already present are kept after them.
///
/// `published`: the export side has published the service to the other clusters.
/// `conflict`: the import plan's conflict for this service, if any.
pub fn conditions(
    export: &ServiceExport,
    service: Option<&Service>,
    conflict: Option<&ServiceConflict>,
    published: bool,
    now: &Time,
) -> Vec<Condition> {
    let previous = export
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = export.metadata.generation;
    let make = |type_: ExportCondition, status: &str, reason: &str, message: String| {
        let last = previous
            .iter()
            .find(|c| c.type_ == type_.as_str() && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.as_str().to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: last,
        }
    };
    let mut out = Vec::with_capacity(3);
    match validity(export, service) {
        Validity::Invalid(reason, message) => {
            out.push(make(
                ExportCondition::Valid,
                "False",
                reason,
                message.clone(),
            ));
            out.push(make(
                ExportCondition::Ready,
                "False",
                REASON_FAILED,
                format!("not exported: {message}"),
            ));
        }
        Validity::Valid => {
            out.push(make(
                ExportCondition::Valid,
                "True",
                REASON_VALID,
                "the Service can be exported".to_owned(),
            ));
            out.push(if published {
                make(
                    ExportCondition::Ready,
                    "True",
                    REASON_EXPORTED,
                    "published to the ClusterSet".to_owned(),
                )
            } else {
                make(
                    ExportCondition::Ready,
                    "Unknown",
                    REASON_PENDING,
                    "being published to the ClusterSet".to_owned(),
                )
            });
            out.push(match conflict {
                Some(c) => make(
                    ExportCondition::Conflict,
                    "True",
                    &c.reason(),
                    c.message.clone(),
                ),
                None => make(
                    ExportCondition::Conflict,
                    "False",
                    REASON_NO_CONFLICTS,
                    "every exporting cluster agrees".to_owned(),
                ),
            });
        }
    }
    let ours = [
        ExportCondition::Valid,
        ExportCondition::Ready,
        ExportCondition::Conflict,
    ];
    out.extend(
        previous
            .into_iter()
            .filter(|c| !ours.iter().any(|t| t.as_str() == c.type_)),
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;
    use wiremesh_proto::mcs::{ConflictReason, ServiceExportStatus};

    use super::*;

    #[test]
    fn missing_service_is_invalid_with_no_service() {
        let c = conditions(&export(None), None, None, true, &at(10));
        assert_eq!(
            summary(&c),
            [
                ("Valid", "False", "NoService"),
                ("Ready", "False", "Failed"),
            ]
        );
        assert!(c[0].message.contains("demo/hello"), "{}", c[0].message);
    }

    #[test]
    fn external_name_is_invalid_service_type() {
        let c = conditions(
            &export(None),
            Some(&service("ExternalName")),
            None,
            true,
            &at(10),
        );
        assert_eq!(summary(&c)[0], ("Valid", "False", "InvalidServiceType"));
        for ok in ["ClusterIP", "NodePort", "LoadBalancer"] {
            let c = conditions(&export(None), Some(&service(ok)), None, true, &at(10));
            assert_eq!(summary(&c)[0], ("Valid", "True", "Valid"), "{ok}");
        }
    }

    #[test]
    fn valid_export_is_pending_then_exported_without_conflict() {
        let svc = service("ClusterIP");
        let pending = conditions(&export(None), Some(&svc), None, false, &at(10));
        assert_eq!(
            summary(&pending),
            [
                ("Valid", "True", "Valid"),
                ("Ready", "Unknown", "Pending"),
                ("Conflict", "False", "NoConflicts"),
            ]
        );
        let ready = conditions(&export(Some(pending)), Some(&svc), None, true, &at(20));
        assert_eq!(summary(&ready)[1], ("Ready", "True", "Exported"));
        // Ready flipped at 20; Valid and Conflict did not.
        assert_eq!(ready[0].last_transition_time, at(10));
        assert_eq!(ready[1].last_transition_time, at(20));
        assert_eq!(ready[2].last_transition_time, at(10));
        assert!(ready.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn conflict_carries_every_reason_joined_by_commas() {
        let conflict = ServiceConflict {
            reasons: BTreeSet::from([ConflictReason::Type, ConflictReason::Port]),
            clusters: vec!["cluster-b".into(), "cluster-c".into()],
            message: "cluster-c has port \"http\" as 9090/TCP".into(),
        };
        let svc = service("ClusterIP");
        let c = conditions(&export(None), Some(&svc), Some(&conflict), true, &at(10));
        assert_eq!(
            summary(&c)[2],
            ("Conflict", "True", "PortConflict,TypeConflict")
        );
        assert!(c[2].message.contains("9090"));
        // Resolved: False from now on, with a new transition time.
        let c = conditions(&export(Some(c)), Some(&svc), None, true, &at(30));
        assert_eq!(summary(&c)[2], ("Conflict", "False", "NoConflicts"));
        assert_eq!(c[2].last_transition_time, at(30));
    }

    #[test]
    fn other_condition_types_are_kept_and_stale_conflict_dropped_when_invalid() {
        let mut foreign = conditions(
            &export(None),
            Some(&service("ClusterIP")),
            None,
            true,
            &at(1),
        );
        foreign.push(Condition {
            type_: "example.com/Audited".into(),
            status: "True".into(),
            reason: "Done".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: at(1),
        });
        let c = conditions(&export(Some(foreign)), None, None, true, &at(5));
        let types: Vec<_> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Valid", "Ready", "example.com/Audited"]);
    }

    #[test]
    fn exported_carries_ports_type_and_endpoint_conditions() {
        use k8s_openapi::api::core::v1::ServicePort as CorePort;
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

        let mut e = export(None);
        e.metadata.creation_timestamp = Some(at(1));
        let mut svc = service("ClusterIP");
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ip = Some("None".into());
        spec.ports = Some(vec![CorePort {
            name: Some("http".into()),
            port: 8080,
            protocol: Some("TCP".into()),
            ..CorePort::default()
        }]);
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                Endpoint {
                    addresses: vec!["10.2.0.6".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    }),
                    node_name: Some("b2".into()),
                    ..Endpoint::default()
                },
                Endpoint {
                    addresses: vec!["10.2.0.5".into()],
                    hostname: Some("web-0".into()),
                    zone: Some("z1".into()),
                    ..Endpoint::default()
                },
            ],
            ..EndpointSlice::default()
        };
        let out = exported("cluster-b", &e, &svc, &[&slice]).unwrap();
        assert_eq!(out.type_, ServiceImportType::Headless);
        assert_eq!(out.ports[0].port, 8080);
        assert_eq!(out.export_created, at(1));
        let endpoints = &out.endpoint_slices[0].endpoints;
        // Ready first; unset conditions mean ready and serving.
        assert_eq!(endpoints[0].addresses, ["10.2.0.5"]);
        assert_eq!(endpoints[0].ready, Some(true));
        assert_eq!(endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(
            (
                endpoints[1].ready,
                endpoints[1].serving,
                endpoints[1].terminating
            ),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(endpoints[1].node_name.as_deref(), Some("b2"));
        // No creation time yet: nothing to publish.
        assert!(exported("cluster-b", &export(None), &svc, &[]).is_none());
    }

    fn summary(c: &[Condition]) -> Vec<(&str, &str, &str)> {
        c.iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect()
    }

    fn export(conditions: Option<Vec<Condition>>) -> ServiceExport {
        ServiceExport {
            metadata: ObjectMeta {
                name: Some("hello".into()),
                namespace: Some("demo".into()),
                generation: Some(3),
                ..ObjectMeta::default()
            },
            status: conditions.map(|c| ServiceExportStatus {
                conditions: Some(c),
            }),
            ..ServiceExport::default()
        }
    }

    fn service(type_: &str) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(1_750_000_000 + seconds).unwrap())
    }
}
