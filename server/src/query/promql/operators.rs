//! PromQL operators: aggregations (`sum`, `max`, … `by`/`without`), binary arithmetic and
//! comparison with vector matching, and the set operators `and`, `or`, `unless`.

use promql_parser::parser::{AggregateExpr, BinaryExpr, LabelModifier, VectorMatchCardinality};

use super::*;

impl Engine<'_> {
    pub(super) fn aggregate(&self, agg: &AggregateExpr) -> Result<Value, EvalError> {
        let op = agg.op.to_string();
        let inner = self.eval(&agg.expr)?;
        let keep_le = match &agg.modifier {
            Some(LabelModifier::Include(l)) => l.labels.iter().any(|x| x == "le"),
            Some(LabelModifier::Exclude(l)) => !l.labels.iter().any(|x| x == "le"),
            None => false,
        };
        if let (Value::Hist(h), "sum") = (&inner, op.as_str()) {
            // Summing bucket series keeps them histograms: merge the groups' members.
            let mut merged: BTreeMap<Labels, Vec<u64>> = BTreeMap::new();
            for g in &h.groups {
                let key = group_labels(&g.labels, agg.modifier.as_ref());
                merged.entry(key).or_default().extend(&g.members);
            }
            let Value::Hist(h) = inner else { unreachable!("matched above") };
            let groups = merged.into_iter().map(|(labels, members)| HistGroup { labels, members }).collect();
            return Ok(Value::Hist(HistValue { groups, le_kept: h.le_kept && keep_le, ..h }));
        }
        let series = self.materialize(inner)?;
        let n = self.steps.len();
        match op.as_str() {
            "topk" | "bottomk" => {
                let k = match agg.param.as_deref().map(|p| self.eval(p)).transpose()? {
                    Some(Value::Scalar(v)) => v,
                    _ => return unsupported(format!("{op}() needs a scalar parameter")),
                };
                let mut groups: BTreeMap<Labels, Vec<usize>> = BTreeMap::new();
                for (i, s) in series.iter().enumerate() {
                    groups.entry(group_labels(&s.labels, agg.modifier.as_ref())).or_default().push(i);
                }
                let mut out: Vec<Series> = series
                    .iter()
                    .map(|s| Series { labels: s.labels.clone(), values: vec![None; n] })
                    .collect();
                for members in groups.values() {
                    for (step, &kk) in k.iter().enumerate() {
                        if kk.is_nan() || kk < 1.0 {
                            continue;
                        }
                        let mut present: Vec<(usize, f64)> =
                            members.iter().filter_map(|&i| series[i].values[step].map(|v| (i, v))).collect();
                        present.sort_by(|a, b| {
                            let o = a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal);
                            if op == "topk" {
                                o.reverse()
                            } else {
                                o
                            }
                        });
                        for &(i, v) in present.iter().take(kk as usize) {
                            out[i].values[step] = Some(v);
                        }
                    }
                }
                out.retain(|s| s.values.iter().any(Option::is_some));
                Ok(Value::Vector(out))
            }
            "sum" | "avg" | "min" | "max" | "count" | "group" => {
                if agg.param.is_some() {
                    return unsupported(format!("{op}() takes no parameter"));
                }
                let mut groups: BTreeMap<Labels, Vec<usize>> = BTreeMap::new();
                for (i, s) in series.iter().enumerate() {
                    groups.entry(group_labels(&s.labels, agg.modifier.as_ref())).or_default().push(i);
                }
                let mut out = Vec::with_capacity(groups.len());
                for (labels, members) in groups {
                    let values = (0..n)
                        .map(|step| {
                            let vals: Vec<f64> =
                                members.iter().filter_map(|&i| series[i].values[step]).collect();
                            if vals.is_empty() {
                                return None;
                            }
                            Some(match op.as_str() {
                                "sum" => vals.iter().sum(),
                                "avg" => vals.iter().sum::<f64>() / vals.len() as f64,
                                "min" => vals.iter().copied().fold(f64::INFINITY, f64::min),
                                "max" => vals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                                "group" => 1.0,
                                _ => vals.len() as f64,
                            })
                        })
                        .collect();
                    out.push(Series { labels, values });
                }
                out.retain(|s| s.values.iter().any(Option::is_some));
                Ok(Value::Vector(out))
            }
            other => unsupported(format!("aggregation {other}() is not supported")),
        }
    }

    pub(super) fn binary(&self, bin: &BinaryExpr) -> Result<Value, EvalError> {
        let op = bin.op.to_string();
        if bin.op.is_set_operator() {
            return self.set_operation(&op, bin);
        }
        let Some(f) = arithmetic(&op) else {
            return unsupported(format!("binary operator {op} is not supported"));
        };
        let comparison = bin.op.is_comparison_operator();
        let return_bool = bin.modifier.as_ref().is_some_and(|m| m.return_bool);
        let lhs = self.eval(&bin.lhs)?;
        let rhs = self.eval(&bin.rhs)?;
        let apply = |a: f64, b: f64, keep: f64| -> Option<f64> {
            let r = f(a, b);
            if !comparison || return_bool {
                Some(r)
            } else if r == 1.0 {
                Some(keep)
            } else {
                None
            }
        };
        let scalar_vector = |k: Vec<f64>, other: Value, scalar_left: bool| {
            let mut series = self.materialize(other)?;
            for s in &mut series {
                if !comparison || return_bool {
                    s.labels.remove("__name__");
                }
                for (i, v) in s.values.iter_mut().enumerate() {
                    // A filtering comparison keeps the vector's own value.
                    *v = v.and_then(|y| if scalar_left { apply(k[i], y, y) } else { apply(y, k[i], y) });
                }
            }
            Ok(Value::Vector(series))
        };
        match (lhs, rhs) {
            (Value::Scalar(a), Value::Scalar(b)) => {
                if comparison && !return_bool {
                    return unsupported("comparisons between scalars must use the bool modifier");
                }
                Ok(Value::Scalar(a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect()))
            }
            (Value::Str(_), _) | (_, Value::Str(_)) => {
                unsupported("binary operators on strings are not supported")
            }
            (Value::Scalar(k), other) => scalar_vector(k, other, true),
            (other, Value::Scalar(k)) => scalar_vector(k, other, false),
            (l, r) => {
                let modifier = bin.modifier.as_ref();
                if modifier.is_some_and(|m| m.card != VectorMatchCardinality::OneToOne) {
                    return unsupported("group_left and group_right are not supported");
                }
                let matching = modifier.and_then(|m| m.matching.as_ref());
                let (l, r) = (self.materialize(l)?, self.materialize(r)?);
                let mut right: BTreeMap<Labels, &Series> = BTreeMap::new();
                for s in &r {
                    if right.insert(signature(&s.labels, matching), s).is_some() {
                        return Err(EvalError::Execution(
                            "found duplicate series for the match group on the right hand-side of the operation; many-to-many matching not allowed: matching labels must be unique on one side".into(),
                        ));
                    }
                }
                let mut seen = std::collections::BTreeSet::new();
                let mut out = Vec::new();
                for s in &l {
                    let sig = signature(&s.labels, matching);
                    let Some(other) = right.get(&sig) else { continue };
                    if !seen.insert(sig) {
                        return Err(EvalError::Execution(
                            "found duplicate series for the match group on the left hand-side of the operation; many-to-many matching not allowed: matching labels must be unique on one side".into(),
                        ));
                    }
                    let values = s
                        .values
                        .iter()
                        .zip(&other.values)
                        .map(|(a, b)| match (a, b) {
                            (Some(x), Some(y)) => apply(*x, *y, *x),
                            _ => None,
                        })
                        .collect();
                    let mut labels = s.labels.clone();
                    if !comparison || return_bool {
                        labels.remove("__name__");
                    }
                    match matching {
                        Some(LabelModifier::Include(on)) => labels.retain(|k, _| on.labels.contains(k)),
                        Some(LabelModifier::Exclude(ign)) => labels.retain(|k, _| !ign.labels.contains(k)),
                        None => {}
                    }
                    out.push(Series { labels, values });
                }
                out.retain(|s| s.values.iter().any(Option::is_some));
                Ok(Value::Vector(out))
            }
        }
    }
}

