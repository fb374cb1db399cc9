//! The comparison's results: medians per path, ratios, the printed table and the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use crate::compare::{Options, Sample, UDP_PAYLOAD, by_impl};
use crate::micro::Estimate;
use crate::stats::{median, min_max};
use crate::tools::first_line;
use crate::tunnel::Impl;

/// One column of the summary.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// JSON key, such as `tcp1_gbps`.
    pub key: &'static str,
    /// Chart title.
    pub title: &'static str,
    /// Table header.
    pub column: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// Whether more is better (throughput) or less (latency, CPU, memory).
    pub higher_is_better: bool,
    /// Digits after the point in tables.
    pub digits: usize,
    /// The value in one sample.
    pub value: fn(&Sample) -> Option<f64>,
}

/// The summary's columns, in table order.
pub const METRICS: [Metric; 10] = [
    Metric {
        key: "tcp1_gbps",
        column: "TCP1 Gb/s",
        title: "TCP, 1 flow",
        unit: "Gbit/s",
        higher_is_better: true,
        digits: 2,
        value: |s| s.tcp1_gbps,
    },
    Metric {
        key: "tcp4_gbps",
        column: "TCP4 Gb/s",
        title: "TCP, 4 flows",
        unit: "Gbit/s",
        higher_is_better: true,
        digits: 2,
        value: |s| s.tcp4_gbps,
    },
    Metric {
        key: "udp64_kpps",
        column: "UDP64 kpps",
        title: "UDP 64 B received",
        unit: "kpps",
        higher_is_better: true,
        digits: 0,
        value: |s| s.udp64_kpps,
    },
    Metric {
        key: "rtt_p50_ms",
        column: "RTT p50 ms",
        title: "RTT p50",
        unit: "ms",
        higher_is_better: false,
        digits: 3,
        value: |s| s.rtt_p50_ms,
    },
    Metric {
        key: "rtt_p99_ms",
        column: "RTT p99 ms",
        title: "RTT p99",
        unit: "ms",
        higher_is_better: false,
        digits: 3,
        value: |s| s.rtt_p99_ms,
    },
    Metric {
        key: "loaded_rtt_p50_ms",
        column: "loaded RTT p50 ms",
        title: "RTT p50 under one TCP flow",
        unit: "ms",
        higher_is_better: false,
        digits: 3,
        value: |s| s.loaded_rtt_p50_ms,
    },
    Metric {
        key: "loaded_rtt_p99_ms",
        column: "loaded RTT p99 ms",
        title: "RTT p99 under one TCP flow",
        unit: "ms",
        higher_is_better: false,
        digits: 3,
        value: |s| s.loaded_rtt_p99_ms,
    },
    Metric {
        key: "cpu_s_per_gbit",
        column: "CPU s/Gbit",
        title: "tunnel CPU per Gbit (TCP 1 flow)",
        unit: "CPU-s/Gbit",
        higher_is_better: false,
        digits: 2,
        value: |s| s.cpu_s_per_gbit,
    },
    Metric {
        key: "peak_rss_mib",
        column: "RSS MiB",
        title: "peak RSS per daemon",
        unit: "MiB",
        higher_is_better: false,
        digits: 1,
        value: |s| s.peak_rss_mib,
    },
    Metric {
        key: "machine_cpu_s_per_gbit",
        column: "machine CPU s/Gbit",
        title: "machine CPU per Gbit (TCP 1 flow)",
        unit: "CPU-s/Gbit",
        higher_is_better: false,
        digits: 2,
        value: |s| s.machine_cpu_s_per_gbit,
    },
];

/// The machine the run was on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPUs available.
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel: first_line("uname", &["-r"]),
        }
    }
}

/// Everything a comparison run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Start, Unix seconds.
    pub started_unix: u64,
    /// End, Unix seconds.
    pub finished_unix: u64,
    /// What was asked for.
    pub options: Options,
    /// Where it ran.
    pub machine: Machine,
    /// Program versions by implementation name.
    pub versions: BTreeMap<String, String>,
    /// Every path in every round.
    pub samples: Vec<Sample>,
    /// Criterion micro-benchmark estimates, when they were run.
    pub micro: Vec<Estimate>,
}

