//! An in-memory store: series, windows at every resolution and exemplars ([`Source`]), and
//! alerting state ([`StateStore`]), in ordered maps. The one test double for both sides — the
//! engine's, the label APIs', the rule loader's and alerting's unit tests, and the fuzz
//! targets read it as they would read the store.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use promql_parser::label::Matcher;
use tailscope_proto::histogram::{Histogram, Layout};

use super::{Exemplar, Record, Resolution, Source, StateKind, StateStore, StoreError, WindowFn};
use crate::series::SeriesLabels;

/// Alerting state by kind and key.
type StateRecords = BTreeMap<(StateKind, Vec<u8>), Vec<u8>>;

/// Series, windows, exemplars and alerting state in memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    layout: Layout,
    series: BTreeMap<u64, SeriesLabels>,
    windows: BTreeMap<(Resolution, u64, i64), Histogram>,
    exemplars: BTreeMap<(u64, i64, i64), Exemplar>,
    /// Shared by clones, as the store's handles share one database.
    state: Arc<Mutex<StateRecords>>,
}

impl MemoryStore {
    /// An empty store whose histograms have `layout`.
    pub fn new(layout: Layout) -> MemoryStore {
        MemoryStore { layout, ..MemoryStore::default() }
    }

    /// Makes `labels` a series (with no windows yet); returns its id.
    pub fn add_series(&mut self, labels: SeriesLabels) -> u64 {
        let id = labels.id();
        self.series.entry(id).or_insert(labels);
        id
    }

    /// Records `count` spans of `nanos` in the series `labels` at `t` (seconds), in the
    /// window of every resolution, as the pipeline and the store's rollups do.
    pub fn record(&mut self, labels: SeriesLabels, t: i64, nanos: u64, count: u64) -> u64 {
        let id = self.add_series(labels);
        for res in Resolution::ALL {
            self.windows
                .entry((res, id, res.align(t)))
                .or_insert_with(|| Histogram::new(self.layout))
                .record(nanos, count);
        }
        id
    }

    /// Keeps `e` as an exemplar of its series.
    pub fn add_exemplar(&mut self, e: Exemplar) {
        self.exemplars.insert((e.series, e.window_start, e.start_unix_nanos), e);
    }
}

impl Source for MemoryStore {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        Ok(self.series.iter().map(|(id, l)| (*id, l.clone())).collect())
    }

    fn select(&self, matchers: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        Ok(self
            .series
            .iter()
            .filter(|(_, l)| l.matches(matchers))
            .take(at_most)
            .map(|(id, l)| (*id, l.clone()))
            .collect())
    }

    fn windows(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        if start >= end {
            return Ok(());
        }
        for ((_, _, w), h) in self.windows.range((res, series, start)..(res, series, end)) {
            f(*w, &h.to_bytes())
                .map_err(|e| StoreError::Corrupt { what: "histogram", message: e.to_string() })?;
        }
        Ok(())
    }

    fn layout(&self) -> Layout {
        self.layout
    }

    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .exemplars
            .range((series, start, i64::MIN)..(series, end, i64::MIN))
            .map(|(_, e)| *e)
            .collect())
    }
}

impl StateStore for MemoryStore {
    fn state(&self, kind: StateKind, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .range((kind, prefix.to_vec())..)
            .take_while(|((k, key), _)| *k == kind && key.starts_with(prefix))
            .map(|((_, key), v)| (key.clone(), v.clone()))
            .collect())
    }

    fn write_state(&self, kind: StateKind, records: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        for (key, value) in records {
            match value {
                Some(v) => state.insert((kind, key.clone()), v.clone()),
                None => state.remove(&(kind, key.clone())),
            };
        }
        Ok(())
    }
}
