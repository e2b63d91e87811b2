//! A bounded PromQL subset evaluated over tailscope's histograms.
//!
//! tailscope stores one histogram per series and window, and exposes it as the Prometheus
//! histogram `span_duration_seconds` (`_bucket` with `le`, `_count`, `_sum`). Expressions are
//! parsed by `promql-parser` and evaluated over all steps of a query at once.
//!
//! Bucket series stay *histograms* as long as they can: `rate(span_duration_seconds_bucket[5m])`
//! and `sum by (le, …)` of it are lazy [`HistValue`]s, so `histogram_quantile` is computed from
//! the merged HDR histograms of each group — exact to the histogram's precision, with no
//! interpolation between bucket bounds. Only when another operation needs bucket *numbers* are
//! they synthesized, at the default `le` ladder or at exactly the `le` a matcher names.
//!
//! A range is read once per group: the windows of the union of all steps' ranges are scanned,
//! and a sliding accumulator adds the windows entering a step's range and subtracts the ones
//! leaving it, instead of re-merging per step.

use std::collections::BTreeMap;
use std::time::Instant;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{Expr, Offset, VectorSelector};
use tailscope_proto::histogram::{Checked, Histogram, HistogramError};

use crate::query::plan;
use crate::series::SeriesLabels;
use crate::store::RetentionConfig;
use crate::store::StoreError;

/// The histogram's base name, and its native-histogram series: selected only by naming it.
pub const METRIC: &str = "span_duration_seconds";
/// Cumulative buckets, label `le`.
pub const BUCKET: &str = "span_duration_seconds_bucket";
/// Span counts.
pub const COUNT: &str = "span_duration_seconds_count";
/// Sums of span durations in seconds.
pub const SUM: &str = "span_duration_seconds_sum";
/// The series names, in this order everywhere.
pub const NAMES: [&str; 4] = [BUCKET, COUNT, SUM, METRIC];
/// The self-time histogram's names, in the order of [`NAMES`]: the time spans spent in their
/// own code, not waiting on the calls they made (their self-time series, see
/// [`crate::series::Measure`]).
pub const SELF_NAMES: [&str; 4] =
    ["span_self_seconds_bucket", "span_self_seconds_count", "span_self_seconds_sum", "span_self_seconds"];

/// Which of `names` (a family's, in the order of [`NAMES`]) a selector's metric name and
/// `__name__` matchers match.
pub(crate) fn names_matched(vs: &VectorSelector, names: [&'static str; 4]) -> [bool; 4] {
    names.map(|n| {
        vs.name.as_deref().is_none_or(|want| want == n)
            && vs.matchers.matchers.iter().filter(|m| m.name == "__name__").all(|m| m.is_match(n))
    })
}

/// The matcher a selection of [`SELF_NAMES`] adds: only self-time series answer it.
pub(crate) fn self_time_matcher() -> Matcher {
    Matcher::new(MatchOp::Equal, crate::series::MEASURE_MATCHER, crate::series::SELF_MEASURE)
}

/// The `le` bounds synthesized when no matcher names one: log-spaced 1-2.5-5 from 100 µs to
/// 1000 s, the hour, and `+Inf`.
pub const DEFAULT_LE: [f64; 24] = [
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    3600.0,
    f64::INFINITY,
];

/// The most encoded histogram bytes one group of one query may hold in memory.
pub const MAX_QUERY_BYTES: usize = 256 << 20;

/// How a range is read for a set of steps ([`Engine::reads`]).
struct ReadPlan {
    levels: Vec<crate::store::Resolution>,
    step_pieces: Vec<Vec<plan::Piece>>,
    intervals: Vec<Vec<(i64, i64)>>,
}

/// A label set; `__name__` is one of its labels.
pub type Labels = BTreeMap<String, String>;

pub use crate::store::{Source, WindowFn};

/// The deepest expression accepted when no limit is configured (`query.max_depth`).
pub const DEFAULT_MAX_DEPTH: usize = 256;

/// Parses PromQL text whose tree is at most [`DEFAULT_MAX_DEPTH`] deep (see [`parse_bounded`]).
pub fn parse(text: &str) -> Result<Expr, String> {
    parse_bounded(text, DEFAULT_MAX_DEPTH)
}

/// Parses PromQL text, refusing before the parser runs any text whose tree may be deeper than
/// `max_depth` (the parser, the evaluator and the tree's destructor recurse per level, and a
/// stack overflow aborts the process). promql-parser also panics on some inputs (fuzzing found
/// a duration literal too large for a `Duration`: `x[444…490]`), so a panic is contained here
/// and reported as a parse error; the server never panics on a query.
pub fn parse_bounded(text: &str, max_depth: usize) -> Result<Expr, String> {
    depth::check(text, max_depth)?;
    contained(|| promql_parser::parser::parse(text))
}

/// Parses a PromQL duration (`5m`, `1h30m`), with panics contained as in [`parse`].
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    contained(|| promql_parser::util::parse_duration(text))
}

