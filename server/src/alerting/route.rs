//! The notifier's configuration, in Alertmanager's YAML: `route` (a tree with `matchers`,
//! `group_by`, `group_wait`, `group_interval`, `repeat_interval`, `continue`), `receivers` with
//! `webhook_configs`, and `inhibit_rules`. The same file can be given to an Alertmanager.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::matchers::{self, Matcher, Op};
use super::receivers::{ReceiverConfig, ReceiverYaml};
use super::rules::duration;
use super::Labels;

/// Alertmanager's defaults.
const GROUP_WAIT: Duration = Duration::from_secs(30);
const GROUP_INTERVAL: Duration = Duration::from_secs(300);
const REPEAT_INTERVAL: Duration = Duration::from_secs(4 * 3600);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigYaml {
    #[serde(default)]
    global: GlobalYaml,
    route: Option<RouteYaml>,
    #[serde(default)]
    receivers: Vec<ReceiverYaml>,
    #[serde(default)]
    inhibit_rules: Vec<InhibitYaml>,
    #[serde(default)]
    templates: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobalYaml {
    resolve_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteYaml {
    receiver: Option<String>,
    group_by: Option<Vec<String>>,
    group_wait: Option<String>,
    group_interval: Option<String>,
    repeat_interval: Option<String>,
    #[serde(default)]
    matchers: Vec<String>,
    #[serde(default, rename = "match")]
    match_: BTreeMap<String, String>,
    #[serde(default)]
    match_re: BTreeMap<String, String>,
    #[serde(default, rename = "continue")]
    continue_: bool,
    #[serde(default)]
    routes: Vec<RouteYaml>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InhibitYaml {
    #[serde(default)]
    source_matchers: Vec<String>,
    #[serde(default)]
    target_matchers: Vec<String>,
    #[serde(default)]
    source_match: BTreeMap<String, String>,
    #[serde(default)]
    source_match_re: BTreeMap<String, String>,
    #[serde(default)]
    target_match: BTreeMap<String, String>,
    #[serde(default)]
    target_match_re: BTreeMap<String, String>,
    #[serde(default)]
    equal: Vec<String>,
}

/// The notifier's configuration.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// The routing tree.
    pub route: Route,
    /// Receivers by name.
    pub receivers: BTreeMap<String, ReceiverConfig>,
    /// Inhibition rules.
    pub inhibit_rules: Vec<InhibitRule>,
    /// End given to alerts posted without one.
    pub resolve_timeout: Duration,
}

/// A node of the routing tree, with its parent's settings inherited.
#[derive(Debug, Clone)]
pub struct Route {
    /// Alertmanager's route key: the parent's key, `/`, and this route's matchers.
    pub key: String,
    /// What an alert must match to take this route.
    pub matchers: Vec<Matcher>,
    /// The receiver.
    pub receiver: String,
    /// Labels that split alerts into groups.
    pub group_by: GroupBy,
    /// Wait before a new group's first notification.
    pub group_wait: Duration,
    /// Wait between a group's notifications about changes.
    pub group_interval: Duration,
    /// Wait before an unchanged group's notification is repeated.
    pub repeat_interval: Duration,
    /// Whether matching continues with the next sibling.
    pub continue_: bool,
    /// Child routes.
    pub routes: Vec<Route>,
}

/// How a route groups alerts.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupBy {
    /// By these labels (none: one group).
    Labels(Vec<String>),
    /// By every label (`group_by: ['...']`).
    All,
}

impl GroupBy {
    /// Whether groups are split by label `name` by name (not merely as one of every label).
    pub fn names(&self, name: &str) -> bool {
        matches!(self, GroupBy::Labels(names) if names.iter().any(|n| n == name))
    }
}

/// An inhibition rule: a firing source alert mutes target alerts with equal `equal` labels.
#[derive(Debug, Clone)]
pub struct InhibitRule {
    /// What a source alert matches.
    pub source: Vec<Matcher>,
    /// What a target alert matches.
    pub target: Vec<Matcher>,
    /// Labels that must be equal in source and target.
    pub equal: Vec<String>,
}

impl Route {
    /// The routes `labels` take: the deepest matching ones, siblings after a match only when
    /// it says `continue` (Alertmanager's walk).
    pub fn matching<'a>(&'a self, labels: &Labels) -> Vec<&'a Route> {
        if !self.matchers.iter().all(|m| m.matches(labels)) {
            return Vec::new();
        }
        let mut all = Vec::new();
        for child in &self.routes {
            let found = child.matching(labels);
            let matched = !found.is_empty();
            all.extend(found);
            if matched && !child.continue_ {
                break;
            }
        }
        if all.is_empty() {
            all.push(self);
        }
        all
    }

    /// The labels of `labels` this route groups by.
    pub fn group_labels(&self, labels: &Labels) -> Labels {
        match &self.group_by {
            GroupBy::All => labels.clone(),
            GroupBy::Labels(names) => {
                names.iter().filter_map(|n| labels.get(n).map(|v| (n.clone(), v.clone()))).collect()
            }
        }
    }
}

