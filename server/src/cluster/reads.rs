//! Reads across the cluster: each partition from one caught-up owner, merged.
//!
//! Every store node answers reads of the partitions it owns and has caught up with on the
//! NATS subject `<name>.read.<node_id>` ([`serve`]), from its own store, keeping only the
//! series of the asked partitions (what it wrote of partitions it handed on stays on disk
//! but is never answered). A node's [`ClusterSources`] hands each request a
//! [`ClusterSource`]: the query engine's [`Source`] over the whole cluster. It selects series
//! partition by partition from the first caught-up owner (this node's store first, then the
//! others in rendezvous order; an owner that is down, busy or still catching up passes the
//! partition to the next), remembers which node answered for which partition, and reads each
//! series' windows from that node — a group's windows merged there ([`MergedOp`]), and a
//! query's groups asked of each node in one read ([`Source::read_ahead`]: all of an instant
//! query's, as many of a range query's as [`AHEAD_WINDOWS`] allows), so what crosses the
//! network is about one histogram per group and interval or window start. Histograms merge
//! exactly, so the engine's answers are the same as a single node's.
//!
//! The engine is synchronous (it runs on blocking threads); remote reads run on a runtime
//! and NATS connection of their own, so a read never waits on the server's own workers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use promql_parser::label::{MatchOp, Matcher};
use prost::Message;
use tokio::sync::{watch, Semaphore};

use super::assign::{Assignment, Replicas};
use crate::series::{self, SeriesLabels};
use tailscope_proto::histogram::{Checked, Histogram, Layout};

use crate::query::promql::MAX_QUERY_BYTES;
use crate::store::{merge_values, merged_at, Exemplar, Resolution, Source, Store, StoreError, WindowFn};
use crate::telemetry::{Metrics, Outcome};

/// How long one remote read may take before its owner counts as down for the request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads a node answers at once; more are refused (the asker tries another owner).
const CONCURRENT_READS: usize = 16;
/// Room in a reply beyond what it carries.
const REPLY_ENVELOPE: usize = 4096;
/// The longest regular expression a read may carry (the asker compiled it already).
const MAX_REGEX_BYTES: usize = 64 << 10;

// ---- The protocol (protobuf, on NATS request and reply) --------------------------------

/// A read of some partitions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadRequest {
    /// The partitions to answer for.
    #[prost(uint32, repeated, tag = "1")]
    pub partitions: Vec<u32>,
    /// What to read.
    #[prost(oneof = "Op", tags = "2, 3, 4, 5, 6, 7, 8")]
    pub op: Option<Op>,
}

/// What a read asks for.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Op {
    /// Series matching every matcher.
    #[prost(message, tag = "2")]
    Select(SelectOp),
    /// A label's values.
    #[prost(message, tag = "3")]
    LabelValues(LabelValuesOp),
    /// One series' windows.
    #[prost(message, tag = "4")]
    Windows(WindowsOp),
    /// One series' exemplars.
    #[prost(message, tag = "5")]
    Exemplars(ExemplarsOp),
    /// A strong read's barrier over the partitions.
    #[prost(message, tag = "6")]
    Barrier(BarrierOp),
    /// Some series' windows merged on the answering node.
    #[prost(message, tag = "7")]
    Merged(MergedOp),
    /// A page of a copy of one partition ([`super::copy`]).
    #[prost(message, tag = "8")]
    Copy(CopyOp),
}

/// A page of a copy of the request's one partition: of copy `session` (0: start one) from
/// family `family` after key `after` (when `resume`); `end` ends the session instead.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CopyOp {
    /// The copy (0: a new one).
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// The family the page starts in.
    #[prost(uint32, tag = "2")]
    pub family: u32,
    /// Whether `after` is set.
    #[prost(bool, tag = "3")]
    pub resume: bool,
    /// The last key of the previous page.
    #[prost(bytes = "vec", tag = "4")]
    pub after: Vec<u8>,
    /// Ends the copy: its checkpoint is dropped.
    #[prost(bool, tag = "5")]
    pub end: bool,
}

/// A record of a copy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CopiedMsg {
    /// Its family, in the copy's numbering.
    #[prost(uint32, tag = "1")]
    pub family: u32,
    /// Its key.
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// Its value.
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
}

/// Series matching every matcher, by id, after `after` (when `resume`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SelectOp {
    /// The matchers.
    #[prost(message, repeated, tag = "1")]
    pub matchers: Vec<MatcherMsg>,
    /// At most this many.
    #[prost(uint64, tag = "2")]
    pub at_most: u64,
    /// Whether `after` is set (a page after the first).
    #[prost(bool, tag = "3")]
    pub resume: bool,
    /// The last id of the previous page.
    #[prost(uint64, tag = "4")]
    pub after: u64,
}

/// A label matcher: `op` 0 `=`, 1 `!=`, 2 `=~`, 3 `!~` (`value`: the anchored expression).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MatcherMsg {
    /// The operator.
    #[prost(uint32, tag = "1")]
    pub op: u32,
    /// The label.
    #[prost(string, tag = "2")]
    pub name: String,
    /// The value or expression.
    #[prost(string, tag = "3")]
    pub value: String,
}

/// A label's distinct values after `after` (empty: from the first).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelValuesOp {
    /// The label.
    #[prost(string, tag = "1")]
    pub label: String,
    /// At most this many.
    #[prost(uint64, tag = "2")]
    pub limit: u64,
    /// The last value of the previous page.
    #[prost(string, tag = "3")]
    pub after: String,
}

/// Some series' windows at a resolution in `[start, end)` intervals, series by series.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WindowsOp {
    /// The resolution's width in seconds.
    #[prost(int64, tag = "1")]
    pub resolution_seconds: i64,
    /// The series, in the order they are answered.
    #[prost(uint64, repeated, tag = "2")]
    pub series: Vec<u64>,
    /// Starts and ends, alternating: sorted, disjoint intervals.
    #[prost(int64, repeated, tag = "3")]
    pub bounds: Vec<i64>,
    /// Whether the first series is read only from `first_from` (a page after the first).
    #[prost(bool, tag = "4")]
    pub resume: bool,
    /// Where the first series' windows resume.
    #[prost(int64, tag = "5")]
    pub first_from: i64,
}

/// Groups of series, each group's windows at a resolution in `[start, end)` intervals merged
/// per start — or, when `whole`, per interval (given at the interval's start) — group by group
/// in start order (a window's `series` is its group's index).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MergedOp {
    /// The resolution's width in seconds.
    #[prost(int64, tag = "1")]
    pub resolution_seconds: i64,
    /// The groups.
    #[prost(message, repeated, tag = "2")]
    pub groups: Vec<SeriesGroup>,
    /// Starts and ends, alternating: sorted, disjoint intervals.
    #[prost(int64, repeated, tag = "3")]
    pub bounds: Vec<i64>,
    /// Merge whole intervals rather than each start.
    #[prost(bool, tag = "4")]
    pub whole: bool,
    /// Whether only starts from `first_from` are asked (a page after the first).
    #[prost(bool, tag = "5")]
    pub resume: bool,
    /// Where the merged windows of `first_group` resume.
    #[prost(int64, tag = "6")]
    pub first_from: i64,
    /// The group a page after the first resumes with.
    #[prost(uint32, tag = "7")]
    pub first_group: u32,
}

/// Series whose windows are merged together.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SeriesGroup {
    /// The series.
    #[prost(uint64, repeated, tag = "1")]
    pub series: Vec<u64>,
}

/// A series' exemplars in windows starting in `[start, end)`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExemplarsOp {
    /// The series.
    #[prost(uint64, tag = "1")]
    pub series: u64,
    /// From (seconds).
    #[prost(int64, tag = "2")]
    pub start: i64,
    /// To (seconds, exclusive).
    #[prost(int64, tag = "3")]
    pub end: i64,
}

