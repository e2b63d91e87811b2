//! Self time — a span's duration minus the calls it waited on — from every source: the ingest
//! contract (`Span.self_nanos`, `HistogramDelta.self_histogram`), OTLP exports that carry a
//! request with its calls, and the client crate's tower layers; read as `span_self_seconds`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_proto::v1::{HistogramDelta, SeriesKey, SpanKind};

use crate::common::*;

/// `expr` evaluated now: one value per row, by `service`.
async fn by_service(http: std::net::SocketAddr, expr: &str) -> BTreeMap<String, f64> {
    instant_rows(http, expr, &["service"]).await.into_iter().map(|(mut k, v)| (k.remove(0), v)).collect()
}

fn key(service: &str, kind: SpanKind) -> SeriesKey {
    SeriesKey {
        service: service.into(),
        operation: "GET /cart".into(),
        kind: kind as i32,
        peer: String::new(),
    }
}

/// Spans with self times and a folded delta with a self histogram count exactly under
/// `span_self_seconds`, apart from `span_duration_seconds`; the Prometheus view lists the
/// names; a self histogram that counts more spans than its delta is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_times_count_exactly_under_their_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let now = now_nanos();
    let ms = 1_000_000;
    let with_self =
        |duration: i64, own: i64| tailscope_proto::v1::Span { self_nanos: own, ..span(now, duration, false) };
    let mut b = batch(
        8,
        1,
        vec![tailscope_proto::v1::SeriesGroup {
            key: Some(SeriesKey { peer: "frontend".into(), ..key("shop", SpanKind::Server) }),
            spans: vec![
                with_self(10 * ms, 4 * ms),
                with_self(20 * ms, 0),       // unknown: not counted as self time
                with_self(30 * ms, 50 * ms), // more than its duration: counts as the duration
                with_self(40 * ms, -5 * ms), // negative: unknown
            ],
        }],
    );
    let (mut durations, mut own) = (Histogram::new(Layout::default()), Histogram::new(Layout::default()));
    durations.record(100 * ms as u64, 1_000);
    own.record(5 * ms as u64, 600);
    let window = now / 1_000_000_000 / 10 * 10;
    let delta = |self_histogram: &Histogram| HistogramDelta {
        key: Some(key("shop", SpanKind::Server)),
        status: 0,
        window_start_unix_seconds: window,
        histogram: durations.to_bytes(),
        self_histogram: self_histogram.to_bytes(),
    };
    b.deltas.push(delta(&own));
    let mut s = open(server.grpc_addr()).await;
    s.send(b).await;
    s.wait_acked(1).await;

    let http = server.http_addr();
    let count = by_service(http, "sum by (service) (increase(span_self_seconds_count[10m]))").await;
    assert_eq!(count["shop"], 602.0, "4 ms and 30 ms, and the delta's 600");
    let sum = by_service(http, "sum by (service) (increase(span_self_seconds_sum[10m]))").await;
    assert!((sum["shop"] - (0.004 + 0.030 + 600.0 * 0.005)).abs() < 1e-6, "{sum:?}");
    // The durations are untouched: 1,004 spans, and no self series among them.
    let spans = by_service(http, "sum by (service) (increase(span_duration_seconds_count[10m]))").await;
    assert_eq!(spans["shop"], 1_004.0);
    let p99 = by_service(
        http,
        "histogram_quantile(0.99, sum by (service, le) (rate(span_self_seconds_bucket{span_kind=\"SPAN_KIND_SERVER\"}[10m])))",
    )
    .await;
    // 600 of 602 self times are 5 ms.
    assert!((p99["shop"] - 0.005).abs() < 0.0001, "{p99:?}");
    // The Prometheus view: the names, and the self series without a peer.
    let names = get_json(http, "/api/v1/label/__name__/values").await;
    for name in ["span_self_seconds_bucket", "span_self_seconds_count", "span_duration_seconds_count"] {
        assert!(names["data"].as_array().unwrap().iter().any(|n| n == name), "{name}: {names}");
    }
    let series = get_json(http, "/api/v1/series?match[]=span_self_seconds_count").await;
    let series = series["data"].as_array().unwrap();
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(series[0]["service"], "shop");
    assert!(series[0].get("peer").is_none(), "{series:?}");
    let metadata = get_json(http, "/api/v1/metadata?metric=span_self_seconds").await;
    assert_eq!(metadata["data"]["span_self_seconds"][0]["type"], "histogram", "{metadata}");

    // A self histogram counting more spans than its delta is refused, naming it.
    let mut bad = batch(8, 2, vec![]);
    let mut more = Histogram::new(Layout::default());
    more.record(ms as u64, 1_001);
    bad.deltas.push(delta(&more));
    let mut s = open(server.grpc_addr()).await;
    s.send(bad).await;
    let status = s.wait_error().await;
    assert!(status.message().contains("self_histogram"), "{status:?}");
    assert!(status.message().contains("more than the 1000"), "{status:?}");
    server.shutdown().await;
}

