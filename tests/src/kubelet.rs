//! A real node in the lab (issue 16): a lab host whose pods are run by a real `kubelet`
//! (k8s.io/kubernetes at the lab's pinned version) with Debian's `containerd` and `runc`,
//! beside a `kube-scheduler` and a `kube-controller-manager` in the root namespace. What
//! these machines need for it is written down in `tests/k8s/README.md` ("A real kubelet"):
//!
//! - cgroup v1 with the cgroupfs driver (`failCgroupV1: false`), under a cgroup root of the
//!   node's own, made in every hierarchy and removed again;
//! - containerd and the kubelet in the host's network namespace entered with `nsenter`
//!   (`ip netns exec` remounts `/sys` and hides the cgroup mounts) and in a private mount
//!   namespace, where the three kernel flags the kubelet insists on read as it wants
//!   (read-only files bind-mounted over `/proc/sys/...`: the machine's own stay), and where
//!   the node's hostPath directories (`/var/lib/wiremesh`, `/var/run/wireguard`) and
//!   `/run/netns` are directories of the node's own, so two nodes on one machine never
//!   share a key or a socket;
//! - containerd's CRI with `restrict_oom_score_adj` (no `CAP_SYS_RESOURCE` here), the
//!   lab's pause image as its sandbox image, the Debian CNI `bridge` plugin on the host's
//!   pod bridge (`pods0`) with `host-local` addresses from .100 of the node's pod CIDR;
//! - images imported with `ctr images import` from OCI archives (`scripts/oci-image.sh`,
//!   `tests/k8s/build.sh --node`): no registry.
//!
//! Pods reach the API server at [`API_ADDRESS`], an address every node holds on its
//! loopback with an [`ApiProxy`] behind it (a node-local API load balancer, as kubespray's
//! and k3s's), given to the chart as `apiServer.host`: the lab has no kube-proxy here.
//! Every process is stopped by PID: those of the node's cgroups (the daemons, the shims and
//! the containers) get SIGKILL when the node is dropped.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};

use crate::k8s::{ApiProxy, ControlPlane};
use crate::lab::{Host, Lab, Netns, Proc, run_with_timeout};

/// The address every kubelet node holds on its loopback, forwarding to its cluster's API
/// server: `apiServer.host` of the chart, and a subjectAltName of the serving certificate.
pub const API_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
/// The sandbox image the lab's containerd uses (`tests/k8s/build.sh --node`).
pub const PAUSE_IMAGE: &str = "wiremesh.invalid/pause:3.10";
/// The environment of `controlplane.sh` for a plane that real kubelets join.
pub const PLANE_ENV: [(&str, &str); 2] = [
    ("WIREMESH_K8S_SERVICE_ACCOUNTS", "1"),
    ("WIREMESH_K8S_EXTRA_SANS", "IP:198.18.250.1"),
];
/// Bound for the Go builds of `tests/k8s/build.sh --node` (cold: minutes on 2 cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// How long containerd may take to open its socket.
const CONTAINERD_START: Duration = Duration::from_secs(30);
/// The kernel flags the kubelet checks (`protectKernelDefaults`), with the values it wants.
const KERNEL_FLAGS: [(&str, &str); 3] = [
    ("vm/overcommit_memory", "1"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
];

/// The binaries of `tests/k8s/build.sh --node`.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    /// kubelet.
    pub kubelet: PathBuf,
    /// kube-scheduler.
    pub scheduler: PathBuf,
    /// kube-controller-manager.
    pub controller_manager: PathBuf,
    /// The pause image's OCI archive.
    pub pause_image: PathBuf,
}

impl NodeBinaries {
    /// Runs `tests/k8s/build.sh --node` (under a second when everything is built).
    ///
    /// # Errors
    /// When the build fails.
    pub fn build() -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
        let mut command = Command::new("nice");
        command
            .args(["-n", "10", "bash"])
            .arg(&script)
            .arg("--node");
        let out = run_with_timeout(command, BUILD_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "{} --node failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Self {
            kubelet: dir.join("kubelet"),
            scheduler: dir.join("kube-scheduler"),
            controller_manager: dir.join("kube-controller-manager"),
            pause_image: dir.join("pause.tar"),
        })
    }
}

