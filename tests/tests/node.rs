//! Issue 16: the Wiremesh image under a real kubelet. Two lab hosts run a real `kubelet`
//! with Debian's `containerd` and `runc` ([`wiremesh_lab::kubelet`]); the image is built
//! offline by `scripts/oci-image.sh` and imported with `ctr`; `helm install` of the chart
//! with that image schedules the agent DaemonSet and the controller Deployment as real
//! pods (a real kube-scheduler, a real kube-controller-manager), which must become Ready
//! through their own probes, with the user, capabilities, read-only root filesystem,
//! hostPath and device mounts and the pod-bound token the chart gives them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use wiremesh_lab::deploy::helm;
use wiremesh_lab::k8s::{ControlPlane, block_on, create_node};
use wiremesh_lab::kubelet::{
    self, API_ADDRESS, ClusterDaemons, KubeletNode, NodeBinaries, PLANE_ENV,
};
use wiremesh_lab::lab::Lab;
use wiremesh_proto::crd::MeshNode;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/wiremesh");
const IMAGE_REPOSITORY: &str = "wiremesh.invalid/wiremesh";
const NAMESPACE: &str = "wiremesh-system";
/// Pods start in seconds here; the bound covers a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// `kubectl get pods -o wide`, from the API.
fn pods_table(pods: &[Pod]) -> String {
    let mut out = format!(
        "{:<40} {:<6} {:<9} {:<9} {:<16} {}\n",
        "NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE"
    );
    for pod in pods {
        let status = pod.status.clone().unwrap_or_default();
        let containers = status.container_statuses.unwrap_or_default();
        let ready = containers.iter().filter(|c| c.ready).count();
        let restarts: i32 = containers.iter().map(|c| c.restart_count).sum();
        let _ = writeln!(
            out,
            "{:<40} {:<6} {:<9} {:<9} {:<16} {}",
            pod.metadata.name.clone().unwrap_or_default(),
            format!("{ready}/{}", containers.len()),
            status.phase.unwrap_or_default(),
            restarts,
            status.pod_ip.unwrap_or_default(),
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
        );
    }
    out
}

/// Ready as the kubelet itself reports it (the lab's Node objects start with a Ready
/// condition of their own).
fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "Ready"
                    && c.status == "True"
                    && c.reason.as_deref() == Some("KubeletReady")
            })
        })
}

/// Each node's conditions and taints, one line each.
fn nodes_summary(nodes: &[Node]) -> String {
    let mut out = String::new();
    for node in nodes {
        let conditions: Vec<String> = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                format!(
                    "{}={} ({})",
                    c.type_,
                    c.status,
                    c.reason.clone().unwrap_or_default()
                )
            })
            .collect();
        let taints: Vec<String> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        let _ = writeln!(
            out,
            "node {}: {} taints {taints:?}",
            node.metadata.name.clone().unwrap_or_default(),
            conditions.join(", ")
        );
    }
    out
}

