//! The embedded RocksDB store: histograms per series and window at three resolutions, the
//! series index and the clients' durable watermarks.
//!
//! # Layout
//!
//! | column family | key | value |
//! |---|---|---|
//! | `win_10s`, `win_1m`, `win_1h` | partition `u32` ‖ series id `u64` ‖ window start `u64` (s) | histogram (merge operands) |
//! | `series` | series id `u64` | encoded labels ‖ hour of the newest window `u32` |
//! | `watermarks` | client id `u64` | highest durable seq `u64` |
//! | `exemplars` | hour `u32` ‖ series id `u64` ‖ window start `u64` ‖ span id `u64` | trace id, duration, start |
//! | `alerting` | kind prefix ‖ name (rule state, notification log, silences) | JSON |
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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use promql_parser::label::Matcher;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    MergeOperands, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use tailscope_proto::histogram::{Histogram, HistogramError, Layout};

use crate::series::SeriesLabels;
use crate::telemetry::Metrics;

mod index;
mod memory;

pub use index::SeriesIndex;
use index::{decode_entry, encode_entry, hour_of};
pub use memory::MemoryStore;

const CF_SERIES: &str = "series";
const CF_WATERMARKS: &str = "watermarks";
const CF_EXEMPLARS: &str = "exemplars";
const CF_ALERTING: &str = "alerting";
/// Exemplars are partitioned by the hour, like 10-second windows.
const EXEMPLAR_PARTITION_SECONDS: i64 = 3600;
const MERGE_OPERATOR: &str = "tailscope.histogram.v1";
/// Memory for all memtables together.
const MEMTABLE_BUDGET: usize = 64 << 20;
/// Memory for cached (uncompressed) blocks of the window families.
const BLOCK_CACHE: usize = 128 << 20;

/// A key and its value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed (I/O error, disk full, corruption).
    #[error("store: {0}")]
    RocksDb(#[from] rocksdb::Error),
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

/// The key of one series' window.
pub fn window_key(res: Resolution, series: u64, window_start: i64) -> [u8; 20] {
    let start = window_start.max(0);
    raw_key(start / res.partition_seconds(), series, start)
}

fn raw_key(partition: i64, series: u64, t: i64) -> [u8; 20] {
    let mut k = [0u8; 20];
    let partition = u32::try_from(partition).unwrap_or(u32::MAX);
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..12].copy_from_slice(&series.to_be_bytes());
    k[12..].copy_from_slice(&(t.max(0) as u64).to_be_bytes());
    k
}

fn window_of_key(key: &[u8]) -> Option<i64> {
    let b: [u8; 8] = key.get(12..20)?.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(b)).ok()
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

impl Exemplar {
    /// Partition ‖ series ‖ window ‖ a mix of trace and span id (so spans that share a span id
    /// in different traces do not overwrite each other).
    fn key(&self) -> [u8; 28] {
        let mut k = [0u8; 28];
        k[..20].copy_from_slice(&raw_key(
            self.window_start.max(0) / EXEMPLAR_PARTITION_SECONDS,
            self.series,
            self.window_start,
        ));
        let id = self.span_id ^ self.trace_id_low.rotate_left(21) ^ self.trace_id_high.rotate_left(42);
        k[20..].copy_from_slice(&id.to_be_bytes());
        k
    }

    fn value(&self) -> [u8; 48] {
        let mut v = [0u8; 48];
        for (i, x) in [
            self.trace_id_high,
            self.trace_id_low,
            self.span_id,
            self.start_unix_nanos as u64,
            self.duration_nanos as u64,
            self.adjusted_count.to_bits(),
        ]
        .into_iter()
        .enumerate()
        {
            v[i * 8..i * 8 + 8].copy_from_slice(&x.to_be_bytes());
        }
        v
    }