impl NotifierConfig {
    /// Reads an Alertmanager-style YAML file.
    pub fn load(path: &Path) -> Result<NotifierConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        NotifierConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses Alertmanager-style YAML; errors say where and what.
    pub fn parse(text: &str) -> Result<NotifierConfig, String> {
        let y: ConfigYaml = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if !y.templates.is_empty() {
            return Err(
                "templates: notification templates are not supported (webhooks send Alertmanager's JSON)"
                    .into(),
            );
        }
        let resolve_timeout =
            opt_duration("global.resolve_timeout", &y.global.resolve_timeout)?.unwrap_or(RESOLVE_TIMEOUT);
        let mut receivers = BTreeMap::new();
        for r in y.receivers {
            let name = r.name.clone();
            if receivers.insert(name.clone(), ReceiverConfig::parse(r)?).is_some() {
                return Err(format!("receivers: notification config name {name:?} is not unique"));
            }
        }
        let root = y.route.ok_or("route: a root route is required")?;
        if !root.matchers.is_empty() || !root.match_.is_empty() || !root.match_re.is_empty() {
            return Err("route: the root route must not have any matchers".into());
        }
        if root.continue_ {
            return Err("route: cannot have continue in the root route".into());
        }
        let defaults = Route {
            key: String::new(),
            matchers: Vec::new(),
            receiver: String::new(),
            group_by: GroupBy::Labels(Vec::new()),
            group_wait: GROUP_WAIT,
            group_interval: GROUP_INTERVAL,
            repeat_interval: REPEAT_INTERVAL,
            continue_: false,
            routes: Vec::new(),
        };
        let route = build_route(root, &defaults, None, "route")?;
        if route.receiver.is_empty() {
            return Err("route: the root route must specify a default receiver".into());
        }
        check_receivers(&route, &receivers)?;
        let mut inhibit_rules = Vec::new();
        for (i, r) in y.inhibit_rules.into_iter().enumerate() {
            let at = format!("inhibit_rules[{i}]");
            let source = matcher_list(
                &format!("{at}.source"),
                &r.source_matchers,
                &r.source_match,
                &r.source_match_re,
            )?;
            let target = matcher_list(
                &format!("{at}.target"),
                &r.target_matchers,
                &r.target_match,
                &r.target_match_re,
            )?;
            inhibit_rules.push(InhibitRule { source, target, equal: r.equal });
        }
        Ok(NotifierConfig { route, receivers, inhibit_rules, resolve_timeout })
    }
}

fn opt_duration(at: &str, v: &Option<String>) -> Result<Option<Duration>, String> {
    v.as_ref().map(|v| duration(v).ok_or_else(|| format!("{at}: invalid duration {v:?}"))).transpose()
}

