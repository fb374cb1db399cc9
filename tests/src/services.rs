//! Real Services in the lab (issue 13), off unless a test asks: per cluster a
//! kube-controller-manager (EndpointSlice, EndpointSlice mirroring, garbage collector and
//! namespace controllers), kube-proxy in nftables mode in each node's namespace, and
//! CoreDNS in a pod of its own behind the `kube-dns` Service, configured by
//! `meshctl install --configure-dns` from a stock Deployment/ConfigMap/ClusterRole; the
//! lab pods get it as their resolver (`/etc/netns/<pod>/resolv.conf`).
//!
//! There is no kubelet: [`bind_pod`] creates a Pod object bound to a lab node with the
//! status a kubelet would report (Running, Ready, the lab pod's address), and
//! [`set_pod_ready`] is a failing (or passing) readiness probe. Every process is a lab
//! [`Proc`], stopped by PID with the lab.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod as PodObject, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clusters::{ClusterNode, Side, TwoClusters, wait_for};
use crate::k8s::{ApiProxy, ControlPlane, block_on};
use crate::lab::{Netns, Pod, Proc, run_with_timeout};

/// The service range of every lab control plane (`--service-cluster-ip-range` in
/// `tests/k8s/controlplane.sh`).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The `kube-dns` Service's address (kubeadm's choice: the tenth of the range).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The CoreDNS image the lab's Deployment object names (what `meshctl install` reads; no
/// kubelet runs it: the lab runs the binary built by `tests/k8s/build-coredns.sh`).
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.15.0";
/// The namespace of CoreDNS, kube-proxy and their objects.
const KUBE_SYSTEM: &str = "kube-system";
/// Bound for a Go build script: a cold kube-proxy + kube-controller-manager build takes
/// minutes on 2 cores (README of tests/k8s).
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// The binaries, built (or found) by the scripts of `tests/k8s`.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// kube-proxy.
    pub kube_proxy: PathBuf,
    /// kube-controller-manager.
    pub controller_manager: PathBuf,
    /// CoreDNS.
    pub coredns: PathBuf,
}

impl Binaries {
    /// Runs `tests/k8s/build.sh --services` and `tests/k8s/build-coredns.sh` (each returns
    /// in under a second when its binaries are there) and returns the paths.
    ///
    /// # Errors
    /// When a build fails.
    pub fn build() -> Result<Self> {
        let k8s = build_script(&["build.sh", "--services"])?;
        let coredns = build_script(&["build-coredns.sh"])?;
        Ok(Self {
            kube_proxy: k8s.join("kube-proxy"),
            controller_manager: k8s.join("kube-controller-manager"),
            coredns: coredns.join("coredns"),
        })
    }
}

/// A cluster's Service machinery; drop it before the lab (declare it after the
/// [`TwoClusters`]).
pub struct ClusterServices {
    /// Which cluster.
    pub side: Side,
    /// kube-controller-manager (root namespace, like the API server).
    pub controller_manager: Proc,
    /// kube-proxy per node, by node name.
    pub proxies: BTreeMap<String, Proc>,
    /// CoreDNS.
    pub coredns: Proc,
    /// CoreDNS's pod.
    pub dns_pod: Pod,
    /// `meshctl install --configure-dns`'s output.
    pub install_output: String,
    _dns_proxy: ApiProxy,
}

