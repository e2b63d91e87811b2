//! Webhook delivery: Alertmanager's v4 JSON body, a timeout per request, retries with
//! exponential backoff and full jitter on connection errors, 5xx and 429 (never on other 4xx),
//! bounded by a deadline, and a circuit breaker per webhook so a dead receiver costs one probe
//! per cool-down instead of a timeout per notification.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::route::Webhook;
use super::{fingerprint_hex, rfc3339, Alert, Labels, ZERO_TIME};
use crate::telemetry::{AttemptLabel, Metrics};

/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Consecutive failures that open a breaker.
const BREAKER_THRESHOLD: u32 = 5;

/// A notification for one receiver: one group's alerts at one flush.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The receiver's name.
    pub receiver: String,
    /// Alertmanager's group key.
    pub group_key: String,
    /// The group's labels.
    pub group_labels: Labels,
    /// Its alerts, sorted, with their state at the flush.
    pub alerts: Vec<Alert>,
    /// When the flush happened (ms): what "resolved" is judged against.
    pub now: i64,
    /// `externalURL`.
    pub external_url: String,
}

impl Notification {
    /// The v4 body for `webhook` (resolved alerts dropped when it does not want them; at most
    /// `max_alerts`, the rest counted in `truncatedAlerts`). `None` when nothing is left.
    pub fn body(&self, webhook: &Webhook) -> Option<Value> {
        let mut alerts: Vec<&Alert> =
            self.alerts.iter().filter(|a| webhook.send_resolved || !a.resolved(self.now)).collect();
        if alerts.is_empty() {
            return None;
        }
        let mut truncated = 0;
        if webhook.max_alerts > 0 && alerts.len() > webhook.max_alerts {
            truncated = alerts.len() - webhook.max_alerts;
            alerts.truncate(webhook.max_alerts);
        }
        let firing = alerts.iter().any(|a| !a.resolved(self.now));
        let common = |get: fn(&Alert) -> &Labels| -> Labels {
            let mut it = alerts.iter();
            let mut common = it.next().map(|a| get(a).clone()).unwrap_or_default();
            for a in it {
                common.retain(|k, v| get(a).get(k) == Some(v));
            }
            common
        };
        let status = |resolved: bool| if resolved { "resolved" } else { "firing" };
        Some(json!({
            "receiver": self.receiver,
            "status": status(!firing),
            "alerts": alerts.iter().map(|a| {
                let resolved = a.resolved(self.now);
                json!({
                    "status": status(resolved),
                    "labels": a.labels,
                    "annotations": a.annotations,
                    "startsAt": rfc3339(a.starts_at),
                    // Alertmanager shows no end while an alert fires.
                    "endsAt": if resolved { rfc3339(a.ends_at) } else { ZERO_TIME.to_owned() },
                    "generatorURL": a.generator_url,
                    "fingerprint": fingerprint_hex(&a.labels),
                })
            }).collect::<Vec<_>>(),
            "groupLabels": self.group_labels,
            "commonLabels": common(|a| &a.labels),
            "commonAnnotations": common(|a| &a.annotations),
            "externalURL": self.external_url,
            "version": "4",
            "groupKey": self.group_key,
            "truncatedAlerts": truncated,
        }))
    }
}

/// A circuit breaker: open after [`BREAKER_THRESHOLD`] consecutive failures, for `cool_down`;
/// then one probe decides (half-open).
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<BreakerState>,
    cool_down: Duration,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cool_down: Duration) -> Breaker {
        Breaker { state: Mutex::new(BreakerState::default()), cool_down }
    }

    /// Whether a request may go out now (closed, or half-open after the cool-down).
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match s.open_until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                // Half-open: this caller probes; others wait for its verdict.
                s.open_until = Some(Instant::now() + self.cool_down);
                true
            }
            None => true,
        }
    }

    /// Records an attempt's outcome.
    pub fn record(&self, ok: bool) {
        let mut s = self.state.lock();
        if ok {
            *s = BreakerState::default();
        } else {
            s.failures += 1;
            if s.failures >= BREAKER_THRESHOLD {
                s.open_until = Some(Instant::now() + self.cool_down);
            }
        }
    }

    /// Whether the breaker is open.
    pub fn is_open(&self) -> bool {
        self.state.lock().open_until.is_some()
    }
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx.
    Success,
    /// 5xx or 429: retried.
    ServerError,
    /// Another 4xx: the body will not get better, not retried.
    ClientError,
    /// Could not connect or the connection broke: retried.
    ConnectionError,
    /// No answer within the timeout: retried.
    Timeout,
    /// The breaker is open: not sent.
    BreakerOpen,
}

impl Attempt {
    fn label(self) -> &'static str {
        match self {
            Attempt::Success => "success",
            Attempt::ServerError => "server_error",
            Attempt::ClientError => "client_error",
            Attempt::ConnectionError => "connection_error",
            Attempt::Timeout => "timeout",
            Attempt::BreakerOpen => "breaker_open",
        }
    }

    fn retryable(self) -> bool {
        !matches!(self, Attempt::Success | Attempt::ClientError)
    }
}

/// Where and how a notification is delivered.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The HTTP client.
    pub client: &'a reqwest::Client,
    /// The webhook.
    pub webhook: &'a Webhook,
    /// Its receiver's name (for metrics).
    pub receiver: &'a str,
    /// The webhook's breaker.
    pub breaker: &'a Breaker,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Where attempts are counted.
    pub metrics: &'a Metrics,
}

