//! Every scenario at reduced scale against a real in-process server, each asserting its
//! expected outcome.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tailscope_load::run::{run, Report, RunArgs, Scenario};
use tailscope_server::{Config, Server};
use tailscope_test_support::assert_eventually;

async fn server(dir: &std::path::Path, alerting: Option<(&str, &str)>) -> Server {
    server_with(dir, alerting, |_| {}).await
}

async fn server_with(
    dir: &std::path::Path,
    alerting: Option<(&str, &str)>,
    tweak: impl FnOnce(&mut Config),
) -> Server {
    let mut c = Config::default();
    c.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.data_dir = dir.join("data");
    c.ingest.flush_interval = Duration::from_millis(100);
    if let Some((rules, notifier)) = alerting {
        let r = dir.join("rules.yml");
        std::fs::write(&r, rules).unwrap();
        let n = dir.join("am.yml");
        std::fs::write(&n, notifier).unwrap();
        c.alerting.rule_files = vec![r];
        c.alerting.alertmanager_config = n;
    }
    tweak(&mut c);
    Server::start(c).await.unwrap()
}

/// The value of an instant query's first sample, now.
async fn instant(http: std::net::SocketAddr, query: &str) -> f64 {
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/query"))
        .form(&[("query", query)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]["result"][0]["value"][1].as_str().unwrap().parse().unwrap()
}

/// The series `/api/v1/series` lists for one selector.
async fn series(http: std::net::SocketAddr, selector: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{http}/api/v1/series"))
        .query(&[("match[]", selector)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().unwrap().clone()
}

async fn scenario(server: &Server, scenario: Scenario, rate: f64, seconds: u64) -> (Report, String) {
    scenario_plotted(server, scenario, rate, seconds, None).await
}

async fn scenario_plotted(
    server: &Server,
    scenario: Scenario,
    rate: f64,
    seconds: u64,
    plot: Option<std::path::PathBuf>,
) -> (Report, String) {
    let args = RunArgs {
        scenario,
        rate,
        duration: Duration::from_secs(seconds),
        services: 3,
        operations: 2,
        endpoint: format!("http://{}", server.grpc_addr()),
        http: format!("http://{}", server.http_addr()),
        json: false,
        quiet: false,
        compare: true,
        seed: 7,
        settle: std::time::Duration::ZERO,
        plot,
    };
    let mut out = Vec::new();
    let report = run(&args, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    eprintln!("{text}");
    (report, text)
}

/// Every span the clients recorded is counted by the server, none dropped.
fn assert_exact(r: &Report) {
    assert_eq!(r.clients["dropped"], 0, "{r:?}");
    for s in &r.services {
        assert_eq!(s.server_count, s.client_count as f64, "{}: {r:?}", s.service);
        assert_eq!(s.server_errors, s.client_errors as f64, "{}: {r:?}", s.service);
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() / b < 0.02
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_is_counted_exactly_with_the_clients_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), None).await;
    let svg = dir.path().join("steady.svg");
    let (r, text) = scenario_plotted(&server, Scenario::Steady, 300.0, 5, Some(svg.clone())).await;
    assert_exact(&r);
    // The chart: one panel per service, three quantile lines each, drawn from query_range.
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("frontend") && chart.contains("payments"), "{chart}");
    for legend in [">\np50\n<", ">\np99\n<", ">\np99.9\n<"] {
        assert_eq!(chart.matches(legend).count(), 3, "{legend} once per service panel");
    }
    // Each quantile's colour: its line and its legend mark in each of the three panels.
    for colour in ["#3C78C8", "#E6781E", "#C81E28"] {
        assert_eq!(chart.matches(&format!("stroke=\"{colour}\"")).count(), 6, "{colour}");
    }
    assert!(r.requests >= 1400, "{r:?}");
    assert!(text.contains("nothing injected") && text.contains("spans sent"), "{text}");
    for s in &r.services {
        assert!(close(s.server_p50, s.client_p50) && close(s.server_p99, s.client_p99), "{s:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_misleading_average_fires_the_tail_alert_while_the_mean_stays_low() {
    let dir = tempfile::tempdir().unwrap();
    // With exactly 1 % slow requests p99 is the 50 ms boundary (nearest rank); the tail rule
    // watches p99.9, which is where the 5 s requests show.
    let rules = "groups:\n  - name: seed\n    interval: 1s\n    rules:\n      - alert: AverageLatencyHigh\n        expr: sum(rate(span_duration_seconds_sum[1m])) / sum(rate(span_duration_seconds_count[1m])) > 0.2\n      - alert: TailLatencyHigh\n        expr: histogram_quantile(0.999, sum by (service, le) (rate(span_duration_seconds_bucket[1m]))) > 0.2\n";
    let notifier = "route: {receiver: none}\nreceivers: [{name: none}]\n";
    let server = server(dir.path(), Some((rules, notifier))).await;
    let (r, _) = scenario(&server, Scenario::MisleadingAverage, 300.0, 5).await;
    assert_exact(&r);
    let front = &r.services[0];
    assert!(front.client_mean < 0.2, "mean {}", front.client_mean);
    assert!(close(front.server_p999, 5.0), "{front:?}");
    let http = server.http_addr();
    let names = || async move {
        let v: serde_json::Value =
            reqwest::get(format!("http://{http}/api/v1/alerts")).await.unwrap().json().await.unwrap();
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["labels"]["alertname"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eventually!(!names().await.is_empty(), "no alert fired");
    // The mean's rule has had the same evaluations as the tail's, and stays quiet.
    let names = names().await;
    assert_eq!(names, ["TailLatencyHigh"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_spike_in_a_dependency_reaches_its_callers() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), None).await;
    let (r, text) = scenario(&server, Scenario::LatencySpike, 300.0, 6).await;
    assert_exact(&r);
    assert!(
        text.contains("injecting: payments: latency 100 ms → 500 ms") && text.contains("restored"),
        "{text}"
    );
    // A third of the requests waited on the slow dependency: every caller's p99 shows it.
    for s in &r.services {
        assert!(s.server_p99 > 0.45, "{s:?}");
        assert!(s.server_p50 < 0.3, "{s:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_multiplies_load_and_the_server_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), None).await;
    let (r, _) = scenario(&server, Scenario::Cascade, 300.0, 6).await;
    assert_exact(&r);
    // Three attempts against the slow dependency: 3 spans per request before, 5 during.
    assert!((r.spans_per_request.0 - 3.0).abs() < 1e-9, "{r:?}");
    assert!((r.spans_per_request.1 - 5.0).abs() < 1e-9, "{r:?}");
    let front = &r.services[0];
    assert!(front.client_errors > 0 && front.server_p99 > 2.9, "{front:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_burst_is_counted_failure_by_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), None).await;
    let (r, _) = scenario(&server, Scenario::ErrorBurst, 300.0, 6).await;
    assert_exact(&r);
    let (front, checkout, payments) = (&r.services[0], &r.services[1], &r.services[2]);
    // About 30 % of the third of requests in the burst, at checkout and (propagated) frontend.
    assert!(
        (0.05..0.2).contains(&(checkout.client_errors as f64 / checkout.client_count as f64)),
        "{checkout:?}"
    );
    assert_eq!(front.client_errors, checkout.client_errors);
    assert_eq!(payments.client_errors, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cardinality_bomb_overflows_into_one_series_and_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    // The server caps each service at 500 operations; the client itself at 2,000.
    let server = server_with(dir.path(), None, |c| c.ingest.max_operations_per_service = 500).await;
    let (r, _) = scenario(&server, Scenario::CardinalityBomb, 600.0, 5).await;
    assert_exact(&r);
    assert!(r.requests > 2500, "{r:?}");
    let http = server.http_addr();
    // Every kind: the frontend's calls to checkout are operations of the frontend too, and
    // count against its cap.
    let frontend = series(http, "span_duration_seconds_count{service=\"frontend\",span_kind=~\".+\"}").await;
    let named: std::collections::BTreeSet<&str> =
        frontend.iter().filter_map(|s| s["operation"].as_str()).filter(|o| *o != "__overflow__").collect();
    assert_eq!(named.len(), 500, "500 operations, then __overflow__");
    assert!(frontend.iter().any(|s| s["operation"] == "__overflow__"));
    let text = reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    let overflowed: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tailscope_spans_overflowed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // Exactly the spans the server counted under __overflow__, of any kind; the client sends
    // its first 2,000 names (then its own `__overflow__`), so at least those beyond 500.
    let counted = instant(
        http,
        "sum(increase(span_duration_seconds_count{service=\"frontend\",operation=\"__overflow__\",span_kind=~\".+\"}[10m]))",
    )
    .await;
    let own_overflow = r.requests.min(2000).saturating_sub(500) as f64;
    assert!(overflowed >= own_overflow, "{overflowed} < {own_overflow}: {text}");
    assert!(
        counted >= overflowed,
        "{counted} counted under __overflow__, {overflowed} overflowed by the server"
    );
    // The other services kept their two operations.
    assert_eq!(series(http, "span_duration_seconds_count{service=\"checkout\"}").await.len(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_data_lands_in_its_own_windows() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), None).await;
    let (r, text) = scenario(&server, Scenario::LateData, 300.0, 6).await;
    assert_exact(&r);
    assert!(text.contains("payments: spans arrive 180 s late"), "{text}");
    // The late third of payments' spans counts three minutes back, not now.
    let http = server.http_addr();
    let recent = instant(http, "sum(increase(span_duration_seconds_count{service=\"payments\"}[60s]))").await;
    let payments = &r.services[2];
    assert!(recent < payments.client_count as f64 * 0.8, "{recent} of {}", payments.client_count);
    server.shutdown().await;
}
