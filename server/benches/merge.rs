//! Histogram hot paths: recording, encoding, and the RocksDB merge operator's cost per operand;
//! plus (printed once, not timed) the settled disk bytes per series-window.
#![allow(clippy::unwrap_used)]

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_server::store::{merge_values, EpochWrite, Resolution, Store, WindowDelta};
use tailscope_server::telemetry::Metrics;

/// A histogram of `n` lognormal latencies around 20 ms, as one flush epoch of a busy series has.
fn realistic(n: usize, seed: u64) -> Histogram {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut h = Histogram::new(Layout::default());
    for _ in 0..n {
        let z: f64 = r.gen_range(-3.0..3.0);
        h.record((20e6 * (0.8 * z).exp()) as u64, 1);
    }
    h
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    let mut h = Histogram::new(Layout::default());
    let mut v = 1_234_567u64;
    g.bench_function("one span", |b| {
        b.iter(|| {
            v = v.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 28;
            h.record(black_box(v), 1);
        })
    });
    g.finish();

    let one = realistic(1000, 1);
    c.bench_function("encode 1000-span histogram", |b| b.iter(|| black_box(one.to_bytes())));

    let mut g = c.benchmark_group("merge operator");
    for operands in [2usize, 10, 100] {
        let values: Vec<Vec<u8>> = (0..operands).map(|i| realistic(1000, i as u64).to_bytes()).collect();
        g.throughput(Throughput::Elements(operands as u64));
        g.bench_with_input(BenchmarkId::from_parameter(operands), &values, |b, values| {
            b.iter(|| black_box(merge_values(Layout::default(), values.iter().map(|v| v.as_slice()), || {})))
        });
    }
    g.finish();
}

/// Writes 1,000 series × 360 windows of 100 spans each, compacts, and prints the bytes per
/// series-window of the 10-second column family.
fn disk_bytes_per_series_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Layout::default(), &Metrics::new()).unwrap();
    let t0 = 1_800_000_000;
    let (series, windows) = (1_000u64, 360i64);
    for w in 0..windows {
        let write = EpochWrite {
            windows: (0..series)
                .map(|s| WindowDelta {
                    series: s * 0x9E37_79B9_7F4A_7C15,
                    window_start: t0 + w * 10,
                    histogram: realistic(100, s ^ w as u64).to_bytes(),
                })
                .collect(),
            ..EpochWrite::default()
        };
        store.write_epoch(&write).unwrap();
    }
    store.flush().unwrap();
    for res in Resolution::ALL {
        store.compact(res).unwrap();
    }
    for (cf, bytes) in store.sizes() {
        let n = match cf {
            "win_10s" => series * windows as u64,
            "win_1m" => series * (windows as u64 / 6),
            "win_1h" => series,
            _ => continue,
        };
        println!(
            "disk: {cf}: {bytes} bytes for {n} series-windows of 100 lognormal spans = {:.1} bytes each",
            bytes as f64 / n as f64
        );
    }
}

/// Prints the heap held by one series' histogram for one flush epoch (what a shard keeps per
/// active series and open window).
fn memory_per_series() {
    for (n, what) in [(200, "200 spans (1 s of a 200/s series)"), (100_000, "100,000 spans")] {
        let h = realistic(n, 3);
        println!("memory: histogram of {what}, lognormal around 20 ms: {} heap bytes", h.heap_bytes());
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    memory_per_series();
    disk_bytes_per_series_window();
}
