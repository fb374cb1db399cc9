//! `make bench-mesh`: the mesh at scale. K real control planes (etcd + kube-apiserver on
//! loopback, as the lab starts them), each with N simulated nodes, the real controller (one
//! release `wiremesh-controller` per cluster, the leader), every pair joined with `meshctl
//! join`.
//!
//! What is simulated: the agents. For each node the simulator writes a `Node` and a
//! `MeshNode` (a fresh key, one endpoint, a /26 of pods), and, as a real agent does
//! (`agent/src/peers.rs`), writes its MeshNode status (one entry per tunnel, at most 1,024)
//! when its set of tunnels changed (on the agent's next 10 s tick) and every 300 s
//! otherwise. The agents learn of MeshPeer changes through one shared watch per cluster;
//! only a sample of `watchers` agents per cluster hold a MeshPeer watch of their own.
//! No data plane is simulated: no agent, no route.
//!
//! Measured per step: how long a MeshNode's creation, key change and deletion in one
//! cluster takes to show in every other cluster's MeshPeers; each controller's CPU,
//! memory and socket bytes (`/proc`); each API server's requests, bytes and watches
//! (`/metrics`); a fresh `meshctl join` of one more cluster; a controller restart and a
//! remote API server outage (time to converge, MeshPeers rewritten needlessly).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt as _};
use rand_core::{OsRng, RngCore as _};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use wiremesh_lab::k8s::{self, ControlPlane, block_on_timeout};
use wiremesh_lab::replica::Replica;
use wiremesh_proto::crd::{MeshNode, MeshPeer, mesh_peer_name};

use crate::{interrupt, procfs, progress, promtext, stats};

/// How often a real agent looks for a status change (`STATUS_INTERVAL`, agent/src/peers.rs).
const AGENT_TICK: Duration = Duration::from_secs(10);
/// How often a real agent rewrites an unchanged status (`STATUS_REFRESH`, agent/src/peers.rs).
const AGENT_REFRESH: Duration = Duration::from_secs(300);
/// Requests the simulator keeps in flight at once while creating nodes.
const POPULATE_CONCURRENCY: usize = 24;
/// Status writes in flight at once per cluster (the agents of a cluster are many
/// processes; the simulator shares two threads with everything else).
const STATUS_CONCURRENCY: usize = 8;
/// Pause between two measured changes, longer than the controller's 200 ms debounce.
const BETWEEN_CHANGES: Duration = Duration::from_millis(500);
/// Time given to the restarted controller and to the links after an outage to show
/// needless rewrites, once the probe change has converged.
const CHURN_WINDOW: Duration = Duration::from_secs(15);
/// Longest a single write of the bench may take (kube-apiserver's own request timeout is
/// 60 s): an API server that hangs fails the step instead of wedging it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// The K × N steps, in order.
    pub steps: Vec<Step>,
    /// Changes of each kind (creation, key change, deletion) timed per step.
    pub changes: usize,
    /// Length of the steady-state window.
    pub steady: Duration,
    /// Simulated agents per cluster that hold a MeshPeer watch of their own.
    pub watchers: usize,
    /// Whether simulated agents write their status.
    pub status_writes: bool,
    /// Length of the remote API server outage.
    pub outage: Duration,
    /// Longest wait for any convergence.
    pub timeout: Duration,
}

/// K clusters of N nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Clusters.
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes: usize,
}

impl std::str::FromStr for Step {
    type Err = anyhow::Error;

    /// `5x200`: 5 clusters of 200 nodes (2..=20 clusters, 1..=1,000 nodes).
    fn from_str(s: &str) -> Result<Self> {
        let (k, n) = s
            .trim()
            .split_once(['x', 'X', '×'])
            .ok_or_else(|| anyhow!("step {s:?}: expected CLUSTERSxNODES such as 5x200"))?;
        let clusters: usize = k
            .trim()
            .parse()
            .with_context(|| format!("step {s:?}: clusters"))?;
        let nodes: usize = n
            .trim()
            .parse()
            .with_context(|| format!("step {s:?}: nodes"))?;
        ensure!(
            (2..=20).contains(&clusters),
            "step {s:?}: clusters must be 2 to 20"
        );
        ensure!(
            (1..=1000).contains(&nodes),
            "step {s:?}: nodes must be 1 to 1000"
        );
        Ok(Step { clusters, nodes })
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.clusters, self.nodes)
    }
}

/// Runs every step; a step that fails is recorded with its error and ends the run (the
/// larger steps would fail too). Returns the report and its table.
///
/// # Errors
/// When not even the first step could start (no root, no binaries).
pub fn run(options: &Options) -> Result<(Value, String)> {
    wiremesh_lab::require_root()?;
    let controller = wiremesh_lab::replica::controller_binary()?;
    let meshctl = k8s::meshctl_binary()?;
    progress!(
        "controller {}, meshctl {}",
        controller.display(),
        meshctl.display()
    );
    let mut steps = Vec::new();
    for step in &options.steps {
        interrupt::check()?;
        progress!(
            "step {step}: {} clusters of {} simulated nodes",
            step.clusters,
            step.nodes
        );
        let started = Instant::now();
        let mut report = StepReport::new(*step);
        if let Err(e) = run_step(options, *step, &mut report) {
            progress!("step {step} failed: {e:#}");
            report.error = Some(format!("{e:#}"));
        }
        report.fields["duration_s"] = json!(secs(started.elapsed()));
        let failed = report.error.is_some();
        steps.push(report.finish());
        if failed || interrupt::requested() {
            break;
        }
    }
    let report = json!({
        "config": {
            "steps": options.steps.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "changes_per_kind": options.changes,
            "steady_s": options.steady.as_secs_f64(),
            "watching_agents_per_cluster": options.watchers,
            "status_writes": options.status_writes,
            "outage_s": options.outage.as_secs_f64(),
            "timeout_s": options.timeout.as_secs_f64(),
        },
        "machine": machine(),
        "goals": {
            "p99_to_meshpeer_s_at_10x500": 5.0,
            "controller_rss_mib_at_5000_remote_nodes": 200.0,
        },
        "simulated": "agents: Node + MeshNode per node, status writes at an agent's rate (on a change of its tunnels within 10 s, else every 300 s, one entry per tunnel up to 1,024), MeshPeer watches by a sample of agents per cluster; no data plane",
        "real": "etcd + kube-apiserver per cluster (tests/k8s/controlplane.sh), release wiremesh-controller per cluster, meshctl join for every pair",
        "steps": steps,
    });
    let table = table(&report);
    Ok((report, table))
}

