use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

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
    let hook = Webhook { url: "http://r/".into(), send_resolved: true, max_alerts: 0, bearer_token: None };
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

    // Through the trait: the request carries the URL and the token.
    let with_token = Webhook { bearer_token: Some("t".into()), ..hook.clone() };
    let r = Receiver::request(&with_token, &n).unwrap();
    assert_eq!((r.url.as_str(), r.bearer_token.as_deref()), ("http://r/", Some("t")));
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
    let hook =
        Webhook { url: url.clone(), send_resolved: true, max_alerts: 0, bearer_token: Some("t".into()) };
    let metrics = Metrics::new();
    let breaker = Breaker::new(Duration::from_secs(30));
    let client = reqwest::Client::new();
    let target = Target {
        client: &client,
        receiver: "r",
        breaker: &breaker,
        timeout: Duration::from_secs(5),
        metrics: &metrics,
    };
    let request = Request { url, bearer_token: Some("t".into()), body: json!({}) };
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