/// Wait until this node's store has written every message the partitions' logs hold now.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BarrierOp {}

/// A node's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadReply {
    /// Why it could not answer (empty: it did).
    #[prost(string, tag = "1")]
    pub error: String,
    /// Asked partitions it does not hold caught up: ask another owner.
    #[prost(uint32, repeated, tag = "2")]
    pub not_caught_up: Vec<u32>,
    /// Selected series.
    #[prost(message, repeated, tag = "3")]
    pub series: Vec<SeriesMsg>,
    /// Label values.
    #[prost(string, repeated, tag = "4")]
    pub values: Vec<String>,
    /// Windows.
    #[prost(message, repeated, tag = "5")]
    pub windows: Vec<WindowMsg>,
    /// Exemplars.
    #[prost(message, repeated, tag = "6")]
    pub exemplars: Vec<ExemplarMsg>,
    /// Whether more follows (ask again from where this page ended).
    #[prost(bool, tag = "7")]
    pub truncated: bool,
    /// Label values: whether there were more than the limit.
    #[prost(bool, tag = "8")]
    pub more: bool,
    /// Windows and exemplars: the start to ask from for the rest.
    #[prost(int64, tag = "9")]
    pub resume_at: i64,
    /// Windows: the series the rest starts with.
    #[prost(uint64, tag = "10")]
    pub resume_series: u64,
    /// A copy: its records.
    #[prost(message, repeated, tag = "11")]
    pub copied: Vec<CopiedMsg>,
    /// A copy: its session, to ask the next page of.
    #[prost(uint64, tag = "12")]
    pub session: u64,
    /// A copy: the log position it holds the partition at (stream sequence).
    #[prost(uint64, tag = "13")]
    pub position_seq: u64,
    /// A copy: the records of message `position_seq` it holds.
    #[prost(uint32, tag = "14")]
    pub position_records: u32,
    /// A copy: the family the next page starts in.
    #[prost(uint32, tag = "15")]
    pub resume_family: u32,
    /// A copy: the key the next page starts after (empty: the family's start).
    #[prost(bytes = "vec", tag = "16")]
    pub resume_after: Vec<u8>,
    /// A copy refused for now: the node gives as many as it gives at once (ask again later).
    #[prost(bool, tag = "17")]
    pub busy: bool,
}

/// A series.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SeriesMsg {
    /// Its id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its labels, as the store encodes them.
    #[prost(bytes = "vec", tag = "2")]
    pub labels: Vec<u8>,
}

/// A window of a series.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WindowMsg {
    /// The series.
    #[prost(uint64, tag = "3")]
    pub series: u64,
    /// Its start (seconds).
    #[prost(int64, tag = "1")]
    pub start: i64,
    /// Its encoded histogram.
    #[prost(bytes = "vec", tag = "2")]
    pub histogram: Vec<u8>,
}

/// An exemplar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExemplarMsg {
    /// Its window's start.
    #[prost(int64, tag = "1")]
    pub window_start: i64,
    /// Trace id, high half.
    #[prost(fixed64, tag = "2")]
    pub trace_id_high: u64,
    /// Trace id, low half.
    #[prost(fixed64, tag = "3")]
    pub trace_id_low: u64,
    /// Span id.
    #[prost(fixed64, tag = "4")]
    pub span_id: u64,
    /// Span start (Unix nanoseconds).
    #[prost(int64, tag = "5")]
    pub start_unix_nanos: i64,
    /// Span duration (nanoseconds).
    #[prost(int64, tag = "6")]
    pub duration_nanos: i64,
    /// What it stood for when sampled.
    #[prost(double, tag = "7")]
    pub adjusted_count: f64,
}

/// The subject node `node` of cluster `name` answers reads on.
pub fn subject(name: &str, node: &str) -> String {
    format!("{name}.read.{node}")
}

fn matcher_msg(m: &Matcher) -> MatcherMsg {
    let (op, value) = match &m.op {
        MatchOp::Equal => (0, m.value.clone()),
        MatchOp::NotEqual => (1, m.value.clone()),
        MatchOp::Re(r) => (2, r.as_str().to_owned()),
        MatchOp::NotRe(r) => (3, r.as_str().to_owned()),
    };
    MatcherMsg { op, name: m.name.clone(), value }
}

fn matcher(m: &MatcherMsg) -> Result<Matcher, String> {
    let re = || {
        regex::RegexBuilder::new(&m.value)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("matcher on {:?}: {e}", m.name))
    };
    if m.value.len() > MAX_REGEX_BYTES {
        return Err(format!("matcher on {:?}: longer than {MAX_REGEX_BYTES} bytes", m.name));
    }
    let op = match m.op {
        0 => MatchOp::Equal,
        1 => MatchOp::NotEqual,
        2 => MatchOp::Re(re()?),
        3 => MatchOp::NotRe(re()?),
        other => return Err(format!("matcher on {:?}: unknown operator {other}", m.name)),
    };
    Ok(Matcher { op, name: m.name.clone(), value: m.value.clone() })
}

fn resolution(seconds: i64) -> Result<Resolution, String> {
    Resolution::ALL
        .into_iter()
        .find(|r| r.seconds() == seconds)
        .ok_or_else(|| format!("no {seconds}-second resolution"))
}

/// The partition a series lives in: its (service, operation) hash among `partitions`, as
/// the gateway routes it.
pub fn partition_of(labels: &SeriesLabels, partitions: u32) -> u32 {
    series::partition(series::group_hash(&labels.service, &labels.operation), partitions as usize) as u32
}

// ---- Answering -------------------------------------------------------------------------

/// Answers `request` from `store` for the partitions of it in `ready` (the rest are named
/// not caught up), in at most `budget` bytes (the rest is named as what to ask next).
/// Barriers are not answered here (see [`serve`]).
pub fn answer(
    store: &Store,
    partitions: u32,
    ready: &dyn Fn(u32) -> bool,
    request: ReadRequest,
    budget: usize,
) -> ReadReply {
    let mut reply = ReadReply::default();
    let (held, missing): (Vec<u32>, Vec<u32>) = request.partitions.iter().partition(|&&p| ready(p));
    reply.not_caught_up = missing;
    let held: HashSet<u32> = held.into_iter().collect();
    let result = match request.op {
        None => Err(NO_OPERATION.to_owned()),
        Some(Op::Barrier(_)) => Err("a barrier is not a read".to_owned()),
        Some(Op::Copy(_)) => Err("a copy is not a read".to_owned()),
        Some(_) if held.is_empty() => Ok(()),
        Some(Op::Select(op)) => select(store, partitions, &held, op, budget, &mut reply),
        Some(Op::LabelValues(op)) => label_values(store, op, budget, &mut reply),
        Some(Op::Windows(op)) => windows(store, op, budget, &mut reply),
        Some(Op::Exemplars(op)) => exemplars(store, op, budget, &mut reply),
        Some(Op::Merged(op)) => merged(store, op, budget, &mut reply),
    };
    if let Err(e) = result {
        reply = ReadReply { error: e, ..ReadReply::default() };
    }
    reply
}

