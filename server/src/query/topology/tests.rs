use std::time::{Duration, Instant};

use super::*;
use crate::query::promql::{Limits, Steps};
use crate::series::{Kind, SeriesLabels, Status};
use crate::store::{MemoryStore, RetentionConfig};

const NOW: i64 = 1_800_000_000;

#[test]
fn nodes_and_edges_carry_exact_counts_and_tails() {
    let mut mem = MemoryStore::default();
    let mut record = |service: &str, kind: Kind, peer: &str, status: Status, nanos: u64, n: u64| {
        let labels = SeriesLabels { kind, peer: peer.into(), ..SeriesLabels::new(service, "op", status) };
        mem.record(labels, NOW - 60, nanos, n);
    };
    record("frontend", Kind::Server, "", Status::Ok, 30_000_000, 100);
    record("frontend", Kind::Client, "checkout", Status::Ok, 20_000_000, 99);
    record("frontend", Kind::Client, "checkout", Status::Error, 1_000_000_000, 1);
    record("checkout", Kind::Server, "frontend", Status::Ok, 15_000_000, 100);
    record("checkout", Kind::Client, "db:postgres", Status::Ok, 5_000_000, 300);
    let steps = Steps::instant(NOW * 1000);
    let retention = RetentionConfig::default();
    let limits = Limits {
        max_series: 1000,
        max_points: 11_000,
        max_samples: 1_000_000,
        deadline: Instant::now() + Duration::from_secs(30),
    };
    let engine = Engine::new(&mem, &steps, NOW, &retention, limits);
    let g = graph(&engine, 300).expect("graph");
    assert_eq!(g.nodes.keys().collect::<Vec<_>>(), ["checkout", "db:postgres", "frontend"]);
    let fc = &g.edges[&("frontend".to_owned(), "checkout".to_owned())];
    assert_eq!((fc.calls, fc.failed, fc.connection_type.as_str()), (100.0, 1.0, ""));
    assert!((fc.mean_seconds.expect("mean") - (99.0 * 0.02 + 1.0) / 100.0).abs() < 1e-9, "{fc:?}");
    let p99 = fc.p99_seconds.expect("p99");
    assert!((p99 - 0.02).abs() <= 0.02 * 0.01, "{fc:?}");
    let db = &g.edges[&("checkout".to_owned(), "db:postgres".to_owned())];
    assert_eq!((db.calls, db.connection_type.as_str()), (300.0, "database"));
    assert!(!g.nodes["db:postgres"].instrumented);
    let checkout = &g.nodes["checkout"];
    assert!(checkout.instrumented);
    // Its own spans only: the 100 it served, not the 300 calls it made.
    assert_eq!((checkout.spans, checkout.errors), (100.0, 0.0));
    assert_eq!(g.nodes["frontend"].spans, 100.0);
}