/// One step's figures as they are gathered.
struct StepReport {
    fields: Value,
    error: Option<String>,
}

impl StepReport {
    fn new(step: Step) -> Self {
        Self {
            fields: json!({
                "clusters": step.clusters,
                "nodes_per_cluster": step.nodes,
                "remote_nodes_per_controller": (step.clusters - 1) * step.nodes,
            }),
            error: None,
        }
    }

    fn set(&mut self, key: &str, value: Value) {
        self.fields[key] = value;
    }

    fn finish(mut self) -> Value {
        self.fields["error"] = json!(self.error);
        self.fields
    }
}

/// A cluster of the step: its plane, controller, simulated nodes and what its MeshPeers
/// look like.
struct Cluster {
    index: usize,
    name: String,
    plane: ControlPlane,
    client: Client,
    controller: Option<Replica>,
    /// Node name → public key.
    nodes: BTreeMap<String, String>,
    board: Arc<Mutex<Board>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The controller before its API server (the fields would drop the other way).
        drop(self.controller.take());
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A cluster's MeshPeers as its own watch (the bench's) saw them.
#[derive(Debug, Default)]
struct Board {
    /// MeshPeer name → (public key, resourceVersion, when it was last seen changing).
    peers: BTreeMap<String, (String, String, Instant)>,
    /// MeshPeer name → when its deletion was seen.
    gone: BTreeMap<String, Instant>,
    /// MeshPeers written with a new resourceVersion (updates, not creations).
    rewrites: u64,
    created: u64,
    deleted: u64,
    /// Bumped on every change of the set of MeshPeers or of a key: the simulated agents'
    /// tunnels changed, so they write their status.
    generation: u64,
}

