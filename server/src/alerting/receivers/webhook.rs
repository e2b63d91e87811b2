//! The webhook integration (`webhook_configs`): Alertmanager's v4 JSON body, posted with an
//! optional bearer token.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Notification, Receiver, Request};
use crate::alerting::{fingerprint_hex, rfc3339, Alert, Labels, ZERO_TIME};

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpConfigYaml {
    authorization: Option<AuthorizationYaml>,
    bearer_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizationYaml {
    #[serde(rename = "type")]
    kind: Option<String>,
    credentials: String,
}

/// One webhook of a receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Where notifications are posted.
    pub url: String,
    /// Whether resolved alerts are sent.
    pub send_resolved: bool,
    /// Most alerts per notification (0: all).
    pub max_alerts: usize,
    /// `Authorization: Bearer …`.
    pub bearer_token: Option<String>,
}

impl Webhook {
    /// Checks a `webhook_configs` entry; the error says which field is wrong.
    pub(in crate::alerting) fn parse(w: WebhookYaml) -> Result<Webhook, String> {
        let url = reqwest::Url::parse(&w.url).map_err(|e| format!("url {:?}: {e}", w.url))?;
        if url.scheme() != "http" {
            return Err(format!(
                "url {:?}: only http:// webhooks are supported (terminate TLS in a local proxy)",
                w.url
            ));
        }
        let bearer_token = match (w.http_config.authorization, w.http_config.bearer_token) {
            (Some(_), Some(_)) => {
                return Err("http_config: at most one of authorization and bearer_token may be set".into())
            }
            (Some(a), None) => {
                if a.kind.as_deref().is_some_and(|k| !k.eq_ignore_ascii_case("bearer")) {
                    return Err("http_config.authorization.type: only Bearer is supported".into());
                }
                Some(a.credentials)
            }
            (None, t) => t,
        };
        Ok(Webhook {
            url: w.url,
            send_resolved: w.send_resolved.unwrap_or(true),
            max_alerts: w.max_alerts,
            bearer_token,
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
        let firing = alerts.iter().any(|a| !a.resolved(n.now));
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
            "commonLabels": common(|a| &a.labels),
            "commonAnnotations": common(|a| &a.annotations),
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

    fn request(&self, n: &Notification) -> Option<Request> {
        let body = self.body(n)?;
        Some(Request { url: self.url.clone(), bearer_token: self.bearer_token.clone(), body })
    }
}
