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

/// A2: `/labels`, `/label/<n>/values` and `/series` walked every stored series on the async
/// runtime (110 s and 9.6 GB at 300k series, ingest stalled). They are answered from the
/// in-memory posting lists within a query slot: exact where the selection is exact, cut at
/// `limit` with Prometheus' warning, and ingest keeps being acknowledged while many run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_and_series_calls_over_many_series_answer_from_the_index_while_ingest_goes_on() {
    const SERVICES: usize = 40;
    const OPERATIONS: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    let now = now_nanos();
    let mut seq = 0;
    for s in 0..SERVICES {
        seq += 1;
        let groups = (0..OPERATIONS)
            .map(|o| {
                group(
                    &format!("svc-{s:02}"),
                    &format!("op-{o:04}"),
                    vec![span(now - 1_000_000_000, 1_000_000, false)],
                )
            })
            .collect();
        ingest.send(batch(9, seq, groups)).await;
    }
    ingest.wait_acked(seq).await;
    let series = SERVICES * OPERATIONS;

    // Exact answers through the posting lists.
    let v = get_json(http, "/api/v1/label/service/values").await;
    assert_eq!(v["data"].as_array().unwrap().len(), SERVICES, "{v}");
    let v = get_json(
        http,
        "/api/v1/label/operation/values?match[]=span_duration_seconds_count{service=\"svc-07\"}",
    )
    .await;
    let ops = v["data"].as_array().unwrap();
    assert_eq!(ops.len(), OPERATIONS);
    assert_eq!(ops[0], "op-0000");
    let v = get_json(http, "/api/v1/series?match[]=span_duration_seconds_count{operation=\"op-0042\"}").await;
    assert_eq!(v["data"].as_array().unwrap().len(), SERVICES, "{v}");
    // Cut at the limit, saying so.
    let v = get_json(http, "/api/v1/label/operation/values?limit=10").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 10);
    assert!(v["warnings"][0].as_str().unwrap().contains("truncated"), "{v}");
    let v = get_json(http, "/api/v1/series?match[]={service=~\"svc-1.\"}&limit=50").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 50);
    assert!(v["warnings"][0].as_str().unwrap().contains("truncated"), "{v}");
    let v = get_json(http, "/api/v1/labels").await;
    assert_eq!(
        v["data"],
        serde_json::json!(["__name__", "le", "operation", "service", "span_kind", "status"])
    );

    // Four clients calling them in a loop (what Grafana's variable queries and the metrics
    // browser do) while a fifth sends batches and times each acknowledgement.
    let idle: Vec<_> = {
        let mut probe = open(server.grpc_addr()).await;
        let mut v = Vec::new();
        for seq in 1..=20 {
            v.push(ack_latency(&mut probe, seq).await);
        }
        v
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let paths = [
        "/api/v1/labels".to_owned(),
        "/api/v1/label/operation/values".to_owned(),
        "/api/v1/series?match[]={service=~\"svc-.*\"}".to_owned(),
        "/api/v1/label/status/values?match[]={operation=~\"op-00.*\"}".to_owned(),
    ];
    let callers: Vec<_> = paths
        .into_iter()
        .map(|path| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut calls = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let v = get_json(http, &path).await;
                    assert_eq!(v["status"], "success", "{path}: {v}");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut busy = Vec::new();
    let mut probe = open(server.grpc_addr()).await;
    for seq in 1..=40 {
        busy.push(ack_latency(&mut probe, 100 + seq).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for c in callers {
        calls += c.await.unwrap();
    }
    let health = reqwest::get(format!("http://{http}/-/healthy")).await.unwrap();
    assert!(health.status().is_success());
    let p = |v: &mut Vec<std::time::Duration>, q: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    };
    let (mut idle, mut busy) = (idle, busy);
    println!(
        "A2 {series} series: {calls} label/series calls during 40 acks; ack p50/max idle {:?}/{:?}, \
         during the calls {:?}/{:?}",
        p(&mut idle, 0.5),
        p(&mut idle, 1.0),
        p(&mut busy, 0.5),
        p(&mut busy, 1.0)
    );
    assert!(calls > 0);
    server.shutdown().await;
}

/// Spans spread over many series and the whole allowed lateness open one histogram per
/// (series, window) until their epoch is written — 3 million of them (6 GB) for a fast
/// backfill. At `ingest.max_open_windows` the shard asks for the epoch to be cut early: with
/// a flush interval of a minute, the batch below is acknowledged only because it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_windows_beyond_the_limit_cut_the_epoch_early() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.ingest.flush_interval = std::time::Duration::from_secs(60);
    c.ingest.max_open_windows = 1_000;
    let server = tailscope_server::Server::start(c).await.unwrap();
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    let now = now_nanos();
    // 100 series × 30 windows = 3,000 histograms, three times the limit.
    let groups = (0..100)
        .map(|s| {
            let spans = (0..30).map(|w| span(now - (w * 10 + 5) * 1_000_000_000, 1_000_000, false)).collect();
            group("backfill", &format!("op-{s}"), spans)
        })
        .collect();
    ingest.send(batch(3, 1, groups)).await;
    ingest.wait_acked(1).await;
    let text = metrics(http).await;
    assert!(metric(&text, "tailscope_early_epochs_total") >= 1.0, "{text}");
    // Every span counted.
    let rows = tail(http, "service=backfill&start=0&end=9e18").await;
    let counted: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 3_000, "{rows:?}");
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

async fn post_json(url: String, body: serde_json::Value) -> (u16, String) {
    let resp = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn silence(matchers: serde_json::Value, comment: &str) -> serde_json::Value {
    serde_json::json!({
        "matchers": matchers,
        "startsAt": "2020-01-01T00:00:00Z",
        "endsAt": "2999-01-01T00:00:00Z",
        "createdBy": "test",
        "comment": comment,
    })
}

/// Serves a webhook receiver on a free loopback port; returns its address.
async fn receiver(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A server configuration whose notifier sends every group (by alertname and service) at once
/// to `receiver`, with `extra` appended to the notifier's YAML.
fn notifying(dir: &std::path::Path, receiver: std::net::SocketAddr, extra: &str) -> tailscope_server::Config {
    let yaml = dir.join("am.yml");
    std::fs::write(
        &yaml,
        format!(
            "route:\n  receiver: hook\n  group_by: [alertname, service]\n  group_wait: 0s\n  group_interval: 1m\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n      - url: http://{receiver}/hook\n{extra}"
        ),
    )
    .unwrap();
    let mut c = config(&dir.join("data"));
    c.alerting.alertmanager_config = yaml;
    c
}

/// A5, U2: a 120-byte silence whose regex compiled to ~12 MB, comments of megabytes and
/// silences without number. Each is now refused naming its limit, and a restart with the most
/// silences allowed loads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silences_are_bounded_in_number_size_and_regex_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.alerting.max_silences = 20;
    let server = tailscope_server::Server::start(c.clone()).await.unwrap();
    let url = format!("http://{}/api/v2/silences", server.http_addr());
    let m = |name: &str, value: &str, regex: bool| serde_json::json!({"name": name, "value": value, "isRegex": regex});
    let (code, body) =
        post_json(url.clone(), silence(serde_json::json!([m("service", r"\w{200}", true)]), "")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("compiles to more than 256 KiB"), "{body}");
    let many: Vec<_> = (0..33).map(|i| m("service", &format!("s{i}"), false)).collect();
    let (code, body) = post_json(url.clone(), silence(serde_json::json!(many), "")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("33 matchers, more than the limit of 32"), "{body}");
    let (code, body) =
        post_json(url.clone(), silence(serde_json::json!([m("service", "a", false)]), &"x".repeat(20_000)))
            .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("alerting.max_silence_size_bytes"), "{body}");
    for i in 0..20 {
        let (code, body) = post_json(
            url.clone(),
            silence(serde_json::json!([m("service", &format!("svc-{i}.*"), true)]), "ok"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, body) =
        post_json(url.clone(), silence(serde_json::json!([m("service", "one-more", false)]), "")).await;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("alerting.max_silences"), "{body}");
    let mut ingest = open(server.grpc_addr()).await;
    println!("ack after the refused silences: {:?}", ack_latency(&mut ingest, 1).await);
    server.shutdown().await;
    // A restart loads every silence it kept.
    let server = tailscope_server::Server::start(c).await.unwrap();
    let listed = get_json(server.http_addr(), "/api/v2/silences").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(20), "{listed}");
    server.shutdown().await;
}

/// A5: 150 silences with a regex compiling to ~12 MB each cost 1.75 GB, again at every start.
/// With the default `alerting.max_silences` (1,000) each holding the costliest regex the
/// limit lets through (`\w{3}`, ~175 KiB compiled, under the 256 KiB bound), a restart loads
/// them all within memory bounded by those limits (1,000 × 256 KiB), and ingest is
/// acknowledged meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_most_silences_allowed_loads_them_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, http) = spawn_server(dir.path(), &[]);
    let mut child = Peer(child);
    let url = format!("http://{http}/api/v2/silences");
    let m = |value: String| serde_json::json!([{"name": "service", "value": value, "isRegex": true}]);
    for i in 0..1_000 {
        let (code, body) = post_json(url.clone(), silence(m(format!(r"\w{{3}}-{i}")), "worst allowed")).await;
        assert_eq!(code, 200, "silence {i}: {body}");
    }
    let (code, body) = post_json(url.clone(), silence(m("one-more".into()), "")).await;
    assert_eq!(code, 429, "{body}");
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    child.0.wait().unwrap();
    let (restarted, grpc_again, http) = spawn_server(dir.path(), &[]);
    let restarted = Peer(restarted);
    let _ = grpc;
    let listed = get_json(http, "/api/v2/silences").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1_000));
    let peak = proc_status_bytes(restarted.0.id(), "VmHWM:");
    let mut ingest = open(grpc_again).await;
    println!(
        "restart with 1,000 silences of \\w{{3}}: peak RSS {} MiB; ack {:?}",
        peak >> 20,
        ack_latency(&mut ingest, 1).await
    );
    assert!(peak < 1 << 30, "peak RSS {} MiB at start, beyond 1,000 × 256 KiB and the base", peak >> 20);
}