/// Writes the Wiremesh image `name` (`repository:tag`) from the workspace's debug binaries
/// with `scripts/oci-image.sh` into `out`.
///
/// # Errors
/// When the script fails (a binary not built, a tool missing).
pub fn build_image(name: &str, out: &Path) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = crate::lab::agent_binary()?
        .parent()
        .ok_or_else(|| anyhow!("the agent binary has no directory"))?
        .to_path_buf();
    let mut command = Command::new("bash");
    command
        .arg(root.join("scripts/oci-image.sh"))
        .arg(&bin_dir)
        .arg(name)
        .arg(out);
    let output = run_with_timeout(command, Duration::from_secs(300))?;
    ensure!(
        output.status.success(),
        "scripts/oci-image.sh failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The cluster-wide parts: kube-scheduler and kube-controller-manager for one plane, in the
/// root namespace (where the plane listens). Drop it before the lab.
pub struct ClusterDaemons {
    /// kube-scheduler.
    pub scheduler: Proc,
    /// kube-controller-manager.
    pub controller_manager: Proc,
}

impl ClusterDaemons {
    /// Starts both for `plane`, with the controllers a DaemonSet and a Deployment need
    /// (daemonset, deployment, replicaset, the root CA publisher that projected tokens
    /// mount, service accounts, garbage collector, and node lifecycle: it lifts the
    /// `not-ready` taint a kubelet registers with).
    ///
    /// # Errors
    /// When either cannot be started.
    pub fn start(lab: &Lab, plane: &ControlPlane, bins: &NodeBinaries) -> Result<Self> {
        let kubeconfig = path_str(plane.kubeconfig())?;
        let scheduler = lab.spawn_root(
            &[
                path_str(&bins.scheduler)?,
                "--kubeconfig",
                kubeconfig,
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
            &[],
        )?;
        let key = plane.dir().join("pki/sa.key");
        let controller_manager = lab.spawn_root(
            &[
                path_str(&bins.controller_manager)?,
                "--kubeconfig",
                kubeconfig,
                "--controllers",
                "daemonset-controller,deployment-controller,replicaset-controller,\
                 root-ca-certificate-publisher-controller,serviceaccount-controller,\
                 garbage-collector-controller,namespace-controller,\
                 endpointslice-controller,node-lifecycle-controller",
                "--leader-elect=false",
                "--secure-port=0",
                "--root-ca-file",
                path_str(plane.ca_path())?,
                "--service-account-private-key-file",
                path_str(&key)?,
                "--cluster-name",
                plane.name(),
            ],
            &[],
        )?;
        Ok(Self {
            scheduler,
            controller_manager,
        })
    }
}

/// A lab host run by a real kubelet. Drop it before the lab: it kills every process of its
/// cgroups and removes them.
pub struct KubeletNode {
    name: String,
    dir: PathBuf,
    /// The cgroup of containerd and the kubelet, and the kubelet's `cgroupRoot`, in every
    /// v1 hierarchy (plus the unified one).
    cgroups: Vec<PathBuf>,
    /// `pids` hierarchy paths whose processes are the node's.
    tracked: Vec<PathBuf>,
    kubelet: Option<Proc>,
    _proxies: Vec<ApiProxy>,
}

impl KubeletNode {
    /// Starts containerd and a kubelet on `host` (a lab host whose `Node` object may already
    /// exist: the kubelet adopts it), registered to `plane` as `name` with the host's
    /// underlay address, after importing `images` (OCI archives; the pause image first).
    /// Pods on it reach `plane` and every plane of `remote` (the linked clusters' API
    /// servers, which their controllers read) at [`API_ADDRESS`] on each plane's port.
    ///
    /// # Errors
    /// When a directory, cgroup or process cannot be made, or containerd does not start.
    pub fn start(
        lab: &Lab,
        host: &Host,
        plane: &ControlPlane,
        bins: &NodeBinaries,
        images: &[&Path],
        remote: &[&ControlPlane],
    ) -> Result<Self> {
        let name = host.name().to_owned();
        let dir = lab.dir().join(format!("kubelet-{name}"));
        for sub in [
            "ctd/root",
            "ctd/state",
            "ctd/run",
            "cni/conf",
            "cni/data",
            "kl/root",
            "kl/pki",
            "sysctl",
            "hostpath/state",
            "hostpath/uapi",
            "netns",
        ] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}/{sub}", dir.display()))?;
        }
        let socket = dir.join("ctd/run/containerd.sock");

        // The API server, for the kubelet (127.0.0.1) and for pods (API_ADDRESS).
        host.ip(&["addr", "add", &format!("{API_ADDRESS}/32"), "dev", "lo"])?;
        let mut proxies = vec![
            ApiProxy::start(host, plane.api_port())?,
            ApiProxy::start_at(host, API_ADDRESS, plane.api_port())?,
        ];
        for other in remote {
            proxies.push(ApiProxy::start_at(host, API_ADDRESS, other.api_port())?);
        }

        let cgroup_name = format!("{}node-{name}", lab.prefix());
        let daemons_name = format!("{cgroup_name}-daemons");
        let mut cgroups = Vec::new();
        for hierarchy in cgroup_hierarchies()? {
            for n in [&cgroup_name, &daemons_name] {
                let path = hierarchy.join(n);
                fs::create_dir_all(&path)
                    .with_context(|| format!("creating cgroup {}", path.display()))?;
                if hierarchy.ends_with("cpuset") {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let parent = fs::read_to_string(hierarchy.join(file))?;
                        fs::write(path.join(file), parent.trim())
                            .with_context(|| format!("writing {}/{file}", path.display()))?;
                    }
                }
                cgroups.push(path);
            }
        }
        let pids = Path::new("/sys/fs/cgroup/pids");
        let tracked = vec![pids.join(&daemons_name), pids.join(&cgroup_name)];

        fs::write(
            dir.join("containerd.toml"),
            containerd_config(&dir, &socket)?,
        )?;
        fs::write(
            dir.join("cni/conf/10-lab.conflist"),
            cni_config(&host.pod_cidr(), &dir.join("cni/data"))?,
        )?;
        fs::write(
            dir.join("kubelet.yaml"),
            kubelet_config(&cgroup_name, &socket)?,
        )?;
        let mut imports = String::new();
        for image in [bins.pause_image.as_path()].iter().chain(images) {
            imports.push_str(&format!(
                "ctr --address {} -n k8s.io images import {} >/dev/null\n",
                path_str(&socket)?,
                path_str(image)?
            ));
        }
        let mut sysctls = String::new();
        for (key, value) in KERNEL_FLAGS {
            let file = dir.join("sysctl").join(key.replace('/', "_"));
            fs::write(&file, value)?;
            sysctls.push_str(&format!(
                "mount --bind -o ro {} /proc/sys/{key}\n",
                path_str(&file)?
            ));
        }
        let kubeconfig = node_kubeconfig(plane, &name, &dir)?;
        let d = path_str(&dir)?;
        let script = format!(
            "set -eu\n\
             echo $$ > {pids}/cgroup.procs\n\
             {sysctls}\
             mkdir -p /var/lib/wiremesh /var/run/wireguard\n\
             mount --bind {d}/hostpath/state /var/lib/wiremesh\n\
             mount --bind {d}/hostpath/uapi /var/run/wireguard\n\
             mount --bind {d}/netns /run/netns\n\
             containerd --config {d}/containerd.toml > {d}/containerd.log 2>&1 &\n\
             i=0; while [ ! -S {sock} ]; do i=$((i+1)); [ $i -lt {tries} ] || exit 3; sleep 0.1; done\n\
             {imports}\
             exec {kubelet} --config {d}/kubelet.yaml --kubeconfig {kubeconfig} \
             --root-dir {d}/kl/root --cert-dir {d}/kl/pki --hostname-override {name} \
             --node-ip {ip} --v=1\n",
            pids = path_str(&tracked[0])?,
            sock = path_str(&socket)?,
            tries = CONTAINERD_START.as_millis() / 100,
            kubelet = path_str(&bins.kubelet)?,
            kubeconfig = path_str(&kubeconfig)?,
            ip = host.underlay_ip(),
        );
        fs::write(dir.join("node.sh"), script)?;
        let ns: &Netns = host;
        let netns = format!("--net=/run/netns/{}", ns.name());
        let mut node = Self {
            name,
            dir: dir.clone(),
            cgroups,
            tracked,
            kubelet: None,
            _proxies: proxies,
        };
        node.kubelet = Some(lab.spawn_root(
            &[
                "nsenter",
                &netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                path_str(&dir.join("node.sh"))?,
            ],
            &[],
        )?);
        Ok(node)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last `lines` of containerd's log and the kubelet's, for a failing test.
    pub fn logs(&self, lines: usize) -> String {
        let tail = |text: &str| {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let containerd = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let kubelet = self.kubelet.as_ref().map(Proc::stderr).unwrap_or_default();
        format!(
            "---- containerd {} ----\n{}\n---- kubelet {} ----\n{}\n",
            self.name,
            tail(&containerd),
            self.name,
            tail(&kubelet)
        )
    }

    /// Every PID in the node's cgroups.
    fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for root in &self.tracked {
            collect_pids(root, &mut pids);
        }
        pids
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        // The kubelet first (it would restart containers), then everything left.
        drop(self.kubelet.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                if !pids.is_empty() {
                    eprintln!("kubelet node {}: PIDs left: {pids:?}", self.name);
                }
                break;
            }
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", &pid.to_string()])
                    .output();
            }
            thread::sleep(Duration::from_millis(100));
        }
        // Deepest first: a cgroup with children cannot be removed.
        let mut all = Vec::new();
        for cgroup in &self.cgroups {
            collect_dirs(cgroup, &mut all);
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in all {
            let _ = fs::remove_dir(&dir);
        }
    }
}

