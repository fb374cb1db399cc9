//! Issue 16: the Wiremesh image under a real kubelet. Three lab hosts (a1 and a2 of
//! cluster-a, b1 of cluster-b) run a real `kubelet` with Debian's `containerd` and `runc`
//! ([`wiremesh_lab::kubelet`]); the image is built offline by `scripts/oci-image.sh` and
//! imported with `ctr`; `helm install` of the chart with that image in each cluster
//! schedules the agent DaemonSet and the controller Deployment as real pods (a real
//! kube-scheduler, a real kube-controller-manager), which must become Ready through their
//! own probes, with the user, capabilities, read-only root filesystem, hostPath and device
//! mounts and the pod-bound token the chart gives them. Then `meshctl join` links the two
//! clusters, pods cross through the containerised agents (checksummed transfers), and a
//! rolling update of cluster-a's DaemonSet (a new image tag) runs during one long transfer
//! that must arrive intact with no plaintext on the underlay.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod as PodObject};
use kube::api::{Api, ListParams};
use wiremesh_lab::deploy::helm;
use wiremesh_lab::k8s::{ControlPlane, block_on, create_node, meshctl_binary, write_kubeconfig};
use wiremesh_lab::kubelet::{
    self, API_ADDRESS, ClusterDaemons, KubeletNode, NodeBinaries, PLANE_ENV,
};
use wiremesh_lab::lab::{Host, Lab, MIB, Netns, Pod, Proc, reachable, transfer, transfer_paced};
use wiremesh_lab::mesh::{capture_during, eventually};
use wiremesh_lab::prometheus::{self, Prometheus};
use wiremesh_proto::crd::MeshNode;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/wiremesh");
const IMAGE_REPOSITORY: &str = "wiremesh.invalid/wiremesh";
const NAMESPACE: &str = "wiremesh-system";
/// Pods start in seconds here; the bound covers a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// In the pings sent during the rolling update, to be looked for on the underlay.
const MARKER: &[u8] = b"KUBELETROLL";
const MARKER_HEX: &str = "4b5542454c4554524f4c4c";
/// The long transfer that spans the rolling update: 50 MiB at 2 MiB/s, 25 s (the roll
/// took 7 s here).
const ROLL_BYTES: u64 = 50 * MIB;
const ROLL_RATE: u64 = 2 * MIB;

