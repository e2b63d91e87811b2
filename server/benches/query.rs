//! Query cost: `histogram_quantile(0.99, sum by (operation) (rate(…[5m])))` over a real RocksDB
//! store holding 24 h of 10-second windows for 100 series (compacted, as a settled store is),
//! for growing ranges and series counts.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_server::query::promql::{Engine, Limits, Steps, Value};
use tailscope_server::series::{SeriesLabels, Status};
use tailscope_server::store::RetentionConfig;
use tailscope_server::store::{EpochWrite, Resolution, Store, WindowDelta};
use tailscope_server::telemetry::Metrics;

const NOW: i64 = 1_800_000_000;
const SERIES: usize = 100;

fn populate(store: &Store) {
    let mut r = rand::rngs::StdRng::seed_from_u64(1);
    let labels: Vec<SeriesLabels> = (0..SERIES)
        .map(|i| SeriesLabels::new(format!("svc{}", i % 10), format!("op{}", i / 10), Status::Ok))
        .collect();
    let start = NOW - 86_400;
    for hour in 0..24 {
        let mut write = EpochWrite {
            series: labels.iter().map(|l| (l.id(), l.clone())).collect(),
            ..EpochWrite::default()
        };
        for w in (0..3600).step_by(10) {
            for l in &labels {
                let mut h = Histogram::new(Layout::default());
                for _ in 0..50 {
                    let z: f64 = r.gen_range(-2.5..2.5);
                    h.record((20e6 * (0.6 * z).exp()) as u64, 1);
                }
                write.windows.push(WindowDelta {
                    series: l.id(),
                    window_start: start + hour * 3600 + w,
                    histogram: h.to_bytes(),
                });
            }
        }
        store.write_epoch(&write).unwrap();
    }
    store.flush().unwrap();
    for res in Resolution::ALL {
        store.compact(res).unwrap();
    }
}

fn run(store: &Store, query: &str, range: i64, steps: i64) -> usize {
    let expr = promql_parser::parser::parse(query).unwrap();
    let step_ms = range * 1000 / steps;
    let steps = Steps::range((NOW - range) * 1000, NOW * 1000, step_ms, 11_000).unwrap();
    let retention = RetentionConfig::default();
    let limits = Limits {
        max_series: 50_000,
        max_points: 11_000,
        max_samples: usize::MAX,
        deadline: Instant::now() + Duration::from_secs(60),
    };
    match Engine::new(store, &steps, NOW, &retention, limits).eval(&expr).unwrap() {
        Value::Vector(v) => v.len(),
        _ => 0,
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Layout::default(), &Metrics::new()).unwrap();
    let started = Instant::now();
    populate(&store);
    println!("populated 24 h x {SERIES} series in {:.1} s", started.elapsed().as_secs_f64());

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("histogram_quantile 240 steps, 100 series");
    g.sample_size(10);
    for (name, range) in [("1h", 3600), ("6h", 6 * 3600), ("24h", 86_400)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), &range, |b, &range| {
            b.iter(|| {
                let n = run(
                    &store,
                    "histogram_quantile(0.99, sum by (operation) (rate(span_duration_seconds_bucket[5m])))",
                    range,
                    240,
                );
                assert_eq!(n, 10);
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("histogram_quantile 1h, 240 steps, by series count");
    g.sample_size(10);
    for ops in [1usize, 5, 10] {
        let query = format!(
            "histogram_quantile(0.99, sum by (operation) (rate(span_duration_seconds_bucket{{operation=~\"op[0-{}]\"}}[5m])))",
            ops - 1
        );
        g.bench_with_input(BenchmarkId::from_parameter(ops * 10), &query, |b, q| {
            b.iter(|| run(&store, q, 3600, 240))
        });
    }
    g.finish();
    c.final_summary();
}