fn select(
    store: &Store,
    partitions: u32,
    held: &HashSet<u32>,
    op: SelectOp,
    budget: usize,
    reply: &mut ReadReply,
) -> Result<(), String> {
    let matchers = op.matchers.iter().map(matcher).collect::<Result<Vec<_>, _>>()?;
    if op.at_most == 0 {
        // Asked only which partitions are held caught up (a drain).
        return Ok(());
    }
    let refs: Vec<&Matcher> = matchers.iter().collect();
    let mut found = store.select(&refs, usize::MAX).map_err(|e| e.to_string())?;
    found.retain(|(id, l)| held.contains(&partition_of(l, partitions)) && (!op.resume || *id > op.after));
    found.sort_unstable_by_key(|(id, _)| *id);
    found.truncate(usize::try_from(op.at_most).unwrap_or(usize::MAX));
    let mut used = 0;
    for (id, labels) in found {
        let labels = labels.encode();
        used += labels.len() + 16;
        if used > budget && !reply.series.is_empty() {
            reply.truncated = true;
            break;
        }
        reply.series.push(SeriesMsg { id, labels });
    }
    Ok(())
}

fn label_values(
    store: &Store,
    op: LabelValuesOp,
    budget: usize,
    reply: &mut ReadReply,
) -> Result<(), String> {
    // Every value, then the page after `after`: a label has few values next to its series.
    let (values, more) = store.label_values(&op.label, usize::MAX).map_err(|e| e.to_string())?;
    let limit = usize::try_from(op.limit).unwrap_or(usize::MAX);
    let mut used = 0;
    let after: Vec<String> = values.into_iter().filter(|v| op.after.is_empty() || *v > op.after).collect();
    reply.more = more || after.len() > limit;
    for v in after.into_iter().take(limit) {
        used += v.len() + 8;
        if used > budget && !reply.values.is_empty() {
            reply.truncated = true;
            break;
        }
        reply.values.push(v);
    }
    Ok(())
}

fn windows(store: &Store, op: WindowsOp, budget: usize, reply: &mut ReadReply) -> Result<(), String> {
    let res = resolution(op.resolution_seconds)?;
    let intervals: Vec<(i64, i64)> = op.bounds.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    let mut used = 0;
    for (i, &series) in op.series.iter().enumerate() {
        let clipped: Vec<(i64, i64)> = if i == 0 && op.resume {
            intervals.iter().map(|&(lo, hi)| (lo.max(op.first_from), hi)).filter(|(lo, hi)| lo < hi).collect()
        } else {
            intervals.clone()
        };
        let mut full = None;
        let read = store.windows_in(res, series, &clipped, &mut |start, bytes| {
            if full.is_some() {
                return Ok(());
            }
            used += bytes.len() + 24;
            if used > budget && !reply.windows.is_empty() {
                full = Some(start);
                return Ok(());
            }
            reply.windows.push(WindowMsg { series, start, histogram: bytes.to_vec() });
            Ok(())
        });
        read.map_err(|e| e.to_string())?;
        if let Some(at) = full {
            reply.truncated = true;
            reply.resume_series = series;
            reply.resume_at = at;
            return Ok(());
        }
    }
    Ok(())
}

/// Whole intervals merged into one dense histogram each, at most (more: folded as per start).
const DENSE_INTERVALS: usize = 16;

/// Starts merged into one dense histogram each, at most, when a merge is per start (a range
/// query's): a range of more starts folds encodings instead, so what a merge holds stays
/// bounded whatever the range.
pub(super) const DENSE_STARTS: i64 = 512;

/// Encodings of one start (or interval) merged once this many are waiting: what a merge holds
/// stays near one histogram per start, whatever the number of series.
const FOLD_AT: usize = 32;

fn merged(store: &Store, op: MergedOp, budget: usize, reply: &mut ReadReply) -> Result<(), String> {
    let res = resolution(op.resolution_seconds)?;
    let intervals: Vec<(i64, i64)> = op.bounds.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    let first = if op.resume { op.first_group as usize } else { 0 };
    let mut read = 0usize;
    let mut used = 0usize;
    for (index, group) in op.groups.iter().enumerate().skip(first) {
        let clipped: Vec<(i64, i64)> = intervals
            .iter()
            .map(|&(lo, hi)| (if op.resume && index == first { lo.max(op.first_from) } else { lo }, hi))
            .filter(|(lo, hi)| lo < hi)
            .collect();
        for (start, histogram) in merge_group(store, res, &group.series, &clipped, op.whole, &mut read)? {
            used += histogram.len() + 24;
            if used > budget && !reply.windows.is_empty() {
                reply.truncated = true;
                reply.resume_series = index as u64;
                reply.resume_at = start;
                return Ok(());
            }
            reply.windows.push(WindowMsg { series: index as u64, start, histogram });
        }
    }
    Ok(())
}

/// Whether [`merge_group`] adds each start's (or whole interval's) windows into one dense
/// histogram rather than folding their encodings.
pub(super) fn merges_dense(res: Resolution, intervals: &[(i64, i64)], whole: bool) -> bool {
    if whole {
        return intervals.len() <= DENSE_INTERVALS;
    }
    starts(res, intervals) <= DENSE_STARTS
}

/// The window starts at `res` that `intervals` can hold, at most.
fn starts(res: Resolution, intervals: &[(i64, i64)]) -> i64 {
    intervals.iter().map(|&(lo, hi)| (hi - lo).div_euclid(res.seconds()) + 1).sum()
}

