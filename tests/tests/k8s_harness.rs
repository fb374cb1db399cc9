//! The Kubernetes harness against real API servers (`tests/k8s/`, built once into
//! `target/k8s-bin`): planes start side by side, Wiremesh installs, the API server itself
//! refuses malformed MeshNodes, Nodes and tokens work, outages come and go, and the
//! [`ApiProxy`] serves a plane inside a lab namespace. The proxy test needs root.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt as _};
use wiremesh_lab::Lab;
use wiremesh_lab::fixtures::mesh_node;
use wiremesh_lab::k8s::{
    ApiProxy, ControlPlane, block_on, block_on_timeout, client_for, create_node, delete_node,
    write_kubeconfig,
};
use wiremesh_lab::mesh::{eventually, in_netns};
use wiremesh_proto::crd::{MeshNode, SYSTEM_NAMESPACE};

#[test]
fn two_planes_install_refuse_bad_mesh_nodes_and_survive_an_outage() -> Result<()> {
    let planes = ControlPlane::start_all(&["cluster-a", "cluster-b"])?;
    let (a, b) = (&planes[0], &planes[1]);
    assert_ne!(a.server(), b.server());

    // cluster-a: installed from the Rust types; cluster-b: the generated deploy/crds files
    // first, then the install over them.
    a.install(&["10.1.0.0/16"])?;
    apply_crd_files(&b.client()?)?;
    b.install(&["10.2.0.0/16", "fd00:2::/48"])?;
    let info = block_on(wiremesh_controller::install::cluster_info(&b.client()?))?;
    assert_eq!(info.name, "cluster-b");
    assert_eq!(
        info.pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.2.0.0/16", "fd00:2::/48"]
    );
    // Installing again is a no-op; renaming is refused.
    a.install(&["10.1.0.0/16"])?;
    let err = wiremesh_lab::k8s::install(&a.client()?, "renamed", &["10.1.0.0/16"]).unwrap_err();
    assert!(
        format!("{err:#}").contains("already installed as \"cluster-a\""),
        "{err:#}"
    );

    let client = a.client()?;
    check_mesh_node_validation(&client)?;
    check_nodes(&client)?;
    check_service_account_tokens(a)?;

    // One merged kubeconfig reaches both clusters by context name.
    let merged = write_kubeconfig(&[a, b], "cluster-a")?;
    for (context, name) in [(None, "cluster-a"), (Some("cluster-b"), "cluster-b")] {
        let info = block_on(async {
            let client = client_for(&merged, context).await?;
            Ok::<_, anyhow::Error>(wiremesh_controller::install::cluster_info(&client).await?)
        })?;
        assert_eq!(info.name, name);
    }

    // An outage of cluster-b: requests fail; after resume the same client works again.
    let b_client = b.client()?;
    b.pause()?;
    let during = block_on_timeout(Duration::from_secs(20), b_client.apiserver_version());
    assert!(
        !matches!(during, Ok(Ok(_))),
        "cluster-b answered while paused"
    );
    // cluster-a is not affected.
    block_on(client.apiserver_version())?;
    b.resume()?;
    eventually(Duration::from_secs(30), || {
        block_on(b_client.apiserver_version()).context("cluster-b after resume")
    })?;
    let info = block_on(wiremesh_controller::install::cluster_info(&b_client))?;
    assert_eq!(
        info.name, "cluster-b",
        "etcd kept the data across the outage"
    );
    Ok(())
}

#[test]
fn api_proxy_serves_a_plane_inside_a_lab_namespace() -> Result<()> {
    let plane = ControlPlane::start("cluster-p")?;
    let lab = Lab::new()?;
    let host = lab.add_host("a", Ipv4Addr::new(198, 18, 0, 1), "10.1.0.0/24")?;
    let kubeconfig = plane.kubeconfig().to_owned();

    // Nothing listens on the API server's port inside the namespace yet.
    assert!(readyz_in(&host, &kubeconfig).is_err());

    let proxy = ApiProxy::start(&host, plane.api_port())?;
    assert_eq!(readyz_in(&host, &kubeconfig)?, "ok");
    // Several requests on several connections.
    for _ in 0..3 {
        assert_eq!(readyz_in(&host, &kubeconfig)?, "ok");
    }

    plane.pause()?;
    assert!(
        readyz_in(&host, &kubeconfig).is_err(),
        "readyz through the proxy succeeded while paused"
    );
    plane.resume()?;
    let body = eventually(Duration::from_secs(30), || readyz_in(&host, &kubeconfig))?;
    assert_eq!(body, "ok");

    drop(proxy);
    assert!(
        readyz_in(&host, &kubeconfig).is_err(),
        "still reachable after the proxy was dropped"
    );
    Ok(())
}

