//! A real Prometheus (Debian's `prometheus`) in a lab namespace, scraping the lab's agents
//! and controllers the way the chart advertises them, and its HTTP API.
//!
//! The scrape configuration is not written by hand: each pod becomes the target Kubernetes
//! service discovery (`role: pod`) would make of it, with the `__meta_kubernetes_pod_*`
//! labels taken from its workload's pod template in `deploy/wiremesh.yaml` (the
//! `prometheus.io/*` annotations and the labels), and the job relabels them with the
//! `kubernetes-pods` rules of Prometheus's example configuration
//! (`documentation/examples/prometheus-kubernetes.yml`): keep what says
//! `prometheus.io/scrape: "true"`, scrape the annotated path on the annotated port.
//! Prometheus listens on the namespace's loopback only.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use kube::ResourceExt as _;
use serde_json::{Value, json};
use wiremesh_controller::manifest;
use wiremesh_proto::crd::SYSTEM_NAMESPACE;

use crate::deploy;
use crate::lab::{Netns, Proc};
use crate::mesh::in_netns;

/// Where Prometheus listens, inside its namespace.
pub const LISTEN: &str = "127.0.0.1:9090";
/// How often it scrapes and evaluates: often, so a short test has enough samples.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// A pod of one of the chart's workloads, as the lab runs it.
#[derive(Debug, Clone)]
pub struct PodTarget {
    /// The workload's kind and name in `deploy/wiremesh.yaml`, e.g.
    /// (`DaemonSet`, `wiremesh-agent`).
    pub workload: (&'static str, &'static str),
    /// The Pod's name.
    pub pod: String,
    /// The node it runs on.
    pub node: String,
    /// Its IP (the node's for a `hostNetwork` pod).
    pub ip: IpAddr,
    /// The lab cluster it belongs to, a label on every target.
    pub cluster: String,
}

/// The `__meta_kubernetes_pod_*` labels service discovery derives from the pod template of
/// workload `kind` `name` in `deploy/wiremesh.yaml`: one per annotation and per label, the
/// name sanitised as Prometheus does (every character outside `[a-zA-Z0-9_]` becomes `_`).
///
/// # Errors
/// When the manifest has no such workload.
pub fn template_meta(kind: &str, name: &str) -> Result<BTreeMap<String, String>> {
    let objects = deploy::objects()?;
    let object = objects
        .iter()
        .find(|o| manifest::kind(o) == kind && o.name_any() == name)
        .ok_or_else(|| anyhow!("deploy/wiremesh.yaml has no {kind} {name}"))?;
    let metadata = object
        .data
        .pointer("/spec/template/metadata")
        .ok_or_else(|| anyhow!("{kind} {name} has no pod template metadata"))?;
    let mut meta = BTreeMap::new();
    for (field, prefix) in [
        ("annotations", "__meta_kubernetes_pod_annotation_"),
        ("labels", "__meta_kubernetes_pod_label_"),
    ] {
        for (key, value) in metadata[field].as_object().into_iter().flatten() {
            let value = value
                .as_str()
                .ok_or_else(|| anyhow!("{kind} {name}: {field} {key} is not a string"))?;
            meta.insert(format!("{prefix}{}", sanitise(key)), value.to_owned());
        }
    }
    Ok(meta)
}

/// The Prometheus configuration that scrapes `pods` (JSON, which is YAML).
///
/// # Errors
/// When a pod's workload is not in `deploy/wiremesh.yaml`.
pub fn config(pods: &[PodTarget]) -> Result<Value> {
    let mut groups = Vec::new();
    for pod in pods {
        let (kind, name) = pod.workload;
        let mut labels = template_meta(kind, name)?;
        labels.insert(
            "__meta_kubernetes_namespace".to_owned(),
            SYSTEM_NAMESPACE.to_owned(),
        );
        labels.insert("__meta_kubernetes_pod_name".to_owned(), pod.pod.clone());
        labels.insert(
            "__meta_kubernetes_pod_node_name".to_owned(),
            pod.node.clone(),
        );
        labels.insert("cluster".to_owned(), pod.cluster.clone());
        groups.push(json!({ "targets": [pod.ip.to_string()], "labels": labels }));
    }
    Ok(scrape_config(groups))
}

