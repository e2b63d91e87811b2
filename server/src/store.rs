//! Storage: what the rest of the server needs from it, as traits — [`Source`] (series,
//! windows, exemplars: the query side) and [`StateStore`] (alerting state, by [`StateKind`]) —
//! and their implementations: the embedded RocksDB store ([`Store`], `store/rocksdb.rs`, with
//! its key codecs in `store/keys.rs` and merge operator in `store/merge.rs`) and an in-memory
//! one for tests and fuzzing ([`MemoryStore`]). A new backend implements the two traits; the
//! ingest side writes through [`Store::write_epoch`].
//!
//! # Layout of the RocksDB store
//!
//! | column family | key | value |
//! |---|---|---|
//! | `win_10s`, `win_1m`, `win_1h` | partition `u32` ‖ series id `u64` ‖ window start `u64` (s) | histogram (merge operands) |
//! | `series` | series id `u64` | encoded labels ‖ hour of the newest window `u32` |
//! | `watermarks` | client id `u64` | highest durable seq `u64` ‖ owning credential `u64` ‖ last seen `i64` (s) |
//! | `exemplars` | hour `u32` ‖ series id `u64` ‖ window start `u64` ‖ span id `u64` | trace id, duration, start |
//! | `alerting` | kind prefix ‖ name (rule state, notification log, silences) | JSON |
//! | `log` | partition `u32` (cluster mode) | [`LogPosition`]: stream seq `u64` ‖ records applied `u32` |
//! | `log` | partition `u32` ‖ `copy` (cluster mode) | empty: a copy of the partition from another store is landing |
//!
//! All integers are big-endian, so one series' windows within a partition are one contiguous
//! scan. A partition is a fixed span of time per resolution (1 h of 10-second windows, 1 day of
//! minutes, 30 days of hours); retention deletes whole expired partitions with one range
//! deletion and compacts them away. (Compaction filters would not work here: RocksDB does not
//! call them for keys that only have merge operands.)
//!
//! Histogram values are written as merge operands; an associative merge operator adds them,
//! so late data and retries are simply more operands.
//!
//! The series family is also held in memory as a [`SeriesIndex`] (posting lists per label
//! value), loaded at open and kept current by every epoch written: selection and label values
//! never scan the family. A series' entry is rewritten when its newest window moves to a new
//! hour, and retention retires the series whose newest window is older than every resolution
//! keeps.

use std::time::Duration;

use promql_parser::label::Matcher;
use serde::{Deserialize, Serialize};
use tailscope_proto::histogram::{HistogramError, Layout};

use crate::series::SeriesLabels;

mod copy;
mod index;
mod keys;
mod memory;
mod merge;
mod rocksdb;

pub use self::rocksdb::Store;
pub use copy::{Checkpoint, Copied, CopyCursor, Share};
pub use index::SeriesIndex;
pub use keys::window_key;
pub use memory::MemoryStore;
pub use merge::merge_values;

/// A key and its value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed (I/O error, disk full, corruption).
    #[error("store: {0}")]
    RocksDb(#[from] ::rocksdb::Error),
    /// A column family is missing from an opened database.
    #[error("store: column family {0} is missing")]
    MissingColumnFamily(&'static str),
    /// A stored value does not decode.
    #[error("store: corrupt {what}: {message}")]
    Corrupt {
        /// Which kind of value.
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// `[retention]`: how long each resolution's windows are kept. Disk is reclaimed by dropping
/// whole time partitions, so data lives up to one partition longer than configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// 10-second windows.
    #[serde(with = "humantime_serde")]
    pub window_10s: Duration,
    /// 1-minute windows.
    #[serde(with = "humantime_serde")]
    pub window_1m: Duration,
    /// 1-hour windows.
    #[serde(with = "humantime_serde")]
    pub window_1h: Duration,
    /// Exemplars (example spans of each series and window).
    #[serde(with = "humantime_serde")]
    pub exemplars: Duration,
    /// How often expired partitions are deleted and compacted away.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let day = 24 * 3600;
        RetentionConfig {
            window_10s: Duration::from_secs(2 * day),
            window_1m: Duration::from_secs(30 * day),
            window_1h: Duration::from_secs(400 * day),
            exemplars: Duration::from_secs(2 * day),
            interval: Duration::from_secs(600),
        }
    }
}

/// A window resolution and the column family that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    /// 10-second windows, the base resolution.
    S10,
    /// 1-minute windows.
    M1,
    /// 1-hour windows.
    H1,
}

