//! Slack (`slack_configs`), through an incoming webhook: one attachment per notification, in
//! Alertmanager's default shape — the subject as its title linked to the receiver's alerts,
//! red while firing and green once resolved.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http_config::{check_url, value_or_file, HttpConfig, HttpConfigYaml};
use super::{literal, Notification, Receiver, Request};

/// `slack_configs[]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::alerting) struct SlackYaml {
    api_url: Option<String>,
    api_url_file: Option<std::path::PathBuf>,
    channel: Option<String>,
    username: Option<String>,
    icon_emoji: Option<String>,
    icon_url: Option<String>,
    color: Option<String>,
    title: Option<String>,
    title_link: Option<String>,
    pretext: Option<String>,
    text: Option<String>,
    fallback: Option<String>,
    #[serde(default)]
    link_names: bool,
    send_resolved: Option<bool>,
    #[serde(default)]
    http_config: HttpConfigYaml,
}

/// One Slack incoming webhook.
#[derive(Debug, Clone)]
pub struct Slack {
    api_url: String,
    fields: Map<String, Value>,
    color: Option<String>,
    title: Option<String>,
    title_link: Option<String>,
    pretext: Option<String>,
    text: Option<String>,
    fallback: Option<String>,
    send_resolved: bool,
    http: HttpConfig,
}

impl Slack {
    /// Checks a `slack_configs` entry; the error names the key.
    pub(in crate::alerting) fn parse(y: SlackYaml) -> Result<Slack, String> {
        let api_url = value_or_file("api_url", y.api_url, "api_url_file", y.api_url_file)?
            .ok_or("api_url or api_url_file is required")?;
        check_url("api_url", &api_url)?;
        let mut fields = Map::new();
        for (key, value) in [
            ("channel", y.channel),
            ("username", y.username),
            ("icon_emoji", y.icon_emoji),
            ("icon_url", y.icon_url),
        ] {
            if let Some(v) = literal(key, value)? {
                fields.insert(key.into(), json!(v));
            }
        }
        if y.link_names {
            fields.insert("link_names".into(), json!(true));
        }
        Ok(Slack {
            api_url,
            fields,
            color: literal("color", y.color)?,
            title: literal("title", y.title)?,
            title_link: literal("title_link", y.title_link)?,
            pretext: literal("pretext", y.pretext)?,
            text: literal("text", y.text)?,
            fallback: literal("fallback", y.fallback)?,
            // Alertmanager's default for Slack.
            send_resolved: y.send_resolved.unwrap_or(false),
            http: HttpConfig::build(y.http_config)?,
        })
    }

    /// The incoming-webhook body for `n`.
    pub fn body(&self, n: &Notification) -> Option<Value> {
        let alerts = n.alerts_for(self.send_resolved);
        if alerts.is_empty() {
            return None;
        }
        let title = self.title.clone().unwrap_or_else(|| n.subject(&alerts));
        let title_link = self.title_link.clone().unwrap_or_else(|| n.link());
        let color = self
            .color
            .clone()
            .unwrap_or_else(|| if n.firing(&alerts) > 0 { "danger" } else { "good" }.into());
        let mut attachment = Map::new();
        attachment.insert("title".into(), json!(title));
        attachment.insert("title_link".into(), json!(title_link));
        if let Some(p) = &self.pretext {
            attachment.insert("pretext".into(), json!(p));
        }
        attachment.insert("text".into(), json!(self.text.clone().unwrap_or_default()));
        attachment.insert(
            "fallback".into(),
            json!(self.fallback.clone().unwrap_or_else(|| format!("{title} | {title_link}"))),
        );
        attachment.insert("color".into(), json!(color));
        attachment.insert("mrkdwn_in".into(), json!(["fallback", "pretext", "text"]));
        let mut body = self.fields.clone();
        body.insert("attachments".into(), json!([attachment]));
        Some(Value::Object(body))
    }
}

impl Receiver for Slack {
    fn kind(&self) -> &'static str {
        "slack"
    }

    fn send_resolved(&self) -> bool {
        self.send_resolved
    }

    fn http(&self) -> &HttpConfig {
        &self.http
    }

    fn request(&self, n: &Notification) -> Option<Request> {
        Some(Request { url: self.api_url.clone(), body: self.body(n)? })
    }
}