/// The configuration that scrapes the pods of `pods` that Kubernetes runs for real (read
/// from the API server; [`crate::kubelet`]), each as `role: pod` service discovery would
/// make a target of it: its IP, its own annotations and labels as
/// `__meta_kubernetes_pod_annotation_*`/`_label_*`, its namespace, name and node. Debian's
/// `prometheus` is built without Kubernetes service discovery (`kubernetes_sd_configs`:
/// "field not found"), so the lab does the discovery step and Prometheus the rest (the same
/// relabelling as [`config`]). Pods without an IP yet are left out.
///
/// # Errors
/// When an annotation or label name cannot be a label name.
pub fn observed_config(pods: &[k8s_openapi::api::core::v1::Pod], cluster: &str) -> Result<Value> {
    let mut groups = Vec::new();
    for pod in pods {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let mut labels = BTreeMap::new();
        for (map, prefix) in [
            (
                &pod.metadata.annotations,
                "__meta_kubernetes_pod_annotation_",
            ),
            (&pod.metadata.labels, "__meta_kubernetes_pod_label_"),
        ] {
            for (key, value) in map.iter().flatten() {
                labels.insert(format!("{prefix}{}", sanitise(key)), value.clone());
            }
        }
        labels.insert(
            "__meta_kubernetes_namespace".to_owned(),
            pod.metadata.namespace.clone().unwrap_or_default(),
        );
        labels.insert("__meta_kubernetes_pod_name".to_owned(), pod.name_any());
        labels.insert(
            "__meta_kubernetes_pod_node_name".to_owned(),
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
        );
        labels.insert("cluster".to_owned(), cluster.to_owned());
        groups.push(json!({ "targets": [ip], "labels": labels }));
    }
    Ok(scrape_config(groups))
}

fn scrape_config(groups: Vec<Value>) -> Value {
    let interval = format!("{}s", SCRAPE_INTERVAL.as_secs());
    json!({
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "static_configs": groups,
            "relabel_configs": kubernetes_pods_relabeling(),
        }],
    })
}

/// The `kubernetes-pods` job's rules from Prometheus's example configuration: keep what
/// says `prometheus.io/scrape: "true"`, scrape the annotated path on the annotated port,
/// and label each series with the pod's labels, namespace, name and node.
fn kubernetes_pods_relabeling() -> Value {
    json!([
        {
            "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
            "action": "keep",
            "regex": "true",
        },
        {
            "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
            "action": "replace",
            "target_label": "__metrics_path__",
            "regex": "(.+)",
        },
        {
            "source_labels": [
                "__address__",
                "__meta_kubernetes_pod_annotation_prometheus_io_port",
            ],
            "action": "replace",
            "regex": "([^:]+)(?::\\d+)?;(\\d+)",
            "replacement": "$1:$2",
            "target_label": "__address__",
        },
        { "action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)" },
        {
            "source_labels": ["__meta_kubernetes_namespace"],
            "action": "replace",
            "target_label": "namespace",
        },
        {
            "source_labels": ["__meta_kubernetes_pod_name"],
            "action": "replace",
            "target_label": "pod",
        },
        {
            "source_labels": ["__meta_kubernetes_pod_node_name"],
            "action": "replace",
            "target_label": "node",
        },
    ])
}

/// A Prometheus process in a namespace; stopped when dropped.
pub struct Prometheus {
    ns: Netns,
    process: Proc,
    dir: PathBuf,
}