fn contained<T>(f: impl FnOnce() -> Result<T, String> + std::panic::UnwindSafe) -> Result<T, String> {
    std::panic::catch_unwind(f).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!("the PromQL parser failed on this input ({why})"))
    })
}

/// Calls `f` with every node of `expr`, parents before their children, in order.
pub fn visit<'a>(expr: &'a Expr, f: &mut impl FnMut(&'a Expr)) {
    f(expr);
    match expr {
        Expr::Aggregate(a) => {
            visit(&a.expr, f);
            if let Some(p) = &a.param {
                visit(p, f);
            }
        }
        Expr::Unary(u) => visit(&u.expr, f),
        Expr::Binary(b) => {
            visit(&b.lhs, f);
            visit(&b.rhs, f);
        }
        Expr::Paren(p) => visit(&p.expr, f),
        Expr::Subquery(q) => visit(&q.expr, f),
        Expr::Call(c) => c.args.args.iter().for_each(|a| visit(a, f)),
        Expr::VectorSelector(_)
        | Expr::MatrixSelector(_)
        | Expr::NumberLiteral(_)
        | Expr::StringLiteral(_)
        | Expr::Extension(_) => {}
    }
}

/// Every vector selector of `expr` (those inside range selectors included), in order.
pub fn selectors(expr: &Expr) -> Vec<&VectorSelector> {
    let mut out = Vec::new();
    visit(expr, &mut |e| match e {
        Expr::VectorSelector(vs) => out.push(vs),
        Expr::MatrixSelector(ms) => out.push(&ms.vs),
        _ => {}
    });
    out
}

/// Why an evaluation failed; each maps to a Prometheus error type.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Unsupported construct or bad argument (`bad_data`, HTTP 400).
    #[error("{0}")]
    Unsupported(String),
    /// A limit was hit or the data does not fit the operation (`execution`, HTTP 422).
    #[error("{0}")]
    Execution(String),
    /// The query ran out of time (`timeout`, HTTP 503).
    #[error("query timed out in {0}")]
    Timeout(&'static str),
    /// The store failed (`internal`, HTTP 500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError::Unsupported(what.into()))
}

/// Limits that bound one query.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most series a query may select.
    pub max_series: usize,
    /// Most points per returned series.
    pub max_points: usize,
    /// Most samples (selected series × steps) the query may hold.
    pub max_samples: usize,
    /// When the query must have finished.
    pub deadline: Instant,
}

/// The evaluation times of a query, in milliseconds since the epoch.
#[derive(Debug, Clone)]
pub struct Steps {
    times: Vec<i64>,
    step: i64,
}

impl Steps {
    /// One evaluation at `t`.
    pub fn instant(t: i64) -> Steps {
        Steps { times: vec![t], step: 0 }
    }

    /// Evaluations from `start` to `end` every `step` (all in ms), at most `max_points`.
    pub fn range(start: i64, end: i64, step: i64, max_points: usize) -> Result<Steps, EvalError> {
        if step <= 0 {
            return unsupported(
                "zero or negative query resolution step widths are not accepted. Try a positive integer",
            );
        }
        let n = (end - start) / step + 1;
        if n as u64 > max_points as u64 {
            let thousands = max_points / 1000;
            let rest = max_points % 1000;
            let limit = if thousands > 0 { format!("{thousands},{rest:03}") } else { rest.to_string() };
            return Err(EvalError::Unsupported(format!(
                "exceeded maximum resolution of {limit} points per timeseries. Try decreasing the query resolution (?step=XX)"
            )));
        }
        Ok(Steps { times: (0..n).map(|i| start + i * step).collect(), step })
    }

    /// The evaluation times in ms.
    pub fn times(&self) -> &[i64] {
        &self.times
    }

    fn len(&self) -> usize {
        self.times.len()
    }
}

/// A series of values, one per step (`None` where it has no value).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its labels.
    pub labels: Labels,
    /// One value per step.
    pub values: Vec<Option<f64>>,
}

/// The result of evaluating an expression over all steps.
#[derive(Debug, Clone)]
pub enum Value {
    /// One number per step.
    Scalar(Vec<f64>),
    /// A string.
    Str(String),
    /// Series.
    Vector(Vec<Series>),
    /// Bucket series still held as histograms.
    Hist(HistValue),
    /// Native histograms, for answers (`histogram`/`histograms` in the JSON).
    Native(Vec<NativeSeries>),
}

/// A native-histogram series: one histogram per step (`None` where it has none).
#[derive(Debug, Clone, PartialEq)]
pub struct NativeSeries {
    /// Its labels.
    pub labels: Labels,
    /// One histogram per step.
    pub values: Vec<Option<NativeSample>>,
}