impl ClusterServices {
    /// Starts it all for cluster `side` of `clusters` (its nodes must exist), runs
    /// `meshctl install --configure-dns` on the stock CoreDNS objects, points every node's
    /// pod at CoreDNS, and waits until the `kube-dns` VIP answers from the first node's pod.
    ///
    /// # Errors
    /// When a part does not come up.
    pub fn start(clusters: &TwoClusters, side: Side, bins: &Binaries) -> Result<Self> {
        let cluster = clusters.cluster(side);
        let plane = &cluster.plane;
        let client = cluster.client()?;
        let first = cluster
            .nodes
            .first()
            .with_context(|| format!("{} has no node", side.name()))?;

        let controller_manager = start_controller_manager(clusters, plane, bins)?;
        let dns_pod = first.host.add_pod("dns")?;
        let dns_proxy = ApiProxy::start(&dns_pod, plane.api_port())?;
        stock_coredns_objects(&client, plane, &dns_pod, &first.name)?;
        let install_output = configure_dns(clusters, side)?;
        let corefile = read_corefile(&client)?;
        let conf = clusters.lab.dir().join(format!("Corefile-{}", side.name()));
        fs::write(&conf, &corefile).with_context(|| format!("writing {}", conf.display()))?;
        let coredns = dns_pod.spawn(&[
            path_str(&bins.coredns)?,
            "-conf",
            path_str(&conf)?,
            "-dns.port",
            "53",
        ])?;

        apply(&client, KUBE_SYSTEM, &service_account("kube-proxy"))?;
        apply_cluster(
            &client,
            &binding(
                "wiremesh-lab-kube-proxy",
                "system:node-proxier",
                "kube-proxy",
            ),
        )?;
        let proxy_kubeconfig = plane.token_kubeconfig(KUBE_SYSTEM, "kube-proxy")?;
        let mut proxies = BTreeMap::new();
        for node in &cluster.nodes {
            let proxy = node.host.spawn(&[
                path_str(&bins.kube_proxy)?,
                "--kubeconfig",
                path_str(&proxy_kubeconfig)?,
                "--proxy-mode",
                "nftables",
                "--hostname-override",
                &node.name,
                "--cluster-cidr",
                &clusters.pod_range(side),
                // Conntrack sysctls are the machine's, not a namespace's: leave them.
                "--conntrack-max-per-core",
                "0",
                "--conntrack-tcp-timeout-established",
                "0",
                "--conntrack-tcp-timeout-close-wait",
                "0",
                "--conntrack-udp-timeout",
                "0",
                "--conntrack-udp-timeout-stream",
                "0",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--healthz-bind-address",
                "127.0.0.1:10256",
            ])?;
            proxies.insert(node.name.clone(), proxy);
            set_resolver(&node.pod, "default")?;
        }
        let services = Self {
            side,
            controller_manager,
            proxies,
            coredns,
            dns_pod,
            install_output,
            _dns_proxy: dns_proxy,
        };
        let took = wait_for(Duration::from_secs(60), || {
            services.check_alive()?;
            let out =
                first
                    .pod
                    .exec(&["getent", "hosts", "kubernetes.default.svc.cluster.local"])?;
            ensure!(
                String::from_utf8_lossy(&out.stdout).starts_with("10.0.0.1 "),
                "kubernetes.default does not resolve to 10.0.0.1 yet: {}",
                crate::lab::output_text(&out)
            );
            Ok(())
        })
        .with_context(|| services.logs())?;
        eprintln!(
            "{}: kube-dns answers through kube-proxy after {:.1} s",
            side.name(),
            took.as_secs_f64()
        );
        Ok(services)
    }

    /// Fails naming the first of its processes that exited.
    ///
    /// # Errors
    /// When one did, with its log's tail.
    pub fn check_alive(&self) -> Result<()> {
        let procs = [
            ("kube-controller-manager", &self.controller_manager),
            ("coredns", &self.coredns),
        ]
        .into_iter()
        .chain(self.proxies.iter().map(|(n, p)| (n.as_str(), p)));
        for (name, proc) in procs {
            ensure!(
                proc.is_running(),
                "{} {name} exited: {}",
                self.side.name(),
                tail(&proc.stderr(), 15)
            );
        }
        Ok(())
    }

    /// The last lines of each process's log.
    pub fn logs(&self) -> String {
        let mut text = format!(
            "---- kube-controller-manager ----\n{}\n---- coredns ----\n{}\n",
            tail(&self.controller_manager.stderr(), 15),
            tail(&(self.coredns.stdout() + &self.coredns.stderr()), 15)
        );
        for (name, proc) in &self.proxies {
            text.push_str(&format!(
                "---- kube-proxy {name} ----\n{}\n",
                tail(&proc.stderr(), 15)
            ));
        }
        text
    }
}