fn matcher_list(
    at: &str,
    strings: &[String],
    equal: &BTreeMap<String, String>,
    regex: &BTreeMap<String, String>,
) -> Result<Vec<Matcher>, String> {
    let mut out = Vec::new();
    for s in strings {
        out.extend(matchers::parse(s).map_err(|e| format!("{at}_matchers: {e}"))?);
    }
    for (k, v) in equal {
        out.push(Matcher::new(k, Op::Equal, v).map_err(|e| format!("{at}_match: {e}"))?);
    }
    for (k, v) in regex {
        out.push(Matcher::new(k, Op::Regex, v).map_err(|e| format!("{at}_match_re: {e}"))?);
    }
    Ok(out)
}

fn build_route(y: RouteYaml, parent: &Route, parent_key: Option<&str>, at: &str) -> Result<Route, String> {
    let mut matchers = matcher_list(at, &y.matchers, &y.match_, &y.match_re)?;
    matchers.sort_by(|a, b| (&a.name, a.op, &a.value).cmp(&(&b.name, b.op, &b.value)));
    let rendered = matchers::render(&matchers);
    let key = match parent_key {
        None => rendered,
        Some(p) => format!("{p}/{rendered}"),
    };
    let group_by = match y.group_by {
        None => parent.group_by.clone(),
        Some(names) if names.iter().any(|n| n == "...") => {
            if names.len() > 1 {
                return Err(format!(
                    "{at}.group_by: cannot have wildcard group_by (`...`) and other labels at the same time"
                ));
            }
            GroupBy::All
        }
        Some(names) => {
            let mut seen = HashSet::new();
            for n in &names {
                if !super::rules::valid_label_name(n) {
                    return Err(format!("{at}.group_by: invalid label name {n:?}"));
                }
                if !seen.insert(n) {
                    return Err(format!("{at}.group_by: duplicated label {n:?}"));
                }
            }
            GroupBy::Labels(names)
        }
    };
    let group_interval =
        opt_duration(&format!("{at}.group_interval"), &y.group_interval)?.unwrap_or(parent.group_interval);
    let repeat_interval =
        opt_duration(&format!("{at}.repeat_interval"), &y.repeat_interval)?.unwrap_or(parent.repeat_interval);
    if group_interval.is_zero() {
        return Err(format!("{at}.group_interval: cannot be zero"));
    }
    if repeat_interval.is_zero() {
        return Err(format!("{at}.repeat_interval: cannot be zero"));
    }
    let mut route = Route {
        key: key.clone(),
        matchers,
        receiver: y.receiver.unwrap_or_else(|| parent.receiver.clone()),
        group_by,
        group_wait: opt_duration(&format!("{at}.group_wait"), &y.group_wait)?.unwrap_or(parent.group_wait),
        group_interval,
        repeat_interval,
        continue_: y.continue_,
        routes: Vec::new(),
    };
    for (i, child) in y.routes.into_iter().enumerate() {
        let built = build_route(child, &route, Some(&key), &format!("{at}.routes[{i}]"))?;
        route.routes.push(built);
    }
    Ok(route)
}

