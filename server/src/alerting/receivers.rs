//! Receivers, in Alertmanager's model: a receiver (`receivers[].name`) has integrations — one
//! per entry of its `*_configs` lists — and each integration turns a group's notification into
//! a request ([`Receiver`]). What every integration shares, retries with backoff and jitter, a
//! deadline, a circuit breaker and the attempt metrics, is [`retry::deliver`]; the notifier
//! decides when to notify and logs what was delivered per integration.
//!
//! The integrations: `webhook_configs` (Alertmanager's JSON), `pagerduty_configs` (Events API
//! v2) and `slack_configs` (incoming webhooks), each reaching its receiver over http or https
//! with Alertmanager's `http_config` ([`http_config`]). A new integration type is a file here
//! with its YAML, its body and an `impl Receiver`, plus one line in [`ReceiverYaml`] and one
//! loop in [`ReceiverConfig::parse`].

pub mod alertmanager;
pub mod http_config;
pub mod pagerduty;
pub mod retry;
pub mod slack;
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

    /// Whether any of `alerts` still fires.
    pub fn firing(&self, alerts: &[&Alert]) -> usize {
        alerts.iter().filter(|a| !a.resolved(self.now)).count()
    }

    /// The labels (or, with `annotations`, the annotations) every one of `alerts` has alike.
    pub fn common(alerts: &[&Alert], annotations: bool) -> Labels {
        let get = |a: &Alert| if annotations { a.annotations.clone() } else { a.labels.clone() };
        let mut it = alerts.iter();
        let mut common = it.next().map(|a| get(a)).unwrap_or_default();
        for a in it {
            let other = get(a);
            common.retain(|k, v| other.get(k) == Some(v));
        }
        common
    }

    /// Alertmanager's default subject (`__subject`): `[FIRING:2] <group label values>
    /// (<the other common label values>)`, or `[RESOLVED] …`.
    pub fn subject(&self, alerts: &[&Alert]) -> String {
        let firing = self.firing(alerts);
        let mut out = if firing > 0 { format!("[FIRING:{firing}]") } else { "[RESOLVED]".to_owned() };
        let values: Vec<&str> = self.group_labels.values().map(String::as_str).collect();
        if !values.is_empty() {
            out.push(' ');
            out.push_str(&values.join(" "));
        }
        let common = Notification::common(alerts, false);
        let rest: Vec<&str> = common
            .iter()
            .filter(|(k, _)| !self.group_labels.contains_key(*k))
            .map(|(_, v)| v.as_str())
            .collect();
        if !rest.is_empty() {
            out.push_str(&format!(" ({})", rest.join(" ")));
        }
        out
    }

    /// Alertmanager's link to the receiver's alerts (`__alertmanagerURL`).
    pub fn link(&self) -> String {
        let receiver: String = form_urlencoded::byte_serialize(self.receiver.as_bytes()).collect();
        format!("{}/#/alerts?receiver={receiver}", self.external_url.trim_end_matches('/'))
    }

    /// Alertmanager's `*.default.instances`: each alert's labels, annotations and source.
    pub fn instances(&self, alerts: &[&Alert]) -> String {
        let mut out = String::new();
        for a in alerts {
            out.push_str("Labels:\n");
            for (k, v) in &a.labels {
                out.push_str(&format!(" - {k} = {v}\n"));
            }
            out.push_str("Annotations:\n");
            for (k, v) in &a.annotations {
                out.push_str(&format!(" - {k} = {v}\n"));
            }
            out.push_str(&format!("Source: {}\n", a.generator_url));
        }
        out
    }
}

/// A literal text field of an integration: template syntax (Alertmanager's Go templates) is
/// refused by name rather than sent verbatim.
pub(super) fn literal(key: &str, value: Option<String>) -> Result<Option<String>, String> {
    match value {
        Some(v) if v.contains("{{") => Err(format!(
            "{key}: notification templates are not supported; leave it out for Alertmanager's default, or give plain text"
        )),
        v => Ok(v),
    }
}

/// One request an integration makes: a JSON body posted to a URL (with the credentials of
/// the integration's `http_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Where it is posted.
    pub url: String,
    /// The JSON body.
    pub body: Value,
}

/// An integration: how one entry of a receiver's `*_configs` is told of a notification.
pub trait Receiver: Send + Sync + fmt::Debug {
    /// Alertmanager's name of the integration type (`webhook`, …): in logs.
    fn kind(&self) -> &'static str;

    /// Whether it is told of resolved alerts (the notification log's decision needs it).
    fn send_resolved(&self) -> bool;

    /// How it reaches its receiver: its client and credentials (`http_config`).
    fn http(&self) -> &http_config::HttpConfig;

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
    #[serde(default)]
    pagerduty_configs: Vec<pagerduty::PagerDutyYaml>,
    #[serde(default)]
    slack_configs: Vec<slack::SlackYaml>,
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
        for (i, p) in y.pagerduty_configs.into_iter().enumerate() {
            let at = format!("receiver {:?}: pagerduty_configs[{i}]", y.name);
            integrations.push(Arc::new(pagerduty::PagerDuty::parse(p).map_err(|e| format!("{at}: {e}"))?));
        }
        for (i, c) in y.slack_configs.into_iter().enumerate() {
            let at = format!("receiver {:?}: slack_configs[{i}]", y.name);
            integrations.push(Arc::new(slack::Slack::parse(c).map_err(|e| format!("{at}: {e}"))?));
        }
        Ok(ReceiverConfig { name: y.name, integrations })
    }
}

#[cfg(test)]
mod tests;
