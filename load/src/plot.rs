//! `--plot FILE.svg|FILE.png`: p50, p99 and p99.9 over time per service, from the server's
//! query API (`query_range` of `histogram_quantile` over 10-second rates), one panel per
//! service, on a logarithmic latency axis. Drawn as SVG; a `.png` is that SVG rasterised
//! (resvg), its text set in the system's fonts.

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
            let data = crate::api::api(&client, http, "/api/v1/query_range", &form).await?;
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

/// Draws the panels into `path`: SVG, or PNG when the name ends in `.png`.
pub fn draw(path: &Path, title: &str, data: &[(String, Vec<(&'static str, Points)>)]) -> anyhow::Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => std::fs::write(path, svg(title, data)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display())),
        Some("png") => png(path, &svg(title, data)?),
        _ => anyhow::bail!(
            "--plot writes SVG or PNG: give a file name ending in .svg or .png, not {}",
            path.display()
        ),
    }
}

/// Rasterises `svg` into a PNG at `path`, with text in the system's fonts.
fn png(path: &Path, svg: &str) -> anyhow::Result<()> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    // The chart asks for "sans-serif"; map it to a sans face this system has.
    let families: Vec<String> =
        fonts.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
    let sans = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "FreeSans", "Arial", "Helvetica"]
        .into_iter()
        .find(|want| families.iter().any(|f| f == want))
        .map(str::to_owned)
        .or_else(|| families.first().cloned());
    let Some(sans) = sans else {
        anyhow::bail!(
            "PNG output sets its text in the system's fonts and found none; install some (e.g. \
             Debian's fonts-dejavu-core) or write SVG"
        );
    };
    fonts.set_sans_serif_family(sans);
    let tree =
        usvg::Tree::from_str(svg, &options).map_err(|e| anyhow::anyhow!("cannot read the drawn SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow::anyhow!("cannot allocate a {}×{} image", size.width(), size.height()))?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.save_png(path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// The panels as an SVG document.
fn svg(title: &str, data: &[(String, Vec<(&'static str, Points)>)]) -> anyhow::Result<String> {
    let mut out = String::new();
    let all = data.iter().flat_map(|(_, l)| l.iter().flat_map(|(_, p)| p.iter()));
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_min = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min).max(1e-4) * 0.8;
    let y_max = all.map(|p| p.1).fold(0.0, f64::max).max(y_min * 10.0) * 1.25;
    let height = 60 + 260 * data.len().max(1) as u32;
    {
        let root = SVGBackend::with_string(&mut out, (900, height)).into_drawing_area();
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
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<(String, Vec<(&'static str, Points)>)> {
        let line =
            |base: f64| (0..60).map(|t| (f64::from(t), base * (1.0 + f64::from(t % 10) / 10.0))).collect();
        ["frontend", "payments"]
            .iter()
            .map(|s| (s.to_string(), vec![("p50", line(0.02)), ("p99", line(0.2)), ("p99.9", line(1.0))]))
            .collect()
    }

    #[test]
    fn a_png_has_the_panels_lines_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        draw(&path, "steady at 300 requests/s", &data()).unwrap();
        let png = resvg::tiny_skia::Pixmap::load_png(&path).unwrap();
        assert_eq!((png.width(), png.height()), (900, 60 + 2 * 260));
        let px = |x: u32, y: u32| png.pixel(x, y).unwrap();
        let count = |rows: std::ops::Range<u32>, f: &dyn Fn(u8, u8, u8) -> bool| {
            rows.flat_map(|y| (0..png.width()).map(move |x| (x, y)))
                .filter(|&(x, y)| {
                    let p = px(x, y);
                    f(p.red(), p.green(), p.blue())
                })
                .count()
        };
        // Each quantile's line is drawn in its colour (anti-aliased edges aside).
        for (_, _, c) in QUANTILES {
            let n = count(0..png.height(), &|r, g, b| (r, g, b) == (c.0, c.1, c.2));
            assert!(n > 200, "{n} pixels of {c:?}");
        }
        // The title is set in a real font: dark pixels in the top band, not an empty strip.
        let ink = count(0..40, &|r, g, b| r < 100 && g < 100 && b < 100);
        assert!(ink > 300, "{ink} dark pixels where the title is");
    }

    #[test]
    fn other_formats_are_refused_with_the_ones_there_are() {
        let e = draw(Path::new("chart.jpg"), "t", &data()).unwrap_err().to_string();
        assert!(e.contains(".svg or .png"), "{e}");
    }
}
