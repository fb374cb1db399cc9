//! What a linked cluster may claim in its `MeshServiceExport`s, checked before anything
//! of it reaches the import plan. The peer is untrusted: an export is refused whole, with
//! the field at fault named, when it speaks for another cluster or namespace/name than
//! its object's name, when a name or hostname is not a DNS label, when it is over the
//! bounds below, or when an endpoint address lies outside the pod CIDRs the peer was
//! granted at join time or inside one of this cluster's own ranges. The peer's other
//! exports are kept.
//!
//! A peer whose pod CIDRs are translated (issue 14) publishes its endpoints in its own
//! pod space: each is checked against its grant there, then mapped into its mesh CIDR,
//! which is what the admitted export carries and what this cluster's own ranges are
//! checked against (its pods may well use the same pod CIDR as ours).
//!
//! Pure: objects in, admitted exports and refusals out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use wiremesh_proto::crd::{MeshServiceExport, mesh_service_export_name};
use wiremesh_proto::mcs::ExportedService;
use wiremesh_proto::{IpCidr, PrefixMap, Towards};

/// Most exports kept from one peer cluster; the rest (by name) are refused.
pub const MAX_EXPORTS_PER_PEER: usize = 1_000;
/// Most ports of one exported service: an EndpointSlice holds at most 100 (its schema's
/// `maxItems`).
pub const MAX_PORTS: usize = 100;
/// Most source slices of one export.
pub const MAX_SLICES: usize = 100;
/// Most endpoints of one export, all slices together: the EndpointSlice controller's
/// `--max-endpoints-per-slice` ceiling (1,000) times one; an export is one object of the
/// peer's etcd, which caps it anyway.
pub const MAX_ENDPOINTS: usize = 1_000;
/// Most addresses of one endpoint: Kubernetes uses one (the API allows 100).
pub const MAX_ADDRESSES: usize = 1;
/// Largest export kept, serialized (the API server's etcd limit is 1.5 MiB).
pub const MAX_EXPORT_BYTES: usize = 1 << 20;

/// What a peer cluster was granted, and this cluster's own ranges.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// The peer's cluster name (its PeerCluster's `clusterName`).
    pub cluster: String,
    /// The pod CIDRs it was allowed at join time.
    pub pod_cidrs: Vec<IpCidr>,
    /// Its translation, when its pod CIDRs are translated: each allowed pod CIDR with
    /// its mesh CIDR. Empty: its endpoints are admitted as they are.
    pub maps: Vec<PrefixMap>,
    /// This cluster's pod, service and mesh CIDRs: no peer endpoint may lie in them.
    pub ours: Vec<IpCidr>,
}

/// A refused export.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refusal {
    /// The MeshServiceExport's name.
    pub object: String,
    /// The field at fault, such as `spec.service.endpointSlices[0].endpoints[1].addresses[0]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// What was kept of a peer's exports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admitted {
    /// By object name.
    pub services: BTreeMap<String, ExportedService>,
    /// Refused, by object name.
    pub refused: Vec<Refusal>,
}

/// Checks every export of a peer; `objects` may come in any order.
pub fn admit(grant: &Grant, objects: &[MeshServiceExport]) -> Admitted {
    let mut out = Admitted::default();
    let mut sorted: Vec<&MeshServiceExport> = objects.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for object in sorted {
        let name = object.metadata.name.clone().unwrap_or_default();
        if out.services.len() >= MAX_EXPORTS_PER_PEER {
            out.refused.push(Refusal {
                object: name,
                field: "metadata.name".to_owned(),
                reason: format!("more than {MAX_EXPORTS_PER_PEER} exports from one cluster"),
            });
            continue;
        }
        let mut service = object.spec.service.clone();
        match check(grant, &name, &mut service) {
            Ok(()) => {
                out.services.insert(name, service);
            }
            Err((field, reason)) => out.refused.push(Refusal {
                object: name,
                field: format!("spec.service.{field}"),
                reason,
            }),
        }
    }
    out
}

