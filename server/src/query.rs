//! Reads over the store: selecting series by label, choosing a resolution for a time range, and
//! merging the windows of that range into one histogram per series.

pub mod exemplars;
pub mod labels;
pub mod promql;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tailscope_proto::histogram::Histogram;

use promql::EvalError;

use crate::series::SeriesLabels;
use crate::store::RetentionConfig;
use crate::store::{Resolution, Store, StoreError};

/// What one request may spend: a deadline, and a flag its handler sets when the client leaves.
#[derive(Debug, Clone)]
pub struct Budget {
    deadline: Instant,
    cancelled: Arc<AtomicBool>,
}

impl Budget {
    /// A budget ending at `deadline`.
    pub fn new(deadline: Instant) -> Budget {
        Budget { deadline, cancelled: Arc::new(AtomicBool::new(false)) }
    }

    /// A guard that cancels the work when dropped (hold it in the request's future: a client
    /// that leaves drops the future).
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.cancelled.clone())
    }

    /// Fails once the deadline has passed or the request was cancelled.
    pub fn check(&self, what: &'static str) -> Result<(), EvalError> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(EvalError::Execution(format!("the request was cancelled while {what}")));
        }
        if Instant::now() > self.deadline {
            return Err(EvalError::Timeout(what));
        }
        Ok(())
    }
}

/// Cancels a [`Budget`]'s work when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The most windows per series a range may be read at before a coarser resolution is used.
pub const MAX_WINDOWS_PER_SERIES: i64 = 2_000;

/// Errors of a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A parameter is missing or malformed.
    #[error("{0}")]
    BadData(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request ran out of time or was cancelled.
    #[error("{0}")]
    Limit(String),
}

/// Exact-match label filters; `None` matches every value.
#[derive(Debug, Clone, Default)]
pub struct SeriesFilter {
    /// `service`.
    pub service: Option<String>,
    /// `operation`.
    pub operation: Option<String>,
}

impl SeriesFilter {
    /// The filter as equality matchers, for the series index.
    pub fn matchers(&self) -> Vec<promql_parser::label::Matcher> {
        use promql_parser::label::{MatchOp, Matcher};
        [("service", &self.service), ("operation", &self.operation)]
            .into_iter()
            .filter_map(|(name, value)| Some(Matcher::new(MatchOp::Equal, name, value.as_deref()?)))
            .collect()
    }
}

/// The windows a range is read at: `[start, end)` widened to whole windows of `resolution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The resolution read.
    pub resolution: Resolution,
    /// First second covered.
    pub start: i64,
    /// End (exclusive) of the covered range.
    pub end: i64,
}

impl Plan {
    /// The finest resolution still retained at `start` that reads at most
    /// [`MAX_WINDOWS_PER_SERIES`] windows per series.
    pub fn for_range(start: i64, end: i64, now: i64, retention: &RetentionConfig) -> Plan {
        let mut chosen = Resolution::H1;
        for res in Resolution::ALL {
            let retained = start >= now - res.retention(retention);
            let windows = (end - start) / res.seconds();
            if retained && windows <= MAX_WINDOWS_PER_SERIES {
                chosen = res;
                break;
            }
        }
        let step = chosen.seconds();
        let aligned_end = (end + step - 1).div_euclid(step) * step;
        Plan { resolution: chosen, start: chosen.align(start), end: aligned_end }
    }
}

/// One series' merged histogram over a range.
#[derive(Debug)]
pub struct SeriesHistogram {
    /// The series' labels.
    pub labels: SeriesLabels,
    /// All its windows in the range, merged.
    pub histogram: Histogram,
}

/// Merges, per series passing `filter`, every window of `plan`, within `budget` (checked per
/// series). Series without data in the range are left out. Sorted by labels.
pub fn merged_series(
    store: &Store,
    filter: &SeriesFilter,
    plan: Plan,
    budget: &Budget,
) -> Result<Vec<SeriesHistogram>, QueryError> {
    let mut out = Vec::new();
    let mut series = store.index().select(&filter.matchers().iter().collect::<Vec<_>>(), usize::MAX);
    series.sort_by(|a, b| a.1.cmp(&b.1));
    for (id, labels) in series {
        budget.check("merging series").map_err(|e| QueryError::Limit(e.to_string()))?;
        let mut merged = Histogram::new(store.layout());
        store.for_each_window(plan.resolution, id, plan.start, plan.end, |_, h| merged.merge(&h))?;
        if !merged.is_empty() {
            out.push(SeriesHistogram { labels, histogram: merged });
        }
    }
    Ok(out)
}

/// Times are clamped to ±10¹² s (about 30,000 years either side of 1970): the same answer for
/// every time that can hold data, and no arithmetic on them can overflow.
pub const TIME_LIMIT_SECONDS: f64 = 1e12;

/// Parses a Prometheus-style time: Unix seconds (fractions allowed) or RFC 3339, clamped to
/// [`TIME_LIMIT_SECONDS`].
pub fn parse_time(name: &str, value: &str) -> Result<f64, QueryError> {
    if let Ok(t) = value.parse::<f64>() {
        if t.is_finite() {
            return Ok(t.clamp(-TIME_LIMIT_SECONDS, TIME_LIMIT_SECONDS));
        }
    }
    humantime::parse_rfc3339_weak(value)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64().min(TIME_LIMIT_SECONDS))
        .ok_or_else(|| {
            QueryError::BadData(format!(
                "invalid parameter \"{name}\": cannot parse {value:?} to a valid timestamp"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_prefers_the_finest_retained_resolution() {
        let r = RetentionConfig::default();
        let now = 1_800_000_000;
        let p = Plan::for_range(now - 3600, now, now, &r);
        assert_eq!(p.resolution, Resolution::S10);
        // A month is read from hours (10 s is not retained that long, and minutes are too many).
        let p = Plan::for_range(now - 30 * 86_400, now, now, &r);
        assert_eq!(p.resolution, Resolution::H1);
        // A day that ended before the 10-second retention is read from minutes; unaligned
        // ranges widen to whole windows.
        let (start, end) = (now - 3 * 86_400 + 7, now - 2 * 86_400 - 7);
        let p = Plan::for_range(start, end, now, &r);
        assert_eq!(p.resolution, Resolution::M1);
        assert_eq!((p.start % 60, p.end % 60), (0, 0));
        assert!(p.start <= start && p.start > start - 60);
        assert!(p.end >= end && p.end < end + 60);
    }

    #[test]
    fn parses_unix_and_rfc3339_times() {
        assert_eq!(parse_time("start", "1700000000.5").ok(), Some(1_700_000_000.5));
        assert_eq!(parse_time("start", "2023-11-14T22:13:20Z").ok(), Some(1_700_000_000.0));
        let e = parse_time("end", "yesterday").expect_err("bad");
        assert!(e.to_string().contains("\"end\""), "{e}");
    }
}
