//! Prometheus rule files: parsing and validation.
//!
//! The YAML is Prometheus' own (`groups[].name`, `interval`, `limit`, `rules[]` with `alert`,
//! `expr`, `for`, `keep_firing_for`, `labels`, `annotations`), so the same file passes
//! `promtool check rules`. Every expression is parsed by the PromQL parser and then dry-run
//! against an empty store, so a construct tailscope does not evaluate is refused when the file
//! loads, not at 3 a.m. when the rule first matches. Recording rules are refused by name.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use promql_parser::parser::Expr;
use serde::Deserialize;
use tailscope_proto::histogram::Layout;

use super::template::Template;
use crate::query::promql::{Engine, EvalError, Limits, Steps};
use crate::store::{MemoryStore, RetentionConfig};

/// Default evaluation interval of a group that names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// A rule file could not be used.
pub type RuleError = crate::files::FileError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    groups: Vec<GroupYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupYaml {
    name: String,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    limit: usize,
    #[serde(default)]
    rules: Vec<RuleYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleYaml {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    record: Option<String>,
    expr: Option<ExprYaml>,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// `expr` may be written as a YAML number (`expr: 1`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ExprYaml {
    Text(String),
    Number(f64),
}

/// A group of alerting rules evaluated together, at one interval.
#[derive(Debug, Clone)]
pub struct RuleGroup {
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Its name (unique within the file).
    pub name: String,
    /// How often it is evaluated.
    pub interval: Duration,
    /// Whether the file set the interval (else the configured default applies).
    pub interval_set: bool,
    /// Most alerts one rule of the group may produce (0: no limit).
    pub limit: usize,
    /// Its rules, in file order.
    pub rules: Vec<AlertingRule>,
}

/// One alerting rule.
#[derive(Debug, Clone)]
pub struct AlertingRule {
    /// `alert`: the alert's name (label `alertname`).
    pub name: String,
    /// The expression as written.
    pub query: String,
    /// The parsed expression.
    pub expr: Expr,
    /// `for`: how long it must be true before it fires.
    pub for_: Duration,
    /// `keep_firing_for`: how long it keeps firing after it stopped being true.
    pub keep_firing_for: Duration,
    /// `labels`, as written and parsed.
    pub labels: Vec<(String, String, Template)>,
    /// `annotations`, as written and parsed.
    pub annotations: Vec<(String, String, Template)>,
}

impl RuleGroup {
    /// Reads and validates every group of `path`.
    pub fn load_file(path: &Path) -> Result<Vec<RuleGroup>, RuleError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RuleError::Read { path: path.to_owned(), source })?;
        RuleGroup::parse(&text, path)
    }

    /// Parses and validates rule-file YAML; `path` names the file in errors and in the groups.
    pub fn parse(text: &str, path: &Path) -> Result<Vec<RuleGroup>, RuleError> {
        let invalid = |message: String| RuleError::Invalid { path: path.to_owned(), message };
        let file: FileYaml = serde_yaml::from_str(text).map_err(|e| invalid(yaml_error(&e)))?;
        let mut names = HashSet::new();
        let mut groups = Vec::new();
        for g in file.groups {
            if g.name.is_empty() {
                return Err(invalid("a group has an empty name".into()));
            }
            if !names.insert(g.name.clone()) {
                return Err(invalid(format!("{:?}: repeated in the same file", g.name)));
            }
            let interval = match &g.interval {
                None => DEFAULT_INTERVAL,
                Some(v) => duration(v).filter(|d| !d.is_zero()).ok_or_else(|| {
                    invalid(format!("group {:?}: interval: invalid duration {v:?}", g.name))
                })?,
            };
            let mut rules = Vec::new();
            for (i, r) in g.rules.into_iter().enumerate() {
                let rule =
                    parse_rule(r).map_err(|m| invalid(format!("group {:?}, rule {}: {m}", g.name, i + 1)))?;
                rules.push(rule);
            }
            let interval_set = g.interval.is_some();
            groups.push(RuleGroup {
                file: path.to_owned(),
                name: g.name,
                interval,
                interval_set,
                limit: g.limit,
                rules,
            });
        }
        Ok(groups)
    }
}

/// serde_yaml's message, which names the line and column.
fn yaml_error(e: &serde_yaml::Error) -> String {
    e.to_string()
}

/// A Prometheus duration (`30s`, `1h30m`, `0s`).
pub fn duration(v: &str) -> Option<Duration> {
    let zero = !v.is_empty()
        && v.starts_with('0')
        && v.chars().all(|c| c == '0' || matches!(c, 'y' | 'w' | 'd' | 'h' | 'm' | 's'));
    if zero {
        return Some(Duration::ZERO);
    }
    crate::query::promql::parse_duration(v).ok()
}

