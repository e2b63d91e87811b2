use super::*;
use crate::series::Status;
use crate::store::{EpochWrite, WindowDelta};
use crate::telemetry::Metrics;
use tailscope_proto::histogram::Histogram;

const PARTITIONS: u32 = 4;
const T0: i64 = 1_800_000_000;
const WINDOWS: i64 = 30;

/// A store with 12 services' series (`svc0`…`svc11`, operation `op`), each with 30 windows.
fn store(dir: &std::path::Path) -> (Store, Vec<(u64, SeriesLabels)>) {
    let store = Store::open(dir, Layout::default(), &Metrics::new()).unwrap();
    let mut all = Vec::new();
    let mut write = EpochWrite::default();
    for s in 0..12 {
        let labels = SeriesLabels::new(format!("svc{s}"), "op", Status::Ok);
        let id = labels.id();
        for w in 0..WINDOWS {
            let mut h = Histogram::new(Layout::default());
            h.record(1_000_000 * (w as u64 + 1), s as u64 + 1);
            write.windows.push(WindowDelta {
                series: id,
                window_start: T0 + 10 * w,
                histogram: h.to_bytes(),
            });
        }
        write.series.push((id, labels.clone()));
        all.push((id, labels));
    }
    store.write_epoch(&write).unwrap();
    all.sort_by_key(|(id, _)| *id);
    (store, all)
}

/// Every page of `request`, following `next`, as `answer` gives them in `budget` bytes.
fn pages(
    store: &Store,
    ready: &dyn Fn(u32) -> bool,
    mut request: ReadRequest,
    budget: usize,
    next: fn(&mut ReadRequest, &ReadReply) -> bool,
) -> Vec<ReadReply> {
    let mut out = Vec::new();
    loop {
        let reply = answer(store, PARTITIONS, ready, request.clone(), budget);
        assert!(reply.error.is_empty(), "{}", reply.error);
        let more = reply.truncated && next(&mut request, &reply);
        out.push(reply);
        if !more {
            return out;
        }
        assert!(out.len() < 1000, "paging does not end");
    }
}

#[test]
fn a_store_answers_only_the_partitions_it_holds_caught_up_in_pages_that_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = store(dir.path());
    let held = |p: u32| p < 2;
    let select = |at_most| ReadRequest {
        partitions: (0..PARTITIONS).collect(),
        op: Some(Op::Select(SelectOp { matchers: Vec::new(), at_most, resume: false, after: 0 })),
    };
    let want: Vec<u64> =
        all.iter().filter(|(_, l)| held(partition_of(l, PARTITIONS))).map(|(id, _)| *id).collect();
    assert!(!want.is_empty() && want.len() < all.len(), "the services spread over the partitions");
    // Whole, then in pages of about one series: the same series, each once, in id order.
    for budget in [usize::MAX, 40] {
        let replies = pages(&store, &held, select(u64::MAX), budget, next_select);
        assert_eq!(replies[0].not_caught_up, [2, 3]);
        let got: Vec<u64> = replies.iter().flat_map(|r| r.series.iter().map(|s| s.id)).collect();
        assert_eq!(got, want, "budget {budget}");
        if budget == 40 {
            assert!(replies.len() > 1, "a small budget pages");
        }
        for s in replies.iter().flat_map(|r| &r.series) {
            let labels = SeriesLabels::decode(&s.labels).unwrap();
            assert_eq!(labels.id(), s.id);
        }
    }
    // At most: the first of them, across pages too.
    let replies = pages(&store, &held, select(2), 40, next_select);
    let got: Vec<u64> = replies.iter().flat_map(|r| r.series.iter().map(|s| s.id)).collect();
    assert_eq!(got, want[..2]);
    // Nothing held: nothing answered, everything named.
    let reply = answer(&store, PARTITIONS, &|_| false, select(u64::MAX), usize::MAX);
    assert!(reply.series.is_empty());
    assert_eq!(reply.not_caught_up, [0, 1, 2, 3]);
}

#[test]
fn windows_and_label_values_page_without_losing_or_repeating_any() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = store(dir.path());
    let (id, labels) = all[0].clone();
    let p = partition_of(&labels, PARTITIONS);
    let mut direct = Vec::new();
    store
        .windows_in(Resolution::S10, id, &[(T0, T0 + 100), (T0 + 150, T0 + 10 * WINDOWS)], &mut |s, b| {
            direct.push((s, b.to_vec()));
            Ok(())
        })
        .unwrap();
    assert_eq!(direct.len(), 10 + 15);
    // Two series in one read: each one's windows, in order, whatever the page size.
    let (other, _) = all[1].clone();
    let request = ReadRequest {
        partitions: vec![p],
        op: Some(Op::Windows(WindowsOp {
            resolution_seconds: 10,
            series: vec![id, other],
            bounds: vec![T0, T0 + 100, T0 + 150, T0 + 10 * WINDOWS],
            resume: false,
            first_from: 0,
        })),
    };
    let mut want: Vec<(u64, i64, Vec<u8>)> = direct.iter().map(|(s, b)| (id, *s, b.clone())).collect();
    store
        .windows_in(Resolution::S10, other, &[(T0, T0 + 100), (T0 + 150, T0 + 10 * WINDOWS)], &mut |s, b| {
            want.push((other, s, b.to_vec()));
            Ok(())
        })
        .unwrap();
    for budget in [usize::MAX, 1, 600] {
        let replies = pages(&store, &|_| true, request.clone(), budget, next_from);
        if budget < usize::MAX {
            assert!(replies.len() > 2, "budget {budget}: {} pages", replies.len());
        }
        let got: Vec<(u64, i64, Vec<u8>)> =
            replies.into_iter().flat_map(|r| r.windows).map(|w| (w.series, w.start, w.histogram)).collect();
        assert_eq!(got, want, "budget {budget}");
    }

    let values = ReadRequest {
        partitions: vec![0],
        op: Some(Op::LabelValues(LabelValuesOp {
            label: "service".into(),
            limit: 100,
            after: String::new(),
        })),
    };
    let mut want: Vec<String> = (0..12).map(|s| format!("svc{s}")).collect();
    want.sort();
    for budget in [usize::MAX, 8] {
        let replies = pages(&store, &|_| true, values.clone(), budget, next_values);
        let got: Vec<String> = replies.into_iter().flat_map(|r| r.values).collect();
        assert_eq!(got, want, "budget {budget}");
    }
    let limited = ReadRequest {
        partitions: vec![0],
        op: Some(Op::LabelValues(LabelValuesOp { label: "service".into(), limit: 3, after: String::new() })),
    };
    let reply = answer(&store, PARTITIONS, &|_| true, limited, usize::MAX);
    assert_eq!((reply.values, reply.more), (want[..3].to_vec(), true));
}

