use std::path::Path;

use tailscope_proto::histogram::Histogram;

use super::rocksdb::CF_SERIES;
use super::*;
use crate::series::Status;
use crate::telemetry::Metrics;

fn open(dir: &Path) -> Store {
    Store::open(dir, Layout::default(), &Metrics::new()).expect("open store")
}

fn hist(values: &[u64]) -> Histogram {
    let mut h = Histogram::new(Layout::default());
    for &v in values {
        h.record(v, 1);
    }
    h
}

fn labels(op: &str) -> SeriesLabels {
    SeriesLabels::new("api", op, Status::Ok)
}

const T0: i64 = 1_800_000_000; // aligned to the hour

fn window_counts(store: &Store, res: Resolution, series: u64, start: i64, end: i64) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    store.for_each_window(res, series, start, end, |w, h| out.push((w, h.count()))).expect("scan");
    out
}

#[test]
fn epochs_merge_into_every_resolution() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let a = labels("GET /a");
    let id = a.id();
    let other = labels("GET /b").id();
    for (i, window) in [T0, T0 + 10, T0 + 70, T0 + 10].into_iter().enumerate() {
        let write = EpochWrite {
            windows: vec![
                WindowDelta { series: id, window_start: window, histogram: hist(&[1_000_000; 3]).to_bytes() },
                WindowDelta { series: other, window_start: window, histogram: hist(&[5]).to_bytes() },
            ],
            series: vec![(id, a.clone())],
            watermarks: vec![(42, Watermark { seq: i as u64 + 1, owner: 3, last_seen: 1_800_000_000 })],
            exemplars: Vec::new(),
            forgotten_clients: Vec::new(),
            log_positions: vec![(5, LogPosition { seq: 100 + i as u64, records: 2 })],
        };
        store.write_epoch(&write).expect("write");
    }
    assert_eq!(
        window_counts(&store, Resolution::S10, id, T0, T0 + 3600),
        vec![(T0, 3), (T0 + 10, 6), (T0 + 70, 3)]
    );
    assert_eq!(window_counts(&store, Resolution::M1, id, T0, T0 + 3600), vec![(T0, 9), (T0 + 60, 3)]);
    assert_eq!(window_counts(&store, Resolution::H1, id, T0, T0 + 3600), vec![(T0, 12)]);
    // Range bounds are respected and other series never leak in.
    assert_eq!(window_counts(&store, Resolution::S10, id, T0 + 10, T0 + 70), vec![(T0 + 10, 6)]);
    assert_eq!(
        store.watermarks().expect("marks"),
        vec![(42, Watermark { seq: 4, owner: 3, last_seen: 1_800_000_000 })]
    );
    assert_eq!(store.series().expect("series"), vec![(id, a)]);
    assert_eq!(store.log_positions().expect("positions"), vec![(5, LogPosition { seq: 103, records: 2 })]);
}

#[test]
fn a_window_written_in_many_epochs_reads_as_the_sum_of_all_of_them_before_and_after_reopening() {
    // Dozens of operands of one key, some flushed to disk and the rest in the memtable: they
    // add up to every epoch's spans, read fresh and after reopening.
    let dir = tempfile::tempdir().expect("tempdir");
    let id = labels("x").id();
    let mut all = Histogram::new(Layout::default());
    {
        let store = open(dir.path());
        for epoch in 0..43u64 {
            let h = hist(&[1_000 + epoch * 7_919, 50_000_000 + epoch, epoch + 1]);
            all.merge(&h);
            let write = EpochWrite {
                windows: vec![WindowDelta { series: id, window_start: T0 + 20, histogram: h.to_bytes() }],
                ..EpochWrite::default()
            };
            store.write_epoch(&write).expect("write");
            if epoch == 11 {
                store.db.flush().expect("flush"); // part of them on disk, the rest in memory
            }
        }
        for res in Resolution::ALL {
            let mut read = Vec::new();
            store.for_each_window(res, id, T0, T0 + 3600, |w, h| read.push((w, h))).expect("scan");
            assert_eq!(read.len(), 1, "{res:?}");
            assert_eq!(read[0].1, all, "{res:?}");
        }
    }
    let store = open(dir.path());
    for res in Resolution::ALL {
        let mut read = Vec::new();
        store.for_each_window(res, id, T0, T0 + 3600, |_, h| read.push(h)).expect("scan");
        assert_eq!(read, vec![all.clone()], "{res:?} after reopening");
    }
}

