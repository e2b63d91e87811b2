//! PromQL functions: `rate`/`increase` over the windows of a range, `histogram_quantile` from
//! merged histograms, `label_replace`/`label_join` on any of them. A new function is a match arm in [`Engine::call`] and its evaluation
//! here.

use promql_parser::parser::{Call, Expr, MatrixSelector};

use super::*;

impl Engine<'_> {
    pub(super) fn call(&self, call: &Call) -> Result<Value, EvalError> {
        let name = call.func.name;
        let args = &call.args.args;
        match name {
            "rate" | "increase" => {
                let Some(Expr::MatrixSelector(ms)) = args.first().map(|a| a.as_ref()) else {
                    return unsupported(format!(
                        "{name}() needs a range vector selector such as {COUNT}[5m]"
                    ));
                };
                self.range_function(name == "rate", ms)
            }
            "histogram_quantile" => {
                let (Some(phi), Some(hist)) = (args.first(), args.get(1)) else {
                    return unsupported("histogram_quantile() needs two arguments");
                };
                let phi = match self.eval(phi)? {
                    Value::Scalar(v) => v,
                    _ => return unsupported("histogram_quantile()'s first argument must be a scalar"),
                };
                match self.eval(hist)? {
                    Value::Hist(h) if h.kind.is_histogram() => self.quantiles(&phi, &h),
                    Value::Hist(h) if h.groups.is_empty() => Ok(Value::Vector(Vec::new())),
                    Value::Vector(v) if v.is_empty() => Ok(Value::Vector(v)),
                    _ => unsupported(format!(
                        "histogram_quantile() is computed from tailscope's histograms: its second argument must be rate() or increase() of {BUCKET}, optionally summed by (le, …)"
                    )),
                }
            }
            "histogram_count" | "histogram_sum" | "histogram_avg" => {
                let [hist] = args.as_slice() else {
                    return unsupported(format!("{name}() needs one argument"));
                };
                let h = self.histogram_argument(name, hist)?;
                self.per_histogram(&h, |_, acc, scale| match name {
                    "histogram_count" => count_per(acc, scale),
                    "histogram_sum" => seconds_per(acc, scale),
                    _ => acc.mean().map_or(f64::NAN, |m| m / 1e9),
                })
            }
            "histogram_fraction" => {
                let [lower, upper, hist] = args.as_slice() else {
                    return unsupported(
                        "histogram_fraction() needs three arguments: lower, upper, histogram",
                    );
                };
                let bound = |e| match self.eval(e)? {
                    Value::Scalar(v) => Ok(v),
                    _ => unsupported("histogram_fraction()'s bounds must be scalars"),
                };
                let (lower, upper) = (bound(lower)?, bound(upper)?);
                let h = self.histogram_argument(name, hist)?;
                let nanos = |s: f64| (s * 1e9).clamp(0.0, u64::MAX as f64) as u64;
                self.per_histogram(&h, |step, acc, _| {
                    let (lo, hi) = (lower[step], upper[step]);
                    if acc.count() == 0 || lo.is_nan() || hi.is_nan() {
                        return f64::NAN;
                    }
                    let at_most = |v: f64| {
                        if v < 0.0 {
                            0
                        } else if v.is_infinite() {
                            acc.count()
                        } else {
                            acc.count_at_most(nanos(v))
                        }
                    };
                    at_most(hi).saturating_sub(at_most(lo)) as f64 / acc.count() as f64
                })
            }
            "label_replace" => {
                let [v, dst, replacement, src, re] = args.as_slice() else {
                    return unsupported(
                        "label_replace() needs five arguments: vector, dst_label, replacement, src_label, regex",
                    );
                };
                let (dst, replacement, src) =
                    (self.string(name, dst)?, self.string(name, replacement)?, self.string(name, src)?);
                let re = self.string(name, re)?;
                let regex = regex::RegexBuilder::new(&format!("^(?:{re})$"))
                    .size_limit(MAX_REGEX_BYTES)
                    .dfa_size_limit(MAX_REGEX_BYTES)
                    .build()
                    .map_err(|e| {
                        EvalError::Unsupported(format!("invalid regular expression in label_replace(): {e}"))
                    })?;
                label_name(name, &dst)?;
                let value = self.eval(v)?;
                relabel(name, value, |labels| {
                    let from = labels.get(&src).map_or("", String::as_str);
                    let Some(caps) = regex.captures(from) else { return };
                    let mut to = String::new();
                    caps.expand(&replacement, &mut to);
                    set_label(labels, &dst, to);
                })
            }
            "label_join" => {
                let [v, dst, separator, sources @ ..] = args.as_slice() else {
                    return unsupported(
                        "label_join() needs at least three arguments: vector, dst_label, separator, src_label…",
                    );
                };
                let (dst, separator) = (self.string(name, dst)?, self.string(name, separator)?);
                label_name(name, &dst)?;
                let sources = sources.iter().map(|e| self.string(name, e)).collect::<Result<Vec<_>, _>>()?;
                let value = self.eval(v)?;
                relabel(name, value, |labels| {
                    let joined = sources
                        .iter()
                        .map(|s| labels.get(s).map_or("", String::as_str))
                        .collect::<Vec<_>>()
                        .join(&separator);
                    set_label(labels, &dst, joined);
                })
            }
            other => unsupported(format!("function {other}() is not supported")),
        }
    }

    /// A string argument of `name`.
    fn string(&self, name: &str, e: &Expr) -> Result<String, EvalError> {
        match self.eval(e)? {
            Value::Str(s) => Ok(s),
            _ => unsupported(format!("{name}()'s label and regex arguments must be strings")),
        }
    }

    /// The histogram argument of `name`: rate()/increase() of a histogram, possibly summed.
    fn histogram_argument(&self, name: &str, e: &Expr) -> Result<HistValue, EvalError> {
        match self.eval(e)? {
            Value::Hist(h) if h.kind.is_histogram() => Ok(h),
            Value::Hist(h) if h.groups.is_empty() => Ok(HistValue::none()),
            Value::Vector(v) if v.is_empty() => Ok(HistValue::none()),
            _ => unsupported(format!(
                "{name}() reads histograms: its argument must be {METRIC}, rate() or increase() of it (or of {BUCKET}), optionally summed"
            )),
        }
    }

    /// `f(step, histogram, per-second scale)` at every step of every group, as series without
    /// `__name__`.
    fn per_histogram(
        &self,
        h: &HistValue,
        f: impl FnMut(usize, &Histogram, f64) -> f64,
    ) -> Result<Value, EvalError> {
        let values = self.per_group(h, f)?;
        let out = h
            .groups
            .iter()
            .zip(values)
            .filter(|(_, values)| values.iter().any(Option::is_some))
            .map(|(g, values)| {
                let mut labels = g.labels.clone();
                labels.remove("__name__");
                Series { labels, values }
            })
            .collect();
        Ok(Value::Vector(out))
    }

    pub(super) fn range_function(&self, per_second: bool, ms: &MatrixSelector) -> Result<Value, EvalError> {
        let range = i64::try_from(ms.range.as_secs()).unwrap_or(i64::MAX);
        if range < 1 || ms.range.subsec_nanos() != 0 {
            return unsupported("range durations must be whole seconds of at least 1s");
        }
        let offset = offset_seconds(&ms.vs.offset);
        let sel = self.select(&ms.vs)?;
        self.windowed(sel, range, offset, per_second, false)
    }

    /// A selection read over `range` seconds at every step: its count and sum series, and its
    /// buckets as histograms (`per_second`: divided by the range, as `rate()`); `named` keeps
    /// each series' name (a plain selector) instead of dropping it (a function's result).
    pub(super) fn windowed(
        &self,
        sel: Selection,
        range: i64,
        offset: i64,
        per_second: bool,
        named: bool,
    ) -> Result<Value, EvalError> {
        let mut out = Vec::new();
        let [bucket, count, sum, native] = sel.names;
        let mut groups = sel.groups;
        let name = |labels: &mut Labels, i: usize| {
            if named {
                labels.insert("__name__".to_owned(), sel.called[i].to_owned());
            }
        };
        if (count != sum) && !bucket && !native {
            // The count or the sum alone stays histograms until it is read as numbers, so a
            // `sum` around it merges its groups' members first.
            let (i, kind) = if count { (1, HistKind::Count) } else { (2, HistKind::Sum) };
            for g in &mut groups {
                name(&mut g.labels, i);
            }
            return Ok(Value::Hist(HistValue::without_le(groups, range, offset, per_second, kind)));
        }
        if count || sum {
            self.read_ahead(&groups, range, offset);
            let scale = scale(per_second, range);
            for group in &groups {
                let mut counts = vec![None; self.steps.len()];
                let mut sums = vec![None; self.steps.len()];
                self.slide(group, range, offset, |i, acc| {
                    counts[i] = Some(count_per(acc, scale));
                    sums[i] = Some(seconds_per(acc, scale));
                })?;
                for (i, wanted, values) in [(1, count, counts), (2, sum, sums)] {
                    if wanted {
                        let mut labels = group.labels.clone();
                        name(&mut labels, i);
                        out.push(Series { labels, values });
                    }
                }
            }
        }
        for g in &mut groups {
            name(&mut g.labels, 0);
        }
        if native {
            return Ok(Value::Hist(HistValue::without_le(
                groups,
                range,
                offset,
                per_second,
                HistKind::Native,
            )));
        }
        let hist = HistValue {
            groups,
            le: sel.le,
            le_kept: true,
            range,
            offset,
            per_second,
            kind: HistKind::Buckets,
        };
        if bucket && !count && !sum {
            return Ok(Value::Hist(hist));
        }
        if bucket {
            out.extend(self.materialize(Value::Hist(hist))?);
        }
        Ok(Value::Vector(out))
    }

    pub(super) fn quantiles(&self, phi: &[f64], h: &HistValue) -> Result<Value, EvalError> {
        let mut out = Vec::with_capacity(h.groups.len());
        self.read_ahead(&h.groups, h.range, h.offset);
        for g in &h.groups {
            let mut values = vec![None; self.steps.len()];
            self.slide(g, h.range, h.offset, |i, acc| {
                let q = phi[i];
                values[i] = Some(if q.is_nan() {
                    f64::NAN
                } else if q < 0.0 {
                    f64::NEG_INFINITY
                } else if q > 1.0 {
                    f64::INFINITY
                } else {
                    acc.quantile(q).map_or(f64::NAN, |ns| ns as f64 / 1e9)
                });
            })?;
            if values.iter().any(Option::is_some) {
                out.push(Series { labels: g.labels.clone(), values });
            }
        }
        Ok(Value::Vector(out))
    }
}

