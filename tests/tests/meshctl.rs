//! `meshctl` as a real process against three real control planes (no agents, no
//! controller): join writes every object on both sides and is idempotent, the peer tokens
//! can only read MeshNodes, refused joins write nothing, status shows it all, unjoin removes
//! it all. Needs `cargo build -p wiremesh-controller --bin meshctl` first.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Output;

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use serde_json::json;
use wiremesh_lab::fixtures::mesh_node;
use wiremesh_lab::k8s::{
    ControlPlane, block_on, create_node, delete_node, meshctl, write_kubeconfig,
};
use wiremesh_proto::crd::{
    MeshNode, PEER_CLUSTER_FINALIZER, PEER_CLUSTER_LABEL, PeerCluster, SYSTEM_NAMESPACE,
};

#[test]
fn join_status_and_unjoin_between_real_clusters() -> Result<()> {
    let planes = ControlPlane::start_all(&["cluster-a", "cluster-b", "cluster-c"])?;
    let (a, b, c) = (&planes[0], &planes[1], &planes[2]);
    a.install(&["10.1.0.0/16"])?;
    b.install(&["10.2.0.0/16"])?;
    let merged = write_kubeconfig(&[a, b, c], "cluster-a")?;
    let kc = merged.to_str().context("UTF-8 path")?;

    // cluster-c has no Wiremesh yet.
    let out = run(&["--kubeconfig", kc, "join", "cluster-c"])?;
    expect_failure(&out, 1, "Wiremesh is not installed in context cluster-c")?;
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    // Its pod range overlaps cluster-b's, with which cluster-a is about to be linked.
    let out = run(&[
        "--kubeconfig",
        kc,
        "--context",
        "cluster-c",
        "install",
        "--cluster-name",
        "cluster-c",
        "--pod-cidr",
        "10.2.128.0/17",
    ])?;
    expect_success(&out)?;
    assert!(
        stdout(&out).contains("clusterName=cluster-c podCIDRs=10.2.128.0/17"),
        "{}",
        stdout(&out)
    );

    // Join, from cluster-a.
    let out = run(&[
        "join",
        "cluster-b",
        "--context",
        "cluster-a",
        "--kubeconfig",
        kc,
    ])?;
    expect_success(&out)?;
    let text = stdout(&out);
    for line in [
        "cluster-b: ClusterRole wiremesh-peer-reader created",
        "cluster-b: ServiceAccount wiremesh-system/wiremesh-peer-cluster-a created",
        "cluster-b: ClusterRoleBinding wiremesh-peer-cluster-a created",
        "cluster-a: Secret wiremesh-system/peer-cluster-b created",
        "cluster-a: PeerCluster cluster-b created",
        "cluster-a: ServiceAccount wiremesh-system/wiremesh-peer-cluster-b created",
        "cluster-b: PeerCluster cluster-a created",
        "joined cluster-a and cluster-b",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert_eq!(text.matches(" minted (").count(), 2, "{text}");
    check_link(a, b, &["10.2.0.0/16"])?;
    check_link(b, a, &["10.1.0.0/16"])?;

    // Again: nothing changes, no token is minted.
    let before = [versions(a, "cluster-b")?, versions(b, "cluster-a")?];
    let out = run(&["--kubeconfig", kc, "join", "cluster-b"])?;
    expect_success(&out)?;
    let text = stdout(&out);
    for word in ["created", "updated", " minted ("] {
        assert!(!text.contains(word), "second join says {word:?}:\n{text}");
    }
    assert_eq!(text.matches("unchanged").count(), 10, "{text}");
    assert_eq!(text.matches("not re-minted").count(), 2, "{text}");
    assert_eq!(
        before,
        [versions(a, "cluster-b")?, versions(b, "cluster-a")?]
    );

    // The stored tokens read the other side's MeshNodes and nothing else.
    check_token(a, b)?;
    check_token(b, a)?;

    // cluster-c overlaps cluster-b: refused from cluster-a (through the existing link) and
    // from cluster-b (directly), and nothing is written anywhere.
    let in_c = versions(c, "cluster-a")?;
    let out = run(&["--kubeconfig", kc, "join", "cluster-c"])?;
    expect_failure(
        &out,
        3,
        "cluster-a is already linked with cluster-b, whose pod CIDR 10.2.0.0/16 overlaps cluster-c's 10.2.128.0/17",
    )?;
    assert!(
        stderr(&out).contains("nothing was written"),
        "{}",
        stderr(&out)
    );
    let out = run(&[
        "--kubeconfig",
        kc,
        "--context",
        "cluster-b",
        "join",
        "cluster-c",
    ])?;
    expect_failure(
        &out,
        3,
        "the pod CIDRs of cluster-b and cluster-c overlap and cluster-b has no mesh CIDRs, but it is linked with cluster-a",
    )?;
    assert_eq!(in_c, versions(c, "cluster-a")?);
    assert!(versions(c, "cluster-a")?.is_empty());
    assert!(versions(c, "cluster-b")?.is_empty());
    assert!(versions(a, "cluster-c")?.is_empty());
    assert!(versions(b, "cluster-c")?.is_empty());
    assert_eq!(
        before,
        [versions(a, "cluster-b")?, versions(b, "cluster-a")?]
    );

    // Host ranges granted to cluster-b that hold cluster-a's API server (the `kubernetes`
    // Service's 10.0.0.1) or the address of one of its Nodes, or are huge: refused, naming
    // each, and nothing is written.
    let node_a1 = create_node(
        &a.client()?,
        "a1",
        "10.1.1.0/24",
        Ipv4Addr::new(198, 18, 1, 1),
    )?;
    let out = run(&[
        "--kubeconfig",
        kc,
        "join",
        "cluster-b",
        "--host-cidr",
        "10.0.0.0/24",
        "--host-cidr",
        "198.18.1.0/24",
        "--host-cidr",
        "0.0.0.0/0",
    ])?;
    delete_node(&a.client()?, &node_a1.name_any())?;
    expect_failure(
        &out,
        3,
        "cluster-b's host range 10.0.0.0/24 overlaps its API server's address 10.0.0.1 in cluster-a",
    )?;
    for line in [
        "cluster-b's host range 198.18.1.0/24 overlaps the address 198.18.1.1 of its Node a1 in cluster-a",
        "cluster-b's host range 0.0.0.0/0 is wider than /8",
        "nothing was written",
    ] {
        assert!(
            stderr(&out).contains(line),
            "missing {line:?} in:\n{}",
            stderr(&out)
        );
    }
    assert_eq!(
        before,
        [versions(a, "cluster-b")?, versions(b, "cluster-a")?]
    );

    // An unreachable cluster is named.
    c.pause()?;
    let out = run(&["--kubeconfig", kc, "join", "cluster-c"])?;
    c.resume()?;
    expect_failure(
        &out,
        1,
        &format!(
            "cannot reach the API server of context cluster-c ({})",
            c.server()
        ),
    )?;

    check_status(a, b, &merged)?;

    // Unjoin while a PeerCluster still carries the controller's finalizer (and no controller
    // runs): everything else goes, and meshctl says what is left and why.
    let links = Api::<PeerCluster>::all(a.client()?);
    block_on(links.patch(
        "cluster-b",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": [PEER_CLUSTER_FINALIZER] } })),
    ))?;
    let out = run(&["--kubeconfig", kc, "unjoin", "cluster-b", "--timeout", "2s"])?;
    expect_failure(
        &out,
        1,
        "cluster-a: PeerCluster cluster-b still exists after 2s (finalizers: wiremesh.io/mesh-peers)",
    )?;
    assert!(
        stderr(&out).contains("is it running in cluster-a?"),
        "{}",
        stderr(&out)
    );
    assert!(versions(b, "cluster-a")?.is_empty());
    assert_eq!(
        versions(a, "cluster-b")?.into_keys().collect::<Vec<_>>(),
        ["peercluster"]
    );
    // Joining again is refused until it is gone.
    let out = run(&["--kubeconfig", kc, "join", "cluster-b"])?;
    expect_failure(
        &out,
        3,
        "PeerCluster cluster-b in cluster-a is being deleted",
    )?;
    assert!(versions(b, "cluster-a")?.is_empty());
    // The controller would now release it.
    block_on(links.patch(
        "cluster-b",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
    ))?;

    // Unjoin is idempotent, and nothing is left on either side.
    let out = run(&["--kubeconfig", kc, "unjoin", "cluster-b"])?;
    expect_success(&out)?;
    let text = stdout(&out);
    assert!(text.contains("unjoined cluster-a and cluster-b"), "{text}");
    assert!(
        text.contains("cluster-b: Secret wiremesh-system/peer-cluster-a not found"),
        "{text}"
    );
    for (plane, other) in [(a, "cluster-b"), (b, "cluster-a")] {
        let left = versions(plane, other)?;
        assert!(left.is_empty(), "left in {}: {left:?}", plane.name());
        assert!(
            !exists(
                Api::<ClusterRole>::all(plane.client()?),
                "wiremesh-peer-reader"
            )?,
            "the reader ClusterRole is left in {}",
            plane.name()
        );
    }
    Ok(())
}

/// Everything `holder` keeps for its link with `peer`, and `peer` for `holder`.
fn check_link(holder: &ControlPlane, peer: &ControlPlane, cidrs: &[&str]) -> Result<()> {
    let (h, p) = (holder.client()?, peer.client()?);
    let (hn, pn) = (holder.name(), peer.name());
    let account = format!("wiremesh-peer-{hn}");
    assert!(exists(
        Api::<ClusterRole>::all(p.clone()),
        "wiremesh-peer-reader"
    )?);
    assert!(exists(
        Api::<ServiceAccount>::namespaced(p.clone(), SYSTEM_NAMESPACE),
        &account
    )?);
    let binding = block_on(Api::<ClusterRoleBinding>::all(p.clone()).get(&account))?;
    assert_eq!(binding.role_ref.name, "wiremesh-peer-reader");
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].name, account);

    let secret = block_on(
        Api::<Secret>::namespaced(h.clone(), SYSTEM_NAMESPACE).get(&format!("peer-{pn}")),
    )?;
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        secret.labels().get(PEER_CLUSTER_LABEL).map(String::as_str),
        Some(pn)
    );
    assert!(secret.data.unwrap_or_default().contains_key("token"));

    let link = block_on(Api::<PeerCluster>::all(h).get(pn))?;
    assert_eq!(link.spec.cluster_name, pn);
    assert_eq!(link.spec.api_server, peer.server());
    let ca = std::fs::read(peer.ca_path())?;
    assert_eq!(link.spec.ca_data, Some(STANDARD.encode(ca)));
    assert_eq!(link.spec.credentials_secret, format!("peer-{pn}"));
    assert_eq!(link.spec.allowed_pod_cidrs, cidrs);
    Ok(())
}