/// One native-histogram sample as the Prometheus API shows it: count, sum (seconds) and the
/// non-empty buckets as `(lower, upper, count)`, both bounds inclusive (tailscope's buckets
/// hold whole nanoseconds), scaled per second for `rate()`.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeSample {
    /// Observations.
    pub count: f64,
    /// Their sum in seconds.
    pub sum: f64,
    /// `(lower, upper, count)` per non-empty bucket, ascending.
    pub buckets: Vec<(f64, f64, f64)>,
}

/// `rate`/`increase` of bucket, count or sum series, possibly summed by group: still
/// histograms, so a `sum` merges the members of its groups before anything is read (one read
/// per group, not one per series).
#[derive(Debug, Clone)]
pub struct HistValue {
    groups: Vec<HistGroup>,
    le: Vec<f64>,
    /// False once a `sum` grouped the `le` label away: as numbers, the value is then the
    /// classic sum over all buckets; as histograms (`histogram_quantile`) nothing changes, as
    /// with Prometheus' native histograms.
    le_kept: bool,
    range: i64,
    offset: i64,
    per_second: bool,
    kind: HistKind,
}

impl HistValue {
    /// Histograms read over `range` that no `le` label stands for (native, count, sum).
    fn without_le(
        groups: Vec<HistGroup>,
        range: i64,
        offset: i64,
        per_second: bool,
        kind: HistKind,
    ) -> HistValue {
        HistValue { groups, le: Vec::new(), le_kept: false, range, offset, per_second, kind }
    }

    /// No histograms.
    fn none() -> HistValue {
        HistValue::without_le(Vec::new(), 1, 0, false, HistKind::Native)
    }

    /// What a histogram read over the range is divided by: the range for `rate()`, else 1.
    fn scale(&self) -> f64 {
        scale(self.per_second, self.range)
    }
}

/// What a histogram read over `range` seconds is divided by: the range for `rate()`
/// (`per_second`), else 1.
fn scale(per_second: bool, range: i64) -> f64 {
    if per_second {
        range as f64
    } else {
        1.0
    }
}

/// A histogram's count per `scale` seconds.
fn count_per(acc: &Histogram, scale: f64) -> f64 {
    acc.count() as f64 / scale
}

/// A histogram's sum, in seconds, per `scale` seconds.
fn seconds_per(acc: &Histogram, scale: f64) -> f64 {
    acc.sum() as f64 / 1e9 / scale
}

/// Which series a [`HistValue`]'s histograms stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HistKind {
    /// `_bucket` series at the value's `le` bounds.
    Buckets,
    /// Native histograms (`span_duration_seconds`): read only as histograms, never as numbers.
    Native,
    /// `_count` series: a number per group, never a histogram to the histogram functions.
    Count,
    /// `_sum` series, in seconds: as `Count`.
    Sum,
}

impl HistKind {
    /// Whether the histogram functions (`histogram_quantile`, `histogram_count`, …) read it.
    fn is_histogram(self) -> bool {
        matches!(self, HistKind::Buckets | HistKind::Native)
    }
}

#[derive(Debug, Clone)]
struct HistGroup {
    labels: Labels,
    members: Vec<u64>,
}

/// What an evaluation needs besides the expression.
pub struct Engine<'a> {
    source: &'a dyn Source,
    steps: &'a Steps,
    now: i64,
    retention: &'a RetentionConfig,
    limits: Limits,
    memo: Option<&'a Memo>,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("steps", &self.steps.len()).field("now", &self.now).finish()
    }
}

/// Which of the series names a selector matches (bucket, count, sum, native), with its series
/// grouped as they are exposed (one series per group for `span_duration_seconds`, one group per
/// edge for the service graph's names) and its `le` bounds.
struct Selection {
    names: [bool; 4],
    /// The names exposed for each of `names`.
    called: [&'static str; 4],
    /// Labels without `__name__`.
    groups: Vec<HistGroup>,
    le: Vec<f64>,
    /// Whether the names are the service graph's (whose plain selectors read as counters).
    graph: bool,
}

impl Selection {
    /// A selection of `span_duration_seconds` (or, `called` [`SELF_NAMES`],
    /// `span_self_seconds`) series, one group each.
    fn of_series(
        names: [bool; 4],
        called: [&'static str; 4],
        series: Vec<(u64, SeriesLabels)>,
        le: Vec<f64>,
    ) -> Selection {
        let groups = series
            .into_iter()
            .map(|(id, l)| HistGroup {
                labels: l.pairs().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
                members: vec![id],
            })
            .collect();
        Selection { names, called, groups, le, graph: false }
    }
}

impl<'a> Engine<'a> {
    /// An engine reading `source`, evaluating at `steps`; `now` (seconds) and `retention`
    /// decide which resolutions are still available.
    pub fn new(
        source: &'a dyn Source,
        steps: &'a Steps,
        now: i64,
        retention: &'a RetentionConfig,
        limits: Limits,
    ) -> Engine<'a> {
        Engine { source, steps, now, retention, limits, memo: None }
    }