/// Creates Pod `namespace/name` bound to node `node` with `labels` and the status a
/// kubelet reports for a running, ready container at `pod`'s address; `hostname` sets
/// `spec.hostname` (and `spec.subdomain` = `subdomain`), for headless records.
///
/// # Errors
/// When the API server refuses.
pub fn bind_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    pod: &Pod,
    node: &str,
    hostname: Option<(&str, &str)>,
) -> Result<()> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let mut spec = serde_json::json!({
        "nodeName": node,
        "containers": [{ "name": "app", "image": "wiremesh.invalid/lab-pod" }],
    });
    if let Some((hostname, subdomain)) = hostname {
        spec["hostname"] = hostname.into();
        spec["subdomain"] = subdomain.into();
    }
    let object: PodObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": labels },
        "spec": spec,
    }))?;
    let api = Api::<PodObject>::namespaced(client.clone(), namespace);
    block_on(api.create(&PostParams::default(), &object))
        .with_context(|| format!("creating Pod {namespace}/{name}"))?;
    set_pod_status(client, namespace, name, Some(pod.ip()), true)
}

/// Sets Pod `namespace/name`'s Ready condition, as a readiness probe would.
///
/// # Errors
/// When the API server refuses.
pub fn set_pod_ready(client: &Client, namespace: &str, name: &str, ready: bool) -> Result<()> {
    set_pod_status(client, namespace, name, None, ready)
}

fn set_pod_status(
    client: &Client,
    namespace: &str,
    name: &str,
    ip: Option<Ipv4Addr>,
    ready: bool,
) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let mut patch = serde_json::json!({ "status": {
        "phase": "Running",
        "conditions": [
            { "type": "PodScheduled", "status": "True" },
            { "type": "Initialized", "status": "True" },
            { "type": "ContainersReady", "status": status },
            { "type": "Ready", "status": status },
        ],
    }});
    if let Some(ip) = ip {
        patch["status"]["podIP"] = ip.to_string().into();
        patch["status"]["podIPs"] = serde_json::json!([{ "ip": ip.to_string() }]);
    }
    block_on(
        Api::<PodObject>::namespaced(client.clone(), namespace).patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .with_context(|| format!("setting the status of Pod {namespace}/{name}"))?;
    Ok(())
}

/// A `wm-hello` server answering with `name` on `port`, in a new pod `name` behind
/// `node`, with a ready Pod object `namespace/name` labelled `app=APP` bound to it
/// (namespace created if absent), as the EndpointSlice controller needs it.
///
/// # Errors
/// When a part fails.
pub fn hello_pod(
    client: &Client,
    node: &ClusterNode,
    namespace: &str,
    name: &str,
    app: &str,
    port: u16,
) -> Result<(Pod, Proc)> {
    create_namespace(client, namespace)?;
    let hello = hello_binary()?;
    let pod = node.host.add_pod(name)?;
    let listen = std::net::SocketAddr::from((pod.ip(), port)).to_string();
    let server = pod.spawn(&[
        path_str(&hello)?,
        "serve",
        "--listen",
        &listen,
        "--name",
        name,
    ])?;
    bind_pod(
        client,
        namespace,
        name,
        &[("app", app)],
        &pod,
        &node.name,
        None,
    )?;
    Ok((pod, server))
}

/// Namespace `namespace`, created if absent.
///
/// # Errors
/// When the API server refuses.
pub fn create_namespace(client: &Client, namespace: &str) -> Result<()> {
    apply_cluster(
        client,
        &object::<Namespace>(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": namespace },
        }))?,
    )?;
    Ok(())
}

/// A ClusterIP Service `namespace/name` on TCP `port` (named `http`) for the pods
/// labelled `app=NAME`.
///
/// # Errors
/// When the API server refuses.
pub fn hello_service(client: &Client, namespace: &str, name: &str, port: u16) -> Result<Service> {
    apply(
        client,
        namespace,
        &object::<Service>(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "selector": { "app": name },
                "ports": [{ "name": "http", "port": port, "protocol": "TCP", "targetPort": port }],
            },
        }))?,
    )
}

/// Makes CoreDNS at [`DNS_IP`] the resolver of `pod`, searching `namespace` first.
///
/// # Errors
/// When the file cannot be written.
pub fn set_resolver(pod: &Netns, namespace: &str) -> Result<()> {
    pod.write_etc_file(
        "resolv.conf",
        &format!(
            "nameserver {DNS_IP}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:2\n"
        ),
    )
}

