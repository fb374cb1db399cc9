//! The agent's metrics and health endpoint against real agents in network namespaces (needs
//! root): a transfer shows on its peer's counters and on no other peer's, a bad datagram on
//! a drop reason, and in Kubernetes mode each peer is labelled with its cluster and node;
//! there a real Prometheus scrapes every agent and controller as the chart advertises and
//! answers every query of the Grafana dashboard.

// The tests print what they measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::clusters::{TwoClusters, wait_for};
use wiremesh_lab::mesh::{METRICS, Node, eventually, http_get, http_response, in_netns};
use wiremesh_lab::metrics::Exposition;
use wiremesh_lab::prometheus::{self, PodTarget, Prometheus};
use wiremesh_lab::{Lab, MIB, Netns, ping, transfer};

/// What the transfers move: a few MiB, checksummed by wm-xfer.
const SIZE: u64 = 8 * MIB;
/// The lab's MTU: one WireGuard datagram carries at most this many bytes of the transfer,
/// so a transfer of `SIZE` takes at least `SIZE / MTU` datagrams.
const MTU: u64 = 1420;

const PEER_COUNTERS: [&str; 4] = [
    "wiremesh_peer_receive_bytes_total",
    "wiremesh_peer_transmit_bytes_total",
    "wiremesh_peer_receive_packets_total",
    "wiremesh_peer_transmit_packets_total",
];

/// How much a per-peer counter rose between two scrapes.
fn rise(before: &Exposition, after: &Exposition, name: &str, peer: &str) -> Result<f64> {
    let labels = [("interface", "wm0"), ("peer", peer)];
    Ok(after.value(name, &labels)? - before.value(name, &labels)?)
}

