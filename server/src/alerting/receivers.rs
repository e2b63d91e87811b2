//! Receivers, in Alertmanager's model: a receiver (`receivers[].name`) has integrations — one
//! per entry of its `*_configs` lists — and each integration turns a group's notification into
//! a request ([`Receiver`]). What every integration shares, retries with backoff and jitter, a
//! deadline, a circuit breaker and the attempt metrics, is [`retry::deliver`]; the notifier
//! decides when to notify and logs what was delivered per integration.
//!
//! A new integration type (`pagerduty_configs`, `slack_configs`, …) is a file here with its
//! YAML, its body and an `impl Receiver`, plus one line in [`ReceiverYaml`] and one in
//! [`ReceiverConfig::parse`].

pub mod alertmanager;
pub mod retry;
pub mod webhook;

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::{Alert, Labels};

/// A notification: one group's alerts at one flush.
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
    /// The alerts an integration is told of: resolved ones only if it wants them.
    pub fn alerts_for(&self, send_resolved: bool) -> Vec<&Alert> {
        self.alerts.iter().filter(|a| send_resolved || !a.resolved(self.now)).collect()
    }
}

/// One request an integration makes: a JSON body posted to a URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Where it is posted.
    pub url: String,
    /// `Authorization: Bearer …`, if any.
    pub bearer_token: Option<String>,
    /// The JSON body.
    pub body: Value,
}

/// An integration: how one entry of a receiver's `*_configs` is told of a notification.
pub trait Receiver: Send + Sync + fmt::Debug {
    /// Alertmanager's name of the integration type (`webhook`, …): in logs.
    fn kind(&self) -> &'static str;

    /// Whether it is told of resolved alerts (the notification log's decision needs it).
    fn send_resolved(&self) -> bool;

    /// The request for `n`; `None` when nothing is left to send (only resolves, unwanted).
    fn request(&self, n: &Notification) -> Option<Request>;

    /// Whether an HTTP status is worth another attempt: by default 5xx and 429, never another
    /// 4xx (the body will not get better).
    fn retryable(&self, status: u16) -> bool {
        status >= 500 || status == 429
    }
}

/// A receiver's `*_configs` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReceiverYaml {
    pub(super) name: String,
    #[serde(default)]
    webhook_configs: Vec<webhook::WebhookYaml>,
}

/// A receiver: its name and its integrations, in the order written.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Its name.
    pub name: String,
    /// Its integrations; the index in this list is each one's identity in the notification
    /// log and for its breaker.
    pub integrations: Vec<Arc<dyn Receiver>>,
}

impl ReceiverConfig {
    /// Builds every integration of `y`; errors name the receiver, the list and the index.
    pub(super) fn parse(y: ReceiverYaml) -> Result<ReceiverConfig, String> {
        if y.name.is_empty() {
            return Err("receivers: a receiver has an empty name".into());
        }
        let mut integrations: Vec<Arc<dyn Receiver>> = Vec::new();
        for (i, w) in y.webhook_configs.into_iter().enumerate() {
            let at = format!("receiver {:?}: webhook_configs[{i}]", y.name);
            integrations.push(Arc::new(webhook::Webhook::parse(w).map_err(|e| format!("{at}: {e}"))?));
        }
        Ok(ReceiverConfig { name: y.name, integrations })
    }
}

#[cfg(test)]
mod tests;