fn run_step(options: &Options, step: Step, report: &mut StepReport) -> Result<()> {
    let names: Vec<String> = (0..=step.clusters).map(|i| format!("m{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // One plane more than the step's: the cluster joined last.
    let started = Instant::now();
    let planes = ControlPlane::start_all(&name_refs)?;
    report.set("planes_start_s", json!(secs(started.elapsed())));
    progress!(
        "{} control planes up in {:.0?}",
        planes.len(),
        started.elapsed()
    );
    let kubeconfig = k8s::write_kubeconfig(&planes.iter().collect::<Vec<_>>(), "m0")?;
    let mut clusters = Vec::new();
    for (index, plane) in planes.into_iter().enumerate() {
        let name = plane.name().to_owned();
        plane.install(&[&cluster_cidr(index)])?;
        let client = plane.client()?;
        clusters.push(Cluster {
            index,
            name,
            plane,
            client,
            controller: None,
            nodes: BTreeMap::new(),
            board: Arc::default(),
            tasks: Vec::new(),
        });
    }

    let started = Instant::now();
    populate(&mut clusters, step.nodes)?;
    report.set("populate_s", json!(secs(started.elapsed())));
    progress!(
        "{} Nodes and MeshNodes written in {:.0?}",
        clusters.len() * step.nodes,
        started.elapsed()
    );
    for cluster in &mut clusters {
        observe(cluster);
        cluster.controller = Some(start_controller(cluster, &kubeconfig, 1)?);
        if options.status_writes {
            let task = status_writer(cluster);
            cluster.tasks.push(task);
        }
        for _ in 0..options.watchers {
            let task = sample_watcher(cluster.client.clone());
            cluster.tasks.push(task);
        }
    }
    let (extra, clusters_slice) = clusters
        .split_last_mut()
        .ok_or_else(|| anyhow!("no planes"))?;
    let clusters: &mut [Cluster] = clusters_slice;

    // Every pair joined.
    let started = Instant::now();
    for a in 0..clusters.len() {
        for b in a + 1..clusters.len() {
            join(&kubeconfig, &clusters[a].name, &clusters[b].name)?;
        }
    }
    let joins = started.elapsed();
    wait_full_mesh(clusters, step.nodes, options.timeout)?;
    report.set("joins_s", json!(secs(joins)));
    report.set("initial_convergence_s", json!(secs(started.elapsed())));
    progress!(
        "{} joins in {joins:.0?}; every cluster mirrors every other after {:.0?}",
        clusters.len() * (clusters.len() - 1) / 2,
        started.elapsed()
    );

    // What one agent's status write weighs: every agent of a cluster writes one when a
    // remote node changes, and every 300 s otherwise.
    let status_bytes = serde_json::to_vec(&status_body(&lock(&clusters[0].board)))?.len();
    report.set(
        "status_writes",
        json!({
            "bytes_per_write": status_bytes,
            "tunnels_counted_per_write": lock(&clusters[0].board).peers.len(),
            "tunnels_named_per_write": 0,
            "writes_per_remote_change": (clusters.len() - 1) * step.nodes,
            "bytes_per_remote_change": (clusters.len() - 1) * step.nodes * status_bytes,
            "refresh_bytes_per_s_per_cluster": round((step.nodes * status_bytes) as f64 / AGENT_REFRESH.as_secs_f64(), 0),
            "enabled": options.status_writes,
        }),
    );
    // The initial status storm (every agent's tunnels changed) passes before the window.
    interrupt::sleep(AGENT_TICK + Duration::from_secs(5))?;
    let steady = steady_state(clusters, options.steady)?;
    report.set("steady", steady);

    let latency = latencies(clusters, step.nodes, options)?;
    report.set("latency", latency);

    let restart = restart(clusters, &kubeconfig, options.timeout)?;
    report.set("restart", restart);

    let outage = outage(clusters, options)?;
    report.set("outage", outage);

    let joined = join_new(clusters, extra, &kubeconfig, step.nodes, options.timeout)?;
    report.set("join", joined);

    let memory: Vec<Value> = clusters
        .iter()
        .chain(std::iter::once(&*extra))
        .filter_map(|c| {
            let pid = c.controller.as_ref()?.pid();
            Some(json!({
                "cluster": c.name,
                "rss_mib": procfs::rss_mib(pid).ok(),
                "peak_rss_mib": procfs::peak_rss_mib(pid).ok(),
            }))
        })
        .collect();
    report.set("controller_memory_at_end", json!(memory));
    Ok(())
}

/// The pod CIDR of cluster `index`: 10.(index+1).0.0/16.
fn cluster_cidr(index: usize) -> String {
    format!("10.{}.0.0/16", index + 1)
}

/// Node `j` of cluster `i`: its /26 of pods and its address (Node InternalIP, MeshNode
/// endpoint), unique across the mesh; 198.18.0.0/15 is the lab's underlay, and nothing is
/// ever sent to these addresses.
fn node_addresses(cluster: usize, node: usize) -> (String, String) {
    let cidr = format!(
        "10.{}.{}.{}/26",
        cluster + 1,
        (node / 4) % 256,
        (node % 4) * 64
    );
    let n = cluster * 1024 + node + 1;
    let ip = format!("198.{}.{}.{}", 18 + n / 65536, (n / 256) % 256, n % 256);
    (cidr, ip)
}

fn node_name(node: usize) -> String {
    format!("n{node:04}")
}

fn fresh_key() -> String {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn populate(clusters: &mut [Cluster], nodes: usize) -> Result<()> {
    let mut jobs = Vec::new();
    for cluster in clusters.iter_mut() {
        for j in 0..nodes {
            let key = fresh_key();
            cluster.nodes.insert(node_name(j), key.clone());
            jobs.push((cluster.client.clone(), cluster.index, j, key));
        }
    }
    block_on_timeout(Duration::from_secs(30 * 60), async {
        futures::stream::iter(jobs)
            .map(|(client, i, j, key)| async move { create_node(&client, i, j, &key).await })
            .buffer_unordered(POPULATE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
    })??;
    Ok(())
}

/// Writes Node `j` of cluster `i` and its MeshNode (owned by the Node, as the agent does).
async fn create_node(client: &Client, i: usize, j: usize, key: &str) -> Result<()> {
    let name = node_name(j);
    let (cidr, ip) = node_addresses(i, j);
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        "status": {
            "addresses": [{ "type": "InternalIP", "address": ip }, { "type": "Hostname", "address": name }],
            "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated" }],
        },
    }))?;
    let node = Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    let mesh_node: MeshNode = serde_json::from_value(json!({
        "apiVersion": "wiremesh.io/v1alpha1",
        "kind": "MeshNode",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": name, "uid": node.uid().unwrap_or_default(),
            }],
        },
        "spec": { "publicKey": key, "endpoints": [format!("{ip}:51820")], "podCIDRs": [cidr], "kind": "Node" },
    }))?;
    Api::<MeshNode>::all(client.clone())
        .create(&PostParams::default(), &mesh_node)
        .await
        .with_context(|| format!("creating MeshNode {name}"))?;
    Ok(())
}

/// The bench's own MeshPeer watch of a cluster, feeding its [`Board`].
fn observe(cluster: &mut Cluster) {
    let board = Arc::clone(&cluster.board);
    let api = Api::<MeshPeer>::all(cluster.client.clone());
    let task = k8s::runtime().spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            let now = Instant::now();
            let Ok(event) = event else { continue };
            let mut board = board.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                watcher::Event::Apply(mp) | watcher::Event::InitApply(mp) => {
                    let name = mp.name_any();
                    let rv = mp.resource_version().unwrap_or_default();
                    let key = mp.spec.public_key.clone();
                    let previous = board
                        .peers
                        .get(&name)
                        .map(|(old_key, old_rv, _)| (*old_key == key, *old_rv == rv));
                    match previous {
                        Some((_, true)) => continue,
                        Some((same_key, false)) => {
                            board.rewrites += 1;
                            if !same_key {
                                board.generation += 1;
                            }
                        }
                        None => {
                            board.created += 1;
                            board.generation += 1;
                        }
                    }
                    board.gone.remove(&name);
                    board.peers.insert(name, (key, rv, now));
                }
                watcher::Event::Delete(mp) => {
                    let name = mp.name_any();
                    if board.peers.remove(&name).is_some() {
                        board.deleted += 1;
                        board.generation += 1;
                    }
                    board.gone.insert(name, now);
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
        }
    });
    cluster.tasks.push(task);
}

