//! Real Kubernetes control planes for multi-cluster tests: one etcd + kube-apiserver per
//! simulated cluster (`tests/k8s/controlplane.sh`), stopped and deleted in `Drop`; a merged
//! kubeconfig with one context per cluster; outages (`pause`/`resume`); an [`ApiProxy`] that
//! makes an API server reachable from inside a lab namespace at the very same address; and
//! helpers for `Node`s, installing Wiremesh and ServiceAccount tokens.
//!
//! The lab is synchronous, so this module is too: every call blocks on one shared tokio
//! runtime ([`runtime`]), on which the [`Client`]s it hands out also run. Do not call these
//! functions from inside an async context; use [`block_on`] for your own async code.
//!
//! There is no kubelet, scheduler or controller-manager: tests create `Node` objects
//! themselves ([`create_node`]), nothing garbage-collects, and ServiceAccount tokens come
//! from the TokenRequest API only.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nix::sched::{CloneFlags, setns};
use rand_core::{OsRng, RngCore};

use crate::lab::Netns;
use crate::lab::{describe, run_with_timeout};

/// Bound for `controlplane.sh start`: normally seconds, but the first run on a machine
/// builds kube-apiserver and etcd (about 7 minutes on 2 cores, tests/k8s/README.md).
pub const START_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Bound for `stop`, `pause` and `resume` (the script gives each process 20 s before
/// SIGKILL, and waits up to 120 s for /readyz).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound for one `meshctl` run in tests.
pub const MESHCTL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`ApiProxy`] waits to connect to the API server for each connection.
const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the proxy's listener looks at its stop flag.
const PROXY_POLL: Duration = Duration::from_millis(20);

/// The shared runtime every call of this module blocks on. Clients made here spawn their
/// connection tasks on it, so it lives as long as the test process.
///
/// # Panics
/// When the runtime cannot be built (no threads left).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("k8s-harness")
            .enable_all()
            .build()
            .expect("building the test runtime; only fails when out of threads")
    })
}

/// Runs `future` to completion on [`runtime`].
pub fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// Runs `future` on [`runtime`] for at most `timeout`.
///
/// # Errors
/// When the time runs out (the future is dropped).
pub fn block_on_timeout<F: Future>(timeout: Duration, future: F) -> Result<F::Output> {
    block_on(async { tokio::time::timeout(timeout, future).await })
        .map_err(|_| anyhow!("no result within {timeout:?}"))
}

/// One throwaway control plane (etcd + kube-apiserver on 127.0.0.1, free ports, its own CA)
/// in `/tmp/wmXXXX-k8s-<name>/`; its admin kubeconfig has one context named `<name>`.
/// Dropping it (also while a test panics) stops both processes and deletes the directory
/// (`WIREMESH_LAB_KEEP` keeps the logs).
#[derive(Debug)]
pub struct ControlPlane {
    name: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    api_port: u16,
    ca: PathBuf,
}

impl ControlPlane {
    /// Starts a plane whose cluster, user-facing context and etcd are called `name` (a short
    /// DNS label such as `cluster-a`), and waits for `/readyz`.
    ///
    /// # Errors
    /// When the script fails (with its output, which ends with the failing log's tail).
    pub fn start(name: &str) -> Result<ControlPlane> {
        Self::start_with_env(name, &[])
    }

