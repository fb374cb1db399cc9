//! Reads what the criterion micro-benchmarks (`cargo bench -p wiremesh-bench`) left under
//! `target/criterion`, so the comparison's report carries them too.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// Results older than the newest by more than this belong to an earlier `cargo bench`
/// (a benchmark since renamed or removed) and are left out.
const SAME_RUN: Duration = Duration::from_secs(3600);

/// One benchmark's median.
#[derive(Debug, Clone)]
pub struct Estimate {
    /// Criterion's full id, such as `encapsulate/1420`.
    pub id: String,
    /// Median time per iteration in nanoseconds.
    pub median_ns: f64,
    /// Bytes per iteration, when the benchmark declares byte throughput.
    pub bytes: Option<u64>,
    /// Elements per iteration, when it declares element throughput.
    pub elements: Option<u64>,
    modified: SystemTime,
}

impl Estimate {
    /// The median as text with a fitting unit.
    pub fn time_text(&self) -> String {
        let ns = self.median_ns;
        if ns < 1e3 {
            format!("{ns:.1} ns")
        } else if ns < 1e6 {
            format!("{:.2} µs", ns / 1e3)
        } else {
            format!("{:.2} ms", ns / 1e6)
        }
    }

    /// Throughput as text (Gbit/s or million operations per second), or `-`.
    pub fn throughput_text(&self) -> String {
        let secs = self.median_ns * 1e-9;
        if secs <= 0.0 {
            return "-".to_owned();
        }
        if let Some(bytes) = self.bytes {
            format!("{:.2} Gbit/s", bytes as f64 * 8.0 / secs / 1e9)
        } else if let Some(elements) = self.elements {
            format!("{:.2} M/s", elements as f64 / secs / 1e6)
        } else {
            "-".to_owned()
        }
    }
}

/// Every estimate of the latest criterion run under `dir`, sorted by id; empty when
/// there is none.
pub fn read_estimates(dir: &Path) -> Vec<Estimate> {
    let mut found = Vec::new();
    collect(dir, 0, &mut found);
    let newest = found.iter().map(|e| e.modified).max();
    if let Some(newest) = newest {
        found.retain(|e| {
            newest
                .duration_since(e.modified)
                .is_ok_and(|age| age <= SAME_RUN)
        });
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

fn collect(dir: &Path, depth: usize, found: &mut Vec<Estimate>) {
    // group / function / parameter / new: four levels are enough.
    if depth > 5 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name();
        if name == "report" {
            continue;
        }
        if name == "new" {
            if let Some(e) = read_one(&path) {
                found.push(e);
            }
            continue;
        }
        collect(&path, depth + 1, found);
    }
}

fn read_one(dir: &Path) -> Option<Estimate> {
    let estimates_path: PathBuf = dir.join("estimates.json");
    let benchmark: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("benchmark.json")).ok()?).ok()?;
    let estimates: Value = serde_json::from_str(&fs::read_to_string(&estimates_path).ok()?).ok()?;
    let modified = fs::metadata(&estimates_path).ok()?.modified().ok()?;
    Some(Estimate {
        id: benchmark.get("full_id")?.as_str()?.to_owned(),
        median_ns: estimates.get("median")?.get("point_estimate")?.as_f64()?,
        bytes: benchmark
            .get("throughput")
            .and_then(|t| t.get("Bytes"))
            .and_then(Value::as_u64),
        elements: benchmark
            .get("throughput")
            .and_then(|t| t.get("Elements"))
            .and_then(Value::as_u64),
        modified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_layout() {
        let dir = std::env::temp_dir().join(format!("wm-micro-{}", std::process::id()));
        let new = dir.join("encapsulate/1420/new");
        fs::create_dir_all(&new).unwrap();
        fs::create_dir_all(dir.join("report")).unwrap();
        fs::write(
            new.join("benchmark.json"),
            r#"{"group_id":"encapsulate","function_id":null,"value_str":"1420","throughput":{"Bytes":1420},"full_id":"encapsulate/1420"}"#,
        )
        .unwrap();
        fs::write(
            new.join("estimates.json"),
            r#"{"median":{"point_estimate":1420.0}}"#,
        )
        .unwrap();
        let found = read_estimates(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "encapsulate/1420");
        assert_eq!(found[0].time_text(), "1.42 µs");
        assert_eq!(found[0].throughput_text(), "8.00 Gbit/s");
        assert!(read_estimates(Path::new("/nonexistent/criterion")).is_empty());
    }
}
