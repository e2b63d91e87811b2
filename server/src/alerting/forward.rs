//! Forwarding to existing Alertmanagers: alerts are posted to `<url>/api/v2/alerts` the way
//! Prometheus posts them (firing alerts resent every `resend_delay`, resolves at once, each
//! with an `endsAt`), so a team's Alertmanager keeps doing the routing.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{rfc3339, Alert, Sink};
use crate::telemetry::{Metrics, Outcome};

/// Most alerts per request, as Prometheus' notifier batches them.
const MAX_BATCH: usize = 64;

/// Posts alerts to Alertmanagers from a bounded queue.
#[derive(Debug, Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Vec<Alert>>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Starts the forwarding task.
    pub fn start(
        urls: Vec<String>,
        capacity: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) -> (Forwarder, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Vec<Alert>>(capacity.max(1));
        let client = reqwest::Client::builder().timeout(timeout).build().unwrap_or_default();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    b = rx.recv() => match b { Some(b) => b, None => return },
                    _ = stop.wait_for(|&s| s) => return,
                };
                for chunk in batch.chunks(MAX_BATCH) {
                    let body: Vec<Value> = chunk.iter().map(postable).collect();
                    for url in &urls {
                        let endpoint = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
                        let result = match client.post(&endpoint).json(&body).send().await {
                            Ok(r) if r.status().is_success() => "success",
                            Ok(r) => {
                                tracing::warn!(%endpoint, status = %r.status(), "Alertmanager refused alerts");
                                "error"
                            }
                            Err(e) => {
                                tracing::warn!(%endpoint, error = %e, "cannot reach Alertmanager");
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