/// The token `holder` stores for `peer` lists `peer`'s MeshNodes but cannot create one or
/// read Secrets.
fn check_token(holder: &ControlPlane, peer: &ControlPlane) -> Result<()> {
    let secret = block_on(
        Api::<Secret>::namespaced(holder.client()?, SYSTEM_NAMESPACE)
            .get(&format!("peer-{}", peer.name())),
    )?;
    let token = secret
        .data
        .and_then(|mut d| d.remove("token"))
        .context("no token")?;
    let client = peer.token_client(std::str::from_utf8(&token.0)?)?;
    let nodes = Api::<MeshNode>::all(client.clone());
    block_on(nodes.list(&ListParams::default())).context("the peer token cannot list MeshNodes")?;
    let node = mesh_node("intruder")
        .endpoint("198.18.0.1:51820")
        .pod_cidr("10.9.0.0/24")
        .build();
    expect_forbidden(
        block_on(nodes.create(&PostParams::default(), &node)),
        "create a MeshNode",
    )?;
    expect_forbidden(
        block_on(Api::<Secret>::namespaced(client, SYSTEM_NAMESPACE).list(&ListParams::default())),
        "list Secrets",
    )?;
    Ok(())
}

fn check_status(a: &ControlPlane, b: &ControlPlane, merged: &Path) -> Result<()> {
    let client = a.client()?;
    let api = Api::<MeshNode>::all(client);
    block_on(
        api.create(
            &PostParams::default(),
            &mesh_node("a1")
                .endpoint("198.18.0.1:51820")
                .pod_cidr("10.1.1.0/24")
                .build(),
        ),
    )?;
    let handshake = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(12))?;
    block_on(api.patch_status(
        "a1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": { "peers": [{
            "name": "cluster-b.b1",
            "endpoint": "198.18.0.3:51820",
            "latestHandshakeTime": handshake.to_string(),
            "rxBytes": 1536,
            "txBytes": 300,
        }]}})),
    ))?;

    // KUBECONFIG is honoured (its current context is cluster-a).
    let env = [("KUBECONFIG", merged.to_str().context("UTF-8 path")?)];
    let out = run_with_env(&["status"], &env)?;
    expect_success(&out)?;
    let text = stdout(&out);
    for needle in [
        "cluster-a",
        "10.1.0.0/16",
        "cluster-b",
        "10.2.0.0/16",
        "a1",
        "cluster-b.b1",
        "198.18.0.3:51820",
        "s ago",
        "1.5 KiB",
        "300 B",
    ] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }
    let out = run_with_env(&["status", "-o", "json"], &env)?;
    expect_success(&out)?;
    let json: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    assert_eq!(json["cluster"]["name"], "cluster-a");
    assert_eq!(json["cluster"]["podCIDRs"][0], "10.1.0.0/16");
    assert_eq!(json["peerClusters"][0]["name"], "cluster-b");
    assert_eq!(json["peerClusters"][0]["apiServer"], b.server());
    assert_eq!(json["nodes"][0]["name"], "a1");
    assert_eq!(json["nodes"][0]["tunnels"][0]["rxBytes"], 1536);
    let age = json["nodes"][0]["tunnels"][0]["latestHandshakeAgeSeconds"]
        .as_i64()
        .context("no handshake age")?;
    assert!((12..120).contains(&age), "handshake age {age}");
    Ok(())
}