/// `kubectl get pods -o wide`, from the API.
fn pods_table(pods: &[PodObject]) -> String {
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

/// Ready as a kubelet of the pinned version reports it (the lab's Node objects start with
/// a Ready condition of their own, and no node info).
fn node_ready(node: &Node) -> bool {
    let kubelet = node
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .is_some_and(|i| i.kubelet_version == "v1.34.4");
    kubelet
        && node
            .status
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

/// One cluster of kubelet nodes. Fields drop in order: nodes, then the scheduler and
/// controller manager, then the plane.
struct KubeletCluster {
    name: &'static str,
    pod_range: &'static str,
    nodes: Vec<KubeletNode>,
    daemons: ClusterDaemons,
    plane: ControlPlane,
}

impl KubeletCluster {
    fn kubeconfig(&self) -> Result<&str> {
        self.plane.kubeconfig().to_str().context("UTF-8 path")
    }

    fn helm(&self, verb: &str, values: &[String], flags: &[&str]) -> Result<String> {
        let mut args = vec![
            verb.to_owned(),
            "wiremesh".to_owned(),
            CHART.to_owned(),
            "--kubeconfig".to_owned(),
            self.kubeconfig()?.to_owned(),
            "--namespace".to_owned(),
            "default".to_owned(),
        ];
        for v in values {
            args.extend(["--set".to_owned(), v.clone()]);
        }
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        helm(&args, Duration::from_secs(120))
    }

    fn pods(&self) -> Result<Vec<PodObject>> {
        let api: Api<PodObject> = Api::namespaced(self.plane.client()?, NAMESPACE);
        Ok(block_on(api.list(&ListParams::default()))?.items)
    }

    /// (agents ready, agents updated to the newest template, controllers ready).
    fn workloads(&self) -> Result<(i32, i32, i32)> {
        let client = self.plane.client()?;
        let ds = block_on(
            Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE).get("wiremesh-agent"),
        )?;
        let dep =
            block_on(Api::<Deployment>::namespaced(client, NAMESPACE).get("wiremesh-controller"))?;
        let current = ds
            .status
            .as_ref()
            .is_some_and(|s| s.observed_generation == ds.metadata.generation);
        let (ready, updated) = ds.status.map_or((0, 0), |s| {
            (s.number_ready, s.updated_number_scheduled.unwrap_or(0))
        });
        let controllers = dep.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        Ok((ready, if current { updated } else { 0 }, controllers))
    }

    fn wait_ready(&self) -> Result<()> {
        let want = i32::try_from(self.nodes.len())?;
        wait_until(
            &format!(
                "{}: the agent DaemonSet and the controller Deployment are Ready",
                self.name
            ),
            &self.nodes,
            || {
                let (agents, _, controllers) = self.workloads()?;
                let nodes =
                    block_on(Api::<Node>::all(self.plane.client()?).list(&ListParams::default()))?;
                Ok((
                    agents == want && controllers == 2,
                    format!(
                        "agents ready {agents}/{want}, controllers ready {controllers}/2\n{}{}\n---- scheduler ----\n{}",
                        pods_table(&self.pods()?),
                        nodes_summary(&nodes.items),
                        tail(&self.daemons.scheduler.stderr(), 30),
                    ),
                ))
            },
        )
    }

    /// Each node's MeshNode key, published by the agent in its container.
    fn keys(&self) -> Result<BTreeMap<String, String>> {
        let api: Api<MeshNode> = Api::all(self.plane.client()?);
        let mut keys = BTreeMap::new();
        for node in &self.nodes {
            let mesh_node = block_on(api.get(node.name())).with_context(|| {
                format!("MeshNode {} from the agent in the container", node.name())
            })?;
            keys.insert(node.name().to_owned(), mesh_node.spec.public_key);
        }
        Ok(keys)
    }
}

fn start_cluster(
    lab: &Lab,
    bins: &NodeBinaries,
    plane: ControlPlane,
    pod_range: &'static str,
    name: &'static str,
) -> Result<KubeletCluster> {
    let daemons = ClusterDaemons::start(lab, &plane, bins)?;
    Ok(KubeletCluster {
        name,
        pod_range,
        nodes: Vec::new(),
        daemons,
        plane,
    })
}

/// Adds lab host `name` (underlay `ip`, pods `pod_cidr`) with a lab pod, its Node object,
/// and a kubelet that reaches `cluster`'s plane and `remote`'s.
fn add_node(
    lab: &Lab,
    bins: &NodeBinaries,
    cluster: &mut KubeletCluster,
    remote: &ControlPlane,
    (name, ip, pod_cidr): (&str, Ipv4Addr, &str),
    images: &[&std::path::Path],
) -> Result<(Host, Pod)> {
    let host = lab.add_host(name, ip, pod_cidr)?;
    let pod = host.add_pod(&format!("{name}-p"))?;
    create_node(&cluster.plane.client()?, name, pod_cidr, ip)?;
    cluster.nodes.push(KubeletNode::start(
        lab,
        &host,
        &cluster.plane,
        bins,
        images,
        &[remote],
    )?);
    Ok((host, pod))
}

fn spawn_marked_pings(from: &Netns, to: Ipv4Addr, count: u32) -> Result<Proc> {
    let (count, to) = (count.to_string(), to.to_string());
    from.spawn(&[
        "ping", "-n", "-q", "-i", "0.01", "-c", &count, "-p", MARKER_HEX, &to,
    ])
}

#[test]
fn the_image_runs_under_a_real_kubelet_and_carries_pod_traffic() -> Result<()> {
    let t0 = Instant::now();
    let bins = NodeBinaries::build()?;
    let lab = Lab::new()?;
    let images: Vec<_> = ["lab1", "lab2"]
        .iter()
        .map(|tag| lab.dir().join(format!("wiremesh-{tag}.tar")))
        .collect();
    for (tag, path) in ["lab1", "lab2"].iter().zip(&images) {
        kubelet::build_image(&format!("{IMAGE_REPOSITORY}:{tag}"), path)?;
    }
    let images: Vec<&std::path::Path> = images.iter().map(|p| p.as_path()).collect();
    eprintln!("node: images built ({:.1} s)", t0.elapsed().as_secs_f64());

    let plane_b = std::thread::spawn(|| ControlPlane::start_with_env("cluster-b", &PLANE_ENV));
    let plane_a = ControlPlane::start_with_env("cluster-a", &PLANE_ENV)?;
    let plane_b = plane_b
        .join()
        .map_err(|_| anyhow::anyhow!("starting cluster-b panicked"))??;
    let mut b = start_cluster(&lab, &bins, plane_b, "10.2.0.0/16", "cluster-b")?;
    let mut a = start_cluster(&lab, &bins, plane_a, "10.1.0.0/16", "cluster-a")?;
    let a_nodes = [
        ("a1", Ipv4Addr::new(198, 18, 1, 1), "10.1.1.0/24"),
        ("a2", Ipv4Addr::new(198, 18, 1, 2), "10.1.2.0/24"),
    ];
    let mut hosts = Vec::new();
    let mut pods = Vec::new();
    for node in a_nodes {
        let (host, pod) = add_node(&lab, &bins, &mut a, &b.plane, node, &images)?;
        hosts.push(host);
        pods.push(pod);
    }
    let (b1_host, b1_pod) = add_node(
        &lab,
        &bins,
        &mut b,
        &a.plane,
        ("b1", Ipv4Addr::new(198, 18, 2, 1), "10.2.1.0/24"),
        &images,
    )?;
    // Default routes onto the underlay, as cloud VMs have: were an agent to let a packet
    // for the other cluster out unencrypted, it would cross the underlay and be seen.
    for host in &hosts {
        host.set_default_route(b1_host.underlay_ip())?;
    }
    b1_host.set_default_route(hosts[0].underlay_ip())?;

    for cluster in [&a, &b] {
        let api: Api<Node> = Api::all(cluster.plane.client()?);
        let want = cluster.nodes.len();
        wait_until(
            &format!("{}: the kubelets report their Nodes Ready", cluster.name),
            &cluster.nodes,
            || {
                let list = block_on(api.list(&ListParams::default()))?;
                let ready = list.items.iter().filter(|n| node_ready(n)).count();
                Ok((ready == want, nodes_summary(&list.items)))
            },
        )?;
    }

    for cluster in [&a, &b] {
        let out = cluster.helm(
            "install",
            &[
                format!("clusterName={}", cluster.name),
                format!("podCIDRs={{{}}}", cluster.pod_range),
                format!("image.repository={IMAGE_REPOSITORY}"),
                "image.tag=lab1".to_owned(),
                "image.pullPolicy=Never".to_owned(),
                format!("apiServer.host={API_ADDRESS}"),
                format!("apiServer.port={}", cluster.plane.api_port()),
                "logFormat=human".to_owned(),
            ],
            &[],
        )?;
        assert!(out.contains("STATUS: deployed"), "{out}");
    }
    for cluster in [&a, &b] {
        cluster.wait_ready()?;
        eprintln!(
            "node: {} pods in {NAMESPACE}:\n{}",
            cluster.name,
            pods_table(&cluster.pods()?)
        );
    }

    // Every agent pod runs on its own node, from the offline image, and published its
    // node's key with its pod-bound token (the admission policy lets a token bound to a
    // pod on node X write only MeshNode X).
    for cluster in [&a, &b] {
        let mut on_node = Vec::new();
        for pod in cluster.pods()? {
            let spec = pod.spec.clone().unwrap_or_default();
            let image = spec
                .containers
                .first()
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            assert_eq!(image, format!("{IMAGE_REPOSITORY}:lab1"));
            if is_agent(&pod) {
                on_node.push(spec.node_name.unwrap_or_default());
            }
        }
        on_node.sort();
        let names: Vec<String> = cluster.nodes.iter().map(|n| n.name().to_owned()).collect();
        assert_eq!(on_node, names, "{}: one agent pod per node", cluster.name);
        let keys = cluster.keys()?;
        assert!(keys.values().all(|k| !k.is_empty()), "{keys:?}");
    }
    // The key is on the node's hostPath (the node's own directory behind
    // /var/lib/wiremesh), not in the container: it survives the pod.
    for host in hosts.iter().chain([&b1_host]) {
        let dir = lab
            .dir()
            .join(format!("kubelet-{}/hostpath/state", host.name()));
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .count();
        assert!(
            entries > 0,
            "{}: the agent kept no state on its hostPath",
            dir.display()
        );
    }
    let keys_before = a.keys()?;

    // Link the clusters. meshctl runs on a1 (it reaches both API servers at API_ADDRESS,
    // the address the controllers in their pods use for the other cluster too).
    let merged = write_kubeconfig(&[&a.plane, &b.plane], "cluster-a")?;
    let text = std::fs::read_to_string(&merged)?
        .replace("https://127.0.0.1:", &format!("https://{API_ADDRESS}:"));
    let kubeconfig = lab.dir().join("kubeconfig-nodes");
    std::fs::write(&kubeconfig, text)?;
    let meshctl = meshctl_binary()?;
    let env = format!("KUBECONFIG={}", kubeconfig.display());
    let joined = hosts[0].exec_timeout(
        &[
            "env",
            &env,
            meshctl.to_str().context("UTF-8 path")?,
            "join",
            "cluster-b",
        ],
        Duration::from_secs(120),
    )?;
    anyhow::ensure!(
        joined.status.success(),
        "meshctl join cluster-b: {}{}",
        String::from_utf8_lossy(&joined.stdout),
        String::from_utf8_lossy(&joined.stderr)
    );
    eprintln!(
        "node: meshctl join cluster-b:\n{}",
        String::from_utf8_lossy(&joined.stdout)
    );
    let linked = Instant::now();
    let all = [
        (&pods[0], b1_pod.ip()),
        (&pods[1], b1_pod.ip()),
        (&b1_pod, pods[0].ip()),
        (&b1_pod, pods[1].ip()),
    ];
    eventually(Duration::from_secs(120), || {
        for (from, to) in &all {
            anyhow::ensure!(reachable(from, *to)?, "{} cannot reach {to}", from.name());
        }
        Ok(())
    })
    .with_context(|| {
        let logs: String = a.nodes.iter().chain(&b.nodes).map(|n| n.logs(20)).collect();
        logs
    })?;
    eprintln!(
        "node: every pod reaches the other cluster's pods {:.1} s after the join",
        linked.elapsed().as_secs_f64()
    );
    let there = transfer(&pods[0], b1_pod.ip(), 16 * MIB)?;
    let back = transfer(&b1_pod, pods[1].ip(), 16 * MIB)?;
    eprintln!(
        "node: through the containerised agents: a1 -> b1 {} MiB intact (SHA-256 {}, {:.0} Mbit/s), b1 -> a2 {} MiB intact ({:.0} Mbit/s)",
        there.bytes / MIB,
        there.sha256,
        there.mbit_per_s(),
        back.bytes / MIB,
        back.mbit_per_s()
    );

    // Debian's Prometheus, on a1, scrapes cluster-a's pods as their own annotations say
    // (the real Pod objects, their IPs, annotations and labels, as `role: pod` discovery
    // gives them: Debian builds Prometheus without Kubernetes discovery): every agent and
    // controller pod is a target and up, and the agents' series carry the peer's cluster
    // and node. (Pods on the other node of the same cluster are reached through it, as a
    // cluster's CNI routes them.)
    hosts[0].ip(&[
        "route",
        "add",
        "10.1.2.0/24",
        "via",
        &hosts[1].underlay_ip().to_string(),
    ])?;
    hosts[1].ip(&[
        "route",
        "add",
        "10.1.1.0/24",
        "via",
        &hosts[0].underlay_ip().to_string(),
    ])?;
    let prometheus = Prometheus::start(
        &hosts[0],
        &lab.dir().join("prometheus"),
        &prometheus::observed_config(&a.pods()?, a.name)?,
    )?;
    let pod_names: BTreeSet<String> = a
        .pods()?
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    eventually(Duration::from_secs(60), || {
        let targets = prometheus.targets()?;
        let up: BTreeSet<String> = targets
            .iter()
            .filter(|t| t["health"] == "up")
            .filter_map(|t| t["labels"]["pod"].as_str().map(str::to_owned))
            .collect();
        anyhow::ensure!(
            up == pod_names && targets.len() == pod_names.len(),
            "targets up {up:?} of {pod_names:?}: {targets:#?}"
        );
        Ok(())
    })
    .with_context(|| prometheus.log())?;
    let sent = eventually(Duration::from_secs(10), || {
        let series = prometheus.query(
            "wiremesh_peer_transmit_bytes_total{peer_cluster=\"cluster-b\",peer_node=\"b1\"}",
        )?;
        let nodes: BTreeSet<&str> = series.iter().map(|s| s.label("node")).collect();
        anyhow::ensure!(nodes == BTreeSet::from(["a1", "a2"]), "series {series:?}");
        Ok(series)
    })?;
    let leader = prometheus.query("wiremesh_controller_peer_nodes{peer=\"cluster-b\"} == 1")?;
    anyhow::ensure!(
        !leader.is_empty(),
        "no controller reports cluster-b's one node mirrored"
    );
    eprintln!(
        "node: Prometheus scrapes the {} pods of cluster-a as their annotations say, all up; bytes sent to cluster-b/b1: {}",
        pod_names.len(),
        sent.iter()
            .map(|s| format!("{}={}", s.label("node"), s.value))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(prometheus);

    // The rolling update: a new image tag for cluster-a. The DaemonSet replaces one agent
    // at a time while one TCP connection from a1's pod to b1's pod runs at 2 MiB/s, and
    // marked pings go the same way; nothing marked may cross the underlay.
    let underlay = lab.default_underlay().clone();
    let (capture, (report, roll)) = capture_during(&underlay, MARKER, || {
        let pings = spawn_marked_pings(&pods[1], b1_pod.ip(), 2000)?;
        let result = std::thread::scope(|scope| -> Result<_> {
            let (from, to) = (&pods[0], &b1_pod);
            let sending =
                scope.spawn(move || transfer_paced(from, to, to.ip(), ROLL_BYTES, ROLL_RATE));
            std::thread::sleep(Duration::from_secs(2));
            let started = Instant::now();
            a.helm(
                "upgrade",
                &["image.tag=lab2".to_owned()],
                &["--reuse-values"],
            )?;
            let mut fewest_ready = i32::MAX;
            wait_until("cluster-a: the agents rolled to lab2", &a.nodes, || {
                let (ready, updated, _) = a.workloads()?;
                fewest_ready = fewest_ready.min(ready);
                let images: Vec<String> = a
                    .pods()?
                    .iter()
                    .filter(|p| is_agent(p))
                    .filter_map(|p| p.spec.as_ref()?.containers.first()?.image.clone())
                    .collect();
                let done = ready == 2
                    && updated == 2
                    && images.iter().all(|i| i.ends_with(":lab2"))
                    && images.len() == 2;
                Ok((
                    done,
                    format!(
                        "ready {ready}, updated {updated}, images {images:?}\n{}",
                        pods_table(&a.pods()?)
                    ),
                ))
            })?;
            let rolled = started.elapsed();
            let report = sending
                .join()
                .map_err(|_| anyhow::anyhow!("the transfer panicked"))??;
            Ok((report, (rolled, fewest_ready)))
        });
        let _ = pings.wait_with_timeout(Duration::from_secs(30));
        result
    })?;
    let (rolled, fewest_ready) = roll;
    eprintln!(
        "node: rolling update to lab2 in {:.1} s (never fewer than {fewest_ready} of 2 agents ready) during one {} MiB transfer of {:.1} s: intact (SHA-256 {}); {} WireGuard data frames on the underlay, plaintext seen {} times",
        rolled.as_secs_f64(),
        report.bytes / MIB,
        report.elapsed.as_secs_f64(),
        report.sha256,
        capture.wireguard_data,
        capture.marker_hits
    );
    eprintln!(
        "node: cluster-a pods after the roll:\n{}",
        pods_table(&a.pods()?)
    );
    anyhow::ensure!(
        rolled < report.elapsed,
        "the roll ({rolled:?}) outlasted the transfer ({:?})",
        report.elapsed
    );
    anyhow::ensure!(
        fewest_ready >= 1,
        "both agents were down at once during the roll"
    );
    anyhow::ensure!(
        capture.marker_hits == 0,
        "rolling update: plaintext crossed the underlay {} times",
        capture.marker_hits
    );
    anyhow::ensure!(
        capture.wireguard_data > 0,
        "no WireGuard data frames seen: the capture saw nothing"
    );
    assert_eq!(
        a.keys()?,
        keys_before,
        "the new agents reuse the node keys on their hostPath"
    );

    drop(a);
    drop(b);
    eprintln!("node: done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn is_agent(pod: &PodObject) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/component"))
        .is_some_and(|c| c == "agent")
}