/// One group's windows in `intervals` merged per start (per interval when `whole`), in start
/// order; `read` counts the bytes read, bounded by the engine's limit. A few whole intervals,
/// or the starts of a range of at most [`DENSE_STARTS`] windows, are each added straight into
/// one dense histogram; otherwise the encodings of a start are folded every [`FOLD_AT`] (one
/// dense histogram per start of a long range would not be bounded).
pub(super) fn merge_group(
    store: &Store,
    res: Resolution,
    series: &[u64],
    intervals: &[(i64, i64)],
    whole: bool,
    read: &mut usize,
) -> Result<Vec<(i64, Vec<u8>)>, String> {
    let layout = store.layout();
    let dense = merges_dense(res, intervals, whole);
    let mut sums: BTreeMap<i64, Histogram> = BTreeMap::new();
    let mut waiting: BTreeMap<i64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut corrupt = 0usize;
    for &s in series {
        store
            .windows_in(res, s, intervals, &mut |start, bytes| {
                let key = merged_at(intervals, start, whole);
                *read += bytes.len();
                if dense {
                    let checked = Checked::trusted(bytes)?;
                    sums.entry(key).or_insert_with(|| Histogram::new(layout)).add_checked(&checked, bytes);
                    return Ok(());
                }
                let parts = waiting.entry(key).or_default();
                parts.push(bytes.to_vec());
                if parts.len() >= FOLD_AT {
                    let folded = merge_values(layout, parts.iter().map(Vec::as_slice), || corrupt += 1);
                    *parts = vec![folded];
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        if *read > MAX_QUERY_BYTES {
            return Err(format!(
                "the merge reads more than {} MiB of histograms; narrow the selection or the range",
                MAX_QUERY_BYTES >> 20
            ));
        }
    }
    let folded = waiting.into_iter().map(|(start, mut parts)| match parts.len() {
        1 => (start, parts.pop().unwrap_or_default()),
        _ => (start, merge_values(layout, parts.iter().map(Vec::as_slice), || corrupt += 1)),
    });
    let merged: Vec<(i64, Vec<u8>)> =
        sums.into_iter().map(|(start, h)| (start, h.to_bytes())).chain(folded).collect();
    if corrupt > 0 {
        return Err(format!("{corrupt} corrupt windows among the merged series"));
    }
    Ok(merged)
}

fn exemplars(store: &Store, op: ExemplarsOp, budget: usize, reply: &mut ReadReply) -> Result<(), String> {
    let all = store.exemplars(op.series, op.start, op.end).map_err(|e| e.to_string())?;
    let mut used = 0;
    for (i, e) in all.iter().enumerate() {
        used += 64;
        // Cut only between windows, so the next page starts at a whole window.
        if used > budget && i > 0 && e.window_start != all[i - 1].window_start {
            reply.truncated = true;
            reply.resume_at = e.window_start;
            break;
        }
        reply.exemplars.push(ExemplarMsg {
            window_start: e.window_start,
            trace_id_high: e.trace_id_high,
            trace_id_low: e.trace_id_low,
            span_id: e.span_id,
            start_unix_nanos: e.start_unix_nanos,
            duration_nanos: e.duration_nanos,
            adjusted_count: e.adjusted_count,
        });
    }
    Ok(())
}

/// What a store node needs to answer other nodes' reads.
#[derive(Debug, Clone)]
pub struct Server {
    /// The NATS client (core request and reply).
    pub client: async_nats::Client,
    /// `cluster.name`.
    pub name: String,
    /// This node.
    pub node_id: String,
    /// `cluster.partitions`.
    pub partitions: u32,
    /// This node's store.
    pub store: Store,
    /// Which partitions it holds caught up.
    pub replicas: Arc<Replicas>,
    /// Its strong-read barrier.
    pub barrier: Arc<super::strong::LogBarrier>,
    /// The copies of its partitions other stores are taking.
    pub copies: Arc<super::copy::Copies>,
    /// Self-metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
}

/// Answers reads on this node's subject until `stop`.
pub async fn serve(server: Server, mut stop: watch::Receiver<bool>) {
    let subject = subject(&server.name, &server.node_id);
    let mut wait = Duration::from_millis(100);
    let mut requests = loop {
        match server.client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot answer cluster reads yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|&s| s) => return,
                }
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    };
    let budget = (server.client.server_info().max_payload).saturating_sub(REPLY_ENVELOPE).max(64 << 10);
    let slots = Arc::new(Semaphore::new(CONCURRENT_READS));
    loop {
        let message = tokio::select! {
            m = requests.next() => match m { Some(m) => m, None => return },
            _ = stop.wait_for(|&s| s) => return,
        };
        let Some(reply_to) = message.reply.clone() else { continue };
        let server = server.clone();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            server.metrics.peer_reads_served.get_or_create(&Outcome { result: "busy" }).inc();
            let busy = ReadReply {
                error: format!("{} is answering {CONCURRENT_READS} reads already", server.node_id),
                ..ReadReply::default()
            };
            let _ = server.client.publish(reply_to, busy.encode_to_vec().into()).await;
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let reply = match ReadRequest::decode(message.payload) {
                Err(e) => {
                    ReadReply { error: format!("a read that does not decode: {e}"), ..ReadReply::default() }
                }
                Ok(request) => handle(&server, request, budget).await,
            };
            // A copy refused at its limit is `busy`, as a read refused at its limit is.
            let result = match (reply.busy, reply.error.is_empty()) {
                (true, _) => "busy",
                (false, true) => "ok",
                (false, false) => "error",
            };
            server.metrics.peer_reads_served.get_or_create(&Outcome { result }).inc();
            let _ = server.client.publish(reply_to, reply.encode_to_vec().into()).await;
        });
    }
}

async fn handle(server: &Server, request: ReadRequest, budget: usize) -> ReadReply {
    let replicas = server.replicas.clone();
    if let Some(Op::Barrier(_)) = request.op {
        let (held, missing): (Vec<u32>, Vec<u32>) =
            request.partitions.iter().partition(|&&p| replicas.caught_up(p));
        let error = match server.barrier.wait_for(&held).await {
            Ok(()) => String::new(),
            Err(e) => format!("{}: {e}", server.node_id),
        };
        return ReadReply { error, not_caught_up: missing, ..ReadReply::default() };
    }
    if let Some(Op::Copy(op)) = request.op {
        let copies = server.copies.clone();
        let partition = request.partitions.first().copied();
        return tokio::task::spawn_blocking(move || {
            copies.page(partition, op, &|p| replicas.caught_up(p), budget)
        })
        .await
        .unwrap_or_else(|e| ReadReply { error: format!("the copy failed: {e}"), ..ReadReply::default() });
    }
    let store = server.store.clone();
    let partitions = server.partitions;
    tokio::task::spawn_blocking(move || {
        answer(&store, partitions, &|p| replicas.caught_up(p), request, budget)
    })
    .await
    .unwrap_or_else(|e| ReadReply { error: format!("the read failed: {e}"), ..ReadReply::default() })
}

// ---- Asking ----------------------------------------------------------------------------

/// A runtime and NATS connection of their own for remote reads: the engine blocks its thread
/// on them, which must never be one the connection itself needs.
struct Bridge {
    runtime: Option<tokio::runtime::Runtime>,
    client: async_nats::Client,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").finish_non_exhaustive()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Bridge {
    /// Runs `f` on the bridge's blocking threads; its result arrives on the receiver.
    fn start_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<std::sync::mpsc::Receiver<T>> {
        let rt = self.runtime.as_ref()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn_blocking(move || {
            let _ = tx.send(f());
        });
        Some(rx)
    }

    /// Starts `f` on the bridge's runtime; its result arrives on the receiver.
    fn start<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<std::sync::mpsc::Receiver<T>> {
        let rt = self.runtime.as_ref()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        Some(rx)
    }
}

/// Where a partition is read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Node {
    Local,
    Remote(String),
}

/// Hands each request a [`ClusterSource`].
#[derive(Debug, Clone)]
pub struct ClusterSources {
    bridge: Arc<Bridge>,
    name: String,
    partitions: u32,
    store: Store,
    /// This node's replicas, when it is a store.
    replicas: Option<Arc<Replicas>>,
    owners: watch::Receiver<Option<Arc<Assignment>>>,
    /// This node's barrier, when it is a store. Weak: it holds the pipeline, whose shards end
    /// only once nothing holds it, and rule evaluation holds these sources past shutdown.
    barrier: Option<std::sync::Weak<super::strong::LogBarrier>>,
    metrics: Arc<Metrics>,
}

impl ClusterSources {
    /// Connects the bridge (its own runtime and NATS connection) through `access`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        access: super::access::NatsAccess,
        node_id: &str,
        name: String,
        partitions: u32,
        store: Store,
        replicas: Option<Arc<Replicas>>,
        owners: watch::Receiver<Option<Arc<Assignment>>>,
        barrier: Option<Arc<super::strong::LogBarrier>>,
        metrics: Arc<Metrics>,
    ) -> Result<ClusterSources, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tailscope-reads")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the cluster reads' runtime: {e}"))?;
        let options =
            access.options(format!("tailscope-{node_id}-reads")).request_timeout(Some(REQUEST_TIMEOUT));
        let addrs = access.addrs();
        let client = runtime
            .spawn(async move { options.connect(addrs).await })
            .await
            .map_err(|e| format!("connecting for cluster reads: {e}"))?
            .map_err(|e| format!("connecting for cluster reads: {e}"))?;
        let bridge = Arc::new(Bridge { runtime: Some(runtime), client });
        let barrier = barrier.as_ref().map(Arc::downgrade);
        Ok(ClusterSources { bridge, name, partitions, store, replicas, owners, barrier, metrics })
    }

    /// Each partition's candidates, best first: this node when it holds the partition caught
    /// up, then the other owners in rendezvous order, and last this node when it owns the
    /// partition but is still catching up (better behind than no answer).
    fn candidates(&self) -> Result<Vec<Vec<Node>>, String> {
        let assignment = self
            .owners
            .borrow()
            .clone()
            .ok_or("the partitions' owners are not known yet (the member list was not read)")?;
        Ok((0..self.partitions)
            .map(|p| {
                let mut nodes = Vec::new();
                let caught_up = self.replicas.as_ref().is_some_and(|r| r.caught_up(p));
                if caught_up {
                    nodes.push(Node::Local);
                }
                // The owners, then stores leaving that held it (while the owners catch up).
                for o in assignment.owners(p).into_iter().chain(assignment.leaving(p)) {
                    if o != assignment.me() {
                        nodes.push(Node::Remote(o.to_owned()));
                    }
                }
                if !caught_up && self.replicas.is_some() && assignment.owns(p) {
                    nodes.push(Node::Local);
                }
                nodes
            })
            .collect())
    }
}

