//! The Multi-Cluster Services API (KEP-1645, `sigs.k8s.io/mcs-api` v0.5.2): group
//! `multicluster.x-k8s.io`, version `v1beta1` ([`ServiceExport`], [`ServiceImport`]), and
//! the About API's [`ClusterProperty`] (KEP-2149, `about.k8s.io/v1alpha1`).
//!
//! The CRDs are upstream's, shipped unchanged in `deploy/helm/wiremesh/crds/`; these types
//! are written by hand to match them (a test checks every upstream property against them),
//! so no generator ever rewrites upstream's YAML. Condition types and reasons are
//! upstream's exact strings (`pkg/apis/v1beta1/serviceexport.go`, `serviceimport.go`).
//!
//! Unlike kube's `CustomResource` derive, a `ServiceExport` without `spec` parses: that is
//! how most are written (`kubectl apply` of a name and a namespace).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::SessionAffinityConfig;
use k8s_openapi::api::discovery::v1::EndpointPort;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use serde::ser::SerializeStruct as _;
use serde::{Deserialize, Serialize};

/// The MCS API group.
pub const GROUP: &str = "multicluster.x-k8s.io";
/// The MCS API version these types speak (upstream's storage version).
pub const VERSION: &str = "v1beta1";
/// The About API group (KEP-2149).
pub const ABOUT_GROUP: &str = "about.k8s.io";
/// The About API version written: v1alpha1 is served by every release of its CRD.
pub const ABOUT_VERSION: &str = "v1alpha1";
/// The `ClusterProperty` holding this cluster's ID in the ClusterSet (KEP-2149).
pub const CLUSTER_ID_PROPERTY: &str = "cluster.clusterset.k8s.io";

/// Label on an imported EndpointSlice: the multi-cluster service (the `ServiceImport`'s
/// name) it belongs to (upstream `LabelServiceName`).
pub const LABEL_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
/// Label on an imported EndpointSlice: the cluster its endpoints live in (upstream
/// `LabelSourceCluster`).
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
/// Annotation on a `ServiceImport`: the name of its derived Service (upstream's
/// `DerivedServiceAnnotation`, `pkg/controllers/common.go`).
pub const DERIVED_SERVICE_ANNOTATION: &str = "multicluster.kubernetes.io/derived-service";
/// Label on each of the MCS CRDs: the mcs-api release it comes from.
pub const RELEASE_VERSION_LABEL: &str = "multicluster.x-k8s.io/release-version";
/// Label on each of the MCS CRDs: the schema revision within a release.
pub const SCHEMA_REVISION_LABEL: &str = "multicluster.x-k8s.io/crd-schema-revision";

/// `ServiceExport` declares that the Service with the same name and namespace as this
/// export should be consumable from other clusters.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ServiceExport {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What to export besides the Service (optional for implementations).
    #[serde(default)]
    pub spec: ServiceExportSpec,
    /// The export's conditions, written by the implementation.
    #[serde(default)]
    pub status: Option<ServiceExportStatus>,
}

/// `ServiceExport.spec`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExportSpec {
    /// Labels exported with the service. Optional for implementations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_labels: Option<BTreeMap<String, String>>,
    /// Annotations exported with the service. Optional for implementations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_annotations: Option<BTreeMap<String, String>>,
}

/// `ServiceExport.status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ServiceExportStatus {
    /// `Valid`, `Ready`, `Conflict` ([`ExportCondition`]), a list-map keyed on `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}

/// `ServiceImport` describes a service imported from clusters in a ClusterSet.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ServiceImport {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The imported service (absent only in an object someone else wrote badly).
    #[serde(default)]
    pub spec: Option<ServiceImportSpec>,
    /// Which clusters it comes from, and its conditions.
    #[serde(default)]
    pub status: Option<ServiceImportStatus>,
}

/// `ServiceImport.spec`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// The ports of the multi-cluster service.
    pub ports: Vec<ServicePort>,
    /// The VIPs when the type is `ClusterSetIP` (at most two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<String>>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: ServiceImportType,
    /// `ClientIP` or `None` (the default); ignored when headless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// Client IP affinity's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `IPv4`, `IPv6` (at most two, no duplicate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_families: Option<Vec<String>>,
    /// `Cluster` or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// A hint such as `PreferClose`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
}

