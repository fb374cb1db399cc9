//! What "Wiremesh is installed in a cluster" means, and making it so: the three CRDs
//! (Established), the namespace `wiremesh-system`, and the ConfigMap
//! `wiremesh-system/wiremesh-cluster` that names the cluster and its pod CIDRs; also the
//! upstream MCS and About API CRDs (only when absent or older: [`crate::mcs::crds`]) and
//! the `ClusterProperty` `cluster.clusterset.k8s.io` naming the cluster.
//!
//! `meshctl install` calls [`install`]; `meshctl join` and the controller read the ConfigMap
//! back with [`cluster_info`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt as _};
use wiremesh_proto::IpCidr;
use wiremesh_proto::crd::{CLUSTER_CONFIGMAP, PeerCluster, SYSTEM_NAMESPACE};
use wiremesh_proto::mcs::{CLUSTER_ID_PROPERTY, ClusterProperty, ClusterPropertySpec};

use crate::mcs::crds::{self as upstream, CrdAction};
use crate::{crdgen, manifest};

/// The server-side-apply field manager of everything `meshctl` writes.
pub const FIELD_MANAGER: &str = "meshctl";
/// The label on everything `meshctl` writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", FIELD_MANAGER);
/// Key of the cluster's name (a DNS label) in the cluster ConfigMap.
pub const CLUSTER_NAME_KEY: &str = "clusterName";
/// Key of the cluster's pod CIDRs (comma-separated) in the cluster ConfigMap.
pub const POD_CIDRS_KEY: &str = "podCIDRs";
/// Key of the range this cluster's hosts take their addresses from (comma-separated,
/// optional) in the cluster ConfigMap: what `meshctl join` grants this cluster's hosts.
pub const HOST_CIDRS_KEY: &str = "hostCIDRs";
/// Key of the cluster's service CIDRs (comma-separated, optional) in the cluster
/// ConfigMap: no peer may claim an address in them.
pub const SERVICE_CIDRS_KEY: &str = "serviceCIDRs";
/// Key of the cluster's mesh CIDRs (comma-separated, optional) in the cluster ConfigMap:
/// one per pod CIDR, in the same order and of the same length, when its pod addresses are
/// translated (`meshctl install --mesh-cidr`, or allocated by `meshctl join`).
pub const MESH_CIDRS_KEY: &str = "meshCIDRs";
/// How long a CRD may take to become Established. The API server does it within a second or
/// two; a 2-core CI machine busy compiling gets ten times that.
pub const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster as Wiremesh knows it: the contents of its cluster ConfigMap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterInfo {
    /// The cluster's name, unique in the mesh (a DNS label).
    pub name: String,
    /// The cluster's whole pod range.
    pub pod_cidrs: Vec<IpCidr>,
    /// Where this cluster's hosts take their addresses from (may be empty).
    pub host_cidrs: Vec<IpCidr>,
    /// The cluster's service CIDRs (may be empty).
    pub service_cidrs: Vec<IpCidr>,
    /// The ranges that stand for `pod_cidrs` in the mesh, one per pod CIDR in the same order,
    /// when they are translated (empty: the pod CIDRs are used as they are).
    pub mesh_cidrs: Vec<IpCidr>,
}

impl ClusterInfo {
    /// The pod CIDRs as the rest of the mesh sees them: the mesh CIDRs when translated.
    pub fn mesh_view(&self) -> &[IpCidr] {
        if self.mesh_cidrs.is_empty() {
            &self.pod_cidrs
        } else {
            &self.mesh_cidrs
        }
    }
}

