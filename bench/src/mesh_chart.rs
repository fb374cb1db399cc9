//! `mesh.json` as a PNG: one panel per figure, a bar per K × N step. Latency bars are the
//! p99 over the changes (time until every other cluster's MeshPeers show a change), with
//! a whisker from the p50 to the max.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

use crate::chart::{Bar, bar_panel, draw_error, register_fonts};

/// Pixel size of the chart.
const SIZE: (u32, u32) = (1800, 1000);

/// The color of every bar (Wiremesh's in the comparison chart).
const BAR_COLOR: RGBColor = RGBColor(214, 96, 32);

/// Writes the chart of a `wiremesh-bench mesh` report to `path`.
///
/// # Errors
/// When the font cannot be loaded or the PNG cannot be written.
pub fn render(report: &Value, path: &Path) -> Result<()> {
    register_fonts()?;
    let empty = Vec::new();
    let steps = report["steps"].as_array().unwrap_or(&empty);
    let label = |s: &Value| format!("{}x{}", s["clusters"], s["nodes_per_cluster"]);
    let latency = |kind: &str| -> Vec<Bar> {
        steps
            .iter()
            .map(|s| {
                let f = &s["latency"][kind]["to_all"];
                let whisker = f["p50_s"].as_f64().zip(f["max_s"].as_f64());
                Bar {
                    label: label(s),
                    color: BAR_COLOR,
                    value: f["p99_s"].as_f64().unwrap_or(0.0),
                    whisker,
                }
            })
            .collect()
    };
    let largest = |section: &str, list: &str, key: &str| -> Vec<Bar> {
        steps
            .iter()
            .map(|s| {
                let value = s[section][list]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .filter_map(|c| c[key].as_f64())
                    .fold(0.0, f64::max);
                Bar {
                    label: label(s),
                    color: BAR_COLOR,
                    value,
                    whisker: None,
                }
            })
            .collect()
    };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let title = format!(
        "Wiremesh mesh at scale: K clusters x N simulated nodes, real API servers and controllers ({} CPUs)",
        report["machine"]["cpus"]
    );
    let body = root
        .titled(
            &title,
            ("sans-serif", 28).into_font().style(FontStyle::Bold),
        )
        .map_err(draw_error)?;
    let panels = body.split_evenly((2, 3));
    let figures: [(&str, &str, Vec<Bar>, usize); 6] = [
        (
            "MeshNode created -> every MeshPeer, p99",
            "s",
            latency("create"),
            2,
        ),
        (
            "key changed -> every MeshPeer, p99",
            "s",
            latency("key_change"),
            2,
        ),
        (
            "MeshNode deleted -> every MeshPeer gone, p99",
            "s",
            latency("delete"),
            2,
        ),
        (
            "largest controller RSS, steady",
            "MiB",
            largest("steady", "controllers", "rss_mib"),
            1,
        ),
        (
            "busiest controller CPU, steady",
            "cores",
            largest("steady", "controllers", "cpu_cores"),
            3,
        ),
        (
            "busiest API server, requests, steady",
            "req/s",
            largest("steady", "apiservers", "requests_per_s"),
            1,
        ),
    ];
    for (area, (title, unit, bars, digits)) in panels.iter().zip(figures) {
        bar_panel(
            area,
            (&format!("{title} ({unit})"), 20),
            unit,
            &bars,
            digits,
        )?;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_mesh_report_renders_a_png_of_the_chart_size() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/results/mesh.json"))
                .unwrap();
        let report: Value = serde_json::from_str(&text).unwrap();
        let path = std::env::temp_dir().join(format!("wm-mesh-chart-{}.png", std::process::id()));
        render(&report, &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // The PNG signature, then the IHDR chunk's width and height.
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let dim = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
        assert_eq!((dim(16), dim(20)), SIZE);
    }
}
