//! `meshctl export SERVICE -n NS` and `meshctl unexport SERVICE -n NS`: shortcuts for
//! creating and deleting a `ServiceExport` (the API object is the interface: `kubectl
//! apply` of the same object does the same).

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use wiremesh_proto::mcs::ServiceExport;

use super::common::{apply, delete, meta, say};
use super::kubeconfig::{self, KubeArgs};

/// The `ServiceExport` for Service `namespace/name`.
pub fn service_export(name: &str, namespace: &str) -> ServiceExport {
    ServiceExport {
        metadata: meta(name, Some(namespace), None),
        ..ServiceExport::default()
    }
}

/// `meshctl export`: applies the ServiceExport; warns when the Service does not exist
/// (the export is kept, and becomes valid when the Service appears).
pub(crate) async fn export(args: &KubeArgs, name: &str, namespace: &str) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let context = &target.context;
    let services: Api<Service> = Api::namespaced(target.client.clone(), namespace);
    let service = services
        .get_opt(name)
        .await
        .with_context(|| format!("{context}: reading Service {namespace}/{name}"))?;
    let exports: Api<ServiceExport> = Api::namespaced(target.client.clone(), namespace);
    apply(
        &exports,
        &service_export(name, namespace),
        context,
        &format!("ServiceExport {namespace}/{name}"),
    )
    .await
    .context("is the ServiceExport CRD installed? (`meshctl install` installs it)")?;
    if service.is_none() {
        say(format!(
            "{context}: warning: no Service {namespace}/{name} yet; the export is Valid=False (NoService) until it exists"
        ));
    }
    Ok(())
}

/// `meshctl unexport`: deletes the ServiceExport ("not found" is success).
pub(crate) async fn unexport(args: &KubeArgs, name: &str, namespace: &str) -> Result<()> {
    let target = kubeconfig::current_target(args).await?;
    let exports: Api<ServiceExport> = Api::namespaced(target.client.clone(), namespace);
    delete(
        &exports,
        name,
        &target.context,
        &format!("ServiceExport {namespace}/{name}"),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_is_a_bare_service_export_of_that_name() {
        let json = serde_json::to_value(service_export("hello", "demo")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1beta1",
                "kind": "ServiceExport",
                "metadata": {
                    "name": "hello",
                    "namespace": "demo",
                    "labels": {"app.kubernetes.io/managed-by": "meshctl"},
                },
            })
        );
    }
}