impl ClusterSources {
    /// Why this node does not answer for `partition` itself.
    fn local_state(&self, partition: u32) -> String {
        let owner = self.owners.borrow().as_ref().is_some_and(|a| a.owns(partition));
        match (&self.replicas, owner) {
            (None, _) => "this node: no store".to_owned(),
            (Some(_), false) => "this node: not an owner".to_owned(),
            (Some(r), true) if !r.caught_up(partition) => "this node: catching up".to_owned(),
            (Some(_), true) => "this node: caught up since".to_owned(),
        }
    }
}

impl crate::query::Sources for ClusterSources {
    fn open(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(ClusterSource { sources: self.clone(), routes: Mutex::default() })
    }
}

/// What one request learned: which node answers for each partition, and which partition each
/// selected series lives in.
#[derive(Debug, Default)]
struct Routes {
    node: HashMap<u32, Node>,
    series: HashMap<u64, u32>,
    /// Per remote node, the series selected from it, in label order (the order the engine
    /// reads them in), and each series' place there.
    order: HashMap<String, Vec<u64>>,
    place: HashMap<u64, usize>,
    /// Windows read ahead with another series' read, until their own read takes them.
    ahead: HashMap<u64, Ahead>,
    /// Merged reads of many groups asked of one node at once ([`Source::read_ahead`]).
    batches: Vec<Batch>,
}

/// Groups' merged windows asked of one node in one read, until each group's read takes them.
#[derive(Debug)]
struct Batch {
    node: Node,
    res: Resolution,
    intervals: Vec<(i64, i64)>,
    /// Whether it merged whole intervals (else per window start).
    whole: bool,
    /// Each group's series on the node, and its index in the read.
    groups: HashMap<Vec<u64>, u64>,
    state: BatchState,
}

#[derive(Debug)]
enum BatchState {
    /// Sent; `None` arrives when it failed.
    Asked(std::sync::mpsc::Receiver<Option<ByGroup>>),
    Answered(ByGroup),
    /// The read failed: each group is read on its own.
    Failed,
}

/// Each group's merged windows, by the group's index in its batch.
type ByGroup = HashMap<u64, Vec<(i64, Vec<u8>)>>;

/// Groups one batch asks a node for, at most: what a batch's reply holds stays bounded.
const BATCH_GROUPS: usize = 1024;

/// Parts this node's own groups are merged in ahead, at least (each on a blocking thread).
const LOCAL_MERGES: usize = 2;

/// Merged windows a range query's read-ahead asks for, at most, per resolution (groups ×
/// window starts): the groups past it are read one by one as the engine reaches them, so
/// what a request holds ahead stays bounded however many groups it has.
const AHEAD_WINDOWS: i64 = 8192;

/// One series' windows read ahead: for which read, and what they are.
#[derive(Debug)]
struct Ahead {
    res: Resolution,
    intervals: Vec<(i64, i64)>,
    windows: Vec<(i64, Vec<u8>)>,
}

/// Series whose windows one remote read asks for: the one the engine wants and the next ones
/// selected from the same node, so a query makes a round trip per this many series.
const READ_AHEAD: usize = 64;

/// The engine's [`Source`] over the cluster, for one request.
#[derive(Debug)]
pub struct ClusterSource {
    sources: ClusterSources,
    routes: Mutex<Routes>,
}

fn remote_error(message: String) -> StoreError {
    StoreError::Corrupt { what: "cluster read", message }
}

/// Sends `request` on `subject`, following pages (`next` says what to ask after a truncated
/// reply, `false`: stop), and counts it in `metrics`.
async fn ask(
    client: async_nats::Client,
    subject: String,
    request: ReadRequest,
    next: fn(&mut ReadRequest, &ReadReply) -> bool,
    metrics: Arc<Metrics>,
) -> Result<Vec<ReadReply>, String> {
    let started = std::time::Instant::now();
    let r = ask_pages(client, subject, request, next).await;
    metrics.peer_read_duration.observe(started.elapsed().as_secs_f64());
    let result = match &r {
        Ok(pages) if pages.iter().any(|p| !p.not_caught_up.is_empty()) => "not_caught_up",
        Ok(_) => "ok",
        Err(_) => "error",
    };
    metrics.peer_reads.get_or_create(&Outcome { result }).inc();
    r
}

pub(super) async fn ask_pages(
    client: async_nats::Client,
    subject: String,
    mut request: ReadRequest,
    next: fn(&mut ReadRequest, &ReadReply) -> bool,
) -> Result<Vec<ReadReply>, String> {
    let mut pages = Vec::new();
    loop {
        let reply = client
            .request(subject.clone(), request.encode_to_vec().into())
            .await
            .map_err(|e| e.to_string())?;
        let reply =
            ReadReply::decode(reply.payload).map_err(|e| format!("a reply that does not decode: {e}"))?;
        if !reply.error.is_empty() {
            return Err(reply.error);
        }
        let more = reply.truncated && next(&mut request, &reply);
        pages.push(reply);
        if !more {
            return Ok(pages);
        }
    }
}

pub(super) fn next_select(r: &mut ReadRequest, reply: &ReadReply) -> bool {
    match (&mut r.op, reply.series.last()) {
        (Some(Op::Select(op)), Some(last)) => {
            op.resume = true;
            op.after = last.id;
            op.at_most = op.at_most.saturating_sub(reply.series.len() as u64);
            op.at_most > 0
        }
        _ => false,
    }
}

fn next_values(r: &mut ReadRequest, reply: &ReadReply) -> bool {
    match (&mut r.op, reply.values.last()) {
        (Some(Op::LabelValues(op)), Some(last)) => {
            op.after = last.clone();
            op.limit = op.limit.saturating_sub(reply.values.len() as u64);
            op.limit > 0
        }
        _ => false,
    }
}

fn next_from(r: &mut ReadRequest, reply: &ReadReply) -> bool {
    let at = reply.resume_at;
    match &mut r.op {
        Some(Op::Windows(op)) => {
            let Some(i) = op.series.iter().position(|&s| s == reply.resume_series) else { return false };
            op.series.drain(..i);
            op.resume = true;
            op.first_from = at;
            true
        }
        Some(Op::Exemplars(op)) => {
            op.start = at;
            op.start < op.end
        }
        Some(Op::Merged(op)) => {
            op.resume = true;
            op.first_group = u32::try_from(reply.resume_series).unwrap_or(u32::MAX);
            op.first_from = at;
            true
        }
        _ => false,
    }
}