/// One simulated agent's own MeshPeer watch (the events are dropped).
fn sample_watcher(client: Client) -> JoinHandle<()> {
    k8s::runtime().spawn(async move {
        let mut stream = watcher(Api::<MeshPeer>::all(client), watcher::Config::default()).boxed();
        while stream.next().await.is_some() {}
    })
}

/// The cluster's agents' status writes: each on a change of its tunnels (within an
/// agent's tick) and every [`AGENT_REFRESH`] otherwise, phases spread evenly.
fn status_writer(cluster: &Cluster) -> JoinHandle<()> {
    let board = Arc::clone(&cluster.board);
    let client = cluster.client.clone();
    let names: Vec<String> = cluster.nodes.keys().cloned().collect();
    k8s::runtime().spawn(async move {
        let api: Api<MeshNode> = Api::all(client);
        let params = PatchParams::apply("wiremesh-agent").force();
        let start = tokio::time::Instant::now();
        let count = names.len().max(1) as u32;
        // Node name → when its status is due next.
        let mut due: BTreeMap<String, tokio::time::Instant> = names
            .iter()
            .enumerate()
            .map(|(j, n)| (n.clone(), start + AGENT_REFRESH * (j as u32) / count))
            .collect();
        let mut seen_generation = 0;
        let mut body: Option<Arc<Value>> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = tokio::time::Instant::now();
            let generation = lock(&board).generation;
            if generation != seen_generation || body.is_none() {
                seen_generation = generation;
                body = Some(Arc::new(status_body(&lock(&board))));
                // Each agent notices on its next tick, somewhere in the coming 10 s.
                for (j, at) in due.values_mut().enumerate() {
                    let offset = AGENT_TICK * ((j as u32 * 7919) % count) / count;
                    *at = (*at).min(now + offset);
                }
            }
            let ready: Vec<String> = due
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(n, _)| n.clone())
                .collect();
            for name in &ready {
                due.insert(name.clone(), now + AGENT_REFRESH);
            }
            let Some(body) = body.clone() else { continue };
            futures::stream::iter(ready)
                .map(|name| {
                    let (api, params, body) = (&api, &params, Arc::clone(&body));
                    async move {
                        let _ = api.patch_status(&name, params, &Patch::Apply(&*body)).await;
                    }
                })
                .buffer_unordered(STATUS_CONCURRENCY)
                .collect::<Vec<()>>()
                .await;
        }
    })
}

/// What an agent with a tunnel to every MeshPeer of its cluster, all connected, writes into
/// its status (`report_status` in agent/src/peers.rs, `agent/src/mesh/status.rs`): the
/// tunnels counted per peer cluster, none named.
fn status_body(board: &Board) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut clusters: BTreeMap<&str, usize> = BTreeMap::new();
    for name in board.peers.keys() {
        let cluster = name.split_once('.').map_or(name.as_str(), |(c, _)| c);
        *clusters.entry(cluster).or_default() += 1;
    }
    let clusters: Vec<Value> = clusters
        .into_iter()
        .map(|(cluster, n)| json!({"cluster": cluster, "tunnels": n, "connected": n, "direct": n}))
        .collect();
    json!({
        "apiVersion": "wiremesh.io/v1alpha1",
        "kind": "MeshNode",
        "status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "DataPlaneConfigured",
                "message": format!("{} tunnels configured", board.peers.len()),
                "lastTransitionTime": now,
            }],
            "peers": [],
            "tunnels": {
                "total": board.peers.len(),
                "connected": board.peers.len(),
                "clusters": clusters,
            },
            "lastUpdateTime": now,
        },
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn start_controller(cluster: &Cluster, kubeconfig: &std::path::Path, run: u32) -> Result<Replica> {
    Replica::start(
        kubeconfig,
        cluster.plane.dir(),
        &cluster.name,
        &format!("{}-controller-{run}", cluster.name),
        &[],
        Some("warn"),
    )
}

