//! Alerting costs.
//!
//! 1. Evaluating one group of 1,000 rules over a store of 1,000 series (10 services × 100
//!    operations, one hour of 10-second windows), in two shapes: every rule reads its own series
//!    (p99 of one operation), and every rule reads a whole service (p99 by operation over 100
//!    series).
//! 2. Time from a breach to the webhook call, end to end through a real server: spans in over
//!    gRPC, acknowledged (durable) → next evaluation (1 s interval) → notifier (group_wait 0) →
//!    HTTP webhook received.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use rand::{Rng, SeedableRng};
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_server::alerting::eval::{Context, GroupRuntime};
use tailscope_server::alerting::rules::RuleGroup;
use tailscope_server::alerting::{Alert, Sink};
use tailscope_server::clock::{Clock, SystemClock};
use tailscope_server::series::{SeriesLabels, Status};
use tailscope_server::store::RetentionConfig;
use tailscope_server::store::{EpochWrite, Store, WindowDelta};
use tailscope_server::telemetry::Metrics;

const NOW: i64 = 1_800_000_000;
const SERVICES: usize = 10;
const OPERATIONS: usize = 100;

fn populate(store: &Store) {
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let labels: Vec<SeriesLabels> = (0..SERVICES * OPERATIONS)
        .map(|i| {
            SeriesLabels::new(format!("svc{}", i / OPERATIONS), format!("op{}", i % OPERATIONS), Status::Ok)
        })
        .collect();
    let mut write =
        EpochWrite { series: labels.iter().map(|l| (l.id(), l.clone())).collect(), ..EpochWrite::default() };
    for w in (NOW - 3600..NOW).step_by(10) {
        for l in &labels {
            let mut h = Histogram::new(Layout::default());
            for _ in 0..20 {
                let z: f64 = r.gen_range(-2.5..2.5);
                h.record((20e6 * (0.6 * z).exp()) as u64, 1);
            }
            write.windows.push(WindowDelta { series: l.id(), window_start: w, histogram: h.to_bytes() });
        }
    }
    store.write_epoch(&write).unwrap();
    store.flush().unwrap();
}

#[derive(Debug)]
struct Discard;

impl Sink for Discard {
    fn send(&self, _: Vec<Alert>) {}
}

fn group(rule: impl Fn(usize) -> String) -> RuleGroup {
    let mut yaml = String::from("groups:\n  - name: bench\n    interval: 1m\n    rules:\n");
    for i in 0..1000 {
        yaml.push_str(&format!("      - alert: R{i}\n        expr: '{}'\n", rule(i)));
    }
    RuleGroup::parse(&yaml, std::path::Path::new("bench.yml")).unwrap().remove(0)
}

fn evaluation(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), Layout::default(), &metrics).unwrap();
    populate(&store);
    let ctx = Context {
        sources: Arc::new(store.clone()),
        state: Arc::new(store.clone()),
        clock: Arc::new(SystemClock),
        retention: RetentionConfig::default(),
        metrics,
        sink: Arc::new(Discard),
        external_url: "http://127.0.0.1:9797".into(),
        resend_delay: Duration::from_secs(60),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("evaluate 1000 rules, 1000 series");
    g.sample_size(10);
    let one_series = group(|i| {
        format!(
            "histogram_quantile(0.99, sum by (le) (rate(span_duration_seconds_bucket{{service=\"svc{}\",operation=\"op{}\"}}[5m]))) > 0.085",
            i / OPERATIONS,
            i % OPERATIONS
        )
    });
    let per_service = group(|i| {
        format!(
            "histogram_quantile(0.99, sum by (operation, le) (rate(span_duration_seconds_bucket{{service=\"svc{}\"}}[5m]))) > 0.0850{:02}",
            i % SERVICES,
            i / SERVICES
        )
    });
    // The same selections, each of its 100 rules asking another quantile (0.900 … 0.999):
    // the rules share their reads and merged ranges, not their results.
    let quantiles = group(|i| {
        format!(
            "histogram_quantile(0.9{:02}, sum by (operation, le) (rate(span_duration_seconds_bucket{{service=\"svc{}\"}}[5m]))) > 0.085",
            i / SERVICES,
            i % SERVICES
        )
    });
    for (name, group) in [
        ("1 series per rule", one_series),
        ("100 series per rule", per_service),
        ("100 series per rule, a quantile each", quantiles),
    ] {
        let runtime = GroupRuntime::new(group, None, &store);
        for _ in 0..3 {
            rt.block_on(runtime.evaluate(&ctx, NOW * 1000));
            let snapshot = runtime.snapshot();
            let firing: usize = snapshot.rules.iter().map(|r| r.alerts.len()).sum();
            let queries: Duration = snapshot.rules.iter().map(|r| r.evaluation_time).sum();
            println!(
                "{name}: {firing} alerts; evaluation {:.1} ms, of which the rules' queries {:.1} ms",
                snapshot.evaluation_time.as_secs_f64() * 1e3,
                queries.as_secs_f64() * 1e3
            );
        }
        g.bench_function(name, |b| b.iter(|| rt.block_on(runtime.evaluate(&ctx, NOW * 1000))));
    }
    g.finish();
}

