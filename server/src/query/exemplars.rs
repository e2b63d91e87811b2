//! Exemplars in Prometheus' shape: the spans kept for a series, each put under the bucket
//! series of the default `le` ladder its duration falls in, so that Grafana draws it on the
//! histogram panel it belongs to and links it to its trace.

use promql_parser::parser::VectorSelector;
use serde::Serialize;

use super::labels;
use super::promql::{format_value, EvalError, Labels, Source, BUCKET, DEFAULT_LE};
use super::Budget;

/// Most exemplars one query returns.
pub const MAX_EXEMPLARS: usize = 10_000;

/// The exemplars of one bucket series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExemplarSet {
    /// The bucket series: `__name__`, `service`, `operation`, `status`, `le`.
    #[serde(rename = "seriesLabels")]
    pub series_labels: Labels,
    /// Its exemplars, in time order per stored series.
    pub exemplars: Vec<Exemplar>,
}

/// One exemplar.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exemplar {
    /// `trace_id`, `span_id`, and `adjusted_count` when the sender said.
    pub labels: Labels,
    /// The span's duration in seconds, as Prometheus prints a float.
    pub value: String,
    /// When the span ended, seconds since the epoch.
    pub timestamp: f64,
}

/// The exemplars of the bucket series `selectors` select (none when there are none) of
/// spans that ended in `[start, end]` (seconds), at most [`MAX_EXEMPLARS`], grouped by bucket
/// series in label order.
pub fn select(
    source: &dyn Source,
    selectors: &[VectorSelector],
    start: f64,
    end: f64,
    budget: &Budget,
) -> Result<Vec<ExemplarSet>, EvalError> {
    if selectors.is_empty() {
        return Ok(Vec::new());
    }
    let mut groups: std::collections::BTreeMap<Labels, Vec<Exemplar>> = Default::default();
    let mut total = 0;
    // A span ending in the range started at most one window before it.
    let from = start.floor() as i64 - tailscope_proto::BASE_WINDOW_SECONDS;
    'series: for (id, series) in labels::candidates(source, selectors, budget)? {
        budget.check("reading exemplars")?;
        for e in source.exemplars(id, from, end.ceil() as i64 + 1)? {
            let seconds = e.duration_nanos as f64 / 1e9;
            let at = (e.start_unix_nanos + e.duration_nanos) as f64 / 1e9;
            if at < start || at > end {
                continue;
            }
            let le = DEFAULT_LE.iter().copied().find(|&le| seconds <= le).unwrap_or(f64::INFINITY);
            let mut set = Labels::new();
            set.insert("__name__".into(), BUCKET.into());
            for (k, v) in series.pairs() {
                set.insert(k.into(), v.into());
            }
            set.insert("le".into(), format_value(le));
            let selected = selectors.iter().any(|vs| {
                vs.name.as_deref().is_none_or(|n| n == BUCKET)
                    && vs.matchers.matchers.iter().all(|m| m.is_match(set.get(&m.name).map_or("", |v| v)))
            });
            if !selected {
                continue;
            }
            let mut ids = Labels::new();
            ids.insert("trace_id".into(), format!("{:016x}{:016x}", e.trace_id_high, e.trace_id_low));
            ids.insert("span_id".into(), format!("{:016x}", e.span_id));
            if e.adjusted_count > 0.0 {
                ids.insert("adjusted_count".into(), format_value(e.adjusted_count));
            }
            groups.entry(set).or_default().push(Exemplar {
                labels: ids,
                value: format_value(seconds),
                timestamp: at,
            });
            total += 1;
            if total >= MAX_EXEMPLARS {
                break 'series;
            }
        }
    }
    Ok(groups
        .into_iter()
        .map(|(series_labels, exemplars)| ExemplarSet { series_labels, exemplars })
        .collect())
}
