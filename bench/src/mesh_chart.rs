//! `mesh.json` as a PNG: one panel per figure, a bar per K × N step. Latency bars are the
//! p99 over the changes (time until every other cluster's MeshPeers show a change), with
//! a whisker from the p50 to the max.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde_json::Value;

/// Pixel size of the chart.
const SIZE: (u32, u32) = (1800, 1000);

/// One bar: its step label, value, and optional whisker.
type Bar = (String, f64, Option<(f64, f64)>);

/// Writes the chart of a `wiremesh-bench mesh` report to `path`.
///
/// # Errors
/// When the font cannot be loaded or the PNG cannot be written.
pub fn render(report: &Value, path: &Path) -> Result<()> {
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("loading the embedded DejaVu Sans font"))?;
    register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold())
        .map_err(|_| anyhow!("loading the embedded DejaVu Sans Bold font"))?;
    let empty = Vec::new();
    let steps = report["steps"].as_array().unwrap_or(&empty);
    let label = |s: &Value| format!("{}x{}", s["clusters"], s["nodes_per_cluster"]);
    let latency = |kind: &str| -> Vec<Bar> {
        steps
            .iter()
            .map(|s| {
                let f = &s["latency"][kind]["to_all"];
                let whisker = f["p50_s"].as_f64().zip(f["max_s"].as_f64());
                (label(s), f["p99_s"].as_f64().unwrap_or(0.0), whisker)
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
                (label(s), value, None)
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
        panel(area, title, unit, &bars, digits)?;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    unit: &str,
    bars: &[Bar],
    digits: usize,
) -> Result<()> {
    let top = bars
        .iter()
        .map(|(_, v, w)| w.map_or(*v, |(_, hi)| hi.max(*v)))
        .fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.18 } else { 1.0 };
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{title} ({unit})"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.clone()),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 15))
        .light_line_style(RGBColor(238, 238, 238))
        .y_label_style(("sans-serif", 14))
        .y_desc(unit)
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, value, _))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *value),
                ],
                RGBColor(214, 96, 32).filled(),
            );
            bar.set_margin(0, 0, 14, 14);
            bar
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, (_, _, w))| {
            w.map(|(lo, hi)| {
                PathElement::new(
                    vec![
                        (SegmentValue::CenterOf(i), lo),
                        (SegmentValue::CenterOf(i), hi),
                    ],
                    BLACK.stroke_width(2),
                )
            })
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, value, w))| {
            let at = w.map_or(*value, |(_, hi)| hi.max(*value));
            Text::new(
                format!("{value:.digits$}"),
                (SegmentValue::CenterOf(i), at + top * 0.02),
                ("sans-serif", 16).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    ),
                ),
            )
        }))
        .map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}
