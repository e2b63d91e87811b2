//! `--plot FILE.svg`: p50, p99 and p99.9 over time per service, from the server's query API
//! (`query_range` of `histogram_quantile` over 10-second rates), one panel per service, on a
//! logarithmic latency axis.

use std::path::Path;
use std::time::SystemTime;

use plotters::prelude::*;

/// One line: (seconds since the start, latency in seconds).
type Points = Vec<(f64, f64)>;

const QUANTILES: [(f64, &str, RGBColor); 3] = [
    (0.5, "p50", RGBColor(60, 120, 200)),
    (0.99, "p99", RGBColor(230, 120, 30)),
    (0.999, "p99.9", RGBColor(200, 30, 40)),
];

/// Fetches the quantiles of `services` between `start` and `end` (1 s steps).
pub async fn fetch(
    http: &str,
    services: &[String],
    start: SystemTime,
    end: SystemTime,
) -> anyhow::Result<Vec<(String, Vec<(&'static str, Points)>)>> {
    let client = reqwest::Client::new();
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let (from, to) = (secs(start).floor(), secs(end).ceil());
    let mut out = Vec::new();
    for service in services {
        let mut lines = Vec::new();
        for (phi, name, _) in QUANTILES {
            let q = format!(
                "histogram_quantile({phi}, sum by (le) (rate(span_duration_seconds_bucket{{service=\"{service}\"}}[10s])))"
            );
            let form =
                [("query", q), ("start", from.to_string()), ("end", to.to_string()), ("step", "1".into())];
            let data = crate::run::api(&client, http, "/api/v1/query_range", &form).await?;
            let points: Points = data["result"][0]["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let t = p[0].as_f64()?;
                    let y: f64 = p[1].as_str()?.parse().ok()?;
                    (y.is_finite() && y > 0.0).then_some((t - from, y))
                })
                .collect();
            lines.push((name, points));
        }
        out.push((service.clone(), lines));
    }
    Ok(out)
}

/// Draws the panels into an SVG file.
pub fn draw(path: &Path, title: &str, data: &[(String, Vec<(&'static str, Points)>)]) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.extension().is_some_and(|e| e == "svg"),
        "--plot writes SVG: give a file name ending in .svg (convert to PNG with e.g. rsvg-convert)"
    );
    let all = data.iter().flat_map(|(_, l)| l.iter().flat_map(|(_, p)| p.iter()));
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_min = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min).max(1e-4) * 0.8;
    let y_max = all.map(|p| p.1).fold(0.0, f64::max).max(y_min * 10.0) * 1.25;
    let height = 60 + 260 * data.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|e| anyhow::anyhow!("{e}"))?;
    for ((service, lines), area) in data.iter().zip(root.split_evenly((data.len().max(1), 1))) {
        let mut chart = ChartBuilder::on(&area)
            .caption(service, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("latency")
            .y_labels(6)
            .light_line_style(WHITE)
            .y_label_formatter(&|v| {
                if *v >= 1.0 {
                    format!("{v:.1} s")
                } else {
                    format!("{:.0} ms", v * 1e3)
                }
            })
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, points) in lines {
            let color = QUANTILES.iter().find(|q| q.1 == *name).map_or(BLACK, |q| q.2);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