fn parse_rule(r: RuleYaml) -> Result<AlertingRule, String> {
    let name = match (r.alert, r.record) {
        (Some(_), Some(_)) => return Err("only one of 'record' and 'alert' may be set".into()),
        (None, Some(record)) => {
            return Err(format!(
                "{record:?}: recording rules are not supported by tailscope (only 'alert' rules are)"
            ))
        }
        (None, None) => return Err("one of 'record' or 'alert' must be set".into()),
        (Some(a), None) => a,
    };
    let named = |m: String| format!("{name:?}: {m}");
    if name.is_empty() {
        return Err("'alert' must not be empty".into());
    }
    let query = match r.expr {
        None => return Err(named("field 'expr' must be set".into())),
        Some(ExprYaml::Text(t)) => t,
        Some(ExprYaml::Number(n)) => n.to_string(),
    };
    if query.trim().is_empty() {
        return Err(named("field 'expr' must be set".into()));
    }
    let expr =
        crate::query::promql::parse(&query).map_err(|e| named(format!("could not parse expression: {e}")))?;
    dry_run(&expr).map_err(|e| named(format!("expression not supported: {e}")))?;
    let parse_duration = |field: &str, v: &Option<String>| -> Result<Duration, String> {
        match v {
            None => Ok(Duration::ZERO),
            Some(v) => duration(v).ok_or_else(|| named(format!("{field}: invalid duration {v:?}"))),
        }
    };
    let for_ = parse_duration("for", &r.for_)?;
    let keep_firing_for = parse_duration("keep_firing_for", &r.keep_firing_for)?;
    let templates = |what: &str, map: BTreeMap<String, String>| {
        map.into_iter()
            .map(|(k, v)| {
                if !valid_label_name(&k) {
                    return Err(named(format!("invalid {what} name: {k:?}")));
                }
                if what == "label" && matches!(k.as_str(), "__name__" | "alertname") {
                    return Err(named(format!("invalid label name: {k:?} is set by the rule itself")));
                }
                let t = Template::parse(&v).map_err(|e| named(format!("{what} {k:?}: template: {e}")))?;
                Ok((k, v, t))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let labels = templates("label", r.labels)?;
    let annotations = templates("annotation", r.annotations)?;
    Ok(AlertingRule { name, query, expr, for_, keep_firing_for, labels, annotations })
}

/// Whether `name` is a valid Prometheus label name.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn dry_run(expr: &Expr) -> Result<(), String> {
    let layout = Layout::new(2, 1_000, 3_600_000_000_000).map_err(|e| e.to_string())?;
    let steps = Steps::instant(0);
    let retention = RetentionConfig::default();
    let limits = Limits {
        max_series: 1,
        max_points: 1,
        max_samples: 1,
        deadline: Instant::now() + Duration::from_secs(5),
    };
    // A store with no series: evaluating over it finds every unsupported construct.
    let empty = MemoryStore::new(layout);
    let engine = Engine::new(&empty, &steps, 0, &retention, limits);
    match engine.eval(expr) {
        Ok(crate::query::promql::Value::Str(_)) => {
            Err("an alert's expression must give a vector or a scalar, not a string".into())
        }
        Ok(_) => Ok(()),
        Err(EvalError::Unsupported(m)) => Err(m),
        // Limits and store errors cannot come from an empty store; anything else is data-dependent.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<RuleGroup>, String> {
        RuleGroup::parse(text, Path::new("rules.yml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_prometheus_rule_file_parses() {
        let groups = parse(
            r#"
groups:
  - name: latency
    interval: 30s
    rules:
      - alert: HighP99
        expr: histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[5m]))) > 0.5
        for: 5m
        keep_firing_for: 1m
        labels: {severity: page}
        annotations:
          summary: "p99 of {{ $labels.service }} is {{ $value | humanizeDuration }}"
  - name: other
    rules:
      - alert: Always
        expr: 1
"#,
        )
        .unwrap();
        assert_eq!(groups.len(), 2);
        let g = &groups[0];
        assert_eq!((g.name.as_str(), g.interval), ("latency", Duration::from_secs(30)));
        let r = &g.rules[0];
        assert_eq!(
            (r.name.as_str(), r.for_, r.keep_firing_for),
            ("HighP99", Duration::from_secs(300), Duration::from_secs(60))
        );
        assert_eq!(r.labels[0].0, "severity");
        assert_eq!(groups[1].interval, DEFAULT_INTERVAL);
        assert_eq!(groups[1].rules[0].query, "1");
    }

    #[test]
    fn errors_name_file_group_rule_and_problem() {
        for (text, want) in [
            ("groups: [", "rules.yml: did not find expected node content at line 2 column 1"),
            ("groups:\n  - name: a\n    rulez: []\n", "unknown field `rulez`"),
            ("groups:\n  - name: a\n  - name: a\n", "\"a\": repeated in the same file"),
            ("groups:\n  - name: a\n    interval: 5x\n", "group \"a\": interval: invalid duration \"5x\""),
            ("groups:\n  - name: a\n    rules:\n      - record: x\n        expr: up\n", "group \"a\", rule 1: \"x\": recording rules are not supported"),
            ("groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: rate(x[5m]\n", "group \"a\", rule 1: \"X\": could not parse expression"),
            ("groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: abs(span_duration_seconds_count)\n", "expression not supported: function abs() is not supported"),
            ("groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: '1'\n        for: soon\n", "\"X\": for: invalid duration \"soon\""),
            ("groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: '1'\n        labels: {\"a-b\": c}\n", "invalid label name: \"a-b\""),
            ("groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: '1'\n        annotations: {s: \"{{ nope }}\"}\n", "annotation \"s\": template: at byte 0: function \"nope\" not defined"),
            ("groups:\n  - name: a\n    rules:\n      - alert: X\n", "\"X\": field 'expr' must be set"),
        ] {
            let err = parse(text).err().unwrap_or_default();
            assert!(err.contains(want), "{text:?}\n  gave {err:?}\n  want {want:?}");
        }
    }
}