/// A histogram's count, sum and buckets.
type Content = (u64, u128, Vec<(usize, u64)>);

/// A histogram's content, to compare merges that may encode differently.
fn content(bytes: &[u8]) -> Content {
    let h = Histogram::decode(bytes).unwrap();
    (h.count(), h.sum(), h.iter_nonzero().collect())
}

#[test]
fn merged_reads_add_up_per_group_and_start_or_interval_in_any_page_size() {
    let dir = tempfile::tempdir().unwrap();
    let (store, all) = store(dir.path());
    let intervals = [(T0, T0 + 100), (T0 + 150, T0 + 10 * WINDOWS)];
    // Two groups: every series and the first one 40 times more (more encodings per start than
    // are held before they are folded), and three others.
    let mut first: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    first.extend(std::iter::repeat_n(all[0].0, 40));
    let groups = vec![first, all[3..6].iter().map(|(id, _)| *id).collect::<Vec<u64>>()];
    for whole in [false, true] {
        let mut want: Vec<(u64, i64, Content)> = Vec::new();
        for (g, members) in groups.iter().enumerate() {
            let mut merged: BTreeMap<i64, Histogram> = BTreeMap::new();
            for &m in members {
                store
                    .windows_in(Resolution::S10, m, &intervals, &mut |s, b| {
                        let key = match (whole, s < T0 + 100) {
                            (false, _) => s,
                            (true, true) => T0,
                            (true, false) => T0 + 150,
                        };
                        merged
                            .entry(key)
                            .or_insert_with(|| Histogram::new(Layout::default()))
                            .merge(&Histogram::decode(b)?);
                        Ok(())
                    })
                    .unwrap();
            }
            want.extend(merged.into_iter().map(|(s, h)| (g as u64, s, content(&h.to_bytes()))));
        }
        assert_eq!(want.len(), if whole { 4 } else { 50 });
        let request = ReadRequest {
            partitions: (0..PARTITIONS).collect(),
            op: Some(merged_op(Resolution::S10, groups.clone(), &intervals, whole)),
        };
        for budget in [usize::MAX, 1, 300] {
            let replies = pages(&store, &|_| true, request.clone(), budget, next_from);
            if budget == 1 {
                assert_eq!(replies.len(), want.len(), "whole {whole}: one window per page");
            }
            let got: Vec<(u64, i64, Content)> = replies
                .into_iter()
                .flat_map(|r| r.windows)
                .map(|w| (w.series, w.start, content(&w.histogram)))
                .collect();
            assert_eq!(got, want, "whole {whole}, budget {budget}");
        }
    }
    // A bad resolution is refused by name.
    let mut bad = merged_op(Resolution::S10, groups, &intervals, true);
    if let Op::Merged(op) = &mut bad {
        op.resolution_seconds = 7;
    }
    let reply =
        answer(&store, PARTITIONS, &|_| true, ReadRequest { partitions: vec![0], op: Some(bad) }, usize::MAX);
    assert!(reply.error.contains('7'), "{}", reply.error);
}

#[test]
fn matchers_travel_as_they_match_and_bad_ones_are_named() {
    let selector =
        promql_parser::parser::parse(r#"x{service=~"svc1.*", operation!="nope", status!~"error"}"#).unwrap();
    let promql_parser::parser::Expr::VectorSelector(v) = selector else { panic!("a selector") };
    for m in &v.matchers.matchers {
        let back = matcher(&matcher_msg(m)).unwrap();
        for value in ["svc1", "svc10", "svc2", "nope", "error", "ok", ""] {
            assert_eq!(back.is_match(value), m.is_match(value), "{m:?} on {value:?}");
        }
    }
    let bad = |op, value: &str| {
        matcher(&MatcherMsg { op, name: "service".into(), value: value.into() }).unwrap_err()
    };
    assert!(bad(9, "x").contains("unknown operator 9"));
    assert!(bad(2, "(").contains("matcher on \"service\""));
    assert!(bad(0, &"a".repeat(MAX_REGEX_BYTES + 1)).contains("longer than"));
    // A read with no operation, or a barrier sent as a read, is refused by name.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = store(dir.path());
    let none = answer(&store, PARTITIONS, &|_| true, ReadRequest { partitions: vec![0], op: None }, 1 << 20);
    assert_eq!(none.error, "a read without an operation");
    let barrier = ReadRequest { partitions: vec![0], op: Some(Op::Barrier(BarrierOp {})) };
    assert_eq!(answer(&store, PARTITIONS, &|_| true, barrier, 1 << 20).error, "a barrier is not a read");
    assert_eq!(resolution(7).unwrap_err(), "no 7-second resolution");
}
