//! The webhook integration (`webhook_configs`): Alertmanager's v4 JSON body, posted over http
//! or https with the integration's `http_config`.

use serde::Deserialize;
use serde_json::{json, Value};

use super::http_config::{check_url, HttpConfig, HttpConfigYaml};
use super::{Notification, Receiver, Request};
use crate::alerting::{fingerprint_hex, rfc3339, ZERO_TIME};

/// `webhook_configs[]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::alerting) struct WebhookYaml {
    url: String,
    send_resolved: Option<bool>,
    #[serde(default)]
    max_alerts: usize,
    #[serde(default)]
    http_config: HttpConfigYaml,
}

/// One webhook of a receiver.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Where notifications are posted.
    pub url: String,
    /// Whether resolved alerts are sent.
    pub send_resolved: bool,
    /// Most alerts per notification (0: all).
    pub max_alerts: usize,
    /// Its client and credentials.
    pub http: HttpConfig,
}

impl Webhook {
    /// Checks a `webhook_configs` entry; the error says which field is wrong.
    pub(in crate::alerting) fn parse(w: WebhookYaml) -> Result<Webhook, String> {
        check_url("url", &w.url)?;
        Ok(Webhook {
            url: w.url,
            send_resolved: w.send_resolved.unwrap_or(true),
            max_alerts: w.max_alerts,
            http: HttpConfig::build(w.http_config)?,
        })
    }

    /// The v4 body of `n` (resolved alerts dropped when it does not want them; at most
    /// `max_alerts`, the rest counted in `truncatedAlerts`). `None` when nothing is left.
    pub fn body(&self, n: &Notification) -> Option<Value> {
        let mut alerts = n.alerts_for(self.send_resolved);
        if alerts.is_empty() {
            return None;
        }
        let mut truncated = 0;
        if self.max_alerts > 0 && alerts.len() > self.max_alerts {
            truncated = alerts.len() - self.max_alerts;
            alerts.truncate(self.max_alerts);
        }
        let firing = n.firing(&alerts) > 0;
        let status = |resolved: bool| if resolved { "resolved" } else { "firing" };
        Some(json!({
            "receiver": n.receiver,
            "status": status(!firing),
            "alerts": alerts.iter().map(|a| {
                let resolved = a.resolved(n.now);
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
            "groupLabels": n.group_labels,
            "commonLabels": Notification::common(&alerts, false),
            "commonAnnotations": Notification::common(&alerts, true),
            "externalURL": n.external_url,
            "version": "4",
            "groupKey": n.group_key,
            "truncatedAlerts": truncated,
        }))
    }
}

impl Receiver for Webhook {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn send_resolved(&self) -> bool {
        self.send_resolved
    }

    fn http(&self) -> &HttpConfig {
        &self.http
    }

    fn request(&self, n: &Notification) -> Option<Request> {
        Some(Request { url: self.url.clone(), body: self.body(n)? })
    }
}
