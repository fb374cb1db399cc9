//! The manifests in `deploy/` as the lab uses them: the agent DaemonSet's and the
//! controller Deployment's container (command, args, env, volume mounts), read from
//! `deploy/wiremesh.yaml` and turned into a command line, so the lab runs the agents and
//! controllers exactly as a cluster would; pod-bound ServiceAccount tokens as the kubelet
//! would mount them; and Helm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, PostParams};
use kube::{Api, Client, ResourceExt as _};
use wiremesh_controller::manifest;
use wiremesh_proto::crd::SYSTEM_NAMESPACE;

use crate::k8s::{ControlPlane, block_on};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every object of `deploy/wiremesh.yaml`, read from disk (not the copy built into
/// meshctl, so a test sees the file as it is).
///
/// # Errors
/// When the file cannot be read or parsed.
pub fn objects() -> Result<Vec<DynamicObject>> {
    let path = deploy_dir().join("wiremesh.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(manifest::parse(&text)?)
}

/// Where an environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// A literal.
    Value(String),
    /// The downward API: `fieldRef.fieldPath`, such as `spec.nodeName`.
    Field(String),
}

/// One container of a workload in `deploy/wiremesh.yaml`.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The container's command.
    pub command: Vec<String>,
    /// Its args.
    pub args: Vec<String>,
    /// Its environment, in order.
    pub env: Vec<(String, EnvSource)>,
    /// Its volume mounts' paths.
    pub mounts: Vec<String>,
}

impl Workload {
    /// The only container of `kind` `name` (e.g. `DaemonSet`, `wiremesh-agent`).
    ///
    /// # Errors
    /// When there is no such object, it has not exactly one container, or the container
    /// uses something this harness cannot reproduce (env from Secrets, for instance).
    pub fn from_manifest(kind: &str, name: &str) -> Result<Self> {
        let objects = objects()?;
        let object = objects
            .iter()
            .find(|o| manifest::kind(o) == kind && o.name_any() == name)
            .ok_or_else(|| anyhow!("deploy/wiremesh.yaml has no {kind} {name}"))?;
        let containers: Vec<Container> = serde_json::from_value(
            object
                .data
                .pointer("/spec/template/spec/containers")
                .cloned()
                .ok_or_else(|| anyhow!("{kind} {name} has no containers"))?,
        )?;
        let [container] = containers.as_slice() else {
            bail!("{kind} {name}: expected one container");
        };
        let mut env = Vec::new();
        for var in container.env.iter().flatten() {
            let source = match (&var.value, &var.value_from) {
                (Some(v), None) => EnvSource::Value(v.clone()),
                (None, Some(from)) => EnvSource::Field(
                    from.field_ref
                        .as_ref()
                        .map(|f| f.field_path.clone())
                        .ok_or_else(|| anyhow!("{kind} {name}: env {}: only fieldRef", var.name))?,
                ),
                _ => bail!("{kind} {name}: env {} has no value", var.name),
            };
            env.push((var.name.clone(), source));
        }
        Ok(Self {
            command: container.command.clone().unwrap_or_default(),
            args: container.args.clone().unwrap_or_default(),
            env,
            mounts: container
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.clone())
                .collect(),
        })
    }

    /// The program's file name (the last part of `command[0]`), e.g. `wiremesh-agent`.
    ///
    /// # Errors
    /// When the container has no command.
    pub fn program(&self) -> Result<&str> {
        let first = self
            .command
            .first()
            .ok_or_else(|| anyhow!("the container has no command"))?;
        Ok(first.rsplit('/').next().unwrap_or(first))
    }

    /// The environment with every `fieldRef` answered from `fields` (e.g.
    /// `spec.nodeName` → `a1`) and every value that is a path under one of `mounts`
    /// re-rooted by `mount_map` (which returns the lab's directory for a mount path, or
    /// `None` when the lab gives the process the same path, as the private mount
    /// namespace does for `/var/run/wireguard`).
    ///
    /// # Errors
    /// A `fieldRef` that `fields` does not answer.
    pub fn resolve_env(
        &self,
        fields: &BTreeMap<&str, String>,
        mount_map: impl Fn(&str) -> Option<PathBuf>,
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (name, source) in &self.env {
            let value = match source {
                EnvSource::Value(v) => self.remap(v, &mount_map),
                EnvSource::Field(path) => fields
                    .get(path.as_str())
                    .cloned()
                    .ok_or_else(|| anyhow!("env {name}: the lab does not provide {path}"))?,
            };
            out.push((name.clone(), value));
        }
        Ok(out)
    }

    fn remap(&self, value: &str, mount_map: &impl Fn(&str) -> Option<PathBuf>) -> String {
        for mount in &self.mounts {
            let rest = match value.strip_prefix(mount.as_str()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
                _ => continue,
            };
            if let Some(dir) = mount_map(mount) {
                return format!("{}{rest}", dir.display());
            }
        }
        value.to_owned()
    }
}