/// The EndpointSlices of Service `namespace/service`.
///
/// # Errors
/// When the API server fails.
pub fn endpoint_slices(
    client: &Client,
    namespace: &str,
    service: &str,
) -> Result<Vec<EndpointSlice>> {
    let api = Api::<EndpointSlice>::namespaced(client.clone(), namespace);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    Ok(block_on(api.list(&params))
        .with_context(|| format!("listing the EndpointSlices of {namespace}/{service}"))?
        .items)
}

/// The ClusterIP of Service `namespace/name`.
///
/// # Errors
/// When there is no such Service or it has none.
pub fn cluster_ip(client: &Client, namespace: &str, name: &str) -> Result<Ipv4Addr> {
    let service = block_on(Api::<Service>::namespaced(client.clone(), namespace).get(name))
        .with_context(|| format!("reading Service {namespace}/{name}"))?;
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .with_context(|| format!("Service {namespace}/{name} has no ClusterIP"))?
        .parse()
        .with_context(|| format!("the ClusterIP of {namespace}/{name}"))
}

/// Where the `wm-hello` binary is, found like the agent's (`$WIREMESH_HELLO_BIN`).
///
/// # Errors
/// When it is not there, saying how to build it.
pub fn hello_binary() -> Result<PathBuf> {
    crate::lab::find_binary(
        "wm-hello",
        "WIREMESH_HELLO_BIN",
        "cargo build -p wiremesh-lab --bin wm-hello",
    )
}

/// Server-side applies a namespaced object (field manager `wiremesh-lab`).
///
/// # Errors
/// When the API server refuses.
pub fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::namespaced(client.clone(), namespace);
    block_on(api.patch(
        &name,
        &PatchParams::apply("wiremesh-lab").force(),
        &Patch::Apply(object),
    ))
    .with_context(|| format!("applying {} {namespace}/{name}", K::kind(&())))
}

/// Server-side applies a cluster-scoped object (field manager `wiremesh-lab`).
///
/// # Errors
/// When the API server refuses.
pub fn apply_cluster<K>(client: &Client, object: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::all(client.clone());
    block_on(api.patch(
        &name,
        &PatchParams::apply("wiremesh-lab").force(),
        &Patch::Apply(object),
    ))
    .with_context(|| format!("applying {} {name}", K::kind(&())))
}

/// An object from JSON; the lab's fixtures are literals, so failing is a bug in them.
///
/// # Errors
/// When `value` is not a `K`.
pub fn object<K: DeserializeOwned>(value: serde_json::Value) -> Result<K> {
    serde_json::from_value(value).context("a lab fixture does not parse")
}

fn start_controller_manager(
    clusters: &TwoClusters,
    plane: &ControlPlane,
    bins: &Binaries,
) -> Result<Proc> {
    let key = plane.dir().join("pki/sa.key");
    clusters.lab.spawn_root(
        &[
            path_str(&bins.controller_manager)?,
            "--kubeconfig",
            path_str(plane.kubeconfig())?,
            "--controllers",
            "endpointslice-controller,endpointslice-mirroring-controller,garbage-collector-controller,namespace-controller",
            "--leader-elect=false",
            // No listener: three clusters' managers share the root namespace.
            "--secure-port=0",
            "--service-account-private-key-file",
            path_str(&key)?,
            "--cluster-name",
            plane.name(),
            "--concurrent-service-endpoint-syncs=5",
        ],
        &[],
    )
}

