//! Rule evaluation: each group on its own task, every `interval`, through the query engine;
//! each alert a state machine (inactive → pending → firing → resolved) keyed by the fingerprint
//! of its label set, persisted so a restart neither forgets a firing alert nor restarts a `for`
//! clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::rules::{AlertingRule, RuleGroup};
use super::template::Data;
use super::{fingerprint, Alert, Labels, Sink};
use crate::clock::Clock;
use crate::query::promql::{Engine, Limits, Memo, Repeats, Steps, Value};
use crate::query::shared::SharedReads;
use crate::store::{RetentionConfig, Source, StateKind, StateStore};
use crate::telemetry::{Metrics, RuleGroupLabel};

/// How long a resolved alert is still sent (so a notifier that missed the first resolve hears
/// it), as Prometheus does.
pub const RESOLVED_RETENTION_MS: i64 = 15 * 60 * 1000;
/// Most series one rule's expression may select.
const MAX_SERIES: usize = 100_000;
/// Most bytes one group evaluation keeps to share between its rules, for windows read and
/// again for values and merged ranges ([`Memo`]); past it, rules read and merge on their own.
const SHARED_READ_BYTES: usize = 64 << 20;

/// An alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Resolved: no longer true (kept a while to send the resolve).
    Inactive,
    /// True, for less than `for`.
    Pending,
    /// True for at least `for` (or within `keep_firing_for` of it).
    Firing,
}

impl State {
    /// Prometheus' name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Inactive => "inactive",
            State::Pending => "pending",
            State::Firing => "firing",
        }
    }
}

/// One alert of a rule. Times are milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlert {
    /// Its labels (the sample's, the rule's, `alertname`).
    pub labels: Labels,
    /// Its annotations, rendered at the last evaluation.
    pub annotations: Labels,
    /// Its state.
    pub state: State,
    /// When it became pending.
    pub active_at: i64,
    /// When it started firing.
    pub fired_at: Option<i64>,
    /// When it resolved.
    pub resolved_at: Option<i64>,
    /// Since when it is kept firing by `keep_firing_for` although no longer true.
    pub keep_firing_since: Option<i64>,
    /// The expression's value at the last evaluation (not persisted).
    #[serde(skip, default = "nan")]
    pub value: f64,
    /// When it was last sent to the notifier (not persisted: a restart resends).
    #[serde(skip)]
    pub last_sent_at: Option<i64>,
}

fn nan() -> f64 {
    f64::NAN
}

impl ActiveAlert {
    /// The persisted fields except the annotations (which move with `$value`).
    fn lifecycle(&self) -> (State, i64, Option<i64>, Option<i64>, Option<i64>) {
        (self.state, self.active_at, self.fired_at, self.resolved_at, self.keep_firing_since)
    }
}

/// The evaluation state of one rule.
#[derive(Debug, Clone, Default)]
pub struct RuleState {
    /// Its alerts by fingerprint.
    pub alerts: BTreeMap<u64, ActiveAlert>,
    /// The error of the last evaluation, if it failed.
    pub last_error: Option<String>,
    /// When it was last evaluated (ms).
    pub last_evaluation: Option<i64>,
    /// How long that took.
    pub evaluation_time: Duration,
}

impl RuleState {
    /// The rule's state: the most severe of its alerts'.
    pub fn state(&self) -> State {
        let states = self.alerts.values().map(|a| a.state);
        if states.clone().any(|s| s == State::Firing) {
            State::Firing
        } else if states.into_iter().any(|s| s == State::Pending) {
            State::Pending
        } else {
            State::Inactive
        }
    }
}

/// A loaded group with its rules' live state. Evaluation owns the state; readers (the API,
/// metrics) take a snapshot of it as the last evaluation left it (a copy made when asked, not
/// at every evaluation: a group's alerts may number in the tens of thousands).
#[derive(Debug)]
pub struct GroupRuntime {
    /// The group as loaded.
    pub group: RuleGroup,
    state: Mutex<GroupState>,
    /// What the group's expressions repeat, for sharing it between them.
    repeats: Arc<Repeats>,
}

