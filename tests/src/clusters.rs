//! The two-cluster lab: `cluster-a` and `cluster-b`, each a real control plane (etcd +
//! kube-apiserver on loopback) with lab hosts as its nodes, a pod behind each node, a
//! Wiremesh agent per node in Kubernetes mode and a controller per cluster.
//!
//! Wiremesh goes in as in a real cluster: `meshctl install` applies `deploy/wiremesh.yaml`;
//! each agent runs with the command, args and environment of the DaemonSet's container
//! (`spec.nodeName` from the downward API, the key directory's hostPath mapped to the
//! host's state directory) and the token the kubelet would mount into its pod (bound to a
//! Pod object on its node, so the admission policy applies); each controller replica runs
//! in a pod of its own with the Deployment's command, args and environment and its own
//! ServiceAccount's pod-bound token. The lab adds only what a cluster would give: the
//! kubeconfig in place of the in-cluster configuration, and the pod gateway address a CNI
//! would own (`WIREMESH_ADDRESSES`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use kube::{Api, Client};
use wiremesh_proto::crd::{MeshPeer, PeerCluster};

use crate::deploy::{self, Workload};
use crate::k8s::{self, ApiProxy, ControlPlane, block_on};
use crate::lab::Proc;
use crate::lab::{Host, Lab, NatMapping, Pod, Underlay, find_binary};
use crate::mesh::IFACE;

/// Which of the two clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `cluster-a`: nodes 198.18.1.N, pods 10.1.N.0/24 of 10.1.0.0/16.
    A,
    /// `cluster-b`: nodes 198.18.2.N, pods 10.2.N.0/24 of 10.2.0.0/16.
    B,
    /// `cluster-c`, only in a lab from [`TwoClusters::three`]: nodes 198.18.3.N, pods
    /// 10.3.N.0/24 of 10.3.0.0/16.
    C,
}

impl Side {
    /// The cluster (and kubeconfig context) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::A => "cluster-a",
            Self::B => "cluster-b",
            Self::C => "cluster-c",
        }
    }

    fn octet(self) -> u8 {
        match self {
            Self::A => 1,
            Self::B => 2,
            Self::C => 3,
        }
    }

    /// The cluster's whole pod range.
    pub fn pod_range(self) -> String {
        format!("10.{}.0.0/16", self.octet())
    }

    /// The cluster's whole IPv6 pod range in a dual-stack lab: fd10:N::/48.
    pub fn pod_range6(self) -> String {
        format!("fd10:{}::/48", self.octet())
    }

    /// Where the cluster's bare hosts take their addresses: 10.250.0.0/16 for cluster-a,
    /// 10.251.0.0/16 for cluster-b (`meshctl join` refuses overlapping host ranges).
    pub fn host_range(self) -> String {
        format!("10.{}.0.0/16", self.host_octet())
    }

    fn host_octet(self) -> u8 {
        249 + self.octet()
    }
}

/// The address families of a lab: of the pods, and of the underlay the nodes reach each
/// other on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 pods on the IPv4 underlay.
    #[default]
    V4,
    /// Dual-stack pods (10.S.N.0/24 and fd10:S:0:N::/64) on the IPv4 underlay.
    DualStack,
    /// Dual-stack pods on an IPv6-only underlay ([`UNDERLAY6`]): the Nodes' only
    /// addresses are IPv6, and so are the endpoints.
    DualStackV6Underlay,
    /// Dual-stack pods on a small IPv4 underlay ([`SMALL_UNDERLAY`], node N of cluster S
    /// at 198.19.5.(10S+N), a default route on it), and agents given only their IPv4 pod
    /// gateway: each derives its MTU from the default route, below the IPv6 minimum, with
    /// no sign of IPv6 until the other cluster's peers arrive.
    DualStackSmallUnderlay,
}

impl Stack {
    fn dual(self) -> bool {
        self != Self::V4
    }
}

/// The IPv6-only underlay of [`Stack::DualStackV6Underlay`]; node N of cluster S is
/// fd18:9::S:N.
pub const UNDERLAY6: &str = "fd18:9::/64";
/// The IPv4 underlay of [`Stack::DualStackSmallUnderlay`].
pub const SMALL_UNDERLAY: &str = "198.19.5.0/24";
/// The default route of [`Stack::DualStackSmallUnderlay`]'s nodes (nothing answers there).
const SMALL_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 254);
/// The default route of [`TwoClusters::with_same_pod_range`]'s nodes on the default
/// underlay (nothing answers there).
const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 254);

/// A Kubernetes node of the lab: a host with a pod, a Node object, an agent.
pub struct ClusterNode {
    /// `a1`, `b2`, ...
    pub name: String,
    /// Its cluster.
    pub side: Side,
    /// The lab host.
    pub host: Host,
    /// The pod behind it.
    pub pod: Pod,
    /// The agent, when running.
    pub agent: Option<Proc>,
    /// The agent's kubeconfig: its pod-bound ServiceAccount token.
    kubeconfig: PathBuf,
    _proxy: ApiProxy,
}

