//! PagerDuty (`pagerduty_configs`), through the Events API v2: a `trigger` while the group has
//! firing alerts, a `resolve` once none fires, both with the same `dedup_key` — the SHA-256 of
//! the group key, as Alertmanager sends it — so PagerDuty keeps one incident per group. The
//! summary is Alertmanager's default subject; the details list the alerts.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http_config::{check_url, value_or_file, HttpConfig, HttpConfigYaml};
use super::{literal, Notification, Receiver, Request};

/// The Events API v2 endpoint.
const EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";
/// PagerDuty's limit on a summary.
const MAX_SUMMARY: usize = 1024;

/// `pagerduty_configs[]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::alerting) struct PagerDutyYaml {
    routing_key: Option<String>,
    routing_key_file: Option<std::path::PathBuf>,
    service_key: Option<String>,
    url: Option<String>,
    client: Option<String>,
    client_url: Option<String>,
    description: Option<String>,
    severity: Option<String>,
    source: Option<String>,
    class: Option<String>,
    component: Option<String>,
    group: Option<String>,
    send_resolved: Option<bool>,
    #[serde(default)]
    http_config: HttpConfigYaml,
}

/// One PagerDuty service.
#[derive(Debug, Clone)]
pub struct PagerDuty {
    routing_key: String,
    url: String,
    client: String,
    client_url: Option<String>,
    description: Option<String>,
    severity: String,
    source: Option<String>,
    class: Option<String>,
    component: Option<String>,
    group: Option<String>,
    send_resolved: bool,
    http: HttpConfig,
}

impl PagerDuty {
    /// Checks a `pagerduty_configs` entry; the error names the key.
    pub(in crate::alerting) fn parse(y: PagerDutyYaml) -> Result<PagerDuty, String> {
        if y.service_key.is_some() {
            return Err(
                "service_key: the Events API v1 is not supported; use routing_key (Events API v2)".into()
            );
        }
        let routing_key =
            value_or_file("routing_key", y.routing_key, "routing_key_file", y.routing_key_file)?
                .ok_or("routing_key or routing_key_file is required")?;
        let url = y.url.unwrap_or_else(|| EVENTS_URL.to_owned());
        check_url("url", &url)?;
        let severity = y.severity.unwrap_or_else(|| "error".into());
        if !matches!(severity.as_str(), "critical" | "error" | "warning" | "info") {
            return Err(format!("severity: {severity:?} is not critical, error, warning or info"));
        }
        Ok(PagerDuty {
            routing_key,
            url,
            client: literal("client", y.client)?.unwrap_or_else(|| "tailscope".into()),
            client_url: literal("client_url", y.client_url)?,
            description: literal("description", y.description)?,
            severity,
            source: literal("source", y.source)?,
            class: literal("class", y.class)?,
            component: literal("component", y.component)?,
            group: literal("group", y.group)?,
            send_resolved: y.send_resolved.unwrap_or(true),
            http: HttpConfig::build(y.http_config)?,
        })
    }

    /// The Events API v2 body for `n`.
    pub fn body(&self, n: &Notification) -> Option<Value> {
        let alerts = n.alerts_for(true);
        if alerts.is_empty() {
            return None;
        }
        let firing = n.firing(&alerts);
        let (fired, resolved): (Vec<_>, Vec<_>) = alerts.iter().partition(|a| !a.resolved(n.now));
        let mut summary = self.description.clone().unwrap_or_else(|| n.subject(&alerts));
        if summary.len() > MAX_SUMMARY {
            let mut cut = MAX_SUMMARY - 1;
            while !summary.is_char_boundary(cut) {
                cut -= 1;
            }
            summary.truncate(cut);
            summary.push('…');
        }
        let mut payload = Map::new();
        payload.insert("summary".into(), json!(summary));
        payload.insert("source".into(), json!(self.source.clone().unwrap_or_else(|| self.client.clone())));
        payload.insert("severity".into(), json!(self.severity));
        for (key, value) in [("class", &self.class), ("component", &self.component), ("group", &self.group)] {
            if let Some(v) = value {
                payload.insert(key.into(), json!(v));
            }
        }
        payload.insert(
            "custom_details".into(),
            json!({
                "firing": n.instances(&fired),
                "resolved": n.instances(&resolved),
                "num_firing": fired.len().to_string(),
                "num_resolved": resolved.len().to_string(),
            }),
        );
        Some(json!({
            "routing_key": self.routing_key,
            "event_action": if firing > 0 { "trigger" } else { "resolve" },
            "dedup_key": dedup_key(&n.group_key),
            "payload": payload,
            "client": self.client,
            "client_url": self.client_url.clone().unwrap_or_else(|| n.link()),
        }))
    }
}

/// The hex SHA-256 of the group key: the same alerts group the same PagerDuty incident.
pub fn dedup_key(group_key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, group_key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Receiver for PagerDuty {
    fn kind(&self) -> &'static str {
        "pagerduty"
    }

    fn send_resolved(&self) -> bool {
        self.send_resolved
    }

    fn http(&self) -> &HttpConfig {
        &self.http
    }

    fn request(&self, n: &Notification) -> Option<Request> {
        // Without send_resolved, a group that resolved is not told (the incident stays open).
        if !self.send_resolved && n.firing(&n.alerts_for(true)) == 0 {
            return None;
        }
        Some(Request { url: self.url.clone(), body: self.body(n)? })
    }
}