#[test]
fn a_transfer_counts_on_its_peer_only_and_a_bad_datagram_on_its_drop_reason() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    // c runs no agent: a knows it as a peer that never sends or receives anything.
    let c = Node::new(&lab, "c", 3)?;
    a.start(&[b.as_peer(true), c.as_peer(true)])?;
    b.start(&[a.as_peer(true)])?;
    ping(&a.pod, b.pod.ip(), 1)?;

    let (head, _) = http_response(&a.host, METRICS, "/metrics")?;
    ensure!(
        head.lines().any(
            |l| l == "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        ),
        "{head}"
    );
    ensure!(http_get(&a.host, METRICS, "/readyz")? == "ok\n");
    ensure!(http_get(&a.host, METRICS, "/healthz")? == "ok\n");

    let (a0, b0) = (a.scrape()?, b.scrape()?);
    // Scrapes from the start of the transfer to its end: each must parse, and the counter
    // never goes down.
    let stop = Arc::new(AtomicBool::new(false));
    let (scraped_tx, scraped) = mpsc::channel();
    let scraper = {
        let stop = Arc::clone(&stop);
        let host: Netns = (*a.host).clone();
        let peer = b.keys.public.clone();
        std::thread::spawn(move || -> Result<()> {
            loop {
                let text = http_get(&host, METRICS, "/metrics")?;
                let e: Exposition = text.parse()?;
                let sent = e.value(
                    "wiremesh_peer_transmit_bytes_total",
                    &[("peer", peer.as_str())],
                )?;
                let _ = scraped_tx.send(sent);
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let report = transfer(&a.pod, b.pod.ip(), SIZE);
    stop.store(true, Ordering::Relaxed);
    scraper
        .join()
        .map_err(|_| anyhow::anyhow!("the scraper panicked"))??;
    let report = report?;
    // Scrapes share a data-plane snapshot for up to a second: let it expire, so these two
    // are taken after the transfer.
    std::thread::sleep(Duration::from_millis(1100));
    let (a1, b1) = (a.scrape()?, b.scrape()?);
    let to_b = [("peer", b.keys.public.as_str())];
    let mut during: Vec<f64> = vec![a0.value("wiremesh_peer_transmit_bytes_total", &to_b)?];
    during.extend(scraped.try_iter());
    during.push(a1.value("wiremesh_peer_transmit_bytes_total", &to_b)?);
    ensure!(
        during.windows(2).all(|w| w[0] <= w[1]),
        "a counter went down: {during:?}"
    );
    println!(
        "{} MiB a->b at {:.0} Mbit/s, {} scrapes while it ran",
        SIZE / MIB,
        report.mbit_per_s(),
        during.len() - 2
    );

    // On a, the transfer went out to b; on b, it came in from a.
    let (to_b, from_a) = (b.keys.public.as_str(), a.keys.public.as_str());
    let sent = rise(&a0, &a1, "wiremesh_peer_transmit_bytes_total", to_b)?;
    let received = rise(&b0, &b1, "wiremesh_peer_receive_bytes_total", from_a)?;
    let sent_packets = rise(&a0, &a1, "wiremesh_peer_transmit_packets_total", to_b)?;
    let received_packets = rise(&b0, &b1, "wiremesh_peer_receive_packets_total", from_a)?;
    println!(
        "a->b: {sent} bytes in {sent_packets} datagrams sent, {received} bytes in {received_packets} received"
    );
    let (size, min_packets) = (SIZE as f64, (SIZE / MTU) as f64);
    ensure!(sent >= size, "a sent {sent} bytes to b, < {SIZE}");
    ensure!(
        received >= size,
        "b received {received} bytes from a, < {SIZE}"
    );
    ensure!(
        sent_packets >= min_packets,
        "a sent {sent_packets} datagrams"
    );
    ensure!(
        received_packets >= min_packets,
        "b received {received_packets} datagrams"
    );
    // The acknowledgements came back to a from b: counted, but far less than the data.
    let acks = rise(&a0, &a1, "wiremesh_peer_receive_bytes_total", to_b)?;
    ensure!(
        acks > 0.0 && acks < size / 2.0,
        "a received {acks} bytes from b"
    );

    // c saw nothing: present, unchanged, no session.
    let c_key = c.keys.public.as_str();
    for name in PEER_COUNTERS {
        ensure!(a1.value(name, &[("peer", c_key)])? == 0.0, "{name} of c");
    }
    let age = "wiremesh_peer_last_handshake_age_seconds";
    ensure!(a1.matching(age, &[("peer", c_key)]).is_empty());
    let b_age = a1.value(age, &[("peer", to_b)])?;
    ensure!((0.0..180.0).contains(&b_age), "handshake age {b_age}");
    ensure!(a1.value("wiremesh_peer_handshakes_total", &[("peer", to_b)])? >= 1.0);
    // Standalone mode knows no peer cluster or node: the labels are there, empty.
    let sample = a1.sample("wiremesh_peer_transmit_bytes_total", &[("peer", to_b)])?;
    ensure!(
        sample.labels.get("peer_cluster").map(String::as_str) == Some("")
            && sample.labels.get("peer_node").map(String::as_str) == Some(""),
        "{sample:?}"
    );
    ensure!(a1.value("wiremesh_peers", &[("interface", "wm0")])? == 2.0);
    ensure!(a1.value("wiremesh_live_tunnels", &[("interface", "wm0")])? == 1.0);
    ensure!(a1.types.get("wiremesh_drops").map(String::as_str) == Some("counter"));

    // A datagram that is no WireGuard message, from c's namespace to a's port.
    let bad_packet = [("interface", "wm0"), ("reason", "bad_packet")];
    let before = a1.value("wiremesh_drops_total", &bad_packet)?;
    let to = a.endpoint();
    in_netns(&c.host, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.send_to(b"\x01\x00not a handshake", to)?;
        Ok(())
    })?;
    let after = eventually(Duration::from_secs(5), || {
        let after = a.metric("wiremesh_drops_total", &bad_packet)?;
        ensure!(after > before, "bad_packet still {after}");
        Ok(after)
    })?;
    println!("bad_packet drops {before} -> {after}");
    ensure!(http_get(&a.host, METRICS, "/readyz")? == "ok\n");

    // Every agent metric the Grafana dashboard queries is one an agent serves.
    let served: BTreeSet<&str> = a1.samples.iter().map(|s| s.name.as_str()).collect();
    let queried = dashboard_metrics()?;
    let missing: Vec<&String> = queried
        .iter()
        .filter(|n| !n.starts_with("wiremesh_controller_") && !served.contains(n.as_str()))
        .collect();
    ensure!(missing.is_empty(), "the dashboard queries {missing:?}");
    Ok(())
}

#[test]
fn the_dashboard_queries_only_controller_metrics_the_controller_serves() -> Result<()> {
    let metrics = wiremesh_controller::metrics::Metrics::new();
    metrics.run("sync", Duration::from_millis(5), Some("apply"));
    metrics.peer("cluster-b", Some(2), false, Some(1));
    metrics.set_leading(true);
    let served: Exposition = metrics.render().parse()?;
    let served: BTreeSet<&str> = served.samples.iter().map(|s| s.name.as_str()).collect();
    let queried = dashboard_metrics()?;
    let controller: Vec<&String> = queried
        .iter()
        .filter(|n| n.starts_with("wiremesh_controller_"))
        .collect();
    ensure!(controller.len() >= 5, "{controller:?}");
    let missing: Vec<&&String> = controller
        .iter()
        .filter(|n| !served.contains(n.as_str()))
        .collect();
    ensure!(missing.is_empty(), "the dashboard queries {missing:?}");
    Ok(())
}

/// The Grafana dashboard.
fn dashboard() -> Result<serde_json::Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/wiremesh-dashboard.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).context("the dashboard is not JSON")
}

/// Every panel query of the dashboard: (panel title, PromQL with Grafana's variables).
fn panel_queries(dashboard: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((title.to_owned(), expr.to_owned()));
            }
        }
    }
    Ok(queries)
}