/// Why [`install`] failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The cluster name is not a DNS label.
    #[error(transparent)]
    ClusterName(#[from] ClusterNameError),
    /// No pod CIDR was given.
    #[error("at least one pod CIDR is needed (the cluster's whole pod range, such as 10.1.0.0/16)")]
    NoPodCidrs,
    /// The cluster was installed before under another name; peers know it by that name.
    #[error(
        "this cluster is already installed as {existing:?}; renaming it to {requested:?} would break \
         its links (unjoin every peer, then delete ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP})"
    )]
    Renamed {
        /// The name in the ConfigMap.
        existing: String,
        /// The name asked for.
        requested: String,
    },
    /// `--mesh-cidr` differs from the mesh CIDRs the cluster has while other clusters are
    /// linked to it (they reach its pods at the old ones).
    #[error(
        "this cluster's mesh CIDRs are {existing} (none: linked clusters reach its pods at their pod \
         addresses) and clusters are linked to it; changing them to {requested} would break those \
         links (unjoin every linked cluster first)"
    )]
    MeshCidrsChanged {
        /// The mesh CIDRs in the ConfigMap.
        existing: String,
        /// The mesh CIDRs asked for.
        requested: String,
    },
    /// The cluster has mesh CIDRs (given before, or assigned by `meshctl join`) that do not
    /// pair with the pod CIDRs now given, and no new ones were given.
    #[error(
        "this cluster's mesh CIDRs {existing} do not fit the pod CIDRs given: {reason}; \
         give --mesh-cidr for them (unjoin linked clusters first)"
    )]
    MeshCidrsStale {
        /// The mesh CIDRs in the ConfigMap.
        existing: String,
        /// Why they do not pair, naming the CIDRs.
        reason: String,
    },
    /// The API server refused or failed a request.
    #[error("{action}")]
    Api {
        /// What was being done, e.g. "applying CustomResourceDefinition meshnodes.wiremesh.io".
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The embedded manifest could not be used or applied.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// An embedded upstream CRD does not parse (a build bug).
    #[error(transparent)]
    UpstreamCrd(#[from] upstream::CrdFileError),
    /// The cluster's ClusterSet ID (About API) is already another name.
    #[error(
        "ClusterProperty {CLUSTER_ID_PROPERTY} is {existing:?}, not {requested:?}: this cluster \
         already has another ID in a ClusterSet (set by another multi-cluster tool or an earlier \
         install); install with --cluster-name {existing}, or delete that ClusterProperty first"
    )]
    ClusterIdTaken {
        /// The value found.
        existing: String,
        /// The cluster name asked for.
        requested: String,
    },
    /// A CRD did not become Established in time.
    #[error("CustomResourceDefinition {name} was not Established within {timeout:?}")]
    NotEstablished {
        /// The CRD.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Watching a CRD for its Established condition failed.
    #[error("waiting for CustomResourceDefinition {name} to be Established")]
    Wait {
        /// The CRD.
        name: String,
        /// The watch's error.
        #[source]
        source: kube::runtime::wait::Error,
    },
}

/// Why [`cluster_info`] failed. All variants but [`ClusterInfoError::Api`] mean "Wiremesh is
/// not (properly) installed".
#[derive(Debug, thiserror::Error)]
pub enum ClusterInfoError {
    /// The ConfigMap does not exist.
    #[error(
        "ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP} not found \
         (run `meshctl install --cluster-name NAME --pod-cidr CIDR`)"
    )]
    NotFound,
    /// A key is missing or empty.
    #[error("ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}: field {field} is missing or empty")]
    MissingField {
        /// The key.
        field: &'static str,
    },
    /// `clusterName` is not a DNS label.
    #[error("ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}: field {CLUSTER_NAME_KEY}: {0}")]
    BadClusterName(#[source] ClusterNameError),
    /// An entry of `podCIDRs`, `hostCIDRs` or `serviceCIDRs` is not a CIDR.
    #[error(
        "ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}: field {field}: {value:?} is not a CIDR"
    )]
    BadCidr {
        /// The key.
        field: &'static str,
        /// The offending entry.
        value: String,
        /// Why it did not parse.
        #[source]
        source: wiremesh_proto::CidrError,
    },
    /// `meshCIDRs` does not pair with `podCIDRs` (count, family, length or overlap).
    #[error("ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}: field {MESH_CIDRS_KEY}: {reason}")]
    BadMeshCidrs {
        /// What is wrong, naming the CIDRs.
        reason: String,
    },
    /// Reading the ConfigMap failed (the API server is unreachable, or refused).
    #[error("reading ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}")]
    Api(#[source] kube::Error),
}

impl ClusterInfoError {
    /// True unless the ConfigMap could not be read at all: Wiremesh is not installed, or
    /// installed with a broken ConfigMap.
    pub fn is_not_installed(&self) -> bool {
        !matches!(self, Self::Api(_))
    }
}