/// Medians (and ranges) of one path over the rounds.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The path.
    pub imp: Impl,
    /// Rounds in which every test of the path succeeded.
    pub clean_rounds: usize,
    /// Rounds attempted.
    pub rounds: usize,
    /// Median per metric key (`None` when no round measured it).
    pub medians: BTreeMap<&'static str, Option<f64>>,
    /// Smallest and largest value per metric key.
    pub ranges: BTreeMap<&'static str, Option<(f64, f64)>>,
}

impl Report {
    /// Medians per path, in round order.
    pub fn summaries(&self) -> Vec<Summary> {
        let groups = by_impl(&self.samples);
        self.options
            .impls
            .iter()
            .map(|imp| {
                let samples = groups.get(imp).cloned().unwrap_or_default();
                let mut medians = BTreeMap::new();
                let mut ranges = BTreeMap::new();
                for m in METRICS {
                    let values: Vec<f64> = samples.iter().filter_map(|s| (m.value)(s)).collect();
                    medians.insert(m.key, median(&values));
                    ranges.insert(m.key, min_max(&values));
                }
                Summary {
                    imp: *imp,
                    clean_rounds: samples.iter().filter(|s| s.errors.is_empty()).count(),
                    rounds: samples.len(),
                    medians,
                    ranges,
                }
            })
            .collect()
    }

    /// Wiremesh's median over another path's median, per metric; `None` where either is
    /// missing or the divisor is zero.
    pub fn ratios(&self) -> Vec<(Impl, BTreeMap<&'static str, Option<f64>>)> {
        let summaries = self.summaries();
        let Some(ours) = summaries.iter().find(|s| s.imp == Impl::Wiremesh) else {
            return Vec::new();
        };
        summaries
            .iter()
            .filter(|s| s.imp != Impl::Wiremesh)
            .map(|theirs| {
                let ratios = METRICS
                    .iter()
                    .map(|m| {
                        let ratio = match (ours.medians[m.key], theirs.medians[m.key]) {
                            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                            _ => None,
                        };
                        (m.key, ratio)
                    })
                    .collect();
                (theirs.imp, ratios)
            })
            .collect()
    }