impl ClusterSource {
    /// Asks each partition of `partitions` from its first candidate that answers, `op` the
    /// same for every node; returns the answers. Each partition's node is remembered.
    fn gather(
        &self,
        partitions: Vec<u32>,
        op: Op,
        next: fn(&mut ReadRequest, &ReadReply) -> bool,
    ) -> Result<Vec<ReadReply>, StoreError> {
        let candidates = self.sources.candidates().map_err(remote_error)?;
        let mut tried: HashMap<u32, usize> = HashMap::new();
        let mut failed: HashMap<u32, Vec<String>> = HashMap::new();
        let mut pending = partitions;
        let mut out = Vec::new();
        while !pending.is_empty() {
            let mut by_node: BTreeMap<Node, Vec<u32>> = BTreeMap::new();
            for p in pending.drain(..) {
                let known = self.routes.lock().node.get(&p).cloned();
                let node = match known {
                    Some(n) => n,
                    None => {
                        let i = tried.entry(p).or_default();
                        let Some(n) = candidates[p as usize].get(*i).cloned() else {
                            let mut why = failed.remove(&p).unwrap_or_default();
                            if !candidates[p as usize].contains(&Node::Local) {
                                why.insert(0, self.sources.local_state(p));
                            }
                            return Err(remote_error(format!(
                                "partition {p} has no caught-up owner that answers ({})",
                                why.join("; ")
                            )));
                        };
                        *i += 1;
                        n
                    }
                };
                by_node.entry(node).or_default().push(p);
            }
            // Every node at once.
            let asks: Vec<(Node, Vec<u32>)> = by_node.into_iter().collect();
            let mut remote = Vec::new();
            for (node, parts) in &asks {
                if let Node::Remote(name) = node {
                    let request = ReadRequest { partitions: parts.clone(), op: Some(op.clone()) };
                    remote.push(ask(
                        self.sources.bridge.client.clone(),
                        subject(&self.sources.name, name),
                        request,
                        next,
                        self.sources.metrics.clone(),
                    ));
                }
            }
            let asked = self
                .sources
                .bridge
                .start(futures::future::join_all(remote))
                .ok_or_else(|| remote_error("the cluster reads' runtime is gone".into()))?;
            // This node answers its own part while the others answer theirs.
            let mut local = None;
            if let Some((_, parts)) = asks.iter().find(|(n, _)| *n == Node::Local) {
                let request = ReadRequest { partitions: parts.clone(), op: Some(op.clone()) };
                // This node is asked only while caught up, or as the last resort.
                let ready = |_: u32| true;
                let reply = answer(&self.sources.store, self.sources.partitions, &ready, request, usize::MAX);
                local = Some(if reply.error.is_empty() { Ok(vec![reply]) } else { Err(reply.error) });
            }
            let mut answers = asked
                .recv()
                .map_err(|_| remote_error("the cluster reads' runtime is gone".into()))?
                .into_iter();
            for (node, parts) in asks {
                let replies = match &node {
                    Node::Local => local.take().unwrap_or_else(|| Err("no answer".into())),
                    Node::Remote(_) => answers.next().unwrap_or_else(|| Err("no answer".into())),
                };
                match replies {
                    Ok(replies) => {
                        let missing: BTreeSet<u32> =
                            replies.iter().flat_map(|r| r.not_caught_up.iter().copied()).collect();
                        let mut routes = self.routes.lock();
                        for p in parts {
                            if missing.contains(&p) {
                                routes.node.remove(&p);
                                pending.push(p);
                            } else {
                                routes.node.insert(p, node.clone());
                            }
                        }
                        out.extend(replies);
                    }
                    Err(e) => {
                        let who = match &node {
                            Node::Local => "this node".to_owned(),
                            Node::Remote(n) => n.clone(),
                        };
                        let mut routes = self.routes.lock();
                        for p in parts {
                            routes.node.remove(&p);
                            failed.entry(p).or_default().push(format!("{who}: {e}"));
                            pending.push(p);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn all_partitions(&self) -> Vec<u32> {
        (0..self.sources.partitions).collect()
    }

    /// The node and partition of a series this request selected.
    fn series_route(&self, series: u64) -> Result<(u32, Node), StoreError> {
        let routes = self.routes.lock();
        let p = *routes
            .series
            .get(&series)
            .ok_or_else(|| remote_error(format!("series {series:016x} was not selected by this request")))?;
        let node =
            routes.node.get(&p).cloned().ok_or_else(|| remote_error(format!("partition {p} has no node")))?;
        Ok((p, node))
    }

    /// Reads `series`' windows (and the next series' from the same node, kept for their own
    /// reads) from `name`.
    fn remote_windows(
        &self,
        name: &str,
        res: Resolution,
        series: u64,
        intervals: &[(i64, i64)],
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let (batch, partitions) = {
            let mut routes = self.routes.lock();
            if let Some(a) = routes.ahead.remove(&series) {
                if a.res == res && a.intervals == intervals {
                    return Ok(a.windows);
                }
            }
            let mut batch = vec![series];
            if let (Some(&at), Some(order)) = (routes.place.get(&series), routes.order.get(name)) {
                batch.extend(
                    order[at + 1..].iter().filter(|s| !routes.ahead.contains_key(s)).take(READ_AHEAD - 1),
                );
            }
            let partitions: BTreeSet<u32> =
                batch.iter().filter_map(|s| routes.series.get(s).copied()).collect();
            (batch, partitions)
        };
        let op = Op::Windows(WindowsOp {
            resolution_seconds: res.seconds(),
            series: batch.clone(),
            bounds: intervals.iter().flat_map(|&(lo, hi)| [lo, hi]).collect(),
            resume: false,
            first_from: 0,
        });
        let mut by_series = by_series(self.ask_node(name, partitions.into_iter().collect(), op)?);
        let mine = by_series.remove(&series).unwrap_or_default();
        let mut routes = self.routes.lock();
        for s in batch.into_iter().skip(1) {
            let windows = by_series.remove(&s).unwrap_or_default();
            routes.ahead.insert(s, Ahead { res, intervals: intervals.to_vec(), windows });
        }
        Ok(mine)
    }

    /// Reads `op` of `partitions` from node `name` (every page), which must still hold them.
    fn ask_node(&self, name: &str, partitions: Vec<u32>, op: Op) -> Result<Vec<ReadReply>, StoreError> {
        let asked = self.start_asking(name, partitions, op)?;
        held_by(name, asked.recv().map_err(|_| remote_error("the cluster reads' runtime is gone".into()))?)
    }

    /// Sends `op` of `partitions` to node `name` without waiting: every page arrives on the
    /// receiver (see [`held_by`]).
    fn start_asking(&self, name: &str, partitions: Vec<u32>, op: Op) -> Result<Asked, StoreError> {
        self.sources
            .bridge
            .start(self.asking(name, partitions, op))
            .ok_or_else(|| remote_error("the cluster reads' runtime is gone".into()))
    }

    /// The read of `op` of `partitions` from node `name`, every page, to run on the bridge.
    fn asking(
        &self,
        name: &str,
        partitions: Vec<u32>,
        op: Op,
    ) -> impl std::future::Future<Output = Result<Vec<ReadReply>, String>> + Send + 'static {
        let sources = &self.sources;
        let request = ReadRequest { partitions, op: Some(op) };
        ask(
            sources.bridge.client.clone(),
            subject(&sources.name, name),
            request,
            next_from,
            sources.metrics.clone(),
        )
    }

    /// `members` by where they are read: this node's, and each other node's.
    fn by_node(&self, members: &[u64]) -> Result<Placed, StoreError> {
        let mut local = Vec::new();
        let mut remote: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for &m in members {
            match self.series_route(m)?.1 {
                Node::Local => local.push(m),
                Node::Remote(name) => remote.entry(name).or_default().push(m),
            }
        }
        Ok((local, remote))
    }

    /// `series`' merged windows (whole intervals when `whole`) from a batch asked of `node`
    /// ahead, if one holds them (waiting for its answer); `None`: read them on their own.
    fn batched(
        &self,
        node: &Node,
        res: Resolution,
        intervals: &[(i64, i64)],
        whole: bool,
        series: &[u64],
    ) -> Option<Vec<(i64, Vec<u8>)>> {
        let mut routes = self.routes.lock();
        let at = routes.batches.iter().position(|b| {
            b.node == *node
                && b.res == res
                && b.intervals == intervals
                && b.whole == whole
                && b.groups.contains_key(series)
                && !matches!(b.state, BatchState::Failed)
        })?;
        let answered = match std::mem::replace(&mut routes.batches[at].state, BatchState::Failed) {
            BatchState::Asked(asked) => {
                // Not waited for under the lock.
                drop(routes);
                let answered = asked.recv().ok().flatten();
                routes = self.routes.lock();
                answered
            }
            BatchState::Answered(by_group) => Some(by_group),
            BatchState::Failed => None,
        };
        let mut by_group = answered?;
        let batch = &mut routes.batches[at];
        let windows = batch.groups.remove(series).and_then(|index| by_group.remove(&index));
        batch.state = BatchState::Answered(by_group);
        Some(windows.unwrap_or_default())
    }

    /// Keeps a batch of `groups` asked of `node`, whose answer arrives on `asked`.
    fn keep_batch(
        &self,
        node: Node,
        (res, intervals, whole): (Resolution, &[(i64, i64)], bool),
        groups: &[Vec<u64>],
        asked: std::sync::mpsc::Receiver<Option<ByGroup>>,
    ) {
        self.routes.lock().batches.push(Batch {
            node,
            res,
            intervals: intervals.to_vec(),
            whole,
            groups: groups.iter().enumerate().map(|(i, g)| (g.clone(), i as u64)).collect(),
            state: BatchState::Asked(asked),
        });
    }

    /// The partitions of the series this request selected from `series`.
    fn partitions_of(&self, series: &[u64]) -> Vec<u32> {
        let routes = self.routes.lock();
        let set: BTreeSet<u32> = series.iter().filter_map(|s| routes.series.get(s).copied()).collect();
        set.into_iter().collect()
    }
}

/// Gives `f` windows read from another node; one it refuses is named by `what` and its start.
fn give(
    windows: impl IntoIterator<Item = (i64, Vec<u8>)>,
    f: &mut WindowFn<'_>,
    what: &str,
) -> Result<(), StoreError> {
    for (start, histogram) in windows {
        f(start, &histogram).map_err(|e| StoreError::Corrupt {
            what: "window",
            message: format!("{what} at {start}: {e}"),
        })?;
    }
    Ok(())
}

/// The merged read of `groups`.
fn merged_op(res: Resolution, groups: Vec<Vec<u64>>, intervals: &[(i64, i64)], whole: bool) -> Op {
    Op::Merged(MergedOp {
        resolution_seconds: res.seconds(),
        groups: groups.into_iter().map(|series| SeriesGroup { series }).collect(),
        bounds: intervals.iter().flat_map(|&(lo, hi)| [lo, hi]).collect(),
        whole,
        resume: false,
        first_from: 0,
        first_group: 0,
    })
}

/// Series by where they are read: this node's, and each other node's.
type Placed = (Vec<u64>, BTreeMap<String, Vec<u64>>);

/// The windows of `replies` by their `series` field: a series id, or in the answer to a
/// merged read, a group's index.
fn by_series(replies: Vec<ReadReply>) -> HashMap<u64, Vec<(i64, Vec<u8>)>> {
    let mut out: HashMap<u64, Vec<(i64, Vec<u8>)>> = HashMap::new();
    for w in replies.into_iter().flat_map(|r| r.windows) {
        out.entry(w.series).or_default().push((w.start, w.histogram));
    }
    out
}

/// A read sent and not yet answered.
type Asked = std::sync::mpsc::Receiver<Result<Vec<ReadReply>, String>>;

/// What node `name` answered, as long as it still held every partition asked.
fn held_by(name: &str, answered: Result<Vec<ReadReply>, String>) -> Result<Vec<ReadReply>, StoreError> {
    let replies = answered.map_err(|e| remote_error(format!("reading from {name}: {e}")))?;
    if let Some(p) = replies.iter().flat_map(|r| &r.not_caught_up).next() {
        return Err(remote_error(format!("{name} no longer holds partition {p}")));
    }
    Ok(replies)
}

/// What a node of a release without merged reads answers one.
const NO_OPERATION: &str = "a read without an operation";

impl Source for ClusterSource {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        self.select(&[], usize::MAX)
    }

    fn select(&self, matchers: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        let op = Op::Select(SelectOp {
            matchers: matchers.iter().map(|m| matcher_msg(m)).collect(),
            at_most: at_most as u64,
            resume: false,
            after: 0,
        });
        let replies = self.gather(self.all_partitions(), op, next_select)?;
        let mut out = Vec::new();
        for s in replies.into_iter().flat_map(|r| r.series) {
            let labels = SeriesLabels::decode(&s.labels)
                .ok_or_else(|| remote_error(format!("series {:016x}: labels that do not decode", s.id)))?;
            out.push((s.id, labels));
            if out.len() >= at_most {
                break;
            }
        }
        // Where each series lives, and in which order each remote node's are read ahead.
        let mut sorted: Vec<&(u64, SeriesLabels)> = out.iter().collect();
        sorted.sort_by(|a, b| a.1.cmp(&b.1));
        let mut routes = self.routes.lock();
        let routes = &mut *routes;
        for (id, labels) in sorted {
            let p = partition_of(labels, self.sources.partitions);
            routes.series.insert(*id, p);
            if let Some(Node::Remote(name)) = routes.node.get(&p) {
                if !routes.place.contains_key(id) {
                    let order = routes.order.entry(name.clone()).or_default();
                    routes.place.insert(*id, order.len());
                    order.push(*id);
                }
            }
        }
        Ok(out)
    }

    fn label_values(&self, label: &str, limit: usize) -> Result<(Vec<String>, bool), StoreError> {
        let op = Op::LabelValues(LabelValuesOp {
            label: label.to_owned(),
            limit: limit as u64,
            after: String::new(),
        });
        let replies = self.gather(self.all_partitions(), op, next_values)?;
        let mut more = false;
        let mut set = BTreeSet::new();
        for r in replies {
            more |= r.more;
            set.extend(r.values);
        }
        more |= set.len() > limit;
        Ok((set.into_iter().take(limit).collect(), more))
    }

    fn windows(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.windows_in(res, series, &[(start, end)], f)
    }

    fn windows_in(
        &self,
        res: Resolution,
        series: u64,
        intervals: &[(i64, i64)],
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        match self.series_route(series)?.1 {
            Node::Local => self.sources.store.windows_in(res, series, intervals, f),
            Node::Remote(name) => {
                let windows = self.remote_windows(&name, res, series, intervals)?;
                give(windows, f, &format!("series {series:016x}"))?;
                Ok(())
            }
        }
    }

    fn merged_windows(
        &self,
        res: Resolution,
        members: &[u64],
        intervals: &[(i64, i64)],
        whole: bool,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        // This node's and single series are read series by series (a single series' read
        // reads its node's next ones ahead), the rest merged by their nodes, all at once.
        let (local, remote) = self.by_node(members)?;
        let mut asked = Vec::new();
        let mut single = Vec::new();
        for (name, series) in remote {
            if series.len() == 1 {
                single.extend(series);
                continue;
            }
            {
                let mut routes = self.routes.lock();
                for s in &series {
                    routes.ahead.remove(s);
                }
            }
            if let Some(windows) = self.batched(&Node::Remote(name.clone()), res, intervals, whole, &series) {
                give(windows, f, &format!("merged on {name}"))?;
                continue;
            }
            let op = merged_op(res, vec![series.clone()], intervals, whole);
            let partitions = self.partitions_of(&series);
            asked.push((self.start_asking(&name, partitions, op)?, name, series));
        }
        // This node reads its own while the others merge theirs (merged ahead, when asked).
        let ahead =
            if local.is_empty() { None } else { self.batched(&Node::Local, res, intervals, whole, &local) };
        match ahead {
            Some(windows) => give(windows, f, "merged here")?,
            None => {
                for m in local {
                    self.sources.store.windows_in(res, m, intervals, f)?;
                }
            }
        }
        for m in single {
            self.windows_in(res, m, intervals, f)?;
        }
        for (answer, name, series) in asked {
            let answered =
                answer.recv().map_err(|_| remote_error("the cluster reads' runtime is gone".into()))?;
            if matches!(&answered, Err(e) if e == NO_OPERATION) {
                // An older node: read its series one by one.
                for s in series {
                    self.windows_in(res, s, intervals, f)?;
                }
                continue;
            }
            let windows = held_by(&name, answered)?.into_iter().flat_map(|r| r.windows);
            give(windows.map(|w| (w.start, w.histogram)), f, &format!("merged on {name}"))?;
        }
        Ok(())
    }

    fn read_ahead(&self, res: Resolution, groups: &[&[u64]], intervals: &[(i64, i64)], whole: bool) {
        // Per start, only as many groups as AHEAD_WINDOWS holds.
        let groups = if whole {
            groups
        } else {
            let fit = usize::try_from(AHEAD_WINDOWS / starts(res, intervals).max(1)).unwrap_or(0);
            &groups[..groups.len().min(fit)]
        };
        if groups.len() < 2 {
            return;
        }
        // Per node, each group's series there; a group whose series are not all known is left
        // to its own read.
        let mut mine: Vec<Vec<u64>> = Vec::new();
        let mut theirs: BTreeMap<String, Vec<Vec<u64>>> = BTreeMap::new();
        for members in groups {
            let Ok((local, remote)) = self.by_node(members) else { continue };
            if !local.is_empty() {
                mine.push(local);
            }
            for (name, series) in remote {
                // A node's single series is read with its next ones (`remote_windows`).
                if series.len() >= 2 {
                    theirs.entry(name).or_default().push(series);
                }
            }
        }
        // The other owners first, one merged read each...
        for (name, groups) in theirs {
            for chunk in groups.chunks(BATCH_GROUPS) {
                let partitions = self.partitions_of(&chunk.concat());
                let read = self.asking(&name, partitions, merged_op(res, chunk.to_vec(), intervals, whole));
                let node = name.clone();
                // An owner answers a merged read with each group's windows under its index.
                let answered = async move { held_by(&node, read.await).ok().map(by_series) };
                // Not asked: each group is read on its own.
                let Some(asked) = self.sources.bridge.start(answered) else { return };
                self.keep_batch(Node::Remote(name.clone()), (res, intervals, whole), chunk, asked);
            }
        }
        // ...then this node's series of each group, merged on the bridge's threads meanwhile
        // (in LOCAL_MERGES parts at least: the first groups are ready sooner, and the merges
        // use more than one core).
        for chunk in mine.chunks(mine.len().div_ceil(LOCAL_MERGES).clamp(1, BATCH_GROUPS)) {
            let (store, groups, bounds) = (self.sources.store.clone(), chunk.to_vec(), intervals.to_vec());
            let merged = move || -> Option<ByGroup> {
                let mut read = 0;
                let mut out = ByGroup::new();
                for (i, g) in groups.iter().enumerate() {
                    out.insert(i as u64, merge_group(&store, res, g, &bounds, whole, &mut read).ok()?);
                }
                Some(out)
            };
            let Some(merging) = self.sources.bridge.start_blocking(merged) else { return };
            self.keep_batch(Node::Local, (res, intervals, whole), chunk, merging);
        }
    }

    fn layout(&self) -> Layout {
        self.sources.store.layout()
    }

    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError> {
        let (p, node) = self.series_route(series)?;
        match node {
            Node::Local => self.sources.store.exemplars(series, start, end),
            Node::Remote(name) => Ok(self
                .ask_node(&name, vec![p], Op::Exemplars(ExemplarsOp { series, start, end }))?
                .into_iter()
                .flat_map(|r| r.exemplars)
                .map(|e| Exemplar {
                    series,
                    window_start: e.window_start,
                    trace_id_high: e.trace_id_high,
                    trace_id_low: e.trace_id_low,
                    span_id: e.span_id,
                    start_unix_nanos: e.start_unix_nanos,
                    duration_nanos: e.duration_nanos,
                    adjusted_count: e.adjusted_count,
                })
                .collect()),
        }
    }
}

// ---- Strong reads across owners ----------------------------------------------------------

/// A strong read over the cluster: every partition's first caught-up owner (this node's
/// store when it holds the partition) waits until it has written what the partition's log
/// holds now.
#[derive(Debug)]
pub struct ClusterBarrier {
    sources: ClusterSources,
    /// `cluster.strong_read_timeout`: each owner's own barrier gives up after it.
    timeout: Duration,
}

impl ClusterBarrier {
    /// The barrier of `sources`' owners, each waiting at most `timeout`.
    pub fn new(sources: ClusterSources, timeout: Duration) -> ClusterBarrier {
        ClusterBarrier { sources, timeout }
    }

    async fn wait_inner(&self) -> Result<(), String> {
        let candidates = self.sources.candidates()?;
        let mut tried = vec![0usize; candidates.len()];
        let mut pending: Vec<u32> = (0..self.sources.partitions).collect();
        let mut failed: Vec<String> = Vec::new();
        while !pending.is_empty() {
            let mut by_node: BTreeMap<Node, Vec<u32>> = BTreeMap::new();
            for p in pending.drain(..) {
                let Some(node) = candidates[p as usize].get(tried[p as usize]).cloned() else {
                    return Err(format!(
                        "strong read: partition {p} has no caught-up owner that answers{}",
                        if failed.is_empty() { String::new() } else { format!(" ({})", failed.join("; ")) }
                    ));
                };
                tried[p as usize] += 1;
                by_node.entry(node).or_default().push(p);
            }
            let waits = by_node.into_iter().map(|(node, parts)| async move {
                let r = match &node {
                    Node::Local => match self.sources.barrier.as_ref().and_then(std::sync::Weak::upgrade) {
                        Some(b) => b.wait_for(&parts).await.map(|()| Vec::new()),
                        None => Err("this node's store is not running".to_owned()),
                    },
                    Node::Remote(name) => {
                        let request =
                            ReadRequest { partitions: parts.clone(), op: Some(Op::Barrier(BarrierOp {})) };
                        let client = self.sources.bridge.client.clone();
                        let subject = subject(&self.sources.name, name);
                        // The owner's own barrier bounds the wait; the request may take as long.
                        let asked = async_nats::Request::new()
                            .payload(request.encode_to_vec().into())
                            .timeout(Some(self.timeout + REQUEST_TIMEOUT));
                        match client.send_request(subject, asked).await {
                            Ok(m) => match ReadReply::decode(m.payload) {
                                Ok(r) if r.error.is_empty() => Ok(r.not_caught_up),
                                Ok(r) => Err(r.error),
                                Err(e) => Err(format!("{name}: a reply that does not decode: {e}")),
                            },
                            Err(e) => Err(format!("{name}: {e}")),
                        }
                    }
                };
                (parts, r)
            });
            for (parts, r) in futures::future::join_all(waits).await {
                match r {
                    Ok(missing) => pending.extend(missing),
                    // A barrier that timed out is the answer: the owner is behind.
                    Err(e) if e.contains("strong read") => return Err(e),
                    Err(e) => {
                        failed.push(e);
                        pending.extend(parts);
                    }
                }
            }
        }
        Ok(())
    }
}

impl crate::query::ReadBarrier for ClusterBarrier {
    fn wait(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.wait_inner())
    }
}

#[cfg(test)]
mod tests;