/// A group's evaluation state.
#[derive(Debug, Default)]
struct GroupState {
    /// One per rule.
    rules: Vec<RuleState>,
    /// What was last persisted per rule, to write only on change.
    persisted: Vec<Vec<u8>>,
    /// When the group was last evaluated (ms).
    last_evaluation: Option<i64>,
    /// How long that took.
    evaluation_time: Duration,
}

/// A group's state as its last evaluation left it.
#[derive(Debug, Clone, Default)]
pub struct GroupSnapshot {
    /// One per rule, in order.
    pub rules: Vec<RuleState>,
    /// When the group was last evaluated (ms).
    pub last_evaluation: Option<i64>,
    /// How long that took.
    pub evaluation_time: Duration,
}

/// What evaluation needs from the server.
#[derive(Debug, Clone)]
pub struct Context {
    /// What the engine reads.
    pub sources: Arc<dyn crate::query::Sources>,
    /// Where the rules' alerts are kept across restarts.
    pub state: Arc<dyn StateStore>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Which resolutions exist.
    pub retention: RetentionConfig,
    /// Self-metrics.
    pub metrics: Arc<Metrics>,
    /// Where alerts go.
    pub sink: Arc<dyn Sink>,
    /// Prefix of generator URLs.
    pub external_url: String,
    /// Least time between two sends of an unchanged firing alert.
    pub resend_delay: Duration,
}

/// The storage key of a rule's state.
fn state_key(group: &RuleGroup, index: usize, rule: &AlertingRule) -> Vec<u8> {
    let mut k = group.file.to_string_lossy().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(group.name.as_bytes());
    k.push(0);
    k.extend_from_slice(&(index as u32).to_be_bytes());
    k.extend_from_slice(rule.name.as_bytes());
    k
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    alerts: Vec<ActiveAlert>,
}

