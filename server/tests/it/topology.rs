//! The service graph from exact spans: edges are series (a caller's CLIENT spans with the
//! callee as `peer`, a callee's SERVER spans with the caller), so their counts hold under
//! sampling, and they read through Tempo's metric names and `/api/v1/topology`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use tailscope::{SpanKind, Status};

/// `expr` evaluated now: (client, server) → value.
async fn edges(http: std::net::SocketAddr, expr: &str) -> BTreeMap<(String, String), f64> {
    instant_rows(http, expr, &["client", "server"])
        .await
        .into_iter()
        .map(|(mut k, v)| {
            let server = k.pop().unwrap_or_default();
            ((k.pop().unwrap_or_default(), server), v)
        })
        .collect()
}

fn edge(client: &str, server: &str) -> (String, String) {
    (client.to_owned(), server.to_owned())
}

/// frontend → checkout → payments and checkout → db:postgres through the client crate, with
/// a sampling budget of 1 % of the traffic: most spans travel folded, and every edge still
/// counts exactly the calls made, failed calls included; `/api/v1/topology` draws the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_count_every_call_under_a_one_percent_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.sampling.budget = 100.0;
    c.sampling.interval = Duration::from_millis(200);
    let server = start_with(c, Arc::new(tailscope_server::clock::SystemClock)).await;
    let grpc = server.grpc_addr();
    let (frontend, checkout, payments) = (
        connected("frontend", grpc).await,
        connected("checkout", grpc).await,
        connected("payments", grpc).await,
    );
    let ms = Duration::from_millis;
    let (mut requests, mut failed) = (0u64, 0u64);
    // 10,000 requests a second for 2 s; every tenth charge fails.
    for round in 0..20 {
        for i in 0..1_000u64 {
            let n = round * 1_000 + i;
            let status = if n % 10 == 0 { Status::Error } else { Status::Ok };
            requests += 1;
            failed += u64::from(status == Status::Error);
            payments.record_peer("Charge", SpanKind::Server, "checkout", ms(40), status);
            checkout.record_peer("Charge", SpanKind::Client, "payments", ms(42), status);
            checkout.record_peer("SELECT cart", SpanKind::Client, "db:postgres", ms(3), Status::Ok);
            checkout.record_peer("SELECT cart", SpanKind::Client, "db:postgres", ms(3), Status::Ok);
            checkout.record_peer("POST /checkout", SpanKind::Server, "frontend", ms(50), status);
            frontend.record_peer("POST /checkout", SpanKind::Client, "checkout", ms(52), status);
            frontend.record_kind("GET /cart", SpanKind::Server, ms(55), status);
        }
        tokio::time::sleep(ms(100)).await;
    }
    for client in [&frontend, &checkout, &payments] {
        client.flush_within(Duration::from_secs(30)).await.unwrap();
    }
    let http = server.http_addr();
    let text = metrics(http).await;
    let full = metric(&text, "tailscope_spans_received_total{form=\"full\"}");
    let folded = metric(&text, "tailscope_spans_received_total{form=\"folded\"}");
    assert_eq!(full + folded, 7.0 * requests as f64);
    assert!(full < 0.5 * (full + folded), "sampling sent {full} of {} in full", full + folded);

    let r = requests as f64;
    let calls =
        edges(http, "sum by (client, server) (increase(traces_service_graph_request_total[10m]))").await;
    assert_eq!(
        calls,
        BTreeMap::from([
            (edge("checkout", "db:postgres"), 2.0 * r),
            (edge("checkout", "payments"), r),
            (edge("frontend", "checkout"), r),
        ])
    );
    let failures =
        edges(http, "sum by (client, server) (increase(traces_service_graph_request_failed_total[10m]))")
            .await;
    let f = failed as f64;
    assert_eq!(
        failures,
        BTreeMap::from([(edge("checkout", "payments"), f), (edge("frontend", "checkout"), f)])
    );
    let served = edges(
        http,
        "sum by (client, server) (increase(traces_service_graph_request_server_seconds_count[10m]))",
    )
    .await;
    assert_eq!(
        served,
        BTreeMap::from([(edge("checkout", "payments"), r), (edge("frontend", "checkout"), r)])
    );
    let p99 = edges(
        http,
        "histogram_quantile(0.99, sum by (le, client, server) (rate(traces_service_graph_request_client_seconds_bucket[10m])))",
    )
    .await;
    for ((client, server), want) in [(("checkout", "payments"), 0.042), (("frontend", "checkout"), 0.052)] {
        let got = p99[&edge(client, server)];
        assert!((got - want).abs() <= want * 0.01, "{client}→{server}: p99 {got}");
    }
    // The services' own latency is their own work only: three server spans per request.
    let own = edges(http, "sum(increase(span_duration_seconds_count[10m]))").await;
    assert_eq!(own.values().copied().collect::<Vec<_>>(), [3.0 * r], "{own:?}");

    let topology = get_json(http, "/api/v1/topology?start=0").await;
    assert_eq!(topology["status"], "success", "{topology}");
    let nodes: Vec<&str> =
        topology["data"]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["checkout", "db:postgres", "frontend", "payments"]);
    let db = topology["data"]["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "db:postgres").unwrap();
    assert_eq!(db["detail__instrumented"], false, "{db}");
    let charge = topology["data"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "checkout->payments")
        .unwrap()
        .clone();
    assert_eq!(
        (charge["detail__calls"].as_f64(), charge["detail__failed"].as_f64()),
        (Some(r), Some(f)),
        "{charge}"
    );
    let labels = get_json(http, "/api/v1/label/peer/values").await;
    assert_eq!(labels["data"], serde_json::json!(["checkout", "db:postgres", "frontend", "payments"]));
    let bad = get_json(http, "/api/v1/topology?step=5").await;
    assert_eq!(bad["errorType"], "bad_data", "{bad}");
    for client in [frontend, checkout, payments] {
        client.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    server.shutdown().await;
}

/// OpenTelemetry CLIENT spans name their callee by semantic conventions (`peer.service`,
/// `db.system`, `server.address`) and become the same edges, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_client_spans_draw_edges_to_their_peers() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_nanos();
    let span = |name: &str, kind: i32, attributes: serde_json::Value, i: i64| {
        let end = now - (i + 1) * 1_000_000_000;
        serde_json::json!({
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "name": name, "kind": kind, "attributes": attributes,
            "startTimeUnixNano": (end - 20_000_000).to_string(), "endTimeUnixNano": end.to_string(),
        })
    };
    let attr = |k: &str, v: &str| serde_json::json!({"key": k, "value": {"stringValue": v}});
    let mut spans = Vec::new();
    for i in 0..30 {
        spans.push(span(
            "POST /pay",
            3,
            serde_json::json!([attr("peer.service", "payments"), attr("server.address", "10.0.0.7")]),
            i,
        ));
        spans.push(span(
            "SELECT",
            3,
            serde_json::json!([attr("db.system", "postgresql"), attr("server.address", "pg")]),
            i,
        ));
        spans.push(span("GET /rates", 3, serde_json::json!([attr("server.address", "api.fx.example")]), i));
        spans.push(span("POST /checkout", 2, serde_json::json!([attr("peer.service", "ignored")]), i));
    }
    let body = serde_json::to_vec(&serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [attr("service.name", "checkout")]},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}],
    }]}))
    .unwrap();
    for restarted in [false, true] {
        let server = start(dir.path()).await;
        if !restarted {
            post_otlp_json(server.otlp_http_addr(), body.clone()).await;
        }
        let calls = edges(
            server.http_addr(),
            "sum by (client, server) (increase(traces_service_graph_request_total[10m]))",
        )
        .await;
        assert_eq!(
            calls,
            BTreeMap::from([
                (edge("checkout", "api.fx.example"), 30.0),
                (edge("checkout", "db:postgresql"), 30.0),
                (edge("checkout", "payments"), 30.0),
            ]),
            "restarted={restarted}"
        );
        server.shutdown().await;
    }
}

