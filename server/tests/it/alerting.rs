//! Alerting end to end: spans in over gRPC, rules evaluated by a real server, notifications
//! received by a real HTTP webhook receiver.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Json;
use parking_lot::Mutex;
use serde_json::Value;

use crate::common::*;
use tailscope_proto::v1::Span;

/// A webhook receiver: records every notification it accepts; answers 500 while `down`.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    accepted: Arc<Mutex<Vec<(String, Value)>>>,
    refused: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    pub(crate) async fn start() -> (Receiver, SocketAddr) {
        let r = Receiver::default();
        async fn hook(State(r): State<Receiver>, uri: Uri, Json(body): Json<Value>) -> StatusCode {
            if r.down.load(Ordering::SeqCst) {
                r.refused.fetch_add(1, Ordering::SeqCst);
                return StatusCode::INTERNAL_SERVER_ERROR;
            }
            r.accepted.lock().push((uri.path().to_owned(), body));
            StatusCode::OK
        }
        let app = axum::Router::new().fallback(axum::routing::post(hook)).with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, addr)
    }

    pub(crate) fn bodies(&self, path: &str) -> Vec<Value> {
        self.accepted.lock().iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect()
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// An Alertmanager-style notifier configuration posting to `receiver`'s `/hook`.
pub(crate) fn notifier_yaml(
    receiver: SocketAddr,
    group_by: &str,
    group_wait: &str,
    group_interval: &str,
) -> String {
    format!(
        "route:\n  receiver: hook\n  group_by: {group_by}\n  group_wait: {group_wait}\n  group_interval: {group_interval}\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n      - url: http://{receiver}/hook\n"
    )
}

pub(crate) fn alerting_config(dir: &Path, rules: &str, notifier: &str) -> tailscope_server::Config {
    let mut c = config(&dir.join("data"));
    c.alerting.rule_files = vec![write(dir, "rules.yml", rules)];
    c.alerting.alertmanager_config = write(dir, "alertmanager.yml", notifier);
    c.alerting.resend_delay = Duration::from_secs(1);
    c
}

/// Sends spans of the given durations (ms) for each operation of `service`, started just now.
pub(crate) async fn send(
    grpc: SocketAddr,
    client_id: u64,
    service: &str,
    operations: &[String],
    durations_ms: &[i64],
) {
    let now = now_nanos();
    let groups = operations
        .iter()
        .map(|op| {
            let spans = durations_ms
                .iter()
                .enumerate()
                .map(|(i, ms)| span(now - 1_000_000_000 + i as i64, ms * 1_000_000, false))
                .collect();
            group(service, op, spans)
        })
        .collect();
    let mut s = open(grpc).await;
    s.send(batch(client_id, 1, groups)).await;
    s.wait_acked(1).await;
}

async fn instant(http: SocketAddr, q: &str) -> Vec<Value> {
    let q: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
    let v = get_json(http, &format!("/api/v1/query?query={q}")).await;
    assert_eq!(v["status"], "success", "{v}");
    v["data"]["result"].as_array().cloned().unwrap()
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// Waits `d` while rules keep evaluating (a quiet period in which nothing new may arrive).
pub(crate) async fn quiet(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_misleading_average_stays_quiet_while_the_tail_rule_fires_once() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    // 1,000 requests: 990 at 50 ms, 5 at 1 s, 5 at 5 s. The mean is 79.5 ms. With exactly 1 %
    // slow requests p99 is the 990th request, 50 ms (the nearest-rank definition Prometheus
    // and HdrHistogram share); the tail shows from p99.5 (1 s) and p99.9 (5 s) up.
    let rules = r#"
groups:
  - name: seed
    interval: 1s
    rules:
      - alert: AverageLatencyHigh
        expr: sum by (service) (rate(span_duration_seconds_sum[1m])) / sum by (service) (rate(span_duration_seconds_count[1m])) > 0.2
      - alert: TailLatencyHigh
        expr: histogram_quantile(0.999, sum by (service, le) (rate(span_duration_seconds_bucket[1m]))) > 0.2
        labels: {severity: page}
        annotations:
          summary: "p99.9 of {{ $labels.service }} is {{ $value | humanizeDuration }}"
"#;
    let config =
        alerting_config(dir.path(), rules, &notifier_yaml(raddr, "[alertname, service]", "1s", "2s"));
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let mut block = vec![50; 990];
    block.extend([1000; 5]);
    block.extend([5000; 5]);
    let repeated: Vec<i64> = block.iter().copied().cycle().take(3000).collect();
    send(server.grpc_addr(), 7, "checkout", &["POST /pay".to_owned()], &repeated).await;

    let http = server.http_addr();
    assert_eventually!(!receiver.bodies("/hook").is_empty(), "the tail alert was not notified");
    // The numbers the rules saw.
    let mean = value(
        &instant(
            http,
            "sum(rate(span_duration_seconds_sum[1m])) / sum(rate(span_duration_seconds_count[1m]))",
        )
        .await[0],
    );
    assert!((mean - 0.0795).abs() < 1e-9, "mean {mean}");
    let q =
        |phi: f64| format!("histogram_quantile({phi}, sum by (le) (rate(span_duration_seconds_bucket[1m])))");
    let p99 = value(&instant(http, &q(0.99)).await[0]);
    let p999 = value(&instant(http, &q(0.999)).await[0]);
    assert!((p99 - 0.05).abs() / 0.05 < 0.01, "p99 {p99}");
    assert!((p999 - 5.0).abs() / 5.0 < 0.01, "p99.9 {p999}");

    // Several evaluations and group intervals later: still exactly one notification.
    quiet(Duration::from_secs(6)).await;
    let bodies = receiver.bodies("/hook");
    assert_eq!(bodies.len(), 1, "{bodies:#?}");
    let n = &bodies[0];
    assert_eq!(n["status"], "firing");
    assert_eq!(n["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(n["alerts"][0]["labels"]["alertname"], "TailLatencyHigh");
    assert_eq!(n["alerts"][0]["labels"]["service"], "checkout");
    let summary = n["alerts"][0]["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("p99.9 of checkout is 4.9") || summary.starts_with("p99.9 of checkout is 5"),
        "{summary}"
    );
    assert_eq!(n["groupKey"], r#"{}:{alertname="TailLatencyHigh", service="checkout"}"#);
    // The average rule evaluated all along, healthy and quiet.
    let rules = get_json(http, "/api/v1/rules").await;
    let avg = &rules["data"]["groups"][0]["rules"][0];
    assert_eq!(
        (avg["name"].as_str(), avg["health"].as_str(), avg["state"].as_str()),
        (Some("AverageLatencyHigh"), Some("ok"), Some("inactive"))
    );
    let tail = &rules["data"]["groups"][0]["rules"][1];
    assert_eq!(tail["state"], "firing");
    let alerts = get_json(http, "/api/v1/alerts").await;
    assert_eq!(alerts["data"]["alerts"].as_array().unwrap().len(), 1, "{alerts}");
    let text = metrics(http).await;
    assert_eq!(metric(&text, "tailscope_notifications_total{receiver=\"hook\"}"), 1.0);
    assert_eq!(metric(&text, "tailscope_alerts{state=\"firing\"}"), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_operations_breaching_at_once_make_one_notification_then_one_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let rules = r#"
groups:
  - name: p99
    interval: 1s
    rules:
      - alert: HighP99Latency
        expr: histogram_quantile(0.99, sum by (service, operation, le) (rate(span_duration_seconds_bucket[10s]))) > 0.5
"#;
    let config = alerting_config(dir.path(), rules, &notifier_yaml(raddr, "[service]", "2s", "3s"));
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let operations: Vec<String> = (0..50).map(|i| format!("GET /item/{i}")).collect();
    // The breach is held until a notification is seen: a single burst can leave the rule's
    // 10 s window before a slow machine evaluates it. Every burst breaches all fifty at once.
    let mut client = 9;
    while receiver.bodies("/hook").is_empty() {
        assert!(client < 9 + 120, "no notification after {} bursts", client - 9);
        send(server.grpc_addr(), client, "catalog", &operations, &[900; 20]).await;
        client += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first = receiver.bodies("/hook")[0].clone();
    assert_eq!(first["status"], "firing");
    assert_eq!(first["alerts"].as_array().unwrap().len(), 50, "all fifty in the first notification");
    assert_eq!(first["groupLabels"], serde_json::json!({"service": "catalog"}));
    assert_eq!(
        first["commonLabels"],
        serde_json::json!({"alertname": "HighP99Latency", "service": "catalog"})
    );

    // The slow window leaves the 10 s range: everything resolves, and one resolve notice says so.
    let resolved = || receiver.bodies("/hook").iter().any(|b| b["status"] == "resolved");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !resolved() {
        assert!(std::time::Instant::now() < deadline, "never resolved: {:#?}", receiver.bodies("/hook"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    quiet(Duration::from_secs(4)).await;
    let bodies = receiver.bodies("/hook");
    assert_eq!(bodies.len(), 2, "one firing, one resolved: {bodies:#?}");
    let last = &bodies[1];
    assert_eq!(last["alerts"].as_array().unwrap().len(), 50);
    assert!(last["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["status"] == "resolved" && a["endsAt"] != "0001-01-01T00:00:00Z"));
    assert_eq!(get_json(server.http_addr(), "/api/v1/alerts").await["data"]["alerts"], serde_json::json!([]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silences_and_inhibitions_mute_and_the_api_speaks_alertmanager() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let notifier = format!(
        "{}inhibit_rules:\n  - source_matchers: ['severity=\"page\"']\n    target_matchers: ['severity=\"ticket\"']\n    equal: [service]\n",
        notifier_yaml(raddr, "[alertname, service]", "1s", "2s")
    );
    let config = alerting_config(dir.path(), "groups: []\n", &notifier);
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let http = server.http_addr();
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{http}{p}");

    // Silence service "b" for an hour.
    let now = tailscope_server::alerting::rfc3339(now_nanos() / 1_000_000);
    let later = tailscope_server::alerting::rfc3339(now_nanos() / 1_000_000 + 3_600_000);
    let silence = serde_json::json!({
        "matchers": [{"name": "service", "value": "b", "isRegex": false, "isEqual": true}],
        "startsAt": now, "endsAt": later, "createdBy": "test", "comment": "maintenance",
    });
    let r = client.post(url("/api/v2/silences")).json(&silence).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["silenceID"].as_str().unwrap().to_owned();

    let alert = |name: &str, service: &str, severity: &str| serde_json::json!({"labels": {"alertname": name, "service": service, "severity": severity}, "annotations": {"summary": "x"}});
    let alerts = serde_json::json!([
        alert("Latency", "a", "page"),
        alert("Errors", "a", "ticket"),
        alert("Latency", "b", "page"),
        alert("Errors", "c", "ticket"),
    ]);
    let r = client.post(url("/api/v2/alerts")).json(&alerts).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // a/Latency and c/Errors notify; a/Errors is inhibited by a/Latency; b is silenced.
    assert_eventually!(receiver.bodies("/hook").len() >= 2, "notifications");
    quiet(Duration::from_secs(3)).await;
    let mut got: Vec<String> = receiver
        .bodies("/hook")
        .iter()
        .flat_map(|b| b["alerts"].as_array().unwrap().clone())
        .map(|a| {
            format!(
                "{}/{}",
                a["labels"]["service"].as_str().unwrap(),
                a["labels"]["alertname"].as_str().unwrap()
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, ["a/Latency", "c/Errors"]);

    let listed: Vec<Value> = client.get(url("/api/v2/alerts")).send().await.unwrap().json().await.unwrap();
    let state = |svc: &str, name: &str| {
        listed.iter().find(|a| a["labels"]["service"] == svc && a["labels"]["alertname"] == name).unwrap()
            ["status"]
            .clone()
    };
    assert_eq!(state("b", "Latency")["silencedBy"], serde_json::json!([id]));
    assert_eq!(state("a", "Errors")["state"], "suppressed");
    assert_eq!(state("a", "Errors")["inhibitedBy"].as_array().unwrap().len(), 1);
    assert_eq!(state("c", "Errors")["state"], "active");

    // Go's zero time, as amtool writes it, means "no end".
    let zero = serde_json::json!([{"labels": {"alertname": "Zero", "service": "z"}, "endsAt": "0001-01-01T00:00:00.000Z"}]);
    assert_eq!(client.post(url("/api/v2/alerts")).json(&zero).send().await.unwrap().status(), 200);
    assert_eventually!(
        {
            let listed: Vec<Value> =
                client.get(url("/api/v2/alerts")).send().await.unwrap().json().await.unwrap();
            listed.iter().any(|a| a["labels"]["alertname"] == "Zero" && a["status"]["state"] == "active")
        },
        "an alert without an end is active"
    );

    // Silences: listed, fetched, expired by DELETE; bad ones refused with a reason.
    let one: Value =
        client.get(url(&format!("/api/v2/silence/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (one["status"]["state"].as_str(), one["comment"].as_str()),
        (Some("active"), Some("maintenance"))
    );
    assert_eq!(client.delete(url(&format!("/api/v2/silence/{id}"))).send().await.unwrap().status(), 200);
    let all: Vec<Value> = client.get(url("/api/v2/silences")).send().await.unwrap().json().await.unwrap();
    assert_eq!(all[0]["status"]["state"], "expired");
    assert_eq!(client.delete(url("/api/v2/silence/nope")).send().await.unwrap().status(), 404);
    let bad = serde_json::json!({"matchers": [{"name": "service", "value": "", "isRegex": false}], "startsAt": now, "endsAt": later});
    let r = client.post(url("/api/v2/silences")).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("must not match the empty string"));
    let r = client
        .post(url("/api/v2/alerts"))
        .body("[{\"labels\": {}}]")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("at least one label pair required"));
    // Once the silence is gone, b's alert notifies.
    assert_eventually!(
        receiver.bodies("/hook").iter().any(|b| b["groupLabels"]["service"] == "b"),
        "expired silence still mutes"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_running_rules_and_a_good_one_replaces_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, raddr) = Receiver::start().await;
    let rules = "groups:\n  - name: a\n    interval: 1s\n    rules:\n      - alert: One\n        expr: '1'\n";
    let mut config = alerting_config(dir.path(), rules, &notifier_yaml(raddr, "[alertname]", "1s", "1s"));
    config.auth.enable_lifecycle = true;
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let http = server.http_addr();
    let names = || async move {
        let v = get_json(http, "/api/v1/rules").await;
        v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names().await, ["One"]);
    std::fs::write(
        dir.path().join("rules.yml"),
        "groups:\n  - name: a\n    rules:\n      - alert: Two\n        expr: rate(x[5m]\n",
    )
    .unwrap();
    let r = reqwest::Client::new().post(format!("http://{http}/-/reload")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(text.contains("rules.yml") && text.contains("could not parse expression"), "{text}");
    assert_eq!(names().await, ["One"]);
    std::fs::write(
        dir.path().join("rules.yml"),
        "groups:\n  - name: a\n    rules:\n      - alert: Two\n        expr: '2'\n",
    )
    .unwrap();
    server.reload().unwrap();
    assert_eq!(names().await, ["Two"]);
    server.shutdown().await;
}

/// Writes a server configuration file with the rules and the notifier configuration.
pub(crate) fn config_file(dir: &Path, rules: &str, notifier: &str) -> PathBuf {
    let rules = write(dir, "rules.yml", rules);
    let notifier = write(dir, "alertmanager.yml", notifier);
    let toml = format!(
        "[alerting]\nrule_files = [{:?}]\nalertmanager_config = {:?}\nresend_delay = \"1s\"\n",
        rules.display().to_string(),
        notifier.display().to_string()
    );
    write(dir, "tailscope.toml", &toml)
}

async fn firing(http: SocketAddr) -> Vec<(String, String, String)> {
    let v = get_json(http, "/api/v1/alerts").await;
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
            (a["labels"]["alertname"].as_str().unwrap().to_owned(), s("state"), s("activeAt"))
        })
        .collect()
}

pub(crate) async fn wait_until(what: &str, seconds: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_neither_repeats_a_notification_nor_loses_a_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (receiver, raddr) = Receiver::start().await;
    let rules = r#"
groups:
  - name: restart
    interval: 1s
    rules:
      - alert: Slow
        expr: histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[20s]))) > 0.5
      - alert: Busy
        expr: sum by (service) (rate(span_duration_seconds_count[1h])) > 0
        for: 1h
"#;
    let file = config_file(dir.path(), rules, &notifier_yaml(raddr, "[alertname, service]", "1s", "2s"));
    let file = file.display().to_string();
    let env = [("TAILSCOPE_CONFIG", file.as_str())];
    let (child, grpc, http) = spawn_server(&data, &env);
    let mut child = Peer(child);
    send(grpc, 11, "pay", &["POST /pay".to_owned()], &[900; 20]).await;
    wait_until("the firing notification", 30, || receiver.bodies("/hook").len() == 1).await;
    let before = firing(http).await;
    let busy = before.iter().find(|a| a.0 == "Busy").cloned().unwrap();
    assert_eq!(busy.1, "pending");

    // SIGKILL while firing: after the restart the alert is still firing, its `for` clock did
    // not restart, and the notification is not sent again.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let (restarted, _, http) = spawn_server(&data, &env);
    child = Peer(restarted);
    let mut after = Vec::new();
    for _ in 0..200 {
        after = firing(http).await;
        if after.iter().any(|a| a.0 == "Slow" && a.1 == "firing") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(after.iter().any(|a| a.0 == "Slow" && a.1 == "firing"), "{after:?}");
    assert!(after.contains(&busy), "pending since {} before, now {after:?}", busy.2);
    quiet(Duration::from_secs(4)).await;
    assert_eq!(receiver.bodies("/hook").len(), 1, "{:#?}", receiver.bodies("/hook"));

    // The receiver goes down; the alert resolves and its notice cannot be delivered; SIGKILL.
    receiver.down.store(true, Ordering::SeqCst);
    wait_until("a refused resolve", 60, || receiver.refused.load(Ordering::SeqCst) > 0).await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    receiver.down.store(false, Ordering::SeqCst);
    let (restarted, _, _) = spawn_server(&data, &env);
    let _child = Peer(restarted);
    wait_until("the resolve after the restart", 30, || receiver.bodies("/hook").len() >= 2).await;
    quiet(Duration::from_secs(4)).await;
    let bodies = receiver.bodies("/hook");
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    assert_eq!(bodies[1]["status"], "resolved");
    assert_eq!(bodies[1]["alerts"][0]["labels"]["alertname"], "Slow");
}

/// How long the receiver stays down (`ALERTING_DOWN_SECONDS`, default the issue's 120 s).
fn down_seconds() -> u64 {
    std::env::var("ALERTING_DOWN_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(120)
}

/// Sums every sample of a metric family in the exposition `text`.
fn family_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run by scripts/test.sh after the fast suite (cargo test -- --ignored)"]
async fn a_receiver_down_for_minutes_gets_the_notification_once_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let rules = r#"
groups:
  - name: down
    interval: 1s
    rules:
      - alert: Slow
        expr: histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[10m]))) > 0.5
"#;
    let config = alerting_config(dir.path(), rules, &notifier_yaml(raddr, "[alertname]", "1s", "5s"));
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let http = server.http_addr();
    send(server.grpc_addr(), 13, "pay", &["POST /pay".to_owned()], &[900; 20]).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(down_seconds())).await;
    let text = metrics(http).await;
    let refused = receiver.refused.load(Ordering::SeqCst);
    assert!(refused > 0, "the receiver was never tried");
    let server_errors =
        metric(&text, "tailscope_notification_attempts_total{receiver=\"hook\",result=\"server_error\"}");
    let breaker_open =
        metric(&text, "tailscope_notification_attempts_total{receiver=\"hook\",result=\"breaker_open\"}");
    assert_eq!(server_errors as usize, refused, "every attempt is counted");
    // Once open, the breaker lets one probe through per cool-down instead of a request per
    // retry: far fewer requests than the retries would have made.
    assert!(breaker_open > 0.0, "{text}");
    receiver.down.store(false, Ordering::SeqCst);
    wait_until("the notification", 30, || !receiver.bodies("/hook").is_empty()).await;
    quiet(Duration::from_secs(6)).await;
    assert_eq!(receiver.bodies("/hook").len(), 1, "{:#?}", receiver.bodies("/hook"));

    // Evaluation kept running while the receiver was down (how close to its one-second
    // schedule depends on the machine: printed, not asserted).
    let elapsed = started.elapsed().as_secs_f64();
    let text = metrics(http).await;
    let evaluations = family_sum(&text, "tailscope_rule_evaluations_total{");
    let missed = family_sum(&text, "tailscope_rule_group_iterations_missed_total{");
    assert!(evaluations > 0.0, "no evaluation while the receiver was down");
    eprintln!("receiver down {} s: {refused} refused requests, {breaker_open} attempts held by the breaker, {evaluations} evaluations ({missed} iterations missed) in {elapsed:.0} s", down_seconds());
    server.shutdown().await;
}

/// Starts a real Alertmanager (clustering off) on a free loopback port with `config`; returns
/// it (killed when dropped) and its address once it is ready.
pub(crate) async fn alertmanager(binary: &Path, dir: &Path, config: &str) -> (Peer, String) {
    let file = write(dir, "am.yml", config);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let peer = Peer(
        std::process::Command::new(binary)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start Alertmanager"),
    );
    // A listener that accepts before it serves must not hold the wait forever.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    for _ in 0..200 {
        if client.get(format!("http://{addr}/-/ready")).send().await.is_ok_and(|r| r.status() == 200) {
            return (peer, addr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Alertmanager did not become ready on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_forwarded_to_an_existing_alertmanager() {
    let Some(found) = peers(&["prometheus-alertmanager"], "prometheus-alertmanager") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_am, am_addr) =
        alertmanager(&found[0], dir.path(), "route: {receiver: none}\nreceivers: [{name: none}]\n").await;
    let rules = "groups:\n  - name: f\n    interval: 1s\n    rules:\n      - alert: Always\n        expr: '1'\n        labels: {service: checkout}\n        annotations: {summary: 'value {{ $value }}'}\n";
    let mut config = config(&dir.path().join("data"));
    config.alerting.rule_files = vec![write(dir.path(), "rules.yml", rules)];
    config.alerting.alertmanager_urls = vec![format!("http://{am_addr}")];
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let client = reqwest::Client::new();
    let mut found = Value::Null;
    for _ in 0..200 {
        let alerts: Vec<Value> =
            client.get(format!("http://{am_addr}/api/v2/alerts")).send().await.unwrap().json().await.unwrap();
        if let Some(a) = alerts.into_iter().find(|a| a["labels"]["alertname"] == "Always") {
            found = a;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(found["labels"], serde_json::json!({"alertname": "Always", "service": "checkout"}), "{found}");
    assert_eq!(found["annotations"]["summary"], "value 1");
    assert_eq!(found["status"]["state"], "active");
    let generator = found["generatorURL"].as_str().unwrap();
    assert!(generator.starts_with(&format!("http://{}/graph?g0.expr=1", server.http_addr())), "{generator}");
    let text = metrics(server.http_addr()).await;
    assert!(metric(&text, "tailscope_alerts_forwarded_total{result=\"success\"}") >= 1.0, "{text}");
    server.shutdown().await;
}

/// The field names of a JSON object, and of the first alert of a notification.
fn field_sets(body: &Value) -> (Vec<String>, Vec<String>) {
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    (keys(body), keys(&body["alerts"][0]))
}

/// Per group key, the notifications it got: status and each alert's name and status.
pub(crate) fn summarize(bodies: &[Value]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for b in bodies {
        let mut alerts: Vec<String> = b["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                format!(
                    "{}/{}={} {}",
                    a["labels"]["service"].as_str().unwrap(),
                    a["labels"]["alertname"].as_str().unwrap(),
                    a["status"].as_str().unwrap(),
                    a["fingerprint"].as_str().unwrap()
                )
            })
            .collect();
        alerts.sort();
        out.entry(format!("{} {}", b["receiver"].as_str().unwrap(), b["groupKey"].as_str().unwrap()))
            .or_default()
            .push(format!("{}: {}", b["status"].as_str().unwrap(), alerts.join(", ")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run by scripts/test.sh after the fast suite (cargo test -- --ignored)"]
async fn the_same_alerts_group_and_notify_as_in_a_real_alertmanager() {
    let Some(found) = peers(&["prometheus-alertmanager"], "prometheus-alertmanager") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let notifier = |prefix: &str| {
        format!(
            "route:\n  receiver: team\n  group_by: [service]\n  group_wait: 2s\n  group_interval: 4s\n  repeat_interval: 1h\n  routes:\n    - matchers: ['severity=\"page\"']\n      receiver: pager\n      group_by: [alertname, service]\nreceivers:\n  - name: team\n    webhook_configs: [{{url: 'http://{raddr}/{prefix}/team'}}]\n  - name: pager\n    webhook_configs: [{{url: 'http://{raddr}/{prefix}/pager', send_resolved: true}}]\n"
        )
    };
    let (_am, am_addr) = alertmanager(&found[0], dir.path(), &notifier("am")).await;
    let client = reqwest::Client::new();
    let config = alerting_config(dir.path(), "groups: []\n", &notifier("ts"));
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let ts_addr = server.http_addr().to_string();

    let now = || now_nanos() / 1_000_000;
    let alert = |name: &str, service: &str, severity: &str, ends_at: i64| {
        serde_json::json!({
            "labels": {"alertname": name, "service": service, "severity": severity},
            "annotations": {"summary": format!("{name} on {service}")},
            "endsAt": tailscope_server::alerting::rfc3339(ends_at),
            "generatorURL": "http://tailscope/graph",
        })
    };
    let post = |alerts: Value| {
        let client = client.clone();
        let (am, ts) = (am_addr.clone(), ts_addr.clone());
        async move {
            for addr in [am, ts] {
                let r =
                    client.post(format!("http://{addr}/api/v2/alerts")).json(&alerts).send().await.unwrap();
                assert_eq!(r.status(), 200, "{addr}: {}", r.text().await.unwrap());
            }
        }
    };
    let hour = now() + 3_600_000;
    // t = 0: three services, each with a paging latency alert and a ticket error alert.
    let mut all = Vec::new();
    for s in ["a", "b", "c"] {
        all.push(alert("Latency", s, "page", hour));
        all.push(alert("Errors", s, "ticket", hour));
    }
    post(Value::Array(all)).await;
    // t = 4 s (between the flushes at 2 s and 6 s): a's latency resolves, b saturates.
    tokio::time::sleep(Duration::from_secs(4)).await;
    post(serde_json::json!([alert("Latency", "a", "page", now()), alert("Saturation", "b", "ticket", hour)]))
        .await;
    // t = 12 s (between 10 s and 14 s): everything resolves.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut resolved = Vec::new();
    for s in ["a", "b", "c"] {
        resolved.push(alert("Latency", s, "page", now()));
        resolved.push(alert("Errors", s, "ticket", now()));
    }
    resolved.push(alert("Saturation", "b", "ticket", now()));
    post(Value::Array(resolved)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    let am: Vec<Value> = receiver
        .accepted
        .lock()
        .iter()
        .filter(|(p, _)| p.starts_with("/am/"))
        .map(|(_, b)| b.clone())
        .collect();
    let ts: Vec<Value> = receiver
        .accepted
        .lock()
        .iter()
        .filter(|(p, _)| p.starts_with("/ts/"))
        .map(|(_, b)| b.clone())
        .collect();
    assert!(!am.is_empty(), "Alertmanager sent nothing");
    assert_eq!(summarize(&ts), summarize(&am), "tailscope vs Alertmanager notifications");
    assert_eq!(ts.len(), am.len());
    // The webhook body's fields, top level and per alert, are Alertmanager's, as recorded in
    // the golden file.
    let golden: Value =
        serde_json::from_str(include_str!("../golden/alertmanager_webhook_fields.json")).unwrap();
    let (top, per_alert) = field_sets(&am[0]);
    let mut want_top: Vec<String> = serde_json::from_value(golden["body"].clone()).unwrap();
    let mut want_alert: Vec<String> = serde_json::from_value(golden["alert"].clone()).unwrap();
    want_top.sort();
    want_alert.sort();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        (sorted(top), sorted(per_alert)),
        (want_top.clone(), want_alert.clone()),
        "Alertmanager's own fields changed"
    );
    for b in &ts {
        let (top, per_alert) = field_sets(b);
        assert_eq!((sorted(top), sorted(per_alert)), (want_top.clone(), want_alert.clone()));
    }
    eprintln!("{} notifications each; groups: {:#?}", ts.len(), summarize(&ts));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_rules_fire_on_the_service_that_breaks_them_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let now = now_nanos();
    // "slow": 5 % of requests take 800 ms (p99 800 ms; 5 % over the 300 ms objective, i.e. a
    // burn rate of 50x) and 10 % fail. "fast": all 100 ms, none fail.
    let slow: Vec<Span> = (0..1000)
        .map(|i| {
            span(now - 1_000_000_000 + i, if i % 20 == 0 { 800_000_000 } else { 100_000_000 }, i % 10 == 3)
        })
        .collect();
    let fast: Vec<Span> = (0..1000).map(|i| span(now - 1_000_000_000 + i, 100_000_000, false)).collect();
    let mut s = open(server.grpc_addr()).await;
    s.send(batch(21, 1, vec![group("slow", "GET /", slow), group("fast", "GET /", fast)])).await;
    s.wait_acked(1).await;

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rules");
    let paths = tailscope_server::alerting::expand_rule_paths(&[dir.into()]).unwrap();
    let groups = tailscope_server::alerting::load_rules(&paths, Duration::from_secs(60)).unwrap();
    let mut fired = Vec::new();
    for rule in groups.iter().flat_map(|g| &g.rules) {
        for sample in instant(server.http_addr(), &rule.query).await {
            let window =
                rule.labels.iter().find(|l| l.0 == "window").map(|l| l.1.clone()).unwrap_or_default();
            fired.push(format!("{}{window} {}", rule.name, sample["metric"]["service"].as_str().unwrap()));
        }
    }
    fired.sort();
    assert_eq!(
        fired,
        [
            "HighErrorRatio slow",
            "HighP99Latency slow",
            "LatencySLOBudgetBurn1h slow",
            "LatencySLOBudgetBurn6h slow"
        ]
    );
    server.shutdown().await;
}
