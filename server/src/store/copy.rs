//! A partition's copy from one store to another (cluster mode: a store that takes a partition
//! on starts from a copy of a caught-up owner's, then replays the log from the copy's position).
//!
//! **Source.** [`Store::checkpoint`] makes a RocksDB checkpoint — hard links to the live files
//! and the write-ahead log, so it copies no data — and opens it on its own: one point of the
//! store's history, which no later write changes. [`Checkpoint::page`] reads one partition's
//! share of it from a [`CopyCursor`], a page at a time: its series, their windows at each
//! resolution and their exemplars (merged values, not operands), then its clients' watermarks.
//! The position the checkpoint holds for the partition ([`Checkpoint::position`]) was written
//! in the same batches as those values, so the share is exactly the log applied up to it.
//!
//! **Landing.** [`Store::begin_copy`] sets a marker for the partition (synced) and then wipes
//! whatever this store held of it; [`Store::land`] checks each page's records and writes them;
//! [`Store::finish_copy`] writes the copy's position and removes the marker in one synced
//! batch. A store that stops in between restarts with the marker set ([`Store::copying`]) and
//! no position: what it holds of the partition is part of a copy, to be wiped and copied again
//! ([`Store::abandon_copy`] wipes it for a replay from the log instead).

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ::rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use tailscope_proto::histogram::Histogram;

use super::index::{decode_entry, hour_of};
use super::rocksdb::{CF_EXEMPLARS, CF_LOG, CF_SERIES, CF_WATERMARKS};
use super::{Exemplar, LogPosition, Resolution, Store, StoreError, Watermark};
use crate::clock::{Clock, SystemClock};
use crate::series::SeriesLabels;

/// The block cache of an opened checkpoint: it is read once, front to back.
const CHECKPOINT_CACHE: usize = 8 << 20;
/// Deletions per write batch when a partition is wiped.
const WIPE_BATCH: usize = 64 << 10;
/// The suffix of a partition's marker key in the `log` family.
const MARKER: &[u8; 4] = b"copy";

/// What of a store is one partition's.
pub struct Share<'a> {
    /// Whether a series, by its labels, lives in the partition.
    pub series: &'a (dyn Fn(&SeriesLabels) -> bool + Sync),
    /// The keys its clients' watermarks are kept under.
    pub clients: Range<u64>,
}

impl std::fmt::Debug for Share<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share").field("clients", &self.clients).finish_non_exhaustive()
    }
}

/// The families a copy carries, in the order it carries them: series first, so the landing
/// side knows every series before their windows and exemplars.
fn family(i: u32) -> Option<&'static str> {
    Some(match i {
        0 => CF_SERIES,
        1 => Resolution::S10.column_family(),
        2 => Resolution::M1.column_family(),
        3 => Resolution::H1.column_family(),
        4 => CF_EXEMPLARS,
        5 => CF_WATERMARKS,
        _ => return None,
    })
}
const SERIES: u32 = 0;
const EXEMPLARS: u32 = 4;
const WATERMARKS: u32 = 5;
const FAMILIES: u32 = 6;

/// One record of a copy: its family (in the copy's numbering), key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// The family: 0 series, 1–3 windows of 10 s, 1 m and 1 h, 4 exemplars, 5 watermarks.
    pub family: u32,
    /// The key.
    pub key: Vec<u8>,
    /// The value (a window's merged histogram).
    pub value: Vec<u8>,
}

/// Where a copy's next page starts: after `after` in family `family` (`None`: at its start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyCursor {
    /// The family.
    pub family: u32,
    /// The last key already given.
    pub after: Option<Vec<u8>>,
}

/// The series a key of family `family` belongs to (windows and exemplars: partition ‖ series
/// ‖ …; series: the id).
fn series_of(family: u32, key: &[u8]) -> Option<u64> {
    let bytes = match family {
        SERIES => key.get(..8).filter(|_| key.len() == 8)?,
        _ => key.get(4..12)?,
    };
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn key_u64(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

fn marker_key(partition: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(MARKER);
    k
}

/// Whether a key of the `log` family is a copy's marker (not a position).
pub(super) fn is_copy_marker(key: &[u8]) -> bool {
    key.len() == 8 && &key[4..] == MARKER
}

fn corrupt(what: &'static str, message: String) -> StoreError {
    StoreError::Corrupt { what, message }
}

/// A store's checkpoint, opened for reading; its directory is deleted when it is dropped.
pub struct Checkpoint {
    db: Option<DB>,
    dir: PathBuf,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        drop(self.db.take());
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a checkpoint");
        }
    }
}

