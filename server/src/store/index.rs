//! The series index, held in memory beside its column family: every series' labels, a
//! posting list (the ids that carry it) per `service` and per `operation` value, and the hour
//! of the newest window written to each series.
//!
//! Selection starts from the smallest posting list an equality matcher names (or the union of
//! the values a regular expression on `service` or `operation` matches, walking distinct values
//! rather than series) and checks the remaining matchers on those candidates only; label values
//! are read off the posting lists' keys, so `/label/service/values?limit=10` touches ten keys
//! however many series there are. The same shape as Prometheus' head postings, for the three
//! labels a tailscope series has.
//!
//! A series whose newest window is older than the longest retention holds nothing a query can
//! read; [`SeriesIndex::expired`] names those and [`SeriesIndex::retire`] forgets them, so the
//! index shrinks with retention instead of growing for ever.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;

use promql_parser::label::{MatchOp, Matcher};

use crate::series::{IdBuildHasher, Kind, Measure, SeriesLabels, Status, MEASURE_MATCHER, SELF_MEASURE};

#[cfg(test)]
mod tests;

/// The hour (since the epoch) second `t` falls in, clamped to `u32`.
pub fn hour_of(t: i64) -> u32 {
    u32::try_from(t.div_euclid(3600).max(0)).unwrap_or(u32::MAX)
}

/// A series' value in the series family: its labels ‖ the hour of its newest window (`u32`).
pub fn encode_entry(labels: &SeriesLabels, newest_hour: u32) -> Vec<u8> {
    let mut value = labels.encode();
    value.extend_from_slice(&newest_hour.to_be_bytes());
    value
}

/// Decodes [`encode_entry`]; an entry of labels alone (written before the hour was kept) gets
/// `legacy_hour`.
pub fn decode_entry(value: &[u8], legacy_hour: u32) -> Option<(SeriesLabels, u32)> {
    match SeriesLabels::decode_prefix(value)? {
        (labels, []) => Some((labels, legacy_hour)),
        (labels, &[a, b, c, d]) => Some((labels, u32::from_be_bytes([a, b, c, d]))),
        _ => None,
    }
}

#[derive(Debug)]
struct Entry {
    labels: SeriesLabels,
    /// The hour of the newest window written (only ever raised).
    newest_hour: u32,
}

/// The series of one label value. Most values of `operation` name one series (or two: ok and
/// error), so a single id is held inline: a million such values as sets were a B-tree leaf
/// each, ~100 bytes, where one id takes none beyond its map entry.
#[derive(Debug)]
enum Posting {
    One(u64),
    Many(BTreeSet<u64>),
}

impl Posting {
    fn insert(&mut self, id: u64) {
        match self {
            Posting::One(x) if *x == id => {}
            Posting::One(x) => *self = Posting::Many(BTreeSet::from([*x, id])),
            Posting::Many(ids) => {
                ids.insert(id);
            }
        }
    }

