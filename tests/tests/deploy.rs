//! `deploy/`: the Helm chart lints and renders exactly `deploy/wiremesh.yaml`; that file
//! and a non-default rendering are accepted by a real API server with server-side apply
//! (the CRDs applied for real first); the RBAC and admission policy are least privilege,
//! checked with the agent's own pod-bound token; `helm install` works on a lab cluster.
//!
//! `meshctl install` of these manifests followed by `meshctl join` and pod-to-pod traffic,
//! with agents and controllers started from the DaemonSet's and Deployment's own command,
//! args and env, is what every `twocluster` test does ([`wiremesh_lab::clusters`]).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt as _};
use wiremesh_controller::manifest;
use wiremesh_lab::deploy::{self, Workload, helm};
use wiremesh_lab::fixtures::{self, MeshNodeBuilder};
use wiremesh_lab::k8s::{ControlPlane, block_on, block_on_timeout, client_for, create_node};
use wiremesh_proto::crd::{MeshNode, MeshNodeKind, MeshPeer, PeerCluster, PeerClusterSpec};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/wiremesh");
const HELM_TIMEOUT: Duration = Duration::from_secs(120);

/// `helm template` of the chart with `values` (`--set` strings), including the CRDs.
fn render(values: &[&str]) -> Result<String> {
    let mut args = vec![
        "template",
        "wiremesh",
        CHART,
        "--namespace",
        "wiremesh-system",
        "--include-crds",
    ];
    for v in values {
        args.extend(["--set", v]);
    }
    helm(&args, HELM_TIMEOUT)
}

fn json(objects: &[DynamicObject]) -> Result<Vec<serde_json::Value>> {
    Ok(objects
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?)
}