impl ClusterNode {
    /// `wg args...` against this node's agent.
    ///
    /// # Errors
    /// When `wg` fails.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        self.host.wg(args)
    }

    /// Wiremesh's routes (protocol 0x57) on this node.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn routes(&self) -> Result<String> {
        self.host.ip(&["route", "show", "proto", "0x57"])
    }

    /// The fail-closed routes on this node (`unreachable ... proto 0x58`), IPv4 then IPv6.
    pub fn fail_closed_routes(&self) -> Result<String> {
        Ok(self.host.ip(&["route", "show", "proto", "0x58"])?
            + &self.host.ip(&["-6", "route", "show", "proto", "0x58"])?)
    }

    /// The pod CIDR of this node.
    pub fn pod_cidr(&self) -> String {
        self.host.pod_cidr()
    }

    /// The IPv6 pod CIDR of this node, in a dual-stack lab.
    pub fn pod_cidr6(&self) -> Option<String> {
        self.host.pod_cidr6()
    }
}

/// A controller replica: its pod (a namespace behind a node, with proxies to both API
/// servers) and its process.
pub struct Controller {
    /// The pod (and Kubernetes Pod object) name, also its Lease identity.
    pub name: String,
    /// Its process.
    pub process: Proc,
    /// Its pod.
    pub pod: Pod,
    _proxies: Vec<ApiProxy>,
}

impl Controller {
    /// The PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        let _ = self.process.signal("KILL");
    }
}

/// A machine outside Kubernetes: a lab host on the underlay with no `Node` object, whose
/// address in the mesh is its pod bridge's gateway (10.250.N.1), and an API proxy to its
/// cluster (as a real host would reach the API server over the network).
pub struct BareHost {
    /// `db1`, ...
    pub name: String,
    /// The cluster it is registered in.
    pub side: Side,
    /// The lab host.
    pub host: Host,
    /// `wiremesh-agent host`, when running.
    pub agent: Option<Proc>,
    _proxy: ApiProxy,
}

impl BareHost {
    /// Its address in the mesh.
    pub fn address(&self) -> Ipv4Addr {
        self.host.pod_gateway()
    }

    /// `<address>/32`, as `meshctl host add --address` takes it.
    pub fn address_cidr(&self) -> String {
        format!("{}/32", self.address())
    }

    /// Its WireGuard endpoint on the underlay (port 51820).
    pub fn endpoint(&self) -> String {
        format!("{}:51820", self.host.underlay_ip())
    }

    /// Runs `wiremesh-agent host --bundle <bundle>` in the host to completion (bounded):
    /// for bundles that must be refused.
    ///
    /// # Errors
    /// When it cannot be run.
    pub fn run_agent_once(&self, bundle: &Path) -> Result<Output> {
        let agent = crate::lab::agent_binary()?;
        let state = self.host.state_dir().to_path_buf();
        self.host.exec_private_mounts(&[
            path_str(&agent)?,
            "host",
            "--bundle",
            path_str(bundle)?,
            "--state-dir",
            path_str(&state)?,
        ])
    }

    /// Starts `wiremesh-agent host --bundle <bundle>` and waits for its UAPI socket.
    ///
    /// # Errors
    /// When it does not come up within 20 s.
    pub fn start_agent(&mut self, bundle: &Path) -> Result<()> {
        let state = self.host.state_dir().to_path_buf();
        let agent = self.host.spawn_agent(
            &[
                "host",
                "--bundle",
                path_str(bundle)?,
                "--state-dir",
                path_str(&state)?,
                "--metrics-addr",
                crate::mesh::METRICS,
            ],
            &[],
        )?;
        self.host
            .wait_for_uapi_socket(IFACE, &agent, Duration::from_secs(20))
            .with_context(|| format!("the host agent on {} did not come up", self.name))?;
        self.agent = Some(agent);
        Ok(())
    }
}

/// One cluster of the lab.
pub struct Cluster {
    /// Which one.
    pub side: Side,
    /// Its nodes, in order of creation.
    pub nodes: Vec<ClusterNode>,
    /// Its controller replicas.
    pub controllers: Vec<Controller>,
    /// Its control plane (dropped after the agents and controllers that watch it).
    pub plane: ControlPlane,
}

impl Cluster {
    /// An admin client.
    ///
    /// # Errors
    /// When the kubeconfig cannot be loaded.
    pub fn client(&self) -> Result<Client> {
        self.plane.client()
    }

