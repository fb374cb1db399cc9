//! The lab itself, end to end: namespaces, routing, transfers, private mounts, cleanup.
//! Needs root, iproute2, wireguard-tools, util-linux, iputils-ping and wireguard-go.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use wiremesh_lab::{Host, Lab, ping, require_tool, transfer, xfer};

const A_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const EIGHT_MIB: u64 = 8 * 1024 * 1024;

#[test]
fn pods_reach_each_other_over_plain_routes_and_drop_removes_everything() -> Result<()> {
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let dir = lab.dir().to_owned();
    let a = lab.add_host("a", A_UNDERLAY, "10.1.0.0/24")?;
    let b = lab.add_host("b", B_UNDERLAY, "10.2.0.0/24")?;
    let pod_a = a.add_pod("web")?;
    let pod_b = b.add_pod("db")?;
    let pod_b2 = b.add_pod("cache")?;
    assert_eq!(pod_a.ip(), Ipv4Addr::new(10, 1, 0, 2));
    assert_eq!(pod_b.ip(), Ipv4Addr::new(10, 2, 0, 2));
    assert_eq!(pod_b2.ip(), Ipv4Addr::new(10, 2, 0, 3));
    assert_eq!(pod_a.gateway(), a.pod_gateway());

    ping(&a, b.underlay_ip(), 3)?;
    // Without routes between the pod CIDRs, pods cannot reach each other.
    assert!(ping(&pod_a, pod_b.ip(), 1).is_err());

    a.add_route_via(&b.pod_cidr(), b.underlay_ip())?;
    b.add_route_via(&a.pod_cidr(), a.underlay_ip())?;
    ping(&pod_a, pod_b.ip(), 3)?;
    ping(&pod_b2, pod_a.ip(), 3)?;

    let report = transfer(&pod_a, pod_b.ip(), EIGHT_MIB)?;
    assert_eq!(report.bytes, EIGHT_MIB);
    assert_eq!(report.sha256, xfer::expected(EIGHT_MIB, report.seed).sha256);
    eprintln!(
        "8 MiB pod to pod in {:?} ({:.0} Mbit/s)",
        report.elapsed,
        report.mbit_per_s()
    );

    let namespaces = lab.namespaces();
    assert_eq!(namespaces.len(), 6, "{namespaces:?}");
    assert!(namespaces.iter().all(|n| n.starts_with(&prefix)));
    assert!(netns_with_prefix(&prefix)?.len() == 6);

    drop(lab);
    let left = netns_with_prefix(&prefix)?;
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        a.exec(&["true"]).is_err(),
        "a torn-down lab still runs commands"
    );
    Ok(())
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let test = thread::spawn(move || {
        let lab = Lab::new().expect("lab");
        let a = lab.add_host("a", A_UNDERLAY, "10.1.0.0/24").expect("host");
        let pod = a.add_pod("p").expect("pod");
        // Ignores SIGTERM, and so does its child: only SIGKILL to the group ends both.
        let stubborn = pod
            .spawn(&["sh", "-c", "trap '' TERM; sleep 60; true"])
            .expect("spawn");
        tx.send((
            lab.prefix().to_owned(),
            lab.dir().to_owned(),
            stubborn.pid(),
        ))
        .expect("send");
        // Leaked on purpose: only the lab's own teardown can stop it now.
        std::mem::forget(stubborn);
        panic!("deliberate panic with a live lab");
    });
    assert!(test.join().is_err(), "the test thread should have panicked");
    let (prefix, dir, pid) = rx.recv().context("lab details")?;
    let left = netns_with_prefix(&prefix)?;
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(!stat.contains("(sh)"), "pid {pid} still alive: {stat}");
    Ok(())
}

#[test]
fn each_host_sees_its_own_var_run_wireguard() -> Result<()> {
    let lab = Lab::new()?;
    let a = lab.add_host("a", A_UNDERLAY, "10.1.0.0/24")?;
    let b = lab.add_host("b", B_UNDERLAY, "10.2.0.0/24")?;
    fs::write(a.run_dir().join("marker"), b"").context("writing the marker")?;

    let sleeper_a = a.spawn_in_private_mounts("sleep", &["60"], &[])?;
    let sleeper_b = b.spawn_in_private_mounts("sleep", &["60"], &[])?;
    let ls = |host: &Host, pid: u32| -> Result<String> {
        let output = host.exec_in_agent_ns(pid, &["ls", "/var/run/wireguard"])?;
        ensure!(output.status.success(), "ls failed: {output:?}");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    assert_eq!(ls(&a, sleeper_a.pid())?.trim(), "marker");
    assert_eq!(ls(&b, sleeper_b.pid())?.trim(), "");
    assert!(!Path::new("/var/run/wireguard/marker").exists());

    // A fresh private-mounts command sees the same directory as the process.
    let output = a.exec_private_mounts(&["ls", "/var/run/wireguard"])?;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "marker");

    // And the process is in the host's network namespace.
    let output =
        a.exec_in_agent_ns(sleeper_a.pid(), &["ip", "-4", "-br", "addr", "show", "ul0"])?;
    assert!(String::from_utf8_lossy(&output.stdout).contains("198.18.0.1/16"));

    let stopped = sleeper_a.stop()?;
    assert!(!stopped.status.success(), "sleep should die of SIGTERM");
    assert!(!sleeper_a.is_running());
    assert!(sleeper_b.is_running());
    Ok(())
}

