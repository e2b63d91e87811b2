use std::collections::HashSet;
use std::path::Path;

use tailscope_proto::histogram::{Histogram, Layout};

use super::*;
use crate::series::Status;
use crate::store::{EpochWrite, WindowDelta};
use crate::telemetry::Metrics;

const T0: i64 = 1_800_000_000; // aligned to the hour
const P: u32 = 3;

fn open(dir: &Path) -> Store {
    Store::open(dir, Layout::default(), &Metrics::new()).expect("open store")
}

fn hist(values: &[u64]) -> Vec<u8> {
    let mut h = Histogram::new(Layout::default());
    for &v in values {
        h.record(v, 1);
    }
    h.to_bytes()
}

/// The partition copied holds the series of service `in`; its clients' keys are 1000..2000.
fn is_in(l: &SeriesLabels) -> bool {
    l.service == "in"
}

fn share() -> Share<'static> {
    Share { series: &is_in, clients: 1000..2000 }
}

fn labels(service: &str, op: &str) -> SeriesLabels {
    SeriesLabels::new(service, op, Status::Ok)
}

fn exemplar(series: u64, window_start: i64, span_id: u64) -> Exemplar {
    Exemplar {
        series,
        window_start,
        trace_id_high: 1,
        trace_id_low: 2,
        span_id,
        start_unix_nanos: window_start * 1_000_000_000,
        duration_nanos: 5_000,
        adjusted_count: 1.0,
    }
}

/// One epoch: `values` into a window of each series, a watermark of a client of each side, and
/// the position of partition `P`.
fn epoch(store: &Store, series: &[(u64, SeriesLabels)], window: i64, values: &[u64], seq: u64) {
    let write = EpochWrite {
        windows: series
            .iter()
            .map(|(id, _)| WindowDelta { series: *id, window_start: window, histogram: hist(values) })
            .collect(),
        series: series.to_vec(),
        watermarks: vec![
            (1500, Watermark { seq, owner: 0, last_seen: T0 }),
            (2500, Watermark { seq: seq * 10, owner: 0, last_seen: T0 }),
        ],
        forgotten_clients: Vec::new(),
        exemplars: series.iter().map(|(id, _)| exemplar(*id, window, seq)).collect(),
        log_positions: vec![(P, LogPosition { seq, records: 2 })],
    };
    store.write_epoch(&write).expect("write");
}

fn counts(store: &Store, res: Resolution, series: u64) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    store
        .for_each_window(res, series, T0 - 86_400, T0 + 86_400, |w, h| out.push((w, h.count())))
        .expect("scan");
    out
}

/// Every page of `checkpoint`'s copy of the share, `budget` bytes each.
fn pages(checkpoint: &Checkpoint, budget: usize, scan: usize) -> Vec<Vec<Copied>> {
    let members = checkpoint.members(&share()).expect("members");
    let mut from = CopyCursor::default();
    let mut out = Vec::new();
    loop {
        let (records, next) = checkpoint.page(&members, &(1000..2000), &from, budget, scan).expect("page");
        out.push(records);
        match next {
            Some(n) => from = n,
            None => return out,
        }
    }
}