/// A cluster name that is not a DNS label (RFC 1123: 1 to 63 of `[a-z0-9-]`, starting and
/// ending alphanumeric). Peer clusters use it in object names and labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a valid cluster name: use 1 to 63 of a-z, 0-9 and '-', starting and ending with a letter or digit"
)]
pub struct ClusterNameError(pub String);

/// Checks that `name` can name a cluster (a DNS label).
///
/// # Errors
/// [`ClusterNameError`] naming the value.
pub fn check_cluster_name(name: &str) -> Result<(), ClusterNameError> {
    let bytes = name.as_bytes();
    let ok = (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(ClusterNameError(name.to_owned()))
    }
}

/// What [`install_cluster`] did with one upstream CRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCrd {
    /// The CRD's name.
    pub name: String,
    /// Created, upgraded or kept (and why).
    pub action: CrdAction,
}

/// Installs Wiremesh's cluster-wide pieces with server-side apply (field manager
/// [`FIELD_MANAGER`]): the CRDs, waiting until each is Established (bounded by
/// [`CRD_ESTABLISHED_TIMEOUT`]), the namespace, and the cluster ConfigMap. Idempotent.
/// Also the upstream CRDs where absent or older, and the `ClusterProperty`
/// [`CLUSTER_ID_PROPERTY`] = the cluster name where absent.
///
/// # Errors
/// A bad name or no CIDR (nothing is written), a cluster already installed under another
/// name, or what the API server says.
pub async fn install(
    client: &Client,
    cluster_name: &str,
    pod_cidrs: &[IpCidr],
) -> Result<(), InstallError> {
    let info = ClusterInfo {
        name: cluster_name.to_owned(),
        pod_cidrs: pod_cidrs.to_vec(),
        ..ClusterInfo::default()
    };
    install_cluster(client, &info).await.map(drop)
}

/// What [`install_cluster`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// What was done with each upstream CRD.
    pub upstream: Vec<UpstreamCrd>,
    /// What the cluster ConfigMap now holds: `info` with the mesh CIDRs it kept
    /// ([`mesh_cidrs_to_write`]).
    pub info: ClusterInfo,
}