fn join(kubeconfig: &std::path::Path, a: &str, b: &str) -> Result<()> {
    let path = kubeconfig
        .to_str()
        .ok_or_else(|| anyhow!("kubeconfig path not UTF-8"))?;
    let out = k8s::meshctl(&["--kubeconfig", path, "--context", a, "join", b], &[])?;
    ensure!(
        out.status.success(),
        "meshctl join {a} {b}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until every cluster holds a MeshPeer for every node of every other cluster.
fn wait_full_mesh(clusters: &[Cluster], nodes: usize, timeout: Duration) -> Result<()> {
    let expected = (clusters.len() - 1) * nodes;
    wait_until(timeout, "every cluster to mirror every other", || {
        clusters
            .iter()
            .all(|c| lock(&c.board).peers.len() >= expected)
    })
    .map_err(|e| {
        let counts: Vec<String> = clusters
            .iter()
            .map(|c| format!("{}: {}", c.name, lock(&c.board).peers.len()))
            .collect();
        anyhow!(
            "{e:#} (expected {expected} MeshPeers each; {})",
            counts.join(", ")
        )
    })
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(());
        }
        interrupt::check()?;
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// API server figures at one moment.
#[derive(Debug, Clone)]
struct Scrape {
    at: Instant,
    samples: Vec<promtext::Sample>,
}

fn scrape(client: &Client) -> Result<Scrape> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .context("building the /metrics request")?;
    let text = block_on_timeout(Duration::from_secs(30), client.request_text(request))?
        .context("GET /metrics")?;
    Ok(Scrape {
        at: Instant::now(),
        samples: promtext::parse(&text),
    })
}

/// What an API server served between two scrapes, per second, and the watches it holds.
fn api_rates(name: &str, before: &Scrape, after: &Scrape) -> Value {
    let wall = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let delta = |metric: &str, by: &str| -> BTreeMap<String, f64> {
        let a = promtext::sum_by(&after.samples, metric, by);
        let b = promtext::sum_by(&before.samples, metric, by);
        a.into_iter()
            .map(|(k, v)| {
                let rate = (v - b.get(&k).copied().unwrap_or(0.0)) / wall;
                (k, round(rate, 3))
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    };
    let total = |m: &BTreeMap<String, f64>| round(m.values().sum(), 3);
    let requests = delta("apiserver_request_total", "resource");
    let verbs = delta("apiserver_request_total", "verb");
    let responses = delta("apiserver_response_sizes_sum", "resource");
    let watch_bytes = delta("apiserver_watch_events_sizes_sum", "resource");
    let watch_events = delta("apiserver_watch_events_total", "resource");
    let bodies = delta("apiserver_request_body_size_bytes_sum", "resource");
    let watches: BTreeMap<String, f64> = promtext::sum_by(
        &after
            .samples
            .iter()
            .filter(|s| s.labels.get("verb").map(String::as_str) == Some("WATCH"))
            .cloned()
            .collect::<Vec<_>>(),
        "apiserver_longrunning_requests",
        "resource",
    )
    .into_iter()
    .filter(|(_, v)| *v > 0.0)
    .collect();
    json!({
        "cluster": name,
        "requests_per_s": total(&requests),
        "requests_per_s_by_resource": requests,
        "requests_per_s_by_verb": verbs,
        "response_bytes_per_s": total(&responses),
        "response_bytes_per_s_by_resource": responses,
        "watch_event_bytes_per_s": total(&watch_bytes),
        "watch_event_bytes_per_s_by_resource": watch_bytes,
        "watch_events_per_s_by_resource": watch_events,
        "request_body_bytes_per_s_by_resource": bodies,
        "watches": total(&watches),
        "watches_by_resource": watches,
    })
}

/// A controller's figures over a window: CPU and memory. (Its socket bytes are not in
/// `/proc/<pid>/io`: tokio reads and writes sockets with recv(2)/send(2), which it does
/// not count; the API servers' figures stand in for them.)
struct ProcWindow {
    pid: u32,
    cpu: f64,
    at: Instant,
}

impl ProcWindow {
    fn start(pid: u32) -> Result<Self> {
        Ok(Self {
            pid,
            cpu: procfs::cpu_seconds(pid)?,
            at: Instant::now(),
        })
    }

    fn read(&self) -> Result<Value> {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let cpu = procfs::cpu_seconds(self.pid)? - self.cpu;
        Ok(json!({
            "cpu_cores": round(cpu / wall, 4),
            "rss_mib": round(procfs::rss_mib(self.pid)?, 1),
        }))
    }
}

fn controller_pid(cluster: &Cluster) -> Result<u32> {
    cluster
        .controller
        .as_ref()
        .map(Replica::pid)
        .ok_or_else(|| anyhow!("{}: no controller", cluster.name))
}

/// No change for `window`: what the controllers and API servers spend.
fn steady_state(clusters: &[Cluster], window: Duration) -> Result<Value> {
    progress!("steady state for {window:?}");
    let before: Vec<Scrape> = clusters
        .iter()
        .map(|c| scrape(&c.client))
        .collect::<Result<_>>()?;
    let meters: Vec<ProcWindow> = clusters
        .iter()
        .map(|c| ProcWindow::start(controller_pid(c)?))
        .collect::<Result<_>>()?;
    let machine = procfs::CpuMeter::start(&[])?;
    let rewrites_before: Vec<u64> = clusters.iter().map(|c| lock(&c.board).rewrites).collect();
    interrupt::sleep(window)?;
    let controllers: Vec<Value> = clusters
        .iter()
        .zip(&meters)
        .map(|(c, m)| {
            let mut v = m.read()?;
            v["cluster"] = json!(c.name);
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let after: Vec<Scrape> = clusters
        .iter()
        .map(|c| scrape(&c.client))
        .collect::<Result<_>>()?;
    let apiservers: Vec<Value> = clusters
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(c, (b, a))| api_rates(&c.name, b, a))
        .collect();
    let rewrites: u64 = clusters
        .iter()
        .zip(rewrites_before)
        .map(|(c, b)| lock(&c.board).rewrites - b)
        .sum();
    let usage = machine.read()?;
    Ok(json!({
        "window_s": secs(window),
        "controllers": controllers,
        "apiservers": apiservers,
        "meshpeer_rewrites": rewrites,
        "machine_busy_cores": round(usage.machine_s / usage.wall_s.max(1e-9), 2),
    }))
}

/// A change to time: made in `cluster` (an index), done when `done` holds in every other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create,
    KeyChange,
    Delete,
}

/// Seconds from the change until each other cluster's MeshPeers show it, or an error.
fn time_change(
    clusters: &[Cluster],
    origin: usize,
    node: &str,
    kind: Kind,
    key: &str,
    started: Instant,
    timeout: Duration,
) -> Result<Vec<f64>> {
    let peer = mesh_peer_name(&clusters[origin].name, node);
    let mut seen: BTreeMap<usize, f64> = BTreeMap::new();
    wait_until(
        timeout,
        &format!("{kind:?} of {peer} to show everywhere"),
        || {
            for (i, c) in clusters.iter().enumerate() {
                if i == origin || seen.contains_key(&i) {
                    continue;
                }
                let board = lock(&c.board);
                let at = match kind {
                    Kind::Create | Kind::KeyChange => board
                        .peers
                        .get(&peer)
                        .filter(|(k, _, _)| k == key)
                        .map(|(_, _, at)| *at),
                    Kind::Delete => board
                        .gone
                        .get(&peer)
                        .filter(|_| !board.peers.contains_key(&peer))
                        .copied(),
                };
                if let Some(at) = at {
                    seen.insert(i, at.saturating_duration_since(started).as_secs_f64());
                }
            }
            seen.len() == clusters.len() - 1
        },
    )?;
    Ok(seen.into_values().collect())
}

/// `changes` creations, then key changes, then deletions, one at a time, each in a
/// cluster in turn.
fn latencies(clusters: &mut [Cluster], nodes: usize, options: &Options) -> Result<Value> {
    progress!("timing {} changes of each kind", options.changes);
    let mut out = serde_json::Map::new();
    let mut made: Vec<(usize, String)> = Vec::new();
    for kind in [Kind::Create, Kind::KeyChange, Kind::Delete] {
        let mut worst = Vec::new();
        let mut each = Vec::new();
        for s in 0..options.changes {
            interrupt::check()?;
            let (origin, node) = match kind {
                Kind::Create => {
                    let origin = s % clusters.len();
                    (origin, node_name(nodes + s))
                }
                _ => made
                    .get(s)
                    .cloned()
                    .ok_or_else(|| anyhow!("no node made"))?,
            };
            let client = clusters[origin].client.clone();
            let key = fresh_key();
            let started = Instant::now();
            match kind {
                Kind::Create => {
                    block_on_timeout(
                        WRITE_TIMEOUT,
                        create_node(&client, origin, nodes + s, &key),
                    )??;
                    made.push((origin, node.clone()));
                }
                Kind::KeyChange => {
                    block_on_timeout(
                        WRITE_TIMEOUT,
                        Api::<MeshNode>::all(client).patch(
                            &node,
                            &PatchParams::default(),
                            &Patch::Merge(json!({ "spec": { "publicKey": key } })),
                        ),
                    )?
                    .with_context(|| format!("changing the key of MeshNode {node}"))?;
                }
                Kind::Delete => {
                    block_on_timeout(WRITE_TIMEOUT, async {
                        Api::<MeshNode>::all(client.clone())
                            .delete(&node, &DeleteParams::default())
                            .await?;
                        Api::<Node>::all(client)
                            .delete(&node, &DeleteParams::default())
                            .await
                    })?
                    .with_context(|| format!("deleting {node}"))?;
                }
            }
            clusters[origin].nodes.insert(node.clone(), key.clone());
            let times = time_change(
                clusters,
                origin,
                &node,
                kind,
                &key,
                started,
                options.timeout,
            )?;
            worst.push(times.iter().copied().fold(0.0, f64::max));
            each.extend(times);
            interrupt::sleep(BETWEEN_CHANGES)?;
        }
        if kind == Kind::Delete {
            for (origin, node) in &made {
                clusters[*origin].nodes.remove(node);
            }
        }
        let name = match kind {
            Kind::Create => "create",
            Kind::KeyChange => "key_change",
            Kind::Delete => "delete",
        };
        progress!(
            "{name}: to every cluster p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            stats::percentile(&worst, 50.0).unwrap_or(f64::NAN),
            stats::percentile(&worst, 99.0).unwrap_or(f64::NAN),
            stats::min_max(&worst).map_or(f64::NAN, |(_, hi)| hi)
        );
        out.insert(name.to_owned(), summary(&worst, &each));
    }
    Ok(Value::Object(out))
}

/// p50/p99/max of the time until the last cluster showed each change (`to_all`), and of
/// each cluster's own time (`per_cluster`).
fn summary(to_all: &[f64], per_cluster: &[f64]) -> Value {
    let figures = |v: &[f64]| {
        json!({
            "p50_s": stats::percentile(v, 50.0).map(|x| round(x, 3)),
            "p99_s": stats::percentile(v, 99.0).map(|x| round(x, 3)),
            "max_s": stats::min_max(v).map(|(_, hi)| round(hi, 3)),
            "samples": v.len(),
        })
    };
    json!({ "to_all": figures(to_all), "per_cluster": figures(per_cluster) })
}

/// Totals over every API server of the LIST requests and their response bytes.
fn list_totals(clusters: &[Cluster]) -> Result<(f64, f64)> {
    let mut requests = 0.0;
    let mut bytes = 0.0;
    for c in clusters {
        let s = scrape(&c.client)?;
        let list = |l: &BTreeMap<String, String>| l.get("verb").map(String::as_str) == Some("LIST");
        requests += promtext::sum(&s.samples, "apiserver_request_total", list);
        bytes += promtext::sum(&s.samples, "apiserver_response_sizes_sum", list);
    }
    Ok((requests, bytes))
}

fn board_counts(cluster: &Cluster) -> (u64, u64, u64) {
    let b = lock(&cluster.board);
    (b.rewrites, b.created, b.deleted)
}

/// SIGTERM to cluster 0's controller, a new one started at once; a key change in cluster
/// 1 made then, timed until cluster 0 shows it; then [`CHURN_WINDOW`] for needless writes.
fn restart(
    clusters: &mut [Cluster],
    kubeconfig: &std::path::Path,
    timeout: Duration,
) -> Result<Value> {
    progress!("restarting {}'s controller", clusters[0].name);
    let (lists_before, list_bytes_before) = list_totals(clusters)?;
    let counts_before = board_counts(&clusters[0]);
    if let Some(mut old) = clusters[0].controller.take() {
        old.stop()?;
    }
    let started = Instant::now();
    let replica = start_controller(&clusters[0], kubeconfig, 2)?;
    let pid = replica.pid();
    clusters[0].controller = Some(replica);
    let node = node_name(0);
    let key = fresh_key();
    block_on_timeout(
        WRITE_TIMEOUT,
        Api::<MeshNode>::all(clusters[1].client.clone()).patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "publicKey": key } })),
        ),
    )??;
    clusters[1].nodes.insert(node.clone(), key.clone());
    let peer = mesh_peer_name(&clusters[1].name, &node);
    wait_until(
        timeout,
        "the restarted controller to mirror a change",
        || {
            lock(&clusters[0].board)
                .peers
                .get(&peer)
                .is_some_and(|(k, _, _)| *k == key)
        },
    )?;
    let converged = started.elapsed();
    let cpu_at_converged = procfs::cpu_seconds(pid)?;
    interrupt::sleep(CHURN_WINDOW)?;
    let (lists_after, list_bytes_after) = list_totals(clusters)?;
    let counts_after = board_counts(&clusters[0]);
    progress!("restart: converged in {converged:.1?}");
    Ok(json!({
        "converge_s": secs(converged),
        "cpu_s_to_converge": round(cpu_at_converged, 3),
        "cpu_s_after_window": round(procfs::cpu_seconds(pid)?, 3),
        "rss_mib": round(procfs::rss_mib(pid)?, 1),
        "list_requests": lists_after - lists_before,
        "list_response_bytes": list_bytes_after - list_bytes_before,
        // The probe change is one rewrite.
        "needless_meshpeer_rewrites": (counts_after.0 - counts_before.0).saturating_sub(1),
        "meshpeers_created": counts_after.1 - counts_before.1,
        "meshpeers_deleted": counts_after.2 - counts_before.2,
        "window_s": secs(CHURN_WINDOW),
    }))
}