    fn decode(key: &[u8], value: &[u8]) -> Option<Exemplar> {
        let be =
            |b: &[u8], at: usize| b.get(at..at + 8).and_then(|x| x.try_into().ok()).map(u64::from_be_bytes);
        // Values written before adjusted counts were kept are 40 bytes long.
        if key.len() != 28 || (value.len() != 48 && value.len() != 40) {
            return None;
        }
        Some(Exemplar {
            series: be(key, 4)?,
            window_start: be(key, 12)? as i64,
            trace_id_high: be(value, 0)?,
            trace_id_low: be(value, 8)?,
            span_id: be(value, 16)?,
            start_unix_nanos: be(value, 24)? as i64,
            duration_nanos: be(value, 32)? as i64,
            adjusted_count: be(value, 40).map_or(0.0, f64::from_bits),
        })
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
    pub watermarks: Vec<(u64, u64)>,
    /// Exemplars of windows that closed.
    pub exemplars: Vec<Exemplar>,
}

impl EpochWrite {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
            && self.series.is_empty()
            && self.watermarks.is_empty()
            && self.exemplars.is_empty()
    }

    /// Appends `other` (a failed epoch being retried together with a new one).
    pub fn absorb(&mut self, other: EpochWrite) {
        self.windows.extend(other.windows);
        self.series.extend(other.series);
        self.watermarks.extend(other.watermarks);
        self.exemplars.extend(other.exemplars);
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

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<DB>,
    layout: Layout,
    index: Arc<SeriesIndex>,
    /// Held while series entries are written or retired, so a retirement never deletes an
    /// entry an epoch is rewriting.
    series_writes: Arc<std::sync::Mutex<()>>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, layout: Layout, metrics: &Metrics) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_keep_log_file_num(4);
        // One budget for the memtables of every column family, so the store's memory stays
        // bounded however many series are written (RocksDB flushes the largest when it is hit).
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        let corrupt = metrics.corrupt_operands.clone();
        // One block cache for the window families, so the windows a dashboard re-reads every
        // refresh are served decompressed from memory rather than decompressed per query.
        let cache = Cache::new_lru_cache(BLOCK_CACHE);
        let windows = Resolution::ALL.map(|res| {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            table.set_block_cache(&cache);
            o.set_block_based_table_factory(&table);
            let corrupt = corrupt.clone();
            o.set_merge_operator_associative(
                MERGE_OPERATOR,
                move |_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands| {
                    Some(merge_values(layout, existing.into_iter().chain(operands), || {
                        corrupt.inc();
                    }))
                },
            );
            ColumnFamilyDescriptor::new(res.column_family(), o)
        });
        let mut cfs: Vec<ColumnFamilyDescriptor> = windows.into();
        cfs.push(ColumnFamilyDescriptor::new(CF_SERIES, Options::default()));
        cfs.push(ColumnFamilyDescriptor::new(CF_WATERMARKS, Options::default()));
        cfs.push(ColumnFamilyDescriptor::new(CF_EXEMPLARS, Options::default()));
        cfs.push(ColumnFamilyDescriptor::new(CF_ALERTING, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let store = Store { db: Arc::new(db), layout, index: Arc::default(), series_writes: Arc::default() };
        store.load_index()?;
        Ok(store)
    }

    /// Reads the series family into the in-memory index. An entry written before the newest
    /// hour was kept counts as written now: it is retired one retention from now at the
    /// earliest, never before its data.
    fn load_index(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let cf = self.cf(CF_SERIES)?;
        let mut loaded = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let id = <[u8; 8]>::try_from(&*k).map(u64::from_be_bytes).ok();
            match (id, decode_entry(&v, hour_of(now))) {
                (Some(id), Some((labels, hour))) => loaded.push((id, labels, hour)),
                _ => {
                    return Err(StoreError::Corrupt {
                        what: "series index entry",
                        message: format!("key {k:?}"),
                    })
                }
            }
        }
        self.index.extend(loaded);
        Ok(())
    }

    /// The series index.
    pub fn index(&self) -> &SeriesIndex {
        &self.index
    }