/// Breach → webhook through a real server, `n` times (each a new service, alert and group).
fn breach_to_webhook(n: usize) {
    use tailscope_proto::v1::ingest_client::IngestClient;
    use tailscope_proto::v1::{SeriesGroup, SeriesKey, Span, SpanBatch};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let app = axum::Router::new().fallback(axum::routing::post(move || {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now());
                "ok"
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.yml");
        std::fs::write(&rules, "groups:\n  - name: b\n    interval: 1s\n    rules:\n      - alert: Slow\n        expr: histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[1m]))) > 0.5\n").unwrap();
        let notifier = dir.path().join("am.yml");
        std::fs::write(&notifier, format!("route:\n  receiver: r\n  group_by: [service]\n  group_wait: 0s\n  group_interval: 1s\nreceivers:\n  - name: r\n    webhook_configs: [{{url: 'http://{hook}/'}}]\n")).unwrap();
        let mut config = tailscope_server::Config::default();
        config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.server.http_addr = "127.0.0.1:0".parse().unwrap();
        config.server.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
        config.server.data_dir = dir.path().join("data");
        config.ingest.flush_interval = Duration::from_millis(100);
        config.alerting.rule_files = vec![rules];
        config.alerting.alertmanager_config = notifier;
        let server = tailscope_server::Server::start(config).await.unwrap();
        let mut client = IngestClient::connect(format!("http://{}", server.grpc_addr())).await.unwrap();
        let mut latencies = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for i in 0..n {
            let now = SystemClock.now_nanos();
            let spans = (0..20)
                .map(|j| Span { trace_id_low: j, span_id: j + 1, start_unix_nanos: now - 1_000_000, duration_nanos: 900_000_000, status: 1, ..Default::default() })
                .collect();
            let batch = SpanBatch {
                client_id: 77,
                seq: i as u64 + 1,
                groups: vec![SeriesGroup { key: Some(SeriesKey { service: format!("svc{i}"), operation: "op".into(), ..Default::default() }), spans }],
                deltas: vec![],
            };
            let (btx, brx) = tokio::sync::mpsc::channel(1);
            btx.send(batch).await.unwrap();
            let mut replies = client.stream(tokio_stream::wrappers::ReceiverStream::new(brx)).await.unwrap().into_inner();
            while let Some(r) = replies.message().await.unwrap() {
                if r.durable_seq > i as u64 {
                    break;
                }
            }
            let acked = Instant::now();
            let received = rx.recv().await.unwrap();
            latencies.push(received.duration_since(acked).as_secs_f64() * 1e3);
            // Spread the breaches uniformly over the evaluation interval.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1000))).await;
        }
        println!("breach → webhook in order (ms): {:?}", latencies.iter().map(|l| l.round() as i64).collect::<Vec<_>>());
        latencies.sort_by(f64::total_cmp);
        let pick = |q: f64| latencies[((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1];
        println!(
            "breach → webhook over {n} breaches (1 s evaluation interval, group_wait 0): min {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            latencies[0],
            pick(0.5),
            pick(0.9),
            latencies[latencies.len() - 1]
        );
        server.shutdown().await;
    });
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    evaluation(&mut c);
    c.final_summary();
    breach_to_webhook(40);
}
