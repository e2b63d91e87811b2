//! The `tailscope` client crate against a real server: exact counts and percentiles, a
//! 60-second outage, a SIGKILL mid-stream, and the tracing and tower layers in an axum app.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::*;
use rand::{Rng, SeedableRng};
use tailscope::{BreakerState, Client, Status};

fn exact(sorted: &[i64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e9
}

fn lognormal(r: &mut impl Rng, median_ms: f64) -> Duration {
    let z: f64 =
        (-2.0 * r.gen_range(1e-12f64..1.0).ln()).sqrt() * (r.gen::<f64>() * std::f64::consts::TAU).cos();
    Duration::from_nanos((median_ms * 1e6 * (0.7 * z).exp()) as u64)
}

/// The server's ok-series row for `service`/`operation` over the last hour.
async fn ok_row(http: std::net::SocketAddr, service: &str, operation: &str) -> Option<serde_json::Value> {
    tail(http, &format!("service={service}&operation={}", operation.replace(' ', "%20")))
        .await
        .into_iter()
        .find(|r| r["status"] == "ok")
}

fn assert_percentiles(row: &serde_json::Value, sorted: &[i64]) {
    assert_eq!(row["count"], sorted.len() as u64, "{row}");
    for (field, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        let got = row[field].as_f64().unwrap();
        let want = exact(sorted, q);
        assert!((got - want).abs() <= want * 0.01, "{field}: server {got} vs client-side exact {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_spans_arrive_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client =
        Client::builder().endpoint(format!("http://{}", server.grpc_addr())).service("shop").build().unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(1);
    let mut durations = Vec::new();
    for i in 0..20_000 {
        let d = lognormal(&mut r, 20.0);
        durations.push(d.as_nanos() as i64);
        client.record("GET /cart", d, if i % 500 == 0 { Status::Error } else { Status::Ok });
    }
    client.flush().await.unwrap();
    let ok: Vec<i64> = {
        let mut v: Vec<i64> =
            durations.iter().enumerate().filter(|(i, _)| i % 500 != 0).map(|(_, &d)| d).collect();
        v.sort_unstable();
        v
    };
    assert_percentiles(&ok_row(server.http_addr(), "shop", "GET /cart").await.unwrap(), &ok);
    let stats = client.stats();
    assert_eq!((stats.recorded, stats.acked, stats.dropped_queue_full), (20_000, 20_000, 0), "{stats:?}");
    client.shutdown(Duration::from_secs(5)).await.unwrap();
    server.shutdown().await;
}

/// The server is down for 60 s while the client records 500 spans/s; when it is back, the
/// server's count for the whole period equals what was recorded and its percentiles match the
/// client-side exact ones. Meanwhile the client's breaker opened, it kept no batches beyond its
/// bound, folded instead of dropping, and never blocked the recording loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run by scripts/test.sh after the fast suite (cargo test -- --ignored)"]
async fn a_sixty_second_outage_ends_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let server = start_with(config.clone(), std::sync::Arc::new(tailscope_server::clock::SystemClock)).await;
    let grpc = server.grpc_addr();
    config.server.grpc_addr = grpc;
    let client = Client::builder()
        .endpoint(format!("http://{grpc}"))
        .service("outage")
        .configure(|c| {
            c.breaker_threshold = 3;
            c.breaker_open_for = Duration::from_secs(5);
            c.backoff_cap = Duration::from_secs(2);
        })
        .build()
        .unwrap();
    let recorder = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut r = rand::rngs::StdRng::seed_from_u64(2);
            let mut durations = Vec::new();
            let mut slowest_call = Duration::ZERO;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(75) {
                tick.tick().await;
                for _ in 0..5 {
                    let d = lognormal(&mut r, 30.0);
                    let t = Instant::now();
                    client.record("GET /orders", d, Status::Ok);
                    slowest_call = slowest_call.max(t.elapsed());
                    durations.push(d.as_nanos() as i64);
                }
            }
            (durations, slowest_call)
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.shutdown().await;
    let down = Instant::now();
    let mut saw_open = false;
    let mut max_unacked = 0;
    while down.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = client.stats();
        saw_open |= s.breaker == BreakerState::Open;
        max_unacked = max_unacked.max(s.unacked_bytes);
    }
    let server = start_with(config, std::sync::Arc::new(tailscope_server::clock::SystemClock)).await;
    let (mut durations, slowest_call) = recorder.await.unwrap();
    client.flush_within(Duration::from_secs(30)).await.unwrap();
    durations.sort_unstable();
    assert_percentiles(&ok_row(server.http_addr(), "outage", "GET /orders").await.unwrap(), &durations);
    let stats = client.stats();
    assert!(saw_open, "the breaker never opened: {stats:?}");
    assert!(stats.folded > 20_000, "{stats:?}");
    assert_eq!(stats.dropped_queue_full + stats.dropped_fold_full, 0, "{stats:?}");
    assert!(max_unacked <= client.config().max_unacked_bytes as u64);
    assert!(stats.reconnects >= 1);
    println!(
        "outage: {} spans, {} folded, slowest record() call {slowest_call:?}, max unacked {max_unacked} B",
        durations.len(),
        stats.folded
    );
    server.shutdown().await;
}

/// A SIGKILL of the server process while the client streams: after the restart nothing acked is
/// lost and nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_stream_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, grpc, http) = spawn_server(dir.path(), &[]);
    let client = Client::builder()
        .endpoint(format!("http://{grpc}"))
        .service("killed")
        .configure(|c| {
            c.max_batch_spans = 500;
            c.max_batch_delay = Duration::from_millis(20);
            c.backoff_cap = Duration::from_millis(500);
        })
        .build()
        .unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let mut durations = Vec::new();
    let mut record = |n: usize, durations: &mut Vec<i64>| {
        for _ in 0..n {
            let d = lognormal(&mut r, 5.0);
            durations.push(d.as_nanos() as i64);
            client.record("POST /kill", d, Status::Ok);
        }
    };
    for _ in 0..20 {
        record(2_000, &mut durations);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked_before = client.stats().acked;
    // Mid-stream: more in flight, then the kill.
    record(5_000, &mut durations);
    child.kill().unwrap();
    child.wait().unwrap();
    record(5_000, &mut durations);
    let (mut child, _, http2) = spawn_server_at(dir.path(), &[], &grpc.to_string(), &http.to_string());
    record(5_000, &mut durations);
    client.flush_within(Duration::from_secs(30)).await.unwrap();
    durations.sort_unstable();
    let row = ok_row(http2, "killed", "POST /kill").await.unwrap();
    assert!(acked_before > 0);
    assert_percentiles(&row, &durations);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The tracing and tower layers time the real requests of a small axum app. Single-threaded, so
/// the app's tasks run where the test's subscriber is the default.
#[tokio::test]
async fn tracing_and_tower_layers_record_an_axum_app() {
    use axum::routing::get;
    use tracing_subscriber::prelude::*;

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client =
        Client::builder().endpoint(format!("http://{}", server.grpc_addr())).service("web").build().unwrap();

    #[tracing::instrument]
    async fn load_user(id: u32) -> Result<String, String> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if id == 13 {
            tracing::error!("unlucky user");
            return Err("no".into());
        }
        Ok(format!("user {id}"))
    }
    async fn user(
        axum::extract::Path(id): axum::extract::Path<u32>,
    ) -> Result<String, axum::http::StatusCode> {
        load_user(id).await.map_err(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    }
    let app = axum::Router::new()
        .route("/users/{id}", get(user))
        .route("/health", get(|| async { "ok" }))
        .layer(tailscope::tower::TailscopeLayer::new(client.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let subscriber =
        tracing_subscriber::registry().with(tailscope::layer::TailscopeLayer::new(client.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    let http = reqwest::Client::new();
    for id in 1..=20 {
        let resp = http.get(format!("http://{addr}/users/{id}")).send().await.unwrap();
        assert_eq!(resp.status().is_success(), id != 13);
    }
    for _ in 0..5 {
        http.get(format!("http://{addr}/health")).send().await.unwrap();
    }
    client.flush().await.unwrap();
    let rows = tail(server.http_addr(), "service=web").await;
    let count = |op: &str, status: &str| {
        rows.iter()
            .find(|r| r["operation"] == op && r["status"] == status)
            .map_or(0, |r| r["count"].as_u64().unwrap())
    };
    // tower: one operation per route, not per id; the 500 is an error.
    assert_eq!(count("GET /users/{id}", "ok"), 19, "{rows:?}");
    assert_eq!(count("GET /users/{id}", "error"), 1, "{rows:?}");
    assert_eq!(count("GET /health", "ok"), 5, "{rows:?}");
    // tracing: the instrumented function, failed where an ERROR event happened inside it.
    assert_eq!(count("load_user", "ok"), 19, "{rows:?}");
    assert_eq!(count("load_user", "error"), 1, "{rows:?}");
    let slowest = rows.iter().find(|r| r["operation"] == "load_user" && r["status"] == "ok").unwrap();
    assert!(slowest["min"].as_f64().unwrap() >= 0.002, "{slowest}");
    server.shutdown().await;
}

/// Adaptive sampling changes what travels, never what is counted: the same traffic through a
/// server whose budget is 1 % of it and through one that keeps everything gives identical
/// counts and percentiles per series, while the sampled one received most spans folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_percent_budget_counts_exactly_what_no_sampling_counts() {
    let mut answers = Vec::new();
    for budget in [100.0, 1e9] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.sampling.budget = budget;
        c.sampling.interval = Duration::from_millis(200);
        let server = start_with(c, std::sync::Arc::new(tailscope_server::clock::SystemClock)).await;
        // Connected first, so nothing is folded for want of a stream.
        let client = connected("sampled", server.grpc_addr()).await;
        let mut r = rand::rngs::StdRng::seed_from_u64(11);
        let mut durations: Vec<Vec<i64>> = vec![Vec::new(); 5];
        // 10,000 spans/s for 4 s over five operations of different weights.
        for _ in 0..40 {
            for i in 0..1_000usize {
                let op = [0, 0, 0, 0, 1, 1, 2, 3, 4, 0][i % 10];
                let d = lognormal(&mut r, 10.0 * (op + 1) as f64);
                durations[op].push(d.as_nanos() as i64);
                client.record(&format!("op{op}"), d, Status::Ok);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client.flush_within(Duration::from_secs(30)).await.unwrap();
        let mut rows = Vec::new();
        for (op, d) in durations.iter_mut().enumerate() {
            d.sort_unstable();
            let row = ok_row(server.http_addr(), "sampled", &format!("op{op}")).await.unwrap();
            assert_percentiles(&row, d);
            rows.push((row["count"].clone(), row["p50"].clone(), row["p99"].clone()));
        }
        let text = metrics(server.http_addr()).await;
        let full = metric(&text, "tailscope_spans_received_total{form=\"full\"}");
        let folded = metric(&text, "tailscope_spans_received_total{form=\"folded\"}");
        assert_eq!(full + folded, 40_000.0);
        let sampling = get_json(server.http_addr(), "/api/v1/sampling").await;
        println!("budget {budget}: {full} full, {folded} folded; {}", sampling["data"]["keys"]);
        if budget < 1e6 {
            assert!(full < 20_000.0, "sampling sent {full} of 40,000 in full");
            let hottest = sampling["data"]["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["operation"] == "op0")
                .unwrap();
            assert!(hottest["probability"].as_f64().unwrap() < 0.2, "{hottest}");
        } else {
            assert_eq!(full, 40_000.0);
        }
        answers.push(rows);
        client.shutdown(Duration::from_secs(5)).await.unwrap();
        server.shutdown().await;
    }
    // Same counts; percentiles identical up to the histogram's precision (same buckets).
    assert_eq!(answers[0], answers[1]);
}

/// A server whose clock runs a minute ahead, so the windows of spans recorded now are already
/// closed and their exemplars written with the epoch that acknowledges them (exemplars are
/// kept for windows that ended 20 s ago).
async fn ahead_of_the_spans(dir: &std::path::Path) -> tailscope_server::Server {
    let clock = std::sync::Arc::new(tailscope_server::clock::ManualClock::new(now_nanos() + 60_000_000_000));
    start_with(config(dir), clock).await
}

/// Every exemplar of `service`'s bucket series of `kind` in the last ten minutes, as
/// (operation, trace id, span id).
async fn exemplars(http: std::net::SocketAddr, service: &str, kind: &str) -> Vec<(String, String, String)> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let query = format!("span_duration_seconds_bucket{{service=\"{service}\",span_kind=\"{kind}\"}}");
    let enc = form_encode(&query);
    let body =
        get_json(http, &format!("/api/v1/query_exemplars?query={enc}&start={}&end={}", now - 600, now + 60))
            .await;
    let mut out = Vec::new();
    for g in body["data"].as_array().unwrap_or_else(|| panic!("{body}")) {
        for e in g["exemplars"].as_array().unwrap() {
            out.push((
                g["seriesLabels"]["operation"].as_str().unwrap().to_owned(),
                e["labels"]["trace_id"].as_str().unwrap().to_owned(),
                e["labels"]["span_id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out.sort();
    out
}

/// W3C trace context through the tower layers: a request carrying `traceparent` into a
/// frontend (server layer), whose handler calls a backend through hyper's client wrapped in the
/// client layer, and a `tracing` span inside the backend: all four spans are in the caller's
/// trace, each kind in its series, and the backend's server span is the child of the
/// frontend's client span (the `traceparent` the backend received). The hop is an edge seen
/// from both ends: the frontend's calls name the backend as peer, and the backend's requests
/// name the frontend, which the client layer told it in `baggage` with the caller's own
/// members kept.
#[tokio::test]
async fn tower_and_tracing_layers_carry_w3c_trace_context_across_a_hop() {
    use axum::routing::get;
    use tower::ServiceExt;
    use tracing_subscriber::prelude::*;

    let dir = tempfile::tempdir().unwrap();
    let server = ahead_of_the_spans(dir.path()).await;
    let endpoint = format!("http://{}", server.grpc_addr());
    let frontend = Client::builder().endpoint(endpoint.clone()).service("frontend").build().unwrap();
    let backend = Client::builder().endpoint(endpoint).service("backend").build().unwrap();
    // Every span must travel in full for its exemplar to be asked for below, and a client folds
    // what it records before its first connection is up (counted exactly, with no exemplar): on
    // a loaded machine the requests below could come first.
    assert_eventually!(
        frontend.stats().connected && backend.stats().connected,
        "the clients connect: {:?} {:?}",
        frontend.stats(),
        backend.stats()
    );

    // The backend: the traceparent it received, kept; a tracing span inside the handler.
    let received = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let baggage = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    #[tracing::instrument]
    async fn charge() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (seen, seen_baggage) = (received.clone(), baggage.clone());
    let backend_app = axum::Router::new()
        .route(
            "/charge",
            get(move |headers: axum::http::HeaderMap| {
                let (seen, seen_baggage) = (seen.clone(), seen_baggage.clone());
                async move {
                    seen.lock().push(headers["traceparent"].to_str().unwrap().to_owned());
                    seen_baggage.lock().push(headers["baggage"].to_str().unwrap().to_owned());
                    charge().await;
                    "charged"
                }
            }),
        )
        .layer(tailscope::tower::TailscopeLayer::new(backend.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, backend_app).await });

    // The frontend calls it through hyper's client behind the client layer.
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
                    let req = axum::http::Request::get(format!("http://{backend_addr}/charge"))
                        .header("baggage", "userId=alice,ts.caller=spoofed")
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    let resp = outgoing.oneshot(req).await.unwrap();
                    resp.status().as_u16().to_string()
                }
            }),
        )
        .layer(tailscope::tower::TailscopeLayer::new(frontend.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let frontend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, frontend_app).await });

    // Only this test's spans: the in-process server's HTTP/2 stack traces on the same thread.
    let subscriber = tracing_subscriber::registry().with(
        tailscope::layer::TailscopeLayer::new(backend.clone())
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("it::"))),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = reqwest::Client::new()
        .get(format!("http://{frontend_addr}/checkout"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "200");
    // A request without one starts a trace of its own.
    reqwest::Client::new().get(format!("http://{frontend_addr}/checkout")).send().await.unwrap();
    frontend.flush().await.unwrap();
    backend.flush().await.unwrap();
    // Had a span been folded, its exemplar would be missing for a reason this test is not about.
    for (name, client) in [("frontend", &frontend), ("backend", &backend)] {
        let stats = client.stats();
        assert_eq!(stats.folded, 0, "{name} sent every span in full: {stats:?}");
    }

    let http = server.http_addr();
    let server_spans = exemplars(http, "frontend", "SPAN_KIND_SERVER").await;
    let client_spans = exemplars(http, "frontend", "SPAN_KIND_CLIENT").await;
    let backend_spans = exemplars(http, "backend", "SPAN_KIND_SERVER").await;
    let inner_spans = exemplars(http, "backend", "SPAN_KIND_UNSPECIFIED").await;
    for (name, spans, op) in [
        ("frontend server", &server_spans, "GET /checkout"),
        ("frontend client", &client_spans, "GET /charge"),
        ("backend server", &backend_spans, "GET /charge"),
        ("backend tracing", &inner_spans, "charge"),
    ] {
        assert_eq!(spans.len(), 2, "{name}: {spans:?}");
        assert!(spans.iter().all(|s| s.0 == op), "{name}: {spans:?}");
        assert_eq!(
            spans.iter().filter(|s| s.1 == trace).count(),
            1,
            "{name} in the caller's trace: {spans:?}"
        );
    }
    // The other request's four spans share one new trace.
    let other: std::collections::BTreeSet<&str> =
        [&server_spans, &client_spans, &backend_spans, &inner_spans]
            .iter()
            .flat_map(|v| v.iter())
            .map(|s| s.1.as_str())
            .filter(|t| *t != trace)
            .collect();
    assert_eq!(other.len(), 1, "{other:?}");
    // The backend received the frontend client span's id as its parent.
    let sent = received.lock().clone();
    let from_client: Vec<String> = client_spans.iter().map(|(_, t, s)| format!("00-{t}-{s}-01")).collect();
    for header in &sent {
        assert!(from_client.contains(header), "{header} not among {from_client:?}");
    }
    // Spans of a request the layers serve are not counted in the callers' own latency.
    let own = tail(http, "service=frontend").await;
    assert!(own.iter().all(|r| r["span_kind"] == "SPAN_KIND_SERVER"), "{own:?}");
    // The edge from both ends: the caller's two calls to the backend, the backend's two
    // requests from the frontend; the caller's own baggage member survives, the stale caller
    // does not.
    assert_eq!(*baggage.lock(), vec!["userId=alice,ts.caller=frontend".to_owned(); 2]);
    let peers = |rows: Vec<serde_json::Value>| -> Vec<(String, u64)> {
        rows.iter().map(|r| (r["peer"].as_str().unwrap().to_owned(), r["count"].as_u64().unwrap())).collect()
    };
    let calls = peers(tail(http, "service=frontend&span_kind=SPAN_KIND_CLIENT").await);
    assert_eq!(calls, vec![("backend".to_owned(), 2)]);
    let served = peers(tail(http, "service=backend&span_kind=SPAN_KIND_SERVER").await);
    assert_eq!(served, vec![("frontend".to_owned(), 2)]);
    // The frontend's own requests came from outside: no caller named.
    let entered = peers(tail(http, "service=frontend&span_kind=SPAN_KIND_SERVER").await);
    assert_eq!(entered, vec![(String::new(), 2)]);
    let topology = get_json(http, "/api/v1/topology?start=0").await;
    let edges: Vec<(&str, &str, f64)> = topology["data"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{topology}"))
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
                e["detail__calls"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(edges, vec![("frontend", "backend", 2.0)], "{topology}");
    server.shutdown().await;
}

/// A service that already uses the OpenTelemetry SDK adds the span processor: its spans are
/// counted exactly by kind, with the SDK's trace and span ids on their exemplars.
#[tokio::test]
async fn the_opentelemetry_span_processor_records_sdk_spans_with_their_ids() {
    use opentelemetry::trace::{Span as _, SpanKind, Status as OtelStatus, Tracer as _, TracerProvider as _};

    let dir = tempfile::tempdir().unwrap();
    let server = ahead_of_the_spans(dir.path()).await;
    let client = Client::builder()
        .endpoint(format!("http://{}", server.grpc_addr()))
        .service("otel-app")
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(tailscope::otel::TailscopeSpanProcessor::new(client.clone()))
        .build();
    let tracer = provider.tracer("test");
    // Spans recorded before the stream is open are folded (counted, with no exemplar).
    assert_eventually!(client.stats().connected, "the client connects");
    let mut ids = Vec::new();
    for i in 0..30 {
        let mut span = tracer.span_builder("GET /items").with_kind(SpanKind::Server).start(&tracer);
        if i % 10 == 0 {
            span.set_status(OtelStatus::error("boom"));
        }
        let cx = span.span_context().clone();
        ids.push(format!("{}", cx.trace_id()));
        span.end();
    }
    for _ in 0..5 {
        tracer.span_builder("db.query").with_kind(SpanKind::Client).start(&tracer).end();
    }
    // Calls that name their callee by the semantic conventions: edges of the service graph.
    let attribute = |k: &'static str, v: &'static str| opentelemetry::KeyValue::new(k, v);
    for (name, attributes) in [
        ("Charge", vec![attribute("peer.service", "payments"), attribute("server.address", "10.0.0.7")]),
        ("SELECT cart", vec![attribute("db.system.name", "postgresql")]),
        ("publish", vec![attribute("messaging.system", "kafka")]),
        ("GET /rates", vec![attribute("server.address", "api.rates.example")]),
    ] {
        let kind = if name == "publish" { SpanKind::Producer } else { SpanKind::Client };
        tracer.span_builder(name).with_kind(kind).with_attributes(attributes).start(&tracer).end();
    }
    // force_flush blocks until the server acknowledged: call it off the runtime's threads.
    let flushed = tokio::task::spawn_blocking(move || {
        let out = provider.force_flush();
        (out, provider)
    })
    .await
    .unwrap();
    flushed.0.unwrap();
    let http = server.http_addr();
    let rows = tail(http, "service=otel-app").await;
    let count =
        |status: &str| rows.iter().find(|r| r["status"] == status).map(|r| r["count"].as_u64().unwrap());
    assert_eq!((count("ok"), count("error")), (Some(27), Some(3)), "{rows:?}");
    assert!(rows.iter().all(|r| r["span_kind"] == "SPAN_KIND_SERVER" && r["operation"] == "GET /items"));
    let calls = tail(http, "service=otel-app&span_kind=SPAN_KIND_CLIENT").await;
    let mut calls: Vec<(&str, &str, u64)> = calls
        .iter()
        .map(|r| {
            (r["operation"].as_str().unwrap(), r["peer"].as_str().unwrap(), r["count"].as_u64().unwrap())
        })
        .collect();
    calls.sort_unstable();
    assert_eq!(
        calls,
        [
            ("Charge", "payments", 1),
            ("GET /rates", "api.rates.example", 1),
            ("SELECT cart", "db:postgresql", 1),
            ("db.query", "", 5)
        ]
    );
    let published = tail(http, "service=otel-app&span_kind=SPAN_KIND_PRODUCER").await;
    assert_eq!(published.iter().map(|r| r["peer"].as_str().unwrap()).collect::<Vec<_>>(), ["mq:kafka"]);
    let seen = exemplars(http, "otel-app", "SPAN_KIND_SERVER").await;
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|(_, t, _)| ids.contains(t)), "{seen:?} not among the SDK's trace ids");
    tokio::task::spawn_blocking(move || flushed.1.shutdown()).await.unwrap().unwrap();
    server.shutdown().await;
}
