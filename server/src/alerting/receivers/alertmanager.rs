//! Forwarding to existing Alertmanagers: alerts are posted to `<url>/api/v2/alerts` the way
//! Prometheus posts them (firing alerts resent every `resend_delay`, resolves at once, each
//! with an `endsAt`), so a team's Alertmanager keeps doing the routing. Each Alertmanager is
//! an integration ([`AlertmanagerApi`]) delivered through the shared retry and breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::http_config::HttpConfig;
use super::retry::{self, Breaker, Target};
use super::{Notification, Receiver, Request};
use crate::alerting::{rfc3339, Alert, Sink};
use crate::telemetry::{Metrics, Outcome};

/// Most alerts per request, as Prometheus' notifier batches them.
const MAX_BATCH: usize = 64;
/// The receiver name attempts are counted under (the configuration key, no receiver's name).
const RECEIVER: &str = "alertmanager_urls";

/// One Alertmanager's API v2.
#[derive(Debug, Clone)]
pub struct AlertmanagerApi {
    endpoint: String,
    http: HttpConfig,
}

impl AlertmanagerApi {
    /// The Alertmanager at `url` (`http://host:9093` or `https://…`), reached as `http` says.
    pub fn new(url: &str, http: HttpConfig) -> AlertmanagerApi {
        AlertmanagerApi { endpoint: format!("{}/api/v2/alerts", url.trim_end_matches('/')), http }
    }
}

impl Receiver for AlertmanagerApi {
    fn kind(&self) -> &'static str {
        "alertmanager"
    }

    fn send_resolved(&self) -> bool {
        true
    }

    fn http(&self) -> &HttpConfig {
        &self.http
    }

    fn request(&self, n: &Notification) -> Option<Request> {
        if n.alerts.is_empty() {
            return None;
        }
        let body = Value::Array(n.alerts.iter().map(postable).collect());
        Some(Request { url: self.endpoint.clone(), body })
    }
}

/// Posts alerts to Alertmanagers from a bounded queue.
#[derive(Debug, Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Vec<Alert>>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Starts the forwarding task. Each request is retried (connection errors, 5xx, 429)
    /// within `timeout`; an Alertmanager that keeps failing opens its breaker.
    pub fn start(
        urls: Vec<String>,
        http: HttpConfig,
        capacity: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) -> (Forwarder, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Vec<Alert>>(capacity.max(1));
        let apis: Vec<(AlertmanagerApi, Breaker)> = urls
            .iter()
            .map(|u| {
                (AlertmanagerApi::new(u, http.clone()), Breaker::new(timeout.max(Duration::from_secs(1))))
            })
            .collect();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    b = rx.recv() => match b { Some(b) => b, None => return },
                    _ = stop.wait_for(|&s| s) => return,
                };
                for chunk in batch.chunks(MAX_BATCH) {
                    let n = Notification {
                        receiver: RECEIVER.into(),
                        group_key: String::new(),
                        group_labels: Default::default(),
                        alerts: chunk.to_vec(),
                        now: 0,
                        external_url: String::new(),
                    };
                    for (api, breaker) in &apis {
                        let Some(request) = api.request(&n) else { continue };
                        let target =
                            Target { http: api.http(), receiver: RECEIVER, breaker, timeout, metrics: &m };
                        let retryable = |s| api.retryable(s);
                        let result = match retry::deliver(
                            target,
                            &request,
                            &retryable,
                            Instant::now() + timeout,
                        )
                        .await
                        {
                            Ok(()) => "success",
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot forward alerts to Alertmanager");
                                "error"
                            }
                        };
                        m.alerts_forwarded.get_or_create(&Outcome { result }).inc_by(chunk.len() as u64);
                    }
                }
            }
        });
        (Forwarder { tx, metrics }, task)
    }
}

/// Alertmanager's `postableAlert`.
pub fn postable(a: &Alert) -> Value {
    json!({
        "labels": a.labels,
        "annotations": a.annotations,
        "startsAt": rfc3339(a.starts_at),
        "endsAt": rfc3339(a.ends_at),
        "generatorURL": a.generator_url,
    })
}

impl Sink for Forwarder {
    fn send(&self, alerts: Vec<Alert>) {
        let n = alerts.len() as u64;
        if self.tx.try_send(alerts).is_err() {
            self.metrics.alerts_forwarded.get_or_create(&Outcome { result: "dropped" }).inc_by(n);
        }
    }
}