    /// [`ControlPlane::start`] with environment variables for `controlplane.sh` (its
    /// `WIREMESH_K8S_*` options, e.g. the ServiceAccount admission a kubelet needs).
    ///
    /// # Errors
    /// As [`ControlPlane::start`].
    pub fn start_with_env(name: &str, env: &[(&str, &str)]) -> Result<ControlPlane> {
        let dir = unique_dir(name)?;
        let output = run_script_env(&["start", name, path_str(&dir)?], env, START_TIMEOUT);
        let started = output.and_then(|o| {
            ensure!(
                o.status.success(),
                "controlplane.sh start {name}: {}",
                describe(&o)
            );
            Ok(())
        });
        if let Err(e) = started {
            let _ = run_script(&["stop", path_str(&dir)?, "--purge"], SCRIPT_TIMEOUT);
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        let plane = Self::from_dir(name, dir.clone());
        if plane.is_err() {
            let _ = run_script(&["stop", path_str(&dir)?, "--purge"], SCRIPT_TIMEOUT);
        }
        plane
    }

    /// Starts one plane per name at once (each takes seconds; in parallel they overlap).
    ///
    /// # Errors
    /// When any fails; the others are stopped again.
    pub fn start_all(names: &[&str]) -> Result<Vec<ControlPlane>> {
        let starts: Vec<_> = names
            .iter()
            .map(|name| {
                let name = (*name).to_owned();
                thread::spawn(move || ControlPlane::start(&name))
            })
            .collect();
        starts
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow!("a control plane start panicked"))?
            })
            .collect()
    }

    fn from_dir(name: &str, dir: PathBuf) -> Result<ControlPlane> {
        let env = read_env(&dir.join("plane.env"))?;
        let var = |key: &str| {
            env.get(key)
                .cloned()
                .ok_or_else(|| anyhow!("{key} missing from {}/plane.env", dir.display()))
        };
        Ok(ControlPlane {
            name: name.to_owned(),
            kubeconfig: PathBuf::from(var("WIREMESH_K8S_KUBECONFIG")?),
            server: var("WIREMESH_K8S_SERVER")?,
            api_port: var("WIREMESH_K8S_API_PORT")?
                .parse()
                .context("WIREMESH_K8S_API_PORT")?,
            ca: PathBuf::from(var("WIREMESH_K8S_CA")?),
            dir,
        })
    }

    /// The cluster's (and its context's) name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plane's directory (logs, PKI, kubeconfig).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (client certificate in group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The API server's port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The plane's CA certificate (PEM file).
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// An admin client.
    ///
    /// # Errors
    /// When the kubeconfig cannot be read.
    pub fn client(&self) -> Result<Client> {
        block_on(client_from(&self.kubeconfig, None))
    }

    /// A client that authenticates with a bearer token (e.g. a ServiceAccount's).
    ///
    /// # Errors
    /// When the client cannot be built.
    pub fn token_client(&self, token: &str) -> Result<Client> {
        block_on(client_from_kubeconfig(self.token_kubeconfig_value(token)?))
    }

    /// Mints a token for ServiceAccount `namespace/name` (TokenRequest, valid `ttl`).
    ///
    /// # Errors
    /// When the ServiceAccount does not exist or the request fails.
    pub fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<String> {
        let client = self.client()?;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let response = block_on(
            Api::<ServiceAccount>::namespaced(client, namespace).create_token_request(
                name,
                &PostParams::default(),
                &request,
            ),
        )
        .with_context(|| format!("{}: TokenRequest for {namespace}/{name}", self.name))?;
        response
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "{}: TokenRequest for {namespace}/{name} returned no token",
                    self.name
                )
            })
    }

    /// Writes a kubeconfig for ServiceAccount `namespace/name` (a fresh one-hour token; the
    /// context is named after the plane) into the plane's directory and returns its path:
    /// for running a component with exactly the rights its RBAC grants.
    ///
    /// # Errors
    /// When the token cannot be minted or the file written.
    pub fn token_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, name, Duration::from_secs(3600))?;
        self.write_token_kubeconfig(&format!("sa-{namespace}-{name}"), &token)
    }

    /// Writes `kubeconfig-<name>` with `token` as the user into the plane's directory and
    /// returns its path.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        write_private(
            &path,
            &serde_json::to_vec_pretty(&self.token_kubeconfig_value(token)?)?,
        )?;
        Ok(path)
    }

    fn token_kubeconfig_value(&self, token: &str) -> Result<Kubeconfig> {
        let mut kubeconfig = read_kubeconfig(&self.kubeconfig)?;
        let user = kubeconfig
            .auth_infos
            .first_mut()
            .ok_or_else(|| anyhow!("{} has no user", self.kubeconfig.display()))?;
        user.auth_info = Some(serde_json::from_value(
            serde_json::json!({ "token": token }),
        )?);
        Ok(kubeconfig)
    }

    /// Installs Wiremesh (CRDs, namespace, ConfigMap) under the plane's name.
    ///
    /// # Errors
    /// As [`install`].
    pub fn install(&self, pod_cidrs: &[&str]) -> Result<()> {
        install(&self.client()?, &self.name, pod_cidrs)
    }

    /// An outage: stops kube-apiserver only (etcd, data, certificates and port stay).
    ///
    /// # Errors
    /// When the script fails.
    pub fn pause(&self) -> Result<()> {
        self.script_ok("pause")
    }

    /// Ends an outage: starts kube-apiserver again with the identical command line and waits
    /// for `/readyz`.
    ///
    /// # Errors
    /// When it does not come back (with the log's tail).
    pub fn resume(&self) -> Result<()> {
        self.script_ok("resume")
    }

    fn script_ok(&self, command: &str) -> Result<()> {
        let output = run_script(&[command, path_str(&self.dir)?], SCRIPT_TIMEOUT)?;
        ensure!(
            output.status.success(),
            "controlplane.sh {command} {}: {}",
            self.dir.display(),
            describe(&output)
        );
        Ok(())
    }

    /// The last `lines` lines of kube-apiserver's log.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- control plane {} ({}): kube-apiserver log, last lines ----\n{}",
                self.name,
                self.server,
                self.apiserver_log_tail(20)
            );
        }
        let keep = std::env::var_os("WIREMESH_LAB_KEEP").is_some();
        let Ok(dir) = path_str(&self.dir) else {
            return;
        };
        let args: &[&str] = if keep {
            &["stop", dir]
        } else {
            &["stop", dir, "--purge"]
        };
        match run_script(args, SCRIPT_TIMEOUT) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("control plane {}: stop: {}", self.name, describe(&o)),
            Err(e) => eprintln!("control plane {}: stop: {e:#}", self.name),
        }
        if keep {
            eprintln!(
                "control plane {}: keeping logs in {}",
                self.name,
                self.dir.display()
            );
        }
    }
}

