//! Every request bounded: hostile requests get a clear error or a bounded answer, the server
//! stays up, and ingest keeps being acknowledged while they run.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use crate::common::*;
use serde_json::Value;

async fn post_form(http: std::net::SocketAddr, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let resp = reqwest::Client::new()
        .post(format!("http://{http}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends one batch and returns how long its acknowledgement took.
async fn ack_latency(stream: &mut Stream, seq: u64) -> std::time::Duration {
    let started = Instant::now();
    stream.send(batch(7, seq, vec![group("probe", "ack", vec![span(now_nanos(), 1_000_000, false)])])).await;
    stream.wait_acked(seq).await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_expressions_are_refused_before_parsing_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    let mut seq = 0;

    let terms = vec!["1"; 8_000].join("+");
    let nested = format!("{}span_duration_seconds_count{}", "sum(".repeat(7_000), ")".repeat(7_000));
    let selector = format!("{}span_duration_seconds_count{}", "sum(".repeat(20_000), ")".repeat(20_000));
    // C1 of the hostile-client table: each of these aborted the process with a stack overflow.
    let url = format!("http://{http}/api/v1/query?query={}", terms.replace('+', "%2B"));
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errorType"], "bad_data", "{body}");
    assert!(body["error"].as_str().unwrap().contains("query.max_depth (256"), "{body}");
    seq += 1;
    println!("ack after the 8,000-term query: {:?}", ack_latency(&mut ingest, seq).await);

    let (code, body) = post_form(http, "/api/v1/query", &[("query", &nested)]).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("query.max_depth"), "{body}");
    let (code, body) = post_form(
        http,
        "/api/v1/query_range",
        &[("query", &nested), ("start", "0"), ("end", "60"), ("step", "15")],
    )
    .await;
    assert_eq!(code, 400, "{body}");
    for path in ["/api/v1/series", "/api/v1/labels"] {
        let (code, body) = post_form(http, path, &[("match[]", &selector)]).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("query.max_depth"), "{path}: {body}");
    }
    // Label values is GET only (as in Prometheus): a 2,000-level selector fits in a URL.
    let short = format!("{}x{}", "sum(".repeat(2_000), ")".repeat(2_000));
    let url = format!(
        "http://{http}/api/v1/label/service/values?match[]={}",
        short.replace('(', "%28").replace(')', "%29")
    );
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("query.max_depth"), "{body}");
    seq += 1;
    println!("ack after the nested queries: {:?}", ack_latency(&mut ingest, seq).await);

    // At the limit itself, both shapes parse and evaluate (on the server's own threads).
    let at_limit = vec!["1"; 256].join("+");
    let (code, body) = post_form(http, "/api/v1/query", &[("query", &at_limit), ("time", "100")]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["result"][1], "256");
    let parens = format!("{}1{}", "(".repeat(127), ")".repeat(127));
    let (code, body) = post_form(http, "/api/v1/query", &[("query", &parens), ("time", "100")]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["result"][1], "1");
    let nested_at_limit =
        format!("{}rate(span_duration_seconds_count[1m]){}", "sum(".repeat(125), ")".repeat(125));
    let (code, body) =
        post_form(http, "/api/v1/query", &[("query", &nested_at_limit), ("time", "100")]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["resultType"], "vector", "{body}");

    let healthy = reqwest::get(format!("http://{http}/-/healthy")).await.unwrap();
    assert!(healthy.status().is_success());
    seq += 1;
    println!("ack after the queries at the limit: {:?}", ack_latency(&mut ingest, seq).await);
    server.shutdown().await;
}