    /// Reads a report back from its JSON (for drawing the chart again); the
    /// micro-benchmarks are left out.
    ///
    /// # Errors
    /// When a field the summary needs is missing or malformed.
    pub fn from_json(value: &Value) -> anyhow::Result<Report> {
        use anyhow::Context as _;
        let config = &value["config"];
        let u32_of = |v: &Value, key: &str| -> anyhow::Result<u32> {
            v[key]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("no {key}"))
        };
        let impls = config["order"]
            .as_array()
            .context("no config.order")?
            .iter()
            .map(|n| n.as_str().context("a name in config.order")?.parse())
            .collect::<anyhow::Result<Vec<Impl>>>()?;
        let f = |v: &Value, key: &str| v[key].as_f64();
        let samples = value["rounds"]
            .as_array()
            .context("no rounds")?
            .iter()
            .map(|r| -> anyhow::Result<Sample> {
                Ok(Sample {
                    round: u32_of(r, "round")?,
                    imp: Some(r["name"].as_str().context("a round has no name")?.parse()?),
                    setup_s: f(r, "setup_s"),
                    tcp1_gbps: f(r, "tcp1_gbps"),
                    tcp1_retransmits: r["tcp1_retransmits"].as_u64(),
                    tcp4_gbps: f(r, "tcp4_gbps"),
                    udp64_kpps: f(r, "udp64_kpps"),
                    udp64_sent_kpps: f(r, "udp64_sent_kpps"),
                    udp64_loss_pct: f(r, "udp64_loss_pct"),
                    rtt_p50_ms: f(r, "rtt_p50_ms"),
                    rtt_p99_ms: f(r, "rtt_p99_ms"),
                    loaded_rtt_p50_ms: f(r, "loaded_rtt_p50_ms"),
                    loaded_rtt_p99_ms: f(r, "loaded_rtt_p99_ms"),
                    cpu_s_per_gbit: f(r, "cpu_s_per_gbit"),
                    tcp4_cpu_s_per_gbit: f(r, "tcp4_cpu_s_per_gbit"),
                    machine_cpu_s_per_gbit: f(r, "machine_cpu_s_per_gbit"),
                    peak_rss_mib: f(r, "peak_rss_mib"),
                    errors: r["errors"]
                        .as_array()
                        .map(|e| {
                            e.iter()
                                .filter_map(|x| x.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect::<anyhow::Result<Vec<Sample>>>()?;
        let versions = value["versions"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let text = |v: &Value| v.as_str().unwrap_or("unknown").to_owned();
        Ok(Report {
            started_unix: value["started_unix"].as_u64().unwrap_or(0),
            finished_unix: value["finished_unix"].as_u64().unwrap_or(0),
            options: Options {
                rounds: u32_of(config, "rounds")?,
                tcp_secs: u32_of(config, "tcp_secs")?,
                udp_secs: u32_of(config, "udp_secs")?,
                ping_count: u32_of(config, "ping_count")?,
                impls,
            },
            machine: Machine {
                cpus: value["machine"]["cpus"].as_u64().unwrap_or(0) as usize,
                cpu_model: text(&value["machine"]["cpu_model"]),
                kernel: text(&value["machine"]["kernel"]),
            },
            versions,
            samples,
            micro: Vec::new(),
        })
    }

    /// The report as JSON (`bench/results/latest.json`).
    pub fn to_json(&self) -> Value {
        let mut summary = Map::new();
        for s in self.summaries() {
            let mut entry = Map::new();
            for m in METRICS {
                entry.insert(m.key.to_owned(), round_json(s.medians[m.key]));
            }
            let ranges: Map<String, Value> = METRICS
                .iter()
                .map(|m| {
                    let range = s.ranges[m.key]
                        .map_or(Value::Null, |(lo, hi)| json!([round4(lo), round4(hi)]));
                    (m.key.to_owned(), range)
                })
                .collect();
            entry.insert("range".to_owned(), Value::Object(ranges));
            entry.insert("rounds".to_owned(), json!(s.rounds));
            entry.insert("clean_rounds".to_owned(), json!(s.clean_rounds));
            summary.insert(s.imp.name().to_owned(), Value::Object(entry));
        }
        let mut ratios = Map::new();
        for (theirs, values) in self.ratios() {
            let values: Map<String, Value> = values
                .into_iter()
                .map(|(k, v)| (k.to_owned(), round_json(v)))
                .collect();
            ratios.insert(format!("wiremesh/{}", theirs.name()), Value::Object(values));
        }
        let rounds: Vec<Value> = self.samples.iter().map(sample_json).collect();
        let micro: Vec<Value> = self
            .micro
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "median_ns": round4(e.median_ns),
                    "throughput": e.throughput_text(),
                })
            })
            .collect();
        json!({
            "schema": 1,
            "started_unix": self.started_unix,
            "finished_unix": self.finished_unix,
            "machine": {
                "cpus": self.machine.cpus,
                "cpu_model": self.machine.cpu_model,
                "kernel": self.machine.kernel,
            },
            "config": {
                "rounds": self.options.rounds,
                "tcp_secs": self.options.tcp_secs,
                "udp_secs": self.options.udp_secs,
                "udp_payload_bytes": UDP_PAYLOAD,
                "ping_count": self.options.ping_count,
                "tunnel_mtu": crate::tunnel::TUNNEL_MTU.parse::<u32>().unwrap_or(0),
                "order": self.options.impls.iter().map(|i| i.name()).collect::<Vec<_>>(),
            },
            "versions": self.versions,
            "notes": {
                "summary": "medians over the rounds; range holds [min, max]",
                "ratios": "wiremesh median / other median: above 1 is better for tcp and udp, below 1 is better for rtt, cpu and memory",
                "wiremesh-translated": "wiremesh-agent up --translate on both ends (each pod range mapped to a 100.64.N.0/24 mesh range, issue 14); wiremesh/wiremesh-translated tcp1_gbps is the cost of translation (goal: at most 1.05)",
                "cpu_s_per_gbit": "CPU seconds (user+system, all threads) of both tunnel daemons during the 1-flow TCP test, per Gbit received; 0 for veth, which has no daemon",
                "machine_cpu_s_per_gbit": "busy CPU seconds of the whole machine during the 1-flow TCP test per Gbit: iperf3, kernel and daemons, and anything else running",
                "peak_rss_mib": "VmHWM of the larger of the two daemons at the end of the round; 0 for veth",
                "udp64_kpps": "64-byte UDP payloads sent by one thread of the benchmark in pod a as fast as send(2) goes, counted by one thread in pod b: thousands received per second (udp64_sent_kpps in rounds: sent)",
                "topology": "pod a -> host a -> underlay bridge -> host b -> pod b, every hop a veth in a network namespace; both tunnel ends, iperf3 and ping share this machine's CPUs",
            },
            "summary": summary,
            "ratios": ratios,
            "rounds": rounds,
            "micro": micro,
        })
    }

    /// The printed tables: medians, ratios, and the micro-benchmarks if present.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let summaries = self.summaries();
        let _ = writeln!(
            out,
            "\nWiremesh benchmark: medians over {} rounds ({} CPUs: {}; kernel {})",
            self.options.rounds, self.machine.cpus, self.machine.cpu_model, self.machine.kernel
        );
        let _ = writeln!(
            out,
            "Both tunnel ends, iperf3, the UDP sender and ping share this machine; TCP {} s, UDP {} s of {}-byte payloads, {} pings.\n\
             CPU s/Gbit: both tunnel daemons during TCP1; RSS: peak of the larger daemon; machine CPU: all CPUs busy per Gbit.\n",
            self.options.tcp_secs, self.options.udp_secs, UDP_PAYLOAD, self.options.ping_count
        );
        let mut header = vec!["path".to_owned()];
        header.extend(METRICS.iter().map(|m| m.column.to_owned()));
        header.push("rounds ok".to_owned());
        let mut rows = vec![header];
        for s in &summaries {
            let mut row = vec![s.imp.name().to_owned()];
            row.extend(METRICS.iter().map(|m| fmt(s.medians[m.key], m.digits)));
            row.push(format!("{}/{}", s.clean_rounds, s.rounds));
            rows.push(row);
        }
        out.push_str(&markdown(&rows));

        let ratios = self.ratios();
        if !ratios.is_empty() {
            let _ = writeln!(
                out,
                "\nWiremesh / other (higher is better for TCP and UDP, lower for RTT, CPU and memory)\n"
            );
            let mut header = vec!["wiremesh / ...".to_owned()];
            header.extend(METRICS.iter().map(|m| m.column.to_owned()));
            let mut rows = vec![header];
            for (theirs, values) in &ratios {
                let mut row = vec![theirs.name().to_owned()];
                row.extend(
                    METRICS.iter().map(|m| {
                        values[m.key].map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"))
                    }),
                );
                rows.push(row);
            }
            out.push_str(&markdown(&rows));
        }

        if !self.micro.is_empty() {
            let _ = writeln!(
                out,
                "\nMicro-benchmarks (criterion, median per operation)\n"
            );
            let mut rows = vec![vec![
                "benchmark".to_owned(),
                "time".to_owned(),
                "throughput".to_owned(),
            ]];
            for e in &self.micro {
                rows.push(vec![e.id.clone(), e.time_text(), e.throughput_text()]);
            }
            out.push_str(&markdown(&rows));
        }

        let failed: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| !s.errors.is_empty())
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(out, "\nErrors:");
            for s in failed {
                for e in &s.errors {
                    let first = e.lines().next().unwrap_or("");
                    let _ = writeln!(
                        out,
                        "  round {} {}: {first}",
                        s.round,
                        s.imp.map_or("?", Impl::name)
                    );
                }
            }
        }
        out
    }
}