/// Writes one kubeconfig holding every plane's cluster, user and context (each named after
/// its plane), with `current` as the current context, into the current plane's directory;
/// returns its path. This is what `meshctl join` is given.
///
/// # Errors
/// When `current` is not one of the planes or a file cannot be read or written.
pub fn write_kubeconfig(planes: &[&ControlPlane], current: &str) -> Result<PathBuf> {
    let home = planes
        .iter()
        .find(|p| p.name == current)
        .ok_or_else(|| anyhow!("no plane named {current}"))?;
    let mut merged = Kubeconfig::default();
    for plane in planes {
        merged = merged
            .merge(read_kubeconfig(&plane.kubeconfig)?)
            .with_context(|| format!("merging {}", plane.kubeconfig.display()))?;
    }
    merged.current_context = Some(current.to_owned());
    let names: Vec<&str> = planes.iter().map(|p| p.name.as_str()).collect();
    let path = home.dir.join(format!("kubeconfig-{}", names.join("+")));
    // JSON is YAML: kube and kubectl read it as a kubeconfig.
    write_private(&path, &serde_json::to_vec_pretty(&merged)?)?;
    Ok(path)
}

/// Two control planes, cluster-a (pod CIDR 10.1.0.0/16) and cluster-b (10.2.0.0/16), with
/// Wiremesh installed and linked by `meshctl join cluster-b` run against cluster-a; the
/// merged kubeconfig (current context cluster-a). No agents, no controllers.
///
/// # Errors
/// When a plane does not start, an install fails or `meshctl join` fails (its output
/// in the error).
pub fn joined_planes() -> Result<(Vec<ControlPlane>, PathBuf)> {
    let planes = ControlPlane::start_all(&["cluster-a", "cluster-b"])?;
    let [a, b] = planes.as_slice() else {
        bail!("{} control planes started, not 2", planes.len())
    };
    a.install(&["10.1.0.0/16"])?;
    b.install(&["10.2.0.0/16"])?;
    let kubeconfig = write_kubeconfig(&[a, b], "cluster-a")?;
    let out = meshctl(
        &["--kubeconfig", path_str(&kubeconfig)?, "join", "cluster-b"],
        &[],
    )?;
    ensure!(
        out.status.success(),
        "meshctl join failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((planes, kubeconfig))
}

/// Installs Wiremesh in the cluster of `client` as `cluster_name` with `pod_cidrs`
/// (`wiremesh_controller::install::install`).
///
/// # Errors
/// When a CIDR does not parse or the install fails.
pub fn install(client: &Client, cluster_name: &str, pod_cidrs: &[&str]) -> Result<()> {
    let cidrs = pod_cidrs
        .iter()
        .map(|c| c.parse().with_context(|| format!("pod CIDR {c:?}")))
        .collect::<Result<Vec<_>>>()?;
    block_on(wiremesh_controller::install::install(
        client,
        cluster_name,
        &cidrs,
    ))
    .with_context(|| format!("installing Wiremesh as {cluster_name}"))
}

/// Puts an `ExternalIP` address first in Node `name`'s status, as a cloud provider does
/// for a node with a public address.
///
/// # Errors
/// When the API server refuses the patch.
pub fn add_external_ip(client: &Client, name: &str, ip: impl Into<IpAddr>) -> Result<()> {
    let api = Api::<Node>::all(client.clone());
    let node = block_on(api.get_status(name)).with_context(|| format!("reading Node {name}"))?;
    let mut addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    addresses.insert(
        0,
        k8s_openapi::api::core::v1::NodeAddress {
            type_: "ExternalIP".to_owned(),
            address: ip.into().to_string(),
        },
    );
    let patch = serde_json::json!({ "status": { "addresses": addresses } });
    block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))
        .with_context(|| format!("adding an ExternalIP to Node {name}"))?;
    Ok(())
}