impl Engine<'_> {
    /// `and`, `or`, `unless`: many-to-many, step by step, matched on all labels but the name
    /// (or on/ignoring).
    pub(super) fn set_operation(&self, op: &str, bin: &BinaryExpr) -> Result<Value, EvalError> {
        let matching = bin.modifier.as_ref().and_then(|m| m.matching.as_ref());
        let (l, r) = (self.eval(&bin.lhs)?, self.eval(&bin.rhs)?);
        if [&l, &r].iter().any(|v| matches!(v, Value::Scalar(_) | Value::Str(_))) {
            return unsupported(format!("set operator {op} not allowed in binary scalar expression"));
        }
        let (l, r) = (self.materialize(l)?, self.materialize(r)?);
        // Per match signature, the steps at which that side has a sample.
        let presence = |side: &[Series]| {
            let mut p: BTreeMap<Labels, Vec<bool>> = BTreeMap::new();
            for s in side {
                let steps =
                    p.entry(signature(&s.labels, matching)).or_insert_with(|| vec![false; s.values.len()]);
                for (present, v) in steps.iter_mut().zip(&s.values) {
                    *present |= v.is_some();
                }
            }
            p
        };
        let mask = |mut s: Series, p: Option<&Vec<bool>>, keep_where_present: bool| {
            for (i, v) in s.values.iter_mut().enumerate() {
                let present = p.is_some_and(|p| p[i]);
                if present != keep_where_present {
                    *v = None;
                }
            }
            s.values.iter().any(Option::is_some).then_some(s)
        };
        let out: Vec<Series> = match op {
            // The left side where the right has a sample (and), or where it has none (unless).
            "and" | "unless" => {
                let rp = presence(&r);
                let keep_where_present = op == "and";
                l.into_iter()
                    .filter_map(|s| {
                        let p = rp.get(&signature(&s.labels, matching));
                        mask(s, p, keep_where_present)
                    })
                    .collect()
            }
            _ => {
                let lp = presence(&l);
                let extra: Vec<Series> = r
                    .into_iter()
                    .filter_map(|s| {
                        let p = lp.get(&signature(&s.labels, matching));
                        mask(s, p, false)
                    })
                    .collect();
                l.into_iter().chain(extra).collect()
            }
        };
        Ok(Value::Vector(out))
    }
}

