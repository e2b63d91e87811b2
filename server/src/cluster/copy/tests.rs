use tailscope_proto::histogram::{Histogram, Layout};

use super::*;
use crate::series::Status;
use crate::store::{EpochWrite, WindowDelta};

const PARTITIONS: u32 = 4;

/// A store holding 40 series over the partitions, and every partition's position at 7.
fn store(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, Layout::default(), &Metrics::new()).expect("open");
    let mut h = Histogram::new(Layout::default());
    h.record(1_000, 1);
    let series: Vec<(u64, SeriesLabels)> = (0..40)
        .map(|i| {
            let l = SeriesLabels::new(format!("svc{i}"), "op", Status::Ok);
            (l.id(), l)
        })
        .collect();
    let write = EpochWrite {
        windows: series
            .iter()
            .map(|(id, _)| WindowDelta { series: *id, window_start: 1_800_000_000, histogram: h.to_bytes() })
            .collect(),
        series,
        log_positions: (0..PARTITIONS).map(|p| (p, LogPosition { seq: 7, records: u32::MAX })).collect(),
        ..EpochWrite::default()
    };
    store.write_epoch(&write).expect("write");
    store
}

fn ask(copies: &Copies, partition: u32, op: CopyOp, budget: usize) -> ReadReply {
    copies.page(Some(partition), op, &|p| p != 3, budget)
}

#[test]
fn copies_are_given_only_when_caught_up_two_at_once_and_end_with_their_last_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let copies = Copies::new(store(dir.path()), PARTITIONS);
    let small = 4096 + 64; // a record or so per page

    // Not caught up, or no such partition: nothing is started.
    assert_eq!(ask(&copies, 3, CopyOp::default(), small).not_caught_up, vec![3]);
    assert!(copies.page(Some(PARTITIONS), CopyOp::default(), &|_| true, small).error.contains("below 4"));
    assert!(copies.page(None, CopyOp::default(), &|_| true, small).error.contains("one partition"));
    // Caught up with nothing written: nothing to copy, and no checkpoint made.
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty = Store::open(empty_dir.path(), Layout::default(), &Metrics::new()).expect("open");
    let none = Copies::new(empty, PARTITIONS).page(Some(0), CopyOp::default(), &|_| true, small);
    assert_eq!((none.error.as_str(), none.session, none.position_seq, none.truncated), ("", 0, 0, false));
    assert!(!empty_dir.path().join("copies").exists());

    // Two copies at once; a third is told to come back.
    let first = ask(&copies, 0, CopyOp::default(), small);
    let second = ask(&copies, 1, CopyOp::default(), small);
    for r in [&first, &second] {
        assert!(r.error.is_empty() && !r.busy && r.truncated, "{r:?}");
        assert_eq!((r.position_seq, r.position_records), (7, u32::MAX));
    }
    assert!(ask(&copies, 2, CopyOp::default(), small).busy);
    assert_eq!(std::fs::read_dir(dir.path().join("copies")).expect("checkpoints").count(), 2);

    // A session is asked for its own partition only; an ended one is gone, its checkpoint too.
    let wrong = ask(&copies, 1, CopyOp { session: first.session, ..CopyOp::default() }, small);
    assert!(wrong.error.contains("partition 0, not 1"), "{}", wrong.error);
    ask(&copies, 1, CopyOp { session: second.session, end: true, ..CopyOp::default() }, small);
    let gone = ask(&copies, 1, CopyOp { session: second.session, family: 0, ..CopyOp::default() }, small);
    assert!(gone.error.contains("no copy"), "{}", gone.error);
    assert_eq!(std::fs::read_dir(dir.path().join("copies")).expect("checkpoints").count(), 1);

    // Paged to its end, a copy carries every series of its partition, once, and then ends.
    let mut reply = ask(&copies, 2, CopyOp::default(), small);
    let session = reply.session;
    let mut copied = reply.copied.clone();
    while reply.truncated {
        let next = CopyOp {
            session,
            family: reply.resume_family,
            resume: true,
            after: reply.resume_after.clone(),
            end: false,
        };
        reply = ask(&copies, 2, next, small);
        assert!(reply.error.is_empty(), "{}", reply.error);
        copied.extend(reply.copied.clone());
    }
    let series: Vec<&CopiedMsg> = copied.iter().filter(|c| c.family == 0).collect();
    let expected = (0..40)
        .filter(|i| partition_of(&SeriesLabels::new(format!("svc{i}"), "op", Status::Ok), PARTITIONS) == 2)
        .count();
    assert!(expected > 0);
    assert_eq!(series.len(), expected);
    // Each series' three windows (10 s, 1 m, 1 h).
    assert_eq!(copied.len(), expected * 4);
    let after_end = ask(&copies, 2, CopyOp { session, family: 0, ..CopyOp::default() }, small);
    assert!(after_end.error.contains("no copy"), "{}", after_end.error);
}