/// OpenTelemetry SERVER spans name no caller: the server pairs them with their caller's CLIENT
/// spans (same trace, parent = the call), whichever export comes first, and labels the end that
/// arrives second; what finds no other end is counted as unpaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_requests_get_their_caller_by_pairing_the_two_ends_of_a_call() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let t0 = (now_nanos() / 1_000_000_000 * 1_000_000_000) as u64;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let span = |id: &str, parent: &str, kind: i32, peer: Option<&str>| {
        let attributes: Vec<serde_json::Value> = peer
            .map(|p| serde_json::json!({ "key": "peer.service", "value": { "stringValue": p } }))
            .into_iter()
            .collect();
        serde_json::json!({
            "traceId": trace, "spanId": id, "parentSpanId": parent,
            "name": "POST /charge", "kind": kind,
            "startTimeUnixNano": t0.to_string(), "endTimeUnixNano": (t0 + 5_000_000).to_string(),
            "attributes": attributes,
        })
    };
    let export = |service: &str, spans: Vec<serde_json::Value>| {
        serde_json::to_vec(&serde_json::json!({ "resourceSpans": [{
            "resource": { "attributes": [{ "key": "service.name", "value": { "stringValue": service } }] },
            "scopeSpans": [{ "spans": spans }],
        }] }))
        .unwrap()
    };
    let otlp = server.otlp_http_addr();
    // checkout's calls first: one names payments, one names nobody.
    post_otlp_json(
        otlp,
        export(
            "checkout",
            vec![span("00000000000000a1", "", 3, Some("payments")), span("00000000000000a2", "", 3, None)],
        ),
    )
    .await;
    // payments' requests: two answer those calls, one a call never seen.
    post_otlp_json(
        otlp,
        export(
            "payments",
            vec![
                span("00000000000000b1", "00000000000000a1", 2, None),
                span("00000000000000b2", "00000000000000a2", 2, None),
                span("00000000000000b3", "00000000000000a9", 2, None),
            ],
        ),
    )
    .await;
    // The other order: the request, then the call that names nobody.
    post_otlp_json(otlp, export("payments", vec![span("00000000000000b4", "00000000000000a4", 2, None)]))
        .await;
    post_otlp_json(otlp, export("checkout", vec![span("00000000000000a4", "", 3, None)])).await;

    let http = server.http_addr();
    let served = edges(
        http,
        "sum by (client, server) (increase(traces_service_graph_request_server_seconds_count[10m]))",
    )
    .await;
    assert_eq!(
        served,
        BTreeMap::from([(edge("checkout", "payments"), 2.0)]),
        "the requests that arrived second"
    );
    let calls =
        edges(http, "sum by (client, server) (increase(traces_service_graph_request_total[10m]))").await;
    assert_eq!(calls, BTreeMap::from([(edge("checkout", "payments"), 2.0)]), "named, and paired second");
    // payments' own latency still counts all four requests, paired or not.
    let own = edges(http, "sum(increase(span_duration_seconds_count{service=\"payments\"}[10m]))").await;
    assert_eq!(own.values().copied().collect::<Vec<_>>(), [4.0]);
    let text = metrics(http).await;
    assert_eq!(metric(&text, "tailscope_topology_paired_spans_total{side=\"server\"}"), 2.0);
    assert_eq!(metric(&text, "tailscope_topology_paired_spans_total{side=\"client\"}"), 1.0);
    assert_eq!(metric(&text, "tailscope_topology_unpaired_spans_total{side=\"server\"}"), 2.0);
    assert_eq!(metric(&text, "tailscope_topology_unpaired_spans_total{side=\"client\"}"), 1.0);
    server.shutdown().await;
}