/// Creates a `Node` as a kubelet and node-IPAM would leave it: `spec.podCIDR(s)`, label
/// `kubernetes.io/hostname`, and status with an `InternalIP` address and `Ready=True`.
///
/// # Errors
/// When the API server refuses it (e.g. it exists).
pub fn create_node(
    client: &Client,
    name: &str,
    pod_cidr: &str,
    internal_ip: impl Into<IpAddr>,
) -> Result<Node> {
    create_node_with(client, name, &[pod_cidr], &[internal_ip.into()])
}

/// As [`create_node`], for a dual-stack node: `spec.podCIDRs` holds `pod_cidrs` in order
/// (`spec.podCIDR` the first, as node-IPAM leaves it), and the status an `InternalIP` for
/// each of `internal_ips`.
///
/// # Errors
/// When `pod_cidrs` is empty or the API server refuses the Node.
pub fn create_node_with(
    client: &Client,
    name: &str,
    pod_cidrs: &[&str],
    internal_ips: &[IpAddr],
) -> Result<Node> {
    let first = pod_cidrs
        .first()
        .with_context(|| format!("Node {name} needs a pod CIDR"))?;
    let mut addresses: Vec<serde_json::Value> = internal_ips
        .iter()
        .map(|ip| serde_json::json!({ "type": "InternalIP", "address": ip.to_string() }))
        .collect();
    addresses.push(serde_json::json!({ "type": "Hostname", "address": name }));
    let status = serde_json::json!({
        "addresses": addresses,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "a Wiremesh test node (no kubelet)",
        }],
    });
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        "spec": { "podCIDR": first, "podCIDRs": pod_cidrs },
        "status": status,
    }))?;
    let api = Api::<Node>::all(client.clone());
    let created = block_on(api.create(&PostParams::default(), &node))
        .with_context(|| format!("creating Node {name}"))?;
    let has_address = created
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| !a.is_empty());
    if has_address {
        return Ok(created);
    }
    // Should the create drop the status, set it through the status subresource.
    block_on(api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    ))
    .with_context(|| format!("setting the status of Node {name}"))
}

/// Deletes a `Node`; one that is not there counts as deleted.
///
/// # Errors
/// When the API server fails.
pub fn delete_node(client: &Client, name: &str) -> Result<()> {
    match block_on(Api::<Node>::all(client.clone()).delete(name, &DeleteParams::default())) {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting Node {name}")),
    }
}

