//! Reads over the store: selecting series by label, choosing a resolution for a time range, and
//! merging the windows of that range into one histogram per series.

pub mod exemplars;
pub mod labels;
pub mod plan;
pub mod promql;
pub mod shared;
pub mod topology;

pub use plan::RangePlan;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tailscope_proto::histogram::Histogram;

use promql::EvalError;

use crate::series::SeriesLabels;
use crate::store::{Source, StoreError};

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
    /// `span_kind` (without it, a service's own work: see [`crate::series::Kind::is_outgoing`]).
    pub span_kind: Option<String>,
    /// `peer` (`""`: series without one).
    pub peer: Option<String>,
}

impl SeriesFilter {
    /// The filter as equality matchers, for the series index.
    pub fn matchers(&self) -> Vec<promql_parser::label::Matcher> {
        use promql_parser::label::{MatchOp, Matcher};
        [
            ("service", &self.service),
            ("operation", &self.operation),
            ("span_kind", &self.span_kind),
            ("peer", &self.peer),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some(Matcher::new(MatchOp::Equal, name, value.as_deref()?)))
        .collect()
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

/// Merges, per series passing `filter`, every window `plan` reads, within `budget` (checked per
/// series). Series without data in the range are left out. Sorted by labels.
pub fn merged_series(
    source: &dyn Source,
    filter: &SeriesFilter,
    plan: &RangePlan,
    budget: &Budget,
) -> Result<Vec<SeriesHistogram>, QueryError> {
    let mut out = Vec::new();
    let mut series = source.select(&filter.matchers().iter().collect::<Vec<_>>(), usize::MAX)?;
    series.sort_by(|a, b| a.1.cmp(&b.1));
    for (id, labels) in series {
        budget.check("merging series").map_err(|e| QueryError::Limit(e.to_string()))?;
        let mut merged = Histogram::new(source.layout());
        for &(res, lo, hi) in &plan.reads {
            source.windows(res, id, lo, hi, &mut |_, bytes| {
                Histogram::decode(bytes).map(|h| merged.merge(&h))
            })?;
        }
        if !merged.is_empty() {
            out.push(SeriesHistogram { labels, histogram: merged });
        }
    }
    Ok(out)
}

/// What a strong read (`X-Read-Consistency: strong`, as Mimir's) waits for before it is
/// answered. A cluster node's store applies the log behind the gateways' acknowledgements, so
/// its barrier waits until the store has written everything the log holds at the moment of
/// asking; a single node has none (it acknowledges a batch only once queries see it).
pub trait ReadBarrier: Send + Sync + std::fmt::Debug {
    /// Resolves once everything acknowledged before the call is visible to queries here, or
    /// names why it is not (a time-out, the log unreachable).
    fn wait(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

/// Where a request's reads come from: this node's store, or in a cluster each partition's
/// owner. Every request (a query, one evaluation of a rule group) opens its own [`Source`]: a
/// cluster's remembers, for the series it selected, which partition and node holds them.
pub trait Sources: Send + Sync + std::fmt::Debug {
    /// A source for one request.
    fn open(&self) -> Box<dyn Source + Send + Sync>;
}

impl Sources for crate::store::Store {
    fn open(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }
}

impl Sources for crate::store::MemoryStore {
    fn open(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }
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
    use crate::store::{Resolution, RetentionConfig};

    #[test]
    fn a_range_is_read_exactly_at_the_coarsest_resolution_that_fits() {
        let r = RetentionConfig::default();
        let now = 1_800_000_000;
        // An hour: whole minutes inside, 10-second edges.
        let p = RangePlan::new(now - 3600 - 25, now - 25, now, &r);
        assert_eq!(p.levels, [Resolution::S10, Resolution::M1]);
        assert_eq!((p.start, p.end), (now - 3600 - 20, now - 20));
        let seconds: i64 = p.reads.iter().map(|(_, lo, hi)| hi - lo).sum();
        assert_eq!(seconds, 3600);
        // A month: 10 s is not retained that long; hours inside, minutes at the edges.
        let p = RangePlan::new(now - 30 * 86_400 + 90, now, now, &r);
        assert_eq!(p.levels, [Resolution::M1, Resolution::H1]);
        assert_eq!(p.coarsest(), Resolution::H1);
        assert_eq!((p.start, p.end), (now - 30 * 86_400 + 120, now));
        assert!(p.reads.iter().all(|(res, lo, hi)| lo % res.seconds() == 0 && hi % res.seconds() == 0));
        let seconds: i64 = p.reads.iter().map(|(_, lo, hi)| hi - lo).sum();
        assert_eq!(seconds, p.end - p.start);
    }

    #[test]
    fn a_tail_range_counts_exactly_the_windows_it_covers() {
        use crate::series::{SeriesLabels, Status};
        use crate::store::MemoryStore;
        let now = 1_800_000_000;
        let mut mem = MemoryStore::default();
        let labels = SeriesLabels::new("a", "x", Status::Ok);
        // One span in each 10 s window of the last two hours.
        for t in (now - 7200..now).step_by(10) {
            mem.record(labels.clone(), t, 1_000_000, 1);
        }
        let budget = Budget::new(Instant::now() + std::time::Duration::from_secs(10));
        let filter = SeriesFilter::default();
        for (start, end) in [(now - 3600 - 25, now - 25), (now - 5000, now - 1234), (now - 7200, now)] {
            let plan = RangePlan::new(start, end, now, &RetentionConfig::default());
            let rows = merged_series(&mem, &filter, &plan, &budget).unwrap();
            let want = (plan.start..plan.end).step_by(10).count() as u64;
            assert_eq!(rows[0].histogram.count(), want, "[{start}, {end}) read as {plan:?}");
        }
    }

    #[test]
    fn parses_unix_and_rfc3339_times() {
        assert_eq!(parse_time("start", "1700000000.5").ok(), Some(1_700_000_000.5));
        assert_eq!(parse_time("start", "2023-11-14T22:13:20Z").ok(), Some(1_700_000_000.0));
        let e = parse_time("end", "yesterday").expect_err("bad");
        assert!(e.to_string().contains("\"end\""), "{e}");
    }
}