/// The dashboard's variables: (name, `label_values(...)` definition).
fn variables(dashboard: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .context("no variables")?
    {
        let name = variable["name"]
            .as_str()
            .context("a variable without a name")?;
        let definition = variable["definition"]
            .as_str()
            .with_context(|| format!("variable {name} has no definition"))?;
        out.push((name.to_owned(), definition.to_owned()));
    }
    Ok(out)
}

/// The metric names in the Grafana dashboard's queries and variables.
fn dashboard_metrics() -> Result<BTreeSet<String>> {
    let dashboard = dashboard()?;
    let mut queries: Vec<String> = panel_queries(&dashboard)?
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    queries.extend(variables(&dashboard)?.into_iter().map(|(_, d)| d));
    let mut names = BTreeSet::new();
    for query in queries {
        for (start, _) in query.match_indices("wiremesh_") {
            let name: String = query[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    Ok(names)
}

/// The monitoring host on the underlay where Prometheus runs (no node of the lab uses
/// 198.18.0.0/24), and the pod range its unused pod bridge takes.
const MONITOR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
const MONITOR_PODS: &str = "10.9.0.0/24";
/// What the dashboard's `$__rate_interval` and `$__range` become: windows that hold the
/// whole test at one scrape a second.
const RATE_INTERVAL: &str = "30s";
const RANGE: &str = "5m";

#[test]
fn in_kubernetes_mode_peers_are_labelled_and_prometheus_answers_every_dashboard_query() -> Result<()>
{
    let started = Instant::now();
    let lab = TwoClusters::new(1)?;
    let (a1, b1) = (lab.a.node("a1")?, lab.b.node("b1")?);

    // Prometheus on a monitoring host of the underlay, routed to each node's pods (where
    // the controllers run), scraping every agent and controller pod as the chart's
    // annotations say.
    let monitor = lab.lab.add_host("mon", MONITOR_IP, MONITOR_PODS)?;
    let mut pods = Vec::new();
    for node in lab.all_nodes() {
        monitor.add_route_via(&node.pod_cidr(), node.host.underlay_ip())?;
        pods.push(PodTarget {
            workload: ("DaemonSet", "wiremesh-agent"),
            pod: format!("wiremesh-agent-{}", node.name),
            node: node.name.clone(),
            ip: node.host.underlay_ip().into(),
            cluster: node.side.name().to_owned(),
        });
    }
    for cluster in [&lab.a, &lab.b] {
        for controller in &cluster.controllers {
            pods.push(PodTarget {
                workload: ("Deployment", "wiremesh-controller"),
                pod: controller.name.clone(),
                node: controller.pod.host_name().to_owned(),
                ip: controller.pod.ip().into(),
                cluster: cluster.side.name().to_owned(),
            });
        }
    }
    let prometheus = Prometheus::start(
        &monitor,
        &lab.lab.dir().join("prometheus"),
        &prometheus::config(&pods)?,
    )?;

    lab.join()?;
    wait_for(Duration::from_secs(45), || ping(&a1.pod, b1.pod.ip(), 1))?;
    let scrape = || -> Result<Exposition> {
        http_get(&a1.host, METRICS, "/metrics")?
            .parse()
            .context("parsing a1's metrics")
    };
    let peer = [
        ("peer_cluster", "cluster-b"),
        ("peer_node", b1.name.as_str()),
    ];
    // Every target up (scraped at least once) before anything is counted.
    wait_for(Duration::from_secs(20), || {
        let targets = prometheus.targets()?;
        let up: Vec<&serde_json::Value> = targets.iter().filter(|t| t["health"] == "up").collect();
        ensure!(
            up.len() == pods.len() && targets.len() == pods.len(),
            "{} of {} targets up: {targets:#?}",
            up.len(),
            pods.len()
        );
        Ok(())
    })
    .with_context(|| prometheus.log())?;
    // A datagram that is no WireGuard message, for the dashboard's drops by reason.
    // 51820: the chart's agent.listenPort.
    let to = SocketAddr::new(a1.host.underlay_ip().into(), 51820);
    in_netns(&monitor, move || {
        UdpSocket::bind("0.0.0.0:0")?.send_to(b"\x01\x00not a handshake", to)?;
        Ok(())
    })?;
    let before = scrape()?.value("wiremesh_peer_transmit_bytes_total", &peer)?;
    transfer(&a1.pod, b1.pod.ip(), SIZE)?;
    // Scrapes share a snapshot for up to a second: wait for one taken after the transfer.
    let mut after = scrape()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while after.value("wiremesh_peer_transmit_bytes_total", &peer)? - before < SIZE as f64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        after = scrape()?;
    }
    let sent = after.value("wiremesh_peer_transmit_bytes_total", &peer)? - before;
    ensure!(sent >= SIZE as f64, "a1 sent {sent} bytes to cluster-b/b1");
    let sample = after.sample("wiremesh_peer_transmit_bytes_total", &peer)?;
    println!("{sample:?}");
    ensure!(http_get(&a1.host, METRICS, "/readyz")? == "ok\n");

    // A scrape after the transfer in.
    std::thread::sleep(3 * prometheus::SCRAPE_INTERVAL);
    let up = prometheus.query("up")?;
    for series in &up {
        println!(
            "up{{cluster={:?}, pod={:?}, node={:?}, instance={:?}}} = {}",
            series.label("cluster"),
            series.label("pod"),
            series.label("node"),
            series.label("instance"),
            series.value
        );
    }
    ensure!(up.len() == pods.len() && up.iter().all(|s| s.value == 1.0));
    for pod in &pods {
        ensure!(
            up.iter().any(|s| s.label("pod") == pod.pod
                && s.label("cluster") == pod.cluster
                && s.label("namespace") == "wiremesh-system"),
            "no up series for {pod:?}"
        );
    }

    // The variables as Grafana finds them, then every panel's query with them.
    let dashboard = dashboard()?;
    let mut substitutions = vec![
        ("$__rate_interval".to_owned(), RATE_INTERVAL.to_owned()),
        ("$__range".to_owned(), RANGE.to_owned()),
    ];
    for (name, definition) in variables(&dashboard)? {
        let definition = substitute(&definition, &substitutions);
        let (selector, label) = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .and_then(|d| d.rsplit_once(','))
            .with_context(|| format!("variable {name}: {definition}"))?;
        let values = prometheus.label_values(selector.trim(), label.trim())?;
        println!("${name} = {values:?}");
        let expected: &[&str] = match name.as_str() {
            "peer_cluster" => &["cluster-a", "cluster-b"],
            "peer_node" => &["a1", "b1"],
            _ => &[],
        };
        ensure!(values == expected, "${name}: {values:?}");
        substitutions.push((format!("${name}"), values.join("|")));
    }
    let failures = prometheus.query("wiremesh_controller_failures_total")?;
    let queries = panel_queries(&dashboard)?;
    for (title, query) in &queries {
        let promql = substitute(query, &substitutions);
        let result = prometheus
            .query(&promql)
            .with_context(|| format!("panel {title:?}: {promql}"))?;
        println!("{title}: {query}: {} series", result.len());
        // The one panel that shows only failures stays empty while nothing fails.
        if result.is_empty() && query.contains("wiremesh_controller_failures_total") {
            ensure!(
                failures.is_empty(),
                "panel {title:?} is empty although a controller failed: {failures:?}"
            );
            continue;
        }
        ensure!(!result.is_empty(), "panel {title:?}: {promql} has no data");
        // Whatever a query groups by, each series has.
        for label in grouped_by(query) {
            ensure!(
                result.iter().all(|s| !s.label(&label).is_empty()),
                "panel {title:?}: a series without {label}: {result:?}"
            );
        }
    }
    // The transfer shows on cluster-a's throughput to cluster-b/b1.
    let sent = prometheus.query(&format!(
        "sum by (peer_cluster, peer_node) (rate(wiremesh_peer_transmit_bytes_total{{cluster=\"cluster-a\"}}[{RATE_INTERVAL}]))"
    ))?;
    ensure!(
        sent.iter().any(|s| s.label("peer_cluster") == "cluster-b"
            && s.label("peer_node") == "b1"
            && s.value > 0.0),
        "{sent:?}"
    );
    println!(
        "{} targets up, {} dashboard queries answered, in {:.1} s",
        up.len(),
        queries.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `query` with each `(variable, value)` of `substitutions` put in.
fn substitute(query: &str, substitutions: &[(String, String)]) -> String {
    let mut out = query.to_owned();
    // Longer names first, so `$peer_node` is not taken for `$peer` and a suffix.
    let mut sorted: Vec<&(String, String)> = substitutions.iter().collect();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in sorted {
        out = out.replace(name.as_str(), value);
    }
    out
}

/// The labels the result of `query` is grouped by: those of its outermost `by (...)`
/// (inside `histogram_quantile`, without `le`); none when an aggregation without `by`
/// encloses it.
fn grouped_by(query: &str) -> Vec<String> {
    let Some(start) = query.find("by (") else {
        return Vec::new();
    };
    let prefix = &query[..start];
    let enclosing = usize::from(prefix.starts_with("histogram_quantile("));
    if prefix.matches('(').count() > enclosing {
        return Vec::new();
    }
    let rest = &query[start + 4..];
    let Some((list, _)) = rest.split_once(')') else {
        return Vec::new();
    };
    list.split(',')
        .map(|l| l.trim().to_owned())
        .filter(|l| l != "le")
        .collect()
}
