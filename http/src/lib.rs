//! The endpoint the agent and the controller share: `/metrics` in the OpenMetrics text
//! format, `/healthz` (the process answers) and `/readyz` (the component says it is ready).
//!
//! Not a general HTTP server: one `GET` per connection, answered and closed, which is all
//! Prometheus and the kubelet's probes need.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// The `Content-Type` of `/metrics`: what `prometheus_client::encoding::text` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Longest request head we read; anything longer is refused.
const MAX_REQUEST: usize = 8 << 10;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; later ones wait in the listen backlog until one ends (at
/// most [`READ_TIMEOUT`] for an idle one). Prometheus and the kubelet hold one or two.
pub const MAX_CONNECTIONS: usize = 32;

/// What the endpoint asks the component it serves.
pub trait Source: Send + Sync + 'static {
    /// The metrics exposition, gathered now (see [`encode`]); an `Err` is the body of a
    /// 503 when they cannot be gathered.
    fn metrics(&self) -> impl Future<Output = Result<String, String>> + Send;

    /// `Ok` when ready to serve; an `Err` says why not (the body of a 503).
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Serves `/metrics`, `/healthz` and `/readyz` from `source` on `listener` until the task
/// is dropped, one task per connection and at most [`MAX_CONNECTIONS`] at once.
pub async fn serve<S: Source>(listener: TcpListener, source: Arc<S>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics and health endpoint listening");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Never closed, so this cannot fail.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let source = Arc::clone(&source);
                tokio::spawn(async move {
                    respond(stream, source).await;
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The OpenMetrics text exposition of `registry`, `# EOF` included.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        warn!(error = %e, "encoding metrics");
    }
    out
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    Ready,
    NotFound,
    MethodNotAllowed,
}

/// Routes on the request line (`GET /metrics?x HTTP/1.1`); the query string is ignored.
fn route(head: &str) -> Route {
    let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
    let method = request_line.next().unwrap_or("");
    let path = request_line.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or(path);
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        _ => Route::NotFound,
    }
}

async fn respond<S: Source>(mut stream: TcpStream, source: Arc<S>) {
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
    let (status, content_type, body) = match route(&String::from_utf8_lossy(&head)) {
        Route::Metrics => match source.metrics().await {
            Ok(text) => ("200 OK", CONTENT_TYPE, text),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        Route::Health => ("200 OK", "text/plain", "ok\n".to_owned()),
        Route::Ready => match source.ready().await {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        Route::NotFound => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!(error = %e, "writing a metrics response");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn routes_by_method_and_path_ignoring_the_query() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(
            route("GET /metrics?name[]=x HTTP/1.1\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route("GET /healthz HTTP/1.0\r\n\r\n"), Route::Health);
        assert_eq!(route("GET /readyz HTTP/1.1\r\n\r\n"), Route::Ready);
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(""), Route::MethodNotAllowed);
    }

    struct Fake {
        ready: AtomicBool,
    }

    impl Source for Fake {
        async fn metrics(&self) -> Result<String, String> {
            let mut registry = Registry::default();
            let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
            counter.inc();
            registry.register("fake", "A counter", counter);
            Ok(encode(&registry))
        }

        async fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("caches not synced".to_owned())
            }
        }
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Arc::new(Fake {
            ready: AtomicBool::new(false),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&fake)));

        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")));
        assert!(metrics.contains("\nfake_total 1\n"), "{metrics}");
        assert!(metrics.ends_with("# EOF\n"), "{metrics}");
        assert!(
            get(addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503 "), "{not_ready}");
        assert!(not_ready.ends_with("not ready: caches not synced\n"));
        fake.ready.store(true, Ordering::Relaxed);
        assert!(
            get(addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404 "));
        server.abort();
    }

    #[tokio::test]
    async fn connections_over_the_bound_wait_until_one_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Arc::new(Fake {
            ready: AtomicBool::new(true),
        });
        let server = tokio::spawn(serve(listener, fake));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waiting = tokio::spawn(get(addr, "/healthz"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "served past the bound");
        drop(idle.pop());
        let answer = tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .expect("served once a connection ended")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        server.abort();
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
}