#[test]
fn a_copy_carries_one_partitions_share_as_of_its_checkpoint_and_lands_exactly_that() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = open(&dir.path().join("a"));
    let inside = [
        (labels("in", "read").id(), labels("in", "read")),
        (labels("in", "write").id(), labels("in", "write")),
    ];
    // Thirty series of other partitions, whose ids fall before, between and after the two:
    // the copy skips them.
    let outside: Vec<(u64, SeriesLabels)> =
        (0..30).map(|i| labels("out", &format!("op{i}"))).map(|l| (l.id(), l)).collect();
    let ids: Vec<u64> = outside.iter().map(|(id, _)| *id).collect();
    assert!(inside.iter().all(|(id, _)| ids.iter().any(|o| o < id) && ids.iter().any(|o| o > id)));
    let all: Vec<_> = inside.iter().chain(&outside).cloned().collect();
    for (i, window) in [T0, T0 + 10, T0 + 70, T0 + 3600].into_iter().enumerate() {
        epoch(&source, &all, window, &[1_000, 2_000, 3_000 + i as u64], 10 + i as u64);
    }
    let checkpoint = source.checkpoint(&dir.path().join("cp")).expect("checkpoint");
    // Written after the checkpoint: not in the copy.
    epoch(&source, &all, T0 + 20, &[9_999], 99);
    assert_eq!(checkpoint.position(P).expect("position"), LogPosition { seq: 13, records: 2 });
    assert_eq!(checkpoint.position(P + 1).expect("position"), LogPosition::default());

    // Pages of one record each and of one key looked at each give what one page gives.
    let whole: Vec<Copied> = pages(&checkpoint, usize::MAX, usize::MAX).concat();
    assert_eq!(pages(&checkpoint, 1, usize::MAX).concat(), whole);
    assert_eq!(pages(&checkpoint, usize::MAX, 1).concat(), whole);
    let families: Vec<u32> = whole.iter().map(|c| c.family).collect();
    assert!(families.is_sorted(), "series first, watermarks last: {families:?}");
    // Two series, their 4 + 4 + 2 windows over three resolutions and 4 exemplars, one client.
    let per = |f: u32| whole.iter().filter(|c| c.family == f).count();
    assert_eq!([per(0), per(1), per(2), per(3), per(4), per(5)], [2, 8, 6, 4, 8, 1]);

    // The landing store held the partition before (an older copy of one series, its
    // position) and holds another partition's series, which the landing leaves alone.
    let target = open(&dir.path().join("b"));
    epoch(&target, &[inside[0].clone(), outside[0].clone()], T0 + 1800, &[7], 3);
    assert_eq!(target.begin_copy(P, &share()).expect("begin"), 1);
    assert_eq!(target.copying().expect("markers"), vec![P]);
    assert!(target.log_positions().expect("positions").is_empty(), "the old position is gone");
    assert!(counts(&target, Resolution::S10, inside[0].0).is_empty(), "the old windows are wiped");
    let mut members = HashSet::new();
    for page in pages(&checkpoint, 300, usize::MAX) {
        target.land(&page, &is_in, &mut members, &(1000..2000)).expect("land");
    }
    let marks = target.finish_copy(P, LogPosition { seq: 13, records: 2 }, &(1000..2000)).expect("finish");
    assert_eq!(marks, vec![(1500, Watermark { seq: 13, owner: 0, last_seen: T0 })]);
    assert!(target.copying().expect("markers").is_empty());
    assert_eq!(target.log_positions().expect("positions"), vec![(P, LogPosition { seq: 13, records: 2 })]);
    drop(checkpoint);
    assert!(!dir.path().join("cp").exists(), "a dropped checkpoint's files are removed");

    // The partition's windows and exemplars as the source held them at the checkpoint.
    let reference = open(&dir.path().join("c"));
    for (i, window) in [T0, T0 + 10, T0 + 70, T0 + 3600].into_iter().enumerate() {
        epoch(&reference, &all, window, &[1_000, 2_000, 3_000 + i as u64], 10 + i as u64);
    }
    for (id, _) in &inside {
        for res in Resolution::ALL {
            assert_eq!(counts(&target, res, *id), counts(&reference, res, *id), "{res:?}");
        }
        assert_eq!(
            target.exemplars(*id, 0, i64::MAX).expect("exemplars"),
            reference.exemplars(*id, 0, i64::MAX).expect("exemplars")
        );
    }
    assert_eq!(
        counts(&target, Resolution::S10, outside[0].0),
        vec![(T0 + 1800, 1)],
        "the other partition is untouched"
    );
    let mut listed: Vec<u64> = target.index().all().into_iter().map(|(id, _)| id).collect();
    listed.sort_unstable();
    let mut want = vec![inside[0].0, inside[1].0, outside[0].0];
    want.sort_unstable();
    assert_eq!(listed, want, "the index lists the landed series");
}

#[test]
fn a_copy_cut_short_is_found_at_open_and_wiped_and_a_hostile_page_lands_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = open(&dir.path().join("a"));
    let inside = [(labels("in", "read").id(), labels("in", "read"))];
    epoch(&source, &inside, T0, &[1_000], 5);
    let checkpoint = source.checkpoint(&dir.path().join("cp")).expect("checkpoint");
    let page: Vec<Copied> = pages(&checkpoint, usize::MAX, usize::MAX).concat();
    {
        let target = open(&dir.path().join("b"));
        target.begin_copy(P, &share()).expect("begin");
        let mut members = HashSet::new();
        target.land(&page[..3], &is_in, &mut members, &(1000..2000)).expect("land");
        // Stops here, before finish_copy.
    }
    let target = open(&dir.path().join("b"));
    assert_eq!(target.copying().expect("markers"), vec![P], "the marker outlives a restart");
    assert!(target.log_positions().expect("positions").is_empty(), "a copy cut short gives no position");
    assert!(!counts(&target, Resolution::S10, inside[0].0).is_empty());
    assert_eq!(target.abandon_copy(P, &share()).expect("abandon"), 1);
    assert!(target.copying().expect("markers").is_empty());
    assert!(counts(&target, Resolution::S10, inside[0].0).is_empty());
    assert!(target.index().all().is_empty());

    // Hostile pages: each is refused whole, naming what was wrong.
    let mut members = HashSet::new();
    let window = page.iter().find(|c| c.family == 1).expect("a window").clone();
    let series = page.iter().find(|c| c.family == 0).expect("a series").clone();
    let garbage = Copied { value: vec![0xff; 7], ..window.clone() };
    let err =
        target.land(&[series.clone(), garbage], &is_in, &mut members, &(1000..2000)).expect_err("garbage");
    assert!(err.to_string().contains("does not decode"), "{err}");
    assert!(target.index().all().is_empty(), "nothing of a refused page lands");
    let stray = target
        .land(std::slice::from_ref(&window), &is_in, &mut HashSet::new(), &(1000..2000))
        .expect_err("stray");
    assert!(stray.to_string().contains("did not carry"), "{stray}");
    let other = Copied { value: crate::store::index::encode_entry(&labels("out", "x"), 0), ..series };
    let err = target.land(&[other], &is_in, &mut HashSet::new(), &(1000..2000)).expect_err("other");
    assert!(err.to_string().contains("another partition"), "{err}");
    let mark = Copied { family: 5, key: 2500u64.to_be_bytes().to_vec(), value: vec![0; 24] };
    let err = target.land(&[mark], &is_in, &mut HashSet::new(), &(1000..2000)).expect_err("mark");
    assert!(err.to_string().contains("clients"), "{err}");
    let bad = Copied { family: 9, key: vec![], value: vec![] };
    assert!(target.land(&[bad], &is_in, &mut HashSet::new(), &(1000..2000)).is_err());
}