#[test]
fn an_epochs_deltas_of_one_rollup_window_are_one_operand_and_read_as_their_sum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let id = labels("x").id();
    // Six ten-second windows of the minute T0 and one of the next minute, every one of them
    // different; written twice (two epochs), the second time with the delta of T0 + 60 first.
    let h = |w: i64| hist(&[1_000 + w as u64, 2_000_000 + 7 * w as u64, 5]);
    let mut windows: Vec<WindowDelta> = (0..7)
        .map(|i| WindowDelta { series: id, window_start: T0 + 10 * i, histogram: h(10 * i).to_bytes() })
        .collect();
    let (_, operands) =
        store.write_epoch(&EpochWrite { windows: windows.clone(), ..EpochWrite::default() }).unwrap();
    assert_eq!(operands, 7 + 2 + 1, "seven ten-second windows, two minutes, one hour");
    windows.rotate_right(1);
    store.write_epoch(&EpochWrite { windows, ..EpochWrite::default() }).expect("write");
    let sum = |from: i64, to: i64| {
        let mut all = Histogram::new(Layout::default());
        (from..to).for_each(|i| {
            all.merge(&h(10 * i));
            all.merge(&h(10 * i));
        });
        all
    };
    let read = |store: &Store, res| {
        let mut read = Vec::new();
        store.for_each_window(res, id, T0, T0 + 3600, |w, h| read.push((w, h))).expect("scan");
        read
    };
    let check = |store: &Store, pass: &str| {
        assert_eq!(read(store, Resolution::M1), vec![(T0, sum(0, 6)), (T0 + 60, sum(6, 7))], "{pass}");
        assert_eq!(read(store, Resolution::H1), vec![(T0, sum(0, 7))], "{pass}");
        let tens: Vec<(i64, Histogram)> = (0..7).map(|i| (T0 + 10 * i, sum(i, i + 1))).collect();
        assert_eq!(read(store, Resolution::S10), tens, "{pass}");
    };
    check(&store, "fresh");
    drop(store);
    check(&open(dir.path()), "after reopening");
}

#[test]
fn scans_cross_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let id = labels("x").id();
    let windows = [T0 - 10, T0, T0 + 3600, T0 + 7200 - 10];
    let write = EpochWrite {
        windows: windows
            .iter()
            .map(|&w| WindowDelta { series: id, window_start: w, histogram: hist(&[7]).to_bytes() })
            .collect(),
        ..EpochWrite::default()
    };
    store.write_epoch(&write).expect("write");
    let got: Vec<i64> = window_counts(&store, Resolution::S10, id, T0 - 3600, T0 + 7200)
        .into_iter()
        .map(|(w, _)| w)
        .collect();
    assert_eq!(got, windows);
}

#[test]
fn data_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = labels("x").id();
    {
        let store = open(dir.path());
        let write = EpochWrite {
            windows: vec![WindowDelta {
                series: id,
                window_start: T0,
                histogram: hist(&[1, 2, 3]).to_bytes(),
            }],
            watermarks: vec![(7, Watermark { seq: 9, ..Watermark::default() })],
            ..EpochWrite::default()
        };
        store.write_epoch(&write).expect("write");
    }
    let store = open(dir.path());
    assert_eq!(window_counts(&store, Resolution::S10, id, T0, T0 + 10), vec![(T0, 3)]);
    assert_eq!(store.watermarks().expect("marks"), vec![(7, Watermark { seq: 9, ..Watermark::default() })]);
}