/// U3, A7: posted alerts had no cap, and 5,000 groups meant 5,000 webhook POSTs at once. The
/// notifier now holds at most `alerting.max_alerts` (a POST beyond gets 429; updates of known
/// alerts pass), and delivers through a pool of `alerting.max_concurrent_deliveries`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_alerts_are_capped_and_deliveries_go_through_a_bounded_pool() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // A slow receiver that remembers the most requests it had in flight at once.
    #[derive(Clone, Default)]
    struct Slow {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        done: Arc<AtomicUsize>,
    }
    async fn hook(axum::extract::State(s): axum::extract::State<Slow>) -> &'static str {
        let n = s.now.fetch_add(1, Ordering::SeqCst) + 1;
        s.most.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        s.now.fetch_sub(1, Ordering::SeqCst);
        s.done.fetch_add(1, Ordering::SeqCst);
        "ok"
    }
    let slow = Slow::default();
    let raddr =
        receiver(axum::Router::new().fallback(axum::routing::post(hook)).with_state(slow.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = notifying(dir.path(), raddr, "");
    c.alerting.max_alerts = 300;
    c.alerting.max_concurrent_deliveries = 8;
    let server = tailscope_server::Server::start(c).await.unwrap();
    let url = format!("http://{}/api/v2/alerts", server.http_addr());
    let alert = |service: String| serde_json::json!({"labels": {"alertname": "Slow", "service": service}});
    let alerts = |range: std::ops::Range<usize>| {
        serde_json::json!(range.map(|i| alert(format!("s{i}"))).collect::<Vec<_>>())
    };
    let (code, body) = post_json(url.clone(), alerts(0..400)).await;
    assert_eq!(code, 429, "400 new alerts do not fit under 300: {body}");
    assert!(body.contains("alerting.max_alerts"), "{body}");
    let (code, body) = post_json(url.clone(), alerts(0..300)).await;
    assert_eq!(code, 200, "{body}");
    assert_eventually!(slow.done.load(Ordering::SeqCst) >= 300, "300 groups delivered");
    let (code, _) = post_json(url.clone(), alerts(300..301)).await;
    assert_eq!(code, 429, "a new alert beyond the cap");
    let (code, _) = post_json(url.clone(), alerts(0..1)).await;
    assert_eq!(code, 200, "an update of a known alert");
    let most = slow.most.load(Ordering::SeqCst);
    let mut ingest = open(server.grpc_addr()).await;
    println!(
        "300 groups: at most {most} deliveries in flight at once; ack meanwhile {:?}",
        ack_latency(&mut ingest, 1).await
    );
    assert!(most <= 8, "{most} deliveries at once, more than the pool of 8");
    let text = metrics(server.http_addr()).await;
    assert!(metric(&text, "tailscope_limit_hits_total{limit=\"alerting.max_alerts\"}") >= 2.0, "{text}");
    server.shutdown().await;
}

/// Posts in quick succession were each checked against the alerts the notifier had taken in
/// so far, while earlier posts still waited in its queue: together they passed the cap and
/// the excess was dropped after a 200. A post is now admitted all or none under one lock
/// before it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_in_quick_succession_cannot_pass_the_alert_cap_together() {
    let raddr = receiver(axum::Router::new().fallback(axum::routing::post(|| async { "ok" }))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = notifying(dir.path(), raddr, "");
    c.alerting.max_alerts = 300;
    let server = tailscope_server::Server::start(c).await.unwrap();
    let url = format!("http://{}/api/v2/alerts", server.http_addr());
    let alerts = |range: std::ops::Range<usize>| {
        serde_json::json!(range
            .map(|i| serde_json::json!({"labels": {"alertname": "Burst", "service": format!("s{i}")}}))
            .collect::<Vec<_>>())
    };
    let (first, second) =
        tokio::join!(post_json(url.clone(), alerts(0..200)), post_json(url.clone(), alerts(200..400)));
    let mut codes = [first.0, second.0];
    codes.sort();
    assert_eq!(codes, [200, 429], "{first:?} {second:?}");
    let held: Vec<serde_json::Value> = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(held.len(), 200, "every alert of the admitted post, none of the other");
    let text = metrics(server.http_addr()).await;
    assert_eq!(metric(&text, "tailscope_alerts_dropped_total"), 0.0, "nothing accepted was dropped");
    server.shutdown().await;
}

/// A4: silence and inhibition matching was O(alerts × silences) and O(alerts²) on the async
/// runtime: a POST of 20,000 alerts with the example inhibit rule stalled ingest for a minute.
/// Now inhibition is an index lookup and mute answers are cached per alert: ingest keeps
/// being acknowledged (its latency printed), and inhibition and silences still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_alerts_with_silences_and_inhibition_do_not_stall_ingest() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let delivered = Arc::new(AtomicUsize::new(0));
    let tickets = Arc::new(AtomicUsize::new(0));
    async fn hook(
        axum::extract::State((n, t)): axum::extract::State<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
        axum::Json(body): axum::Json<serde_json::Value>,
    ) -> &'static str {
        let alerts = body["alerts"].as_array().cloned().unwrap_or_default();
        n.fetch_add(alerts.len(), Ordering::SeqCst);
        t.fetch_add(alerts.iter().filter(|a| a["labels"]["severity"] == "ticket").count(), Ordering::SeqCst);
        "ok"
    }
    let app = axum::Router::new()
        .fallback(axum::routing::post(hook))
        .with_state((delivered.clone(), tickets.clone()));
    let raddr = receiver(app).await;
    let dir = tempfile::tempdir().unwrap();
    let inhibit = "inhibit_rules:\n  - source_matchers: ['severity=\"page\"']\n    target_matchers: ['severity=\"ticket\"']\n    equal: [service]\n";
    let c = notifying(dir.path(), raddr, inhibit);
    let server = tailscope_server::Server::start(c).await.unwrap();
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    // The most silences allowed, each muting one service of the first thousand.
    for i in 0..1_000 {
        let body = silence(
            serde_json::json!([{"name": "service", "value": format!("s{i}"), "isRegex": false},
                               {"name": "alertname", "value": "Latency.*", "isRegex": true}]),
            "maintenance",
        );
        let (code, text) = post_json(format!("http://{http}/api/v2/silences"), body).await;
        assert_eq!(code, 200, "{text}");
    }
    // 20,000 alerts in one POST: a page and a ticket for each of 10,000 services.
    let alerts: Vec<_> = (0..10_000)
        .flat_map(|i| {
            [("LatencyPage", "page"), ("ErrorTicket", "ticket")].map(|(name, severity)| {
                serde_json::json!({"labels": {"alertname": name, "service": format!("s{i}"), "severity": severity}})
            })
        })
        .collect();
    let started = Instant::now();
    let (code, text) = post_json(format!("http://{http}/api/v2/alerts"), serde_json::json!(alerts)).await;
    assert_eq!(code, 200, "{text}");
    let mut seq = 0;
    let mut slowest = std::time::Duration::ZERO;
    // Ingest keeps being acknowledged while the notifier works through it.
    while delivered.load(Ordering::SeqCst) < 9_000 {
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "pages not delivered");
        seq += 1;
        slowest = slowest.max(ack_latency(&mut ingest, seq).await);
        assert!(reqwest::get(format!("http://{http}/-/healthy")).await.unwrap().status().is_success());
    }
    println!(
        "20,000 alerts, 1,000 silences, an inhibit rule: 9,000 pages delivered in {:?}; {seq} ingest acks meanwhile, slowest {slowest:?}",
        started.elapsed()
    );
    // Every ticket is inhibited by its service's page; the first thousand pages are silenced.
    assert_eq!(tickets.load(Ordering::SeqCst), 0, "a ticket got through its inhibition");
    let v = get_json(http, "/api/v2/alerts?filter=service%3D%22s5000%22").await;
    let states: Vec<_> = v.as_array().unwrap().iter().map(|a| a["status"]["state"].clone()).collect();
    assert!(states.contains(&serde_json::json!("suppressed")), "{v}");
    server.shutdown().await;
}

