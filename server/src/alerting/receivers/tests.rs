use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::http_config::HttpConfig;
use super::retry::{deliver, Breaker, DeliveryError, Target, BREAKER_THRESHOLD};
use super::webhook::Webhook;
use super::*;
use crate::alerting::ZERO_TIME;
use crate::telemetry::Metrics;

fn alert(name: &str, service: &str, ends_at: i64) -> Alert {
    Alert {
        labels: [("alertname", name), ("service", service), ("severity", "page")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: [("summary".to_string(), format!("{service} slow"))].into(),
        starts_at: 1_000,
        ends_at,
        generator_url: "http://x/graph".into(),
    }
}

#[test]
fn the_webhook_body_is_alertmanagers_v4() {
    let n = Notification {
        receiver: "team".into(),
        group_key: "{}:{alertname=\"P99\"}".into(),
        group_labels: [("alertname".to_string(), "P99".to_string())].into(),
        alerts: vec![alert("P99", "a", 10_000), alert("P99", "b", 2_000)],
        now: 5_000,
        external_url: "http://tailscope".into(),
    };
    let hook =
        Webhook { url: "http://r/".into(), send_resolved: true, max_alerts: 0, http: HttpConfig::default() };
    let body = hook.body(&n).unwrap();
    assert_eq!(body["status"], "firing");
    assert_eq!(body["version"], "4");
    assert_eq!(body["alerts"][0]["status"], "firing");
    assert_eq!(body["alerts"][0]["endsAt"], ZERO_TIME);
    assert_eq!(body["alerts"][1]["status"], "resolved");
    assert_eq!(body["alerts"][1]["endsAt"], "1970-01-01T00:00:02Z");
    assert_eq!(body["alerts"][0]["startsAt"], "1970-01-01T00:00:01Z");
    assert_eq!(body["commonLabels"], json!({"alertname": "P99", "severity": "page"}));
    assert_eq!(body["commonAnnotations"], json!({}));
    assert_eq!(body["truncatedAlerts"], 0);
    assert_eq!(body["alerts"][0]["fingerprint"].as_str().map(str::len), Some(16));

    let no_resolved = Webhook { send_resolved: false, max_alerts: 0, ..hook.clone() };
    assert_eq!(no_resolved.body(&n).unwrap()["alerts"].as_array().map(Vec::len), Some(1));
    let one = Webhook { max_alerts: 1, ..hook.clone() };
    assert_eq!(one.body(&n).unwrap()["truncatedAlerts"], 1);
    let all_resolved = Notification { now: 20_000, ..n.clone() };
    assert_eq!(hook.body(&all_resolved).unwrap()["status"], "resolved");
    assert!(no_resolved.body(&all_resolved).is_none());

    // Through the trait: the request carries the URL and the body.
    let r = Receiver::request(&hook, &n).unwrap();
    assert_eq!(r.url.as_str(), "http://r/");
    assert_eq!(r.body, body);
    assert!(Receiver::request(&no_resolved, &all_resolved).is_none());
}

#[test]
fn receivers_parse_their_integrations_and_name_the_bad_one() {
    let parse = |y: &str| ReceiverConfig::parse(serde_yaml::from_str(y).unwrap());
    let r =
        parse("name: team\nwebhook_configs: [{url: 'http://a/'}, {url: 'http://b/', send_resolved: false}]")
            .unwrap();
    assert_eq!(r.integrations.len(), 2);
    assert!(r.integrations[0].send_resolved() && !r.integrations[1].send_resolved());
    assert_eq!(r.integrations[1].kind(), "webhook");
    let err = parse("name: team\nwebhook_configs: [{url: 'http://a/'}, {url: 'ftp://b/'}]").unwrap_err();
    assert!(err.starts_with("receiver \"team\": webhook_configs[1]: url \"ftp://b/\""), "{err}");
    assert!(parse("name: ''").unwrap_err().contains("empty name"));
}

/// A receiver answering with `statuses` in turn (then 200), counting requests.
async fn receiver(statuses: Vec<u16>) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(axum::routing::post(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let status = statuses.get(n).copied().unwrap_or(200);
        async move { axum::http::StatusCode::from_u16(status).unwrap() }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), hits)
}

