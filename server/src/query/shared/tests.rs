use std::sync::atomic::{AtomicUsize, Ordering};

use promql_parser::label::{MatchOp, Matcher};
use tailscope_proto::histogram::{HistogramError, Layout};

use super::*;
use crate::series::Status;
use crate::store::MemoryStore;

/// A source that counts the reads that reach it.
struct Counting {
    inner: MemoryStore,
    selects: AtomicUsize,
    reads: AtomicUsize,
}

impl Source for Counting {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        self.inner.series()
    }
    fn select(&self, matchers: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        self.selects.fetch_add(1, Ordering::Relaxed);
        self.inner.select(matchers, at_most)
    }
    fn windows(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.windows(res, series, start, end, f)
    }
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    fn exemplars(&self, series: u64, start: i64, end: i64) -> Result<Vec<Exemplar>, StoreError> {
        self.inner.exemplars(series, start, end)
    }
}

fn source() -> (Counting, u64, u64) {
    let mut inner = MemoryStore::new(Layout::default());
    let a = SeriesLabels::new("checkout", "GET /", Status::Ok);
    let b = SeriesLabels::new("checkout", "POST /pay", Status::Ok);
    for t in (1000..1300).step_by(10) {
        inner.record(a.clone(), t, 20_000_000 + t as u64, 3);
        inner.record(b.clone(), t, 40_000_000, 1);
    }
    let (a, b) = (a.id(), b.id());
    (Counting { inner, selects: AtomicUsize::new(0), reads: AtomicUsize::new(0) }, a, b)
}

fn read(s: &dyn Source, series: u64, intervals: &[(i64, i64)]) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::new();
    s.windows_in(Resolution::S10, series, intervals, &mut |start, b| {
        out.push((start, b.to_vec()));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn a_repeated_read_is_answered_from_memory_with_the_same_windows() {
    let (counting, a, b) = source();
    let shared = SharedReads::new(&counting, 1 << 20);
    let first = read(&shared, a, &[(1000, 1100), (1200, 1300)]);
    assert_eq!(first.len(), 20);
    assert_eq!(counting.reads.load(Ordering::Relaxed), 2, "one source read per interval");
    let again = read(&shared, a, &[(1000, 1100), (1200, 1300)]);
    assert_eq!(again, first);
    assert_eq!(counting.reads.load(Ordering::Relaxed), 2, "the second read came from memory");
    // Another series or range is a read of its own.
    read(&shared, b, &[(1000, 1100), (1200, 1300)]);
    read(&shared, a, &[(1000, 1100)]);
    assert_eq!(counting.reads.load(Ordering::Relaxed), 2 + 2 + 1);
    assert_eq!(again, read(&counting, a, &[(1000, 1100), (1200, 1300)]), "what the source holds");
    assert_eq!(shared.kept().0, 3);
}

#[test]
fn selections_are_shared_whatever_the_order_of_their_matchers() {
    let (counting, a, b) = source();
    let shared = SharedReads::new(&counting, 1 << 20);
    let service = Matcher::new(MatchOp::Equal, "service", "checkout");
    let ok = Matcher::new(MatchOp::Equal, "status", "ok");
    let mut first = shared.select(&[&service, &ok], 10).unwrap();
    let mut second = shared.select(&[&ok, &service], 10).unwrap();
    first.sort_by_key(|(id, _)| *id);
    second.sort_by_key(|(id, _)| *id);
    let mut ids = vec![a, b];
    ids.sort_unstable();
    assert_eq!(first.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    assert_eq!(first, second);
    assert_eq!(counting.selects.load(Ordering::Relaxed), 1);
    // Another operator is another selection.
    let not_ok = Matcher::new(MatchOp::NotEqual, "status", "ok");
    assert!(shared.select(&[&service, &not_ok], 10).unwrap().is_empty());
    assert_eq!(counting.selects.load(Ordering::Relaxed), 2);
}

#[test]
fn past_its_budget_it_reads_through_and_answers_the_same() {
    let (counting, a, _) = source();
    let shared = SharedReads::new(&counting, 64);
    let first = read(&shared, a, &[(1000, 1300)]);
    let again = read(&shared, a, &[(1000, 1300)]);
    assert_eq!(first, again);
    assert_eq!(counting.reads.load(Ordering::Relaxed), 2, "nothing was kept");
    assert_eq!(shared.kept(), (0, 0));
}

#[test]
fn a_window_its_reader_refuses_is_an_error_each_time_and_not_kept() {
    let (counting, a, _) = source();
    let shared = SharedReads::new(&counting, 1 << 20);
    let mut refuse =
        |_: i64, _: &[u8]| -> Result<(), HistogramError> { Err(HistogramError::Truncated("test")) };
    assert!(shared.windows_in(Resolution::S10, a, &[(1000, 1300)], &mut refuse).is_err());
    assert_eq!(shared.kept().0, 0);
    // Kept windows handed to a refusing reader fail too.
    read(&shared, a, &[(1000, 1300)]);
    assert!(shared.windows_in(Resolution::S10, a, &[(1000, 1300)], &mut refuse).is_err());
}
