//! One measurement between two pods: TCP throughput with `iperf3`, the small-packet rate
//! with a UDP sender and receiver in this process, round-trip times with `ping`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::Value;
use wiremesh_lab::Netns;

use crate::netns::{join, spawn_in_netns};
use crate::stats::percentile;
use crate::tunnel::tail;

/// iperf3's default port, used inside the server's pod only.
const IPERF_PORT: &str = "5201";

/// The UDP port of the small-packet test, inside the server's pod only.
const FLOOD_PORT: u16 = 5202;

/// Datagrams sent between two reads of the clock.
const SEND_BATCH: usize = 256;

/// How long the UDP receiver keeps counting after the sender stopped.
const DRAIN: Duration = Duration::from_millis(200);

/// How long an iperf3 server (or the UDP receiver) may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Extra time an iperf3 client gets beyond its test length: connect, handshake, results.
const CLIENT_SLACK: Duration = Duration::from_secs(30);

/// A TCP run.
#[derive(Debug, Clone, Copy)]
pub struct TcpRun {
    /// Receiver-side goodput in Gbit/s.
    pub gbps: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
    /// Retransmitted segments at the sender.
    pub retransmits: u64,
}

/// A UDP run.
#[derive(Debug, Clone, Copy)]
pub struct UdpRun {
    /// Datagrams per second that arrived, in thousands.
    pub kpps: f64,
    /// Datagrams the sender sent per second, in thousands.
    pub sent_kpps: f64,
    /// Share of the datagrams that were lost, in percent.
    pub loss_pct: f64,
}

/// Round-trip times.
#[derive(Debug, Clone, Copy)]
pub struct Rtt {
    /// Median in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile in milliseconds.
    pub p99_ms: f64,
    /// Replies received.
    pub replies: usize,
}

/// TCP from `client` to `server_ip` (in `server`) with `flows` parallel streams for `secs`.
///
/// # Errors
/// When iperf3 fails or its report is unreadable.
pub fn tcp(
    server: &Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    flows: u32,
    secs: u32,
) -> Result<TcpRun> {
    let flows = flows.to_string();
    let report = iperf(server, server_ip, client, secs, &["-P", &flows])?;
    let received = &report["end"]["sum_received"];
    let gbps = number(received, "bits_per_second")? / 1e9;
    let bytes = number(received, "bytes")? as u64;
    let retransmits = report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or(0);
    Ok(TcpRun {
        gbps,
        bytes,
        retransmits,
    })
}

/// UDP datagrams of `payload` bytes from `client` to `server_ip`, sent by one thread
/// as fast as `send(2)` goes for `secs`, counted by one receiving thread.
///
/// Not iperf3: its UDP sender (one `write` per datagram between `select` calls and clock
/// reads) tops out well below what the veth path carries, which would cap every path.
///
/// # Errors
/// When a socket cannot be opened in the pods.
pub fn udp(
    server: &Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    payload: usize,
    secs: u32,
) -> Result<UdpRun> {
    let target = SocketAddr::from((server_ip, FLOOD_PORT));
    let duration = Duration::from_secs(u64::from(secs));
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = {
        let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
        spawn_in_netns(server, move || {
            // Every address of the pod: `server_ip` may be its mesh address, which only
            // the far side's translation knows.
            let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, FLOOD_PORT));
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = ready_tx.send(());
            let deadline = Instant::now() + duration + CLIENT_SLACK;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if socket.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })?
    };
    if ready_rx.recv_timeout(LISTEN_TIMEOUT).is_err() {
        stop.store(true, Ordering::Relaxed);
        join(receiver)?;
        bail!("the UDP receiver in {} did not start", server.name());
    }
    let sender = spawn_in_netns(client, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").context("binding the UDP sender")?;
        socket.connect(target)?;
        let datagram = vec![0x5au8; payload];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            // Read the clock once per batch, not per datagram.
            for _ in 0..SEND_BATCH {
                if socket.send(&datagram).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok((sent, start.elapsed()))
    })?;
    let sent = join(sender);
    // What is still in flight through the tunnel arrives within this.
    std::thread::sleep(DRAIN);
    stop.store(true, Ordering::Relaxed);
    join(receiver)?;
    let (sent, elapsed) = sent?;
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let received = received.load(Ordering::Relaxed) as f64;
    let sent = sent as f64;
    Ok(UdpRun {
        kpps: received / seconds / 1e3,
        sent_kpps: sent / seconds / 1e3,
        loss_pct: if sent > 0.0 {
            ((sent - received) / sent * 100.0).max(0.0)
        } else {
            0.0
        },
    })
}