fn check_receivers(route: &Route, receivers: &BTreeMap<String, ReceiverConfig>) -> Result<(), String> {
    if !receivers.contains_key(&route.receiver) {
        return Err(format!("undefined receiver {:?} used in route", route.receiver));
    }
    route.routes.iter().try_for_each(|r| check_receivers(r, receivers))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
route:
  receiver: default
  group_by: [alertname, service]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 1h
  routes:
    - matchers: ['severity="page"']
      receiver: pager
      continue: true
    - match: {team: core}
      receiver: core
      group_by: ['...']
receivers:
  - name: default
    webhook_configs: [{url: "http://127.0.0.1:1/hook"}]
  - name: pager
    webhook_configs:
      - url: "http://127.0.0.1:1/page"
        send_resolved: false
        max_alerts: 10
        http_config: {authorization: {credentials: s3cret}}
  - name: core
inhibit_rules:
  - source_matchers: ['severity="page"']
    target_matchers: ['severity="ticket"']
    equal: [service]
"#;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn routes_inherit_and_match_like_alertmanager() {
        let c = NotifierConfig::parse(CONFIG).unwrap();
        assert_eq!(c.route.key, "{}");
        assert_eq!(c.route.routes[0].key, r#"{}/{severity="page"}"#);
        let pager = &c.route.routes[0];
        assert_eq!(
            (pager.group_wait, pager.group_interval),
            (Duration::from_secs(1), Duration::from_secs(5))
        );
        assert_eq!(pager.group_by, GroupBy::Labels(vec!["alertname".into(), "service".into()]));
        let w = format!("{:?}", c.receivers["pager"].integrations[0]);
        assert!(w.contains("send_resolved: false, max_alerts: 10"), "{w}");
        assert!(w.contains("Authorization(Bearer <secret>)") && !w.contains("s3cret"), "{w}");
        let page_core = labels(&[("severity", "page"), ("team", "core"), ("service", "a")]);
        let names: Vec<&str> = c.route.matching(&page_core).iter().map(|r| r.receiver.as_str()).collect();
        assert_eq!(names, ["pager", "core"]);
        let other = labels(&[("service", "a")]);
        assert_eq!(c.route.matching(&other)[0].receiver, "default");
        let core = c.route.matching(&page_core)[1];
        assert_eq!(core.group_labels(&page_core), page_core);
        assert_eq!(c.route.group_labels(&page_core), labels(&[("service", "a")]));
        assert_eq!(c.inhibit_rules[0].equal, ["service"]);
    }

    #[test]
    fn bad_configs_say_what_and_where() {
        for (text, want) in [
            ("route: {receiver: x}\nreceivers: []\n", "undefined receiver \"x\" used in route"),
            ("receivers: []\n", "a root route is required"),
            (
                "route: {receiver: a, matchers: ['a=b']}\nreceivers: [{name: a}]\n",
                "root route must not have any matchers",
            ),
            (
                "route: {receiver: a, group_wait: soon}\nreceivers: [{name: a}]\n",
                "route.group_wait: invalid duration \"soon\"",
            ),
            (
                "route: {receiver: a, routes: [{matchers: ['a~b']}]}\nreceivers: [{name: a}]\n",
                "route.routes[0]_matchers:",
            ),
            (
                "route: {receiver: a}\nreceivers: [{name: a, email_configs: []}]\n",
                "unknown field `email_configs`",
            ),
            (
                "route: {receiver: a}\nreceivers: [{name: a, webhook_configs: [{url: 'ftp://x/'}]}]\n",
                "webhook_configs[0]: url \"ftp://x/\": the scheme must be http or https",
            ),
            (
                "route: {receiver: a}\nreceivers: [{name: a, pagerduty_configs: [{service_key: k}]}]\n",
                "pagerduty_configs[0]: service_key: the Events API v1 is not supported",
            ),
            (
                "route: {receiver: a}\nreceivers: [{name: a, slack_configs: [{api_url: 'https://h/', text: '{{ .Status }}'}]}]\n",
                "slack_configs[0]: text: notification templates are not supported",
            ),
            (
                "route: {receiver: a}\nreceivers: [{name: a, webhook_configs: [{url: 'https://x/', http_config: {bearer_token: a, basic_auth: {username: u}}}]}]\n",
                "at most one of authorization, basic_auth and bearer_token",
            ),
            ("route: {receiver: a}\nreceivers: [{name: a}, {name: a}]\n", "\"a\" is not unique"),
            (
                "route: {receiver: a, group_by: ['...', x]}\nreceivers: [{name: a}]\n",
                "cannot have wildcard group_by",
            ),
            ("route: [\n", "route: invalid type: sequence, expected struct RouteYaml at line 1 column 8"),
        ] {
            let err = NotifierConfig::parse(text).err().unwrap_or_default();
            assert!(err.contains(want), "{text:?}\n  gave {err:?}\n  want {want:?}");
        }
    }
}