/// The mesh CIDRs an install writes: those asked for, else the ones the cluster already
/// has (`existing`: the ConfigMap's `meshCIDRs` and `podCIDRs` values). `meshctl join`
/// assigns them, and linked clusters reach this cluster's pods at them: an install run
/// again for another reason (`--configure-dns`, an upgrade) must not drop them. While the
/// cluster is `linked`, its mesh CIDRs may not change (added, changed or dropped), nor may
/// the pod CIDRs that kept ones pair with. Kept ones must still pair with the pod CIDRs
/// given. An existing value that does not parse is refused unless replaced on a cluster
/// that is not linked (agents keep their last good translation meanwhile).
///
/// # Errors
/// [`InstallError::MeshCidrsChanged`], [`InstallError::MeshCidrsStale`].
pub fn mesh_cidrs_to_write(
    existing_mesh: Option<&String>,
    existing_pods: Option<&String>,
    info: &ClusterInfo,
    linked: bool,
) -> Result<Vec<IpCidr>, InstallError> {
    let parse = |text: Option<&String>| -> Result<Vec<IpCidr>, String> {
        text.map_or(Ok(Vec::new()), |text| {
            text.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| c.parse().map_err(|e| format!("{c:?}: {e}")))
                .collect()
        })
    };
    let list = |cidrs: &[IpCidr]| {
        if cidrs.is_empty() {
            "none".to_owned()
        } else {
            cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let existing = match parse(existing_mesh) {
        Ok(existing) => existing,
        Err(_) if !linked && !info.mesh_cidrs.is_empty() => return Ok(info.mesh_cidrs.clone()),
        Err(reason) => {
            return Err(InstallError::MeshCidrsStale {
                existing: existing_mesh.cloned().unwrap_or_default(),
                reason: format!("the ConfigMap's value does not parse ({reason})"),
            });
        }
    };
    if !info.mesh_cidrs.is_empty() || !linked {
        if linked && existing != info.mesh_cidrs {
            return Err(InstallError::MeshCidrsChanged {
                existing: list(&existing),
                requested: list(&info.mesh_cidrs),
            });
        }
        if !info.mesh_cidrs.is_empty() {
            return Ok(info.mesh_cidrs.clone());
        }
    }
    if linked && !existing.is_empty() {
        let pods = parse(existing_pods).unwrap_or_default();
        if pods != info.pod_cidrs {
            return Err(InstallError::MeshCidrsStale {
                existing: list(&existing),
                reason: format!(
                    "they stand for the pod CIDRs {} and linked clusters reach those pods at them; \
                     the pod CIDRs given are {}",
                    list(&pods),
                    list(&info.pod_cidrs)
                ),
            });
        }
    }
    check_mesh_cidrs(&info.pod_cidrs, &existing).map_err(|reason| {
        InstallError::MeshCidrsStale {
            existing: list(&existing),
            reason,
        }
    })?;
    Ok(existing)
}

/// [`install`] with the optional ranges of `info` too (host and service CIDRs); returns
/// what was done with each upstream CRD and what the ConfigMap holds.
///
/// # Errors
/// As [`install`]; also a `ClusterProperty` [`CLUSTER_ID_PROPERTY`] of another value
/// (refused before anything is written).
pub async fn install_cluster(
    client: &Client,
    info: &ClusterInfo,
) -> Result<Installed, InstallError> {
    let cluster_name = info.name.as_str();
    check_cluster_name(cluster_name)?;
    if info.pod_cidrs.is_empty() {
        return Err(InstallError::NoPodCidrs);
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();

    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let existing = configmaps
        .get_opt(CLUSTER_CONFIGMAP)
        .await
        .map_err(|source| InstallError::Api {
            action: format!("reading ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}"),
            source,
        })?;
    let existing_data = existing.and_then(|cm| cm.data).unwrap_or_default();
    if let Some(existing) = existing_data.get(CLUSTER_NAME_KEY)
        && !existing.is_empty()
        && existing != cluster_name
    {
        return Err(InstallError::Renamed {
            existing: existing.clone(),
            requested: cluster_name.to_owned(),
        });
    }

    let linked = match Api::<PeerCluster>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        Ok(list) => !list.items.is_empty(),
        // No PeerCluster CRD yet: a first install.
        Err(kube::Error::Api(status)) if status.code == 404 => false,
        Err(source) => {
            return Err(InstallError::Api {
                action: "listing PeerClusters".to_owned(),
                source,
            });
        }
    };
    let info = &ClusterInfo {
        mesh_cidrs: mesh_cidrs_to_write(
            existing_data.get(MESH_CIDRS_KEY),
            existing_data.get(POD_CIDRS_KEY),
            info,
            linked,
        )?,
        ..info.clone()
    };

    let properties: Api<ClusterProperty> = Api::all(client.clone());
    let property = match properties.get(CLUSTER_ID_PROPERTY).await {
        Ok(property) => Some(property),
        // No such property, or no ClusterProperty CRD yet: then the API server answers a
        // bare "404 page not found", not a Status, which `get_opt` does not take for absent.
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(source) => {
            return Err(InstallError::Api {
                action: format!("reading ClusterProperty {CLUSTER_ID_PROPERTY}"),
                source,
            });
        }
    };
    let create_property = cluster_id_needed(property.as_ref(), cluster_name)?;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crdgen::crds() {
        let name = crd.name_any();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|source| InstallError::Api {
                action: format!("applying CustomResourceDefinition {name}"),
                source,
            })?;
    }
    let upstream_crds = upstream::crds()?;
    let mut report = Vec::with_capacity(upstream_crds.len());
    for crd in &upstream_crds {
        let name = crd.name_any();
        let installed = crds
            .get_opt(&name)
            .await
            .map_err(|source| InstallError::Api {
                action: format!("reading CustomResourceDefinition {name}"),
                source,
            })?;
        let action = upstream::action(crd, installed.as_ref());
        if matches!(action, CrdAction::Create | CrdAction::Upgrade { .. }) {
            crds.patch(&name, &params, &Patch::Apply(crd))
                .await
                .map_err(|source| InstallError::Api {
                    action: format!("applying CustomResourceDefinition {name}"),
                    source,
                })?;
        }
        report.push(UpstreamCrd { name, action });
    }
    for crd in crdgen::crds().into_iter().chain(upstream_crds) {
        let name = crd.name_any();
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(CRD_ESTABLISHED_TIMEOUT, established).await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => return Err(InstallError::Wait { name, source }),
            Err(_) => {
                return Err(InstallError::NotEstablished {
                    name,
                    timeout: CRD_ESTABLISHED_TIMEOUT,
                });
            }
        }
    }

    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(SYSTEM_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(SYSTEM_NAMESPACE, &params, &Patch::Apply(&namespace))
        .await
        .map_err(|source| InstallError::Api {
            action: format!("applying Namespace {SYSTEM_NAMESPACE}"),
            source,
        })?;

    let configmap = cluster_configmap(info);
    configmaps
        .patch(CLUSTER_CONFIGMAP, &params, &Patch::Apply(&configmap))
        .await
        .map_err(|source| InstallError::Api {
            action: format!("applying ConfigMap {SYSTEM_NAMESPACE}/{CLUSTER_CONFIGMAP}"),
            source,
        })?;

    if create_property {
        properties
            .patch(
                CLUSTER_ID_PROPERTY,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&cluster_id_property(cluster_name)),
            )
            .await
            .map_err(|source| InstallError::Api {
                action: format!("applying ClusterProperty {CLUSTER_ID_PROPERTY}"),
                source,
            })?;
    }
    Ok(Installed {
        upstream: report,
        info: info.clone(),
    })
}