/// Where the `meshctl` binary is: `$WIREMESH_MESHCTL_BIN`, else next to the running test
/// executable (`target/<profile>/`, or its parent for test binaries in `deps/`).
///
/// # Errors
/// When it is not there, saying how to build it.
pub fn meshctl_binary() -> Result<PathBuf> {
    crate::lab::find_binary(
        "meshctl",
        "WIREMESH_MESHCTL_BIN",
        "cargo build -p wiremesh-controller --bin meshctl",
    )
}

/// Runs `meshctl args...` to completion (bounded by [`MESHCTL_TIMEOUT`]) with `KUBECONFIG`
/// removed from its environment and `env` added. A non-zero exit is not an error here.
///
/// # Errors
/// When it cannot be found, started, or times out.
pub fn meshctl(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut command = Command::new(meshctl_binary()?);
    command
        .args(args)
        .env_remove("KUBECONFIG")
        .envs(env.iter().copied());
    run_with_timeout(command, MESHCTL_TIMEOUT)
        .with_context(|| format!("meshctl {}", args.join(" ")))
}

/// A TCP forwarder that makes 127.0.0.1:`port` of the root namespace (where the test API
/// servers listen) reachable at 127.0.0.1:`port` inside a lab namespace, so an agent there
/// uses the very same kubeconfig (the server certificate has the IP SAN 127.0.0.1).
///
/// A listener thread enters the namespace and accepts; a dispatcher thread, which stays in
/// the root namespace, makes the outgoing connection (a socket keeps the namespace it was
/// created in); two threads per connection copy bytes until either side closes, then close
/// both. Dropping the proxy stops accepting and closes every connection. Drop it before the
/// lab.
pub struct ApiProxy {
    port: u16,
    namespace: String,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<BTreeMap<u64, [TcpStream; 2]>>>,
    listener: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
}

impl ApiProxy {
    /// Starts forwarding 127.0.0.1:`port` inside `ns` to 127.0.0.1:`port` here. Call it
    /// from a thread in the root namespace (any test thread).
    ///
    /// # Errors
    /// When the namespace cannot be entered or the port is taken there.
    pub fn start(ns: &Netns, port: u16) -> Result<ApiProxy> {
        Self::start_at(ns, Ipv4Addr::LOCALHOST, port)
    }

    /// As [`ApiProxy::start`], listening on `ip`:`port` inside `ns` (an address of the
    /// namespace: pods behind it reach it too) and forwarding to 127.0.0.1:`port` here.
    ///
    /// # Errors
    /// As [`ApiProxy::start`].
    pub fn start_at(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<ApiProxy> {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(BTreeMap::new()));
        let (accepted_tx, accepted_rx) = mpsc::channel::<TcpStream>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let path = format!("/run/netns/{}", ns.name());
        let listen = SocketAddr::from((ip, port));
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

        let stop_flag = Arc::clone(&stop);
        let listener = thread::Builder::new()
            .name(format!("api-proxy-listen-{port}"))
            .spawn(move || {
                let bound = (|| -> Result<TcpListener> {
                    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering {path}"))?;
                    let listener = TcpListener::bind(listen)
                        .with_context(|| format!("listening on {listen} in {path}"))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })();
                let listener = match bound {
                    Ok(listener) => {
                        let _ = ready_tx.send(Ok(()));
                        listener
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while !stop_flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if stream.set_nonblocking(false).is_err() {
                                continue;
                            }
                            if accepted_tx.send(stream).is_err() {
                                break;
                            }
                        }
                        Err(_) => thread::sleep(PROXY_POLL),
                    }
                }
            })
            .context("spawning the proxy's listener thread")?;
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the proxy's listener did not start"))
            .and_then(|r| r);
        if let Err(e) = ready {
            let _ = listener.join();
            return Err(e);
        }

