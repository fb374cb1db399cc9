//! The comparison as a PNG bar chart: one panel per metric, a bar per path (the median)
//! with a whisker from the smallest to the largest round. The font is compiled in, so no
//! system fonts are needed.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::report::{METRICS, Metric, Report, Summary};
use crate::tunnel::Impl;

/// Pixel size of the chart.
const SIZE: (u32, u32) = (1800, 1000);

/// The metrics drawn, by key (the machine-wide CPU is in the table only).
const PANELS: [&str; 6] = [
    "tcp1_gbps",
    "tcp4_gbps",
    "udp64_kpps",
    "rtt_p50_ms",
    "cpu_s_per_gbit",
    "peak_rss_mib",
];

/// Writes the chart of `report` to `path`.
///
/// # Errors
/// When the font cannot be loaded or the PNG cannot be written.
pub fn render(report: &Report, path: &Path) -> Result<()> {
    register_fonts()?;
    let summaries = report.summaries();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let title = format!(
        "Wiremesh vs. peers: median of {} rounds, whiskers min to max ({} CPUs, both ends on one machine)",
        report.options.rounds, report.machine.cpus
    );
    let body = root
        .titled(
            &title,
            ("sans-serif", 30).into_font().style(FontStyle::Bold),
        )
        .map_err(draw_error)?;
    let panels = body.split_evenly((2, 3));
    for (area, key) in panels.iter().zip(PANELS) {
        let Some(metric) = METRICS.iter().find(|m| m.key == key) else {
            continue;
        };
        panel(area, metric, &summaries)?;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    metric: &Metric,
    summaries: &[Summary],
) -> Result<()> {
    // A bar per path: the median, a whisker over the rounds.
    let bars: Vec<Bar> = summaries
        .iter()
        .map(|s| Bar {
            label: short(s.imp),
            color: color(s.imp),
            value: s.medians[metric.key].unwrap_or(0.0),
            whisker: s.ranges[metric.key],
        })
        .collect();
    let better = if metric.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let caption = format!("{} ({}), {better}", metric.title, metric.unit);
    bar_panel(area, (&caption, 21), metric.unit, &bars, metric.digits)
}

/// The embedded DejaVu Sans, as `sans-serif` (no system fonts needed).
///
/// # Errors
/// When a font cannot be loaded.
pub(crate) fn register_fonts() -> Result<()> {
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("loading the embedded DejaVu Sans font"))?;
    register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold())
        .map_err(|_| anyhow!("loading the embedded DejaVu Sans Bold font"))?;
    Ok(())
}

/// One bar of a [`bar_panel`].
pub(crate) struct Bar {
    /// Under the bar.
    pub(crate) label: String,
    pub(crate) color: RGBColor,
    pub(crate) value: f64,
    /// From, to.
    pub(crate) whisker: Option<(f64, f64)>,
}

/// A panel of `bars` under `caption` (text, font size), the y axis in `unit`, each value
/// printed above its bar with `digits` decimals.
///
/// # Errors
/// When drawing fails.
pub(crate) fn bar_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: (&str, u32),
    unit: &str,
    bars: &[Bar],
    digits: usize,
) -> Result<()> {
    let top = bars
        .iter()
        .map(|b| b.whisker.map_or(b.value, |(_, hi)| hi.max(b.value)))
        .fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.18 } else { 1.0 };
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption.0, ("sans-serif", caption.1))
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
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.label.clone()),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 15))
        .light_line_style(RGBColor(238, 238, 238))
        .y_label_style(("sans-serif", 14))
        .y_desc(unit)
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), b.value),
                ],
                b.color.filled(),
            );
            bar.set_margin(0, 0, 14, 14);
            bar
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            b.whisker.map(|(lo, hi)| {
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
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let label_at = b.whisker.map_or(b.value, |(_, hi)| hi.max(b.value));
            Text::new(
                format!("{:.digits$}", b.value),
                (SegmentValue::CenterOf(i), label_at + top * 0.02),
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

/// Short names that fit under a bar.
fn short(imp: Impl) -> String {
    match imp {
        Impl::Veth => "veth",
        Impl::Wiremesh => "wiremesh",
        Impl::WireguardGoDebian => "wg-go deb",
        Impl::WireguardGoLatest => "wg-go new",
        Impl::BoringtunCli => "boringtun",
        Impl::WiremeshBase => "wiremesh base",
        Impl::WiremeshTranslated => "wm transl.",
    }
    .to_owned()
}

fn color(imp: Impl) -> RGBColor {
    match imp {
        Impl::Veth => RGBColor(150, 150, 150),
        Impl::Wiremesh => RGBColor(214, 96, 32),
        Impl::WireguardGoDebian => RGBColor(120, 160, 210),
        Impl::WireguardGoLatest => RGBColor(40, 90, 170),
        Impl::BoringtunCli => RGBColor(90, 160, 90),
        Impl::WiremeshBase => RGBColor(240, 170, 120),
        Impl::WiremeshTranslated => RGBColor(170, 60, 20),
    }
}

pub(crate) fn draw_error<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}