/// The most a `label_replace()` regex may compile to, as for alert matchers.
const MAX_REGEX_BYTES: usize = crate::alerting::matchers::MAX_REGEX_BYTES;

/// Refuses a label name Prometheus would not take.
fn label_name(function: &str, name: &str) -> Result<(), EvalError> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        unsupported(format!("invalid label name {name:?} in {function}()"))
    }
}

/// Sets a label; an empty value removes it, as in Prometheus.
fn set_label(labels: &mut Labels, name: &str, value: String) {
    if value.is_empty() {
        labels.remove(name);
    } else {
        labels.insert(name.to_owned(), value);
    }
}

/// `f` applied to the labels of every series of `value` — histograms stay histograms, so
/// `histogram_quantile()` reads through `label_replace()` — refusing a result in which two
/// series have the same labels, as Prometheus does.
fn relabel(function: &str, value: Value, f: impl Fn(&mut Labels)) -> Result<Value, EvalError> {
    fn distinct<'a>(function: &str, mut all: impl Iterator<Item = &'a Labels>) -> Result<(), EvalError> {
        let mut seen = std::collections::BTreeSet::new();
        match all.find(|l| !seen.insert(*l)) {
            Some(dup) => unsupported(format!(
                "{function}(): vector cannot contain metrics with the same labelset ({})",
                dup.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(", ")
            )),
            None => Ok(()),
        }
    }
    match value {
        Value::Vector(mut series) => {
            series.iter_mut().for_each(|s| f(&mut s.labels));
            distinct(function, series.iter().map(|s| &s.labels))?;
            Ok(Value::Vector(series))
        }
        Value::Hist(mut h) => {
            h.groups.iter_mut().for_each(|g| f(&mut g.labels));
            distinct(function, h.groups.iter().map(|g| &g.labels))?;
            Ok(Value::Hist(h))
        }
        Value::Native(mut series) => {
            series.iter_mut().for_each(|s| f(&mut s.labels));
            distinct(function, series.iter().map(|s| &s.labels))?;
            Ok(Value::Native(series))
        }
        Value::Scalar(_) | Value::Str(_) => {
            unsupported(format!("{function}()'s first argument must be a vector"))
        }
    }
}