/// The resourceVersions of every object `meshctl join` writes in `plane` for its link with
/// `other` (both directions); empty when there is none.
fn versions(plane: &ControlPlane, other: &str) -> Result<BTreeMap<&'static str, String>> {
    let client = plane.client()?;
    let account = format!("wiremesh-peer-{other}");
    let found = [
        (
            "peercluster",
            version(Api::<PeerCluster>::all(client.clone()), other)?,
        ),
        (
            "secret",
            version(
                Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE),
                &format!("peer-{other}"),
            )?,
        ),
        (
            "serviceaccount",
            version(
                Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE),
                &account,
            )?,
        ),
        (
            "binding",
            version(Api::<ClusterRoleBinding>::all(client.clone()), &account)?,
        ),
    ];
    let mut out: BTreeMap<&'static str, String> = found
        .into_iter()
        .filter_map(|(what, v)| Some((what, v?)))
        .collect();
    if !out.is_empty()
        && let Some(v) = version(Api::<ClusterRole>::all(client), "wiremesh-peer-reader")?
    {
        out.insert("role", v);
    }
    Ok(out)
}

fn version<K>(api: Api<K>, name: &str) -> Result<Option<String>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(block_on(api.get_opt(name))?.and_then(|o| o.resource_version()))
}

fn exists<K>(api: Api<K>, name: &str) -> Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(version(api, name)?.is_some())
}

fn expect_forbidden<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) -> Result<()> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
        other => bail!("a peer token could {what}: {other:?}"),
    }
}

fn run(args: &[&str]) -> Result<Output> {
    run_with_env(args, &[])
}

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let out = meshctl(args, env)?;
    eprintln!(
        "$ meshctl {}\n{}{}",
        args.join(" "),
        stdout(&out),
        stderr(&out)
    );
    Ok(out)
}

fn expect_success(out: &Output) -> Result<()> {
    ensure!(
        out.status.success(),
        "meshctl failed ({}):\n{}\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    Ok(())
}

fn expect_failure(out: &Output, code: i32, message: &str) -> Result<()> {
    ensure!(
        out.status.code() == Some(code),
        "expected exit code {code}, got {}:\n{}\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    ensure!(
        stderr(out).contains(message),
        "stderr lacks {message:?}:\n{}",
        stderr(out)
    );
    Ok(())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
