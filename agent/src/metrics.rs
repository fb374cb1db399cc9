//! A small HTTP endpoint: `/metrics` in the Prometheus text format, `/healthz`, `/readyz`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::core::{Counters, PeerView};
use crate::dataplane::Handle;

/// Longest request head we read; anything longer is refused.
const MAX_REQUEST: usize = 8 << 10;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the device looks like at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The interface name.
    pub interface: String,
    /// The peers.
    pub peers: Vec<PeerView>,
    /// Drop counters.
    pub counters: Counters,
}

/// Serves metrics and health on `addr`; runs until the task is dropped.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(addr: SocketAddr, handle: Handle) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "metrics and health endpoint listening");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(respond(stream, handle.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, handle: Handle) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let request = String::from_utf8_lossy(&head);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match path {
        "/metrics" => match handle.snapshot().await {
            Ok(snapshot) => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&snapshot),
            ),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e:#}\n")),
        },
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/readyz" => match handle.snapshot().await {
            Ok(_) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e:#}\n")),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!(error = %e, "writing a metrics response");
    }
}

/// The Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let iface = &s.interface;
    let _ = writeln!(
        out,
        "# HELP wiremesh_drops_total Packets dropped by the agent, by reason.\n# TYPE wiremesh_drops_total counter"
    );
    for (reason, count) in s.counters.all_drops() {
        let _ = writeln!(
            out,
            "wiremesh_drops_total{{interface=\"{iface}\",reason=\"{reason}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP wiremesh_cookie_replies_total Cookie replies sent while under load.\n# TYPE wiremesh_cookie_replies_total counter\nwiremesh_cookie_replies_total{{interface=\"{iface}\"}} {}",
        s.counters.cookies_sent
    );
    let _ = writeln!(
        out,
        "# HELP wiremesh_peers Configured peers.\n# TYPE wiremesh_peers gauge\nwiremesh_peers{{interface=\"{iface}\"}} {}",
        s.peers.len()
    );
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&PeerView) -> Option<f64>,
    );
    let families: [Family; 4] = [
        (
            "wiremesh_peer_receive_bytes_total",
            "counter",
            "Bytes of WireGuard datagrams received from the peer.",
            |p| Some(p.rx_bytes as f64),
        ),
        (
            "wiremesh_peer_transmit_bytes_total",
            "counter",
            "Bytes of WireGuard datagrams sent to the peer.",
            |p| Some(p.tx_bytes as f64),
        ),
        (
            "wiremesh_peer_handshakes_total",
            "counter",
            "Handshake messages authenticated from the peer.",
            |p| Some(p.handshakes as f64),
        ),
        (
            "wiremesh_peer_last_handshake_age_seconds",
            "gauge",
            "Seconds since the current session's handshake.",
            |p| p.since_handshake.map(|d| d.as_secs_f64()),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for peer in &s.peers {
            if let Some(v) = value(peer) {
                let _ = writeln!(
                    out,
                    "{name}{{interface=\"{iface}\",peer=\"{}\"}} {v}",
                    peer.public_key
                );
            }
        }
    }
    out
}