/// Cluster 1's API server stopped for `options.outage`, then started again; a key change
/// made there at once, timed until every other cluster shows it.
fn outage(clusters: &mut [Cluster], options: &Options) -> Result<Value> {
    let down = 1;
    progress!(
        "{}'s API server down for {:?}",
        clusters[down].name,
        options.outage
    );
    let before: Vec<(u64, u64, u64)> = clusters.iter().map(board_counts).collect();
    clusters[down].plane.pause()?;
    interrupt::sleep(options.outage)?;
    let resuming = Instant::now();
    clusters[down].plane.resume()?;
    let resumed = Instant::now();
    let node = node_name(1);
    let key = fresh_key();
    block_on_timeout(
        Duration::from_secs(30),
        Api::<MeshNode>::all(clusters[down].client.clone()).patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "publicKey": key } })),
        ),
    )??;
    clusters[down].nodes.insert(node.clone(), key.clone());
    let times = time_change(
        clusters,
        down,
        &node,
        Kind::KeyChange,
        &key,
        resumed,
        options.timeout,
    )?;
    let catch_up = times.iter().copied().fold(0.0, f64::max);
    interrupt::sleep(CHURN_WINDOW)?;
    let mut needless = 0;
    let mut created = 0;
    let mut deleted = 0;
    for (i, c) in clusters.iter().enumerate() {
        if i == down {
            continue;
        }
        let after = board_counts(c);
        needless += (after.0 - before[i].0).saturating_sub(1);
        created += after.1 - before[i].1;
        deleted += after.2 - before[i].2;
    }
    // Its own controller lost its API server too: is it still there?
    let controller_alive = clusters[down]
        .controller
        .as_ref()
        .is_some_and(|r| process_alive(r.pid()));
    progress!("outage: every cluster caught up {catch_up:.1} s after the API server was back");
    Ok(json!({
        "outage_s": secs(options.outage),
        "resume_s": secs(resumed.duration_since(resuming)),
        "catch_up_s": round(catch_up, 3),
        "catch_up_per_cluster_s": times.iter().map(|t| round(*t, 3)).collect::<Vec<_>>(),
        "needless_meshpeer_rewrites": needless,
        "meshpeers_created": created,
        "meshpeers_deleted": deleted,
        "local_controller_alive": controller_alive,
    }))
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// The extra cluster (its nodes and controller already running) joined with every other,
/// one `meshctl join` after another; done when it mirrors all and all mirror it.
fn join_new(
    clusters: &mut [Cluster],
    extra: &mut Cluster,
    kubeconfig: &std::path::Path,
    nodes: usize,
    timeout: Duration,
) -> Result<Value> {
    progress!(
        "joining {} with all {} clusters",
        extra.name,
        clusters.len()
    );
    let started = Instant::now();
    for c in clusters.iter() {
        join(kubeconfig, &extra.name, &c.name)?;
    }
    let joins = started.elapsed();
    let prefix = format!("{}.", extra.name);
    let expected = clusters.len() * nodes;
    wait_until(timeout, "the new cluster to converge", || {
        lock(&extra.board).peers.len() >= expected
            && clusters.iter().all(|c| {
                lock(&c.board)
                    .peers
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .count()
                    >= nodes
            })
    })?;
    let converged = started.elapsed();
    let pid = controller_pid(extra)?;
    progress!(
        "join: {} joins in {joins:.1?}, converged in {converged:.1?}",
        clusters.len()
    );
    Ok(json!({
        "joins": clusters.len(),
        "joins_s": secs(joins),
        "converge_s": secs(converged),
        "new_controller_rss_mib": round(procfs::rss_mib(pid)?, 1),
        "new_controller_remote_nodes": expected,
    }))
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({ "cpus": cpus, "memory_gib": round(mem_kib as f64 / 1024.0 / 1024.0, 1) })
}