    /// The histogram layout new histograms are created with.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingColumnFamily(name))
    }

    /// Writes one flush epoch in a single synced write batch. Returns the batch's size in
    /// bytes and the number of merge operands.
    pub fn write_epoch(&self, epoch: &EpochWrite) -> Result<(usize, usize), StoreError> {
        let mut batch = WriteBatch::default();
        let cfs = [
            self.cf(Resolution::S10.column_family())?,
            self.cf(Resolution::M1.column_family())?,
            self.cf(Resolution::H1.column_family())?,
        ];
        for w in &epoch.windows {
            for (res, cf) in Resolution::ALL.iter().zip(cfs) {
                batch.merge_cf(cf, window_key(*res, w.series, res.align(w.window_start)), &w.histogram);
            }
        }
        // New series, and known ones whose newest window moved to a later hour: their index
        // entries (labels ‖ hour), applied to the in-memory index once the batch is durable.
        let _series_writes = self.series_writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = || epoch.windows.iter().map(|w| (w.series, w.window_start));
        let epoch_hour = written().map(|(_, t)| hour_of(t)).max().unwrap_or(0);
        let mut entries = self.index.newer(written());
        entries.extend(epoch.series.iter().map(|(id, labels)| (*id, labels.clone(), epoch_hour)));
        let series = self.cf(CF_SERIES)?;
        for (id, labels, hour) in &entries {
            batch.put_cf(series, id.to_be_bytes(), encode_entry(labels, *hour));
        }
        let marks = self.cf(CF_WATERMARKS)?;
        for (client, seq) in &epoch.watermarks {
            batch.put_cf(marks, client.to_be_bytes(), seq.to_be_bytes());
        }
        let exemplars = self.cf(CF_EXEMPLARS)?;
        for e in &epoch.exemplars {
            batch.put_cf(exemplars, e.key(), e.value());
        }
        let bytes = batch.size_in_bytes();
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        self.index.extend(entries);
        Ok((bytes, epoch.windows.len() * Resolution::ALL.len()))
    }

    /// The exemplars of `series` whose windows start in `[start, end)` (seconds), in window
    /// order.
    pub fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError> {
        let mut out = Vec::new();
        self.scan(self.cf(CF_EXEMPLARS)?, EXEMPLAR_PARTITION_SECONDS, series, start.max(0), end, |k, v| {
            out.push(Exemplar::decode(k, v).ok_or_else(|| StoreError::Corrupt {
                what: "exemplar",
                message: format!("{} key bytes, {} value bytes", k.len(), v.len()),
            })?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every key and value of `series` in a time-partitioned family whose time
    /// (the key's bytes 12..20) is in `[start, end)`: one bounded iterator per partition that
    /// holds any key. Empty partitions are skipped with one seek, so a range of any width
    /// (`start=0&end=9e18`) costs what the data in it costs, not one step per partition.
    fn scan(
        &self,
        cf: &rocksdb::ColumnFamily,
        partition_seconds: i64,
        series: u64,
        start: i64,
        end: i64,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // Keys hold the partition as a u32: nothing lies outside that.
        let last = ((end - 1).div_euclid(partition_seconds)).min(i64::from(u32::MAX));
        let mut p = start.div_euclid(partition_seconds).max(0);
        while p <= last {
            // Both bounds carry partition p: the upper one is exclusive, so a bound at the
            // next partition's first second still ends the scan inside this series' keys.
            let from = raw_key(p, series, start.max(p * partition_seconds));
            let to = raw_key(p, series, end.min((p + 1) * partition_seconds));
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(to.to_vec());
            for item in self.db.iterator_cf_opt(cf, ro, IteratorMode::From(&from, Direction::Forward)) {
                let (k, v) = item?;
                f(&k, &v)?;
            }
            if p == last {
                break;
            }
            // The next partition holding any key, found with one seek.
            let next = raw_key(p + 1, 0, 0);
            let mut ro = ReadOptions::default();
            if last < i64::from(u32::MAX) {
                ro.set_iterate_upper_bound(raw_key(last + 1, 0, 0).to_vec());
            }
            match self.db.iterator_cf_opt(cf, ro, IteratorMode::From(&next, Direction::Forward)).next() {
                Some(item) => {
                    let (k, _) = item?;
                    let found = k.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
                    match found {
                        Some(found) if i64::from(found) > p => p = i64::from(found),
                        _ => break,
                    }
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Writes (`Some`) or deletes (`None`) alerting records in one synced batch, so rule state
    /// and the notification log survive a crash the moment this returns.
    fn write_alerting(&self, records: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let cf = self.cf(CF_ALERTING)?;
        let mut batch = WriteBatch::default();
        for (key, value) in records {
            match value {
                Some(v) => batch.put_cf(cf, key, v),
                None => batch.delete_cf(cf, key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Every alerting record whose key starts with `prefix`, in key order.
    fn alerting_records(&self, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        let cf = self.cf(CF_ALERTING)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(prefix, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Every client's durable watermark.
    pub fn watermarks(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let cf = self.cf(CF_WATERMARKS)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let (Ok(k), Ok(v)) = (<[u8; 8]>::try_from(&*k), <[u8; 8]>::try_from(&*v)) else {
                return Err(StoreError::Corrupt { what: "watermark", message: "not 8 bytes".into() });
            };
            out.push((u64::from_be_bytes(k), u64::from_be_bytes(v)));
        }
        Ok(out)
    }

    /// Every series in the index, in id order.
    pub fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        Ok(self.index.all())
    }

    /// Calls `f` with each stored window of `series` at `res` whose start is in
    /// `[start, end)`, in time order.
    pub fn for_each_window(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        mut f: impl FnMut(i64, Histogram),
    ) -> Result<(), StoreError> {
        self.for_each_encoded(res, series, start, end, |w, bytes| Histogram::decode(bytes).map(|h| f(w, h)))
    }

    /// Like [`Store::for_each_window`], with each window's encoded histogram, so callers can
    /// merge it without decoding it into a histogram of its own first. An error `f` returns
    /// marks the window corrupt.
    pub fn for_each_encoded(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        mut f: impl FnMut(i64, &[u8]) -> Result<(), tailscope_proto::histogram::HistogramError>,
    ) -> Result<(), StoreError> {
        let start = res.align(start.max(0));
        if end <= start {
            return Ok(());
        }
        self.scan(self.cf(res.column_family())?, res.partition_seconds(), series, start, end, |k, v| {
            let window = window_of_key(k).ok_or_else(|| StoreError::Corrupt {
                what: "window key",
                message: format!("{} bytes", k.len()),
            })?;
            f(window, v).map_err(|e| StoreError::Corrupt {
                what: "histogram",
                message: format!("series {series:016x} window {window}: {e}"),
            })
        })
    }

    /// Like [`Store::for_each_encoded`] for each of `intervals` (`[start, end)` in seconds,
    /// sorted and disjoint), in order, with one iterator per partition: an interval after the
    /// first in the same partition costs a seek, not a new iterator.
    pub fn for_each_encoded_in(
        &self,
        res: Resolution,
        series: u64,
        intervals: &[(i64, i64)],
        mut f: impl FnMut(i64, &[u8]) -> Result<(), tailscope_proto::histogram::HistogramError>,
    ) -> Result<(), StoreError> {
        let cf = self.cf(res.column_family())?;
        let ps = res.partition_seconds();
        let mut i = 0;
        while i < intervals.len() {
            let (start, end) = intervals[i];
            let start = res.align(start.max(0));
            if end <= start {
                i += 1;
                continue;
            }
            let partition = start.div_euclid(ps);
            if partition != (end - 1).div_euclid(ps) || partition > i64::from(u32::MAX) {
                // Spans partitions: the general scan (which skips empty ones).
                self.for_each_encoded(res, series, start, end, &mut f)?;
                i += 1;
                continue;
            }
            // Every following interval inside this partition shares one iterator.
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(raw_key(partition, series, (partition + 1) * ps).to_vec());
            let mut it = self.db.raw_iterator_cf_opt(cf, ro);
            while i < intervals.len() {
                let (from, to) = intervals[i];
                let from = res.align(from.max(0));
                if to <= from {
                    i += 1;
                    continue;
                }
                if from.div_euclid(ps) != partition || (to - 1).div_euclid(ps) != partition {
                    break;
                }
                it.seek(raw_key(partition, series, from));
                while it.valid() {
                    let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
                    let window = window_of_key(k).ok_or_else(|| StoreError::Corrupt {
                        what: "window key",
                        message: format!("{} bytes", k.len()),
                    })?;
                    if window >= to {
                        break;
                    }
                    f(window, v).map_err(|e| StoreError::Corrupt {
                        what: "histogram",
                        message: format!("series {series:016x} window {window}: {e}"),
                    })?;
                    it.next();
                }
                it.status()?;
                i += 1;
            }
        }
        Ok(())
    }

    /// Deletes every partition that lies wholly before its resolution's retention horizon,
    /// then compacts the deleted range so the disk space is reclaimed.
    pub fn apply_retention(
        &self,
        now: i64,
        retention: &RetentionConfig,
    ) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        for res in Resolution::ALL {
            let first_kept = (now - res.retention(retention)).max(0) / res.partition_seconds();
            let deleted = self.expire(self.cf(res.column_family())?, first_kept)?;
            if deleted > 0 {
                report.deleted.push((res, deleted));
            }
        }
        let keep = i64::try_from(retention.exemplars.as_secs()).unwrap_or(i64::MAX);
        let first_kept = now.saturating_sub(keep).max(0) / EXEMPLAR_PARTITION_SECONDS;
        report.exemplar_partitions = self.expire(self.cf(CF_EXEMPLARS)?, first_kept)?;
        report.series_retired = self.retire_series(now, retention)?;
        Ok(report)
    }

    /// Deletes the index entries of the series whose newest window lies before the longest
    /// retention of any resolution (each resolution's data of them is gone or going), then
    /// forgets them in memory. Returns how many.
    fn retire_series(&self, now: i64, retention: &RetentionConfig) -> Result<u64, StoreError> {
        let longest = Resolution::ALL.iter().map(|r| r.retention(retention)).max().unwrap_or(i64::MAX);
        let first_kept_hour = hour_of(now.saturating_sub(longest));
        let _series_writes = self.series_writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired = self.index.expired(first_kept_hour);
        if expired.is_empty() {
            return Ok(0);
        }
        let cf = self.cf(CF_SERIES)?;
        let mut batch = WriteBatch::default();
        for id in &expired {
            batch.delete_cf(cf, id.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(self.index.retire(&expired, first_kept_hour) as u64)
    }

    /// Range-deletes the partitions of a time-partitioned family before `first_kept` and
    /// compacts them away; returns how many partitions that spanned.
    fn expire(&self, cf: &rocksdb::ColumnFamily, first_kept: i64) -> Result<u64, StoreError> {
        let first_kept = u32::try_from(first_kept).unwrap_or(u32::MAX);
        let oldest = match self.db.iterator_cf(cf, IteratorMode::Start).next() {
            Some(item) => item?.0.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes),
            None => None,
        };
        let Some(oldest) = oldest.filter(|&o| o < first_kept) else { return Ok(0) };
        let (from, to) = ([0u8; 4], first_kept.to_be_bytes());
        self.db.delete_range_cf(cf, from, to)?;
        self.db.compact_range_cf(cf, Some(from), Some(to));
        Ok(u64::from(first_kept - oldest))
    }

    /// Flushes memtables to SST files (used before measuring disk use).
    pub fn flush(&self) -> Result<(), StoreError> {
        for res in Resolution::ALL {
            self.db.flush_cf(self.cf(res.column_family())?)?;
        }
        Ok(())
    }

    /// Compacts a whole resolution (used by tests and benchmarks to measure settled size).
    pub fn compact(&self, res: Resolution) -> Result<(), StoreError> {
        self.db.compact_range_cf(self.cf(res.column_family())?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Live bytes (SST files plus memtables) of each column family.
    pub fn sizes(&self) -> Vec<(&'static str, u64)> {
        let names = [
            Resolution::S10.column_family(),
            Resolution::M1.column_family(),
            Resolution::H1.column_family(),
            CF_SERIES,
            CF_WATERMARKS,
            CF_EXEMPLARS,
            CF_ALERTING,
        ];
        names
            .into_iter()
            .filter_map(|name| {
                let cf = self.db.cf_handle(name)?;
                let prop = |p: &str| self.db.property_int_value_cf(cf, p).ok().flatten().unwrap_or(0);
                Some((name, prop("rocksdb.live-sst-files-size") + prop("rocksdb.cur-size-all-mem-tables")))
            })
            .collect()
    }

    /// Syncs the write-ahead log (at shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        Ok(())
    }
}

/// Adds encoded histograms; corrupt ones are skipped and reported through `on_corrupt`, so one
/// bad operand never makes a key unreadable.
pub fn merge_values<'a>(
    layout: Layout,
    values: impl IntoIterator<Item = &'a [u8]>,
    mut on_corrupt: impl FnMut(),
) -> Vec<u8> {
    let mut values = values.into_iter();
    let Some(first) = values.next() else { return Histogram::new(layout).to_bytes() };
    let mut rest = values.peekable();
    // One valid operand and nothing to merge it with (a window written in one epoch, read
    // before compaction folded it): it already is the answer.
    if rest.peek().is_none() && Histogram::validate(first).is_ok() {
        return first.to_vec();
    }
    let mut acc: Option<Histogram> = None;
    for bytes in std::iter::once(first).chain(rest) {
        let ok = match acc.as_mut() {
            Some(h) => h.merge_encoded(bytes).is_ok(),
            None => Histogram::decode(bytes).map(|h| acc = Some(h)).is_ok(),
        };
        if !ok {
            on_corrupt();
        }
    }
    acc.unwrap_or_else(|| Histogram::new(layout)).to_bytes()
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
}

impl StateKind {
    /// The key prefix of the kind (unchanged since the first release: stores written then
    /// read the same).
    fn prefix(self) -> &'static [u8] {
        match self {
            StateKind::Silence => b"silence\0",
            StateKind::NotificationLog => b"nflog\0",
            StateKind::RuleState => b"rule\0",
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

impl StateStore for Store {
    fn state(&self, kind: StateKind, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        let own = kind.prefix().len();
        let records = self.alerting_records(&[kind.prefix(), prefix].concat())?;
        Ok(records.into_iter().map(|(k, v)| (k[own..].to_vec(), v)).collect())
    }

    fn write_state(&self, kind: StateKind, records: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let prefixed: Vec<_> =
            records.iter().map(|(k, v)| ([kind.prefix(), k].concat(), v.clone())).collect();
        self.write_alerting(&prefixed)
    }
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
    /// The layout of new histograms.
    fn layout(&self) -> Layout;
    /// The exemplars kept for `series` in windows starting in `[start, end)` (seconds), in
    /// time order.
    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError>;
}

impl Source for Store {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        Store::series(self)
    }

    fn select(&self, matchers: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        Ok(self.index().select(matchers, at_most))
    }

    fn label_values(&self, label: &str, limit: usize) -> Result<(Vec<String>, bool), StoreError> {
        Ok(self.index().values(label, limit))
    }

    fn windows(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.for_each_encoded(res, series, start, end, f)
    }

    fn windows_in(
        &self,
        res: Resolution,
        series: u64,
        intervals: &[(i64, i64)],
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.for_each_encoded_in(res, series, intervals, f)
    }

    fn layout(&self) -> Layout {
        Store::layout(self)
    }

    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError> {
        Store::exemplars(self, series, start, end)
    }
}

#[cfg(test)]
mod tests;