fn sample_json(s: &Sample) -> Value {
    json!({
        "round": s.round,
        "name": s.imp.map_or("?", Impl::name),
        "setup_s": round_json(s.setup_s),
        "tcp1_gbps": round_json(s.tcp1_gbps),
        "tcp1_retransmits": s.tcp1_retransmits,
        "tcp4_gbps": round_json(s.tcp4_gbps),
        "udp64_kpps": round_json(s.udp64_kpps),
        "udp64_sent_kpps": round_json(s.udp64_sent_kpps),
        "udp64_loss_pct": round_json(s.udp64_loss_pct),
        "rtt_p50_ms": round_json(s.rtt_p50_ms),
        "rtt_p99_ms": round_json(s.rtt_p99_ms),
        "loaded_rtt_p50_ms": round_json(s.loaded_rtt_p50_ms),
        "loaded_rtt_p99_ms": round_json(s.loaded_rtt_p99_ms),
        "cpu_s_per_gbit": round_json(s.cpu_s_per_gbit),
        "tcp4_cpu_s_per_gbit": round_json(s.tcp4_cpu_s_per_gbit),
        "machine_cpu_s_per_gbit": round_json(s.machine_cpu_s_per_gbit),
        "peak_rss_mib": round_json(s.peak_rss_mib),
        "errors": s.errors,
    })
}