/// A6: at a file-descriptor limit, both listeners spun at 100 % on EMFILE. Now accepting backs
/// off (the server's CPU while it is out of descriptors is printed), and once connections
/// close the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_listeners_back_off_and_recover() {
    let Some(prlimit) = on_path("prlimit") else {
        eprintln!("SKIPPED: prlimit (util-linux) is not on PATH");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (child, _grpc, http) = spawn_server(dir.path(), &[]);
    let mut child = Peer(child);
    let pid = child.0.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = open + 12;
    let status = std::process::Command::new(prlimit)
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed");
    // More connections than descriptors left: the kernel's backlog holds what cannot be accepted.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    let before = cpu_seconds(pid);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let spent = cpu_seconds(pid) - before;
    println!("out of descriptors (limit {limit}, {open} open at start): server CPU {spent:.2} s over 2 s");
    drop(held);
    let mut healthy = false;
    for _ in 0..300 {
        let ok =
            reqwest::get(format!("http://{http}/-/healthy")).await.is_ok_and(|r| r.status().is_success());
        if ok {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(healthy, "the server did not answer again once connections closed");
    let text = metrics(http).await;
    assert!(metric(&text, "tailscope_limit_hits_total{limit=\"open_files\"}") >= 1.0, "{text}");
    child.0.kill().unwrap();
}

/// SIGTERM while queries are running: the server writes what it accepted and exits without
/// waiting for the queries (they are cancelled); the time it took is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_queries_exits_within_the_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, http) = spawn_server(dir.path(), &[("TAILSCOPE_SHUTDOWN_TIMEOUT", "2s")]);
    let mut child = Peer(child);
    let mut ingest = open(grpc).await;
    let now = now_nanos();
    let groups: Vec<_> = (0..2_000)
        .map(|i| {
            group(
                "busy",
                &format!("op-{i}"),
                (0..20).map(|k| span(now - k * 1_000_000_000, 1_000_000, false)).collect(),
            )
        })
        .collect();
    ingest.send(batch(11, 1, groups)).await;
    ingest.wait_acked(1).await;
    // Range queries over every series, several at once, kept going.
    let q = "histogram_quantile(0.99, sum by (operation, le) (rate(span_duration_seconds_bucket%5B1m%5D)))";
    let end = now / 1_000_000_000;
    let url = format!("http://{http}/api/v1/query_range?query={q}&start={}&end={end}&step=1", end - 3600);
    let queries: Vec<_> = (0..4).map(|_| tokio::spawn(reqwest::get(url.clone()))).collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = Instant::now();
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = child.0.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let status = status.expect("the server exited after SIGTERM");
    println!("SIGTERM with 4 queries running: exited in {:?} ({status})", started.elapsed());
    assert!(status.success(), "{status}");
    for q in queries {
        let _ = q.await; // answered or cut off: either way the server did not wait for them.
    }
    // What was acknowledged is there after a restart.
    let (restarted, _, http) = spawn_server(dir.path(), &[]);
    let _restarted = Peer(restarted);
    let rows = tail(http, "service=busy").await;
    assert_eq!(rows.iter().map(|r| r["count"].as_u64().unwrap()).sum::<u64>(), 40_000);
}

/// A1: a quantile by every label over 1 h at `step=1` across 4,001 series built a 337 MB answer
/// in 4.6 GB of memory past the timeout. Now the query is refused before it reads, naming
/// `query.max_samples`, and the same query at a step that fits is answered; ingest is
/// acknowledged throughout (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_holding_more_samples_than_allowed_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let http = server.http_addr();
    let mut ingest = open(server.grpc_addr()).await;
    let now = now_nanos();
    let groups: Vec<_> = (0..4_001)
        .map(|i| group("wide", &format!("op-{i}"), vec![span(now - 2_000_000_000, 1_000_000, false)]))
        .collect();
    ingest.send(batch(7, 1, groups)).await;
    ingest.wait_acked(1).await;
    let q = "histogram_quantile(0.99, sum by (le, service, operation, status) (rate(span_duration_seconds_bucket%5B1m%5D)))";
    let end = now / 1_000_000_000;
    let url = |step: u32| format!("/api/v1/query_range?query={q}&start={}&end={end}&step={step}", end - 3600);
    let v = get_json(http, &url(1)).await;
    assert_eq!(v["errorType"], "execution", "{v}");
    assert!(v["error"].as_str().unwrap().contains("query.max_samples"), "{v}");
    println!("ack after the refused query: {:?}", ack_latency(&mut ingest, 2).await);
    let v = get_json(http, &url(60)).await;
    assert_eq!(v["status"], "success", "{v}");
    // Every one of the 4,001 series (the ack probe's may or may not be in range).
    let wide =
        v["data"]["result"].as_array().unwrap().iter().filter(|r| r["metric"]["service"] == "wide").count();
    assert_eq!(wide, 4_001);
    println!("ack after the 4,001-series answer: {:?}", ack_latency(&mut ingest, 3).await);
    let text = metrics(http).await;
    assert!(metric(&text, "tailscope_limit_hits_total{limit=\"query.max_samples\"}") >= 1.0, "{text}");
    server.shutdown().await;
}
