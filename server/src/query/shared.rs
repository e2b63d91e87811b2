//! Reads shared between the queries of one evaluation: a rule group evaluates every rule at
//! the same instant, and rules that watch one selector (a p99 and a p95 of the same service, a
//! warning and a critical threshold) read the same series and the same windows. [`SharedReads`]
//! wraps a [`Source`] for the length of one group evaluation and answers a repeated selection
//! or window read from memory, so a group reads each (series, resolution, range) once however
//! many of its rules need it.
//!
//! What it keeps is bounded by a byte budget; past it, reads go to the source as if there were
//! no sharing. It lives no longer than the evaluation, so it never serves stale data across
//! evaluations.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use promql_parser::label::{MatchOp, Matcher};
use tailscope_proto::histogram::Layout;

use crate::series::SeriesLabels;
use crate::store::{Exemplar, Resolution, Source, StoreError, WindowFn};

/// A selection's identity: each matcher as (name, operator, value), and how many were asked.
type SelectKey = (Vec<(String, &'static str, String)>, usize);

/// A window read's identity: resolution, series (one, or the members of a merged read), the
/// intervals asked and whether whole intervals were merged.
type WindowsKey = (Resolution, Vec<u64>, Vec<(i64, i64)>, bool);

/// The windows one read returned: their starts and their encodings, end to end in `bytes`.
#[derive(Debug, Default)]
struct Windows {
    starts: Vec<(i64, std::ops::Range<usize>)>,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Kept {
    selections: HashMap<SelectKey, Arc<Vec<(u64, SeriesLabels)>>>,
    windows: HashMap<WindowsKey, Arc<Windows>>,
    /// Bytes held by `windows`.
    bytes: usize,
}

/// A [`Source`] that remembers what it read for as long as it lives, up to `budget` bytes of
/// windows.
pub struct SharedReads<'a> {
    source: &'a dyn Source,
    budget: usize,
    kept: Mutex<Kept>,
}

impl std::fmt::Debug for SharedReads<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.kept.lock();
        f.debug_struct("SharedReads")
            .field("selections", &kept.selections.len())
            .field("windows", &kept.windows.len())
            .field("bytes", &kept.bytes)
            .finish()
    }
}

fn op_name(op: &MatchOp) -> &'static str {
    match op {
        MatchOp::Equal => "=",
        MatchOp::NotEqual => "!=",
        MatchOp::Re(_) => "=~",
        MatchOp::NotRe(_) => "!~",
    }
}

impl<'a> SharedReads<'a> {
    /// Shares the reads of `source`, keeping at most `budget` bytes of windows.
    pub fn new(source: &'a dyn Source, budget: usize) -> SharedReads<'a> {
        SharedReads { source, budget, kept: Mutex::new(Kept::default()) }
    }

    /// How many window reads are kept, and their bytes.
    pub fn kept(&self) -> (usize, usize) {
        let kept = self.kept.lock();
        (kept.windows.len(), kept.bytes)
    }
}

/// A read of windows, given where to send them.
type ReadFn<'r> = dyn FnMut(&mut WindowFn<'_>) -> Result<(), StoreError> + 'r;

impl SharedReads<'_> {
    /// Gives `f` the windows `read` reads, from memory when `key` was read before; keeps them
    /// while the budget lasts.
    fn kept_read(
        &self,
        key: WindowsKey,
        f: &mut WindowFn<'_>,
        read: &mut ReadFn<'_>,
    ) -> Result<(), StoreError> {
        let (hit, full) = {
            let kept = self.kept.lock();
            (kept.windows.get(&key).cloned(), kept.bytes >= self.budget)
        };
        if full && hit.is_none() {
            // Nothing more can be kept: read through without copying.
            return read(f);
        }
        if let Some(hit) = hit {
            for (start, range) in &hit.starts {
                f(*start, &hit.bytes[range.clone()]).map_err(|e| StoreError::Corrupt {
                    what: "histogram",
                    message: format!("series {:016x?} window {start}: {e}", key.1),
                })?;
            }
            return Ok(());
        }
        let mut windows = Windows::default();
        read(&mut |start, bytes| {
            let at = windows.bytes.len();
            windows.bytes.extend_from_slice(bytes);
            windows.starts.push((start, at..windows.bytes.len()));
            f(start, bytes)
        })?;
        let mut kept = self.kept.lock();
        let size =
            windows.bytes.len() + windows.starts.len() * std::mem::size_of::<(i64, std::ops::Range<usize>)>();
        if kept.bytes + size <= self.budget {
            kept.bytes += size;
            kept.windows.insert(key, Arc::new(windows));
        }
        Ok(())
    }
}

impl Source for SharedReads<'_> {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        self.source.series()
    }

    fn select(&self, matchers: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        let mut named: Vec<(String, &'static str, String)> =
            matchers.iter().map(|m| (m.name.clone(), op_name(&m.op), m.value.clone())).collect();
        // The same matchers in another order select the same series.
        named.sort_unstable();
        let key = (named, at_most);
        if let Some(hit) = self.kept.lock().selections.get(&key) {
            return Ok(hit.as_ref().clone());
        }
        let selected = self.source.select(matchers, at_most)?;
        self.kept.lock().selections.insert(key, Arc::new(selected.clone()));
        Ok(selected)
    }

    fn label_values(&self, label: &str, limit: usize) -> Result<(Vec<String>, bool), StoreError> {
        self.source.label_values(label, limit)
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
        self.kept_read((res, vec![series], intervals.to_vec(), false), f, &mut |f| {
            self.source.windows_in(res, series, intervals, f)
        })
    }

    fn merged_windows(
        &self,
        res: Resolution,
        members: &[u64],
        intervals: &[(i64, i64)],
        whole: bool,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.kept_read((res, members.to_vec(), intervals.to_vec(), whole), f, &mut |f| {
            self.source.merged_windows(res, members, intervals, whole, f)
        })
    }

    fn read_ahead(&self, res: Resolution, groups: &[&[u64]], intervals: &[(i64, i64)], whole: bool) {
        let kept = self.kept.lock();
        let unkept: Vec<&[u64]> = groups
            .iter()
            .filter(|m| !kept.windows.contains_key(&(res, m.to_vec(), intervals.to_vec(), whole)))
            .copied()
            .collect();
        drop(kept);
        self.source.read_ahead(res, &unkept, intervals, whole);
    }

    fn layout(&self) -> Layout {
        self.source.layout()
    }

    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError> {
        self.source.exemplars(series, start, end)
    }
}

#[cfg(test)]
mod tests;
