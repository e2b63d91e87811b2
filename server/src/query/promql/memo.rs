//! What evaluations at one instant share: a rule group evaluates all its rules at the same
//! time, and its rules repeat themselves — the same `histogram_quantile(…)` against a warning and
//! a critical threshold, a p99 and a p95 of the same selection. A [`Memo`] made for that instant
//! keeps each sub-expression's value (by its text) and each merged range of series (by the
//! series, range and offset), so a repeat costs a copy instead of a read and a merge. It is
//! bounded by a byte budget; past it, nothing more is kept and evaluation goes on unshared.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use promql_parser::parser::Expr;
use tailscope_proto::histogram::Histogram;

use super::Value;

/// What expressions evaluated at one instant repeat: the text of each function call or
/// aggregation that occurs more than once among them, and whether any selector does (then
/// merged ranges are worth keeping). Worked out once per rule group, when it is loaded.
#[derive(Debug, Clone, Default)]
pub struct Repeats {
    parts: HashSet<String>,
    selectors: bool,
}

impl Repeats {
    /// The repeats among `exprs`.
    pub fn of<'a>(exprs: impl IntoIterator<Item = &'a Expr>) -> Repeats {
        let mut parts: HashMap<String, usize> = HashMap::new();
        let mut selectors: HashMap<String, usize> = HashMap::new();
        for expr in exprs {
            super::visit(expr, &mut |e| match e {
                Expr::Call(_) | Expr::Aggregate(_) => *parts.entry(e.to_string()).or_default() += 1,
                Expr::VectorSelector(vs) => *selectors.entry(vs.to_string()).or_default() += 1,
                Expr::MatrixSelector(ms) => *selectors.entry(ms.vs.to_string()).or_default() += 1,
                _ => {}
            });
        }
        Repeats {
            parts: parts.into_iter().filter(|(_, n)| *n > 1).map(|(text, _)| text).collect(),
            selectors: selectors.values().any(|&n| n > 1),
        }
    }

    /// Whether anything repeats: without that, a memo would only cost.
    pub fn any(&self) -> bool {
        self.selectors || !self.parts.is_empty()
    }
}

/// A merged range: the series merged, the range and offset (seconds) and the step's end.
pub(super) type RangeKey = (Vec<u64>, i64, i64, i64);

/// Values and merged ranges of evaluations at one instant.
#[derive(Debug)]
pub struct Memo {
    /// The instant (ms) and the `now` (s) the values belong to.
    at: (i64, i64),
    repeats: Arc<Repeats>,
    budget: usize,
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    values: HashMap<String, Value>,
    /// `None`: the range holds no window.
    ranges: HashMap<RangeKey, Option<Arc<Histogram>>>,
    bytes: usize,
    hits: usize,
}

/// About how many bytes `v` holds.
fn size(v: &Value) -> usize {
    let labels = |l: &super::Labels| l.iter().map(|(k, v)| k.len() + v.len() + 64).sum::<usize>();
    match v {
        Value::Scalar(v) => v.len() * 8,
        Value::Str(s) => s.len(),
        Value::Vector(series) => series.iter().map(|s| labels(&s.labels) + s.values.len() * 16).sum(),
        Value::Hist(h) => h.groups.iter().map(|g| labels(&g.labels) + g.members.len() * 8).sum(),
        Value::Native(series) => series
            .iter()
            .map(|s| {
                labels(&s.labels)
                    + s.values.iter().flatten().map(|n| n.buckets.len() * 24 + 32).sum::<usize>()
            })
            .sum(),
    }
}

impl Memo {
    /// A memo for instant evaluations at `at` (ms) with the engine's `now` (s) of expressions
    /// that repeat `repeats`, keeping at most about `budget` bytes.
    pub fn new(at: i64, now: i64, repeats: Arc<Repeats>, budget: usize) -> Memo {
        Memo { at: (at, now), repeats, budget, kept: Mutex::new(Kept::default()) }
    }

    /// Whether the memo belongs to an instant evaluation at `at` with `now`.
    pub(super) fn serves(&self, times: &[i64], now: i64) -> bool {
        times == [self.at.0] && now == self.at.1
    }

    /// Whether the sub-expression `text` is worth keeping.
    pub(super) fn repeats(&self, text: &str) -> bool {
        self.repeats.parts.contains(text)
    }

    /// Whether merged ranges are worth keeping.
    pub(super) fn keeps_ranges(&self) -> bool {
        self.repeats.selectors
    }

    /// How many values and ranges were answered from the memo, and the bytes it holds.
    pub fn hits(&self) -> (usize, usize) {
        let kept = self.kept.lock();
        (kept.hits, kept.bytes)
    }

    pub(super) fn value(&self, key: &str) -> Option<Value> {
        let mut kept = self.kept.lock();
        let v = kept.values.get(key).cloned();
        kept.hits += usize::from(v.is_some());
        v
    }

    pub(super) fn keep_value(&self, key: String, v: &Value) {
        let bytes = size(v) + key.len();
        let mut kept = self.kept.lock();
        if kept.bytes + bytes <= self.budget {
            kept.bytes += bytes;
            kept.values.insert(key, v.clone());
        }
    }

    pub(super) fn range(&self, key: &RangeKey) -> Option<Option<Arc<Histogram>>> {
        let mut kept = self.kept.lock();
        let h = kept.ranges.get(key).cloned();
        kept.hits += usize::from(h.is_some());
        h
    }

    pub(super) fn keep_range(&self, key: RangeKey, h: Option<Histogram>) {
        let bytes = h.as_ref().map_or(0, Histogram::heap_bytes) + key.0.len() * 8 + 64;
        let mut kept = self.kept.lock();
        if kept.bytes + bytes <= self.budget {
            kept.bytes += bytes;
            kept.ranges.insert(key, h.map(Arc::new));
        }
    }
}
