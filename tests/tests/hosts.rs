//! Hosts outside Kubernetes (needs root): `meshctl host add` and `wiremesh-agent host`,
//! a stock `wireguard-go` host configured from `meshctl host config`, `meshctl host
//! remove`, and bad input refused with nothing written.

// The tests print what they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use wiremesh_lab::clusters::{BareHost, INTERFACE, Side, TwoClusters, wait_for};
use wiremesh_lab::k8s::block_on;
use wiremesh_lab::mesh::{self, IFACE, Keypair};
use wiremesh_lab::{MIB, Netns, reachable, transfer};
use wiremesh_proto::crd::{HostBundle, MeshPeer};
use wiremesh_proto::crd::{MeshNode, SYSTEM_NAMESPACE, host_account_name};

/// Mirroring, agent watches and a handshake, on a busy 2-core machine.
const CONVERGE: Duration = Duration::from_secs(60);

fn wait_reachable(from: &Netns, to: Ipv4Addr, what: &str) -> Result<Duration> {
    wait_for(CONVERGE, || {
        ensure!(reachable(from, to)?, "{what}: {to} not reachable");
        Ok(())
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn meshctl_ok(lab: &TwoClusters, args: &[&str]) -> Result<String> {
    let out = lab.meshctl(args)?;
    ensure!(
        out.status.success(),
        "meshctl {} failed:\n{}",
        args.join(" "),
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_add(lab: &TwoClusters, host: &BareHost, extra: &[&str]) -> Result<Output> {
    let address = host.address_cidr();
    let mut args = vec![
        "--context",
        host.side.name(),
        "host",
        "add",
        &host.name,
        "--address",
        &address,
    ];
    args.extend_from_slice(extra);
    lab.meshctl(&args)
}

fn bundle_path(lab: &TwoClusters, name: &str) -> PathBuf {
    lab.lab.dir().join(format!("{name}-bundle.json"))
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("UTF-8 path")
}

fn mesh_node(lab: &TwoClusters, side: Side, name: &str) -> Result<Option<MeshNode>> {
    let api: Api<MeshNode> = Api::all(lab.cluster(side).client()?);
    Ok(block_on(api.get_opt(name))?)
}

/// A host running `wiremesh-agent host` in cluster-a and a stock wireguard-go host in
/// cluster-b: pods of both clusters reach both hosts and back (checksummed transfers);
/// `meshctl host remove` makes every node drop the tunnel.
#[test]
fn hosts_outside_kubernetes_join_both_clusters_and_leave() -> Result<()> {
    let lab = TwoClusters::new(1)?;
    println!("{}", lab.join()?);
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);
    wait_reachable(&a1.pod, b1.pod.ip(), "a1 -> b1")?;

    // (a) wiremesh-agent host, registered in cluster-a.
    let mut db = lab.add_bare_host(Side::A, "db1", 1)?;
    let bundle = bundle_path(&lab, "db1");
    let endpoint = db.endpoint();
    let out = host_add(
        &lab,
        &db,
        &["--endpoint", &endpoint, "--bundle", path(&bundle)?],
    )?;
    ensure!(out.status.success(), "host add failed:\n{}", text(&out));
    println!("{}", text(&out));
    let mode = std::fs::metadata(&bundle)?.permissions();
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o600,
        "bundle mode {mode:?}"
    );
    let before = mesh_node(&lab, Side::A, "db1")?.context("no MeshNode db1")?;
    ensure!(
        before.spec.public_key.is_empty(),
        "a key before the agent ran"
    );

    let started = std::time::Instant::now();
    db.start_agent(&bundle)?;
    wait_reachable(&a1.pod, db.address(), "pod a1 -> host db1")?;
    println!(
        "host db1 reachable from cluster-a's pod {:?} after its agent was started",
        started.elapsed()
    );
    wait_reachable(&b1.pod, db.address(), "pod b1 -> host db1")?;
    println!(
        "host db1 reachable from cluster-b's pod {:?} after its agent was started",
        started.elapsed()
    );
    wait_reachable(&db.host, a1.pod.ip(), "host db1 -> pod a1")?;
    wait_reachable(&db.host, b1.pod.ip(), "host db1 -> pod b1")?;
    let published = mesh_node(&lab, Side::A, "db1")?.context("no MeshNode db1")?;
    ensure!(
        published.spec.has_key() && published.spec.endpoints == [endpoint.clone()],
        "{:?}",
        published.spec
    );
    for (from, to, what) in [
        (&*a1.pod, db.address(), "pod a1 -> db1"),
        (&*b1.pod, db.address(), "pod b1 -> db1"),
        (&*db.host, a1.pod.ip(), "db1 -> pod a1"),
        (&*db.host, b1.pod.ip(), "db1 -> pod b1"),
    ] {
        let report = transfer(from, to, 8 * MIB)?;
        println!("{what}: 8 MiB intact ({:.0} Mbit/s)", report.mbit_per_s());
    }

    // A compromised b1 (root: it sets its own agent's allowed IPs and routes) sends into
    // its tunnel to db1 pings for db1's link-local "metadata service" (169.254.169.254,
    // which answers on db1): a host delivers only to its own addresses, so db1 drops them
    // as bad_destination and nothing answers.
    {
        db.host
            .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
        let db_key = db
            .host
            .wg(&["show", IFACE, "public-key"])?
            .trim()
            .to_owned();
        let allowed = b1.wg(&["show", IFACE, "allowed-ips"])?;
        let current = allowed
            .lines()
            .find(|l| l.starts_with(&db_key))
            .and_then(|l| l.split_once('\t'))
            .map(|(_, ips)| ips.split_whitespace().collect::<Vec<_>>().join(","))
            .context("b1 has no allowed IPs for db1")?;
        let widened = format!("{current},169.254.169.254/32");
        b1.wg(&["set", IFACE, "peer", &db_key, "allowed-ips", &widened])?;
        b1.host
            .ip(&["route", "replace", "169.254.169.254/32", "dev", IFACE])?;
        let drops = || mesh::drops(&db.host, "bad_destination");
        let before = drops()?;
        let out = b1.pod.exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "169.254.169.254",
        ])?;
        let counted = wait_for(Duration::from_secs(5), || {
            let after = drops()?;
            ensure!(after >= before + 3.0, "bad_destination {before} -> {after}");
            Ok(())
        });
        b1.host
            .ip(&["route", "del", "169.254.169.254/32", "dev", IFACE])?;
        b1.wg(&["set", IFACE, "peer", &db_key, "allowed-ips", &current])?;
        println!(
            "compromised b1 -> db1's 169.254.169.254 through the tunnel: {}; db1 counted bad_destination {before} -> {}",
            if out.status.success() {
                "ANSWERED"
            } else {
                "no answer"
            },
            drops()?
        );
        ensure!(
            !out.status.success(),
            "a peer reached host db1's link-local address through the tunnel"
        );
        counted?;
        wait_reachable(&b1.pod, db.address(), "pod b1 -> host db1")?;
    }

    // The host agent reports its tunnels (a1 and b1) on its MeshNode, as nodes do.
    wait_for(CONVERGE, || {
        let node = mesh_node(&lab, Side::A, "db1")?.context("no MeshNode db1")?;
        let status = node.status.context("no status yet")?;
        ensure!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                && status.tunnels.as_ref().is_some_and(|t| t.total == 2),
            "status: {status:?}"
        );
        Ok(())
    })?;
    let status = meshctl_ok(&lab, &["--context", "cluster-a", "status"])?;
    println!("{status}");
    ensure!(status.contains("db1 (host)"), "{status}");

    // (b) stock wireguard-go, registered in cluster-b with its public key.
    let wg1 = lab.add_bare_host(Side::B, "wg1", 2)?;
    let keys = Keypair::generate();
    let endpoint = wg1.endpoint();
    let wg_bundle = bundle_path(&lab, "wg1");
    let out = host_add(
        &lab,
        &wg1,
        &[
            "--endpoint",
            &endpoint,
            "--public-key",
            &keys.public,
            "--bundle",
            path(&wg_bundle)?,
        ],
    )?;
    ensure!(out.status.success(), "host add failed:\n{}", text(&out));
    let _wggo = wg1.host.spawn_wireguard_go(
        &["wireguard-go", "-f", INTERFACE],
        INTERFACE,
        &[("LOG_LEVEL", "error")],
    )?;
    // The config once it names b1 and cluster-a's a1 and db1 (mirrored by the controller).
    let mut config = String::new();
    wait_for(CONVERGE, || {
        config = meshctl_ok(&lab, &["--context", "cluster-b", "host", "config", "wg1"])?;
        ensure!(
            config.matches("[Peer]").count() >= 3,
            "not every peer yet:\n{config}"
        );
        Ok(())
    })?;
    println!("meshctl host config wg1:\n{config}");
    ensure!(
        config.contains(&format!("Address = {}", wg1.address_cidr())),
        "{config}"
    );
    // What wg-quick would do: `wg setconf` the config without its wg-quick-only lines,
    // then the address, the link and a route per AllowedIPs.
    let mut setconf = String::new();
    let mut routes = Vec::new();
    for line in config.lines() {
        if line.starts_with("Address") {
            continue;
        }
        if let Some(ips) = line.strip_prefix("AllowedIPs = ") {
            routes.extend(ips.split(", ").map(str::to_owned));
        }
        setconf.push_str(line);
        setconf.push('\n');
        if line == "[Interface]" {
            setconf.push_str(&format!("PrivateKey = {}\n", keys.private));
        }
    }
    let conf = wg1.host.dir().join("wg1.conf");
    std::fs::write(&conf, setconf)?;
    wg1.host.wg(&["setconf", INTERFACE, path(&conf)?])?;
    wg1.host
        .ip(&["addr", "add", &wg1.address_cidr(), "dev", INTERFACE])?;
    wg1.host
        .ip(&["link", "set", INTERFACE, "mtu", "1420", "up"])?;
    for cidr in &routes {
        wg1.host.ip(&["route", "replace", cidr, "dev", INTERFACE])?;
    }
    let took = wait_reachable(&b1.pod, wg1.address(), "pod b1 -> wg1")?;
    println!("wireguard-go host wg1 reachable from cluster-b's pod {took:?} after wg setconf");
    let took = wait_reachable(&a1.pod, wg1.address(), "pod a1 -> wg1")?;
    println!("wireguard-go host wg1 reachable from cluster-a's pod {took:?} after that");
    for (from, to, what) in [
        (&*wg1.host, a1.pod.ip(), "wg1 -> pod a1"),
        (&*wg1.host, b1.pod.ip(), "wg1 -> pod b1"),
        (&*b1.pod, wg1.address(), "pod b1 -> wg1"),
        (&*wg1.host, db.address(), "wg1 -> db1"),
    ] {
        let report = transfer(from, to, 8 * MIB)?;
        println!("{what}: 8 MiB intact ({:.0} Mbit/s)", report.mbit_per_s());
    }

    // (d) remove db1: every node drops the tunnel and the route, its credential goes.
    let db_key = published.spec.public_key.clone();
    println!(
        "{}",
        meshctl_ok(&lab, &["--context", "cluster-a", "host", "remove", "db1"])?
    );
    let took = wait_for(CONVERGE, || {
        for node in [a1, b1] {
            let peers = node.wg(&["show", INTERFACE, "peers"])?;
            ensure!(
                !peers.contains(&db_key),
                "{} still has db1's peer",
                node.name
            );
            let routes = node.routes()?;
            ensure!(
                !routes.contains(&db.address().to_string()),
                "{} still routes to db1: {routes}",
                node.name
            );
        }
        Ok(())
    })?;
    println!("host db1 removed: both clusters' nodes dropped the tunnel after {took:?}");
    // The host's own agent notices too, and drops every tunnel of its own.
    let took = wait_for(CONVERGE, || {
        let peers = db.host.wg(&["show", INTERFACE, "peers"])?;
        ensure!(peers.trim().is_empty(), "db1 still has peers: {peers}");
        Ok(())
    })?;
    println!("host db1's agent dropped its own tunnels {took:?} later");
    ensure!(!reachable(&a1.pod, db.address())?, "db1 still reachable");
    ensure!(
        mesh_node(&lab, Side::A, "db1")?.is_none(),
        "MeshNode db1 left"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(lab.a.client()?, SYSTEM_NAMESPACE);
    ensure!(
        block_on(accounts.get_opt(&host_account_name("db1")))?.is_none(),
        "ServiceAccount left"
    );
    let roles: Api<ClusterRole> = Api::all(lab.a.client()?);
    ensure!(
        block_on(roles.get_opt(&host_account_name("db1")))?.is_none(),
        "ClusterRole left"
    );
    // The stock host is untouched.
    ensure!(reachable(&b1.pod, wg1.address())?, "wg1 lost");
    Ok(())
}

/// Addresses inside a pod CIDR or of another host, a truncated bundle and a bundle for
/// another cluster: each refused, naming the problem, with nothing written.
#[test]
fn bad_host_input_is_refused_and_changes_nothing() -> Result<()> {
    let lab = TwoClusters::new(1)?;
    let db = lab.add_bare_host(Side::A, "db1", 1)?;
    let bundle = bundle_path(&lab, "db1");
    let out = host_add(&lab, &db, &["--bundle", path(&bundle)?])?;
    ensure!(out.status.success(), "host add failed:\n{}", text(&out));

    let objects = |name: &str| -> Result<(bool, bool)> {
        let accounts: Api<ServiceAccount> = Api::namespaced(lab.a.client()?, SYSTEM_NAMESPACE);
        Ok((
            mesh_node(&lab, Side::A, name)?.is_some(),
            block_on(accounts.get_opt(&host_account_name(name)))?.is_some(),
        ))
    };
    for (address, want) in [
        (
            "10.1.7.5/32",
            "address 10.1.7.5/32 is inside pod CIDR 10.1.0.0/16 of cluster cluster-a",
        ),
        (
            "10.250.1.1/32",
            "address 10.250.1.1/32 overlaps 10.250.1.1/32 of host db1",
        ),
        ("10.1.1.0/24", "address 10.1.1.0/24 is a network"),
    ] {
        let second = bundle_path(&lab, "db2");
        let out = lab.meshctl(&[
            "--context",
            "cluster-a",
            "host",
            "add",
            "db2",
            "--address",
            address,
            "--bundle",
            path(&second)?,
        ])?;
        let said = text(&out);
        ensure!(
            out.status.code() == Some(3) && said.contains(want),
            "{address}: want exit 3 and {want:?}, got {:?}:\n{said}",
            out.status.code()
        );
        ensure!(
            objects("db2")? == (false, false) && !second.exists(),
            "{address}: something was written"
        );
        println!("refused as it should be: {}", said.trim());
    }

    let good = std::fs::read_to_string(&bundle)?;
    check_credential(&lab, &good)?;
    let unchanged = || -> Result<()> {
        let node = mesh_node(&lab, Side::A, "db1")?.context("MeshNode db1 gone")?;
        ensure!(
            node.spec.public_key.is_empty() && node.spec.endpoints.is_empty(),
            "MeshNode db1 was written: {:?}",
            node.spec
        );
        let links = db.host.link_names()?;
        ensure!(
            !links.iter().any(|l| l == INTERFACE),
            "a device was created: {links:?}"
        );
        Ok(())
    };
    let truncated = lab.lab.dir().join("truncated.json");
    std::fs::write(&truncated, &good[..good.len() / 2])?;
    let other = lab.lab.dir().join("other-cluster.json");
    std::fs::write(&other, good.replace("\"cluster-a\"", "\"cluster-b\""))?;
    // Bundles hold a token: the agent refuses one that group or others may read.
    for file in [&truncated, &other] {
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    for (file, want) in [
        (&truncated, "truncated"),
        (&other, "is for cluster \"cluster-b\", but the API server"),
    ] {
        let out = db.run_agent_once(file)?;
        let said = text(&out);
        ensure!(
            !out.status.success() && said.contains(want),
            "{}: want {want:?}:\n{said}",
            file.display()
        );
        unchanged()?;
        println!(
            "refused as it should be: {}",
            said.lines().last().unwrap_or_default()
        );
    }
    Ok(())
}

/// The bundle's token reads MeshNodes and MeshPeers and writes its own MeshNode only.
fn check_credential(lab: &TwoClusters, bundle: &str) -> Result<()> {
    let bundle: HostBundle = serde_json::from_str(bundle)?;
    let client = lab.a.plane.token_client(&bundle.token)?;
    let nodes: Api<MeshNode> = Api::all(client.clone());
    block_on(nodes.list(&ListParams::default())).context("the host cannot list MeshNodes")?;
    block_on(Api::<MeshPeer>::all(client.clone()).list(&ListParams::default()))
        .context("the host cannot list MeshPeers")?;
    let patch = Patch::Merge(serde_json::json!({ "spec": { "endpoints": ["198.18.9.9:51820"] } }));
    match block_on(nodes.patch("a1", &PatchParams::default(), &patch)) {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => anyhow::bail!("the host token could patch MeshNode a1: {other:?}"),
    }
    match block_on(nodes.delete("db1", &Default::default())) {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => anyhow::bail!("the host token could delete its MeshNode: {other:?}"),
    }
    // Its own MeshNode: it may publish key and endpoints (the other test's host agent
    // does), but not make itself a relay or a gateway, nor change its kind or addresses
    // (the admission policy).
    for (spec, what) in [
        (serde_json::json!({ "relay": true }), "relay"),
        (
            serde_json::json!({ "gateway": true, "kind": "Node" }),
            "gateway",
        ),
        (
            serde_json::json!({ "podCIDRs": ["10.250.0.0/16"] }),
            "addresses",
        ),
    ] {
        let patch = Patch::Merge(serde_json::json!({ "spec": spec }));
        match block_on(nodes.patch("db1", &PatchParams::default(), &patch)) {
            Err(kube::Error::Api(status))
                if status.code == 403 && status.message.contains("a host may only publish") => {}
            other => anyhow::bail!("the host token could change its {what}: {other:?}"),
        }
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client, SYSTEM_NAMESPACE);
    match block_on(accounts.list(&ListParams::default())) {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => anyhow::bail!("the host token could list ServiceAccounts: {other:?}"),
    }
    println!("the host token reads the mesh and cannot write another MeshNode");
    Ok(())
}