#[test]
fn corrupt_operands_are_skipped_not_fatal() {
    let metrics = Metrics::new();
    let mut corrupt = 0;
    let good = hist(&[10, 20]).to_bytes();
    let merged = merge_values(Layout::default(), [&good[..], b"garbage", &good[..]], || corrupt += 1);
    assert_eq!(corrupt, 1);
    assert_eq!(Histogram::decode(&merged).expect("merged").count(), 4);
    drop(metrics);
}

#[test]
fn retention_deletes_expired_partitions_and_reclaims_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let retention = RetentionConfig::default();
    // Three days of 10-second windows for 20 series, one epoch per hour of data.
    let mut values = Vec::new();
    for i in 0..200u64 {
        values.push(1_000 + i * 7_919);
    }
    let h = hist(&values).to_bytes();
    let start = T0 - 3 * 86_400;
    for hour in 0..72 {
        let mut write = EpochWrite::default();
        for s in 0..20u64 {
            for w in (0..3600).step_by(10) {
                write.windows.push(WindowDelta {
                    series: s,
                    window_start: start + hour * 3600 + w,
                    histogram: h.clone(),
                });
            }
        }
        store.write_epoch(&write).expect("write");
    }
    store.flush().expect("flush");
    store.compact(Resolution::S10).expect("compact");
    let size =
        |store: &Store| store.sizes().into_iter().find(|(n, _)| *n == "win_10s").map(|(_, b)| b).unwrap_or(0);
    let before = size(&store);
    assert!(window_counts(&store, Resolution::S10, 3, start, start + 10).len() == 1);

    let report = store.apply_retention(T0, &retention).expect("retention");
    // 10-second windows are kept 2 days: the first day of the three is deleted, 24 partitions.
    assert_eq!(report.deleted, vec![(Resolution::S10, 24)]);
    assert!(window_counts(&store, Resolution::S10, 3, start, start + 86_400).is_empty());
    assert_eq!(window_counts(&store, Resolution::S10, 3, T0 - 3600, T0 - 3590).len(), 1);
    // Rollups of the deleted windows are still there.
    assert_eq!(window_counts(&store, Resolution::H1, 3, start, start + 3600).len(), 1);
    store.flush().expect("flush");
    let after = size(&store);
    assert!(after * 10 < before * 7, "disk not reclaimed: {before} -> {after} bytes");
    // Idempotent: nothing more to delete.
    assert_eq!(store.apply_retention(T0, &retention).expect("again").deleted, vec![]);
}

#[test]
fn exemplars_round_trip_by_series_and_window_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let (a, b) = (labels("GET /a").id(), labels("GET /b").id());
    let e = |series, window_start: i64, span_id| Exemplar {
        series,
        window_start,
        trace_id_high: 7,
        trace_id_low: span_id * 3,
        span_id,
        start_unix_nanos: window_start * 1_000_000_000 + 5,
        duration_nanos: 1_234_567,
        adjusted_count: span_id as f64 * 10.0,
    };
    let written = vec![e(a, T0, 1), e(a, T0, 2), e(a, T0 + 3600, 3), e(b, T0, 4)];
    store.write_epoch(&EpochWrite { exemplars: written.clone(), ..EpochWrite::default() }).expect("write");
    let mut read = store.exemplars(a, T0, T0 + 7200).expect("read");
    read.sort_by_key(|e| e.span_id);
    assert_eq!(read, vec![written[0], written[1], written[2]]);
    assert_eq!(store.exemplars(a, T0 + 10, T0 + 7200).expect("read"), vec![written[2]]);
    assert_eq!(store.exemplars(b, T0, T0 + 10).expect("read"), vec![written[3]]);
    assert!(store.exemplars(b, T0 + 10, T0).expect("read").is_empty());
    // Exemplars older than their retention go, partition by partition.
    let retention =
        RetentionConfig { exemplars: std::time::Duration::from_secs(3600), ..RetentionConfig::default() };
    let report = store.apply_retention(T0 + 7200, &retention).expect("retention");
    assert_eq!(report.exemplar_partitions, 1);
    assert_eq!(store.exemplars(a, T0, T0 + 7200).expect("read"), vec![written[2]]);
}