/// `count` pings from `client` to `target`, 10 ms apart; median and 99th percentile.
///
/// # Errors
/// When fewer than half the pings were answered.
pub fn rtt(client: &Netns, target: Ipv4Addr, count: u32) -> Result<Rtt> {
    let count_s = count.to_string();
    // 10 ms apart: `count` pings take count/100 s; allow 5 s more for the last replies.
    let deadline = (count / 100 + 5).to_string();
    let target_s = target.to_string();
    let output = client.exec_timeout(
        &[
            "ping", "-n", "-i", "0.01", "-c", &count_s, "-w", &deadline, &target_s,
        ],
        Duration::from_secs(u64::from(count / 100) + 30),
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let times: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("time="))
        .filter_map(|t| t.parse().ok())
        .collect();
    ensure!(
        times.len() * 2 >= count as usize,
        "only {} of {count} pings to {target} were answered:\n{}",
        times.len(),
        tail(&text, 5)
    );
    Ok(Rtt {
        p50_ms: percentile(&times, 50.0).unwrap_or(f64::NAN),
        p99_ms: percentile(&times, 99.0).unwrap_or(f64::NAN),
        replies: times.len(),
    })
}

/// Round-trip times while one TCP flow from `client` to `server_ip` saturates the path
/// for `secs` (at least 3): pings 10 ms apart from the second second to the one before
/// last, so the flow is up to speed and still running.
///
/// # Errors
/// When iperf3 fails or fewer than half the pings were answered.
pub fn loaded_rtt(server: &Netns, server_ip: Ipv4Addr, client: &Netns, secs: u32) -> Result<Rtt> {
    let secs = secs.max(3);
    std::thread::scope(|scope| {
        let flow = scope.spawn(|| tcp(server, server_ip, client, 1, secs));
        std::thread::sleep(Duration::from_secs(1));
        let rtt = rtt(client, server_ip, (secs - 2) * 100);
        let flow = flow
            .join()
            .map_err(|_| anyhow!("the TCP flow's thread panicked"))?;
        flow.context("the TCP flow under the pings")?;
        rtt
    })
}

/// Runs a one-shot `iperf3 -s` in `server` and `iperf3 -c server_ip ... -J extra`;
/// returns the client's JSON report.
fn iperf(
    server: &Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    secs: u32,
    extra: &[&str],
) -> Result<Value> {
    let ip = server_ip.to_string();
    // On every address of the server's pod: `server_ip` may be its mesh address.
    let listener = server.spawn(&["iperf3", "-s", "-1", "-p", IPERF_PORT])?;
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        let out = server.exec(&["ss", "-Hltn", &format!("sport = :{IPERF_PORT}")])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        if !listener.is_running() || Instant::now() > deadline {
            bail!(
                "the iperf3 server in {} did not listen:\n{}",
                server.name(),
                listener.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs_s = secs.to_string();
    let mut args = vec![
        "iperf3",
        "-c",
        &ip,
        "-p",
        IPERF_PORT,
        "-t",
        &secs_s,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    args.extend_from_slice(extra);
    let output = client.exec_timeout(&args, Duration::from_secs(u64::from(secs)) + CLIENT_SLACK)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "iperf3 {} printed no JSON report:\n{}\n{}",
            extra.join(" "),
            tail(&stdout, 10),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if let Some(error) = report.get("error").and_then(Value::as_str) {
        bail!("iperf3 {}: {error}", extra.join(" "));
    }
    ensure!(
        output.status.success(),
        "iperf3 {} exited with {}",
        extra.join(" "),
        output.status
    );
    // The one-shot server ends with the test; give it a moment, then the guard stops it.
    let _ = listener.wait_with_timeout(Duration::from_secs(2));
    Ok(report)
}

fn number(object: &Value, field: &str) -> Result<f64> {
    object
        .get(field)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("iperf3 report has no {field} in {object}"))
}
