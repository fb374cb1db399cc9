//! `meshctl install`'s DNS step: does the cluster's CoreDNS answer `clusterset.local`?
//! Reads Deployment, ConfigMap and ClusterRole of `kube-system/coredns` (as kubeadm and
//! most distributions name them), decides with [`crate::mcs::dns`], and with
//! `--configure-dns` changes the Corefile and the ClusterRole; otherwise it says what to
//! change. [`plan`] only reads, so a refusal comes before anything is installed.

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use super::common::say;
use super::kubeconfig::Target;
use crate::mcs::dns::{self, CorefileEdit, DnsError};

/// Where CoreDNS lives.
pub const NAMESPACE: &str = "kube-system";
/// Its Deployment and ConfigMap.
pub const NAME: &str = "coredns";
/// The ConfigMap key of the Corefile.
pub const COREFILE_KEY: &str = "Corefile";

/// What the DNS step will do, decided before anything is installed.
#[derive(Debug)]
pub(crate) enum DnsPlan {
    /// Nothing to do (already configured), with the version found.
    Ready(dns::Version),
    /// Changes to make (or to print): the new Corefile, if it changes, and the
    /// ClusterRole to grant `serviceimports` to, if one lacks it.
    Change {
        version: dns::Version,
        corefile: Option<String>,
        role: Option<String>,
    },
    /// It cannot be done: why (printed; an error with `--configure-dns`).
    Refused(String),
}

/// Reads CoreDNS's objects and decides. `version` overrides the Deployment's image tag.
///
/// # Errors
/// When the API server cannot be read; with `configure`, also when CoreDNS is absent, too
/// old, or its Corefile cannot be edited safely (nothing has been changed then).
pub(crate) async fn plan(
    target: &Target,
    configure: bool,
    version: Option<&str>,
) -> Result<DnsPlan> {
    let plan = decide(target, version).await?;
    if let (true, DnsPlan::Refused(why)) = (configure, &plan) {
        bail!("{}: --configure-dns: {why}", target.context);
    }
    Ok(plan)
}

/// Carries out (`configure`) or prints a [`plan`].
///
/// # Errors
/// When a patch fails.
pub(crate) async fn apply(target: &Target, plan: DnsPlan, configure: bool) -> Result<()> {
    let context = &target.context;
    let (version, corefile, role) = match plan {
        DnsPlan::Ready(version) => {
            say(format!(
                "{context}: CoreDNS {version} answers {} (Corefile and ClusterRole ready)",
                dns::CLUSTERSET_ZONE
            ));
            return Ok(());
        }
        DnsPlan::Refused(why) => {
            say(format!(
                "{context}: {} names will not resolve: {why}",
                dns::CLUSTERSET_ZONE
            ));
            return Ok(());
        }
        DnsPlan::Change {
            version,
            corefile,
            role,
        } => (version, corefile, role),
    };
    if !configure {
        say(format!(
            "{context}: CoreDNS {version} does not answer {zone} yet; rerun with --configure-dns, or change by hand:",
            zone = dns::CLUSTERSET_ZONE
        ));
        if let Some(corefile) = &corefile {
            say(format!(
                "  ConfigMap {NAMESPACE}/{NAME} key {COREFILE_KEY} becomes:\n{corefile}"
            ));
        }
        if let Some(role) = &role {
            say(format!(
                "  ClusterRole {role} needs the rule: apiGroups [{}], resources [serviceimports], verbs [list, watch]",
                wiremesh_proto::mcs::GROUP
            ));
        }
        return Ok(());
    }
    if let Some(corefile) = corefile {
        let patch = serde_json::json!({ "data": { COREFILE_KEY: corefile } });
        Api::<ConfigMap>::namespaced(target.client.clone(), NAMESPACE)
            .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("{context}: patching ConfigMap {NAMESPACE}/{NAME}"))?;
        say(format!(
            "{context}: ConfigMap {NAMESPACE}/{NAME}: {zone} added to the kubernetes plugin with `multicluster {zone}` (CoreDNS's `reload` picks it up; without it, restart CoreDNS)",
            zone = dns::CLUSTERSET_ZONE
        ));
    }
    if let Some(role) = role {
        // A replace carries the resourceVersion read: a concurrent change makes it fail.
        let api = Api::<ClusterRole>::all(target.client.clone());
        let mut current = api
            .get(&role)
            .await
            .with_context(|| format!("{context}: reading ClusterRole {role}"))?;
        current
            .rules
            .get_or_insert_with(Vec::new)
            .push(dns::serviceimports_rule());
        api.replace(&role, &PostParams::default(), &current)
            .await
            .with_context(|| format!("{context}: updating ClusterRole {role}"))?;
        say(format!(
            "{context}: ClusterRole {role}: list, watch on serviceimports.{} granted",
            wiremesh_proto::mcs::GROUP
        ));
    }
    Ok(())
}

