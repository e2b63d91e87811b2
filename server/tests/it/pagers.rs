//! Pages over https (issue: locked doors): the notifier delivers to local TLS receivers that
//! impersonate PagerDuty, Slack and a webhook, each trusted through its `http_config`'s private
//! CA and authenticated as configured; a 503 and a 429 are retried, a 400 is not.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use parking_lot::Mutex;
use serde_json::Value;
use tailscope_server::listener::{serve_http, ConnectionLimits};
use tailscope_server::telemetry::Metrics;
use tailscope_server::tls::Tls;
use tailscope_test_support::pki::Pki;

use crate::common::*;

/// Requests seen (path, authorization header, body) and the statuses to answer, in turn
/// (then 200).
#[derive(Clone, Default)]
struct Impostor {
    seen: Arc<Mutex<Vec<(String, String, Value)>>>,
    script: Arc<Mutex<std::collections::VecDeque<u16>>>,
}

impl Impostor {
    /// Serves over TLS with `pki`'s server certificate; answers `script` first.
    async fn start(dir: &std::path::Path, pki: &Pki, script: &[u16]) -> (Impostor, SocketAddr) {
        let me =
            Impostor { script: Arc::new(Mutex::new(script.iter().copied().collect())), ..Default::default() };
        async fn take(State(me): State<Impostor>, uri: Uri, headers: HeaderMap, body: String) -> StatusCode {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            me.seen.lock().push((
                uri.path().to_owned(),
                auth,
                serde_json::from_str(&body).unwrap_or(Value::Null),
            ));
            let status = me.script.lock().pop_front().unwrap_or(200);
            StatusCode::from_u16(status).unwrap()
        }
        let router = axum::Router::new().fallback(axum::routing::post(take)).with_state(me.clone());
        let web =
            dir.join(format!("impostor-{}.yml", pki.server_cert.file_name().unwrap().to_string_lossy()));
        std::fs::write(
            &web,
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                pki.server_cert.display(),
                pki.server_key.display()
            ),
        )
        .unwrap();
        let tls = Arc::new(Tls::load(&web).unwrap().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(1),
        };
        let (_stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _keep = _stop;
            serve_http(listener, router, limits, Arc::new(Metrics::new()), Some(tls), rx).await
        });
        (me, addr)
    }

    fn seen(&self) -> Vec<(String, String, Value)> {
        self.seen.lock().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_reach_pagerduty_slack_and_a_webhook_over_https_with_their_credentials() {
    let dir = tempfile::tempdir().unwrap();
    // Each service its own private CA, as a real one would be trusted through its own chain.
    let (pd_ca, slack_ca, hook_ca) =
        (Pki::new(dir.path(), "pd-"), Pki::new(dir.path(), "slack-"), Pki::new(dir.path(), "hook-"));
    let (pagerduty, pd_addr) = Impostor::start(dir.path(), &pd_ca, &[503, 429]).await;
    let (slack, slack_addr) = Impostor::start(dir.path(), &slack_ca, &[400]).await;
    let (hook, hook_addr) = Impostor::start(dir.path(), &hook_ca, &[]).await;
    let password = dir.path().join("hook-password");
    std::fs::write(&password, "hunter2\n").unwrap();
    let notifier = format!(
        r#"route:
  receiver: oncall
  group_by: [alertname]
  group_wait: 0s
  group_interval: 1h
  repeat_interval: 4h
receivers:
  - name: oncall
    pagerduty_configs:
      - routing_key: r0ut1ng
        url: https://localhost:{pd}/v2/enqueue
        http_config: {{tls_config: {{ca_file: {pd_ca}}}}}
    slack_configs:
      - api_url: https://localhost:{slack}/services/T0/B0/X0
        channel: '#oncall'
        http_config: {{tls_config: {{ca_file: {slack_ca}}}}}
    webhook_configs:
      - url: https://localhost:{hook}/hook
        http_config:
          basic_auth: {{username: tailscope, password_file: {password}}}
          tls_config: {{ca_file: {hook_ca}}}
"#,
        pd = pd_addr.port(),
        slack = slack_addr.port(),
        hook = hook_addr.port(),
        pd_ca = pd_ca.ca.display(),
        slack_ca = slack_ca.ca.display(),
        hook_ca = hook_ca.ca.display(),
        password = password.display(),
    );
    let mut config = config(&dir.path().join("data"));
    config.alerting.alertmanager_config = dir.path().join("alertmanager.yml");
    std::fs::write(&config.alerting.alertmanager_config, notifier).unwrap();
    let server = tailscope_server::Server::start(config).await.expect("server starts");
    let alert = serde_json::json!([{"labels": {"alertname": "CheckoutP99", "service": "checkout", "severity": "page"},
        "annotations": {"summary": "p99 above 2 s"}}]);
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/v2/alerts", server.http_addr()))
        .json(&alert)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // PagerDuty answered 503, then 429, then took it: three attempts, one event.
    assert_eventually!(pagerduty.seen().len() >= 3, "PagerDuty: {:?}", pagerduty.seen());
    let events = pagerduty.seen();
    assert_eq!(events.len(), 3, "{events:?}");
    let (path, _, event) = &events[2];
    assert_eq!(path, "/v2/enqueue");
    assert_eq!(event["event_action"], "trigger");
    assert_eq!(event["routing_key"], "r0ut1ng");
    assert_eq!(event["payload"]["summary"], "[FIRING:1] CheckoutP99 (checkout page)");
    assert_eq!(event["dedup_key"].as_str().map(str::len), Some(64));
    // The webhook: Alertmanager's body, with basic auth from the password file.
    assert_eventually!(!hook.seen().is_empty(), "webhook");
    let (_, auth, body) = &hook.seen()[0];
    assert_eq!(auth, "Basic dGFpbHNjb3BlOmh1bnRlcjI=", "tailscope:hunter2");
    assert_eq!(body["version"], "4");
    // Slack answered 400: not retried.
    assert_eventually!(!slack.seen().is_empty(), "Slack");
    let text = metrics(server.http_addr()).await;
    let attempts = |result: &str| {
        metric(
            &text,
            &format!("tailscope_notification_attempts_total{{receiver=\"oncall\",result=\"{result}\"}}"),
        )
    };
    assert_eventually!(
        metric(
            &metrics(server.http_addr()).await,
            "tailscope_notifications_failed_total{receiver=\"oncall\"}"
        ) >= 1.0,
        "the refused Slack message is counted as failed"
    );
    let slack_seen = slack.seen();
    assert_eq!(slack_seen.len(), 1, "a 400 is not retried: {slack_seen:?}");
    assert_eq!(slack_seen[0].2["attachments"][0]["color"], "danger");
    assert_eq!(slack_seen[0].2["channel"], "#oncall");
    assert!(attempts("server_error") >= 2.0, "{text}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_forwarded_to_an_alertmanager_over_https_with_its_http_config() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Pki::new(dir.path(), "am-");
    let (am, am_addr) = Impostor::start(dir.path(), &ca, &[]).await;
    let http_config = dir.path().join("am-http.yml");
    std::fs::write(
        &http_config,
        format!(
            "tls_config: {{ca_file: {}}}\nbasic_auth: {{username: prom, password: secret}}\n",
            ca.ca.display()
        ),
    )
    .unwrap();
    let rules = dir.path().join("rules.yml");
    std::fs::write(
        &rules,
        "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - alert: Always\n        expr: '1'\n",
    )
    .unwrap();
    let mut config = config(&dir.path().join("data"));
    config.alerting.rule_files = vec![rules];
    config.alerting.alertmanager_urls = vec![format!("https://localhost:{}", am_addr.port())];
    config.alerting.alertmanager_http_config = http_config;
    let server = tailscope_server::Server::start(config).await.expect("server starts");
    assert_eventually!(!am.seen().is_empty(), "nothing forwarded");
    let (path, auth, body) = &am.seen()[0];
    assert_eq!(path, "/api/v2/alerts");
    assert_eq!(auth, "Basic cHJvbTpzZWNyZXQ=", "prom:secret");
    assert_eq!(body[0]["labels"]["alertname"], "Always");
    server.shutdown().await;
}
