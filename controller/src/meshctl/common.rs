//! What the `meshctl` commands share: printing a step, reading a cluster's ConfigMap and
//! objects, server-side apply and delete that print what they did, the metadata of what
//! `meshctl` writes, and ServiceAccount tokens from the TokenRequest API.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wiremesh_proto::crd::SYSTEM_NAMESPACE;

use super::kubeconfig::Target;
use crate::install::{self, ClusterInfo, FIELD_MANAGER, MANAGED_BY};

/// How long a minted token is valid: one year. Tokens come from the TokenRequest API
/// (legacy ServiceAccount token Secrets need kube-controller-manager to be filled); rerun
/// `meshctl join` (or `host add`) to re-mint one that expired or was revoked.
pub const TOKEN_EXPIRATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Prints one line of the command's report on stdout.
#[allow(clippy::print_stdout)] // meshctl is a CLI: its report goes to stdout
pub(crate) fn say(line: impl Display) {
    println!("{line}");
}

/// [`install::cluster_info`] with the context in the message.
///
/// # Errors
/// "Wiremesh is not installed in context X: …", or the API server could not be read.
pub async fn cluster_info(target: &Target) -> Result<ClusterInfo> {
    install::cluster_info(&target.client).await.map_err(|e| {
        let what = if e.is_not_installed() {
            format!("Wiremesh is not installed in context {}", target.context)
        } else {
            format!(
                "cannot read the cluster of context {} ({})",
                target.context, target.server
            )
        };
        anyhow::Error::new(e).context(what)
    })
}

/// Every cluster-scoped `K` of `target`; `what` names them in the error ("MeshNodes").
pub(crate) async fn list<K>(target: &Target, what: &str) -> Result<Vec<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    Ok(Api::<K>::all(target.client.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing {what} in context {}", target.context))?
        .items)
}

/// Server-side applies `object` and prints whether it was created, updated or unchanged
/// (by its resourceVersion before and after).
pub(crate) async fn apply<K>(api: &Api<K>, object: &K, cluster: &str, what: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = object.name_any();
    let before = api
        .get_opt(&name)
        .await
        .with_context(|| format!("{cluster}: reading {what}"))?;
    let after = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .with_context(|| format!("{cluster}: applying {what}"))?;
    let outcome = match before {
        None => "created",
        Some(before) if before.resource_version() == after.resource_version() => "unchanged",
        Some(_) => "updated",
    };
    say(format!("{cluster}: {what} {outcome}"));
    Ok(())
}

/// Deletes `name`; "not found" is success.
pub(crate) async fn delete<K>(api: &Api<K>, name: &str, cluster: &str, what: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => say(format!("{cluster}: {what} deleted")),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            say(format!("{cluster}: {what} not found (nothing to delete)"));
        }
        Err(e) => return Err(e).with_context(|| format!("{cluster}: deleting {what}")),
    }
    Ok(())
}

/// A token for ServiceAccount `wiremesh-system/<account>` of `cluster` from the TokenRequest
/// API, valid [`TOKEN_EXPIRATION`].
pub(crate) async fn mint_token(client: &Client, cluster: &str, account: &str) -> Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(i64::try_from(TOKEN_EXPIRATION.as_secs()).unwrap_or(i64::MAX)),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("{cluster}: requesting a token for ServiceAccount {SYSTEM_NAMESPACE}/{account}")
        })?;
    let status = response
        .status
        .filter(|s| !s.token.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "{cluster}: the TokenRequest for {SYSTEM_NAMESPACE}/{account} returned no token"
            )
        })?;
    say(format!(
        "{cluster}: token for ServiceAccount {SYSTEM_NAMESPACE}/{account} minted (TokenRequest API, valid until {})",
        status.expiration_timestamp.0
    ));
    Ok(status.token)
}

/// The metadata of an object `meshctl` writes: its name, its namespace (`None` for a
/// cluster-scoped object), the [`MANAGED_BY`] label and `label` if given.
pub(crate) fn meta(name: &str, namespace: Option<&str>, label: Option<(&str, &str)>) -> ObjectMeta {
    let mut labels = BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())]);
    if let Some((key, value)) = label {
        labels.insert(key.to_owned(), value.to_owned());
    }
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

/// `items`, comma-separated, as the cluster ConfigMap and the report write CIDRs.
pub(crate) fn comma_list<T: Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_carries_the_managed_by_label_and_the_extra_one() {
        let m = meta("x", Some("ns"), Some(("k", "v")));
        let labels = m.labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "meshctl");
        assert_eq!(labels["k"], "v");
        assert_eq!(m.namespace.as_deref(), Some("ns"));
        assert_eq!(meta("y", None, None).labels.unwrap().len(), 1);
    }
}
