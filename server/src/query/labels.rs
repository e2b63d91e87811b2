//! The series and labels of the Prometheus view (`/api/v1/series`, `/labels`,
//! `/label/<name>/values`), bounded: each stored series is exposed as `span_duration_seconds`
//! `_bucket` (one label set per default `le`), `_count` and `_sum`, but those sets are only
//! *matched* per series, never all built — only the answer is, and at most `limit` of it.
//! Series come from the source's index: a selector's matchers on `service`, `operation` and
//! `status` pick candidates from posting lists, and without a selector names and values are
//! read off the index directly. The request's [`Budget`] is checked as the candidates are
//! walked.

use std::collections::BTreeSet;

use promql_parser::parser::VectorSelector;

use super::promql::{self, format_value, EvalError, Labels, Source};
use super::Budget;
use crate::series::{Measure, SeriesLabels, MEASURE_MATCHER};
use promql_parser::label::Matcher;

#[cfg(test)]
mod tests;

/// How many series are walked between two budget checks.
const CHECK_EVERY: usize = 1024;

/// The `le` values of the exposed buckets, as they are written.
fn le_values() -> Vec<String> {
    promql::DEFAULT_LE.iter().map(|&v| format_value(v)).collect()
}

/// Whether a selector selects the exposed series `name` of `labels` at `le`.
fn selects(vs: &VectorSelector, name: &str, labels: &SeriesLabels, le: Option<&str>) -> bool {
    let get = |label: &str| -> &str {
        match label {
            "__name__" => name,
            "le" => le.unwrap_or(""),
            other => labels.get(other).unwrap_or(""),
        }
    };
    vs.name.as_deref().is_none_or(|n| n == name)
        && vs.matchers.matchers.iter().all(|m| m.is_match(get(&m.name)))
}

/// The matchers of a selector that a stored series answers (`__name__` and `le` are checked
/// per exposed series instead), once for duration series and, when the selector may name a
/// self-time name, once more for self-time series.
fn series_matchers(vs: &VectorSelector) -> Vec<Vec<Matcher>> {
    let own: Vec<Matcher> = vs
        .matchers
        .matchers
        .iter()
        .filter(|m| !matches!(m.name.as_str(), "__name__" | "le" | MEASURE_MATCHER))
        .cloned()
        .collect();
    let may_name = |names| promql::names_matched(vs, names).contains(&true);
    let mut out = Vec::new();
    if may_name(promql::NAMES) {
        out.push(own.clone());
    }
    if may_name(promql::SELF_NAMES) {
        let mut selfs = own;
        selfs.push(promql::self_time_matcher());
        out.push(selfs);
    }
    out
}

/// The exposed names of a stored series, in the order of [`promql::NAMES`].
fn names_of(labels: &SeriesLabels) -> [&'static str; 4] {
    match labels.measure {
        Measure::Duration => promql::NAMES,
        Measure::SelfTime => promql::SELF_NAMES,
    }
}

/// The stored series that one of `selectors` may select (every one when there are none), in
/// id order: the union of the index's selections by each selector's `service`, `operation`
/// and `status` matchers. `__name__` and `le` are left to the caller.
pub fn candidates(
    source: &dyn Source,
    selectors: &[VectorSelector],
    budget: &Budget,
) -> Result<Vec<(u64, SeriesLabels)>, EvalError> {
    if selectors.is_empty() {
        return Ok(source.series()?);
    }
    let mut union = std::collections::BTreeMap::new();
    for matchers in selectors.iter().flat_map(series_matchers) {
        budget.check("matching series")?;
        union.extend(source.select(&matchers.iter().collect::<Vec<_>>(), usize::MAX)?);
    }
    Ok(union.into_iter().collect())
}