    /// The node called `name`.
    ///
    /// # Errors
    /// When there is none.
    pub fn node(&self, name: &str) -> Result<&ClusterNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name} in {}", self.side.name()))
    }

    /// The PeerCluster for the other side, if any.
    ///
    /// # Errors
    /// When the API server fails.
    pub fn peer_cluster(&self, name: &str) -> Result<Option<PeerCluster>> {
        let api: Api<PeerCluster> = Api::all(self.client()?);
        Ok(block_on(api.get_opt(name))?)
    }

    /// The status of condition `type_` of PeerCluster `name`: (status, message).
    ///
    /// # Errors
    /// When the API server fails or there is no such condition yet.
    pub fn condition(&self, name: &str, type_: &str) -> Result<(String, String)> {
        let pc = self
            .peer_cluster(name)?
            .ok_or_else(|| anyhow!("no PeerCluster {name}"))?;
        pc.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .map(|c| (c.status.clone(), c.message.clone()))
            .ok_or_else(|| {
                anyhow!(
                    "PeerCluster {name} has no {type_} condition: {:?}",
                    pc.status
                )
            })
    }

    /// The MeshPeers in this cluster.
    ///
    /// # Errors
    /// When the API server fails.
    pub fn mesh_peers(&self) -> Result<Vec<MeshPeer>> {
        let api: Api<MeshPeer> = Api::all(self.client()?);
        Ok(block_on(api.list(&Default::default()))?.items)
    }

    /// This cluster's MeshPeer for the remote node `node`.
    ///
    /// # Errors
    /// As [`Cluster::mesh_peers`], or when there is none for `node`.
    pub fn mesh_peer(&self, node: &str) -> Result<MeshPeer> {
        self.mesh_peers()?
            .into_iter()
            .find(|p| p.spec.node == node)
            .with_context(|| format!("no MeshPeer for {node}"))
    }
}

/// Both clusters on one underlay, Wiremesh installed, agents and a controller running,
/// not joined yet.
pub struct TwoClusters {
    /// Cluster A.
    pub a: Cluster,
    /// Cluster B.
    pub b: Cluster,
    /// One kubeconfig with contexts `cluster-a` (current) and `cluster-b`.
    pub kubeconfig: PathBuf,
    /// When cluster-b is behind NAT: its private underlay and the NAT gateway.
    pub nat: Option<(Underlay, Host)>,
    /// When cluster-a is behind NAT too: its private underlay and NAT gateway.
    pub nat_a: Option<(Underlay, Host)>,
    /// Cluster C, in a lab from [`TwoClusters::three`].
    pub c: Option<Cluster>,
    /// Every Node gets an unreachable `ExternalIP` (198.18.1xx.N, where nothing answers)
    /// before its `InternalIP`, so its most preferred endpoint is dead.
    dead_external_ips: bool,
    /// The pods' and the underlay's address families.
    pub stack: Stack,
    /// The IPv6-only underlay, for [`Stack::DualStackV6Underlay`], or the small IPv4 one,
    /// for [`Stack::DualStackSmallUnderlay`].
    pub underlay6: Option<Underlay>,
    /// Both clusters use the same pod range, 10.244.0.0/16 (node N: 10.244.N.0/24), as
    /// clusters of one distribution do by default ([`TwoClusters::with_same_pod_range`]).
    pub same_pods: bool,
    /// The lab (dropped last: its namespaces outlive the processes in them).
    pub lab: Lab,
}

/// How [`TwoClusters`] lays out its lab beyond the defaults: both clusters on the default
/// underlay, no NAT, IPv4 only.
#[derive(Default)]
struct BuildOptions {
    /// cluster-a's private underlay and NAT gateway, when it is behind NAT.
    nat_a: Option<(Underlay, Host)>,
    /// cluster-b's private underlay and NAT gateway, when it is behind NAT.
    nat_b: Option<(Underlay, Host)>,
    /// See [`TwoClusters`]'s field of that name.
    dead_external_ips: bool,
    /// The pods' and the underlay's address families.
    stack: Stack,
    /// The nodes' own underlay, for [`Stack::DualStackV6Underlay`] and
    /// [`Stack::DualStackSmallUnderlay`].
    underlay6: Option<Underlay>,
    /// A third cluster, `cluster-c`.
    third: bool,
    /// See [`TwoClusters`]'s field of that name.
    same_pods: bool,
}

/// cluster-b's private underlay and the NAT gateway in front of it; a symmetric NAT picks
/// a fresh port per connection.
fn nat_b(lab: &Lab, symmetric: bool) -> Result<(Underlay, Host)> {
    let private = lab.underlay("natb", NAT_PRIVATE, 1500)?;
    let mapping = if symmetric {
        NatMapping::Symmetric
    } else {
        NatMapping::PortPreserving
    };
    let gateway = lab.add_nat_gateway(
        &private,
        "natgw",
        NAT_GATEWAY,
        NAT_PUBLIC,
        "10.254.0.0/30",
        mapping,
    )?;
    Ok((private, gateway))
}

/// What [`TwoClusters::cluster`] says when asked for cluster-c in a two-cluster lab.
const NO_CLUSTER_C: &str = "cluster-c exists only in a lab from TwoClusters::three";