/// What a kubeadm cluster has for CoreDNS before Wiremesh: ServiceAccount, ClusterRole and
/// binding `system:coredns`, ConfigMap `coredns` (a stock Corefile, plus the kubeconfig
/// the lab's CoreDNS reaches the API server with), a Deployment naming the image, the
/// `kube-dns` Service and the Pod object of the lab's CoreDNS.
fn stock_coredns_objects(
    client: &Client,
    plane: &ControlPlane,
    dns_pod: &Pod,
    node: &str,
) -> Result<()> {
    apply(client, KUBE_SYSTEM, &service_account("coredns"))?;
    apply_cluster(
        client,
        &object::<k8s_openapi::api::rbac::v1::ClusterRole>(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": "system:coredns" },
            "rules": [
                { "apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                  "verbs": ["list", "watch"] },
                { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                  "verbs": ["list", "watch"] },
            ],
        }))?,
    )?;
    apply_cluster(
        client,
        &binding("system:coredns", "system:coredns", "coredns"),
    )?;
    let kubeconfig = plane.token_kubeconfig(KUBE_SYSTEM, "coredns")?;
    let corefile = format!(
        ".:53 {{
    errors
    health
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
       kubeconfig {} {}
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 5
    }}
}}
",
        path_str(&kubeconfig)?,
        plane.name()
    );
    apply(
        client,
        KUBE_SYSTEM,
        &object::<ConfigMap>(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "coredns", "namespace": KUBE_SYSTEM },
            "data": { "Corefile": corefile },
        }))?,
    )?;
    apply(
        client,
        KUBE_SYSTEM,
        &object::<k8s_openapi::api::apps::v1::Deployment>(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "coredns", "namespace": KUBE_SYSTEM },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { "k8s-app": "kube-dns" } },
                "template": {
                    "metadata": { "labels": { "k8s-app": "kube-dns" } },
                    "spec": {
                        "serviceAccountName": "coredns",
                        "containers": [{ "name": "coredns", "image": COREDNS_IMAGE }],
                    },
                },
            },
        }))?,
    )?;
    apply(
        client,
        KUBE_SYSTEM,
        &object::<Service>(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "kube-dns", "namespace": KUBE_SYSTEM,
                          "labels": { "k8s-app": "kube-dns" } },
            "spec": {
                "clusterIP": DNS_IP.to_string(),
                "selector": { "k8s-app": "kube-dns" },
                "ports": [
                    { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53 },
                    { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53 },
                ],
            },
        }))?,
    )?;
    bind_pod(
        client,
        KUBE_SYSTEM,
        &format!("coredns-{node}"),
        &[("k8s-app", "kube-dns")],
        dns_pod,
        node,
        None,
    )
}

/// `meshctl install --configure-dns` again (install is idempotent) with the arguments
/// [`TwoClusters`] installed with; returns its output.
fn configure_dns(clusters: &TwoClusters, side: Side) -> Result<String> {
    let mut args = clusters.install_args(side);
    args.push("--configure-dns".to_owned());
    let out = clusters.meshctl(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "meshctl install --configure-dns failed:\n{text}"
    );
    Ok(text)
}

fn read_corefile(client: &Client) -> Result<String> {
    let cm = block_on(Api::<ConfigMap>::namespaced(client.clone(), KUBE_SYSTEM).get("coredns"))
        .context("reading ConfigMap kube-system/coredns")?;
    cm.data
        .and_then(|mut d| d.remove("Corefile"))
        .ok_or_else(|| anyhow!("ConfigMap kube-system/coredns has no Corefile"))
}

fn service_account(name: &str) -> k8s_openapi::api::core::v1::ServiceAccount {
    k8s_openapi::api::core::v1::ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(KUBE_SYSTEM.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn binding(
    name: &str,
    role: &str,
    account: &str,
) -> k8s_openapi::api::rbac::v1::ClusterRoleBinding {
    k8s_openapi::api::rbac::v1::ClusterRoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        role_ref: k8s_openapi::api::rbac::v1::RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: role.to_owned(),
        },
        subjects: Some(vec![k8s_openapi::api::rbac::v1::Subject {
            kind: "ServiceAccount".to_owned(),
            name: account.to_owned(),
            namespace: Some(KUBE_SYSTEM.to_owned()),
            ..Default::default()
        }]),
    }
}

fn build_script(args: &[&str]) -> Result<PathBuf> {
    let (script, rest) = args.split_first().context("no script")?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("k8s")
        .join(script);
    let mut command = Command::new("bash");
    command.arg(&path).args(rest);
    let started = Instant::now();
    let out = run_with_timeout(command, BUILD_TIMEOUT)
        .with_context(|| format!("running {}", path.display()))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        path.display(),
        crate::lab::output_text(&out)
    );
    if started.elapsed() > Duration::from_secs(5) {
        eprintln!(
            "{script}: built in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::to_owned)
        .with_context(|| format!("{} printed no directory", path.display()))?;
    Ok(PathBuf::from(dir))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}