/// Calls `f` with every exposed series (name, labels, `le`) that one of `selectors` selects
/// (every one when there are none), series by series in id order. The stored series are
/// taken from the source's index selection per selector, not from a walk of all of them.
fn for_each_selected(
    source: &dyn Source,
    selectors: &[VectorSelector],
    budget: &Budget,
    mut f: impl FnMut(&'static str, &SeriesLabels, Option<&str>),
) -> Result<(), EvalError> {
    let les = le_values();
    let candidates = candidates(source, selectors, budget)?;
    for (i, (_, labels)) in candidates.iter().enumerate() {
        if i % CHECK_EVERY == 0 {
            budget.check("matching series")?;
        }
        let names = names_of(labels);
        for name in names {
            if name == names[0] {
                for le in &les {
                    if selectors.is_empty() || selectors.iter().any(|vs| selects(vs, name, labels, Some(le)))
                    {
                        f(name, labels, Some(le));
                    }
                }
            } else if selectors.is_empty() || selectors.iter().any(|vs| selects(vs, name, labels, None)) {
                f(name, labels, None);
            }
        }
    }
    Ok(())
}

/// Whether the source holds any self-time series, read off the index.
pub fn self_times_stored(source: &dyn Source) -> Result<bool, EvalError> {
    Ok(!source.label_values(MEASURE_MATCHER, 1)?.0.is_empty())
}

/// Whether the source holds any series (every series has a status), without listing them.
fn any_series(source: &dyn Source) -> Result<bool, EvalError> {
    Ok(!source.label_values("status", 1)?.0.is_empty())
}

/// An exposed series' label set.
fn label_set(name: &str, labels: &SeriesLabels, le: Option<&str>) -> Labels {
    let mut set = Labels::new();
    set.insert("__name__".into(), name.into());
    for (k, v) in labels.pairs() {
        set.insert(k.into(), v.into());
    }
    if let Some(le) = le {
        set.insert("le".into(), le.into());
    }
    set
}

/// A sorted answer cut at a limit: only the `limit` smallest items are ever held.
#[derive(Debug)]
pub struct Capped<T> {
    /// The items, sorted.
    pub items: BTreeSet<T>,
    /// Whether items beyond the limit were dropped.
    pub truncated: bool,
}

impl<T: Ord> Capped<T> {
    fn new() -> Capped<T> {
        Capped { items: BTreeSet::new(), truncated: false }
    }

    fn insert(&mut self, item: T, limit: usize) {
        if self.items.len() >= limit {
            if self.items.last().is_some_and(|last| &item >= last) {
                self.truncated |= !self.items.contains(&item);
                return;
            }
            self.items.insert(item);
            if self.items.len() > limit {
                self.items.pop_last();
                self.truncated = true;
            }
        } else {
            self.items.insert(item);
        }
    }
}

/// The label sets selected, sorted, at most `limit`.
pub fn series(
    source: &dyn Source,
    selectors: &[VectorSelector],
    limit: usize,
    budget: &Budget,
) -> Result<Capped<Labels>, EvalError> {
    let mut out = Capped::new();
    for_each_selected(source, selectors, budget, |name, labels, le| {
        out.insert(label_set(name, labels, le), limit)
    })?;
    Ok(out)
}

/// The label names of the selected sets, sorted, at most `limit`.
pub fn names(
    source: &dyn Source,
    selectors: &[VectorSelector],
    limit: usize,
    budget: &Budget,
) -> Result<Capped<String>, EvalError> {
    let mut out = Capped::new();
    if selectors.is_empty() {
        budget.check("reading label names")?;
        // Every series has all of them; `peer` only the series that have one.
        if any_series(source)? {
            for k in ["__name__", "le"].into_iter().chain(SeriesLabels::NAMES) {
                out.insert(k.to_owned(), limit);
            }
            if !source.label_values("peer", 1)?.0.is_empty() {
                out.insert("peer".to_owned(), limit);
            }
        }
        return Ok(out);
    }
    for_each_selected(source, selectors, budget, |_, labels, le| {
        for k in ["__name__"].into_iter().chain(SeriesLabels::NAMES).chain(["peer"]) {
            if k == "__name__" || labels.get(k).is_some() {
                out.insert(k.to_owned(), limit);
            }
        }
        if le.is_some() {
            out.insert("le".to_owned(), limit);
        }
    })?;
    Ok(out)
}

/// The values of label `label` in the selected sets, sorted, at most `limit`.
pub fn values(
    source: &dyn Source,
    selectors: &[VectorSelector],
    label: &str,
    limit: usize,
    budget: &Budget,
) -> Result<Capped<String>, EvalError> {
    let mut out = Capped::new();
    if selectors.is_empty() {
        budget.check("reading label values")?;
        // Read off the index without looking at a series: the stored labels' values, or the
        // exposed names and `le` values when there is any series at all.
        let fixed: Vec<String> = match label {
            "__name__" => {
                let selfs = self_times_stored(source)?;
                let names =
                    promql::NAMES.iter().chain(selfs.then_some(&promql::SELF_NAMES).into_iter().flatten());
                names.map(|&n| n.to_owned()).collect()
            }
            "le" => le_values(),
            _ => {
                let (values, more) = source.label_values(label, limit)?;
                out.items.extend(values);
                out.truncated = more;
                return Ok(out);
            }
        };
        if any_series(source)? {
            for v in fixed {
                out.insert(v, limit);
            }
        }
        return Ok(out);
    }
    for_each_selected(source, selectors, budget, |name, labels, le| {
        let value = match label {
            "__name__" => Some(name),
            "le" => le,
            other => labels.get(other),
        };
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            if !out.items.contains(v) {
                out.insert(v.to_owned(), limit);
            }
        }
    })?;
    Ok(out)
}