#[test]
fn helm_lint_passes_and_template_renders_deploy_wiremesh_yaml() -> Result<()> {
    let lint = helm(&["lint", "--strict", CHART], HELM_TIMEOUT)?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let rendered = manifest::parse(&render(&[])?)?;
    let file = deploy::objects()?;
    ensure!(
        json(&rendered)? == json(&file)?,
        "deploy/wiremesh.yaml is not `helm template` of the chart with default values: run `make manifests`"
    );
    // And meshctl carries the same file.
    assert_eq!(json(&manifest::parse(manifest::MANIFEST)?)?, json(&file)?);

    // Values reach the objects: the agent's port and MTU, metrics off, the cluster ConfigMap.
    let custom = manifest::parse(&render(&[
        "clusterName=lab",
        "podCIDRs={10.9.0.0/16,fd00:9::/48}",
        "agent.listenPort=51999",
        "agent.mtu=1380",
        "metrics.enabled=false",
        "image.tag=dev",
    ])?)?;
    let kinds: Vec<&str> = custom.iter().map(manifest::kind).collect();
    assert!(!kinds.contains(&"Service"), "{kinds:?}");
    let configmap = custom
        .iter()
        .find(|o| manifest::kind(o) == "ConfigMap")
        .ok_or_else(|| anyhow!("no cluster ConfigMap with clusterName set"))?;
    assert_eq!(
        configmap.data["data"]["podCIDRs"],
        "10.9.0.0/16,fd00:9::/48"
    );
    let daemonset = custom
        .iter()
        .find(|o| manifest::kind(o) == "DaemonSet")
        .ok_or_else(|| anyhow!("no DaemonSet"))?;
    let env = &daemonset.data["spec"]["template"]["spec"]["containers"][0]["env"];
    let value = |name: &str| {
        env.as_array()
            .and_then(|vars| vars.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(value("WIREMESH_LISTEN_PORT"), Some("51999".into()));
    assert_eq!(value("WIREMESH_MTU"), Some("1380".into()));
    assert_eq!(
        daemonset.data["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/wiremesh/wiremesh:dev"
    );

    // A cluster name without pod CIDRs is refused with the field named.
    let err = render(&["clusterName=lab"]).unwrap_err();
    assert!(format!("{err:#}").contains("podCIDRs"), "{err:#}");

    // The workloads this harness runs from the manifest look as a node expects.
    let agent = Workload::from_manifest("DaemonSet", "wiremesh-agent")?;
    assert_eq!(agent.program()?, "wiremesh-agent");
    assert_eq!(agent.args, ["kube"]);
    let controller = Workload::from_manifest("Deployment", "wiremesh-controller")?;
    assert_eq!(controller.program()?, "wiremesh-controller");
    Ok(())
}

/// Applies `objects` with server-side apply: CRDs first, waited for until Established,
/// then the rest in order.
fn apply_all(client: &Client, objects: &[DynamicObject], manager: &str) -> Result<()> {
    let (crds, rest): (Vec<_>, Vec<_>) = objects
        .iter()
        .cloned()
        .partition(|o| manifest::kind(o) == "CustomResourceDefinition");
    block_on(manifest::apply(client, &crds, manager))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in &crds {
        let name = crd.name_any();
        block_on_timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .with_context(|| format!("CRD {name} not Established"))??;
    }
    block_on(manifest::apply(client, &rest, manager))?;
    Ok(())
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> String {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => status.message,
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

fn mesh_node(name: &str) -> MeshNodeBuilder {
    own(name).pod_cidr("10.1.1.0/24")
}

/// A MeshNode as an agent writes it: key and endpoint only (the controller sets the pod
/// CIDRs and the gateway flag from the Node).
fn own(name: &str) -> MeshNodeBuilder {
    fixtures::mesh_node(name)
        .key("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=")
        .endpoint("198.18.1.1:51820")
}

#[test]
fn manifests_apply_for_real_and_rbac_is_least_privilege() -> Result<()> {
    let planes = ControlPlane::start_all(&["cluster-a", "cluster-b"])?;
    let (a, b) = (&planes[0], &planes[1]);
    let admin = a.client()?;

    // deploy/wiremesh.yaml as it is, then a rendering with other values over it.
    apply_all(&admin, &deploy::objects()?, "deploy-test")?;
    apply_all(
        &admin,
        &manifest::parse(&render(&[
            "clusterName=cluster-a",
            "podCIDRs={10.1.0.0/16}",
            "metrics.enabled=false",
            "agent.endpoints={198.18.1.1:51820}",
            "agent.tolerations[0].key=example.com/special",
            "agent.tolerations[0].operator=Exists",
        ])?)?,
        "deploy-test",
    )?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), "wiremesh-system");
    let ds = block_on(daemonsets.get("wiremesh-agent"))?;
    let caps = ds
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.security_context)
        .and_then(|s| s.capabilities)
        .context("the agent's capabilities")?;
    assert_eq!(caps.add, Some(vec!["NET_ADMIN".to_owned()]));
    let info = block_on(wiremesh_controller::install::cluster_info(&admin))?;
    assert_eq!(info.name, "cluster-a");

    // Two nodes; the agent of n1 gets the token the kubelet would give its pod.
    for (name, ip) in [("n1", 1), ("n2", 2)] {
        create_node(
            &admin,
            name,
            &format!("10.1.{ip}.0/24"),
            Ipv4Addr::new(198, 18, 1, ip),
        )?;
    }
    let kubeconfig = deploy::pod_kubeconfig(a, "wiremesh-agent-n1", Some("n1"), "wiremesh-agent")?;
    let agent = block_on(client_for(&kubeconfig, None))?;
    let nodes: Api<MeshNode> = Api::all(agent.clone());
    let ssa = PatchParams::apply("wiremesh-agent").force();

    // Its own MeshNode: create, update, status, delete.
    block_on(nodes.patch("n1", &ssa, &Patch::Apply(&own("n1").build())))
        .context("the agent writing its own MeshNode")?;
    block_on(nodes.patch_status(
        "n1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"conditions": []}})),
    ))
    .context("the agent writing its own MeshNode's status")?;
    // Another node's: refused by the admission policy, by name. The API server loads a
    // new policy within a second or so; until then the write may pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let message = loop {
        match block_on(nodes.patch("n2", &ssa, &Patch::Apply(&mesh_node("n2").build()))) {
            Err(kube::Error::Api(status)) if status.code == 403 => break status.message,
            other if std::time::Instant::now() > deadline => {
                panic!("agent of n1 writing MeshNode n2: expected 403 Forbidden, got {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    assert!(message.contains("own node"), "{message}");
    // Not as a host: that would let it claim addresses outside its pod CIDR.
    let as_host = own("n1").kind(MeshNodeKind::Host).build();
    let message = forbidden(
        block_on(nodes.patch("n1", &ssa, &Patch::Apply(&as_host))),
        "agent of n1 marking its MeshNode a Host",
    );
    assert!(message.contains("as a Host"), "{message}");
    // Nor as a relay: a relay is sent any remote peer's traffic.
    let as_relay = own("n1").relay(true).build();
    let message = forbidden(
        block_on(nodes.patch("n1", &ssa, &Patch::Apply(&as_relay))),
        "agent of n1 marking its MeshNode a relay",
    );
    assert!(message.contains("as a relay"), "{message}");
    // Nor its pod CIDRs (a sibling's here) or gateway flag: they come from its Node.
    for (what, forged) in [
        ("pod CIDRs", own("n1").pod_cidr("10.1.2.0/24").build()),
        ("gateway flag", {
            let mut n = own("n1").build();
            n.spec.gateway = true;
            n
        }),
    ] {
        let message = forbidden(
            block_on(nodes.patch("n1", &ssa, &Patch::Apply(&forged))),
            &format!("agent of n1 setting its MeshNode's {what}"),
        );
        assert!(message.contains("pod CIDRs"), "{what}: {message}");
    }
    // Admin creates n2's; the agent of n1 may neither change nor delete it.
    block_on(Api::<MeshNode>::all(admin.clone()).patch(
        "n2",
        &PatchParams::apply("admin").force(),
        &Patch::Apply(&mesh_node("n2").build()),
    ))?;
    forbidden(
        block_on(nodes.patch_status(
            "n2",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {}})),
        )),
        "agent of n1 writing another MeshNode's status",
    );
    forbidden(
        block_on(nodes.delete("n2", &Default::default())),
        "agent of n1 deleting MeshNode n2",
    );
    // Any PeerCluster: refused by RBAC.
    let peer = PeerCluster::new(
        "evil",
        PeerClusterSpec {
            cluster_name: "evil".to_owned(),
            api_server: "https://198.18.9.9:6443".to_owned(),
            ca_data: None,
            credentials_secret: "peer-evil".to_owned(),
            allowed_pod_cidrs: Vec::new(),
            mesh_cidrs: Vec::new(),
            allowed_host_cidrs: Vec::new(),
        },
    );
    forbidden(
        block_on(Api::<PeerCluster>::all(agent.clone()).create(&PostParams::default(), &peer)),
        "agent creating a PeerCluster",
    );
    // It reads them (which clusters are linked: an unlinked cluster's fail-closed routes
    // go), but a PeerCluster only names its credentials' Secret, which the agent may not
    // read, nor change a PeerCluster.
    block_on(Api::<PeerCluster>::all(agent.clone()).list(&ListParams::default()))
        .context("the agent listing PeerClusters")?;
    let mut valid = peer.clone();
    valid.spec.allowed_pod_cidrs = vec!["10.9.0.0/16".to_owned()];
    block_on(Api::<PeerCluster>::all(admin.clone()).create(&PostParams::default(), &valid))
        .context("admin creating PeerCluster evil")?;
    forbidden(
        block_on(Api::<PeerCluster>::all(agent.clone()).delete("evil", &Default::default())),
        "agent deleting a PeerCluster",
    );
    forbidden(
        block_on(Api::<Secret>::namespaced(agent.clone(), "wiremesh-system").get("peer-evil")),
        "agent reading a peer cluster's credentials Secret",
    );
    forbidden(
        block_on(
            Api::<Secret>::namespaced(agent.clone(), "wiremesh-system")
                .list(&ListParams::default()),
        ),
        "agent listing Secrets",
    );
    block_on(Api::<PeerCluster>::all(admin.clone()).delete("evil", &Default::default()))?;
    // Reading MeshPeers is what it is for.
    block_on(Api::<MeshPeer>::all(agent.clone()).list(&ListParams::default()))?;
    block_on(nodes.delete("n1", &Default::default())).context("deleting its own MeshNode")?;
    // Nor by deleting and creating it again.
    let message = forbidden(
        block_on(nodes.create(&PostParams::default(), &mesh_node("n1").build())),
        "agent of n1 creating its MeshNode with pod CIDRs",
    );
    assert!(message.contains("pod CIDRs"), "{message}");

    // A token of the agent's account not bound to a pod on a node writes no MeshNode.
    let unbound = a.token_kubeconfig("wiremesh-system", "wiremesh-agent")?;
    let unbound = block_on(client_for(&unbound, None))?;
    forbidden(
        block_on(Api::<MeshNode>::all(unbound).patch(
            "n1",
            &ssa,
            &Patch::Apply(&mesh_node("n1").build()),
        )),
        "an unbound agent token writing MeshNode n1",
    );
    // The controller's account writes no MeshNode either.
    let controller = a.token_kubeconfig("wiremesh-system", "wiremesh-controller")?;
    let controller = block_on(client_for(&controller, None))?;
    forbidden(
        block_on(Api::<MeshNode>::all(controller).patch(
            "n1",
            &ssa,
            &Patch::Apply(&mesh_node("n1").build()),
        )),
        "the controller writing a MeshNode",
    );

    // helm install of the chart into the other lab cluster. The chart creates
    // wiremesh-system itself, so the release record lives in `default`.
    let out = helm(
        &[
            "install",
            "wiremesh",
            CHART,
            "--kubeconfig",
            b.kubeconfig().to_str().context("UTF-8 path")?,
            "--namespace",
            "default",
            "--set",
            "clusterName=cluster-b",
            "--set",
            "podCIDRs={10.2.0.0/16}",
        ],
        HELM_TIMEOUT,
    )?;
    assert!(out.contains("STATUS: deployed"), "{out}");
    let b_admin = b.client()?;
    let info = block_on(wiremesh_controller::install::cluster_info(&b_admin))?;
    assert_eq!(info.name, "cluster-b");
    block_on(Api::<DaemonSet>::namespaced(b_admin, "wiremesh-system").get("wiremesh-agent"))
        .context("the DaemonSet helm installed")?;
    let status = helm(
        &[
            "status",
            "wiremesh",
            "--kubeconfig",
            b.kubeconfig().to_str().context("UTF-8 path")?,
            "--namespace",
            "default",
        ],
        HELM_TIMEOUT,
    )?;
    assert!(status.contains("STATUS: deployed"), "{status}");
    Ok(())
}