        let conns = Arc::clone(&connections);
        let dispatcher = thread::Builder::new()
            .name(format!("api-proxy-dispatch-{port}"))
            .spawn(move || {
                let next_id = AtomicU64::new(0);
                for inbound in accepted_rx {
                    let Ok(outbound) = TcpStream::connect_timeout(&upstream, PROXY_CONNECT_TIMEOUT)
                    else {
                        // The API server is down (paused): the client sees the connection close.
                        continue;
                    };
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = forward(id, inbound, outbound, &conns) {
                        eprintln!("api proxy {port}: {e:#}");
                    }
                }
            })
            .context("spawning the proxy's dispatcher thread")?;

        Ok(ApiProxy {
            port,
            namespace: ns.name().to_owned(),
            stop,
            connections,
            listener: Some(listener),
            dispatcher: Some(dispatcher),
        })
    }

    /// The port it forwards.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every forwarded connection now (clients see a reset), keeping the listener:
    /// forces clients to reconnect.
    pub fn close_connections(&self) {
        let conns = std::mem::take(&mut *lock(&self.connections));
        for pair in conns.values() {
            for stream in pair {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl std::fmt::Debug for ApiProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiProxy")
            .field("namespace", &self.namespace)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The listener exits within PROXY_POLL and drops the channel, which ends the
        // dispatcher (after at most one connect timeout).
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        if let Some(t) = self.dispatcher.take() {
            let _ = t.join();
        }
        self.close_connections();
    }
}

/// Copies both ways between `a` and `b` on two threads; when either direction ends, both
/// sockets are shut down, which ends the other.
fn forward(
    id: u64,
    a: TcpStream,
    b: TcpStream,
    conns: &Arc<Mutex<BTreeMap<u64, [TcpStream; 2]>>>,
) -> Result<()> {
    lock(conns).insert(id, [a.try_clone()?, b.try_clone()?]);
    for (mut from, mut to) in [(a.try_clone()?, b.try_clone()?), (b, a)] {
        let conns = Arc::clone(conns);
        thread::Builder::new()
            .name(format!("api-proxy-conn-{id}"))
            .spawn(move || {
                let _ = io::copy(&mut from, &mut to);
                let _ = from.shutdown(std::net::Shutdown::Both);
                let _ = to.shutdown(std::net::Shutdown::Both);
                lock(&conns).remove(&id);
            })?;
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn client_from(path: &Path, context: Option<&str>) -> Result<Client> {
    let kubeconfig = read_kubeconfig(path)?;
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    Client::try_from(config).context("building a client")
}

async fn client_from_kubeconfig(kubeconfig: Kubeconfig) -> Result<Client> {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading a token kubeconfig")?;
    Client::try_from(config).context("building a client")
}

/// A client for `kubeconfig`'s `context` (or its current context). Must run inside a tokio
/// runtime: use it from your own runtime, e.g. on a thread that entered a lab namespace
/// (then the client's sockets are made inside that namespace).
///
/// # Errors
/// When the file cannot be read or the client built.
pub async fn client_for(kubeconfig: &Path, context: Option<&str>) -> Result<Client> {
    client_from(kubeconfig, context).await
}

fn read_kubeconfig(path: &Path) -> Result<Kubeconfig> {
    Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/controlplane.sh")
}

fn run_script(args: &[&str], timeout: Duration) -> Result<Output> {
    run_script_env(args, &[], timeout)
}

fn run_script_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Result<Output> {
    let mut command = Command::new("bash");
    command.arg(script()).args(args).envs(env.iter().copied());
    run_with_timeout(command, timeout)
        .with_context(|| format!("controlplane.sh {}", args.join(" ")))
}

/// Claims `/tmp/wmXXXX-k8s-<name>` (mode 0700) with 4 random hex digits, retrying on a clash.
fn unique_dir(name: &str) -> Result<PathBuf> {
    ensure!(
        !name.is_empty()
            && name.len() <= 42
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "plane name {name:?} must be a short DNS label"
    );
    for _ in 0..16 {
        let dir =
            std::env::temp_dir().join(format!("wm{:04x}-k8s-{name}", OsRng.next_u32() & 0xffff));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free /tmp/wmXXXX-k8s-{name} directory after 16 tries; remove stale ones")
}

fn read_env(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}