/// A kubeconfig for the kubelet of node `name`: the plane's admin kubeconfig with a client
/// certificate of `system:node:<name>` in `system:nodes` instead, signed by the plane's CA,
/// so that the Node authorizer and NodeRestriction admission treat it as the kubelet it is
/// (it may read only its own pods' secrets and request only their tokens).
fn node_kubeconfig(plane: &ControlPlane, name: &str, dir: &Path) -> Result<PathBuf> {
    let pki = plane.dir().join("pki");
    let (key, csr, crt, ext) = (
        dir.join("kl/node.key"),
        dir.join("kl/node.csr"),
        dir.join("kl/node.crt"),
        dir.join("kl/node.ext"),
    );
    fs::write(
        &ext,
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         basicConstraints=critical,CA:FALSE\n",
    )?;
    let subject = format!("/O=system:nodes/CN=system:node:{name}");
    let (ca_crt, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
    let steps: [Vec<&str>; 3] = [
        vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            path_str(&key)?,
        ],
        vec![
            "req",
            "-new",
            "-key",
            path_str(&key)?,
            "-subj",
            &subject,
            "-out",
            path_str(&csr)?,
        ],
        vec![
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&ca_crt)?,
            "-CAkey",
            path_str(&ca_key)?,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path_str(&ext)?,
            "-out",
            path_str(&crt)?,
        ],
    ];
    for args in steps {
        let mut command = Command::new("openssl");
        command.args(&args);
        let out = run_with_timeout(command, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let b64 = |path: &Path| -> Result<String> {
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(fs::read(path)?))
    };
    let admin = fs::read_to_string(plane.kubeconfig())?;
    let mut text = String::new();
    for line in admin.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed.starts_with("client-certificate-data:") {
            text.push_str(&format!(
                "{indent}client-certificate-data: {}\n",
                b64(&crt)?
            ));
        } else if trimmed.starts_with("client-key-data:") {
            text.push_str(&format!("{indent}client-key-data: {}\n", b64(&key)?));
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    ensure!(
        text.contains(&b64(&crt)?),
        "{} holds no client-certificate-data to replace",
        plane.kubeconfig().display()
    );
    let path = dir.join("kl/kubeconfig");
    fs::write(&path, text)?;
    Ok(path)
}

/// Every mounted cgroup hierarchy (`/sys/fs/cgroup/<controllers>` for v1, and the unified
/// one).
fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let hierarchies: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup" || kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect();
    ensure!(
        hierarchies.iter().any(|h| h.ends_with("pids")),
        "no cgroup v1 pids hierarchy is mounted (the lab's kubelet needs cgroup v1 here)"
    );
    Ok(hierarchies)
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

fn collect_dirs(dir: &Path, all: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    all.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), all);
            }
        }
    }
}