impl Checkpoint {
    fn db(&self) -> &DB {
        // Taken only by `drop`.
        self.db
            .as_ref()
            .unwrap_or_else(|| unreachable!("a checkpoint's database is open until it is dropped"))
    }

    fn cf(&self, name: &'static str) -> Result<&::rocksdb::ColumnFamily, StoreError> {
        self.db().cf_handle(name).ok_or(StoreError::MissingColumnFamily(name))
    }

    /// How far the checkpoint's store had applied `partition`'s log (0: nothing).
    pub fn position(&self, partition: u32) -> Result<LogPosition, StoreError> {
        match self.db().get_cf(self.cf(CF_LOG)?, partition.to_be_bytes())? {
            None => Ok(LogPosition::default()),
            Some(v) => LogPosition::decode(&v)
                .ok_or_else(|| corrupt("log position", format!("{} value bytes", v.len()))),
        }
    }

    /// The ids of the series of `share` the checkpoint holds, sorted.
    pub fn members(&self, share: &Share<'_>) -> Result<Vec<u64>, StoreError> {
        let mut ids: Vec<u64> = members(self.db(), self.cf(CF_SERIES)?, share)?.into_iter().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The records of the partition (its series `members`, sorted; its `clients'`
    /// watermarks) from `from`, about `budget` bytes of them, looking at no more than `scan`
    /// keys; and where the next page starts (`None`: this was the last).
    ///
    /// A family keyed by series is read by skipping: from a key of a series that is not a
    /// member, it seeks to the next member's first key in the same time partition (or to the
    /// next time partition), so a page looks at about one key per member and time partition
    /// beyond the keys it takes — a partition's share of a large store is read without
    /// reading (and merging) the rest of it.
    pub fn page(
        &self,
        members: &[u64],
        clients: &Range<u64>,
        from: &CopyCursor,
        budget: usize,
        scan: usize,
    ) -> Result<(Vec<Copied>, Option<CopyCursor>), StoreError> {
        let mut out = Vec::new();
        let (mut bytes, mut scanned) = (0, 0);
        for f in from.family..FAMILIES {
            let name = family(f).ok_or_else(|| corrupt("copy cursor", format!("family {f}")))?;
            let mut it = self.db().raw_iterator_cf(self.cf(name)?);
            let after = if f == from.family { from.after.as_deref() } else { None };
            match after {
                Some(a) => {
                    it.seek(a);
                    if it.key() == Some(a) {
                        it.next();
                    }
                }
                None if f == WATERMARKS => it.seek(clients.start.to_be_bytes()),
                None => it.seek_to_first(),
            }
            // The last key looked at: where a page that stops before the next key ends.
            let mut prev: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
            // Series ids sit after a time partition (`u32`) in windows and exemplars.
            let at = if f == SERIES { 0 } else { 4 };
            while let Some(k) = it.key() {
                if scanned >= scan {
                    return Ok((out, Some(CopyCursor { family: f, after: prev })));
                }
                scanned += 1;
                let (take, skip_to) = if f == WATERMARKS {
                    match key_u64(k) {
                        Some(id) if id >= clients.end => break,
                        Some(id) => (clients.contains(&id), None),
                        None => (false, None),
                    }
                } else {
                    match series_of(f, k).map(|s| members.binary_search(&s)) {
                        Some(Ok(_)) => (true, None),
                        Some(Err(i)) => (false, Some(next_member(k, at, members.get(i).copied()))),
                        None => (false, None),
                    }
                };
                if take {
                    let v = it.value().unwrap_or_default();
                    let size = k.len() + v.len() + 16;
                    // A page never grows past its budget by a record (unless that record
                    // alone is the page).
                    if bytes + size > budget && !out.is_empty() {
                        return Ok((out, Some(CopyCursor { family: f, after: prev })));
                    }
                    bytes += size;
                    out.push(Copied { family: f, key: k.to_vec(), value: v.to_vec() });
                }
                prev = Some(k.to_vec());
                match skip_to {
                    Some(Some(target)) => it.seek(target),
                    Some(None) => break,
                    None => it.next(),
                }
            }
            it.status()?;
        }
        Ok((out, None))
    }
}

/// Where the next member's keys start after key `k` of a non-member (series at byte `at`):
/// `member`'s first key in `k`'s time partition, else the next time partition's first key
/// (`None`: no later key can be a member's).
fn next_member(k: &[u8], at: usize, member: Option<u64>) -> Option<Vec<u8>> {
    let prefix = k.get(..at)?;
    match member {
        Some(m) => Some([prefix, &m.to_be_bytes()].concat()),
        None if at == 0 => None,
        None => {
            let tp = u32::from_be_bytes(prefix.try_into().ok()?);
            tp.checked_add(1).map(|next| next.to_be_bytes().to_vec())
        }
    }
}

fn members(db: &DB, series: &::rocksdb::ColumnFamily, share: &Share<'_>) -> Result<HashSet<u64>, StoreError> {
    let mut out = HashSet::new();
    for item in db.iterator_cf(series, IteratorMode::Start) {
        let (k, v) = item?;
        let (Some(id), Some((labels, _))) = (key_u64(&k), decode_entry(&v, 0)) else {
            return Err(corrupt("series index entry", format!("key {k:?}")));
        };
        if (share.series)(&labels) {
            out.insert(id);
        }
    }
    Ok(out)
}

impl Store {
    /// Makes a checkpoint of the store in `dir` (which must not exist; on the store's file
    /// system, so its files are hard links) and opens it.
    pub fn checkpoint(&self, dir: &Path) -> Result<Checkpoint, StoreError> {
        ::rocksdb::checkpoint::Checkpoint::new(&*self.db)?.create_checkpoint(dir)?;
        let (opts, cfs) = Store::descriptors(self.layout, &self.corrupt, CHECKPOINT_CACHE);
        match DB::open_cf_descriptors(&opts, dir, cfs) {
            Ok(db) => Ok(Checkpoint { db: Some(db), dir: dir.to_owned() }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                Err(e.into())
            }
        }
    }

    /// The partitions a copy was landing in when the store stopped.
    pub fn copying(&self) -> Result<Vec<u32>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LOG)?, IteratorMode::Start) {
            let (k, _) = item?;
            if is_copy_marker(&k) {
                out.extend(k.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes));
            }
        }
        Ok(out)
    }

    /// The ids of the series of `share` the store holds.
    pub fn series_of(&self, share: &Share<'_>) -> Result<HashSet<u64>, StoreError> {
        members(&self.db, self.cf(CF_SERIES)?, share)
    }

    /// Marks `partition` as landing a copy (durably), then wipes what the store held of it:
    /// its series (and their windows and exemplars), its clients' watermarks and its position.
    /// Returns how many series were wiped.
    pub fn begin_copy(&self, partition: u32, share: &Share<'_>) -> Result<u64, StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(self.cf(CF_LOG)?, marker_key(partition), [], &wo)?;
        self.wipe(partition, share)
    }

    /// Wipes what a copy landed of `partition` and removes its marker: the partition is read
    /// from the log's start instead.
    pub fn abandon_copy(&self, partition: u32, share: &Share<'_>) -> Result<u64, StoreError> {
        let wiped = self.wipe(partition, share)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.delete_cf_opt(self.cf(CF_LOG)?, marker_key(partition), &wo)?;
        Ok(wiped)
    }

    fn wipe(&self, partition: u32, share: &Share<'_>) -> Result<u64, StoreError> {
        let _series_writes = self.series_writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let series = self.cf(CF_SERIES)?;
        let wiped = members(&self.db, series, share)?;
        let mut batch = WriteBatch::default();
        // A partition never held has no series here: nothing to look for.
        for f in (1..=EXEMPLARS).filter(|_| !wiped.is_empty()) {
            let name = family(f).ok_or_else(|| corrupt("copy family", format!("{f}")))?;
            let cf = self.cf(name)?;
            for item in self.db.iterator_cf(cf, IteratorMode::Start) {
                let (k, _) = item?;
                if series_of(f, &k).is_some_and(|s| wiped.contains(&s)) {
                    batch.delete_cf(cf, &k);
                    if batch.len() >= WIPE_BATCH {
                        self.db.write(std::mem::take(&mut batch))?;
                    }
                }
            }
        }
        for id in &wiped {
            batch.delete_cf(series, id.to_be_bytes());
        }
        let marks = self.cf(CF_WATERMARKS)?;
        batch.delete_range_cf(marks, share.clients.start.to_be_bytes(), share.clients.end.to_be_bytes());
        batch.delete_cf(self.cf(CF_LOG)?, partition.to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        let ids: Vec<u64> = wiped.into_iter().collect();
        self.index.retire(&ids, u32::MAX);
        Ok(ids.len() as u64)
    }

    /// Checks and writes one page of a copy: every series must be of the partition
    /// (`is_member`), every window and exemplar of a series landed before it (`members`, which
    /// the page's series join), every watermark of `clients`. Nothing of a page that fails a
    /// check is written (the copy is then abandoned, `members` with it). Not synced:
    /// [`Store::finish_copy`]'s synced write covers it.
    pub fn land(
        &self,
        records: &[Copied],
        is_member: &(dyn Fn(&SeriesLabels) -> bool + Sync),
        members: &mut HashSet<u64>,
        clients: &Range<u64>,
    ) -> Result<(), StoreError> {
        let now_hour = hour_of(SystemClock.now_seconds());
        let mut batch = WriteBatch::default();
        let mut entries = Vec::new();
        for r in records {
            let bad =
                |why: &str| corrupt("copied record", format!("family {}, key {:?}: {why}", r.family, r.key));
            let name = family(r.family).ok_or_else(|| bad("no such family"))?;
            match r.family {
                SERIES => {
                    let id = key_u64(&r.key).ok_or_else(|| bad("not a series id"))?;
                    let (labels, hour) =
                        decode_entry(&r.value, now_hour).ok_or_else(|| bad("labels do not decode"))?;
                    if !is_member(&labels) {
                        return Err(bad("a series of another partition"));
                    }
                    members.insert(id);
                    entries.push((id, labels, hour));
                }
                WATERMARKS => {
                    let id = key_u64(&r.key).ok_or_else(|| bad("not a client key"))?;
                    if !clients.contains(&id) || Watermark::decode(&r.value).is_none() {
                        return Err(bad("not a watermark of the partition's clients"));
                    }
                }
                f => {
                    let series = series_of(f, &r.key).ok_or_else(|| bad("too short"))?;
                    if !members.contains(&series) {
                        return Err(bad("of a series the copy did not carry"));
                    }
                    let valid = if f == EXEMPLARS {
                        Exemplar::decode(&r.key, &r.value).is_some()
                    } else {
                        r.key.len() == 20 && Histogram::validate(&r.value).is_ok()
                    };
                    if !valid {
                        return Err(bad("does not decode"));
                    }
                }
            }
            batch.put_cf(self.cf(name)?, &r.key, &r.value);
        }
        let _series_writes = self.series_writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.db.write(batch)?;
        self.index.extend(entries);
        Ok(())
    }

    /// Ends a copy of `partition`: writes `position` and removes the marker in one synced
    /// batch. Returns the watermarks of `clients` the copy brought.
    pub fn finish_copy(
        &self,
        partition: u32,
        position: LogPosition,
        clients: &Range<u64>,
    ) -> Result<Vec<(u64, Watermark)>, StoreError> {
        let log = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(log, partition.to_be_bytes(), position.encode());
        batch.delete_cf(log, marker_key(partition));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        let marks = self.cf(CF_WATERMARKS)?;
        let mut out = Vec::new();
        let start = clients.start.to_be_bytes();
        for item in self.db.iterator_cf(marks, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            let Some(id) = key_u64(&k).filter(|id| *id < clients.end) else { break };
            let mark =
                Watermark::decode(&v).ok_or_else(|| corrupt("watermark", format!("client key {id}")))?;
            out.push((id, mark));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