impl Prometheus {
    /// Writes `config` under `dir` and starts Prometheus in `ns` with it, its database in
    /// `dir` too; returns once its API answers.
    ///
    /// # Errors
    /// When `promtool check config` refuses the configuration, or Prometheus does not
    /// start (it is missing: `scripts/deps.sh --k8s` installs it).
    pub fn start(ns: &Netns, dir: &Path, config: &Value) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_vec_pretty(config)?)?;
        let config_path = path_str(&config_file)?;
        let check = std::process::Command::new("promtool")
            .args(["check", "config", config_path])
            .output()
            .context("running promtool: install Debian's prometheus (scripts/deps.sh --k8s)")?;
        ensure!(
            check.status.success(),
            "promtool check config {config_path}:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let data = dir.join("data");
        let process = ns.spawn(&[
            "prometheus",
            &format!("--config.file={config_path}"),
            &format!("--storage.tsdb.path={}", path_str(&data)?),
            &format!("--web.listen-address={LISTEN}"),
            "--log.level=warn",
        ])?;
        let prometheus = Self {
            ns: ns.clone(),
            process,
            dir: dir.to_owned(),
        };
        let mut last = anyhow!("not tried");
        for _ in 0..100 {
            match prometheus.api("/api/v1/status/buildinfo") {
                Ok(_) => return Ok(prometheus),
                Err(e) => last = e,
            }
            ensure!(
                prometheus.process.is_running(),
                "prometheus exited:\n{}",
                prometheus.process.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("prometheus does not answer: {last:#}")
    }

    /// Its directory (configuration and database).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    /// `GET path` of its HTTP API; returns `data` of a `"status": "success"` answer.
    ///
    /// # Errors
    /// When it cannot be reached or answers an error.
    pub fn api(&self, path: &str) -> Result<Value> {
        let body = get(&self.ns, LISTEN, path)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {path}: not JSON: {body:?}"))?;
        ensure!(answer["status"] == "success", "GET {path}: {answer}");
        Ok(answer["data"].clone())
    }

    /// The active targets (`/api/v1/targets`).
    ///
    /// # Errors
    /// As [`Prometheus::api`].
    pub fn targets(&self) -> Result<Vec<Value>> {
        Ok(self.api("/api/v1/targets?state=active")?["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// An instant query (`/api/v1/query`): every series of the resulting vector, or the
    /// one scalar as a series without labels.
    ///
    /// # Errors
    /// As [`Prometheus::api`]; a result that is neither a vector nor a scalar.
    pub fn query(&self, promql: &str) -> Result<Vec<Series>> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(Series::from_api)
                .collect(),
            Some("scalar") => Ok(vec![Series {
                labels: BTreeMap::new(),
                value: parse_value(&data["result"])?,
            }]),
            other => bail!("{promql}: result type {other:?}"),
        }
    }

    /// The values of `label` over the series `selector` matches (`/api/v1/series`), as
    /// Grafana's `label_values(selector, label)` finds them.
    ///
    /// # Errors
    /// As [`Prometheus::api`].
    pub fn label_values(&self, selector: &str, label: &str) -> Result<Vec<String>> {
        let data = self.api(&format!("/api/v1/series?match[]={}", url_encode(selector)))?;
        let mut values: Vec<String> = data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[label].as_str().map(str::to_owned))
            .collect();
        values.sort();
        values.dedup();
        Ok(values)
    }
}

/// One series of a query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Series {
    fn from_api(item: &Value) -> Result<Self> {
        let labels = item["metric"]
            .as_object()
            .context("a series without labels")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        Ok(Self {
            labels,
            value: parse_value(&item["value"])?,
        })
    }

    /// The value of `label`, empty when absent.
    pub fn label(&self, label: &str) -> &str {
        self.labels.get(label).map_or("", String::as_str)
    }
}

/// `[timestamp, "value"]`.
fn parse_value(pair: &Value) -> Result<f64> {
    let text = pair[1].as_str().context("a sample without a value")?;
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        v => v.parse().with_context(|| format!("value {v:?}")),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `GET path` from `addr` in `ns` as HTTP/1.0, so the answer is never chunked; the body of
/// a 200.
fn get(ns: &Netns, addr: &str, path: &str) -> Result<String> {
    let addr: SocketAddr = addr.parse().context("Prometheus address")?;
    let path = path.to_owned();
    in_netns(ns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP response: {response:?}"))?;
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "GET {path}: {head}\n{body}"
        );
        Ok(body.to_owned())
    })
}

fn sanitise(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            url_encode(r#"sum by (a) (rate(x{b=~"c|d"}[5m])) > 0"#),
            "sum%20by%20%28a%29%20%28rate%28x%7Bb%3D~%22c%7Cd%22%7D%5B5m%5D%29%29%20%3E%200"
        );
    }

    #[test]
    fn the_chart_advertises_both_workloads_for_scraping() {
        for (kind, name, port) in [
            ("DaemonSet", "wiremesh-agent", "9586"),
            ("Deployment", "wiremesh-controller", "9587"),
        ] {
            let meta = template_meta(kind, name).unwrap();
            let annotation =
                |k: &str| meta[&format!("__meta_kubernetes_pod_annotation_{k}")].clone();
            assert_eq!(annotation("prometheus_io_scrape"), "true");
            assert_eq!(annotation("prometheus_io_port"), port);
            assert_eq!(annotation("prometheus_io_path"), "/metrics");
            assert!(meta.contains_key("__meta_kubernetes_pod_label_app_kubernetes_io_component"));
        }
    }
}
