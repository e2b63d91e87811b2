//! Root-cause cost per evaluation: reading the service graph's tails (each service's own p99
//! and self-time p99, and each edge's p99 and calls per request, now and over the baseline: ten queries) and
//! stamping 100 firing alerts, over a store of 100 services and 1,000 call edges with 65
//! minutes of 10-second windows.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use criterion::Criterion;
use rand::{Rng, SeedableRng};
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_server::alerting::incidents::{read_tails, stamp, Environment, IncidentsConfig};
use tailscope_server::alerting::{Alert, Labels};
use tailscope_server::clock::ManualClock;
use tailscope_server::series::{Kind, SeriesLabels, Status};
use tailscope_server::store::{EpochWrite, RetentionConfig, Store, WindowDelta};
use tailscope_server::telemetry::Metrics;

const NOW: i64 = 1_800_000_000;
const SERVICES: usize = 100;
const EDGES_PER_SERVICE: usize = 10;

fn populate(store: &Store) {
    let mut r = rand::rngs::StdRng::seed_from_u64(14);
    let mut labels = Vec::new();
    for s in 0..SERVICES {
        labels.push(SeriesLabels {
            kind: Kind::Server,
            ..SeriesLabels::new(format!("svc{s:03}"), "op", Status::Ok)
        });
        for e in 0..EDGES_PER_SERVICE {
            let callee = (s + 1 + e * 7) % SERVICES;
            labels.push(SeriesLabels {
                kind: Kind::Client,
                peer: format!("svc{callee:03}"),
                ..SeriesLabels::new(format!("svc{s:03}"), "call", Status::Ok)
            });
        }
    }
    let mut write =
        EpochWrite { series: labels.iter().map(|l| (l.id(), l.clone())).collect(), ..EpochWrite::default() };
    for w in (NOW - 3900..NOW).step_by(10) {
        for l in &labels {
            let mut h = Histogram::new(Layout::default());
            for _ in 0..10 {
                let z: f64 = r.gen_range(-2.5..2.5);
                h.record((20e6 * (0.6 * z).exp()) as u64, 1);
            }
            write.windows.push(WindowDelta { series: l.id(), window_start: w, histogram: h.to_bytes() });
        }
    }
    store.write_epoch(&write).unwrap();
    store.flush().unwrap();
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(dir.path(), Layout::default(), &metrics).unwrap();
    populate(&store);
    let env = Environment {
        sources: Arc::new(store.clone()),
        state: Arc::new(store.clone()),
        retention: RetentionConfig::default(),
        clock: Arc::new(ManualClock::new(NOW * 1_000_000_000)),
        metrics,
    };
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let tails = read_tails(&env, &config, NOW * 1000).unwrap();
    assert_eq!((tails.services.len(), tails.edges.len()), (SERVICES, SERVICES * EDGES_PER_SERVICE));
    let alerts: Vec<Alert> = (0..SERVICES)
        .map(|s| Alert {
            labels: Labels::from([
                ("alertname".to_owned(), "HighP99Latency".to_owned()),
                ("service".to_owned(), format!("svc{s:03}")),
            ]),
            annotations: Labels::new(),
            starts_at: NOW * 1000,
            ends_at: NOW * 1000 + 600_000,
            generator_url: String::new(),
        })
        .collect();
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    c.bench_function("incidents: read the tails of 100 services and 1,000 edges (10 queries)", |b| {
        b.iter(|| read_tails(&env, &config, NOW * 1000).unwrap())
    });
    c.bench_function("incidents: stamp 100 firing alerts", |b| {
        b.iter(|| stamp(&mut HashMap::new(), alerts.clone(), &tails, &config, NOW * 1000))
    });
    c.final_summary();
}