/// cluster-b's private underlay when it is behind NAT.
const NAT_PRIVATE: &str = "198.19.2.0/24";
/// The NAT gateway: on the private underlay, and cluster-b's one public address.
const NAT_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 254);
/// The NAT gateway's address on the default underlay.
pub const NAT_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 254);
/// cluster-a's private underlay when it is behind NAT too.
const NAT_A_PRIVATE: &str = "198.19.1.0/24";
/// cluster-a's NAT gateway on its private underlay.
const NAT_A_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 254);
/// cluster-a's NAT gateway on the default underlay.
pub const NAT_A_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);

impl TwoClusters {
    /// Two control planes, `nodes` nodes each with an agent, a controller per cluster.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn new(nodes: usize) -> Result<Self> {
        Self::build(Lab::new()?, nodes, BuildOptions::default())
    }

    /// As [`TwoClusters::new`], with cluster-b's nodes on a private underlay
    /// (198.19.2.0/24) behind an nftables masquerade gateway that lets no connection in
    /// ([`Lab::add_nat_gateway`]): their Nodes' addresses, and so their published
    /// endpoints, are private; cluster-a reaches them only after they initiate.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn with_b_behind_nat(nodes: usize) -> Result<Self> {
        let lab = Lab::new()?;
        let options = BuildOptions {
            nat_b: Some(nat_b(&lab, false)?),
            ..BuildOptions::default()
        };
        Self::build(lab, nodes, options)
    }

    /// Both clusters behind NAT with no inbound connections, and no public node: cluster-a
    /// on 198.19.1.0/24 behind 198.18.1.254, cluster-b on 198.19.2.0/24 behind
    /// 198.18.2.254. With `b_symmetric`, cluster-b's NAT picks a random port per
    /// connection ([`NatMapping::Symmetric`]), so no hole can be punched.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn with_both_behind_nat(nodes: usize, b_symmetric: bool) -> Result<Self> {
        let lab = Lab::new()?;
        let private_a = lab.underlay("nata", NAT_A_PRIVATE, 1500)?;
        let gateway_a = lab.add_nat_gateway(
            &private_a,
            "natgwa",
            NAT_A_GATEWAY,
            NAT_A_PUBLIC,
            "10.254.1.0/30",
            NatMapping::PortPreserving,
        )?;
        let options = BuildOptions {
            nat_a: Some((private_a, gateway_a)),
            nat_b: Some(nat_b(&lab, b_symmetric)?),
            ..BuildOptions::default()
        };
        Self::build(lab, nodes, options)
    }

    /// As [`TwoClusters::new`], with an `ExternalIP` on every Node that nothing answers
    /// at (198.18.1xx.N): every node's most preferred endpoint is dead and only the
    /// next (its `InternalIP`) works.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn with_dead_external_ips(nodes: usize) -> Result<Self> {
        let options = BuildOptions {
            dead_external_ips: true,
            ..BuildOptions::default()
        };
        Self::build(Lab::new()?, nodes, options)
    }

    /// As [`TwoClusters::new`] with dual-stack pods: every Node has pod CIDRs
    /// 10.S.N.0/24 and fd10:S:0:N::/64, every pod an address of each, and each cluster is
    /// installed with both of its ranges (10.S.0.0/16 and fd10:S::/48). The nodes stay on
    /// the IPv4 underlay.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn dual_stack(nodes: usize) -> Result<Self> {
        let options = BuildOptions {
            stack: Stack::DualStack,
            ..BuildOptions::default()
        };
        Self::build(Lab::new()?, nodes, options)
    }

    /// As [`TwoClusters::dual_stack`], with every node on an IPv6-only underlay
    /// ([`UNDERLAY6`], node N of cluster S at fd18:9::S:N): the Nodes' only addresses are
    /// IPv6 `InternalIP`s, so every endpoint is `[fd18:9::S:N]:51820`.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn dual_stack_v6_underlay(nodes: usize) -> Result<Self> {
        let lab = Lab::new()?;
        let underlay6 = lab.underlay("v6ul", UNDERLAY6, 1500)?;
        let options = BuildOptions {
            stack: Stack::DualStackV6Underlay,
            underlay6: Some(underlay6),
            ..BuildOptions::default()
        };
        Self::build(lab, nodes, options)
    }

    /// As [`TwoClusters::dual_stack`] on an IPv4 underlay of `mtu` bytes; see
    /// [`Stack::DualStackSmallUnderlay`].
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn dual_stack_small_underlay(nodes: usize, mtu: u32) -> Result<Self> {
        let lab = Lab::new()?;
        let small = lab.underlay("small", SMALL_UNDERLAY, mtu)?;
        let options = BuildOptions {
            stack: Stack::DualStackSmallUnderlay,
            underlay6: Some(small),
            ..BuildOptions::default()
        };
        Self::build(lab, nodes, options)
    }

    /// As [`TwoClusters::dual_stack`] with both clusters on the same pod ranges,
    /// 10.244.0.0/16 and fd10:244::/48: node N of each has 10.244.N.0/24 and
    /// fd10:244:0:N::/64, its pod 10.244.N.2 and fd10:244:0:N::2.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn with_same_pod_range_dual_stack(nodes: usize) -> Result<Self> {
        let options = BuildOptions {
            same_pods: true,
            stack: Stack::DualStack,
            ..BuildOptions::default()
        };
        Self::build(Lab::new()?, nodes, options)
    }

    /// As [`TwoClusters::new`] with both clusters on pod range 10.244.0.0/16 (Flannel's
    /// default): node N of each has 10.244.N.0/24 and its pod 10.244.N.2. With `third`,
    /// also a cluster-c on a range of its own ([`Side::pod_range`]), not linked. The
    /// underlay's MTU is `underlay_mtu`; the nodes have a default route onto it (as a
    /// cloud VM has; nothing answers there), from which a starting agent derives its MTU.
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn with_same_pod_range(nodes: usize, third: bool, underlay_mtu: u32) -> Result<Self> {
        let options = BuildOptions {
            same_pods: true,
            third,
            ..BuildOptions::default()
        };
        Self::build(Lab::with_underlay_mtu(underlay_mtu)?, nodes, options)
    }

    /// The second octet of `side`'s pod range: its own ([`Side::pod_range`]), or 244 for
    /// cluster-a and cluster-b with [`TwoClusters::with_same_pod_range`].
    pub fn pod_octet(&self, side: Side) -> u8 {
        if self.same_pods && side != Side::C {
            244
        } else {
            side.octet()
        }
    }

    /// `side`'s whole pod range in this lab.
    pub fn pod_range(&self, side: Side) -> String {
        format!("10.{}.0.0/16", self.pod_octet(side))
    }

    /// `meshctl --context SIDE install ...` as the lab installs `side`: its name, pod
    /// CIDRs (IPv6 too in a dual-stack lab) and host CIDR. Installing again with them is
    /// what a user re-running install does.
    pub fn install_args(&self, side: Side) -> Vec<String> {
        let mut args = vec![
            "--context".to_owned(),
            side.name().to_owned(),
            "install".to_owned(),
            "--cluster-name".to_owned(),
            side.name().to_owned(),
            "--pod-cidr".to_owned(),
            self.pod_range(side),
            // Bare hosts take 10.25x.N.1 (see add_bare_host); join grants the range.
            "--host-cidr".to_owned(),
            side.host_range(),
        ];
        if self.stack.dual() {
            args.extend(["--pod-cidr".to_owned(), self.pod_range6(side)]);
        }
        args
    }

    /// `side`'s whole IPv6 pod range in a dual-stack lab: fd10:S::/48, or fd10:244::/48
    /// for cluster-a and cluster-b of [`TwoClusters::with_same_pod_range_dual_stack`].
    pub fn pod_range6(&self, side: Side) -> String {
        format!("fd10:{}::/48", self.pod_octet(side))
    }

    /// Both control planes, Wiremesh installed in each, `nodes` nodes per cluster on `lab`
    /// laid out as `options` says, and a controller per cluster.
    fn build(lab: Lab, nodes: usize, options: BuildOptions) -> Result<Self> {
        let BuildOptions {
            nat_a,
            nat_b,
            dead_external_ips,
            stack,
            underlay6,
            third,
            same_pods,
        } = options;
        let names: &[&str] = if third {
            &["cluster-a", "cluster-b", "cluster-c"]
        } else {
            &["cluster-a", "cluster-b"]
        };
        let mut planes = ControlPlane::start_all(names)?;
        let plane_c = if third { planes.pop() } else { None };
        let plane_b = planes.pop().context("plane b")?;
        let plane_a = planes.pop().context("plane a")?;
        let mut all = vec![&plane_a, &plane_b];
        all.extend(plane_c.as_ref());
        let kubeconfig = k8s::write_kubeconfig(&all, "cluster-a")?;
        let c = plane_c.map(|plane| Cluster {
            side: Side::C,
            plane,
            nodes: Vec::new(),
            controllers: Vec::new(),
        });
        let mut lab_clusters = Self {
            a: Cluster {
                side: Side::A,
                plane: plane_a,
                nodes: Vec::new(),
                controllers: Vec::new(),
            },
            b: Cluster {
                side: Side::B,
                plane: plane_b,
                nodes: Vec::new(),
                controllers: Vec::new(),
            },
            kubeconfig,
            nat: nat_b,
            nat_a,
            c,
            dead_external_ips,
            stack,
            underlay6,
            same_pods,
            lab,
        };
        let sides: &[Side] = if third {
            &[Side::A, Side::B, Side::C]
        } else {
            &[Side::A, Side::B]
        };
        for &side in sides {
            let args = lab_clusters.install_args(side);
            let out = lab_clusters.meshctl(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            ensure!(
                out.status.success(),
                "meshctl install failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for _ in 0..nodes {
                lab_clusters.add_node(side)?;
            }
            lab_clusters.start_controller(side)?;
        }
        Ok(lab_clusters)
    }

    /// Cluster `side`.
    ///
    /// # Panics
    /// For [`Side::C`] in a lab without it (a test that never built it).
    pub fn cluster(&self, side: Side) -> &Cluster {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
            Side::C => self.c.as_ref().expect(NO_CLUSTER_C),
        }
    }

    fn cluster_mut(&mut self, side: Side) -> &mut Cluster {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
            Side::C => self.c.as_mut().expect(NO_CLUSTER_C),
        }
    }

    /// Three clusters (`cluster-a`, `cluster-b`, `cluster-c`) as [`TwoClusters::new`] makes
    /// two; link them with [`TwoClusters::join_pair`].
    ///
    /// # Errors
    /// When any part fails to come up.
    pub fn three(nodes: usize) -> Result<Self> {
        let options = BuildOptions {
            third: true,
            ..BuildOptions::default()
        };
        Self::build(Lab::new()?, nodes, options)
    }

    /// `meshctl --context <x> join <y> --host-cidr <y's host range>`; fails with its output
    /// unless it succeeds.
    ///
    /// # Errors
    /// When meshctl fails.
    pub fn join_pair(&self, x: Side, y: Side) -> Result<String> {
        let hosts = y.host_range();
        let out = self.meshctl(&[
            "--context",
            x.name(),
            "join",
            y.name(),
            "--host-cidr",
            &hosts,
        ])?;
        ensure!(
            out.status.success(),
            "meshctl join {} {} failed:\n{}{}",
            x.name(),
            y.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds node N+1 to cluster `side`: lab host and pod, `Node` object, API proxy, agent.
    ///
    /// # Errors
    /// When any part fails.
    pub fn add_node(&mut self, side: Side) -> Result<&ClusterNode> {
        let index = u8::try_from(self.cluster(side).nodes.len() + 1).context("too many nodes")?;
        let name = format!("{}{index}", &side.name()[8..]);
        let pod_cidr = format!("10.{}.{index}.0/24", self.pod_octet(side));
        let pod_cidr6 = format!("fd10:{}:0:{index}::/64", self.pod_octet(side));
        // This side's private underlay and NAT gateway, when it is behind NAT.
        let behind_nat = match side {
            Side::A => self
                .nat_a
                .as_ref()
                .map(|(private, _)| (private, NAT_A_GATEWAY)),
            Side::B => self.nat.as_ref().map(|(private, _)| (private, NAT_GATEWAY)),
            Side::C => None,
        };
        let (host, underlay): (Host, IpAddr) = match behind_nat {
            _ if self.stack == Stack::DualStackV6Underlay => {
                let underlay6 = self.underlay6.as_ref().context("no IPv6 underlay")?;
                let ip = Ipv6Addr::new(
                    0xfd18,
                    9,
                    0,
                    0,
                    0,
                    0,
                    u16::from(side.octet()),
                    u16::from(index),
                );
                let host = self
                    .lab
                    .add_host_v6(underlay6, &name, ip, &pod_cidr, &pod_cidr6)?;
                (host, ip.into())
            }
            _ if self.stack == Stack::DualStackSmallUnderlay => {
                let small = self.underlay6.as_ref().context("no small underlay")?;
                let ip = Ipv4Addr::new(198, 19, 5, side.octet() * 10 + index);
                let host =
                    self.lab
                        .add_host_dual_stack(small, &name, ip.into(), &pod_cidr, &pod_cidr6)?;
                host.set_default_route(SMALL_GATEWAY)?;
                (host, ip.into())
            }
            _ if self.stack == Stack::DualStack => {
                let ip = Ipv4Addr::new(198, 18, side.octet(), index);
                let host = self.lab.add_host_dual_stack(
                    self.lab.default_underlay(),
                    &name,
                    ip.into(),
                    &pod_cidr,
                    &pod_cidr6,
                )?;
                (host, ip.into())
            }
            Some((private, gateway)) => {
                let ip = Ipv4Addr::new(198, 19, side.octet(), index);
                let host = self.lab.add_host_on(private, &name, ip, &pod_cidr)?;
                host.set_default_route(gateway)?;
                (host, ip.into())
            }
            _ => {
                let ip = Ipv4Addr::new(198, 18, side.octet(), index);
                let host = self.lab.add_host(&name, ip, &pod_cidr)?;
                if self.same_pods {
                    host.set_default_route(UNDERLAY_GATEWAY)?;
                }
                (host, ip.into())
            }
        };
        let pod = host.add_pod(&format!("{name}-p"))?;
        let cluster = self.cluster(side);
        if self.stack.dual() {
            k8s::create_node_with(
                &cluster.client()?,
                &name,
                &[&pod_cidr, &pod_cidr6],
                &[underlay],
            )?;
        } else {
            k8s::create_node(&cluster.client()?, &name, &pod_cidr, underlay)?;
        }
        if self.dead_external_ips {
            let dead = Ipv4Addr::new(198, 18, 100 + side.octet(), index);
            k8s::add_external_ip(&cluster.client()?, &name, dead)?;
        }
        let proxy = ApiProxy::start(&host, cluster.plane.api_port())?;
        let kubeconfig = deploy::pod_kubeconfig(
            &cluster.plane,
            &format!("wiremesh-agent-{name}"),
            Some(&name),
            "wiremesh-agent",
        )?;
        let mut node = ClusterNode {
            name,
            side,
            host,
            pod,
            agent: None,
            kubeconfig,
            _proxy: proxy,
        };
        node.agent = Some(self.start_agent(&node)?);
        let cluster = self.cluster_mut(side);
        cluster.nodes.push(node);
        cluster.nodes.last().context("just pushed")
    }

    /// Kills node `name` of cluster `side` the hard way: its agent gets SIGKILL, its API
    /// proxy stops, and its namespaces (the node's and its pod's) are deleted, veths and
    /// all. Its `Node` and `MeshNode` stay, as when a machine loses power.
    ///
    /// # Errors
    /// When there is no such node or a namespace cannot be deleted.
    pub fn kill_node(&mut self, side: Side, name: &str) -> Result<()> {
        let cluster = self.cluster_mut(side);
        let index = cluster
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name} in {}", side.name()))?;
        let node = cluster.nodes.remove(index);
        if let Some(agent) = &node.agent {
            agent.signal("KILL")?;
        }
        let (host, pod) = (node.host.clone(), node.pod.clone());
        drop(node);
        self.lab.delete_namespace(&pod)?;
        self.lab.delete_namespace(&host)?;
        Ok(())
    }

    /// Stops the agent of node `name` of cluster `side` with `signal` (`TERM`: a shutdown,
    /// as the kubelet does; `KILL`: a crash) and returns the moment its process had exited
    /// (polled every millisecond), with its log.
    ///
    /// # Errors
    /// When there is no such node or agent, or it does not exit within 10 s.
    pub fn stop_agent(
        &mut self,
        side: Side,
        name: &str,
        signal: &str,
    ) -> Result<(Instant, String)> {
        let node = self.node_mut(side, name)?;
        let agent = node
            .agent
            .take()
            .with_context(|| format!("no agent running on {name}"))?;
        agent.signal(signal)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.is_running() {
            ensure!(
                Instant::now() < deadline,
                "the agent on {name} still runs 10 s after SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let exited = Instant::now();
        Ok((exited, agent.stderr()))
    }

    /// Starts the agent of node `name` of cluster `side` again, as the DaemonSet's next pod
    /// would (same state directory), and waits for its UAPI socket.
    ///
    /// # Errors
    /// When there is no such node, an agent already runs there, or it does not come up.
    pub fn restart_agent(&mut self, side: Side, name: &str) -> Result<()> {
        let agent = {
            let node = self.cluster(side).node(name)?;
            ensure!(node.agent.is_none(), "an agent already runs on {name}");
            self.start_agent(node)?
        };
        self.node_mut(side, name)?.agent = Some(agent);
        Ok(())
    }

    fn node_mut(&mut self, side: Side, name: &str) -> Result<&mut ClusterNode> {
        self.cluster_mut(side)
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in {}", side.name()))
    }

    /// Adds bare host number `index` (1..=250) for cluster `side`: lab host `name` at
    /// 198.18.9.`index` on the underlay with address 10.250.`index`.1 in cluster-a,
    /// 10.251.`index`.1 in cluster-b ([`Side::host_range`]; its pod bridge's
    /// gateway) and an API proxy to `side`'s API server; no `Node`, no agent, not
    /// registered in the mesh (that is `meshctl host add`'s job).
    ///
    /// # Errors
    /// When any part fails.
    pub fn add_bare_host(&self, side: Side, name: &str, index: u8) -> Result<BareHost> {
        ensure!(
            (1..=250).contains(&index),
            "bare host index {index} out of 1..=250"
        );
        let host = self.lab.add_host(
            name,
            Ipv4Addr::new(198, 18, 9, index),
            &format!("10.{}.{index}.0/30", side.host_octet()),
        )?;
        let proxy = ApiProxy::start(&host, self.cluster(side).plane.api_port())?;
        Ok(BareHost {
            name: name.to_owned(),
            side,
            host,
            agent: None,
            _proxy: proxy,
        })
    }

    /// Starts the agent of `node` as the DaemonSet would.
    fn start_agent(&self, node: &ClusterNode) -> Result<Proc> {
        let workload = Workload::from_manifest("DaemonSet", "wiremesh-agent")?;
        ensure!(
            workload.program()? == "wiremesh-agent",
            "the DaemonSet runs {:?}",
            workload.command
        );
        let fields = BTreeMap::from([("spec.nodeName", node.name.clone())]);
        let state_dir = node.host.state_dir().to_path_buf();
        let mut env = workload.resolve_env(&fields, |mount| {
            (mount == "/var/lib/wiremesh").then(|| state_dir.clone())
        })?;
        env.push((
            "WIREMESH_KUBECONFIG".to_owned(),
            path_str(&node.kubeconfig)?.to_owned(),
        ));
        let mut addresses = format!("{}/32", node.host.pod_gateway());
        if let Some(gateway6) = node.host.pod_gateway6()
            && self.stack != Stack::DualStackSmallUnderlay
        {
            addresses.push_str(&format!(",{gateway6}/128"));
        }
        env.push(("WIREMESH_ADDRESSES".to_owned(), addresses));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = workload.args.iter().map(String::as_str).collect();
        let agent = node.host.spawn_agent(&args, &env)?;
        node.host
            .wait_for_uapi_socket(IFACE, &agent, Duration::from_secs(10))
            .with_context(|| format!("the agent on {} did not come up", node.name))?;
        Ok(agent)
    }

    /// Starts one more controller replica for cluster `side` as the Deployment would: in
    /// a pod of its own behind one of the cluster's nodes (replicas take the nodes in
    /// turn), reaching both API servers through proxies in that pod.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn start_controller(&mut self, side: Side) -> Result<()> {
        let workload = Workload::from_manifest("Deployment", "wiremesh-controller")?;
        let binary = find_binary(
            workload.program()?,
            "WIREMESH_CONTROLLER_BIN",
            "cargo build -p wiremesh-controller --bin wiremesh-controller",
        )?;
        let cluster = self.cluster(side);
        let replica = cluster.controllers.len();
        let name = format!("wiremesh-controller-{replica}");
        let node = cluster
            .nodes
            .get(replica % cluster.nodes.len().max(1))
            .ok_or_else(|| anyhow!("{} has no node for a controller", side.name()))?;
        let pod = node.host.add_pod(&format!("ctl{replica}"))?;
        let mut proxies = vec![
            ApiProxy::start(&pod, self.a.plane.api_port())?,
            ApiProxy::start(&pod, self.b.plane.api_port())?,
        ];
        if let Some(c) = &self.c {
            proxies.push(ApiProxy::start(&pod, c.plane.api_port())?);
        }
        let kubeconfig = deploy::pod_kubeconfig(
            &cluster.plane,
            &name,
            Some(&node.name),
            "wiremesh-controller",
        )?;
        let fields = BTreeMap::from([("metadata.name", name.clone())]);
        let mut env = workload.resolve_env(&fields, |_| None)?;
        env.push((
            "WIREMESH_KUBECONFIG".to_owned(),
            path_str(&kubeconfig)?.to_owned(),
        ));
        let mut command = vec![path_str(&binary)?];
        command.extend(workload.args.iter().map(String::as_str));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let process = pod.spawn_with_env(&command, &env)?;
        self.cluster_mut(side).controllers.push(Controller {
            name,
            process,
            pod,
            _proxies: proxies,
        });
        Ok(())
    }

    /// What `meshctl status --resolve QUERY` says, from `side`, a remote pod's address
    /// (`cluster-b/10.244.1.7`) is in the mesh: its mesh address when its cluster is
    /// translated, else itself.
    ///
    /// # Errors
    /// When meshctl fails or prints no address.
    pub fn resolve_mesh(&self, side: Side, query: &str) -> Result<IpAddr> {
        let out = self.meshctl(&["--context", side.name(), "status", "--resolve", query])?;
        let text = crate::output_text(&out);
        ensure!(
            out.status.success(),
            "meshctl status --resolve {query}:\n{text}"
        );
        text.split_once("→ ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in {text:?}"))
    }

    /// Runs `meshctl args...` with this lab's kubeconfig.
    ///
    /// # Errors
    /// When it cannot run.
    pub fn meshctl(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["--kubeconfig", path_str(&self.kubeconfig)?];
        full.extend_from_slice(args);
        k8s::meshctl(&full, &[])
    }

    /// `meshctl join cluster-b --context cluster-a --host-cidr <cluster-b's host range>`
    /// (cluster-a's hosts are granted its own range); fails with its output unless it
    /// succeeds.
    ///
    /// # Errors
    /// When meshctl fails.
    pub fn join(&self) -> Result<String> {
        let b_hosts = Side::B.host_range();
        let out = self.meshctl(&[
            "--context",
            "cluster-a",
            "join",
            "cluster-b",
            "--host-cidr",
            &b_hosts,
        ])?;
        ensure!(
            out.status.success(),
            "meshctl join failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every node of both clusters.
    pub fn all_nodes(&self) -> impl Iterator<Item = &ClusterNode> {
        self.a
            .nodes
            .iter()
            .chain(self.b.nodes.iter())
            .chain(self.c.iter().flat_map(|c| c.nodes.iter()))
    }
}

/// Waits until `check` succeeds, up to `timeout`; returns how long it took.
///
/// # Errors
/// The last error of `check` when time runs out.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() > timeout => {
                bail!("not within {timeout:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The interface the agents use.
pub const INTERFACE: &str = IFACE;

/// How long mirroring may take in the lab: watch, plan, apply, agent watch, handshake.
pub const CONVERGE: Duration = Duration::from_secs(45);

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}