/// An OTLP export carrying a request and the calls it made gives the request its self time:
/// its duration minus the union of its CLIENT children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otlp_request_with_its_calls_gets_its_self_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let t0 = (now_nanos() / 1_000_000_000 * 1_000_000_000) as u64;
    let ms = 1_000_000u64;
    let span = |id: &str, parent: &str, kind: i32, from: u64, to: u64| {
        serde_json::json!({
            "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
            "spanId": id,
            "parentSpanId": parent,
            "name": if kind == 2 { "POST /checkout" } else { "charge" },
            "kind": kind,
            "startTimeUnixNano": (t0 + from * ms).to_string(),
            "endTimeUnixNano": (t0 + to * ms).to_string(),
            "attributes": [{ "key": "peer.service", "value": { "stringValue": "payments" } }],
        })
    };
    // 500 ms: two overlapping calls (100–300, 200–400 ms), so 200 ms of its own.
    let export = serde_json::json!({ "resourceSpans": [{
        "resource": { "attributes": [{ "key": "service.name", "value": { "stringValue": "checkout" } }] },
        "scopeSpans": [{ "spans": [
            span("00f067aa0ba902b7", "", 2, 0, 500),
            span("00f067aa0ba902b8", "00f067aa0ba902b7", 3, 100, 300),
            span("00f067aa0ba902b9", "00f067aa0ba902b7", 3, 200, 400),
        ] }],
    }] });
    post_otlp_json(server.otlp_http_addr(), serde_json::to_vec(&export).unwrap()).await;
    let http = server.http_addr();
    let sum = by_service(http, "sum by (service) (increase(span_self_seconds_sum[10m]))").await;
    assert!((sum["checkout"] - 0.200).abs() < 1e-9, "{sum:?}");
    let count = by_service(http, "sum by (service) (increase(span_self_seconds_count[10m]))").await;
    assert_eq!(count["checkout"], 1.0, "only the request has a self time");
    server.shutdown().await;
}

/// The client crate's layers: a request's handler that works 30 ms and then calls a backend
/// that takes 200 ms records a self time at most its duration minus those 200 ms, and at least
/// its 30 ms; the backend, which calls nothing, all of its duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tower_layers_give_a_request_the_time_it_did_not_wait_on_calls() {
    use axum::routing::get;
    use tower::ServiceExt;

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let grpc = server.grpc_addr();
    let (frontend, backend) = (connected("frontend", grpc).await, connected("backend", grpc).await);
    let backend_app = axum::Router::new()
        .route(
            "/charge",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "charged"
            }),
        )
        .layer(tailscope::tower::TailscopeLayer::new(backend.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, backend_app).await });
    let hyper_client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let outgoing = tower::ServiceBuilder::new()
        .layer(tailscope::tower::TailscopeClientLayer::new(frontend.clone()).peer("backend"))
        .service(hyper_client);
    let frontend_app = axum::Router::new()
        .route(
            "/checkout",
            get(move || {
                let outgoing = outgoing.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let req = axum::http::Request::get(format!("http://{backend_addr}/charge"))
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    outgoing.oneshot(req).await.unwrap().status().as_u16().to_string()
                }
            }),
        )
        .layer(tailscope::tower::TailscopeLayer::new(frontend.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let frontend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, frontend_app).await });
    for _ in 0..2 {
        let resp = reqwest::get(format!("http://{frontend_addr}/checkout")).await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "200");
    }
    frontend.flush().await.unwrap();
    backend.flush().await.unwrap();

    let http = server.http_addr();
    let own = by_service(http, "sum by (service) (increase(span_self_seconds_sum[10m]))").await;
    let took = by_service(http, "sum by (service) (increase(span_duration_seconds_sum[10m]))").await;
    let count = by_service(http, "sum by (service) (increase(span_self_seconds_count[10m]))").await;
    assert_eq!((count["frontend"], count["backend"]), (2.0, 2.0), "{count:?}");
    // Each frontend request waited at least the backend's 200 ms and worked at least 30 ms.
    assert!(own["frontend"] <= took["frontend"] - 0.400 + 1e-6, "{own:?} {took:?}");
    assert!(own["frontend"] >= 0.060, "{own:?}");
    // The backend called nothing: all its time is its own.
    assert!((own["backend"] - took["backend"]).abs() < 1e-6, "{own:?} {took:?}");
    server.shutdown().await;
}

/// The `tracing` layer: a span of the service's own work that works 20 ms and waits 50 ms in
/// an `otel.kind = "client"` span records a self time of at most its duration minus those
/// 50 ms and at least its 20 ms; the call itself has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracing_layer_gives_a_span_the_time_it_did_not_wait_on_calls() {
    use tracing::Instrument;
    use tracing_subscriber::prelude::*;

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client = connected("orders", server.grpc_addr()).await;
    // Only this test's spans: the in-process server's stack traces on the same threads.
    let subscriber = tracing_subscriber::registry().with(
        tailscope::layer::TailscopeLayer::new(client.clone())
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("it::"))),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    for _ in 0..2 {
        async {
            std::thread::sleep(Duration::from_millis(20));
            async { tokio::time::sleep(Duration::from_millis(50)).await }
                .instrument(tracing::info_span!("charge", otel.kind = "client"))
                .await;
        }
        .instrument(tracing::info_span!("place order", otel.kind = "server"))
        .await;
    }
    client.flush().await.unwrap();
    let http = server.http_addr();
    let own = by_service(http, "sum by (service) (increase(span_self_seconds_sum[10m]))").await;
    let took = by_service(http, "sum by (service) (increase(span_duration_seconds_sum[10m]))").await;
    let count = by_service(http, "sum by (service) (increase(span_self_seconds_count[10m]))").await;
    assert_eq!(count["orders"], 2.0, "the two requests, not the calls: {count:?}");
    assert!(own["orders"] <= took["orders"] - 0.100 + 1e-6, "{own:?} {took:?}");
    assert!(own["orders"] >= 0.040, "{own:?}");
    server.shutdown().await;
}