fn secs(d: Duration) -> f64 {
    round(d.as_secs_f64(), 3)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The report as a table for the terminal.
pub fn table(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<7} {:>7} | {:>20} | {:>20} | {:>20} | {:>9} {:>8} | {:>8} {:>8} {:>7}",
        "KxN",
        "remote",
        "create p50/p99/max s",
        "key p50/p99/max s",
        "delete p50/p99/max s",
        "ctl MiB",
        "ctl cpu",
        "api rq/s",
        "api KB/s",
        "watches"
    );
    let empty = Vec::new();
    for step in report["steps"].as_array().unwrap_or(&empty) {
        let lat = |kind: &str| {
            let f = &step["latency"][kind]["to_all"];
            format!(
                "{}/{}/{}",
                num(&f["p50_s"], 2),
                num(&f["p99_s"], 2),
                num(&f["max_s"], 2)
            )
        };
        let controllers = step["steady"]["controllers"].as_array().unwrap_or(&empty);
        let apis = step["steady"]["apiservers"].as_array().unwrap_or(&empty);
        let max_of = |items: &[Value], key: &str| {
            items
                .iter()
                .filter_map(|v| v[key].as_f64())
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        };
        let api_bytes = apis
            .iter()
            .filter_map(|a| {
                Some(a["response_bytes_per_s"].as_f64()? + a["watch_event_bytes_per_s"].as_f64()?)
            })
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let _ = writeln!(
            out,
            "{:<7} {:>7} | {:>20} | {:>20} | {:>20} | {:>9} {:>8} | {:>8} {:>8} {:>7}",
            format!("{}x{}", step["clusters"], step["nodes_per_cluster"]),
            step["remote_nodes_per_controller"],
            lat("create"),
            lat("key_change"),
            lat("delete"),
            opt(max_of(controllers, "rss_mib"), 1),
            opt(max_of(controllers, "cpu_cores"), 3),
            opt(max_of(apis, "requests_per_s"), 1),
            opt(api_bytes.map(|b| b / 1000.0), 1),
            opt(max_of(apis, "watches"), 0),
        );
        if let Some(e) = step["error"].as_str() {
            let _ = writeln!(out, "        error: {e}");
        }
        let _ = writeln!(
            out,
            "        join of one more: converged {} s; restart: converged {} s, {} needless rewrites; outage: caught up {} s, {} needless rewrites",
            num(&step["join"]["converge_s"], 1),
            num(&step["restart"]["converge_s"], 1),
            step["restart"]["needless_meshpeer_rewrites"],
            num(&step["outage"]["catch_up_s"], 1),
            step["outage"]["needless_meshpeer_rewrites"],
        );
    }
    let _ = writeln!(
        out,
        "ctl: the largest controller's RSS and CPU cores in the steady window; api: the busiest API server (requests/s, response + watch KB/s, watches held)"
    );
    out
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_refuse_nonsense() {
        assert_eq!(
            "5x200".parse::<Step>().unwrap(),
            Step {
                clusters: 5,
                nodes: 200
            }
        );
        assert_eq!("10×500".parse::<Step>().unwrap().to_string(), "10x500");
        assert!("1x10".parse::<Step>().is_err());
        assert!("5".parse::<Step>().is_err());
        assert!("5x0".parse::<Step>().is_err());
        assert!("axb".parse::<Step>().is_err());
    }

    #[test]
    fn node_addresses_are_unique_and_inside_their_ranges() {
        let mut ips = std::collections::BTreeSet::new();
        let mut cidrs = std::collections::BTreeSet::new();
        for cluster in 0..=20 {
            for node in 0..1020 {
                let (cidr, ip) = node_addresses(cluster, node);
                assert!(cidr.starts_with(&format!("10.{}.", cluster + 1)), "{cidr}");
                assert!(
                    ip.starts_with("198.18.") || ip.starts_with("198.19."),
                    "{ip}"
                );
                assert!(ips.insert(ip));
                assert!(cidrs.insert(cidr));
            }
        }
    }

    #[test]
    fn latency_summary_uses_nearest_rank() {
        let to_all: Vec<f64> = (1..=100).map(|x| f64::from(x) / 10.0).collect();
        let s = summary(&to_all, &[0.5]);
        assert_eq!(s["to_all"]["p50_s"], json!(5.0));
        assert_eq!(s["to_all"]["p99_s"], json!(9.9));
        assert_eq!(s["to_all"]["max_s"], json!(10.0));
        assert_eq!(s["per_cluster"]["samples"], json!(1));
    }

    #[test]
    fn api_rates_are_deltas_per_second() {
        let at = Instant::now();
        let before = Scrape {
            at,
            samples: promtext::parse(
                "apiserver_request_total{resource=\"meshpeers\",verb=\"PATCH\"} 10\n",
            ),
        };
        let after = Scrape {
            at: at + Duration::from_secs(2),
            samples: promtext::parse(
                "apiserver_request_total{resource=\"meshpeers\",verb=\"PATCH\"} 30\n\
                 apiserver_longrunning_requests{resource=\"meshnodes\",verb=\"WATCH\"} 3\n\
                 apiserver_longrunning_requests{resource=\"nodes\",verb=\"LIST\"} 9\n",
            ),
        };
        let r = api_rates("m0", &before, &after);
        assert_eq!(r["requests_per_s"], json!(10.0));
        assert_eq!(r["requests_per_s_by_verb"]["PATCH"], json!(10.0));
        assert_eq!(r["watches"], json!(3.0));
    }
}