async fn attempt(statuses: Vec<u16>, deadline: Duration) -> (Result<(), DeliveryError>, usize, String) {
    let (url, hits) = receiver(statuses).await;
    let hook = Webhook { url: url.clone(), send_resolved: true, max_alerts: 0, http: HttpConfig::default() };
    let metrics = Metrics::new();
    let breaker = Breaker::new(Duration::from_secs(30));
    let target = Target {
        http: hook.http(),
        receiver: "r",
        breaker: &breaker,
        timeout: Duration::from_secs(5),
        metrics: &metrics,
    };
    let request = Request { url, body: json!({}) };
    let retryable = |s| hook.retryable(s);
    let result = deliver(target, &request, &retryable, Instant::now() + deadline).await;
    (result, hits.load(Ordering::SeqCst), metrics.encode())
}

#[tokio::test]
async fn server_errors_and_429_are_retried_other_4xx_are_not() {
    let (result, hits, metrics) = attempt(vec![503, 429], Duration::from_secs(10)).await;
    assert_eq!((result, hits), (Ok(()), 3));
    assert!(
        metrics.contains("tailscope_notification_attempts_total{receiver=\"r\",result=\"server_error\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tailscope_notification_attempts_total{receiver=\"r\",result=\"success\"} 1"),
        "{metrics}"
    );

    let (result, hits, metrics) = attempt(vec![400], Duration::from_secs(10)).await;
    assert_eq!(hits, 1, "a 4xx is not retried");
    let err = result.unwrap_err();
    assert!(matches!(err, DeliveryError::Refused { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP 400 Bad Request (not retried)"), "{err}");
    assert!(metrics.contains("result=\"client_error\"} 1"), "{metrics}");

    // Retries stop at the deadline.
    let (result, hits, _) = attempt(vec![500; 1000], Duration::from_millis(300)).await;
    let err = result.unwrap_err();
    assert!(matches!(err, DeliveryError::GaveUp { attempts, .. } if attempts as usize >= hits), "{err:?}");
    assert!(err.to_string().contains("gave up after"), "{err}");
    assert!((1..20).contains(&hits), "{hits}");
}

#[test]
fn the_breaker_opens_after_repeated_failures_and_probes_after_the_cool_down() {
    let b = Breaker::new(Duration::from_millis(20));
    for _ in 0..BREAKER_THRESHOLD {
        assert!(b.allow());
        b.record(false);
    }
    assert!(!b.allow());
    std::thread::sleep(Duration::from_millis(25));
    assert!(b.allow(), "half-open after the cool-down");
    assert!(!b.allow(), "one probe at a time");
    b.record(true);
    assert!(b.allow() && !b.is_open());
}

/// Every field of `ours` is a field of the documented example `doc`, with the same JSON type,
/// object by object: what we send is what the service documents.
fn shaped_like(ours: &serde_json::Value, doc: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (ours, doc) {
        (Value::Object(o), Value::Object(d)) => {
            for (k, v) in o {
                // custom_details is free-form.
                if at.ends_with("custom_details") {
                    continue;
                }
                let documented =
                    d.get(k).unwrap_or_else(|| panic!("{at}.{k} is not in the documented example"));
                shaped_like(v, documented, &format!("{at}.{k}"));
            }
        }
        (Value::Array(o), Value::Array(d)) => {
            for v in o {
                shaped_like(v, &d[0], &format!("{at}[]"));
            }
        }
        (o, d) => assert_eq!(std::mem::discriminant(o), std::mem::discriminant(d), "{at}: {o} vs {d}"),
    }
}

fn crafted() -> Notification {
    // Label values that try to break out of a JSON string or inject a template.
    let evil = "x\", \"event_action\": \"resolve\"}\n{{ .Status }} ] } \\";
    let mut a = alert("Latency", "checkout", 1_000_000);
    a.labels.insert("detail".into(), evil.into());
    Notification {
        receiver: "pager".into(),
        group_key: "{}/{severity=\"page\"}:{alertname=\"Latency\"}".into(),
        group_labels: [("alertname".to_string(), "Latency".to_string())].into(),
        alerts: vec![a, alert("Latency", "payments", 2_000)],
        now: 5_000,
        external_url: "https://tailscope.example".into(),
    }
}

#[test]
fn pagerduty_events_are_the_documented_shape_deduplicated_by_group() {
    use super::pagerduty::{dedup_key, PagerDuty};
    let parse = |y: &str| PagerDuty::parse(serde_yaml::from_str(y).unwrap());
    let pd = parse("routing_key: r0ut1ng\nseverity: critical\n").unwrap();
    let n = crafted();
    let body = pd.body(&n).unwrap();
    let doc: serde_json::Value = serde_json::from_str(include_str!("fixtures/pagerduty-event.json")).unwrap();
    shaped_like(&body, &doc, "");
    assert_eq!(body["event_action"], "trigger");
    assert_eq!(body["routing_key"], "r0ut1ng");
    assert_eq!(body["dedup_key"], dedup_key(&n.group_key));
    assert_eq!(body["dedup_key"].as_str().unwrap().len(), 64);
    assert_eq!(body["payload"]["severity"], "critical");
    assert_eq!(body["payload"]["summary"], "[FIRING:1] Latency (page)");
    assert_eq!(body["payload"]["custom_details"]["num_resolved"], "1");
    // The crafted value is data, nothing more: it did not change the event.
    let firing = body["payload"]["custom_details"]["firing"].as_str().unwrap();
    assert!(firing.contains("x\", \"event_action\": \"resolve\"}\n{{ .Status }}"), "{firing}");
    assert_eq!(body["client_url"], "https://tailscope.example/#/alerts?receiver=pager");
    // All resolved: a resolve with the same key.
    let resolved = Notification { now: 10_000_000, ..n.clone() };
    let body = pd.body(&resolved).unwrap();
    assert_eq!(
        (body["event_action"].as_str(), body["dedup_key"].as_str()),
        (Some("resolve"), Some(&*dedup_key(&n.group_key)))
    );
    for (yaml, want) in [
        ("severity: page\nrouting_key: k\n", "severity: \"page\""),
        ("{}", "routing_key or routing_key_file is required"),
        (
            "routing_key: k\ndescription: '{{ .Status }}'\n",
            "description: notification templates are not supported",
        ),
        ("routing_key: k\nurl: 'ftp://x'\n", "the scheme must be http or https"),
    ] {
        let e = parse(yaml).unwrap_err();
        assert!(e.contains(want), "{yaml}: {e}");
    }
}

#[test]
fn slack_messages_are_the_documented_shape() {
    use super::slack::Slack;
    let parse = |y: &str| Slack::parse(serde_yaml::from_str(y).unwrap());
    let slack =
        parse("api_url: 'https://hooks.slack.com/services/T/B/X'\nchannel: '#oncall'\nsend_resolved: true\n")
            .unwrap();
    let n = crafted();
    let body = slack.body(&n).unwrap();
    let doc: serde_json::Value = serde_json::from_str(include_str!("fixtures/slack-message.json")).unwrap();
    shaped_like(&body, &doc, "");
    let a = &body["attachments"][0];
    assert_eq!(body["channel"], "#oncall");
    assert_eq!(a["color"], "danger");
    assert_eq!(a["title"], "[FIRING:1] Latency (page)");
    assert_eq!(a["title_link"], "https://tailscope.example/#/alerts?receiver=pager");
    assert_eq!(
        a["fallback"],
        "[FIRING:1] Latency (page) | https://tailscope.example/#/alerts?receiver=pager"
    );
    let resolved = Notification { now: 10_000_000, ..n.clone() };
    assert_eq!(slack.body(&resolved).unwrap()["attachments"][0]["color"], "good");
    // Alertmanager's default for Slack: resolves are not sent.
    let quiet = parse("api_url: 'https://hooks.slack.com/x'\n").unwrap();
    assert!(!quiet.send_resolved() && quiet.body(&resolved).is_none());
    assert!(parse("channel: x\n").unwrap_err().contains("api_url or api_url_file is required"));
}