/// The labels a series is grouped by under `by (…)` / `without (…)`.
pub(super) fn group_labels(labels: &Labels, modifier: Option<&LabelModifier>) -> Labels {
    match modifier {
        None => Labels::new(),
        Some(LabelModifier::Include(by)) => labels
            .iter()
            .filter(|(k, _)| by.labels.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(LabelModifier::Exclude(without)) => labels
            .iter()
            .filter(|(k, _)| *k != "__name__" && !without.labels.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The labels two series are matched on in a vector-vector operation.
pub(super) fn signature(labels: &Labels, matching: Option<&LabelModifier>) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| match matching {
            Some(LabelModifier::Include(on)) => on.labels.contains(k),
            Some(LabelModifier::Exclude(ign)) => *k != "__name__" && !ign.labels.contains(k),
            None => *k != "__name__",
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The function of an arithmetic or comparison operator; comparisons yield 1 or 0.
pub(super) fn arithmetic(op: &str) -> Option<fn(f64, f64) -> f64> {
    Some(match op {
        "+" => |a, b| a + b,
        "-" => |a, b| a - b,
        "*" => |a, b| a * b,
        "/" => |a, b| a / b,
        "%" => |a, b| a % b,
        "^" => f64::powf,
        "==" => |a, c| if a == c { 1.0 } else { 0.0 },
        "!=" => |a, c| if a != c { 1.0 } else { 0.0 },
        ">" => |a, c| if a > c { 1.0 } else { 0.0 },
        "<" => |a, c| if a < c { 1.0 } else { 0.0 },
        ">=" => |a, c| if a >= c { 1.0 } else { 0.0 },
        "<=" => |a, c| if a <= c { 1.0 } else { 0.0 },
        _ => return None,
    })
}