#[test]
fn wireguard_go_tunnel_carries_pod_traffic() -> Result<()> {
    let wireguard_go = require_tool("wireguard-go", "wireguard-go")?;
    let wireguard_go = wireguard_go.to_str().context("wireguard-go path")?;
    let lab = Lab::new()?;
    let a = lab.add_host("a", A_UNDERLAY, "10.1.0.0/24")?;
    let b = lab.add_host("b", B_UNDERLAY, "10.2.0.0/24")?;
    let pod_a = a.add_pod("web")?;
    let pod_b = b.add_pod("db")?;

    let env = [("WG_PROCESS_FOREGROUND", "1")];
    let wg_a = a.spawn_in_private_mounts(wireguard_go, &["-f", "wg0"], &env)?;
    let wg_b = b.spawn_in_private_mounts(wireguard_go, &["-f", "wg0"], &env)?;
    wait_for_file(&a.run_dir().join("wg0.sock"))?;
    wait_for_file(&b.run_dir().join("wg0.sock"))?;
    assert_eq!(a.wg(&["show", "interfaces"])?.trim(), "wg0");
    assert_eq!(b.wg(&["show", "interfaces"])?.trim(), "wg0");

    let key_a = private_key(&a)?;
    let key_b = private_key(&b)?;
    configure(
        &a,
        &key_a,
        &public_key(&a, &key_b)?,
        B_UNDERLAY,
        &b.pod_cidr(),
    )?;
    configure(
        &b,
        &key_b,
        &public_key(&b, &key_a)?,
        A_UNDERLAY,
        &a.pod_cidr(),
    )?;
    assert_eq!(
        a.wg_in(wg_a.pid(), &["show", "wg0", "listen-port"])?.trim(),
        "51820"
    );

    ping(&pod_a, pod_b.ip(), 3)?;
    let report = transfer(&pod_b, pod_a.ip(), EIGHT_MIB)?;
    assert_eq!(report.sha256, xfer::expected(EIGHT_MIB, report.seed).sha256);
    eprintln!(
        "8 MiB through wireguard-go in {:?} ({:.0} Mbit/s)",
        report.elapsed,
        report.mbit_per_s()
    );
    let handshake = b.wg(&["show", "wg0", "latest-handshakes"])?;
    assert!(
        !handshake.trim().ends_with("\t0"),
        "no handshake: {handshake}"
    );

    wg_a.stop()?;
    wg_b.stop()?;
    Ok(())
}

fn configure(
    host: &Host,
    key_file: &Path,
    peer: &str,
    peer_underlay: Ipv4Addr,
    peer_pods: &str,
) -> Result<()> {
    let key_file = key_file.to_str().context("key path")?;
    let endpoint = format!("{peer_underlay}:51820");
    host.wg(&[
        "set",
        "wg0",
        "listen-port",
        "51820",
        "private-key",
        key_file,
        "peer",
        peer,
        "endpoint",
        &endpoint,
        "allowed-ips",
        peer_pods,
    ])?;
    host.ip(&["link", "set", "wg0", "up"])?;
    host.ip(&["route", "add", peer_pods, "dev", "wg0"])?;
    Ok(())
}

fn private_key(host: &Host) -> Result<std::path::PathBuf> {
    let key = host.exec_ok(&["wg", "genkey"])?;
    let path = host.state_dir().join("private.key");
    fs::write(&path, key).context("writing the private key")?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).context("chmod key")?;
    Ok(path)
}

fn public_key(host: &Host, private: &Path) -> Result<String> {
    let script = format!("wg pubkey < '{}'", private.display());
    Ok(host.exec_ok(&["sh", "-c", &script])?.trim().to_owned())
}

fn wait_for_file(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn netns_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("ip netns list")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}