async fn decide(target: &Target, version: Option<&str>) -> Result<DnsPlan> {
    let context = &target.context;
    let deployment = Api::<Deployment>::namespaced(target.client.clone(), NAMESPACE)
        .get_opt(NAME)
        .await
        .with_context(|| format!("{context}: reading Deployment {NAMESPACE}/{NAME}"))?;
    let Some(deployment) = deployment else {
        return Ok(DnsPlan::Refused(format!(
            "no Deployment {NAMESPACE}/{NAME} (CoreDNS {} or later is needed)",
            dns::MIN_COREDNS
        )));
    };
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref());
    let version = match version {
        Some(v) => dns::parse_version(v),
        None => {
            let image = pod
                .and_then(|p| {
                    p.containers
                        .iter()
                        .find(|c| c.name == NAME)
                        .or(p.containers.first())
                })
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            dns::image_version(&image)
        }
    };
    let version = match version.and_then(|v| dns::check_version(v).map(|()| v)) {
        Ok(v) => v,
        Err(e) => return Ok(DnsPlan::Refused(e.to_string())),
    };
    let configmap = Api::<ConfigMap>::namespaced(target.client.clone(), NAMESPACE)
        .get_opt(NAME)
        .await
        .with_context(|| format!("{context}: reading ConfigMap {NAMESPACE}/{NAME}"))?;
    let Some(text) = configmap
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove(COREFILE_KEY))
    else {
        return Ok(DnsPlan::Refused(format!(
            "no ConfigMap {NAMESPACE}/{NAME} with a {COREFILE_KEY} key"
        )));
    };
    let corefile = match dns::edit_corefile(&text) {
        Ok(CorefileEdit::Unchanged) => None,
        Ok(CorefileEdit::Changed(text)) => Some(text),
        Err(e) => return Ok(DnsPlan::Refused(DnsError::from(e).to_string())),
    };
    let account = pod
        .and_then(|p| p.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let bindings = Api::<ClusterRoleBinding>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("{context}: listing ClusterRoleBindings"))?;
    let mut roles: Vec<String> = bindings
        .items
        .iter()
        .filter(|b| b.role_ref.kind == "ClusterRole")
        .filter(|b| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == account
                    && s.namespace.as_deref() == Some(NAMESPACE)
            })
        })
        .map(|b| b.role_ref.name.clone())
        .collect();
    roles.sort();
    roles.dedup();
    let mut granted = false;
    let mut lacking = None;
    for name in &roles {
        let role = Api::<ClusterRole>::all(target.client.clone())
            .get_opt(name)
            .await
            .with_context(|| format!("{context}: reading ClusterRole {name}"))?;
        let Some(role) = role else { continue };
        if role.aggregation_rule.is_some() {
            continue;
        }
        if dns::grants_serviceimports(role.rules.as_deref().unwrap_or_default()) {
            granted = true;
        } else if lacking.is_none() {
            lacking = Some(role.name_any());
        }
    }
    let role = match (granted, lacking) {
        (true, _) => None,
        (false, Some(role)) => Some(role),
        (false, None) => {
            return Ok(DnsPlan::Refused(format!(
                "no ClusterRole bound to ServiceAccount {NAMESPACE}/{account} (CoreDNS's) to grant serviceimports to"
            )));
        }
    };
    if corefile.is_none() && role.is_none() {
        return Ok(DnsPlan::Ready(version));
    }
    Ok(DnsPlan::Change {
        version,
        corefile,
        role,
    })
}