/// Creates the Pod object a DaemonSet or Deployment would (no kubelet runs it) in
/// `wiremesh-system`: `name`, on `node` if given, running as ServiceAccount `account`.
///
/// # Errors
/// When the API server refuses it.
pub fn create_pod(client: &Client, name: &str, node: Option<&str>, account: &str) -> Result<Pod> {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(SYSTEM_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: node.map(str::to_owned),
            service_account_name: Some(account.to_owned()),
            containers: vec![Container {
                name: "main".to_owned(),
                image: Some("wiremesh.invalid/lab:0".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    block_on(api.create(&PostParams::default(), &pod))
        .with_context(|| format!("creating Pod {SYSTEM_NAMESPACE}/{name}"))
}

/// A token for ServiceAccount `account` bound to `pod`, as the kubelet mounts into a
/// pod: the API server adds the pod's node to the token's user info
/// (`authentication.kubernetes.io/node-name`).
///
/// # Errors
/// When the TokenRequest fails.
pub fn pod_token(client: &Client, account: &str, pod: &Pod) -> Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let response = block_on(api.create_token_request(account, &PostParams::default(), &request))
        .with_context(|| format!("TokenRequest for {account} bound to Pod {}", pod.name_any()))?;
    response
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("TokenRequest for {account} returned no token"))
}

/// A Pod for `account` (on `node`) and a kubeconfig with its bound token, written to the
/// plane's directory: what the kubelet would give a pod of the DaemonSet or Deployment.
///
/// # Errors
/// As [`create_pod`] and [`pod_token`].
pub fn pod_kubeconfig(
    plane: &ControlPlane,
    pod_name: &str,
    node: Option<&str>,
    account: &str,
) -> Result<PathBuf> {
    let client = plane.client()?;
    let pod = create_pod(&client, pod_name, node, account)?;
    let token = pod_token(&client, account, &pod)?;
    plane.write_token_kubeconfig(&format!("pod-{pod_name}"), &token)
}

/// The Helm binary built by `tests/k8s/build-helm.sh` (which it runs; a no-op when
/// built).
///
/// # Errors
/// When the build fails.
pub fn helm_binary() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build-helm.sh");
    let out = Command::new(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8(out.stdout)?;
    let helm = PathBuf::from(dir.trim()).join("helm");
    ensure!(helm.exists(), "{} is missing", helm.display());
    Ok(helm)
}

/// Runs `helm args...` (bounded by `timeout`); returns stdout, fails with stderr.
///
/// # Errors
/// When helm fails or times out.
pub fn helm(args: &[&str], timeout: Duration) -> Result<String> {
    let helm = helm_binary()?;
    let out = Command::new("timeout")
        .arg(timeout.as_secs().to_string())
        .arg(&helm)
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("wiremesh-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("wiremesh-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("wiremesh-helm-data"),
        )
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    ensure!(
        out.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