impl Resolution {
    /// Every resolution, finest first.
    pub const ALL: [Resolution; 3] = [Resolution::S10, Resolution::M1, Resolution::H1];

    /// Width of one window in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Resolution::S10 => 10,
            Resolution::M1 => 60,
            Resolution::H1 => 3600,
        }
    }

    /// Width of one retention partition in seconds.
    pub fn partition_seconds(self) -> i64 {
        match self {
            Resolution::S10 => 3600,
            Resolution::M1 => 86_400,
            Resolution::H1 => 30 * 86_400,
        }
    }

    /// The column family name.
    pub fn column_family(self) -> &'static str {
        match self {
            Resolution::S10 => "win_10s",
            Resolution::M1 => "win_1m",
            Resolution::H1 => "win_1h",
        }
    }

    /// How long windows of this resolution are kept.
    pub fn retention(self, r: &RetentionConfig) -> i64 {
        let d = match self {
            Resolution::S10 => r.window_10s,
            Resolution::M1 => r.window_1m,
            Resolution::H1 => r.window_1h,
        };
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
    }

    /// The start of the window holding second `t`.
    pub fn align(self, t: i64) -> i64 {
        t.div_euclid(self.seconds()) * self.seconds()
    }

    /// The label used in API answers.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::S10 => "10s",
            Resolution::M1 => "1m",
            Resolution::H1 => "1h",
        }
    }
}

/// One series' histogram delta for one base (10 s) window.
#[derive(Debug, Clone)]
pub struct WindowDelta {
    /// The series id.
    pub series: u64,
    /// Start of the 10-second window, seconds since the epoch.
    pub window_start: i64,
    /// The encoded histogram.
    pub histogram: Vec<u8>,
}

/// A span kept as an example of its series and window: one of the slowest, an error, or a
/// random one. Grafana links it to the trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    /// The series id.
    pub series: u64,
    /// Start of its 10-second window, seconds since the epoch.
    pub window_start: i64,
    /// High half of the 128-bit trace id.
    pub trace_id_high: u64,
    /// Low half of the trace id.
    pub trace_id_low: u64,
    /// The span id.
    pub span_id: u64,
    /// Start of the span, Unix nanoseconds.
    pub start_unix_nanos: i64,
    /// Its duration in nanoseconds.
    pub duration_nanos: i64,
    /// How many spans it stood for when sampled (the inverse of its probability); 0 when the
    /// sender did not say.
    pub adjusted_count: f64,
}

/// A client's durable watermark and what it is known by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermark {
    /// The highest durable seq.
    pub seq: u64,
    /// The credential that owns the client id (a digest of its token; 0: none).
    pub owner: u64,
    /// When the client last sent a batch, seconds since the epoch (0: unknown, a row written
    /// before this was kept).
    pub last_seen: i64,
}

impl Watermark {
    /// The stored value: seq ‖ owner ‖ last seen, big-endian.
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&self.seq.to_be_bytes());
        v[8..16].copy_from_slice(&self.owner.to_be_bytes());
        v[16..].copy_from_slice(&self.last_seen.to_be_bytes());
        v
    }

    /// A stored value: 24 bytes, or the 8 of a seq alone (written before owners were kept).
    pub(crate) fn decode(v: &[u8]) -> Option<Watermark> {
        let at = |i: usize| v.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        match v.len() {
            8 => Some(Watermark { seq: at(0)?, owner: 0, last_seen: 0 }),
            24 => Some(Watermark { seq: at(0)?, owner: at(8)?, last_seen: at(16)? as i64 }),
            _ => None,
        }
    }
}