    /// The engine sharing values and merged ranges with the other evaluations of `memo`'s
    /// instant (a rule group's); ignored unless this engine evaluates at that instant.
    pub fn with_memo(mut self, memo: &'a Memo) -> Engine<'a> {
        self.memo = memo.serves(self.steps.times(), self.now).then_some(memo);
        self
    }

    /// `f()`, or its value kept in the memo under `expr`'s text (when the memo's expressions
    /// repeat it).
    fn shared(&self, expr: &Expr, f: impl FnOnce() -> Result<Value, EvalError>) -> Result<Value, EvalError> {
        let Some(memo) = self.memo else { return f() };
        let key = expr.to_string();
        if !memo.repeats(&key) {
            return f();
        }
        if let Some(v) = memo.value(&key) {
            return Ok(v);
        }
        let v = f()?;
        memo.keep_value(key, &v);
        Ok(v)
    }

    /// Evaluates `expr` at every step.
    pub fn eval(&self, expr: &Expr) -> Result<Value, EvalError> {
        self.check_time("evaluation")?;
        match expr {
            Expr::NumberLiteral(n) => Ok(Value::Scalar(vec![n.val; self.steps.len()])),
            Expr::StringLiteral(s) => Ok(Value::Str(s.val.clone())),
            Expr::Paren(p) => self.eval(&p.expr),
            Expr::Unary(u) => match self.eval(&u.expr)? {
                Value::Scalar(v) => Ok(Value::Scalar(v.into_iter().map(|x| -x).collect())),
                other => {
                    let mut series = self.materialize(other)?;
                    for s in &mut series {
                        s.labels.remove("__name__");
                        s.values.iter_mut().flatten().for_each(|v| *v = -*v);
                    }
                    Ok(Value::Vector(series))
                }
            },
            Expr::VectorSelector(vs) => self.instant_selector(vs),
            Expr::MatrixSelector(_) => unsupported(
                "a range vector (e.g. x[5m]) can only be an argument of rate() or increase() here",
            ),
            Expr::Call(call) => self.shared(expr, || self.call(call)),
            Expr::Aggregate(agg) => self.shared(expr, || self.aggregate(agg)),
            Expr::Binary(bin) => self.binary(bin),
            Expr::Subquery(_) => unsupported("subqueries are not supported"),
            Expr::Extension(_) => unsupported("extension expressions are not supported"),
        }
    }

    fn check_time(&self, what: &'static str) -> Result<(), EvalError> {
        if Instant::now() > self.limits.deadline {
            return Err(EvalError::Timeout(what));
        }
        Ok(())
    }

    /// Resolves a selector's matchers against the series index.
    fn select(&self, vs: &VectorSelector) -> Result<Selection, EvalError> {
        if vs.at.is_some() {
            return unsupported("the @ modifier is not supported");
        }
        if !vs.matchers.or_matchers.is_empty() {
            return unsupported("\"or\" between label matchers is not supported");
        }
        let named = vs.name.clone().or_else(|| {
            vs.matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
                .map(|m| m.value.clone())
        });
        if let Some(metric) = named.as_deref().and_then(graph::named) {
            return self.select_graph(vs, metric);
        }
        // The self-time names are a family of their own; a selector whose names match both
        // (`{__name__=~"span_.*"}`) reads the durations.
        let family = |called: [&'static str; 4]| {
            let mut names = names_matched(vs, called);
            // The native histogram is selected only by its name: a float selection and
            // histograms never mix in one vector.
            let named =
                vs.name.as_deref() == Some(called[3])
                    || vs.matchers.matchers.iter().any(|m| {
                        m.name == "__name__" && matches!(m.op, MatchOp::Equal) && m.value == called[3]
                    });
            names[3] &= named;
            names
        };
        let (names, called, self_time) = match family(NAMES) {
            names if names.iter().any(|&n| n) => (names, NAMES, false),
            _ => (family(SELF_NAMES), SELF_NAMES, true),
        };
        let mut le = DEFAULT_LE.to_vec();
        let mut label_matchers: Vec<&Matcher> = Vec::new();
        for m in &vs.matchers.matchers {
            match m.name.as_str() {
                "__name__" | crate::series::MEASURE_MATCHER => {}
                "le" => le = le_bounds(m)?,
                _ => label_matchers.push(m),
            }
        }
        let measure = self_time_matcher();
        if self_time {
            label_matchers.push(&measure);
        }
        if !names.iter().any(|&n| n) {
            return Ok(Selection::of_series(names, called, Vec::new(), le));
        }
        // One series past the limit is enough to refuse: no more is taken from the index.
        let per_series = names.iter().filter(|&&n| n).count();
        let series = self.source.select(&label_matchers, self.limits.max_series / per_series + 1)?;
        self.check_selected(series.len() * per_series)?;
        Ok(Selection::of_series(names, called, series, le))
    }

    /// Refuses a selection of more than `query.max_series` series or `query.max_samples`.
    fn check_selected(&self, selected: usize) -> Result<(), EvalError> {
        if selected > self.limits.max_series {
            return Err(EvalError::Execution(format!(
                "the query selects more than {} series (query.max_series); narrow the selection",
                self.limits.max_series
            )));
        }
        let samples = selected.saturating_mul(self.steps.len());
        if samples > self.limits.max_samples {
            return Err(EvalError::Execution(format!(
                "the query would hold {samples} samples ({selected} series × {} steps), more than \
                 query.max_samples ({}); narrow the selection, shorten the range or raise the step",
                self.steps.len(),
                self.limits.max_samples
            )));
        }
        Ok(())
    }

    /// A selection of a service-graph name ([`graph`]): the edges' series, one group per edge.
    fn select_graph(&self, vs: &VectorSelector, metric: graph::GraphMetric) -> Result<Selection, EvalError> {
        let part = metric.part;
        let names =
            [part == graph::Part::Bucket, part == graph::Part::Count, part == graph::Part::Sum, false];
        let mut called = [""; 4];
        called[names.iter().position(|&n| n).expect("one part")] = metric.name;
        let mut le = DEFAULT_LE.to_vec();
        let mut checked: Vec<&Matcher> = Vec::new();
        for m in &vs.matchers.matchers {
            match m.name.as_str() {
                "__name__" if m.is_match(metric.name) => {}
                "__name__" => {
                    return Ok(Selection { names, called, groups: Vec::new(), le, graph: true });
                }
                "le" if part == graph::Part::Bucket => le = le_bounds(m)?,
                _ => checked.push(m),
            }
        }
        let index = graph::index_matchers(metric, &checked);
        let series = self.source.select(&index.iter().collect::<Vec<_>>(), self.limits.max_series + 1)?;
        self.check_selected(series.len())?;
        let mut edges: BTreeMap<Labels, Vec<u64>> = BTreeMap::new();
        for (id, l) in &series {
            let Some(edge) = l.edge().filter(|e| e.side == metric.side) else { continue };
            let mut labels = Labels::new();
            labels.insert("client".into(), edge.client.into());
            labels.insert("server".into(), edge.server.into());
            if !edge.connection_type().is_empty() {
                labels.insert("connection_type".into(), edge.connection_type().into());
            }
            if checked.iter().all(|m| m.is_match(labels.get(&m.name).map_or("", String::as_str))) {
                edges.entry(labels).or_default().push(*id);
            }
        }
        let groups = edges.into_iter().map(|(labels, members)| HistGroup { labels, members }).collect();
        Ok(Selection { names, called, groups, le, graph: true })
    }

    fn instant_selector(&self, vs: &VectorSelector) -> Result<Value, EvalError> {
        let sel = self.select(vs)?;
        if sel.names[3] {
            return Ok(self.cumulative(vs, sel));
        }
        let called = sel.called;
        if sel.graph {
            // A counter, as Tempo's would read: every call since the oldest window retained.
            let offset = offset_seconds(&vs.offset);
            return self.windowed(sel, self.since_oldest(offset), offset, false, true);
        }
        if let Some(i) = sel.names.iter().position(|&n| n).filter(|_| !sel.groups.is_empty()) {
            return unsupported(format!(
                "{} holds counts per time window, not a cumulative counter: use rate() or increase() over a range, e.g. rate({}[5m])",
                called[i], called[i]
            ));
        }
        // Any other metric: tailscope has none, like a Prometheus that never scraped it.
        Ok(Value::Vector(Vec::new()))
    }

    /// A plain selector of the native histogram: at each step, every span of the series
    /// since the oldest 10-second window still retained (`retention.window_10s`) — the
    /// cumulative counter a Prometheus scraping tailscope since then would hold, exact to the
    /// 10 s grid (coarse rollups are read for the whole hours inside, fine windows at the edges).
    fn cumulative(&self, vs: &VectorSelector, sel: Selection) -> Value {
        let offset = offset_seconds(&vs.offset);
        let mut groups = sel.groups;
        for g in &mut groups {
            g.labels.insert("__name__".to_owned(), sel.called[3].to_owned());
        }
        Value::Hist(HistValue::without_le(groups, self.since_oldest(offset), offset, false, HistKind::Native))
    }

    /// The range, in seconds, from the oldest 10-second window still retained to the last
    /// step (moved back by `offset`).
    fn since_oldest(&self, offset: i64) -> i64 {
        let retained = i64::try_from(self.retention.window_10s.as_secs()).unwrap_or(i64::MAX);
        // The oldest 10-second window still kept, on the 10 s grid.
        let oldest = self.now.saturating_sub(retained).div_euclid(10) * 10 + 10;
        let last = self.steps.times().last().map_or(self.now, |t| (t + 999).div_euclid(1000)) - offset;
        (last - oldest).max(1)
    }

    /// Runs sliding sums over a group's windows: `f(step, acc)` is called for every step whose
    /// range (the 10 s windows starting in `[t - range, t)`, t in seconds rounded up, offset
    /// applied) holds any window. Coarse rollups are read only for whole coarse windows inside
    /// a step's range and its edges at the finer resolutions ([`plan`]), so every answer covers
    /// exactly the asked range to the 10 s grid.
    fn slide(
        &self,
        group: &HistGroup,
        range: i64,
        offset: i64,
        mut f: impl FnMut(usize, &Histogram),
    ) -> Result<(), EvalError> {
        let ends = self.ends(offset);
        // An instant evaluation with a memo merges each range once for all its rules.
        let (Some(memo), &[end]) = (self.memo.filter(|m| m.keeps_ranges()), ends.as_slice()) else {
            return self.slide_read(group, range, &ends, f);
        };
        let key: memo::RangeKey = (group.members.clone(), range, offset, end);
        if let Some(kept) = memo.range(&key) {
            if let Some(h) = kept {
                f(0, &h);
            }
            return Ok(());
        }
        let mut merged = None;
        self.slide_read(group, range, &ends, |i, acc| {
            merged = Some(acc.clone());
            f(i, acc);
        })?;
        memo.keep_range(key, merged);
        Ok(())
    }

    /// Whether a query that has read `bytes` of windows may go on (its deadline and byte
    /// limit).
    fn within_limits(&self, bytes: usize) -> Result<(), EvalError> {
        self.check_time("reading windows")?;
        if bytes > MAX_QUERY_BYTES {
            return Err(EvalError::Execution(format!(
                "the query reads more than {} MiB of histograms; narrow the selection or the range",
                MAX_QUERY_BYTES >> 20
            )));
        }
        Ok(())
    }

    /// The steps' range ends (seconds, `offset` applied): a window that began in the step's
    /// own second counts (a rule evaluated at 12:00:00.420 sees the window that started at
    /// 12:00:00).
    fn ends(&self, offset: i64) -> Vec<i64> {
        self.steps.times().iter().map(|t| (t + 999).div_euclid(1000) - offset).collect()
    }

    /// What the steps ending at `ends` read of a range of `range` seconds: the levels, each
    /// step's pieces, and per level the union of its pieces over all steps as disjoint
    /// intervals (read only what some step needs). `None` without steps.
    fn reads(&self, range: i64, ends: &[i64]) -> Option<ReadPlan> {
        let &first = ends.first()?;
        let levels = plan::levels(range, self.steps.step / 1000, first - range, self.now, self.retention);
        let seconds: Vec<i64> = levels.iter().map(|r| r.seconds()).collect();
        let step_pieces: Vec<Vec<plan::Piece>> =
            ends.iter().map(|&t| plan::pieces(&seconds, t - range, t)).collect();
        let intervals = (0..levels.len())
            .map(|level| {
                let mut spans: Vec<(i64, i64)> = step_pieces
                    .iter()
                    .flatten()
                    .filter(|p| p.level == level && p.lo < p.hi)
                    .map(|p| (p.lo, p.hi))
                    .collect();
                spans.sort_unstable();
                let mut intervals: Vec<(i64, i64)> = Vec::new();
                for (lo, hi) in spans {
                    match intervals.last_mut() {
                        Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                        _ => intervals.push((lo, hi)),
                    }
                }
                intervals
            })
            .collect();
        Some(ReadPlan { levels, step_pieces, intervals })
    }

    /// Tells the source which groups the slides that follow read, so a cluster can ask each
    /// owner for all of them at once: whole intervals for one step, per start for many
    /// ([`Engine::slide_read`] reads them so), and only groups an evaluation's memo does not
    /// hold already.
    fn read_ahead(&self, groups: &[HistGroup], range: i64, offset: i64) {
        let ends = self.ends(offset);
        let whole = ends.len() == 1;
        let memo = self.memo.filter(|m| m.keeps_ranges());
        let members: Vec<&[u64]> = groups
            .iter()
            .filter(|g| match (memo, ends.as_slice()) {
                (Some(m), &[end]) => m.range(&(g.members.clone(), range, offset, end)).is_none(),
                _ => true,
            })
            .map(|g| g.members.as_slice())
            .collect();
        if members.len() < 2 {
            return;
        }
        let Some(reads) = self.reads(range, &ends) else { return };
        for (res, intervals) in reads.levels.iter().zip(&reads.intervals) {
            if !intervals.is_empty() {
                self.source.read_ahead(*res, &members, intervals, whole);
            }
        }
    }

    /// [`Engine::slide`] from the source, for the steps' range ends (offset applied).
    fn slide_read(
        &self,
        group: &HistGroup,
        range: i64,
        ends: &[i64],
        mut f: impl FnMut(usize, &Histogram),
    ) -> Result<(), EvalError> {
        let Some(reads) = self.reads(range, ends) else { return Ok(()) };
        let ReadPlan { levels, step_pieces, intervals } = reads;
        let mut windows: Vec<plan::Windows> = levels.iter().map(|_| plan::Windows::default()).collect();
        let mut read = 0;
        // One step needs each interval only as a whole; many slide over its windows.
        let whole = ends.len() == 1;
        for (level, &res) in levels.iter().enumerate() {
            let w = &mut windows[level];
            // The limits are checked as the windows arrive, every few hundred of them.
            let mut stopped = None;
            let mut arrived = 0u32;
            let result =
                self.source.merged_windows(res, &group.members, &intervals[level], whole, &mut |start, b| {
                    w.push(start, Checked::trusted(b)?, b);
                    arrived = arrived.wrapping_add(1);
                    if arrived % 256 == 0 {
                        if let Err(e) = self.within_limits(read + w.bytes()) {
                            stopped = Some(e);
                            return Err(HistogramError::Inconsistent("the query stopped reading".into()));
                        }
                    }
                    Ok(())
                });
            if let Some(e) = stopped {
                return Err(e);
            }
            result?;
            self.within_limits(read + w.bytes())?;
            read += w.bytes();
            // Several members, or windows merged where they are held, come in any order
            // (a sorted level sorts in one pass).
            w.sort();
        }
        // The top level's piece slides; the edges (a few finer windows per step) are added to
        // its sum for the step and subtracted again, which costs their buckets only — not a
        // merge of whole histograms per step.
        let mut top = plan::Slider::new(self.source.layout());
        for (i, pieces) in step_pieces.iter().enumerate() {
            let (head, edges) = pieces.split_first().expect("a piece per level");
            top.advance(&windows[head.level], head.lo, head.hi);
            let ranges: Vec<(usize, std::ops::Range<usize>)> = edges
                .iter()
                .filter(|p| p.lo < p.hi)
                .map(|p| (p.level, windows[p.level].range(p.lo, p.hi)))
                .filter(|(_, r)| !r.is_empty())
                .collect();
            if ranges.is_empty() {
                if top.holds_windows() {
                    f(i, top.histogram());
                }
                continue;
            }
            for (level, r) in &ranges {
                r.clone().for_each(|w| windows[*level].add(w, top.histogram_mut()));
            }
            f(i, top.histogram());
            let mut exact = true;
            for (level, r) in &ranges {
                for w in r.clone() {
                    exact &= windows[*level].subtract(w, top.histogram_mut());
                }
            }
            if !exact {
                // A window of another layout (a changed configuration) cannot be taken out.
                top.rebuild(&windows[head.level]);
            }
        }
        Ok(())
    }

    /// The value with histograms turned into bucket series, or native histograms (for
    /// answers).
    pub fn materialized(&self, v: Value) -> Result<Value, EvalError> {
        match v {
            Value::Hist(h) if h.kind == HistKind::Native => Ok(Value::Native(self.native_series(&h)?)),
            Value::Hist(_) => Ok(Value::Vector(self.materialize(v)?)),
            other => Ok(other),
        }
    }

    /// Native histograms per group and step: the merged histogram's non-empty buckets.
    fn native_series(&self, h: &HistValue) -> Result<Vec<NativeSeries>, EvalError> {
        let layout = self.source.layout();
        let scale = h.scale();
        let mut out = Vec::with_capacity(h.groups.len());
        self.read_ahead(&h.groups, h.range, h.offset);
        for g in &h.groups {
            let mut values = vec![None; self.steps.len()];
            self.slide(g, h.range, h.offset, |i, acc| {
                let buckets = acc
                    .iter_nonzero()
                    .map(|(index, n)| {
                        (
                            layout.lowest_equivalent(index) as f64 / 1e9,
                            layout.highest_equivalent(index) as f64 / 1e9,
                            n as f64 / scale,
                        )
                    })
                    .collect();
                values[i] = Some(NativeSample {
                    count: count_per(acc, scale),
                    sum: seconds_per(acc, scale),
                    buckets,
                });
            })?;
            if values.iter().any(Option::is_some) {
                out.push(NativeSeries { labels: g.labels.clone(), values });
            }
        }
        Ok(out)
    }

    /// Turns a value into plain series: histograms become bucket series at their `le` bounds.
    fn materialize(&self, v: Value) -> Result<Vec<Series>, EvalError> {
        match v {
            Value::Vector(s) => Ok(s),
            Value::Scalar(_) | Value::Str(_) => {
                unsupported("expected an instant vector, got a scalar or string")
            }
            Value::Native(_) => unsupported(NOT_A_NUMBER),
            Value::Hist(h) => match h.kind {
                HistKind::Native => unsupported(NOT_A_NUMBER),
                HistKind::Count | HistKind::Sum => self.totals(h),
                HistKind::Buckets => self.buckets(h),
            },
        }
    }

    /// `f(step, histogram, scale)` for each group of `h`, in order, at every step its range
    /// holds windows (`None` at the others).
    fn per_group(
        &self,
        h: &HistValue,
        mut f: impl FnMut(usize, &Histogram, f64) -> f64,
    ) -> Result<Vec<Vec<Option<f64>>>, EvalError> {
        let scale = h.scale();
        self.read_ahead(&h.groups, h.range, h.offset);
        h.groups
            .iter()
            .map(|g| {
                let mut values = vec![None; self.steps.len()];
                self.slide(g, h.range, h.offset, |i, acc| values[i] = Some(f(i, acc, scale)))?;
                Ok(values)
            })
            .collect()
    }

    /// The count or sum series of each group of `h`.
    fn totals(&self, h: HistValue) -> Result<Vec<Series>, EvalError> {
        let number = if h.kind == HistKind::Count { count_per } else { seconds_per };
        let values = self.per_group(&h, |_, acc, scale| number(acc, scale))?;
        Ok(h.groups.into_iter().zip(values).map(|(g, values)| Series { labels: g.labels, values }).collect())
    }

    /// The bucket series of each group of `h` (summed over `le` once a `sum` dropped it).
    fn buckets(&self, h: HistValue) -> Result<Vec<Series>, EvalError> {
        let mut out = Vec::new();
        let scale = h.scale();
        self.read_ahead(&h.groups, h.range, h.offset);
        for g in &h.groups {
            let mut per_le: Vec<Vec<Option<f64>>> = vec![vec![None; self.steps.len()]; h.le.len()];
            self.slide(g, h.range, h.offset, |i, acc| {
                for (j, &le) in h.le.iter().enumerate() {
                    let n = if le.is_infinite() {
                        acc.count()
                    } else {
                        acc.count_at_most((le * 1e9).clamp(0.0, u64::MAX as f64) as u64)
                    };
                    per_le[j][i] = Some(n as f64 / scale);
                }
            })?;
            if h.le_kept {
                for (le, values) in h.le.iter().zip(per_le) {
                    let mut labels = g.labels.clone();
                    labels.insert("le".into(), format_value(*le));
                    out.push(Series { labels, values });
                }
            } else {
                // The classic meaning of summing bucket series over `le`.
                let values =
                    (0..self.steps.len()).map(|i| per_le.iter().map(|v| v[i]).sum::<Option<f64>>()).collect();
                out.push(Series { labels: g.labels.clone(), values });
            }
        }
        Ok(out)
    }
}

/// A selector's `offset` in seconds (negative for `offset -5m`).
fn offset_seconds(offset: &Option<Offset>) -> i64 {
    match offset {
        None => 0,
        Some(Offset::Pos(d)) => d.as_secs() as i64,
        Some(Offset::Neg(d)) => -(d.as_secs() as i64),
    }
}

/// Why a native histogram cannot stand where a number is needed.
const NOT_A_NUMBER: &str = "span_duration_seconds is a native histogram: read it with histogram_quantile(), \
     histogram_count(), histogram_sum(), histogram_avg() or histogram_fraction(), or aggregate it with sum";

/// The `le` bounds a matcher selects: an equality names exactly one bound (any number); other
/// matchers filter the default ladder.
fn le_bounds(m: &Matcher) -> Result<Vec<f64>, EvalError> {
    if let MatchOp::Equal = m.op {
        return match parse_le(&m.value) {
            Some(v) => Ok(vec![v]),
            None => Ok(Vec::new()),
        };
    }
    Ok(DEFAULT_LE.iter().copied().filter(|&le| m.is_match(&format_value(le))).collect())
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "inf" | "+inf" => Some(f64::INFINITY),
        _ => s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0),
    }
}

/// Formats a sample value or `le` bound as Prometheus does (`NaN`, `+Inf`, `-Inf`, shortest
/// decimal otherwise).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

mod depth;
mod functions;
mod graph;
mod memo;
mod operators;

pub use memo::{Memo, Repeats};

#[cfg(test)]
mod tests;