fn containerd_config(dir: &Path, socket: &Path) -> Result<String> {
    let d = path_str(dir)?;
    Ok(format!(
        r#"version = 2
root = "{d}/ctd/root"
state = "{d}/ctd/state"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/conf"
"#,
        socket = path_str(socket)?,
    ))
}

fn cni_config(pod_cidr: &str, data_dir: &Path) -> Result<String> {
    let network: Ipv4Addr = pod_cidr
        .split_once('/')
        .and_then(|(ip, _)| ip.parse().ok())
        .with_context(|| format!("pod CIDR {pod_cidr}"))?;
    let first = u32::from(network);
    let start = Ipv4Addr::from(first + 100);
    let gateway = Ipv4Addr::from(first + 1);
    Ok(serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "plugins": [{
            "type": "bridge",
            "bridge": "pods0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": path_str(data_dir)?,
                "ranges": [[{ "subnet": pod_cidr, "rangeStart": start.to_string(),
                              "gateway": gateway.to_string() }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        }],
    })
    .to_string())
}

fn kubelet_config(cgroup_root: &str, socket: &Path) -> Result<String> {
    Ok(format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
failCgroupV1: false
failSwapOn: false
protectKernelDefaults: true
containerRuntimeEndpoint: unix://{socket}
address: 127.0.0.1
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
authorization:
  mode: Webhook
resolvConf: ""
localStorageCapacityIsolation: false
# The machine's disk is shared with other builds: no eviction, no image GC.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
        socket = path_str(socket)?,
    ))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}
