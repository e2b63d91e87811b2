//! The Prometheus HTTP API as Grafana uses it: its own probe calls, golden JSON shapes of every
//! endpoint (errors included), exact quantiles through the real store, and the shipped
//! dashboards run against a live server.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tailscope_server::clock::ManualClock;

/// Golden files live in tests/golden; `TAILSCOPE_UPDATE_GOLDEN=1` rewrites them.
fn golden(name: &str, actual: &Value) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.json"));
    let pretty = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("TAILSCOPE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &pretty).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    assert_eq!(pretty, expected, "{name} differs from {}", path.display());
}

/// The answer's status code and body.
async fn call(http: std::net::SocketAddr, method: &str, path: &str, form: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("http://{http}{path}");
    let req = match method {
        "GET" => client.get(url),
        "POST" => client
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.unwrap_or("").to_owned()),
        other => client.request(reqwest::Method::from_bytes(other.as_bytes()).unwrap(), url),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

const T: i64 = 1_800_000_000; // the fixed "now" of these tests, aligned to the hour
const SEC: i64 = 1_000_000_000;

/// A server at fixed time T holding a small known data set: two services, errors included.
async fn known_server(dir: &std::path::Path) -> tailscope_server::Server {
    let clock = Arc::new(ManualClock::new(T * SEC));
    let server = start_with(config(dir), clock).await;
    let mut s = open(server.grpc_addr()).await;
    let mut seq = 0;
    for (service, op, base) in [("checkout", "POST /pay", 20_000_000i64), ("search", "GET /q", 5_000_000)] {
        let spans =
            (0..60).map(|i| span(T * SEC - (i + 1) * 5 * SEC, base * (1 + i % 4), i % 10 == 0)).collect();
        seq += 1;
        s.send(batch(1, seq, vec![group(service, op, spans)])).await;
    }
    s.wait_acked(seq).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_probe_calls_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = known_server(dir.path()).await;
    let http = server.http_addr();
    // "Save & test".
    let (code, body) = call(http, "POST", "/api/v1/query", Some("query=1%2B1&time=4")).await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        serde_json::json!({"status": "success", "data": {"resultType": "scalar", "result": [4, "2"]}})
    );
    // The exemplar probe.
    let (code, body) =
        call(http, "GET", "/api/v1/query_exemplars?query=test&start=1700000000000&end=1700000060000", None)
            .await;
    assert_eq!((code, &body["status"]), (200, &Value::from("success")), "{body}");
    // The query editor.
    let (_, names) = call(http, "GET", "/api/v1/label/__name__/values?limit=40000", None).await;
    assert_eq!(
        names["data"],
        serde_json::json!([
            "span_duration_seconds_bucket",
            "span_duration_seconds_count",
            "span_duration_seconds_sum"
        ])
    );
    let (_, labels) = call(http, "GET", "/api/v1/labels?limit=40000", None).await;
    assert_eq!(labels["data"], serde_json::json!(["__name__", "le", "operation", "service", "status"]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_shapes_match_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = known_server(dir.path()).await;
    let http = server.http_addr();
    let q = |s: &str| {
        s.replace(' ', "%20").replace('{', "%7B").replace('}', "%7D").replace('"', "%22").replace('+', "%2B")
    };
    let cases: Vec<(&str, &str, String, Option<String>)> = vec![
        ("query_vector", "GET", format!("/api/v1/query?query={}&time={T}", q("histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[5m])))")), None),
        ("query_post_form", "POST", "/api/v1/query".into(), Some(format!("query={}&time={T}", q("sum by (service) (increase(span_duration_seconds_count[5m]))")))),
        ("query_bucket_le", "GET", format!("/api/v1/query?query={}&time={T}", q("sum by (le) (increase(span_duration_seconds_bucket{service=\"checkout\", le=\"0.05\"}[5m]))")), None),
        ("query_range_matrix", "GET", format!("/api/v1/query_range?query={}&start={}&end={T}&step=60", q("sum by (status) (increase(span_duration_seconds_count[1m]))"), T - 300), None),
        ("query_scalar_special_values", "GET", format!("/api/v1/query?query={}&time={T}.5", q("1/0")), None),
        ("labels", "GET", "/api/v1/labels".into(), None),
        ("label_values_service", "GET", "/api/v1/label/service/values".into(), None),
        ("series", "GET", format!("/api/v1/series?match[]={}", q("span_duration_seconds_count{service=\"search\"}")), None),
        ("metadata", "GET", "/api/v1/metadata".into(), None),
        ("buildinfo", "GET", "/api/v1/status/buildinfo".into(), None),
        ("exemplars", "GET", format!("/api/v1/query_exemplars?query={}&start={}&end={T}", q("span_duration_seconds_bucket"), T - 60), None),
        ("rules", "GET", "/api/v1/rules".into(), None),
        ("alerts", "GET", "/api/v1/alerts".into(), None),
        ("error_parse", "GET", format!("/api/v1/query?query={}", q("sum(rate(x[5m])")), None),
        ("error_unsupported", "GET", format!("/api/v1/query?query={}&time={T}", q("abs(rate(span_duration_seconds_count[5m]))")), None),
        ("error_bad_time", "GET", "/api/v1/query?query=1&time=yesterday".into(), None),
        ("error_range_step", "GET", "/api/v1/query_range?query=1&start=100&end=200&step=0".into(), None),
        ("error_range_points", "GET", "/api/v1/query_range?query=1&start=0&end=100000&step=1".into(), None),
        ("error_series_no_match", "GET", "/api/v1/series".into(), None),
    ];
    for (name, method, path, form) in cases {
        let (code, body) = call(http, method, &path, form.as_deref()).await;
        let expected_code = if name.starts_with("error") { 400 } else { 200 };
        assert_eq!(code, expected_code, "{name}: {body}");
        golden(name, &body);
    }
    // A refused method.
    let (code, _) = call(http, "PUT", "/api/v1/query", None).await;
    assert_eq!(code, 405);
    server.shutdown().await;
}

/// Exact quantiles through the real store, per series and summed over many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_quantile_matches_sorted_data_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T * SEC));
    let server = start_with(config(dir.path()), clock).await;
    let mut r = rand::rngs::StdRng::seed_from_u64(9);
    let mut raw: std::collections::BTreeMap<(String, String), Vec<i64>> = Default::default();
    let mut s = open(server.grpc_addr()).await;
    let mut seq = 0;
    for service in ["lognormal", "bimodal", "pareto"] {
        for op in 0..4 {
            let operation = format!("op{op}");
            let mut spans = Vec::new();
            for i in 0..5_000i64 {
                let d: i64 = match service {
                    "lognormal" => {
                        let z: f64 = (-2.0 * r.gen_range(1e-12f64..1.0).ln()).sqrt()
                            * (r.gen::<f64>() * std::f64::consts::TAU).cos();
                        (30e6 * (0.6 * z).exp()) as i64
                    }
                    "bimodal" => {
                        if r.gen_bool(0.95) {
                            r.gen_range(2_000_000..3_000_000)
                        } else {
                            r.gen_range(400_000_000..600_000_000)
                        }
                    }
                    _ => (5e6 / r.gen_range(1e-6f64..1.0).powf(1.0 / 1.2)) as i64,
                };
                spans.push(span(T * SEC - (i % 600 + 1) * SEC, d, false));
                raw.entry((service.into(), operation.clone())).or_default().push(d);
            }
            seq += 1;
            s.send(batch(2, seq, vec![group(service, &operation, spans)])).await;
        }
    }
    s.wait_acked(seq).await;
    let http = server.http_addr();
    let exact = |v: &mut Vec<i64>| {
        v.sort_unstable();
        let rank = ((0.99 * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1] as f64 / 1e9
    };
    let query = |expr: String| {
        let encoded: String = form_encode(&expr);
        async move {
            let (code, body) =
                call(http, "GET", &format!("/api/v1/query?query={encoded}&time={T}"), None).await;
            assert_eq!(code, 200, "{body}");
            body["data"]["result"].as_array().unwrap().clone()
        }
    };
    let per_series = query("histogram_quantile(0.99, rate(span_duration_seconds_bucket[10m]))".into()).await;
    assert_eq!(per_series.len(), 12);
    for row in per_series {
        let key = (
            row["metric"]["service"].as_str().unwrap().to_owned(),
            row["metric"]["operation"].as_str().unwrap().to_owned(),
        );
        let got: f64 = row["value"][1].as_str().unwrap().parse().unwrap();
        let want = exact(raw.get_mut(&key).unwrap());
        assert!((got - want).abs() <= want * 0.01, "{key:?}: {got} vs exact {want}");
    }
    for row in query(
        "histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[10m])))".into(),
    )
    .await
    {
        let service = row["metric"]["service"].as_str().unwrap();
        let mut all: Vec<i64> =
            raw.iter().filter(|((s, _), _)| s == service).flat_map(|(_, v)| v.clone()).collect();
        let got: f64 = row["value"][1].as_str().unwrap().parse().unwrap();
        let want = exact(&mut all);
        assert!((got - want).abs() <= want * 0.01, "{service}: {got} vs exact {want}");
    }
    server.shutdown().await;
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every panel of every dashboard: has a description and uses the data-source variable. Every
/// expression of the overview dashboard, with the variables substituted as Grafana would, runs
/// against a live server holding data and returns something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_lint_and_run_against_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = known_server(dir.path()).await;
    let http = server.http_addr();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut ran = 0;
    for name in ["tailscope-overview.json", "tailscope-server.json"] {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(root.join(name)).unwrap()).unwrap();
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{name}: no datasource variable"
        );
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap_or("?");
            assert!(
                p["description"].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{name}/{title}: no description"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}/{title}: not the data-source variable"
            );
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "{name}/{title}: a target without the data-source variable"
                );
            }
        }
        if name != "tailscope-overview.json" {
            continue; // reads the server's own /metrics through a Prometheus that scrapes it
        }
        // Variable queries: label_values(selector, label) is answered through /api/v1/series.
        for v in vars.iter().filter(|v| v["type"] == "query") {
            let q = v["query"]["query"].as_str().unwrap().replace("$service", ".*");
            let inner = q.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).unwrap();
            let (selector, label) = inner.rsplit_once(',').unwrap();
            let (code, body) = call(
                http,
                "GET",
                &format!("/api/v1/label/{}/values?match[]={}", label.trim(), form_encode(selector.trim())),
                None,
            )
            .await;
            assert_eq!(code, 200, "{q}: {body}");
            assert!(!body["data"].as_array().unwrap().is_empty(), "{q}: no values");
            ran += 1;
        }
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$service", ".*")
                    .replace("$operation", ".*")
                    .replace("$__rate_interval", "1m")
                    .replace("$__interval", "1m")
                    .replace("$__range", "5m");
                let path = format!(
                    "/api/v1/query_range?query={}&start={}&end={T}&step=60",
                    form_encode(&expr),
                    T - 600
                );
                let (code, body) = call(http, "GET", &path, None).await;
                assert_eq!(code, 200, "{}: {expr}: {body}", p["title"]);
                assert!(
                    !body["data"]["result"].as_array().unwrap().is_empty(),
                    "{}: {expr}: empty result",
                    p["title"]
                );
                ran += 1;
            }
        }
    }
    assert!(ran >= 10, "only {ran} queries ran");
    server.shutdown().await;
}