/// The type of a `ServiceImport`.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    schemars::JsonSchema,
)]
pub enum ServiceImportType {
    /// Reached through the ClusterSet IP (a VIP).
    #[default]
    ClusterSetIP,
    /// No VIP: the backends are addressed directly.
    Headless,
}

/// One port of a `ServiceImport`.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// A DNS label, unique within the service; optional with a single port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// An application protocol hint, such as `http` or `kubernetes.io/h2c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// The port the service is reached at.
    pub port: i32,
}

/// `ServiceImport.status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportStatus {
    /// Whether imported EndpointSlices are present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_slice_objects: Option<EndpointSliceObjects>,
    /// The exporting clusters, a list-map keyed on `cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<Vec<ClusterStatus>>,
    /// `Ready` ([`IMPORT_READY`]), a list-map keyed on `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}

/// Whether imported EndpointSlice objects exist for a `ServiceImport`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointSliceObjects {
    /// They do.
    Present,
    /// They do not.
    Absent,
}

/// One exporting cluster of a `ServiceImport`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterStatus {
    /// The exporting cluster's name (a DNS label).
    pub cluster: String,
}

/// `ClusterProperty` (KEP-2149): a named, cluster-scoped fact about this cluster, such as
/// its ID in the ClusterSet ([`CLUSTER_ID_PROPERTY`]).
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ClusterProperty {
    /// Standard object metadata; the name is the property.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The property's value.
    pub spec: ClusterPropertySpec,
}

/// `ClusterProperty.spec`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterPropertySpec {
    /// The property-dependent string (at least one character).
    pub value: String,
}

/// What a cluster publishes about one of its exported services: all an importing cluster
/// needs to build its `ServiceImport`, derived Service and EndpointSlices, nothing more
/// (no selector, no pod names, no labels).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportedService {
    /// The exporting cluster (a DNS label).
    pub cluster: String,
    /// The Service's (and export's) namespace.
    pub namespace: String,
    /// The Service's (and export's) name.
    pub name: String,
    /// The `ServiceExport`'s `creationTimestamp`: the oldest export wins conflicts.
    pub export_created: Time,
    /// `Headless` when the Service's `clusterIP` is `None`.
    #[serde(rename = "type")]
    pub type_: ServiceImportType,
    /// The Service's ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `ClientIP` or `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// Client IP affinity's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// The Service's IP families, primary first.
    #[serde(default)]
    pub ip_families: Vec<String>,
    /// `Cluster` or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// A hint such as `PreferClose`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// The Service's endpoints, as its EndpointSlices group them.
    #[serde(default)]
    pub endpoint_slices: Vec<ExportedSlice>,
}

/// The endpoints of one source EndpointSlice.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportedSlice {
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// The slice's ports: the Service port's name, protocol and the target port number.
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<ExportedEndpoint>,
}

/// One endpoint (a pod) of an exported service.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ExportedEndpoint {
    /// Its addresses (one, in practice).
    pub addresses: Vec<String>,
    /// Ready to receive new connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Serving, even if terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    /// Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
    /// The pod's hostname (headless DNS names `<hostname>.<cluster>.<svc>...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Its zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The node hosting it, in its own cluster (to tell which tunnel it sits behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// The condition types of a `ServiceExport` and their reasons, upstream's strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExportCondition {
    /// `Valid`: the export names a Service that can be exported.
    Valid,
    /// `Ready`: the export is published.
    Ready,
    /// `Conflict`: the clusters exporting this service disagree on a property.
    Conflict,
}

impl ExportCondition {
    /// The condition's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "Valid",
            Self::Ready => "Ready",
            Self::Conflict => "Conflict",
        }
    }
}

