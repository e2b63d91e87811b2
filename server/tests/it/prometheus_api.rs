//! The Prometheus HTTP API as Grafana uses it: its own probe calls, golden JSON shapes of every
//! endpoint (errors included), exact quantiles through the real store, and the shipped
//! dashboards run against a live server.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use crate::common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tailscope_proto::v1::Span;
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
    // checkout's calls to the search service: one edge of the service graph, seen by the caller.
    let calls = (0..30).map(|i| span(T * SEC - (i + 1) * 10 * SEC, 4_000_000, false)).collect();
    let mut edge = group("checkout", "GET /q", calls);
    if let Some(key) = edge.key.as_mut() {
        key.kind = tailscope_proto::v1::SpanKind::Client as i32;
        key.peer = "search".into();
    }
    seq += 1;
    s.send(batch(1, seq, vec![edge])).await;
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
            "span_duration_seconds",
            "span_duration_seconds_bucket",
            "span_duration_seconds_count",
            "span_duration_seconds_sum"
        ])
    );
    let (_, labels) = call(http, "GET", "/api/v1/labels?limit=40000", None).await;
    assert_eq!(
        labels["data"],
        serde_json::json!(["__name__", "le", "operation", "peer", "service", "span_kind", "status"])
    );
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
    // Input the PromQL parser panics on (found by fuzzing): a clear 400, and the server
    // answers the next query.
    let huge = q("span_duration_seconds_count[444444444444444444444444444444444444444444444490]");
    let (code, body) = call(http, "GET", &format!("/api/v1/query?query={huge}"), None).await;
    assert_eq!((code, &body["errorType"]), (400, &serde_json::json!("bad_data")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("parser failed"), "{body}");
    assert_eq!(call(http, "GET", "/api/v1/query?query=1", None).await.0, 200);
    // A refused method.
    let (code, _) = call(http, "PUT", "/api/v1/query", None).await;
    assert_eq!(code, 405);
    server.shutdown().await;
}

/// The accuracy data set: 5,000 spans per series over the 10 minutes before T, for four
/// operations of each of three services named after their distributions.
fn dataset() -> std::collections::BTreeMap<(String, String), Vec<i64>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(9);
    let mut raw: std::collections::BTreeMap<(String, String), Vec<i64>> = Default::default();
    for service in ["lognormal", "bimodal", "pareto"] {
        for op in 0..4 {
            let durations = (0..5_000)
                .map(|_| match service {
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
                })
                .collect();
            raw.insert((service.into(), format!("op{op}")), durations);
        }
    }
    raw
}

/// A server at time T holding [`dataset`].
async fn dataset_server(
    dir: &std::path::Path,
) -> (tailscope_server::Server, std::collections::BTreeMap<(String, String), Vec<i64>>) {
    let clock = Arc::new(ManualClock::new(T * SEC));
    let server = start_with(config(dir), clock).await;
    let raw = dataset();
    let mut s = open(server.grpc_addr()).await;
    let mut seq = 0;
    for ((service, operation), durations) in &raw {
        let spans = durations
            .iter()
            .enumerate()
            .map(|(i, &d)| span(T * SEC - (i as i64 % 600 + 1) * SEC, d, false))
            .collect();
        seq += 1;
        s.send(batch(2, seq, vec![group(service, operation, spans)])).await;
    }
    s.wait_acked(seq).await;
    (server, raw)
}