/// Whether the `ClusterProperty` [`CLUSTER_ID_PROPERTY`] must be created for cluster
/// `name`: true when absent, false when it already says `name`.
///
/// # Errors
/// [`InstallError::ClusterIdTaken`] when it says something else.
pub fn cluster_id_needed(
    existing: Option<&ClusterProperty>,
    name: &str,
) -> Result<bool, InstallError> {
    match existing {
        None => Ok(true),
        Some(p) if p.spec.value == name => Ok(false),
        Some(p) => Err(InstallError::ClusterIdTaken {
            existing: p.spec.value.clone(),
            requested: name.to_owned(),
        }),
    }
}

/// The `ClusterProperty` naming this cluster in its ClusterSet (KEP-2149).
pub fn cluster_id_property(name: &str) -> ClusterProperty {
    ClusterProperty {
        metadata: ObjectMeta {
            name: Some(CLUSTER_ID_PROPERTY.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: ClusterPropertySpec {
            value: name.to_owned(),
        },
    }
}

/// The components of `deploy/wiremesh.yaml`: everything but the CRDs (which [`install`]
/// applies from the Rust types), that is RBAC, the admission policy, the agent DaemonSet,
/// the controller Deployment and the rest, with `image` instead of the manifest's if
/// given. Pure: check it before writing anything.
///
/// # Errors
/// A bad image, or an embedded manifest that does not parse (a build bug).
pub fn components(image: Option<&str>) -> Result<Vec<DynamicObject>, InstallError> {
    let mut objects = manifest::parse(manifest::MANIFEST)?;
    objects.retain(|o| manifest::kind(o) != "CustomResourceDefinition");
    if let Some(image) = image {
        manifest::set_image(&mut objects, image)?;
    }
    Ok(objects)
}

/// Server-side applies `objects` (from [`components`]); returns "Kind name" of each.
/// Idempotent.
///
/// # Errors
/// What the API server says.
pub async fn apply_components(
    client: &Client,
    objects: &[DynamicObject],
) -> Result<Vec<String>, InstallError> {
    Ok(manifest::apply(client, objects, FIELD_MANAGER).await?)
}

/// Reads this cluster's name and pod CIDRs from its cluster ConfigMap.
///
/// # Errors
/// [`ClusterInfoError`]: not installed (the ConfigMap or a field is missing, a value does not
/// parse; the message names the field), or the API server cannot be read.
pub async fn cluster_info(client: &Client) -> Result<ClusterInfo, ClusterInfoError> {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let configmap = match configmaps.get_opt(CLUSTER_CONFIGMAP).await {
        Ok(Some(cm)) => cm,
        Ok(None) => return Err(ClusterInfoError::NotFound),
        Err(e) => return Err(ClusterInfoError::Api(e)),
    };
    parse_cluster_configmap(&configmap.data.unwrap_or_default())
}

/// The cluster ConfigMap's `data` as [`ClusterInfo`].
///
/// # Errors
/// A missing or empty key, a bad name, or an entry of `podCIDRs` that is not a CIDR.
pub fn parse_cluster_configmap(
    data: &BTreeMap<String, String>,
) -> Result<ClusterInfo, ClusterInfoError> {
    let field = |field: &'static str| {
        data.get(field)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .ok_or(ClusterInfoError::MissingField { field })
    };
    let name = field(CLUSTER_NAME_KEY)?;
    check_cluster_name(name).map_err(ClusterInfoError::BadClusterName)?;
    let cidrs = |field: &'static str, text: &str| {
        text.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<IpCidr>()
                    .map_err(|source| ClusterInfoError::BadCidr {
                        field,
                        value: c.to_owned(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let pod_cidrs = cidrs(POD_CIDRS_KEY, field(POD_CIDRS_KEY)?)?;
    if pod_cidrs.is_empty() {
        return Err(ClusterInfoError::MissingField {
            field: POD_CIDRS_KEY,
        });
    }
    let optional = |key: &'static str| cidrs(key, data.get(key).map_or("", String::as_str));
    let mesh_cidrs = optional(MESH_CIDRS_KEY)?;
    check_mesh_cidrs(&pod_cidrs, &mesh_cidrs)
        .map_err(|reason| ClusterInfoError::BadMeshCidrs { reason })?;
    Ok(ClusterInfo {
        name: name.to_owned(),
        pod_cidrs,
        host_cidrs: optional(HOST_CIDRS_KEY)?,
        service_cidrs: optional(SERVICE_CIDRS_KEY)?,
        mesh_cidrs,
    })
}

/// Checks that `mesh` pairs with `pods` (none, or one per pod CIDR in the same order, of
/// its family and length) and that no two of all these CIDRs overlap.
///
/// # Errors
/// What is wrong, naming the CIDRs.
pub fn check_mesh_cidrs(pods: &[IpCidr], mesh: &[IpCidr]) -> Result<(), String> {
    if mesh.is_empty() {
        return Ok(());
    }
    if mesh.len() != pods.len() {
        return Err(format!(
            "{} mesh CIDRs for {} pod CIDRs: give one per pod CIDR, in the same order",
            mesh.len(),
            pods.len()
        ));
    }
    for (pod, m) in pods.iter().zip(mesh) {
        wiremesh_proto::PrefixMap::new(*pod, *m).map_err(|e| e.to_string())?;
    }
    for (i, a) in mesh.iter().enumerate() {
        for b in mesh.iter().skip(i + 1).chain(pods) {
            if a.overlaps(b) {
                return Err(format!("mesh CIDR {a} overlaps {b}"));
            }
        }
    }
    Ok(())
}

/// The cluster ConfigMap for `info` (CIDRs written in canonical form; the optional keys
/// only when set).
pub fn cluster_configmap(info: &ClusterInfo) -> ConfigMap {
    let join = |cidrs: &[IpCidr]| {
        cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut data = BTreeMap::from([
        (CLUSTER_NAME_KEY.to_owned(), info.name.clone()),
        (POD_CIDRS_KEY.to_owned(), join(&info.pod_cidrs)),
    ]);
    for (key, cidrs) in [
        (HOST_CIDRS_KEY, &info.host_cidrs),
        (SERVICE_CIDRS_KEY, &info.service_cidrs),
        (MESH_CIDRS_KEY, &info.mesh_cidrs),
    ] {
        if !cidrs.is_empty() {
            data.insert(key.to_owned(), join(cidrs));
        }
    }
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CLUSTER_CONFIGMAP.to_owned()),
            namespace: Some(SYSTEM_NAMESPACE.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_dns_labels() {
        for good in ["a", "cluster-a", "c0", &"x".repeat(63)] {
            assert!(check_cluster_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Cluster", "a.b", "a_b", &"x".repeat(64)] {
            assert!(check_cluster_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configmap_round_trips() {
        let cidrs = vec![
            "10.1.0.0/16".parse().unwrap(),
            "fd00:1::/48".parse().unwrap(),
        ];
        let cm = cluster_configmap(&ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: cidrs.clone(),
            ..ClusterInfo::default()
        });
        let data = cm.data.unwrap();
        assert_eq!(data[POD_CIDRS_KEY], "10.1.0.0/16,fd00:1::/48");
        assert!(!data.contains_key(HOST_CIDRS_KEY));
        let info = parse_cluster_configmap(&data).unwrap();
        assert_eq!(info.name, "cluster-a");
        assert_eq!(info.pod_cidrs, cidrs);
        assert!(info.host_cidrs.is_empty() && info.service_cidrs.is_empty());
        let full = ClusterInfo {
            name: "cluster-a".into(),
            pod_cidrs: cidrs,
            host_cidrs: vec!["10.250.0.0/24".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            mesh_cidrs: vec![
                "100.64.0.0/16".parse().unwrap(),
                "fd64:1:2::/48".parse().unwrap(),
            ],
        };
        let data = cluster_configmap(&full).data.unwrap();
        assert_eq!(data[HOST_CIDRS_KEY], "10.250.0.0/24");
        assert_eq!(data[MESH_CIDRS_KEY], "100.64.0.0/16,fd64:1:2::/48");
        assert_eq!(parse_cluster_configmap(&data).unwrap(), full);
        assert_eq!(full.mesh_view(), &full.mesh_cidrs[..]);
    }

    #[test]
    fn mesh_cidrs_must_pair_with_the_pod_cidrs() {
        let c = |s: &str| -> Vec<IpCidr> { s.split(',').map(|c| c.parse().unwrap()).collect() };
        let pods = c("10.244.0.0/16,fd00:10:244::/48");
        assert_eq!(check_mesh_cidrs(&pods, &[]), Ok(()));
        assert_eq!(
            check_mesh_cidrs(&pods, &c("100.64.0.0/16,fd64::/48")),
            Ok(())
        );
        let e = check_mesh_cidrs(&pods, &c("100.64.0.0/16")).unwrap_err();
        assert!(e.contains("1 mesh CIDRs for 2 pod CIDRs"), "{e}");
        let e = check_mesh_cidrs(&pods, &c("fd64::/48,100.64.0.0/16")).unwrap_err();
        assert!(e.contains("fd64::/48"), "{e}");
        let e = check_mesh_cidrs(&pods[..1], &c("10.244.0.0/16")).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let mut data = BTreeMap::from([
            (CLUSTER_NAME_KEY.to_owned(), "a".to_owned()),
            (POD_CIDRS_KEY.to_owned(), "10.244.0.0/16".to_owned()),
            (MESH_CIDRS_KEY.to_owned(), "100.64.0.0/24".to_owned()),
        ]);
        let err = parse_cluster_configmap(&data).unwrap_err();
        assert!(err.to_string().contains("field meshCIDRs"), "{err}");
        data.insert(MESH_CIDRS_KEY.to_owned(), "100.64.0.0/16".to_owned());
        assert_eq!(
            parse_cluster_configmap(&data).unwrap().mesh_cidrs,
            c("100.64.0.0/16")
        );
    }

    #[test]
    fn an_install_run_again_keeps_the_mesh_cidrs_join_assigned() {
        let c = |s: &str| -> Vec<IpCidr> { s.split(',').map(|c| c.parse().unwrap()).collect() };
        let info = |pods: &str, mesh: &str| ClusterInfo {
            name: "cluster-a".to_owned(),
            pod_cidrs: c(pods),
            mesh_cidrs: if mesh.is_empty() { Vec::new() } else { c(mesh) },
            ..ClusterInfo::default()
        };
        let (assigned, pods) = ("100.64.0.0/16".to_owned(), "10.244.0.0/16".to_owned());
        let write = |mesh: Option<&String>, info: &ClusterInfo, linked: bool| {
            mesh_cidrs_to_write(mesh, Some(&pods), info, linked)
        };
        let again = info("10.244.0.0/16", "");
        // Run again without --mesh-cidr (to configure DNS, to upgrade): kept, linked or not.
        for linked in [false, true] {
            assert_eq!(
                write(Some(&assigned), &again, linked).unwrap(),
                c("100.64.0.0/16")
            );
        }
        assert_eq!(write(None, &again, true).unwrap(), vec![]);
        // The same ones given again, or others before any link: written as given.
        let same = info("10.244.0.0/16", "100.64.0.0/16");
        assert_eq!(
            write(Some(&assigned), &same, true).unwrap(),
            same.mesh_cidrs
        );
        let other = info("10.244.0.0/16", "100.70.0.0/16");
        assert_eq!(
            write(Some(&assigned), &other, false).unwrap(),
            other.mesh_cidrs
        );
        assert_eq!(write(None, &other, false).unwrap(), other.mesh_cidrs);
        // Others while linked, or some where there were none: refused, naming both.
        let err = write(Some(&assigned), &other, true).unwrap_err();
        assert!(
            matches!(err, InstallError::MeshCidrsChanged { .. })
                && err.to_string().contains("100.64.0.0/16")
                && err.to_string().contains("100.70.0.0/16"),
            "{err}"
        );
        let err = write(None, &other, true).unwrap_err();
        assert!(err.to_string().contains("are none"), "{err}");
        // Kept ones that no longer fit, or whose pod CIDRs change while linked: refused.
        let err = write(Some(&assigned), &info("10.244.0.0/17", ""), false).unwrap_err();
        assert!(matches!(err, InstallError::MeshCidrsStale { .. }), "{err}");
        let err = write(Some(&assigned), &info("10.245.0.0/16", ""), true).unwrap_err();
        assert!(err.to_string().contains("10.244.0.0/16"), "{err}");
        // A value that does not parse: refused, unless replaced before any link.
        let garbage = "not a cidr".to_owned();
        let err = write(Some(&garbage), &again, true).unwrap_err();
        assert!(err.to_string().contains("does not parse"), "{err}");
        assert!(write(Some(&garbage), &again, false).is_err());
        assert_eq!(
            write(Some(&garbage), &other, false).unwrap(),
            other.mesh_cidrs
        );
    }

    #[test]
    fn cluster_id_is_created_when_absent_kept_when_equal_refused_when_other() {
        assert!(cluster_id_needed(None, "cluster-a").unwrap());
        let same = cluster_id_property("cluster-a");
        assert!(!cluster_id_needed(Some(&same), "cluster-a").unwrap());
        let err = cluster_id_needed(Some(&same), "cluster-b").unwrap_err();
        assert!(matches!(err, InstallError::ClusterIdTaken { .. }));
        let message = err.to_string();
        assert!(message.contains("cluster.clusterset.k8s.io"), "{message}");
        assert!(message.contains("\"cluster-a\""), "{message}");
        let json = serde_json::to_value(&same).unwrap();
        assert_eq!(json["apiVersion"], "about.k8s.io/v1alpha1");
        assert_eq!(json["kind"], "ClusterProperty");
        assert_eq!(json["spec"]["value"], "cluster-a");
    }

    #[test]
    fn configmap_errors_name_the_field() {
        let data = |name: &str, cidrs: &str| {
            BTreeMap::from([
                (CLUSTER_NAME_KEY.to_owned(), name.to_owned()),
                (POD_CIDRS_KEY.to_owned(), cidrs.to_owned()),
            ])
        };
        let err = parse_cluster_configmap(&data("a", "10.1.0.0/16, nope")).unwrap_err();
        assert!(err.to_string().contains("field podCIDRs"), "{err}");
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let err = parse_cluster_configmap(&data("A!", "10.1.0.0/16")).unwrap_err();
        assert!(err.to_string().contains("field clusterName"), "{err}");
        let err = parse_cluster_configmap(&data("a", " , ")).unwrap_err();
        assert!(err.to_string().contains("field podCIDRs"), "{err}");
        let mut bad_hosts = data("a", "10.1.0.0/16");
        bad_hosts.insert(HOST_CIDRS_KEY.to_owned(), "10.250.0.0/33".to_owned());
        let err = parse_cluster_configmap(&bad_hosts).unwrap_err();
        assert!(err.to_string().contains("field hostCIDRs"), "{err}");
        let err = parse_cluster_configmap(&BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("field clusterName"), "{err}");
        assert!(err.is_not_installed());
    }
}