/// Everything one flush epoch writes atomically.
#[derive(Debug, Default)]
pub struct EpochWrite {
    /// Histogram deltas, each merged into all three resolutions.
    pub windows: Vec<WindowDelta>,
    /// Series seen for the first time since start-up (idempotent puts).
    pub series: Vec<(u64, SeriesLabels)>,
    /// Clients' new durable watermarks.
    pub watermarks: Vec<(u64, Watermark)>,
    /// Clients whose watermarks are forgotten (idle for `ingest.client_idle_timeout`).
    pub forgotten_clients: Vec<u64>,
    /// Exemplars of windows that closed.
    pub exemplars: Vec<Exemplar>,
    /// Cluster mode: how far into each partition's log this epoch's records go, written in the
    /// same batch as what they merged, so a replica resumes exactly after what it applied.
    pub log_positions: Vec<(u32, LogPosition)>,
}

/// How far a store replica applied one partition's log: every record of the messages before
/// stream sequence `seq`, and the first `records` records of message `seq`. Ordered, so the
/// larger of two positions is the later one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    /// The stream sequence of the message being applied (0: nothing yet).
    pub seq: u64,
    /// How many of that message's records were applied.
    pub records: u32,
}

impl LogPosition {
    /// The stored form: `seq` ‖ `records`, big-endian.
    pub fn encode(self) -> [u8; 12] {
        let mut out = [0; 12];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.records.to_be_bytes());
        out
    }

    /// Reads the stored form.
    pub fn decode(bytes: &[u8]) -> Option<LogPosition> {
        let seq = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let records = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?);
        (bytes.len() == 12).then_some(LogPosition { seq, records })
    }
}

/// What happens after an epoch is written: the seam through which the pipeline feeds consumers
/// of exact deltas (remote write today) without knowing them.
pub trait EpochSink: Send + Sync + std::fmt::Debug {
    /// Called once per durable epoch, on a blocking thread, with what it wrote.
    fn written(&self, write: &EpochWrite);
}

impl EpochWrite {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
            && self.series.is_empty()
            && self.watermarks.is_empty()
            && self.forgotten_clients.is_empty()
            && self.exemplars.is_empty()
            && self.log_positions.is_empty()
    }

    /// Appends `other` (a failed epoch being retried together with a new one).
    pub fn absorb(&mut self, other: EpochWrite) {
        self.windows.extend(other.windows);
        self.series.extend(other.series);
        self.watermarks.extend(other.watermarks);
        self.forgotten_clients.extend(other.forgotten_clients);
        self.exemplars.extend(other.exemplars);
        // Later positions come later: the last one written for a partition wins.
        self.log_positions.extend(other.log_positions);
    }
}

/// What a retention pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// Partitions deleted, per resolution.
    pub deleted: Vec<(Resolution, u64)>,
    /// Hour partitions of exemplars deleted.
    pub exemplar_partitions: u64,
    /// Series retired from the index: their newest window is older than every resolution's
    /// retention, so nothing of them is left to read.
    pub series_retired: u64,
}

/// Where [`Source::merged_windows`] gives the window starting at `start`: at its own start,
/// or, when `whole`, at the start of the interval of `intervals` (sorted, disjoint) that holds
/// it.
pub fn merged_at(intervals: &[(i64, i64)], start: i64, whole: bool) -> i64 {
    if !whole {
        return start;
    }
    let i = intervals.partition_point(|&(lo, _)| lo <= start);
    intervals.get(i.wrapping_sub(1)).map_or(start, |&(lo, _)| lo)
}

/// What [`Source::windows`] calls with each window: its start and encoded histogram.
pub type WindowFn<'a> = dyn FnMut(i64, &[u8]) -> Result<(), HistogramError> + 'a;

/// The kinds of alerting state the store keeps, each under a key prefix this module owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKind {
    /// Silences, by id.
    Silence,
    /// The notifier's log: what each integration was last told of each group.
    NotificationLog,
    /// Alerting rules' alerts, by file, group and rule.
    RuleState,
    /// Incident stamps, by the alert's fingerprint.
    Incident,
}

impl StateKind {
    /// The key prefix of the kind (unchanged since the first release: stores written then
    /// read the same).
    fn prefix(self) -> &'static [u8] {
        match self {
            StateKind::Silence => b"silence\0",
            StateKind::NotificationLog => b"nflog\0",
            StateKind::RuleState => b"rule\0",
            StateKind::Incident => b"incident\0",
        }
    }
}