impl GroupRuntime {
    /// A runtime for `group`, its rules' state restored from `previous` (a reload) or else from
    /// the store (a restart).
    pub fn new(group: RuleGroup, previous: Option<&GroupRuntime>, store: &dyn StateStore) -> GroupRuntime {
        let mut state = GroupState::default();
        for (i, rule) in group.rules.iter().enumerate() {
            let carried = previous.and_then(|p| {
                let rules = &p.group.rules;
                let same = rules.get(i).is_some_and(|r| r.name == rule.name && r.query == rule.query);
                same.then(|| p.state.lock().rules[i].clone())
            });
            let key = state_key(&group, i, rule);
            let restored = carried.unwrap_or_else(|| match store.state(StateKind::RuleState, &key) {
                Ok(records) => {
                    let mut rs = RuleState::default();
                    for (k, v) in records.into_iter().filter(|(k, _)| *k == key) {
                        match serde_json::from_slice::<Persisted>(&v) {
                            Ok(p) => rs.alerts = p.alerts.into_iter().map(|a| (fingerprint(&a.labels), a)).collect(),
                            Err(e) => tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "ignoring unreadable alert state"),
                        }
                    }
                    rs
                }
                Err(e) => {
                    tracing::error!(error = %e, group = %group.name, "cannot read alert state");
                    RuleState::default()
                }
            });
            state.persisted.push(encode_state(&restored));
            state.rules.push(restored);
        }
        let repeats = Arc::new(Repeats::of(group.rules.iter().map(|r| &r.expr)));
        GroupRuntime { group, state: Mutex::new(state), repeats }
    }

    /// The state as the last evaluation left it.
    pub fn snapshot(&self) -> Arc<GroupSnapshot> {
        let state = self.state.lock();
        Arc::new(GroupSnapshot {
            rules: state.rules.clone(),
            last_evaluation: state.last_evaluation,
            evaluation_time: state.evaluation_time,
        })
    }

    /// How many of the group's alerts are pending and how many firing, without copying them.
    pub fn alert_counts(&self) -> (usize, usize) {
        let state = self.state.lock();
        let alerts = state.rules.iter().flat_map(|r| r.alerts.values());
        alerts.fold((0, 0), |(pending, firing), a| match a.state {
            State::Pending => (pending + 1, firing),
            State::Firing => (pending, firing + 1),
            State::Inactive => (pending, firing),
        })
    }

    /// `file;group`, the label of the group's metrics.
    pub fn label(&self) -> RuleGroupLabel {
        RuleGroupLabel { rule_group: format!("{};{}", self.group.file.display(), self.group.name) }
    }

    /// Runs the group every interval until `stop` fires.
    pub async fn run(self: Arc<Self>, ctx: Context, mut stop: tokio::sync::watch::Receiver<bool>) {
        let interval = self.group.interval;
        let interval_ms = interval.as_millis().max(1) as i64;
        // Stagger groups within the interval (by a hash of their name), as Prometheus does, so
        // they do not all query at once; every evaluation time is then offset + k·interval.
        let offset =
            (xxhash_rust::xxh3::xxh3_64(self.label().rule_group.as_bytes()) % interval_ms as u64) as i64;
        let mut next = next_tick(ctx.clock.now_nanos() / 1_000_000, interval_ms, offset);
        loop {
            let wait = next - ctx.clock.now_nanos() / 1_000_000;
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = stop.wait_for(|&s| s) => return,
                }
            }
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            self.evaluate(&ctx, next).await;
            let elapsed = started.elapsed();
            ctx.metrics.rule_group_last_duration.get_or_create(&self.label()).set(elapsed.as_secs_f64());
            ctx.metrics.rule_evaluations.get_or_create(&self.label()).inc();
            let now = ctx.clock.now_nanos() / 1_000_000;
            // Strictly after this evaluation, even if the clock stood still.
            let following = next_tick(now.max(next), interval_ms, offset);
            let missed = (following - next) / interval_ms - 1;
            if missed > 0 {
                ctx.metrics.rule_group_iterations_missed.get_or_create(&self.label()).inc_by(missed as u64);
                tracing::warn!(group = %self.group.name, missed, "rule group evaluation overran its interval");
            }
            next = following;
        }
    }

    /// Evaluates every rule of the group at `ts` (ms), updates and persists their alerts, and
    /// sends the ones due to the sink.
    pub async fn evaluate(&self, ctx: &Context, ts: i64) {
        let started = Instant::now();
        let exprs: Vec<_> = self.group.rules.iter().map(|r| r.expr.clone()).collect();
        let source = ctx.sources.open();
        let retention = ctx.retention.clone();
        let interval = self.group.interval;
        let repeats = self.repeats.clone();
        let results = tokio::task::spawn_blocking(move || {
            // Every rule is evaluated at the same instant: rules that read the same selector
            // (thresholds, quantiles of one service) share one read of its series and windows,
            // one merge of each range and the value of each repeated sub-expression.
            let memo = repeats.any().then(|| Memo::new(ts, ts.div_euclid(1000), repeats, SHARED_READ_BYTES));
            let shared = memo.is_some().then(|| SharedReads::new(&*source, SHARED_READ_BYTES));
            let source: &dyn Source = match &shared {
                Some(shared) => shared,
                None => &*source,
            };
            exprs
                .iter()
                .map(|expr| {
                    let started = Instant::now();
                    // A rule may take at most its group's interval.
                    let deadline = Instant::now() + interval;
                    let result = sample(source, memo.as_ref(), &retention, expr, ts, deadline);
                    (result, started.elapsed())
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|e| {
            vec![(Err(format!("evaluation task failed: {e}")), Duration::ZERO); self.group.rules.len()]
        });

        let mut to_send = Vec::new();
        let mut writes = Vec::new();
        {
            let mut state = self.state.lock();
            for (i, ((result, took), rule)) in results.into_iter().zip(&self.group.rules).enumerate() {
                let rs = &mut state.rules[i];
                rs.last_evaluation = Some(ts);
                rs.evaluation_time = took;
                let outcome = result.and_then(|samples| self.apply(rule, rs, samples, ts));
                match outcome {
                    Ok(()) => rs.last_error = None,
                    Err(e) => {
                        ctx.metrics.rule_evaluation_failures.get_or_create(&self.label()).inc();
                        tracing::warn!(group = %self.group.name, rule = %rule.name, error = %e, "rule evaluation failed");
                        rs.last_error = Some(e);
                    }
                }
                for a in rs.alerts.values_mut() {
                    if needs_sending(a, ts, ctx.resend_delay) {
                        a.last_sent_at = Some(ts);
                        to_send.push(to_alert(a, rule, ts, interval, ctx));
                    }
                }
                let encoded = encode_state(rs);
                if encoded != state.persisted[i] {
                    let value = serde_json::to_vec(&Persisted {
                        alerts: state.rules[i].alerts.values().cloned().collect(),
                    })
                    .ok();
                    writes.push((state_key(&self.group, i, rule), value));
                    state.persisted[i] = encoded;
                }
            }
            state.last_evaluation = Some(ts);
            state.evaluation_time = started.elapsed();
        }
        if !writes.is_empty() {
            let store = ctx.state.clone();
            let written =
                tokio::task::spawn_blocking(move || store.write_state(StateKind::RuleState, &writes)).await;
            if let Err(e) = written.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                tracing::error!(group = %self.group.name, error = %e, "cannot persist alert state");
            }
        }
        if !to_send.is_empty() {
            ctx.sink.send(to_send);
        }
    }

    /// One evaluation's state transitions for `rule`.
    fn apply(
        &self,
        rule: &AlertingRule,
        rs: &mut RuleState,
        samples: Vec<(Labels, f64)>,
        ts: i64,
    ) -> Result<(), String> {
        let mut seen = BTreeMap::new();
        for (sample_labels, value) in samples {
            let data = Data { labels: &sample_labels, value };
            let mut labels = sample_labels.clone();
            for (name, _, t) in &rule.labels {
                let v = t.render(data);
                if v.is_empty() {
                    labels.remove(name);
                } else {
                    labels.insert(name.clone(), v);
                }
            }
            labels.insert("alertname".into(), rule.name.clone());
            let annotations: Labels =
                rule.annotations.iter().map(|(name, _, t)| (name.clone(), t.render(data))).collect();
            let fp = fingerprint(&labels);
            if seen.insert(fp, (labels, annotations, value)).is_some() {
                return Err(
                    "vector contains metrics with the same labelset after applying alert labels".into()
                );
            }
        }
        if self.group.limit > 0 && seen.len() > self.group.limit {
            rs.alerts.clear();
            return Err(format!("exceeded limit of {} with {} alerts", self.group.limit, seen.len()));
        }
        for (fp, (labels, annotations, value)) in &seen {
            match rs.alerts.get_mut(fp) {
                Some(a) if a.state != State::Inactive => {
                    a.value = *value;
                    a.annotations = annotations.clone();
                    a.keep_firing_since = None;
                }
                _ => {
                    rs.alerts.insert(
                        *fp,
                        ActiveAlert {
                            labels: labels.clone(),
                            annotations: annotations.clone(),
                            state: State::Pending,
                            active_at: ts,
                            fired_at: None,
                            resolved_at: None,
                            keep_firing_since: None,
                            value: *value,
                            last_sent_at: None,
                        },
                    );
                }
            }
        }
        let for_ms = rule.for_.as_millis() as i64;
        let keep_ms = rule.keep_firing_for.as_millis() as i64;
        rs.alerts.retain(|fp, a| {
            if seen.contains_key(fp) {
                if a.state == State::Pending && ts - a.active_at >= for_ms {
                    a.state = State::Firing;
                    a.fired_at = Some(ts);
                }
                return true;
            }
            match a.state {
                State::Pending => false,
                State::Inactive => a.resolved_at.is_some_and(|r| ts - r < RESOLVED_RETENTION_MS),
                State::Firing => {
                    let since = *a.keep_firing_since.get_or_insert(ts);
                    if keep_ms == 0 || ts - since >= keep_ms {
                        a.state = State::Inactive;
                        a.resolved_at = Some(ts);
                        a.keep_firing_since = None;
                    }
                    true
                }
            }
        });
        Ok(())
    }
}

/// The persisted part of a rule's state as bytes, compared between evaluations to write only
/// what changed.
fn encode_state(rs: &RuleState) -> Vec<u8> {
    let mut out = Vec::with_capacity(rs.alerts.len() * 44);
    let time = |out: &mut Vec<u8>, t: Option<i64>| match t {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_le_bytes());
        }
        None => out.push(0),
    };
    for (fp, a) in &rs.alerts {
        let (state, active_at, fired_at, resolved_at, keep_firing_since) = a.lifecycle();
        out.extend_from_slice(&fp.to_le_bytes());
        out.push(state as u8);
        out.extend_from_slice(&active_at.to_le_bytes());
        for t in [fired_at, resolved_at, keep_firing_since] {
            time(&mut out, t);
        }
    }
    out
}