/// S2: one OTLP span whose `tracestate` claims a sampling probability of 2⁻⁵⁶ was counted as
/// 4,294,967,295 spans. Its weight is now cut to `ingest.max_span_weight` and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_claiming_an_absurd_adjusted_count_is_clamped_and_counted() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let now = now_nanos() as u64;
    let span = |name: &str, tracestate: &str| Span {
        name: name.into(),
        start_time_unix_nano: now - 5_000_000,
        end_time_unix_nano: now,
        trace_state: tracestate.into(),
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![span("hostile", "ot=th:ffffffffffffff"), span("one-percent", "ot=th:fd70a4")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut client = TraceServiceClient::connect(format!("http://{}", server.grpc_addr())).await.unwrap();
    client.export(request).await.unwrap();
    let limit = tailscope_server::Config::default().ingest.max_span_weight;
    let rows = tail(server.http_addr(), "service=unknown_service&operation=hostile").await;
    assert_eq!(rows[0]["count"], u64::from(limit), "{rows:?}");
    let rows = tail(server.http_addr(), "service=unknown_service&operation=one-percent").await;
    assert_eq!(rows[0]["count"], 100, "a real 1 % sample keeps its weight: {rows:?}");
    let text = metrics(server.http_addr()).await;
    assert_eq!(metric(&text, "tailscope_span_weights_clamped_total"), 1.0);
    server.shutdown().await;
}

/// A3: `tail` over `start=0&end=9e18` and `query_exemplars` up to `end=1e12` walked time
/// partitions one by one without end. Empty partitions are now skipped with one seek, so both
/// answer at once, with the data that is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widest_time_ranges_answer_with_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    let now = now_nanos();
    ingest
        .send(batch(7, 1, vec![group("wide", "GET /", vec![span(now - 1_000_000_000, 2_000_000, false)])]))
        .await;
    ingest.wait_acked(1).await;
    let started = Instant::now();
    let rows = tail(http, "service=wide&start=0&end=9e18").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["count"], 1);
    println!("tail over [0, 9e18]: {:?}", started.elapsed());
    let started = Instant::now();
    for end in ["1e12", "9e18", "1e300"] {
        let v = get_json(
            http,
            &format!("/api/v1/query_exemplars?query=span_duration_seconds_bucket&start=0&end={end}"),
        )
        .await;
        // (Exemplars are stored when their window is handed over, so the span's may not be
        // there yet: what matters here is the answer itself.)
        assert_eq!(v["status"], "success", "{v}");
    }
    println!("query_exemplars up to 1e12, 9e18, 1e300: {:?}", started.elapsed());
    let v = get_json(
        http,
        "/api/v1/query_range?query=sum(increase(span_duration_seconds_count%5B1h%5D))&start=0&end=1e300&step=1e11",
    )
    .await;
    assert_eq!(v["status"], "success", "{v}");
    println!("ack after the wide scans: {:?}", ack_latency(&mut ingest, 2).await);
    server.shutdown().await;
}

/// U1: distinct `service` names had no cap (the operation cap was per service, so it was
/// bypassed). Beyond `ingest.max_services` they are counted under `service="__overflow__"`,
/// every span still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_beyond_the_cap_are_counted_under_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.ingest.max_services = 50;
    c.ingest.max_operations_per_service = 20;
    let server = tailscope_server::Server::start(c).await.unwrap();
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    let now = now_nanos();
    let groups: Vec<_> = (0..300)
        .map(|i| {
            group(&format!("svc-{i}"), &format!("op-{i}"), vec![span(now - 1_000_000_000, 1_000_000, false)])
        })
        .collect();
    ingest.send(batch(9, 1, groups)).await;
    ingest.wait_acked(1).await;
    let v = get_json(http, "/api/v1/label/service/values").await;
    let services = v["data"].as_array().unwrap();
    assert_eq!(services.len(), 51, "{v}");
    assert!(services.iter().any(|s| s == "__overflow__"));
    let rows = tail(http, "service=__overflow__").await;
    let counted: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 250, "every span of the 250 services beyond the cap: {rows:?}");
    // Their operations are capped as any service's: 20 names and __overflow__.
    assert_eq!(rows.len(), 21, "{rows:?}");
    let text = metrics(http).await;
    assert_eq!(metric(&text, "tailscope_spans_overflowed_total"), 250.0);
    assert_eq!(metric(&text, "tailscope_spans_accepted_total"), 300.0);
    server.shutdown().await;
}
