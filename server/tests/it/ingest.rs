//! End-to-end ingest: exactness through a restart, idempotent resends, late data, graceful
//! shutdown. Real server in-process, real tonic client, real HTTP.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use rand::{Rng, SeedableRng};
use tailscope_server::clock::ManualClock;

/// Heavy-tailed latencies in nanoseconds: a lognormal body around 30 ms and a Pareto tail.
fn heavy_tailed(n: usize, seed: u64) -> Vec<i64> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u: f64 = r.gen_range(1e-12..1.0);
            let v = if r.gen_bool(0.98) {
                let z = (-2.0 * u.ln()).sqrt() * (r.gen::<f64>() * std::f64::consts::TAU).cos();
                30e6 * (0.5 * z).exp()
            } else {
                100e6 / u.powf(1.0 / 1.3)
            };
            v.min(3_000e9) as i64
        })
        .collect()
}

fn exact_quantile(sorted: &[i64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_spans_are_exact_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut values = heavy_tailed(1_000_000, 1);
    let base = now_nanos() - 120_000_000_000;
    let mut stream = open(server.grpc_addr()).await;
    for (i, chunk) in values.chunks(1000).enumerate() {
        // Spread over two minutes of windows; every tenth span is an error of another series.
        let spans = chunk
            .iter()
            .enumerate()
            .map(|(j, &d)| span(base + ((i * 1000 + j) as i64 * 120_000), d, false))
            .collect();
        stream.send(batch(77, i as u64 + 1, vec![group("checkout", "POST /pay", spans)])).await;
    }
    stream.wait_acked(1000).await;
    drop(stream);
    server.shutdown().await;

    let server = start(dir.path()).await;
    let rows = tail(server.http_addr(), "service=checkout").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    eprintln!("tail row after restart: {row}");
    values.sort_unstable();
    assert_eq!(row["count"], 1_000_000);
    assert_eq!(row["operation"], "POST /pay");
    assert_eq!(row["status"], "ok");
    let precision = 0.01;
    for (field, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999), ("max", 1.0), ("min", 0.0)]
    {
        let exact = exact_quantile(&values, q);
        let got = row[field].as_f64().unwrap();
        assert!((got - exact).abs() <= exact * precision, "{field}: got {got}, exact {exact}");
    }
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64 / 1e9;
    assert!((row["mean"].as_f64().unwrap() - mean).abs() < mean * 1e-9);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_batches_are_acked_but_not_counted_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let now = now_nanos();
    let make = |seq: u64| {
        batch(
            5,
            seq,
            vec![group(
                "api",
                "GET /",
                (0..10).map(|i| span(now - i * 1_000_000, 2_000_000, i % 2 == 0)).collect(),
            )],
        )
    };
    let mut s = open(server.grpc_addr()).await;
    for seq in 1..=3 {
        s.send(make(seq)).await;
    }
    s.wait_acked(3).await;
    drop(s);

    // Reconnect and resend everything, as a client that never saw the acks would.
    let mut s = open(server.grpc_addr()).await;
    for seq in 1..=3 {
        s.send(make(seq)).await;
    }
    s.send(make(4)).await;
    s.wait_acked(4).await;
    // A stale seq on a fresh stream is acknowledged with the current watermark and ignored.
    drop(s);
    let mut s = open(server.grpc_addr()).await;
    s.send(make(2)).await;
    let reply = s.wait_acked(2).await;
    assert_eq!(reply.durable_seq, 4);

    let rows = tail(server.http_addr(), "service=api").await;
    let count =
        |status: &str| rows.iter().find(|r| r["status"] == status).map(|r| r["count"].as_u64().unwrap());
    assert_eq!(count("ok"), Some(20));
    assert_eq!(count("error"), Some(20));
    let m = metrics(server.http_addr()).await;
    assert_eq!(metric(&m, "tailscope_batches_total{result=\"duplicate\"}"), 4.0, "{m}");
    assert_eq!(metric(&m, "tailscope_batches_total{result=\"accepted\"}"), 4.0);
    assert_eq!(metric(&m, "tailscope_spans_accepted_total"), 40.0);
    server.shutdown().await;

    // Watermarks are durable: after a restart, the old batches are still duplicates.
    let server = start(dir.path()).await;
    let mut s = open(server.grpc_addr()).await;
    s.send(make(3)).await;
    assert_eq!(s.wait_acked(3).await.durable_seq, 4);
    let rows = tail(server.http_addr(), "service=api&operation=GET%20/").await;
    assert_eq!(rows.iter().map(|r| r["count"].as_u64().unwrap()).sum::<u64>(), 40);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_spans_land_in_their_window_and_out_of_range_ones_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let now: i64 = 1_800_000_000 * 1_000_000_000;
    let clock = Arc::new(ManualClock::new(now));
    let server = start_with(config(dir.path()), clock.clone()).await;
    let sec = 1_000_000_000i64;
    let spans = vec![
        span(now - 50 * 60 * sec, 5_000_000, false), // 50 min late: within the hour
        span(now - 50 * 60 * sec + 3 * sec, 7_000_000, false), // same 10 s window
        span(now - 2 * 3600 * sec, 1_000_000, false), // too old
        span(now + 10 * 60 * sec, 1_000_000, false), // too far in the future
        span(now + 30 * sec, 9_000_000, false),      // small skew: accepted
        span(now, -5, false),                        // negative duration
        span(now, 48 * 3600 * sec, false),           // absurd duration
        span(now, 2 * 3600 * sec, false),            // beyond the range: clamped
    ];
    let mut s = open(server.grpc_addr()).await;
    s.send(batch(9, 1, vec![group("late", "job", spans)])).await;
    let reply = s.wait_acked(1).await;
    let mut rejected: Vec<(String, u64)> =
        reply.rejected.iter().map(|r| (r.reason.clone(), r.count)).collect();
    rejected.sort();
    assert_eq!(
        rejected,
        vec![
            ("absurd_duration".into(), 1),
            ("negative_duration".into(), 1),
            ("too_far_in_future".into(), 1),
            ("too_old".into(), 1)
        ]
    );
    let late_window = (now / sec - 50 * 60) / 10 * 10;
    let q = |start: i64, end: i64| format!("service=late&start={start}&end={end}");
    let rows = tail(server.http_addr(), &q(late_window, late_window + 10)).await;
    assert_eq!(rows[0]["count"], 2, "both late spans in their own window: {rows:?}");
    assert_eq!(rows[0]["max"], 0.007);
    let rows = tail(server.http_addr(), &q(now / sec - 3 * 3600, now / sec + 3600)).await;
    assert_eq!(rows[0]["count"], 4);
    assert_eq!(rows[0]["clamped"], 1);
    let m = metrics(server.http_addr()).await;
    for reason in ["too_old", "too_far_in_future", "negative_duration", "absurd_duration"] {
        assert_eq!(
            metric(&m, &format!("tailscope_spans_rejected_total{{reason=\"{reason}\"}}")),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(metric(&m, "tailscope_spans_clamped_total"), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_acknowledges_everything_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Epochs far apart: only the shutdown's final flush can acknowledge these batches.
    cfg.ingest.flush_interval = Duration::from_secs(60);
    let server = Server::start(cfg).await.unwrap();
    let now = now_nanos();
    let mut s = open(server.grpc_addr()).await;
    for seq in 1..=20 {
        s.send(batch(
            3,
            seq,
            vec![group("svc", "op", (0..50).map(|i| span(now - i, 1_000_000, false)).collect())],
        ))
        .await;
    }
    // Let the server read them all before it is told to stop.
    assert_eventually!(
        metric(&metrics(server.http_addr()).await, "tailscope_batches_total{result=\"accepted\"}") == 20.0,
        "batches not accepted"
    );
    let shutdown = tokio::spawn(server.shutdown());
    let status = s.wait_error().await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(s.acked, 20, "every accepted batch is acknowledged before the stream closes");
    shutdown.await.unwrap();
    let server = start(dir.path()).await;
    assert_eq!(tail(server.http_addr(), "service=svc").await[0]["count"], 1000);
    server.shutdown().await;
}

use tailscope_server::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_through_tiny_queues_and_fast_epochs_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest.shards = 3;
    cfg.ingest.queue_capacity = 2;
    cfg.ingest.flush_interval = Duration::from_millis(10);
    let server = Server::start(cfg).await.unwrap();
    let now = now_nanos();
    let clients = 8u64;
    let mut tasks = Vec::new();
    for c in 1..=clients {
        let batches: Vec<_> = (1..=100u64)
            .map(|seq| {
                let groups = (0..4)
                    .map(|g| {
                        group(
                            "svc",
                            &format!("op{g}"),
                            (0..25).map(|i| span(now - i, 1_000_000 * (g + 1), i % 5 == 0)).collect(),
                        )
                    })
                    .collect();
                batch(c, seq, groups)
            })
            .collect();
        tasks.push(tokio::spawn(deliver(server.grpc_addr(), batches)));
    }
    let mut refusals = 0;
    for t in tasks {
        refusals += t.await.unwrap();
    }
    let rows = tail(server.http_addr(), "service=svc").await;
    assert_eq!(rows.len(), 8, "4 operations × ok/error: {rows:?}");
    let total: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(total, clients * 100 * 100, "every span exactly once ({refusals} refusals on the way)");
    for r in &rows {
        let expected = if r["status"] == "error" { clients * 100 * 5 } else { clients * 100 * 20 };
        assert_eq!(r["count"].as_u64().unwrap(), expected, "{r}");
    }
    let m = metrics(server.http_addr()).await;
    assert_eq!(
        metric(&m, "tailscope_batches_rejected_total{reason=\"overloaded\"}"),
        f64::from(refusals),
        "{m}"
    );
    assert_eq!(
        metric(&m, "tailscope_spans_throttled_total{reason=\"overloaded\"}"),
        f64::from(refusals) * 100.0,
        "every span of every refused batch is counted as throttled: {m}"
    );
    server.shutdown().await;
}

/// Watermark poisoning: a batch naming another client's id with a seq far ahead would make
/// that client's next batches look like resends — acknowledged, never counted. It is refused,
/// counted, and the owner's batches keep being counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_far_past_the_watermark_is_refused_and_the_owner_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let now = now_nanos();
    let make = |client: u64, seq: u64| {
        batch(
            client,
            seq,
            vec![group("owner", "GET /", vec![span(now - (seq % 1_000) as i64 * 1_000, 1_000_000, false)])],
        )
    };
    let mut owner = open(server.grpc_addr()).await;
    for seq in 1..=5 {
        owner.send(make(9, seq)).await;
    }
    owner.wait_acked(5).await;
    for (client, seq) in [(9, 1u64 << 63), (9, 5 + 1_000_001), (77, 5_000_000)] {
        let mut attacker = open(server.grpc_addr()).await;
        attacker.send(make(client, seq)).await;
        let status = attacker.wait_error().await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("ingest.max_seq_gap"), "{}", status.message());
    }
    for seq in 6..=11 {
        owner.send(make(9, seq)).await;
    }
    assert_eq!(owner.wait_acked(11).await.durable_seq, 11);
    let rows = tail(server.http_addr(), "service=owner").await;
    assert_eq!(rows.iter().map(|r| r["count"].as_u64().unwrap()).sum::<u64>(), 11, "{rows:?}");
    let m = metrics(server.http_addr()).await;
    assert_eq!(metric(&m, "tailscope_batches_rejected_total{reason=\"seq_gap\"}"), 3.0, "{m}");
    server.shutdown().await;
}