/// Checks `s` and maps its endpoints into the peer's mesh CIDRs when it is translated.
fn check(grant: &Grant, object: &str, s: &mut ExportedService) -> Result<(), (String, String)> {
    let fail = |field: &str, reason: String| Err((field.to_owned(), reason));
    if s.cluster != grant.cluster {
        return fail(
            "cluster",
            format!(
                "{:?} is not the linked cluster {:?}",
                s.cluster, grant.cluster
            ),
        );
    }
    for (field, value) in [("namespace", &s.namespace), ("name", &s.name)] {
        if !is_dns_label(value) {
            return fail(field, format!("{value:?} is not a DNS label"));
        }
    }
    let expected = mesh_service_export_name(&s.namespace, &s.name);
    if object != expected {
        return fail(
            "name",
            format!("object {object:?} publishes {expected:?}; refused"),
        );
    }
    let size = serde_json::to_vec(s).map_or(usize::MAX, |v| v.len());
    if size > MAX_EXPORT_BYTES {
        return fail(
            "endpointSlices",
            format!("{size} bytes, over {MAX_EXPORT_BYTES}"),
        );
    }
    if s.ports.len() > MAX_PORTS {
        return fail(
            "ports",
            format!("{} ports, over {MAX_PORTS}", s.ports.len()),
        );
    }
    if s.endpoint_slices.len() > MAX_SLICES {
        return fail(
            "endpointSlices",
            format!("{} slices, over {MAX_SLICES}", s.endpoint_slices.len()),
        );
    }
    let endpoints: usize = s.endpoint_slices.iter().map(|e| e.endpoints.len()).sum();
    if endpoints > MAX_ENDPOINTS {
        return fail(
            "endpointSlices",
            format!("{endpoints} endpoints, over {MAX_ENDPOINTS}"),
        );
    }
    for (i, slice) in s.endpoint_slices.iter_mut().enumerate() {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            return fail(
                &format!("endpointSlices[{i}].addressType"),
                format!("{:?}: only IPv4 and IPv6 are imported", slice.address_type),
            );
        }
        if slice.ports.len() > MAX_PORTS {
            return fail(
                &format!("endpointSlices[{i}].ports"),
                format!("{} ports, over {MAX_PORTS}", slice.ports.len()),
            );
        }
        for (j, endpoint) in slice.endpoints.iter_mut().enumerate() {
            let at = format!("endpointSlices[{i}].endpoints[{j}]");
            if endpoint.addresses.len() > MAX_ADDRESSES {
                return fail(
                    &format!("{at}.addresses"),
                    format!(
                        "{} addresses, over {MAX_ADDRESSES}",
                        endpoint.addresses.len()
                    ),
                );
            }
            for (k, address) in endpoint.addresses.iter_mut().enumerate() {
                let field = format!("{at}.addresses[{k}]");
                let Ok(ip) = address.parse::<IpAddr>() else {
                    return fail(&field, format!("{address:?} is not an IP address"));
                };
                if !grant.pod_cidrs.iter().any(|c| c.contains(ip)) {
                    return fail(
                        &field,
                        format!(
                            "{ip} lies outside the pod CIDRs {} was granted ({})",
                            grant.cluster,
                            grant
                                .pod_cidrs
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                let mapped = match grant.maps.iter().find(|m| m.pod().contains(ip)) {
                    None => ip,
                    Some(m) => match m.map(ip, Towards::Mesh) {
                        Ok(Some(mapped)) => mapped,
                        Ok(None) | Err(_) => {
                            return fail(
                                &field,
                                format!("{ip} cannot be mapped into mesh CIDR {}", m.mesh()),
                            );
                        }
                    },
                };
                if let Some(cidr) = grant.ours.iter().find(|c| c.contains(mapped)) {
                    return fail(&field, format!("{mapped} lies in this cluster's {cidr}"));
                }
                *address = mapped.to_string();
            }
            if let Some(h) = &endpoint.hostname
                && !is_dns_label(h)
            {
                return fail(
                    &format!("{at}.hostname"),
                    format!("{h:?} is not a DNS label"),
                );
            }
            if let Some(n) = &endpoint.node_name
                && !is_dns_subdomain(n)
            {
                return fail(
                    &format!("{at}.nodeName"),
                    format!("{n:?} is not a DNS subdomain"),
                );
            }
            if let Some(z) = &endpoint.zone
                && !is_label_value(z)
            {
                return fail(&format!("{at}.zone"), format!("{z:?} is not a label value"));
            }
        }
    }
    Ok(())
}

/// RFC 1123 label: 1 to 63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_dns_label(s: &str) -> bool {
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

/// A label value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use wiremesh_proto::crd::MeshServiceExportSpec;
    use wiremesh_proto::mcs::{ExportedEndpoint, ExportedSlice, ServiceImportType};

    use super::*;

    #[test]
    fn honest_exports_are_kept() {
        let a = admit(&grant(), &[object("demo", "hello", &["10.2.1.5"])]);
        assert!(a.refused.is_empty(), "{a:?}");
        assert_eq!(a.services.keys().collect::<Vec<_>>(), ["demo.hello"]);
    }

    #[test]
    fn endpoint_outside_the_grant_is_refused_and_the_rest_kept() {
        let a = admit(
            &grant(),
            &[
                object("demo", "evil", &["10.2.1.5", "10.9.0.1"]),
                object("demo", "hello", &["10.2.1.6"]),
            ],
        );
        assert_eq!(a.services.keys().collect::<Vec<_>>(), ["demo.hello"]);
        let [r] = a.refused.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(r.object, "demo.evil");
        assert_eq!(
            r.field,
            "spec.service.endpointSlices[0].endpoints[1].addresses[0]"
        );
        assert!(r.reason.contains("10.9.0.1"), "{}", r.reason);
    }

    #[test]
    fn our_own_ranges_are_refused_even_inside_the_grant() {
        let mut g = grant();
        g.ours = vec!["10.2.9.0/24".parse().unwrap()];
        let a = admit(&g, &[object("demo", "hello", &["10.2.9.9"])]);
        assert!(a.refused[0].reason.contains("this cluster"), "{a:?}");
    }

    #[test]
    fn another_cluster_name_or_object_name_is_refused() {
        let mut spoof = object("demo", "hello", &["10.2.1.5"]);
        spoof.spec.service.cluster = "cluster-c".into();
        let mut renamed = object("demo", "other", &["10.2.1.5"]);
        renamed.metadata.name = Some("kube-system.other".into());
        let mut label = object("demo", "hello", &["10.2.1.5"]);
        label.spec.service.endpoint_slices[0].endpoints[0].hostname = Some("Web_0".into());
        let fields = |o: MeshServiceExport| admit(&grant(), &[o]).refused[0].field.clone();
        assert_eq!(fields(spoof), "spec.service.cluster");
        assert_eq!(fields(renamed), "spec.service.name");
        assert_eq!(
            fields(label),
            "spec.service.endpointSlices[0].endpoints[0].hostname"
        );
    }

    #[test]
    fn counts_are_bounded() {
        let many: Vec<String> = (0..=MAX_ENDPOINTS)
            .map(|i| format!("10.2.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let a = admit(&grant(), &[object("demo", "big", &refs)]);
        assert_eq!(a.refused[0].field, "spec.service.endpointSlices");
        let objects: Vec<_> = (0..=MAX_EXPORTS_PER_PEER)
            .map(|i| object("demo", &format!("s{i}"), &[]))
            .collect();
        let a = admit(&grant(), &objects);
        assert_eq!(a.services.len(), MAX_EXPORTS_PER_PEER);
        assert_eq!(a.refused.len(), 1);
    }

    #[test]
    fn a_translated_peers_endpoints_are_checked_in_its_pod_space_then_mapped() {
        // Both clusters use 10.244.0.0/16; cluster-b is 100.65.0.0/16 in the mesh, and
        // this cluster 100.64.0.0/16.
        let pods = "10.244.0.0/16".parse().unwrap();
        let g = Grant {
            cluster: "cluster-b".into(),
            pod_cidrs: vec![pods],
            maps: vec![PrefixMap::new(pods, "100.65.0.0/16".parse().unwrap()).unwrap()],
            ours: ["10.244.0.0/16", "10.96.0.0/12", "100.64.0.0/16"]
                .iter()
                .map(|c| c.parse().unwrap())
                .collect(),
        };
        let a = admit(
            &g,
            &[
                object("demo", "hello", &["10.244.1.7"]),
                // Already a mesh address: outside its pod space.
                object("demo", "mesh", &["100.65.1.7"]),
                object("demo", "ours", &["100.64.1.7"]),
            ],
        );
        let hello = &a.services["demo.hello"];
        assert_eq!(
            hello.endpoint_slices[0].endpoints[0].addresses,
            ["100.65.1.7"]
        );
        assert_eq!(a.services.len(), 1, "{a:?}");
        assert_eq!(a.refused.len(), 2);
        assert!(
            a.refused.iter().all(|r| r.reason.contains("outside")),
            "{a:?}"
        );
    }

    fn grant() -> Grant {
        Grant {
            cluster: "cluster-b".into(),
            pod_cidrs: vec!["10.2.0.0/16".parse().unwrap()],
            maps: Vec::new(),
            ours: vec!["10.1.0.0/16".parse().unwrap()],
        }
    }

    fn object(namespace: &str, name: &str, addresses: &[&str]) -> MeshServiceExport {
        MeshServiceExport::new(
            &mesh_service_export_name(namespace, name),
            MeshServiceExportSpec {
                service: ExportedService {
                    cluster: "cluster-b".into(),
                    namespace: namespace.into(),
                    name: name.into(),
                    export_created: Time(Timestamp::from_second(1_750_000_000).unwrap()),
                    type_: ServiceImportType::ClusterSetIP,
                    ports: Vec::new(),
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
}