#[test]
fn a_scan_of_any_width_skips_empty_partitions_and_finds_every_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let a = labels("GET /far");
    let id = a.id();
    let other = labels("GET /other").id();
    // Windows a year apart (8,760 partitions of 10 s windows between them), and another
    // series in a partition in between.
    let year = 365 * 24 * 3600;
    for (series, window) in [(id, T0), (other, T0 + year / 2), (id, T0 + year)] {
        let write = EpochWrite {
            windows: vec![WindowDelta { series, window_start: window, histogram: hist(&[7]).to_bytes() }],
            series: vec![(id, a.clone())],
            ..EpochWrite::default()
        };
        store.write_epoch(&write).expect("write");
    }
    assert_eq!(window_counts(&store, Resolution::S10, id, 0, i64::MAX), vec![(T0, 1), (T0 + year, 1)]);
    assert_eq!(
        window_counts(&store, Resolution::S10, id, T0 + 10, 9_000_000_000_000_000_000),
        vec![(T0 + year, 1)]
    );
    assert_eq!(window_counts(&store, Resolution::S10, other, -5, i64::MAX), vec![(T0 + year / 2, 1)]);
    assert!(window_counts(&store, Resolution::S10, id, T0 + 10, T0 + year).is_empty());
}

#[test]
fn many_intervals_read_as_one_scan_per_interval_would() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let a = labels("GET /many");
    let id = a.id();
    let other = labels("GET /next-door").id();
    // Three hours of 10 s windows (three partitions), and a neighbour series in between.
    let mut windows = Vec::new();
    for w in (T0..T0 + 3 * 3600).step_by(10) {
        windows.push(WindowDelta { series: id, window_start: w, histogram: hist(&[w as u64]).to_bytes() });
        windows.push(WindowDelta { series: other, window_start: w, histogram: hist(&[1, 2]).to_bytes() });
    }
    store
        .write_epoch(&EpochWrite { windows, series: vec![(id, a)], ..EpochWrite::default() })
        .expect("write");
    let intervals = [
        (T0 - 100, T0 + 25),
        (T0 + 40, T0 + 41),
        (T0 + 600, T0 + 660),
        (T0 + 3000, T0 + 4000),
        (T0 + 4000, T0 + 4000),
        (T0 + 5000, T0 + 9000),
        (T0 + 10_000, T0 + 20_000),
    ];
    let mut together = Vec::new();
    store
        .for_each_encoded_in(Resolution::S10, id, &intervals, |w, b| {
            together.push((w, Histogram::decode(b)?.count()));
            Ok(())
        })
        .expect("scan");
    let one_by_one: Vec<(i64, u64)> =
        intervals.iter().flat_map(|&(s, e)| window_counts(&store, Resolution::S10, id, s, e)).collect();
    assert_eq!(together, one_by_one);
    assert_eq!(together.len(), 3 + 1 + 6 + 100 + 400 + 80);
    assert!(together.iter().all(|&(_, c)| c == 1));
}