/// The first evaluation time after `now_ms` on the grid `offset + k·interval`.
fn next_tick(now_ms: i64, interval_ms: i64, offset: i64) -> i64 {
    let base = now_ms - offset;
    (base.div_euclid(interval_ms) + 1) * interval_ms + offset
}

/// Prometheus' resend rule: a firing alert is sent at most every `resend_delay`, a resolve at
/// once.
fn needs_sending(a: &ActiveAlert, ts: i64, resend_delay: Duration) -> bool {
    if a.state == State::Pending {
        return false;
    }
    match (a.resolved_at, a.last_sent_at) {
        (_, None) => true,
        (Some(r), Some(sent)) if r > sent => true,
        (_, Some(sent)) => sent + resend_delay.as_millis() as i64 <= ts,
    }
}

fn to_alert(a: &ActiveAlert, rule: &AlertingRule, ts: i64, interval: Duration, ctx: &Context) -> Alert {
    // A firing alert is valid for four resend periods: if evaluation stops, it times out and
    // resolves in the notifier instead of firing forever.
    let valid = 4 * ctx.resend_delay.max(interval).as_millis() as i64;
    Alert {
        labels: a.labels.clone(),
        annotations: a.annotations.clone(),
        starts_at: a.fired_at.unwrap_or(a.active_at),
        ends_at: a.resolved_at.unwrap_or(ts + valid),
        generator_url: generator_url(&ctx.external_url, &rule.query),
    }
}

