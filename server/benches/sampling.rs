//! The sampler's own costs: observing spans at ingest (per span) and recomputing every key's
//! probability (per interval, for 1,000 and 10,000 keys).
#![allow(clippy::unwrap_used)]

use criterion::{BenchmarkId, Criterion, Throughput};
use tailscope_server::sampling::{Sampler, SamplingConfig};

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let sampler = Sampler::new(SamplingConfig::default());
    let spans: Vec<(i64, u64)> = (0..1_000).map(|i| (1_000_000 + i * 7_919 % 50_000_000, 1)).collect();
    let mut g = c.benchmark_group("sampler");
    g.throughput(Throughput::Elements(spans.len() as u64));
    g.bench_function("observe a group of 1,000 spans", |b| {
        b.iter(|| sampler.observe_full(42, "svc", "GET /a", spans.iter().copied()))
    });
    g.finish();
    let mut g = c.benchmark_group("sampler tick");
    for keys in [1_000u64, 10_000] {
        let s = Sampler::new(SamplingConfig::default());
        for k in 0..keys {
            s.observe_full(k, "svc", &format!("op{k}"), spans[..10].iter().copied());
        }
        // A microsecond "interval": keys idle for ten minutes' worth of ticks would be
        // forgotten, and criterion runs more ticks than that.
        g.bench_with_input(BenchmarkId::from_parameter(keys), &s, |b, s| b.iter(|| s.tick(1e-6, false)));
    }
    g.finish();
    c.final_summary();
}