#[test]
fn series_past_every_retention_are_retired_on_disk_and_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, kept) = (labels("GET /old"), labels("GET /kept"));
    let retention = RetentionConfig {
        window_10s: std::time::Duration::from_secs(3600),
        window_1m: std::time::Duration::from_secs(2 * 3600),
        window_1h: std::time::Duration::from_secs(3 * 3600),
        ..RetentionConfig::default()
    };
    let delta =
        |series: u64, window_start| WindowDelta { series, window_start, histogram: hist(&[9]).to_bytes() };
    {
        let store = open(dir.path());
        let first = EpochWrite {
            windows: vec![delta(old.id(), T0), delta(kept.id(), T0)],
            series: vec![(old.id(), old.clone()), (kept.id(), kept.clone())],
            ..EpochWrite::default()
        };
        store.write_epoch(&first).expect("write");
        // Two hours later only `kept` is written; its entry moves to the new hour.
        store
            .write_epoch(&EpochWrite { windows: vec![delta(kept.id(), T0 + 7200)], ..EpochWrite::default() })
            .expect("write");
        // Three hours after T0 + 1 h, the hour of `old`'s newest window is past the longest
        // retention (3 h); `kept`'s is not.
        let report = store.apply_retention(T0 + 4 * 3600 + 1, &retention).expect("retention");
        assert_eq!(report.series_retired, 1);
        assert_eq!(store.series().expect("series"), vec![(kept.id(), kept.clone())]);
        assert_eq!(store.index().values("operation", 10).0, vec!["GET /kept"]);
        assert_eq!(store.apply_retention(T0 + 4 * 3600 + 1, &retention).expect("again").series_retired, 0);
    }
    // The retirement and the newer hour are on disk.
    let store = open(dir.path());
    assert_eq!(store.series().expect("series"), vec![(kept.id(), kept.clone())]);
    assert_eq!(store.apply_retention(T0 + 5 * 3600 + 1, &retention).expect("retention").series_retired, 0);
    assert_eq!(store.apply_retention(T0 + 6 * 3600 + 1, &retention).expect("retention").series_retired, 1);
}

#[test]
fn an_index_entry_without_an_hour_loads_as_written_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = labels("GET /legacy");
    {
        let store = open(dir.path());
        // The entry as written before the hour was kept: labels alone.
        let cf = store.cf(CF_SERIES).expect("cf");
        store.db.put_cf(cf, a.id().to_be_bytes(), a.encode()).expect("put");
    }
    let store = open(dir.path());
    assert_eq!(store.series().expect("series"), vec![(a.id(), a.clone())]);
    // Counted as written now: nothing older than a retention from now retires it.
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    assert_eq!(store.apply_retention(now, &RetentionConfig::default()).expect("retention").series_retired, 0);
}

#[test]
fn alerting_state_is_kept_per_kind_alike_in_rocksdb_and_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let rocks = open(dir.path());
    let memory = MemoryStore::default();
    for store in [&rocks as &dyn StateStore, &memory] {
        let put = |k: &str, v: &str| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()));
        store.write_state(StateKind::Silence, &[put("a", "1"), put("ab", "2"), put("b", "3")]).unwrap();
        store.write_state(StateKind::NotificationLog, &[put("a", "log")]).unwrap();
        let keys = |kind, prefix: &[u8]| -> Vec<(String, String)> {
            let records = store.state(kind, prefix).unwrap();
            records
                .into_iter()
                .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(keys(StateKind::Silence, b"a"), [pair("a", "1"), pair("ab", "2")]);
        assert_eq!(keys(StateKind::NotificationLog, b""), [pair("a", "log")]);
        assert!(keys(StateKind::RuleState, b"").is_empty());
        store.write_state(StateKind::Silence, &[(b"ab".to_vec(), None)]).unwrap();
        assert_eq!(keys(StateKind::Silence, b""), [pair("a", "1"), pair("b", "3")]);
    }
    // On disk the keys keep the prefixes of the first release.
    let raw: Vec<Vec<u8>> = rocks.alerting_records(b"").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(raw, [b"nflog\0a".to_vec(), b"silence\0a".to_vec(), b"silence\0b".to_vec()]);
}

#[test]
fn watermarks_keep_their_owner_and_last_seen_and_old_rows_still_read() {
    let mark = Watermark { seq: 77, owner: 0xfeed, last_seen: 1_800_000_123 };
    assert_eq!(Watermark::decode(&mark.encode()), Some(mark));
    // A row of the first release: the seq alone.
    assert_eq!(Watermark::decode(&77u64.to_be_bytes()), Some(Watermark { seq: 77, owner: 0, last_seen: 0 }));
    assert_eq!(Watermark::decode(&[1, 2, 3]), None);
}