/// Waits until `check` holds, printing what it saw last and the nodes' logs on a timeout.
fn wait_until(
    what: &str,
    nodes: &[KubeletNode],
    mut check: impl FnMut() -> Result<(bool, String)>,
) -> Result<()> {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < READY_TIMEOUT {
        match check() {
            Ok((true, _)) => {
                eprintln!("node: {what} after {:.1} s", t0.elapsed().as_secs_f64());
                return Ok(());
            }
            Ok((false, seen)) => last = seen,
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let logs: String = nodes.iter().map(|n| n.logs(40)).collect();
    bail!("{what}: not after {READY_TIMEOUT:?}; last seen:\n{last}\n{logs}")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn the_image_runs_under_a_real_kubelet() -> Result<()> {
    let t0 = Instant::now();
    let bins = NodeBinaries::build()?;
    let lab = Lab::new()?;
    let tag = "lab1";
    let image = lab.dir().join(format!("wiremesh-{tag}.tar"));
    kubelet::build_image(&format!("{IMAGE_REPOSITORY}:{tag}"), &image)?;
    eprintln!("node: image built ({:.1} s)", t0.elapsed().as_secs_f64());

    let plane = ControlPlane::start_with_env("cluster-a", &PLANE_ENV)?;
    let client = plane.client()?;
    let daemons = ClusterDaemons::start(&lab, &plane, &bins)?;
    let mut nodes = Vec::new();
    let mut hosts = Vec::new();
    for i in 1..=2u8 {
        let name = format!("a{i}");
        let pod_cidr = format!("10.1.{i}.0/24");
        let host = lab.add_host(&name, Ipv4Addr::new(198, 18, 1, i), &pod_cidr)?;
        create_node(&client, &name, &pod_cidr, host.underlay_ip())?;
        nodes.push(KubeletNode::start(
            &lab,
            &host,
            &plane,
            &bins,
            &[image.as_path()],
        )?);
        hosts.push(host);
    }
    let node_api: Api<Node> = Api::all(client.clone());
    wait_until("both kubelets report their Node Ready", &nodes, || {
        let list = block_on(node_api.list(&ListParams::default()))?;
        let ready: Vec<_> = list
            .items
            .iter()
            .filter(|n| node_ready(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        Ok((ready.len() == 2, nodes_summary(&list.items)))
    })?;

    let kubeconfig = plane.kubeconfig().to_str().context("UTF-8 path")?;
    let port = plane.api_port().to_string();
    let out = helm(
        &[
            "install",
            "wiremesh",
            CHART,
            "--kubeconfig",
            kubeconfig,
            "--namespace",
            "default",
            "--set",
            "clusterName=cluster-a",
            "--set",
            "podCIDRs={10.1.0.0/16}",
            "--set",
            &format!("image.repository={IMAGE_REPOSITORY}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--set",
            &format!("apiServer.host={API_ADDRESS}"),
            "--set",
            &format!("apiServer.port={port}"),
            "--set",
            "logFormat=human",
        ],
        Duration::from_secs(120),
    )?;
    assert!(out.contains("STATUS: deployed"), "{out}");

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    wait_until(
        "the agent DaemonSet and the controller Deployment are Ready",
        &nodes,
        || {
            let ds = block_on(daemonsets.get("wiremesh-agent"))?;
            let dep = block_on(deployments.get("wiremesh-controller"))?;
            let agents = ds.status.map(|s| s.number_ready).unwrap_or(0);
            let controllers = dep.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            let list = block_on(pods.list(&ListParams::default()))?;
            let node_list = block_on(node_api.list(&ListParams::default()))?;
            Ok((
                agents == 2 && controllers == 2,
                format!(
                    "agents ready {agents}/2, controllers ready {controllers}/2\n{}{}\n---- scheduler ----\n{}",
                    pods_table(&list.items),
                    nodes_summary(&node_list.items),
                    tail(&daemons.scheduler.stderr(), 30),
                ),
            ))
        },
    )?;
    let list = block_on(pods.list(&ListParams::default()))?;
    eprintln!("node: pods in {NAMESPACE}:\n{}", pods_table(&list.items));

    // Every agent pod runs on its own node, from the offline image, and published its
    // node's key with its pod-bound token (the admission policy lets a token bound to a
    // pod on node X write only MeshNode X).
    let mut on_node = BTreeMap::new();
    for pod in &list.items {
        let spec = pod.spec.clone().unwrap_or_default();
        let image = spec
            .containers
            .first()
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        assert_eq!(image, format!("{IMAGE_REPOSITORY}:{tag}"));
        if pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .is_some_and(|c| c == "agent")
        {
            on_node.insert(spec.node_name.unwrap_or_default(), pod.clone());
        }
    }
    assert_eq!(
        on_node.keys().cloned().collect::<Vec<_>>(),
        ["a1", "a2"],
        "one agent pod per node"
    );
    let mesh_nodes: Api<MeshNode> = Api::all(client.clone());
    for node in &nodes {
        let mesh_node = block_on(mesh_nodes.get(node.name()))
            .with_context(|| format!("MeshNode {} from the agent in the container", node.name()))?;
        assert!(
            !mesh_node.spec.public_key.is_empty(),
            "MeshNode {} has no key",
            node.name()
        );
    }
    // The key is on the node's hostPath (the node's own directory behind
    // /var/lib/wiremesh), not in the container: it survives the pod.
    for host in &hosts {
        let key = lab
            .dir()
            .join(format!("kubelet-{}/hostpath/state", host.name()));
        let entries: Vec<_> = std::fs::read_dir(&key)
            .with_context(|| format!("{}", key.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !entries.is_empty(),
            "{}: the agent kept no state on its hostPath",
            key.display()
        );
    }

    drop(nodes);
    eprintln!("node: done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