/// `GET /readyz` with the admin kubeconfig from a thread inside `ns`, on a runtime of its
/// own there (so the client's sockets are made inside the namespace).
fn readyz_in(ns: &wiremesh_lab::Netns, kubeconfig: &Path) -> Result<String> {
    let kubeconfig: PathBuf = kubeconfig.to_owned();
    in_netns(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let client = client_for(&kubeconfig, None).await?;
            let request = http::Request::get("/readyz").body(Vec::new())?;
            tokio::time::timeout(Duration::from_secs(10), client.request_text(request))
                .await
                .map_err(|_| anyhow!("no answer within 10s"))?
                .context("GET /readyz")
        })
    })
}

/// Creates each `deploy/crds/*.yaml` as it is and waits for it to be Established.
fn apply_crd_files(client: &Client) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        block_on(api.create(&PostParams::default(), &crd))
            .with_context(|| format!("creating {}", path.display()))?;
        names.push(crd.name_any());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "meshnodes.wiremesh.io",
            "meshpeers.wiremesh.io",
            "meshserviceexports.wiremesh.io",
            "peerclusters.wiremesh.io",
        ],
        "deploy/crds/ holds other CRDs than the Rust types' (run `make manifests`)"
    );
    for name in names {
        block_on_timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .with_context(|| format!("{name} not Established"))??;
    }
    Ok(())
}

fn check_mesh_node_validation(client: &Client) -> Result<()> {
    let api = Api::<MeshNode>::all(client.clone());
    let good = |name: &str| {
        mesh_node(name)
            .endpoint("198.18.0.1:51820")
            .endpoint("[fd00::1]:51820")
            .pod_cidr("10.1.1.0/24")
            .location("lab")
    };
    block_on(api.create(&PostParams::default(), &good("good").build()))
        .context("a well-formed MeshNode was refused")?;

    let bad_key = good("bad-key").key("not-a-key");
    let host_bits = good("host-bits").pod_cidrs(["10.1.0.1/24"]);
    let not_a_cidr = good("not-a-cidr").pod_cidrs(["10.1.0.0"]);
    let bad_endpoint = good("bad-endpoint").endpoints(["198.18.0.1"]);
    for (name, node, field) in [
        ("bad-key", bad_key, "spec.publicKey"),
        ("host-bits", host_bits, "spec.podCIDRs"),
        ("not-a-cidr", not_a_cidr, "spec.podCIDRs"),
        ("bad-endpoint", bad_endpoint, "spec.endpoints"),
    ] {
        match block_on(api.create(&PostParams::default(), &node.build())) {
            Err(kube::Error::Api(status)) => {
                ensure!(
                    status.code == 422 && status.message.contains(field),
                    "MeshNode {name}: expected 422 naming {field}, got {} {}",
                    status.code,
                    status.message
                );
            }
            Ok(_) => bail!("the API server accepted the malformed MeshNode {name}"),
            Err(e) => return Err(e).context(format!("creating MeshNode {name}")),
        }
    }
    let names: Vec<String> = block_on(api.list(&ListParams::default()))?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(names, ["good"]);
    Ok(())
}

fn check_nodes(client: &Client) -> Result<()> {
    let node = create_node(
        client,
        "node-1",
        "10.1.1.0/24",
        Ipv4Addr::new(198, 18, 0, 1),
    )?;
    let spec = node.spec.clone().unwrap_or_default();
    assert_eq!(spec.pod_cidr.as_deref(), Some("10.1.1.0/24"));
    assert_eq!(spec.pod_cidrs, Some(vec!["10.1.1.0/24".to_owned()]));
    let stored = block_on(Api::<Node>::all(client.clone()).get("node-1"))?;
    let addresses = stored.status.and_then(|s| s.addresses).unwrap_or_default();
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "198.18.0.1"),
        "{addresses:?}"
    );
    delete_node(client, "node-1")?;
    delete_node(client, "node-1")?;
    Ok(())
}

fn check_service_account_tokens(plane: &ControlPlane) -> Result<()> {
    let client = plane.client()?;
    let account = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some("nobody".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    block_on(
        Api::<ServiceAccount>::namespaced(client, SYSTEM_NAMESPACE)
            .create(&PostParams::default(), &account),
    )?;
    let kubeconfig = plane.token_kubeconfig(SYSTEM_NAMESPACE, "nobody")?;
    let result = block_on(async {
        let client = client_for(&kubeconfig, None).await?;
        // Authenticated (the version is public anyway), but not allowed to list Nodes.
        client.apiserver_version().await?;
        Ok::<_, anyhow::Error>(Api::<Node>::all(client).list(&ListParams::default()).await)
    })?;
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            assert!(
                status
                    .message
                    .contains("system:serviceaccount:wiremesh-system:nobody"),
                "{}",
                status.message
            );
        }
        other => bail!("an unbound ServiceAccount listed Nodes: {other:?}"),
    }
    Ok(())
}