/// What alerting needs from storage: records of its kinds of state, written durably.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Every record of `kind` whose key starts with `prefix`, in key order (keys without the
    /// kind's own prefix).
    fn state(&self, kind: StateKind, prefix: &[u8]) -> Result<Vec<Record>, StoreError>;
    /// Writes (`Some`) or deletes (`None`) records of `kind` at once, durable when this
    /// returns.
    fn write_state(&self, kind: StateKind, records: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError>;
}

/// What the query side reads: series (selected through the index), their windows at a
/// resolution, and exemplars. [`Store`] is the RocksDB implementation, [`MemoryStore`] the
/// in-memory one of the tests and fuzz targets.
pub trait Source: Sync {
    /// Every series.
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError>;
    /// The series every one of `matchers` (on `service`, `operation`, `status` or labels no
    /// series has, which read as empty) matches, at most `at_most` of them (which ones, when
    /// more match, is unspecified: a caller asks for one more than it accepts). A store
    /// answers from its posting lists; the default filters [`Source::series`].
    fn select(&self, matchers: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        let mut all = self.series()?;
        all.retain(|(_, l)| l.matches(matchers));
        all.truncate(at_most);
        Ok(all)
    }
    /// The distinct non-empty values of `label` over every series, sorted, at most `limit`,
    /// and whether there were more. A store reads them off its posting lists.
    fn label_values(&self, label: &str, limit: usize) -> Result<(Vec<String>, bool), StoreError> {
        let all = self.series()?;
        let set: std::collections::BTreeSet<&str> =
            all.iter().filter_map(|(_, l)| l.get(label)).filter(|v| !v.is_empty()).collect();
        let more = set.len() > limit;
        Ok((set.into_iter().take(limit).map(str::to_owned).collect(), more))
    }
    /// Calls `f` with the encoded histogram of each window of `series` at `res` starting in
    /// `[start, end)`, in order; an error from `f` marks the window corrupt. The encodings must
    /// have been validated on their way in (the engine checks only their headers).
    fn windows(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError>;
    /// Like [`Source::windows`] for each of `intervals` (`[start, end)`, sorted, disjoint),
    /// in order. A store reads them with one iterator per partition, seeking from one interval
    /// to the next, instead of one iterator per interval.
    fn windows_in(
        &self,
        res: Resolution,
        series: u64,
        intervals: &[(i64, i64)],
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        for &(start, end) in intervals {
            self.windows(res, series, start, end, f)?;
        }
        Ok(())
    }
    /// The windows of every one of `members` at `res` starting in `intervals`, for a caller
    /// that only adds them up: `f` may be given windows already merged — of several members
    /// at one start, or, when `whole`, of a whole interval, given at the interval's start. What
    /// `f` is given adds up, per start (per interval when `whole`), to the members' windows
    /// there; starts may repeat and come in any order. A cluster merges on the node that holds
    /// the windows, so one histogram crosses the network where many windows would; the
    /// default reads member by member.
    fn merged_windows(
        &self,
        res: Resolution,
        members: &[u64],
        intervals: &[(i64, i64)],
        whole: bool,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        let _ = whole;
        for &member in members {
            self.windows_in(res, member, intervals, f)?;
        }
        Ok(())
    }
    /// Announces that [`Source::merged_windows`] of `intervals` (whole ones when `whole`,
    /// per start otherwise) follows for each of `groups` (each a members list, read exactly
    /// so), so a source that asks other nodes can ask each for all of them at once. A hint:
    /// reading without it, or reading only some of the groups, answers the same.
    fn read_ahead(&self, res: Resolution, groups: &[&[u64]], intervals: &[(i64, i64)], whole: bool) {
        let _ = (res, groups, intervals, whole);
    }
    /// The layout of new histograms.
    fn layout(&self) -> Layout;
    /// The exemplars kept for `series` in windows starting in `[start, end)` (seconds), in
    /// time order.
    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError>;
}

#[cfg(test)]
mod tests;