/// Prometheus' link back to the expression.
pub fn generator_url(external_url: &str, query: &str) -> String {
    let q: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    format!("{}/graph?g0.expr={q}&g0.tab=1", external_url.trim_end_matches('/'))
}

/// Evaluates `expr` at `ts` (ms): one (labels without `__name__`, value) per sample.
fn sample(
    source: &dyn Source,
    memo: Option<&Memo>,
    retention: &RetentionConfig,
    expr: &promql_parser::parser::Expr,
    ts: i64,
    deadline: Instant,
) -> Result<Vec<(Labels, f64)>, String> {
    let steps = Steps::instant(ts);
    let limits = Limits { max_series: MAX_SERIES, max_points: 1, max_samples: MAX_SERIES, deadline };
    let engine = Engine::new(source, &steps, ts.div_euclid(1000), retention, limits);
    let engine = match memo {
        Some(memo) => engine.with_memo(memo),
        None => engine,
    };
    let value = engine.eval(expr).and_then(|v| engine.materialized(v)).map_err(|e| e.to_string())?;
    Ok(match value {
        Value::Scalar(v) => {
            v.first().filter(|x| !x.is_nan()).map(|&x| vec![(Labels::new(), x)]).unwrap_or_default()
        }
        Value::Vector(series) => series
            .into_iter()
            .filter_map(|s| {
                let v = s.values.first().copied().flatten()?;
                let mut labels = s.labels;
                labels.remove("__name__");
                Some((labels, v))
            })
            .collect(),
        Value::Str(_) | Value::Hist(_) | Value::Native(_) => {
            return Err("rule result is not a vector or scalar".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn ticks_stay_on_the_offset_grid() {
        assert_eq!(next_tick(10_500, 1000, 200), 11_200);
        assert_eq!(next_tick(11_200, 1000, 200), 12_200);
        assert_eq!(next_tick(11_199, 1000, 200), 11_200);
        assert_eq!(next_tick(0, 60_000, 0), 60_000);
    }

    fn alert(state: State, resolved_at: Option<i64>, last_sent_at: Option<i64>) -> ActiveAlert {
        ActiveAlert {
            labels: Labels::new(),
            annotations: Labels::new(),
            state,
            active_at: 0,
            fired_at: Some(0),
            resolved_at,
            keep_firing_since: None,
            value: 1.0,
            last_sent_at,
        }
    }

    #[test]
    fn firing_alerts_are_resent_after_the_delay_and_resolves_at_once() {
        let d = Duration::from_secs(60);
        assert!(!needs_sending(&alert(State::Pending, None, None), 0, d));
        assert!(needs_sending(&alert(State::Firing, None, None), 0, d));
        assert!(!needs_sending(&alert(State::Firing, None, Some(10_000)), 69_999, d));
        assert!(needs_sending(&alert(State::Firing, None, Some(10_000)), 70_000, d));
        assert!(needs_sending(&alert(State::Inactive, Some(20_000), Some(10_000)), 20_000, d));
        assert!(!needs_sending(&alert(State::Inactive, Some(20_000), Some(20_000)), 30_000, d));
    }

    fn runtime(for_: u64, keep_firing_for: u64) -> GroupRuntime {
        let yaml = format!(
            "groups:\n  - name: g\n    interval: 1s\n    rules:\n      - alert: Slow\n        expr: '1'\n        for: {for_}s\n        keep_firing_for: {keep_firing_for}s\n"
        );
        let group = RuleGroup::parse(&yaml, std::path::Path::new("r.yml")).unwrap().remove(0);
        let rules = vec![RuleState::default()];
        GroupRuntime {
            group,
            state: Mutex::new(GroupState { rules, persisted: vec![Vec::new()], ..GroupState::default() }),
            repeats: Arc::default(),
        }
    }

    #[derive(Debug)]
    struct Discard;

    impl Sink for Discard {
        fn send(&self, _: Vec<Alert>) {}
    }

    /// The alerts of each rule of `yaml`'s first group after one evaluation at `ts` (ms).
    fn alerts_of(store: &Store, yaml: &str, ts: i64) -> Vec<Vec<(Labels, State, String)>> {
        let group = RuleGroup::parse(yaml, std::path::Path::new("r.yml")).unwrap().remove(0);
        let runtime = GroupRuntime::new(group, None, store);
        let ctx = Context {
            sources: Arc::new(store.clone()),
            state: Arc::new(crate::store::MemoryStore::default()),
            clock: Arc::new(crate::clock::SystemClock),
            retention: RetentionConfig::default(),
            metrics: Arc::new(Metrics::new()),
            sink: Arc::new(Discard),
            external_url: String::new(),
            resend_delay: Duration::from_secs(60),
        };
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(runtime.evaluate(&ctx, ts));
        let snapshot = runtime.snapshot();
        snapshot
            .rules
            .iter()
            .map(|r| {
                assert_eq!(r.last_error, None);
                r.alerts.values().map(|a| (a.labels.clone(), a.state, format!("{:.9}", a.value))).collect()
            })
            .collect()
    }

    #[test]
    fn rules_that_share_their_reads_fire_as_they_would_alone() {
        use crate::series::{SeriesLabels, Status};
        use crate::store::{EpochWrite, WindowDelta};
        use tailscope_proto::histogram::{Histogram, Layout};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Layout::default(), &Metrics::new()).unwrap();
        let now = 1_800_000_000;
        let mut write = EpochWrite::default();
        for (k, op) in ["a", "b", "c"].iter().enumerate() {
            let labels = SeriesLabels::new("svc", *op, Status::Ok);
            write.series.push((labels.id(), labels.clone()));
            for (i, w) in (now - 600..now).step_by(10).enumerate() {
                let mut h = Histogram::new(Layout::default());
                h.record(1_000_000 * (1 + (i as u64 * 7 + k as u64 * 13) % 90), 1 + k as u64);
                write.windows.push(WindowDelta {
                    series: labels.id(),
                    window_start: w,
                    histogram: h.to_bytes(),
                });
            }
        }
        store.write_epoch(&write).unwrap();
        let rules = [
            "histogram_quantile(0.99, sum by (operation, le) (rate(span_duration_seconds_bucket{service=\"svc\"}[5m]))) > 0.02",
            "histogram_quantile(0.99, sum by (operation, le) (rate(span_duration_seconds_bucket{service=\"svc\"}[5m]))) > 0.087",
            "histogram_quantile(0.5, sum by (operation, le) (rate(span_duration_seconds_bucket{service=\"svc\"}[5m]))) > 0.01",
            "histogram_quantile(0.9, sum by (le) (rate(span_duration_seconds_bucket{service=\"svc\"}[5m]))) > 0.01",
            "sum by (operation) (rate(span_duration_seconds_count{service=\"svc\"}[5m])) > 0",
            "sum by (operation) (rate(span_duration_seconds_count{service=\"svc\"}[90s])) > 0",
        ];
        let group = |rules: &[&str]| {
            let mut yaml = String::from("groups:\n  - name: g\n    interval: 1m\n    rules:\n");
            for (i, r) in rules.iter().enumerate() {
                yaml.push_str(&format!("      - alert: R{i}\n        expr: '{r}'\n"));
            }
            yaml
        };
        // At a whole minute and between two (edges read at 10 s).
        for ts in [now * 1000, now * 1000 - 25_500] {
            let together = alerts_of(&store, &group(&rules), ts);
            let alone: Vec<_> = rules.iter().map(|r| alerts_of(&store, &group(&[r]), ts).remove(0)).collect();
            assert_eq!(together.len(), rules.len());
            for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
                let relabel = |v: &Vec<(Labels, State, String)>| {
                    let mut v: Vec<_> = v
                        .iter()
                        .map(|(l, s, v)| {
                            let mut l = l.clone();
                            l.insert("alertname".into(), format!("R{i}"));
                            (l, *s, v.clone())
                        })
                        .collect();
                    v.sort_by(|x, y| x.0.cmp(&y.0));
                    v
                };
                assert_eq!(relabel(t), relabel(a), "rule {i} at {ts}");
            }
            assert!(together.iter().all(|a| !a.is_empty()), "every rule fires: {together:?}");
            if ts == now * 1000 {
                assert_eq!(
                    (together[0].len(), together[1].len()),
                    (3, 1),
                    "the thresholds differ: {together:?}"
                );
            }
        }
    }

    /// Feeds one evaluation per second where the condition is `pattern[i]`; returns what was
    /// sent to the notifier as (second, firing?) pairs.
    fn flap(rt: &GroupRuntime, pattern: impl Iterator<Item = bool>) -> Vec<(i64, bool)> {
        let rule = rt.group.rules[0].clone();
        let mut sent = Vec::new();
        for (i, breach) in pattern.enumerate() {
            let ts = i as i64 * 1000;
            let samples = if breach {
                vec![(Labels::from([(String::from("service"), String::from("a"))]), 0.7)]
            } else {
                vec![]
            };
            let mut state = rt.state.lock();
            rt.apply(&rule, &mut state.rules[0], samples, ts).unwrap();
            for a in state.rules[0].alerts.values_mut() {
                if needs_sending(a, ts, Duration::from_secs(3600)) {
                    a.last_sent_at = Some(ts);
                    sent.push((i as i64, a.state == State::Firing));
                }
            }
        }
        sent
    }

    #[test]
    fn flapping_around_the_threshold_makes_no_storm() {
        // Breaching every other second: `for: 3s` never lets it fire.
        let rt = runtime(3, 0);
        assert_eq!(flap(&rt, (0..120).map(|i| i % 2 == 0)), []);
        // Breaching four seconds out of five: it fires once, after `for`, and `keep_firing_for`
        // bridges the gaps; one resolve after the oscillation ends.
        let rt = runtime(3, 2);
        let pattern = (0..120).map(|i| i < 100 && i % 5 != 4);
        assert_eq!(flap(&rt, pattern), [(3, true), (101, false)]);
        // Without keep_firing_for the same oscillation would fire and resolve every five seconds.
        let rt = runtime(3, 0);
        let storm = flap(&rt, (0..120).map(|i| i < 100 && i % 5 != 4));
        assert!(storm.len() > 10, "{storm:?}");
    }

    #[test]
    fn state_survives_a_reload_of_an_unchanged_rule() {
        let old = runtime(60, 0);
        flap(&old, [true, true].into_iter());
        let active_at = old.state.lock().rules[0].alerts.values().next().map(|a| (a.state, a.active_at));
        assert_eq!(active_at, Some((State::Pending, 0)));
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(dir.path(), tailscope_proto::histogram::Layout::default(), &Metrics::new()).unwrap();
        let new = GroupRuntime::new(old.group.clone(), Some(&old), &store);
        assert_eq!(new.state.lock().rules[0].alerts, old.state.lock().rules[0].alerts);
    }

    #[test]
    fn generator_urls_link_to_the_expression() {
        assert_eq!(generator_url("http://h:9797/", "a > 1"), "http://h:9797/graph?g0.expr=a+%3E+1&g0.tab=1");
    }
}