/// Posts `body` until it succeeds, fails for good, or `deadline` passes. Every attempt is
/// counted in `/metrics`.
pub async fn deliver(target: Target<'_>, body: &Value, deadline: Instant) -> Result<(), String> {
    let Target { client, webhook, receiver, breaker, timeout, metrics } = target;
    let mut attempt = 0u32;
    loop {
        let (outcome, detail) = if breaker.allow() {
            let mut req = client.post(&webhook.url).json(body).timeout(timeout);
            if let Some(t) = &webhook.bearer_token {
                req = req.bearer_auth(t);
            }
            let (outcome, detail) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let outcome = if status.is_success() {
                        Attempt::Success
                    } else if status.is_server_error() || status.as_u16() == 429 {
                        Attempt::ServerError
                    } else {
                        Attempt::ClientError
                    };
                    (outcome, format!("HTTP {status}"))
                }
                Err(e) if e.is_timeout() => (Attempt::Timeout, format!("no answer within {timeout:?}")),
                Err(e) => (Attempt::ConnectionError, e.to_string()),
            };
            // A 4xx means the receiver is up (the notification is what it refuses).
            breaker.record(matches!(outcome, Attempt::Success | Attempt::ClientError));
            (outcome, detail)
        } else {
            (Attempt::BreakerOpen, "circuit breaker open".to_owned())
        };
        metrics
            .notification_attempts
            .get_or_create(&AttemptLabel { receiver: receiver.to_owned(), result: outcome.label() })
            .inc();
        if outcome == Attempt::Success {
            return Ok(());
        }
        if !outcome.retryable() {
            return Err(format!("{}: {detail} (not retried)", webhook.url));
        }
        let backoff = BASE_BACKOFF.saturating_mul(1 << attempt.min(16)).min(MAX_BACKOFF);
        // Full jitter: anywhere between zero and the backoff, so receivers coming back are not
        // hit by every sender at once.
        let wait = backoff.mul_f64(jitter());
        if Instant::now() + wait >= deadline {
            return Err(format!("{}: {detail} (gave up after {} attempts)", webhook.url, attempt + 1));
        }
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// A uniform number in [0, 1) from the clock's low bits mixed (no RNG state to share).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64 ^ d.as_secs());
    (xxhash_rust::xxh3::xxh3_64(&nanos.to_le_bytes()) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

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
    fn the_body_is_alertmanagers_v4() {
        let n = Notification {
            receiver: "team".into(),
            group_key: "{}:{alertname=\"P99\"}".into(),
            group_labels: [("alertname".to_string(), "P99".to_string())].into(),
            alerts: vec![alert("P99", "a", 10_000), alert("P99", "b", 2_000)],
            now: 5_000,
            external_url: "http://tailscope".into(),
        };
        let hook =
            Webhook { url: "http://r/".into(), send_resolved: true, max_alerts: 0, bearer_token: None };
        let body = n.body(&hook).unwrap();
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
        assert_eq!(n.body(&no_resolved).unwrap()["alerts"].as_array().map(Vec::len), Some(1));
        let one = Webhook { max_alerts: 1, ..hook.clone() };
        assert_eq!(n.body(&one).unwrap()["truncatedAlerts"], 1);
        let all_resolved = Notification { now: 20_000, ..n.clone() };
        assert_eq!(all_resolved.body(&hook).unwrap()["status"], "resolved");
        assert!(all_resolved.body(&no_resolved).is_none());
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

    async fn attempt(statuses: Vec<u16>, deadline: Duration) -> (Result<(), String>, usize, String) {
        let (url, hits) = receiver(statuses).await;
        let webhook = Webhook { url, send_resolved: true, max_alerts: 0, bearer_token: Some("t".into()) };
        let metrics = Metrics::new();
        let breaker = Breaker::new(Duration::from_secs(30));
        let client = reqwest::Client::new();
        let target = Target {
            client: &client,
            webhook: &webhook,
            receiver: "r",
            breaker: &breaker,
            timeout: Duration::from_secs(5),
            metrics: &metrics,
        };
        let result = deliver(target, &json!({}), Instant::now() + deadline).await;
        (result, hits.load(Ordering::SeqCst), metrics.encode())
    }

    #[tokio::test]
    async fn server_errors_and_429_are_retried_other_4xx_are_not() {
        let (result, hits, metrics) = attempt(vec![503, 429], Duration::from_secs(10)).await;
        assert_eq!((result, hits), (Ok(()), 3));
        assert!(
            metrics
                .contains("tailscope_notification_attempts_total{receiver=\"r\",result=\"server_error\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tailscope_notification_attempts_total{receiver=\"r\",result=\"success\"} 1"),
            "{metrics}"
        );

        let (result, hits, metrics) = attempt(vec![400], Duration::from_secs(10)).await;
        assert_eq!(hits, 1, "a 4xx is not retried");
        assert!(result.unwrap_err().contains("HTTP 400 Bad Request (not retried)"));
        assert!(metrics.contains("result=\"client_error\"} 1"), "{metrics}");

        // Retries stop at the deadline.
        let (result, hits, _) = attempt(vec![500; 1000], Duration::from_millis(300)).await;
        assert!(result.unwrap_err().contains("gave up after"));
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
}