/// `Valid=True`.
pub const REASON_VALID: &str = "Valid";
/// `Valid=False`: no Service of the export's name and namespace.
pub const REASON_NO_SERVICE: &str = "NoService";
/// `Valid=False`: the Service's type cannot be exported (ExternalName).
pub const REASON_INVALID_SERVICE_TYPE: &str = "InvalidServiceType";
/// `Ready=True`: the service has been exported.
pub const REASON_EXPORTED: &str = "Exported";
/// `Ready=True`, pull model.
pub const REASON_READY: &str = "Ready";
/// `Ready=False` or `Unknown`: being exported.
pub const REASON_PENDING: &str = "Pending";
/// `Ready=False`: the export failed (the message says why).
pub const REASON_FAILED: &str = "Failed";
/// `Conflict=False`.
pub const REASON_NO_CONFLICTS: &str = "NoConflicts";
/// `ServiceImport` condition `Ready`.
pub const IMPORT_READY: &str = "Ready";
/// `ServiceImport` `Ready=False`: the service's IP families are not supported here.
pub const REASON_IP_FAMILY_NOT_SUPPORTED: &str = "IPFamilyNotSupported";

/// A reason of `Conflict=True`; several are joined with commas, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictReason {
    /// The ports are not identical in all the constituent Services.
    Port,
    /// Headless and non-headless.
    Type,
    /// Session affinity.
    SessionAffinity,
    /// Session affinity config.
    SessionAffinityConfig,
    /// Exported labels.
    Labels,
    /// Exported annotations.
    Annotations,
    /// Internal traffic policy.
    InternalTrafficPolicy,
    /// Traffic distribution.
    TrafficDistribution,
    /// IP families.
    IpFamily,
}

impl ConflictReason {
    /// Upstream's reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Port => "PortConflict",
            Self::Type => "TypeConflict",
            Self::SessionAffinity => "SessionAffinityConflict",
            Self::SessionAffinityConfig => "SessionAffinityConfigConflict",
            Self::Labels => "LabelsConflict",
            Self::Annotations => "AnnotationsConflict",
            Self::InternalTrafficPolicy => "InternalTrafficPolicyConflict",
            Self::TrafficDistribution => "TrafficDistributionConflict",
            Self::IpFamily => "IPFamilyConflict",
        }
    }
}

macro_rules! resource {
    ($ty:ident, $group:literal, $version:literal, $plural:literal, $scope:ty, [$($field:ident),*]) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(stringify!($ty))
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        /// With `apiVersion` and `kind` (server-side apply needs them); empty parts left out.
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut s = serializer.serialize_struct(stringify!($ty), 5)?;
                s.serialize_field("apiVersion", concat!($group, "/", $version))?;
                s.serialize_field("kind", stringify!($ty))?;
                s.serialize_field("metadata", &self.metadata)?;
                $(resource!(@field s, self, $field);)*
                s.end()
            }
        }
    };
    (@field $s:ident, $self:ident, spec) => {
        $s.serialize_field("spec", &$self.spec)?;
    };
    (@field $s:ident, $self:ident, spec_or_default) => {
        if $self.spec != Default::default() {
            $s.serialize_field("spec", &$self.spec)?;
        }
    };
    (@field $s:ident, $self:ident, spec_if_some) => {
        if let Some(spec) = &$self.spec {
            $s.serialize_field("spec", spec)?;
        }
    };
    (@field $s:ident, $self:ident, status) => {
        if let Some(status) = &$self.status {
            $s.serialize_field("status", status)?;
        }
    };
}

resource!(
    ServiceExport,
    "multicluster.x-k8s.io",
    "v1beta1",
    "serviceexports",
    k8s_openapi::NamespaceResourceScope,
    [spec_or_default, status]
);
resource!(
    ServiceImport,
    "multicluster.x-k8s.io",
    "v1beta1",
    "serviceimports",
    k8s_openapi::NamespaceResourceScope,
    [spec_if_some, status]
);
resource!(
    ClusterProperty,
    "about.k8s.io",
    "v1alpha1",
    "clusterproperties",
    k8s_openapi::ClusterResourceScope,
    [spec]
);

#[cfg(test)]
mod tests;
