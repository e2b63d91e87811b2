//! The RocksDB implementation of the store (see the layout in the module above): column
//! families per resolution, the series family behind the in-memory index, watermarks,
//! exemplars and alerting state.

use std::path::Path;
use std::sync::Arc;

use ::rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    MergeOperands, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};
use promql_parser::label::Matcher;
use tailscope_proto::histogram::{Histogram, Layout};

use super::index::{decode_entry, encode_entry, hour_of, SeriesIndex};
use super::keys::{raw_key, window_key, window_of_key, EXEMPLAR_PARTITION_SECONDS};
use super::merge::{merge_values, MERGE_OPERATOR};
use super::{
    EpochWrite, Exemplar, Record, Resolution, RetentionConfig, RetentionReport, Source, StateKind,
    StateStore, StoreError, Watermark, WindowFn,
};
use crate::series::SeriesLabels;
use crate::telemetry::Metrics;

pub(super) const CF_SERIES: &str = "series";
pub(super) const CF_WATERMARKS: &str = "watermarks";
pub(super) const CF_EXEMPLARS: &str = "exemplars";
const CF_ALERTING: &str = "alerting";
pub(super) const CF_LOG: &str = "log";
/// Memory for all memtables together.
const MEMTABLE_BUDGET: usize = 64 << 20;
/// Memory for cached (uncompressed) blocks of the window families.
const BLOCK_CACHE: usize = 128 << 20;

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pub(super) db: Arc<DB>,
    pub(super) layout: Layout,
    pub(super) index: Arc<SeriesIndex>,
    /// Held while series entries are written or retired, so a retirement never deletes an
    /// entry an epoch is rewriting.
    pub(super) series_writes: Arc<std::sync::Mutex<()>>,
    /// `tailscope_corrupt_operands_total`: what the merge operator (and an epoch's merge of
    /// one key's deltas) skipped.
    pub(super) corrupt: prometheus_client::metrics::counter::Counter,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, layout: Layout, metrics: &Metrics) -> Result<Store, StoreError> {
        let corrupt = metrics.corrupt_operands.clone();
        let (opts, cfs) = Store::descriptors(layout, &corrupt, BLOCK_CACHE);
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let store =
            Store { db: Arc::new(db), layout, index: Arc::default(), series_writes: Arc::default(), corrupt };
        store.load_index()?;
        Ok(store)
    }

    /// The database's options and column families: one memtable budget for all families,
    /// and the window families' merge operator, compression and block cache of `cache` bytes.
    pub(super) fn descriptors(
        layout: Layout,
        corrupt: &prometheus_client::metrics::counter::Counter,
        cache: usize,
    ) -> (Options, Vec<ColumnFamilyDescriptor>) {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_keep_log_file_num(4);
        // One budget for the memtables of every column family, so the store's memory stays
        // bounded however many series are written (RocksDB flushes the largest when it is hit).
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        // One block cache for the window families, so the windows a dashboard re-reads every
        // refresh are served decompressed from memory rather than decompressed per query.
        let cache = Cache::new_lru_cache(cache);
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
        for name in [CF_SERIES, CF_WATERMARKS, CF_EXEMPLARS, CF_ALERTING, CF_LOG] {
            cfs.push(ColumnFamilyDescriptor::new(name, Options::default()));
        }
        (opts, cfs)
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

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// The series index.
    pub fn index(&self) -> &SeriesIndex {
        &self.index
    }

    /// The histogram layout new histograms are created with.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub(super) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingColumnFamily(name))
    }

    /// Writes one flush epoch in a single synced write batch. Returns the batch's size in
    /// bytes and the number of merge operands.
    pub fn write_epoch(&self, epoch: &EpochWrite) -> Result<(usize, usize), StoreError> {
        // Sized up front: a batch of a million operands grown by doubling copied itself over
        // and over (a fifth of the server's CPU at a million active series).
        let operands: usize = epoch.windows.iter().map(|w| w.histogram.len() + 32).sum();
        let mut batch = WriteBatch::with_capacity_bytes(
            operands * Resolution::ALL.len() + epoch.series.len() * 128 + epoch.exemplars.len() * 128 + 4096,
        );
        let cfs = [
            self.cf(Resolution::S10.column_family())?,
            self.cf(Resolution::M1.column_family())?,
            self.cf(Resolution::H1.column_family())?,
        ];
        // Each family's operands in key order: a memtable insert then starts from where the
        // previous one ended instead of searching its skip list from the top (with a million
        // series an epoch's keys in arrival order made that search most of the server's CPU).
        // The deltas of one key are one operand: the six ten-second windows of a minute, the
        // 360 of an hour (a backfill, a catch-up, an epoch spilled early) would otherwise each
        // be an operand every read of the fresh window merges again until compaction.
        let mut keyed: Vec<([u8; 20], &[u8])> = Vec::with_capacity(epoch.windows.len());
        let mut operands = 0;
        for (res, cf) in Resolution::ALL.iter().zip(cfs) {
            keyed.clear();
            keyed.extend(
                epoch
                    .windows
                    .iter()
                    .map(|w| (window_key(*res, w.series, res.align(w.window_start)), &w.histogram[..])),
            );
            keyed.sort_unstable_by_key(|k| k.0);
            for run in keyed.chunk_by(|a, b| a.0 == b.0) {
                match run {
                    [(key, histogram)] => batch.merge_cf(cf, key, histogram),
                    // Added as the merge operator adds them.
                    _ => batch.merge_cf(
                        cf,
                        run[0].0,
                        merge_values(self.layout, run.iter().map(|(_, h)| *h), || {
                            self.corrupt.inc();
                        }),
                    ),
                }
                operands += 1;
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
        // Stable: an id written twice keeps its last entry last.
        entries.sort_by_key(|(id, _, _)| *id);
        for (id, labels, hour) in &entries {
            batch.put_cf(series, id.to_be_bytes(), encode_entry(labels, *hour));
        }
        let marks = self.cf(CF_WATERMARKS)?;
        for client in &epoch.forgotten_clients {
            batch.delete_cf(marks, client.to_be_bytes());
        }
        for (client, mark) in &epoch.watermarks {
            batch.put_cf(marks, client.to_be_bytes(), mark.encode());
        }
        let exemplars = self.cf(CF_EXEMPLARS)?;
        let mut keyed: Vec<_> = epoch.exemplars.iter().map(|e| (e.key(), e)).collect();
        keyed.sort_unstable_by_key(|k| k.0);
        for (key, e) in keyed {
            batch.put_cf(exemplars, key, e.value());
        }
        if !epoch.log_positions.is_empty() {
            let log = self.cf(CF_LOG)?;
            for (partition, position) in &epoch.log_positions {
                batch.put_cf(log, partition.to_be_bytes(), position.encode());
            }
        }
        let bytes = batch.size_in_bytes();
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        self.index.extend(entries);
        Ok((bytes, operands))
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
    pub(super) fn alerting_records(&self, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
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
    pub fn watermarks(&self) -> Result<Vec<(u64, Watermark)>, StoreError> {
        let cf = self.cf(CF_WATERMARKS)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let (Ok(k), Some(mark)) = (<[u8; 8]>::try_from(&*k), Watermark::decode(&v)) else {
                return Err(StoreError::Corrupt {
                    what: "watermark",
                    message: format!("{} key bytes, {} value bytes", k.len(), v.len()),
                });
            };
            out.push((u64::from_be_bytes(k), mark));
        }
        Ok(out)
    }

    /// How far this store applied each partition's log (cluster mode; empty otherwise).
    pub fn log_positions(&self) -> Result<Vec<(u32, super::LogPosition)>, StoreError> {
        let cf = self.cf(CF_LOG)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            if super::copy::is_copy_marker(&k) {
                continue;
            }
            let (Ok(k), Some(position)) = (<[u8; 4]>::try_from(&*k), super::LogPosition::decode(&v)) else {
                return Err(StoreError::Corrupt {
                    what: "log position",
                    message: format!("{} key bytes, {} value bytes", k.len(), v.len()),
                });
            };
            out.push((u32::from_be_bytes(k), position));
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
            CF_LOG,
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