    /// Takes `id` out; whether the list is then empty.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Posting::One(x) => *x == id,
            Posting::Many(ids) => {
                ids.remove(&id);
                match (ids.len(), ids.first().copied()) {
                    (1, Some(last)) => {
                        *self = Posting::One(last);
                        false
                    }
                    (n, _) => n == 0,
                }
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Posting::One(_) => 1,
            Posting::Many(ids) => ids.len(),
        }
    }

    /// The ids, in order.
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (one, many) = match self {
            Posting::One(x) => (Some(*x), None),
            Posting::Many(ids) => (None, Some(ids.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Where a selection's candidates come from.
enum Candidates<'a> {
    /// One posting list, borrowed.
    List(&'a Posting),
    /// The union of the posting lists of the values a matcher matches.
    Union(BTreeSet<u64>),
    /// Every series.
    All,
}

#[derive(Debug, Default)]
struct Postings {
    /// Boxed: a slot of the table is 16 bytes, not the entry's 88, so a million series' table
    /// (2 Mi slots, and the old one beside it while it grows) is tens of megabytes, not
    /// hundreds (BENCHMARKS.md, "Where a large series count's memory goes").
    series: HashMap<u64, Box<Entry>, IdBuildHasher>,
    service: BTreeMap<String, Posting>,
    operation: BTreeMap<String, Posting>,
    /// Series with a peer only.
    peer: BTreeMap<String, Posting>,
    /// How many series have each status (`ok`, `error`).
    statuses: [usize; 2],
    /// How many series have each span kind.
    kinds: [usize; 6],
    /// How many series are self-time series.
    self_times: usize,
}

impl Postings {
    fn list(&self, label: &str) -> Option<&BTreeMap<String, Posting>> {
        match label {
            "service" => Some(&self.service),
            "operation" => Some(&self.operation),
            "peer" => Some(&self.peer),
            _ => None,
        }
    }

    fn insert(&mut self, id: u64, labels: SeriesLabels, hour: u32) {
        if let Some(e) = self.series.get_mut(&id) {
            e.newest_hour = e.newest_hour.max(hour);
            return;
        }
        let post = |list: &mut BTreeMap<String, Posting>, value: &String| {
            list.entry(value.clone()).and_modify(|p| p.insert(id)).or_insert(Posting::One(id));
        };
        post(&mut self.service, &labels.service);
        post(&mut self.operation, &labels.operation);
        if !labels.peer.is_empty() {
            post(&mut self.peer, &labels.peer);
        }
        self.statuses[labels.status as usize] += 1;
        self.kinds[labels.kind.index()] += 1;
        self.self_times += usize::from(labels.measure == Measure::SelfTime);
        self.series.insert(id, Box::new(Entry { labels, newest_hour: hour }));
    }

    fn remove(&mut self, id: u64) {
        let Some(e) = self.series.remove(&id) else { return };
        self.statuses[e.labels.status as usize] -= 1;
        self.kinds[e.labels.kind.index()] -= 1;
        self.self_times -= usize::from(e.labels.measure == Measure::SelfTime);
        for (list, value) in [
            (&mut self.service, &e.labels.service),
            (&mut self.operation, &e.labels.operation),
            (&mut self.peer, &e.labels.peer),
        ] {
            if list.get_mut(value.as_str()).is_some_and(|ids| ids.remove(id)) {
                list.remove(value.as_str());
            }
        }
    }

    /// The candidates of a selection: the narrowest posting list an equality matcher names,
    /// else the union for the first other matcher on `service` (fewer distinct values than
    /// `operation`) or `operation`, resolved over the list's distinct values; else every series.
    fn candidates(&self, matchers: &[&Matcher]) -> Candidates<'_> {
        const NONE: &Posting = &Posting::Many(BTreeSet::new());
        let narrowest = matchers
            .iter()
            // `label=""` also matches series without the label: no posting list holds them.
            .filter(|m| matches!(m.op, MatchOp::Equal) && !m.value.is_empty())
            .filter_map(|m| Some(self.list(&m.name)?.get(&m.value).unwrap_or(NONE)))
            .min_by_key(|ids| ids.len());
        if let Some(ids) = narrowest {
            return Candidates::List(ids);
        }
        let Some(m) =
            ["service", "operation"].iter().find_map(|label| matchers.iter().find(|m| m.name == *label))
        else {
            return Candidates::All;
        };
        let mut ids = BTreeSet::new();
        for (value, posting) in self.list(&m.name).into_iter().flatten() {
            if m.is_match(value) {
                ids.extend(posting.iter());
            }
        }
        Candidates::Union(ids)
    }
}

/// The series index (see the module documentation).
#[derive(Debug, Default)]
pub struct SeriesIndex {
    inner: RwLock<Postings>,
}

impl SeriesIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Postings> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Postings> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds series (or raises the newest hour of known ones) under one lock.
    pub fn extend(&self, series: impl IntoIterator<Item = (u64, SeriesLabels, u32)>) {
        let mut p = self.write();
        for (id, labels, hour) in series {
            p.insert(id, labels, hour);
        }
    }

    /// The series that `written` (series id, window start in seconds) moves to a newer hour
    /// than the index holds for them, with their labels and that hour: what must be written
    /// back so the hour survives a restart. Series the index does not hold are left out (their
    /// labels come with the epoch that writes them). The index itself is not changed; see
    /// [`SeriesIndex::extend`].
    pub fn newer(&self, written: impl IntoIterator<Item = (u64, i64)>) -> Vec<(u64, SeriesLabels, u32)> {
        let p = self.read();
        let mut out: HashMap<u64, (SeriesLabels, u32), IdBuildHasher> = HashMap::default();
        for (id, t) in written {
            let hour = hour_of(t);
            let Some(e) = p.series.get(&id) else { continue };
            if e.newest_hour < hour {
                let slot = out.entry(id).or_insert_with(|| (e.labels.clone(), hour));
                slot.1 = slot.1.max(hour);
            }
        }
        out.into_iter().map(|(id, (labels, hour))| (id, labels, hour)).collect()
    }

    /// The series whose newest window lies in an hour before `first_kept_hour`.
    pub fn expired(&self, first_kept_hour: u32) -> Vec<u64> {
        let p = self.read();
        let mut out: Vec<u64> =
            p.series.iter().filter(|(_, e)| e.newest_hour < first_kept_hour).map(|(&id, _)| id).collect();
        out.sort_unstable();
        out
    }

    /// Forgets `ids` — those that are still expired at `first_kept_hour` (a series written
    /// since [`SeriesIndex::expired`] named it is kept). Returns how many were forgotten.
    pub fn retire(&self, ids: &[u64], first_kept_hour: u32) -> usize {
        let mut p = self.write();
        let mut gone = 0;
        for &id in ids {
            if p.series.get(&id).is_some_and(|e| e.newest_hour < first_kept_hour) {
                p.remove(id);
                gone += 1;
            }
        }
        gone
    }

    /// Every series, in id order.
    pub fn all(&self) -> Vec<(u64, SeriesLabels)> {
        let p = self.read();
        let mut out: Vec<(u64, SeriesLabels)> =
            p.series.iter().map(|(&id, e)| (id, e.labels.clone())).collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    /// The series every one of `matchers` matches (a label a series does not have reads as
    /// empty, as in Prometheus), in id order; at most `at_most` of them (when more match, the
    /// first by id from a posting list, else any).
    pub fn select(&self, matchers: &[&Matcher], at_most: usize) -> Vec<(u64, SeriesLabels)> {
        let p = self.read();
        let from_ids = |ids: &mut dyn Iterator<Item = u64>| -> Vec<(u64, SeriesLabels)> {
            ids.filter_map(|id| Some((id, &p.series.get(&id)?.labels)))
                .filter(|(_, l)| l.matches(matchers))
                .take(at_most)
                .map(|(id, l)| (id, l.clone()))
                .collect()
        };
        match p.candidates(matchers) {
            Candidates::List(ids) => from_ids(&mut ids.iter()),
            Candidates::Union(ids) => from_ids(&mut ids.into_iter()),
            Candidates::All => {
                let mut out: Vec<(u64, SeriesLabels)> = p
                    .series
                    .iter()
                    .filter(|(_, e)| e.labels.matches(matchers))
                    .take(at_most)
                    .map(|(&id, e)| (id, e.labels.clone()))
                    .collect();
                out.sort_unstable_by_key(|(id, _)| *id);
                out
            }
        }
    }

    /// The distinct non-empty values of `label` over every series, sorted, at most `limit`,
    /// and whether there were more: read off the posting lists' keys and the status counts.
    pub fn values(&self, label: &str, limit: usize) -> (Vec<String>, bool) {
        let p = self.read();
        let mut values: Vec<String> = match label {
            // In the order of their values, like every other label's.
            "status" => [Status::Error, Status::Ok]
                .into_iter()
                .filter(|&s| p.statuses[s as usize] > 0)
                .map(|s| s.as_str().to_owned())
                .collect(),
            "span_kind" => {
                let mut kinds: Vec<String> = Kind::ALL
                    .into_iter()
                    .filter(|k| p.kinds[k.index()] > 0)
                    .map(|k| k.as_str().to_owned())
                    .collect();
                kinds.sort_unstable();
                kinds
            }
            MEASURE_MATCHER => (p.self_times > 0).then(|| SELF_MEASURE.to_owned()).into_iter().collect(),
            _ => p.list(label).map_or_else(Vec::new, |list| {
                list.keys().filter(|v| !v.is_empty()).take(limit.saturating_add(1)).cloned().collect()
            }),
        };
        values.truncate(limit.saturating_add(1));
        let more = values.len() > limit;
        values.truncate(limit);
        (values, more)
    }
}