/// The exact p99 (nearest rank) of `v`, in seconds.
fn exact_p99(v: &[i64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    let rank = ((0.99 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64 / 1e9
}

const PER_SERIES_P99: &str = "histogram_quantile(0.99, rate(span_duration_seconds_bucket[10m]))";
const BY_SERVICE_P99: &str =
    "histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[10m])))";

/// An instant query at T: `(labels "service/operation" or "service", value)` per result row.
async fn instant(http: std::net::SocketAddr, expr: &str) -> Vec<(String, f64)> {
    let (code, body) =
        call(http, "GET", &format!("/api/v1/query?query={}&time={T}", form_encode(expr)), None).await;
    assert_eq!(code, 200, "{body}");
    body["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let m = &row["metric"];
            let key = match m["operation"].as_str() {
                Some(op) => format!("{}/{op}", m["service"].as_str().unwrap()),
                None => m["service"].as_str().unwrap().to_owned(),
            };
            (key, row["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// The exact p99 of every series and of every service's series together.
fn exact_answers(
    raw: &std::collections::BTreeMap<(String, String), Vec<i64>>,
) -> std::collections::BTreeMap<String, f64> {
    let mut out: std::collections::BTreeMap<String, f64> =
        raw.iter().map(|((s, o), v)| (format!("{s}/{o}"), exact_p99(v))).collect();
    for service in ["lognormal", "bimodal", "pareto"] {
        let all: Vec<i64> =
            raw.iter().filter(|((s, _), _)| s == service).flat_map(|(_, v)| v.clone()).collect();
        out.insert(service.into(), exact_p99(&all));
    }
    out
}

/// Exact quantiles through the real store, per series and summed over many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_quantile_matches_sorted_data_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (server, raw) = dataset_server(dir.path()).await;
    let exact = exact_answers(&raw);
    let per_series = instant(server.http_addr(), PER_SERIES_P99).await;
    let by_service = instant(server.http_addr(), BY_SERVICE_P99).await;
    assert_eq!((per_series.len(), by_service.len()), (12, 3));
    for (key, got) in per_series.into_iter().chain(by_service) {
        let want = exact[&key];
        assert!((got - want).abs() <= want * 0.01, "{key}: {got} vs exact {want}");
    }
    server.shutdown().await;
}

/// Prometheus' default classic buckets (client_golang's `DefBuckets`).
const PROMETHEUS_DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// `promtool` and `prometheus` from PATH (see [`peers`]).
fn prometheus_binaries() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let mut found = peers(&["promtool", "prometheus"], "prometheus")?;
    let prometheus = found.pop()?;
    Some((found.pop()?, prometheus))
}

/// The same spans exported as classic histograms with Prometheus' default buckets (two
/// cumulative samples ten minutes apart), backfilled into a real Prometheus with promtool and
/// queried with the same PromQL. tailscope's p99 is exact to its precision; Prometheus' is
/// interpolated and must at least fall inside the default bucket that holds the exact p99 (which
/// checks the export). Both errors are printed; BENCHMARKS.md records them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p99_next_to_a_real_prometheus_on_the_same_data() {
    let Some((promtool, prometheus)) = prometheus_binaries() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, raw) = dataset_server(&dir.path().join("tailscope")).await;
    let exact = exact_answers(&raw);

    let mut om = String::from("# TYPE span_duration_seconds histogram\n");
    for ((service, operation), durations) in &raw {
        let labels = format!("service=\"{service}\",operation=\"{operation}\"");
        for (ts, all) in [(T - 599, false), (T - 1, true)] {
            let n =
                |le: f64| if all { durations.iter().filter(|&&d| d as f64 / 1e9 <= le).count() } else { 0 };
            for le in PROMETHEUS_DEFAULT_BUCKETS {
                om += &format!("span_duration_seconds_bucket{{{labels},le=\"{le}\"}} {} {ts}\n", n(le));
            }
            let (count, sum) =
                if all { (durations.len(), durations.iter().sum::<i64>() as f64 / 1e9) } else { (0, 0.0) };
            om += &format!("span_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count} {ts}\n");
            om += &format!("span_duration_seconds_count{{{labels}}} {count} {ts}\n");
            om += &format!("span_duration_seconds_sum{{{labels}}} {sum} {ts}\n");
        }
    }
    om += "# EOF\n";
    let (input, data) = (dir.path().join("spans.om"), dir.path().join("prometheus"));
    std::fs::write(&input, om).unwrap();
    let out = std::process::Command::new(&promtool)
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .args([&input, &data])
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool: {}", String::from_utf8_lossy(&out.stderr));

    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 1m\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _peer = Peer(
        std::process::Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=100y")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    assert_eventually!(
        reqwest::get(format!("http://{addr}/-/ready")).await.is_ok_and(|r| r.status().is_success()),
        "prometheus did not become ready: {}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );

    let mut rows = Vec::new();
    for expr in [PER_SERIES_P99, BY_SERVICE_P99] {
        let ours: std::collections::BTreeMap<String, f64> =
            instant(server.http_addr(), expr).await.into_iter().collect();
        let theirs: std::collections::BTreeMap<String, f64> = instant(addr, expr).await.into_iter().collect();
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{expr}");
        for (key, got) in ours {
            let want = exact[&key];
            let prom = theirs[&key];
            assert!((got - want).abs() <= want * 0.01, "{key}: tailscope {got} vs exact {want}");
            let upper =
                PROMETHEUS_DEFAULT_BUCKETS.iter().copied().find(|&b| b >= want).unwrap_or(f64::INFINITY);
            let lower = PROMETHEUS_DEFAULT_BUCKETS.iter().copied().rev().find(|&b| b < want).unwrap_or(0.0);
            assert!(
                prom >= lower && prom <= upper.min(10.0),
                "{key}: prometheus {prom} outside ({lower}, {upper}]"
            );
            rows.push((key, want, got, prom));
        }
    }
    println!("| series | exact p99 | tailscope | error | Prometheus (default buckets) | error |");
    println!("|---|---|---|---|---|---|");
    for (key, want, got, prom) in rows {
        let err = |v: f64| 100.0 * (v - want) / want;
        println!(
            "| {key} | {:.2} ms | {:.2} ms | {:+.2} % | {:.2} ms | {:+.1} % |",
            want * 1e3,
            got * 1e3,
            err(got),
            prom * 1e3,
            err(prom)
        );
    }
    server.shutdown().await;
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

/// A known slow outlier (and a failed span) among ordinary spans comes back through
/// `/api/v1/query_exemplars` with its trace id, for the panel query Grafana sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_link_a_slow_outlier_to_its_trace() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config(dir.path()), Arc::new(ManualClock::new(T * SEC))).await;
    let mut s = open(server.grpc_addr()).await;
    let window = T * SEC - 120 * SEC;
    // Sampled at 5 %, as a client says in each span's adjusted count; the outlier was kept
    // for being slow (1), the failed span's sender did not say.
    let mut spans: Vec<_> = (0..500)
        .map(|i| Span {
            adjusted_count: 20.0,
            ..span(window + i * 10_000_000, 20_000_000 + i * 1_000, false)
        })
        .collect();
    let mut outlier = span(window + 3 * SEC, 4_200_000_000, false);
    outlier.adjusted_count = 1.0;
    outlier.trace_id_high = 0x00c0ffee00000000;
    outlier.trace_id_low = 0x1234;
    outlier.span_id = 0xabcdef;
    spans.push(outlier);
    let mut failed = span(window + 4 * SEC, 30_000_000, true);
    failed.trace_id_low = 0x5678;
    spans.push(failed);
    s.send(batch(5, 1, vec![group("checkout", "POST /pay", spans)])).await;
    s.wait_acked(1).await;
    let query = form_encode(
        "histogram_quantile(0.99, sum by (le) (rate(span_duration_seconds_bucket{service=\"checkout\"}[5m])))",
    );
    let (code, body) = call(
        server.http_addr(),
        "GET",
        &format!("/api/v1/query_exemplars?query={query}&start={}&end={T}", T - 600),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let groups = body["data"].as_array().unwrap();
    let all: Vec<(&Value, &Value)> = groups
        .iter()
        .flat_map(|g| g["exemplars"].as_array().unwrap().iter().map(move |e| (&g["seriesLabels"], e)))
        .collect();
    let (labels, slow) = all
        .iter()
        .find(|(_, e)| e["labels"]["trace_id"] == "00c0ffee000000000000000000001234")
        .unwrap_or_else(|| panic!("no outlier exemplar in {body}"));
    assert_eq!(slow["labels"]["span_id"], "0000000000abcdef");
    assert_eq!(slow["labels"]["adjusted_count"], "1");
    assert_eq!(slow["value"], "4.2");
    assert_eq!(slow["timestamp"].as_f64().unwrap(), (window + 3 * SEC + 4_200_000_000) as f64 / 1e9);
    assert_eq!(labels["le"], "5");
    assert_eq!(labels["__name__"], "span_duration_seconds_bucket");
    assert!(all.iter().any(|(l, e)| l["status"] == "error"
        && e["labels"]["trace_id"].as_str().unwrap().ends_with("5678")
        && e["labels"].get("adjusted_count").is_none()));
    assert!(all.iter().any(|(_, e)| e["labels"]["adjusted_count"] == "20"), "{body}");
    // At most the slowest three, three errors and one random span per series and window.
    let per_window = all.iter().filter(|(l, _)| l["status"] == "ok").count();
    assert!((1..=4).contains(&per_window), "{per_window}");
    // A selector of other series selects none.
    let (code, body) = call(
        server.http_addr(),
        "GET",
        &format!(
            "/api/v1/query_exemplars?query={}&start={}&end={T}",
            form_encode("span_duration_seconds_bucket{service=\"other\"}"),
            T - 600
        ),
        None,
    )
    .await;
    assert_eq!((code, &body["data"]), (200, &serde_json::json!([])));
    server.shutdown().await;
}

/// OTLP spans of one service, by kind: `(operation, kind, duration in ms, how many)`, ending
/// before T, as OTLP/JSON.
fn otlp_by_kind(service: &str, spans: &[(&str, i32, i64, i64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(name, kind, ms, n) in spans {
        for i in 0..n {
            let end = T * SEC - (i + 1) * SEC;
            out.push(serde_json::json!({
                "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                "name": name, "kind": kind,
                "startTimeUnixNano": (end - ms * 1_000_000).to_string(), "endTimeUnixNano": end.to_string(),
            }));
        }
    }
    serde_json::to_vec(&serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": out}],
    }]}))
    .unwrap()
}

/// A service whose outgoing calls are slow and its own work fast keeps a fast
/// `span_duration_seconds`: client spans are their own series (label `span_kind`), read only
/// by selectors that name `span_kind`, and keep their kind across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_spans_do_not_mix_into_a_services_own_latency() {
    let dir = tempfile::tempdir().unwrap();
    let body = otlp_by_kind(
        "checkout",
        &[
            // Its own work: server spans of 10 ms, and internal spans of 5 ms.
            ("POST /pay", 2, 10, 200),
            ("render", 1, 5, 50),
            // Its calls: the same name as a client span (a proxy), and a payments call, both 2 s.
            ("POST /pay", 3, 2_000, 100),
            ("payments.Charge", 3, 2_000, 100),
        ],
    );
    for restarted in [false, true] {
        let server = start_with(config(dir.path()), Arc::new(ManualClock::new(T * SEC))).await;
        let http = server.http_addr();
        if !restarted {
            post_otlp_json(server.otlp_http_addr(), body.clone()).await;
        }
        let p99 = instant(
            http,
            r#"histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket{service="checkout"}[10m])))"#,
        )
        .await;
        assert_eq!(p99.len(), 1, "{p99:?}");
        assert!((p99[0].1 - 0.010).abs() <= 0.010 * 0.01, "restarted={restarted}: own p99 {p99:?}");
        let by = |expr: &str| {
            let expr = expr.to_owned();
            async move {
                let (code, body) =
                    call(http, "GET", &format!("/api/v1/query?query={}&time={T}", form_encode(&expr)), None)
                        .await;
                assert_eq!(code, 200, "{body}");
                let mut rows: Vec<(String, String, f64)> = body["data"]["result"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let m = &r["metric"];
                        let label = |k: &str| m[k].as_str().unwrap_or("").to_owned();
                        (
                            label("operation"),
                            label("span_kind"),
                            r["value"][1].as_str().unwrap().parse().unwrap(),
                        )
                    })
                    .collect();
                rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
                rows
            }
        };
        // Without a span_kind matcher: the server and internal series; with one: any kind.
        let own = by(r#"sum by (operation, span_kind) (increase(span_duration_seconds_count{service="checkout"}[10m]))"#)
            .await;
        assert_eq!(
            own,
            vec![
                ("POST /pay".into(), "SPAN_KIND_SERVER".into(), 200.0),
                ("render".into(), "SPAN_KIND_INTERNAL".into(), 50.0),
            ],
            "restarted={restarted}"
        );
        let calls = by(r#"sum by (operation, span_kind) (increase(span_duration_seconds_count{service="checkout", span_kind="SPAN_KIND_CLIENT"}[10m]))"#)
            .await;
        assert_eq!(
            calls,
            vec![
                ("POST /pay".into(), "SPAN_KIND_CLIENT".into(), 100.0),
                ("payments.Charge".into(), "SPAN_KIND_CLIENT".into(), 100.0),
            ]
        );
        let all =
            by(r#"sum by (span_kind) (increase(span_duration_seconds_count{span_kind=~".+"}[10m]))"#).await;
        assert_eq!(all.iter().map(|r| r.2).sum::<f64>(), 450.0, "{all:?}");
        let slow = instant(
            http,
            r#"histogram_quantile(0.5, sum by (le, service) (rate(span_duration_seconds_bucket{span_kind="SPAN_KIND_CLIENT"}[10m])))"#,
        )
        .await;
        assert!((slow[0].1 - 2.0).abs() <= 0.02, "{slow:?}");
        // The label's values, and the series API, say the same.
        let (_, values) = call(http, "GET", "/api/v1/label/span_kind/values", None).await;
        assert_eq!(
            values["data"],
            serde_json::json!(["SPAN_KIND_CLIENT", "SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER"])
        );
        let (_, series) = call(
            http,
            "GET",
            &format!(
                "/api/v1/series?match[]={}",
                form_encode(r#"span_duration_seconds_count{service="checkout"}"#)
            ),
            None,
        )
        .await;
        let kinds: std::collections::BTreeSet<&str> =
            series["data"].as_array().unwrap().iter().map(|s| s["span_kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER"].into_iter().collect());
        server.shutdown().await;
    }
}

/// Native histograms over HTTP: `histogram` in instant answers and `histograms` in range
/// answers, in the Prometheus API's shape (numbers as strings, `[rule, lower, upper, count]`
/// buckets), with counts that agree with the classic `_count` series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_histograms_come_back_in_the_prometheus_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = known_server(dir.path()).await;
    let http = server.http_addr();
    let q = |e: &str| form_encode(e);
    let (code, body) = call(
        http,
        "GET",
        &format!(
            "/api/v1/query?query={}&time={T}",
            q("sum by (service) (increase(span_duration_seconds[10m]))")
        ),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["resultType"], "vector");
    let rows = body["data"]["result"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{body}");
    let classic = instant(http, "sum by (service) (increase(span_duration_seconds_count[10m]))").await;
    for row in rows {
        assert!(row.get("value").is_none());
        let [t, h] = row["histogram"].as_array().unwrap().as_slice() else { panic!("{row}") };
        assert_eq!(t.as_f64(), Some(T as f64));
        let count: f64 = h["count"].as_str().unwrap().parse().unwrap();
        let service = row["metric"]["service"].as_str().unwrap();
        assert_eq!(Some(count), classic.iter().find(|(k, _)| k == service).map(|r| r.1), "{row}");
        let buckets = h["buckets"].as_array().unwrap();
        let in_buckets: f64 = buckets.iter().map(|b| b[3].as_str().unwrap().parse::<f64>().unwrap()).sum();
        assert_eq!(in_buckets, count);
        for b in buckets {
            assert_eq!(b[0], 3, "both bounds inclusive: {b}");
            let (lo, hi): (f64, f64) =
                (b[1].as_str().unwrap().parse().unwrap(), b[2].as_str().unwrap().parse().unwrap());
            assert!(lo <= hi && hi <= lo * 1.01 + 1e-9, "a bucket of 1 % at most: {b}");
        }
        assert!(h["sum"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);
    }
    let (code, body) = call(
        http,
        "GET",
        &format!(
            "/api/v1/query_range?query={}&start={}&end={T}&step=60",
            q("rate(span_duration_seconds{service=\"search\"}[5m])"),
            T - 600
        ),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["resultType"], "matrix");
    let series = body["data"]["result"].as_array().unwrap();
    assert!(!series.is_empty());
    for s in series {
        let points = s["histograms"].as_array().unwrap();
        assert!(!points.is_empty() && s.get("values").is_none(), "{s}");
        assert!(points.iter().all(|p| p[1]["buckets"].is_array()));
    }
    // The plain selector: the cumulative histogram, and an SLI from it.
    let (code, body) =
        call(http, "GET", &format!("/api/v1/query?query={}&time={T}", q("span_duration_seconds")), None)
            .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["result"].as_array().unwrap().len(), 4, "{body}");
    let value = |expr: &'static str| async move {
        let (_, body) =
            call(http, "GET", &format!("/api/v1/query?query={}&time={T}", form_encode(expr)), None).await;
        body["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap_or_else(|| panic!("{expr}: {body}"))
            .parse::<f64>()
            .unwrap()
    };
    let fraction = value("histogram_fraction(0, 0.05, sum(increase(span_duration_seconds[10m])))").await;
    let le = value(
        "sum(increase(span_duration_seconds_bucket{le=\"0.05\"}[10m])) / sum(increase(span_duration_seconds_count[10m]))",
    )
    .await;
    assert!((fraction - le).abs() < 1e-9, "{fraction} vs {le}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_reads_strongly_as_it_reads_and_says_it_is_no_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let server = known_server(dir.path()).await;
    let http = server.http_addr();
    let (code, body) = call(http, "GET", "/api/v1/status/cluster", None).await;
    assert_eq!((code, body), (200, serde_json::json!({"status": "success", "data": {"mode": "single"}})));

    // A single node acknowledges only what its queries see: a strong read is any read.
    let ask = |consistency: &'static str| async move {
        let url = format!(
            "http://{http}/api/v1/query?query=sum(increase(span_duration_seconds_count%5B1h%5D))&time={}",
            T
        );
        let r =
            reqwest::Client::new().get(url).header("X-Read-Consistency", consistency).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (strong, eventual) = (ask("strong").await, ask("eventual").await);
    assert_eq!(strong.0, 200, "{}", strong.1);
    // The 120 spans of the two services' own work (the 30 client spans are read by their kind).
    assert_eq!(strong.1["data"]["result"][0]["value"][1], "120", "{}", strong.1);
    assert_eq!(strong, eventual);
    let (code, body) = ask("Strong ").await;
    assert_eq!(code, 200, "case and spaces do not matter: {body}");
    let (code, body) = ask("bounded-staleness").await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["errorType"], "bad_data", "{body}");
    assert!(body["error"].as_str().unwrap().contains("X-Read-Consistency"), "{body}");
    server.shutdown().await;
}