/// Four significant decimals are plenty for noisy measurements and keep the JSON short.
fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

fn round_json(v: Option<f64>) -> Value {
    v.filter(|v| v.is_finite())
        .map_or(Value::Null, |v| json!(round4(v)))
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// A Markdown table with padded columns (readable as plain text too).
pub fn markdown(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = (0..columns)
            .map(|c| {
                let cell = row.get(c).map_or("", String::as_str);
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(c, w)| {
                    if c == 0 {
                        "-".repeat(*w)
                    } else {
                        format!("{}:", "-".repeat(w.saturating_sub(1)))
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} |", rule.join(" | "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(imp: Impl, round: u32, tcp1: f64) -> Sample {
        Sample {
            round,
            imp: Some(imp),
            tcp1_gbps: Some(tcp1),
            rtt_p50_ms: Some(0.1 * f64::from(round)),
            ..Sample::default()
        }
    }

    fn report(samples: Vec<Sample>) -> Report {
        Report {
            started_unix: 0,
            finished_unix: 1,
            options: Options {
                rounds: 3,
                tcp_secs: 1,
                udp_secs: 1,
                ping_count: 10,
                impls: vec![Impl::Veth, Impl::Wiremesh, Impl::WireguardGoDebian],
            },
            machine: Machine {
                cpus: 2,
                cpu_model: "test".into(),
                kernel: "test".into(),
            },
            versions: BTreeMap::new(),
            samples,
            micro: Vec::new(),
        }
    }

    #[test]
    fn summary_holds_medians_and_ratios_for_every_name() {
        let mut samples = Vec::new();
        for round in 1..=3 {
            samples.push(sample(Impl::Veth, round, 10.0 + f64::from(round)));
            samples.push(sample(Impl::Wiremesh, round, 2.0 * f64::from(round)));
            samples.push(sample(Impl::WireguardGoDebian, round, 1.0));
        }
        let json = report(samples).to_json();
        assert_eq!(json["summary"]["veth"]["tcp1_gbps"], json!(12.0));
        assert_eq!(json["summary"]["wiremesh"]["tcp1_gbps"], json!(4.0));
        assert_eq!(
            json["summary"]["wiremesh"]["range"]["tcp1_gbps"],
            json!([2.0, 6.0])
        );
        assert_eq!(
            json["ratios"]["wiremesh/wireguard-go-debian"]["tcp1_gbps"],
            json!(4.0)
        );
        assert_eq!(json["ratios"]["wiremesh/veth"]["tcp1_gbps"], json!(0.3333));
        assert_eq!(json["summary"]["veth"]["udp64_kpps"], Value::Null);
        assert_eq!(json["rounds"].as_array().map(Vec::len), Some(9));
    }

    #[test]
    fn json_reads_back_into_the_same_summary() {
        let samples = vec![sample(Impl::Veth, 1, 10.0), sample(Impl::Wiremesh, 1, 1.5)];
        let original = report(samples);
        let back = Report::from_json(&original.to_json()).unwrap();
        assert_eq!(back.to_json()["summary"], original.to_json()["summary"]);
        assert_eq!(back.options.impls, original.options.impls);
    }

    #[test]
    fn table_lists_every_path_and_marks_missing_values() {
        let samples = vec![sample(Impl::Veth, 1, 10.0), sample(Impl::Wiremesh, 1, 1.0)];
        let table = report(samples).table();
        assert!(table.contains("| veth "), "{table}");
        assert!(table.contains("| wireguard-go-debian"), "{table}");
        assert!(table.contains("0.10x"), "{table}");
        assert!(table.contains(" - "), "{table}");
    }

    #[test]
    fn markdown_pads_columns() {
        let rows = vec![
            vec!["a".to_owned(), "long header".to_owned()],
            vec!["bbb".to_owned(), "1".to_owned()],
        ];
        let text = markdown(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "| a   | long header |");
        assert_eq!(lines[1], "| --- | ----------: |");
        assert_eq!(lines[2], "| bbb |           1 |");
    }
}
