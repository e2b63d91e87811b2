use std::time::Duration;

use parking_lot::Mutex;
use tailscope_proto::histogram::Recorder;
use tailscope_proto::v1::{LogRecord, SeriesGroup, SeriesKey, Span};

use super::*;
use crate::clock::SystemClock;
use crate::cluster::{client_key, record};
use crate::config::HistogramConfig;
use crate::store::Exemplar;

/// Counts the spans of every written epoch.
#[derive(Debug, Default)]
struct Counting(Mutex<u64>);

impl EpochSink for Counting {
    fn written(&self, write: &EpochWrite) {
        let spans: u64 =
            write.windows.iter().map(|w| Histogram::decode(&w.histogram).map_or(0, |h| h.count())).sum();
        *self.0.lock() += spans;
    }
}

fn logged(client: u64, seq: u64, now: i64, partition: u32, shards: usize) -> Arc<ValidatedBatch> {
    batch_of(client, seq, now, &[("GET /".into(), 3)], partition, shards)
}

/// Client `client`'s batch `seq` as a store rebuilds it from partition `partition`'s log:
/// per (operation, n) a group of service `cart` with `n` ok spans that started 2 s before `now`.
fn batch_of(
    client: u64,
    seq: u64,
    now: i64,
    groups: &[(String, usize)],
    partition: u32,
    shards: usize,
) -> Arc<ValidatedBatch> {
    let span = Span {
        start_unix_nanos: now - 2_000_000_000,
        duration_nanos: 3_000_000,
        weight: 1,
        ..Default::default()
    };
    let groups = groups
        .iter()
        .map(|(operation, n)| SeriesGroup {
            key: Some(SeriesKey {
                service: "cart".into(),
                operation: operation.clone(),
                ..Default::default()
            }),
            spans: vec![span; *n],
        })
        .collect();
    let record = LogRecord { client_id: client, seq, now_unix_nanos: now, groups, deltas: Vec::new() };
    Arc::new(record::rebuild(record, partition, shards).unwrap())
}

/// A pipeline over a fresh store whose flusher cuts an epoch every `interval`, counting what
/// it writes; stop it with `stop` and await `flusher`.
struct Running {
    _dir: tempfile::TempDir,
    store: Store,
    pipeline: Arc<Pipeline>,
    written: Arc<Counting>,
    stop: watch::Sender<bool>,
    flusher: JoinHandle<()>,
}

fn running(interval: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), HistogramConfig::default().layout().unwrap(), &metrics).unwrap();
    let (pipeline, _shards) =
        Pipeline::start(&IngestConfig::default(), store.clone(), metrics, Arc::new(SystemClock)).unwrap();
    let written = Arc::new(Counting::default());
    pipeline.add_sink(written.clone());
    let (stop, stopped) = watch::channel(false);
    let flusher = tokio::spawn(pipeline.clone().run_flusher(interval, stopped, Duration::from_secs(5)));
    Running { _dir: dir, store, pipeline, written, stop, flusher }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_record_is_written_once_with_its_log_position() {
    let Running { _dir, store, pipeline, written, stop, flusher } = running(Duration::from_millis(20));
    let now = SystemClock.now_nanos();
    let shards = pipeline.shard_count();
    let at = |seq, records| LogPosition { seq, records };

    // Client 7's batch 1 in partition 2, at message 10; its resend through another gateway, at
    // message 11; an anonymous record at message 12; client 7's batch 1 in partition 3 (another
    // share of the same batch) at message 4.
    let admit = |batch, partition, after| pipeline.admit_logged(batch, partition, after).unwrap();
    assert_eq!(admit(logged(7, 1, now, 2, shards), 2, at(10, 1)), Admission::Accepted);
    assert_eq!(admit(logged(7, 1, now, 2, shards), 2, at(11, 1)), Admission::Duplicate);
    assert_eq!(admit(logged(0, 1, now, 2, shards), 2, at(12, 1)), Admission::Accepted);
    assert_eq!(admit(logged(7, 1, now, 3, shards), 3, at(4, 1)), Admission::Accepted);
    // A seq far past the client's watermark is the log's word, not a client's skip.
    assert_eq!(admit(logged(7, 5_000_000, now, 3, shards), 3, at(5, 1)), Admission::Accepted);
    pipeline.skip_logged(3, at(6, 0));
    assert_eq!(pipeline.log_position(2), at(12, 1));

    let mut durable = pipeline.subscribe();
    durable.wait_for(|d| d.epoch >= 2).await.unwrap();
    stop.send(true).unwrap();
    flusher.await.unwrap();
    assert_eq!(*written.0.lock(), 12, "four records of three spans, the resend not counted");
    let mut positions = store.log_positions().unwrap();
    positions.sort_unstable();
    assert_eq!(positions, vec![(2, at(12, 1)), (3, at(6, 0))], "positions written with what they merged");
    let marks: std::collections::HashMap<u64, u64> =
        store.watermarks().unwrap().into_iter().map(|(c, m)| (c, m.seq)).collect();
    assert_eq!(marks.get(&client_key(7, 2)), Some(&1));
    assert_eq!(marks.get(&client_key(7, 3)), Some(&5_000_000));
    assert!(!marks.contains_key(&0), "an anonymous record leaves no watermark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_read_waits_for_whole_messages_and_asks_for_their_epoch() {
    // Regular epochs only every minute: within the waits below, only a hurried one is cut.
    let Running { _dir, store, pipeline, written, stop, flusher } = running(Duration::from_secs(60));
    let now = SystemClock.now_nanos();
    let shards = pipeline.shard_count();
    let whole = |seq| LogPosition { seq, records: u32::MAX };
    let short = Duration::from_millis(50);

    // Nothing applied: the wait names the partition, its target and where it was written to.
    let behind = pipeline.wait_written(&[(2, whole(10)), (3, whole(0))], short).await.unwrap_err();
    assert_eq!(behind, vec![(2, whole(10), LogPosition::default()), (3, whole(0), LogPosition::default())]);

    // The first record of message 10 is in, the message is not whole yet: still behind, and
    // no epoch is asked for.
    let first = LogPosition { seq: 10, records: 1 };
    assert_eq!(pipeline.admit_logged(logged(7, 1, now, 2, shards), 2, first).unwrap(), Admission::Accepted);
    assert!(pipeline.wait_written(&[(2, whole(10))], short).await.is_err());
    assert_eq!(pipeline.written_log_position(2), LogPosition::default());

    // The second record and the end of the message: the wait asks for an epoch and returns
    // once it is written, long before the next regular one.
    let second = LogPosition { seq: 10, records: 2 };
    assert_eq!(pipeline.admit_logged(logged(7, 2, now, 2, shards), 2, second).unwrap(), Admission::Accepted);
    pipeline.finish_logged(2, 10);
    pipeline.wait_written(&[(2, whole(10))], Duration::from_secs(30)).await.unwrap();
    assert_eq!(pipeline.written_log_position(2), whole(10));
    assert_eq!(*written.0.lock(), 6, "both records are visible when the wait returns");
    assert_eq!(store.log_positions().unwrap(), vec![(2, whole(10))]);

    stop.send(true).unwrap();
    flusher.await.unwrap();
}

/// Client `client`'s batch `seq` with one span in each of `series` new series.
fn wide(client: u64, seq: u64, now: i64, series: u64, shards: usize) -> Arc<ValidatedBatch> {
    let groups: Vec<(String, usize)> = (0..series).map(|i| (format!("op-{seq}-{i}"), 1)).collect();
    batch_of(client, seq, now, &groups, 0, shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_holds_a_bounded_number_of_windows_and_admission_waits_until_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), HistogramConfig::default().layout().unwrap(), &metrics).unwrap();
    // One shard holding 8 open windows: it encodes them past 8, and holds at most 16 for an epoch.
    let config = IngestConfig { shards: 1, max_open_windows: 8, ..IngestConfig::default() };
    let (pipeline, _shards) = Pipeline::start(&config, store, metrics, Arc::new(SystemClock)).unwrap();
    let written = Arc::new(Counting::default());
    pipeline.add_sink(written.clone());
    let now = SystemClock.now_nanos();
    let patience = Duration::from_secs(30);

    // No flusher runs, so no epoch is cut: batches of 4 new series are taken until the shard
    // has applied 16 windows, then refused (handed back) although its queue has room.
    let mut seq = 0;
    let deadline = tokio::time::Instant::now() + patience;
    let refused = loop {
        seq += 1;
        match pipeline.admit_logged(wide(7, seq, now, 4, 1), 0, LogPosition { seq, records: 1 }) {
            Ok(admission) => assert_eq!(admission, Admission::Accepted),
            Err(batch) => break batch,
        }
        assert!(tokio::time::Instant::now() < deadline, "admission never waited");
        // Let the shard apply what it was given.
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let taken = seq - 1;
    assert!(taken >= 4, "the bound is 16 windows, 4 per batch: {taken} batches taken");
    assert!(taken <= 4 + config.queue_capacity as u64, "{taken} batches taken");
    assert_eq!(refused.seq, seq);

    // Once the epoch is cut and written, the same batch is taken, and every span is counted.
    let (stop, stopped) = watch::channel(false);
    let flusher = tokio::spawn(pipeline.clone().run_flusher(Duration::from_millis(20), stopped, patience));
    let mut batch = refused;
    loop {
        match pipeline.admit_logged(batch, 0, LogPosition { seq, records: 1 }) {
            Ok(admission) => break assert_eq!(admission, Admission::Accepted),
            Err(back) => batch = back,
        }
        assert!(tokio::time::Instant::now() < deadline + patience, "admission never resumed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let spans = 4 * seq;
    while *written.0.lock() < spans {
        assert!(tokio::time::Instant::now() < deadline + 2 * patience, "never written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*written.0.lock(), spans, "every span of every batch taken, once");
    stop.send(true).unwrap();
    flusher.await.unwrap();
}

/// What the shards told of the traffic they recorded.
#[derive(Debug, Default)]
struct Told {
    names: Mutex<std::collections::HashMap<u64, (String, String)>>,
    /// Per key: full, folded, and the weight of the durations told.
    counts: Mutex<std::collections::HashMap<u64, (u64, u64, u64)>>,
    covered: Mutex<(usize, f64)>,
}

impl TrafficSink for Told {
    fn track(&self, key: u64, service: &str, operation: &str) {
        self.names.lock().insert(key, (service.to_owned(), operation.to_owned()));
    }

    fn recorded(&self, key: u64, full: u64, folded: u64, durations: &Recorder) {
        assert!(self.names.lock().contains_key(&key), "key {key} told before it was tracked");
        let mut weight = 0;
        durations.for_each_value(|_, w| weight += w);
        let mut counts = self.counts.lock();
        let c = counts.entry(key).or_default();
        *c = (c.0 + full, c.1 + folded, c.2 + weight);
    }

    fn covered(&self, seconds: f64) {
        let mut c = self.covered.lock();
        *c = (c.0 + 1, c.1 + seconds);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shards_tell_each_keys_full_and_folded_spans_once_and_not_their_self_times() {
    let Running { _dir, pipeline, stop, flusher, .. } = running(Duration::from_millis(20));
    let told = Arc::new(Told::default());
    assert!(pipeline.feed_traffic(told.clone()));
    assert!(!pipeline.feed_traffic(Arc::new(Told::default())), "set once");
    let now = SystemClock.now_nanos();
    let span = |duration_nanos, weight, status, self_nanos| Span {
        start_unix_nanos: now - 2_000_000_000,
        duration_nanos,
        weight,
        status,
        self_nanos,
        ..Default::default()
    };
    let key = |operation: &str| SeriesKey {
        service: "cart".into(),
        operation: operation.into(),
        ..Default::default()
    };
    let folded = |count| {
        let mut h = Histogram::new(HistogramConfig::default().layout().unwrap());
        h.record(5_000_000, count);
        h.to_bytes()
    };
    let window = (now / 1_000_000_000 - 2).div_euclid(10) * 10;
    let delta = |self_time, count| tailscope_proto::v1::LoggedDelta {
        key: Some(key("pay")),
        status: 0,
        self_time,
        window_start_unix_seconds: window,
        histogram: folded(count),
    };
    let record = LogRecord {
        client_id: 0,
        seq: 1,
        now_unix_nanos: now,
        groups: vec![
            SeriesGroup {
                key: Some(key("pay")),
                // Three ok spans, one failed span of weight 4; self times on two of them.
                spans: vec![
                    span(3_000_000, 1, 0, 1_000_000),
                    span(3_000_000, 1, 0, 0),
                    span(4_000_000, 1, 0, 0),
                    span(900_000_000, 4, 1, 2_000_000),
                ],
            },
            SeriesGroup { key: Some(key("list")), spans: vec![span(1_000_000, 1, 0, 0); 2] },
        ],
        // Ten spans folded by the client, and their self times (not spans of their own).
        deltas: vec![delta(false, 10), delta(true, 10)],
    };
    let shards = pipeline.shard_count();
    let batch = Arc::new(record::rebuild(record, 0, shards).unwrap());
    assert_eq!(Admit::admit(pipeline.as_ref(), batch).unwrap().0, Admission::Accepted);
    let mut durable = pipeline.subscribe();
    durable.wait_for(|d| d.epoch >= 2).await.unwrap();
    stop.send(true).unwrap();
    flusher.await.unwrap();

    let (pay, list) = (crate::series::group_hash("cart", "pay"), crate::series::group_hash("cart", "list"));
    let names = told.names.lock().clone();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(names[&pay], ("cart".to_owned(), "pay".to_owned()));
    assert_eq!(names[&list], ("cart".to_owned(), "list".to_owned()));
    let counts = told.counts.lock().clone();
    assert_eq!(counts[&pay], (7, 10, 17), "full, folded, durations of cart/pay");
    assert_eq!(counts[&list], (2, 0, 2), "full, folded, durations of cart/list");
    let (epochs, seconds) = *told.covered.lock();
    assert!(epochs >= 2 && seconds > 0.0, "{epochs} epochs told, over {seconds} s");
}

/// Collects the exemplars of every written epoch.
#[derive(Debug, Default)]
struct Examples(Mutex<Vec<Exemplar>>);

impl EpochSink for Examples {
    fn written(&self, write: &EpochWrite) {
        self.0.lock().extend(write.exemplars.iter().copied());
    }
}

impl Examples {
    /// What was collected since the last call, in (series, window, ids) order.
    fn take(&self) -> Vec<Exemplar> {
        let mut taken = std::mem::take(&mut *self.0.lock());
        taken.sort_by_key(|e| (e.series, e.window_start, e.trace_id_high, e.trace_id_low, e.span_id));
        taken
    }
}

/// Record `seq` of partition 0's log, classified at `now`: 50 spans of two operations, in the
/// windows 12 s and 2 s before `spans_at`, every seventh failed, of durations and ids that
/// differ from record to record.
fn varied(seq: u64, now: i64, spans_at: i64, shards: usize) -> Arc<ValidatedBatch> {
    let span = |i: u64| {
        let x = (seq * 50 + i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Span {
            start_unix_nanos: spans_at - if i % 2 == 0 { 12_000_000_000 } else { 2_000_000_000 },
            duration_nanos: 1_000_000 + (x >> 40) as i64,
            trace_id_low: x,
            trace_id_high: seq,
            span_id: x ^ i,
            status: if x % 7 == 0 { 2 } else { 0 },
            weight: 1,
            adjusted_count: 1.0,
            ..Default::default()
        }
    };
    let groups = ["GET /", "POST /pay"]
        .iter()
        .enumerate()
        .map(|(g, operation)| SeriesGroup {
            key: Some(SeriesKey {
                service: "cart".into(),
                operation: (*operation).into(),
                ..Default::default()
            }),
            spans: (0..25).map(|i| span(g as u64 * 25 + i)).collect(),
        })
        .collect();
    let record = LogRecord { client_id: 9, seq, now_unix_nanos: now, groups, deltas: Vec::new() };
    Arc::new(record::rebuild(record, 0, shards).unwrap())
}

/// A pipeline over a fresh store on `clock` whose flusher cuts an epoch every 5 ms, its
/// exemplars collected (the store's directory and the flusher's stop are kept with it).
#[allow(clippy::type_complexity)]
fn clocked(
    clock: Arc<crate::clock::ManualClock>,
) -> (Arc<Pipeline>, Arc<Examples>, (tempfile::TempDir, watch::Sender<bool>)) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), HistogramConfig::default().layout().unwrap(), &metrics).unwrap();
    let (pipeline, _shards) = Pipeline::start(&IngestConfig::default(), store, metrics, clock).unwrap();
    let examples = Arc::new(Examples::default());
    pipeline.add_sink(examples.clone());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(pipeline.clone().run_flusher(Duration::from_millis(5), stopped, Duration::from_secs(5)));
    (pipeline, examples, (dir, stop))
}

/// Waits until an epoch cut after everything admitted so far is written.
async fn flushed(pipeline: &Arc<Pipeline>) {
    let mut durable = pipeline.subscribe();
    let before = durable.borrow().epoch;
    durable.wait_for(|d| d.epoch > before + 1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_reads_its_stored_records_again_keeps_the_exemplars_its_peer_keeps() {
    let t = 1_700_000_000_000_000_000i64;
    let at = |seq| LogPosition { seq, records: 1 };
    // The peer reads records 1–40 straight through, an epoch written after record 20; then
    // the windows close.
    let clock = Arc::new(crate::clock::ManualClock::new(t));
    let (peer, peer_examples, _a) = clocked(clock.clone());
    let shards = peer.shard_count();
    for seq in 1..=20 {
        assert_eq!(peer.admit_logged(varied(seq, t, t, shards), 0, at(seq)).unwrap(), Admission::Accepted);
    }
    flushed(&peer).await;
    for seq in 21..=40 {
        assert_eq!(peer.admit_logged(varied(seq, t, t, shards), 0, at(seq)).unwrap(), Admission::Accepted);
    }
    clock.set(t + 100_000_000_000);
    flushed(&peer).await;
    let expected = peer_examples.take();

    // The replica holds records 1–20 already (a restart, or a copy of the peer's store): it
    // reads them again into its exemplar sets only, then reads on from 21.
    let clock = Arc::new(crate::clock::ManualClock::new(t));
    let (replica, replica_examples, _b) = clocked(clock.clone());
    let (_, floor) = replica.warm_range(t.div_euclid(1_000_000_000), 30);
    for seq in 1..=20 {
        replica.warm(0, varied(seq, t, t, shards), floor).await.unwrap();
    }
    replica.warmed(0, true).await;
    for seq in 21..=40 {
        assert_eq!(replica.admit_logged(varied(seq, t, t, shards), 0, at(seq)).unwrap(), Admission::Accepted);
    }
    clock.set(t + 100_000_000_000);
    flushed(&replica).await;
    let got = replica_examples.take();

    // Two operations × ok and failed × two windows: eight sets.
    let sets: std::collections::HashSet<_> = expected.iter().map(|e| (e.series, e.window_start)).collect();
    assert_eq!(sets.len(), 8, "{expected:?}");
    assert!(expected.iter().any(|e| e.trace_id_high <= 20), "some kept spans are of the records read again");
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_closed_among_the_records_read_again_is_not_written_twice() {
    let t = 1_700_000_000_000_000_000i64;
    let later = t + 40_000_000_000;
    let at = |seq| LogPosition { seq, records: 1 };
    // Records 1–20 at t (windows t-12 s and t-2 s), then 21–30 forty seconds later: those
    // closed the first two windows, 21–25 sent late spans to them and 26–30 opened two more.
    let record = |seq: u64, shards| match seq {
        ..=20 => varied(seq, t, t, shards),
        21..=25 => varied(seq, later, t, shards),
        _ => varied(seq, later, later, shards),
    };
    let clock = Arc::new(crate::clock::ManualClock::new(t));
    let (peer, peer_examples, _a) = clocked(clock.clone());
    let shards = peer.shard_count();
    for seq in 1..=20 {
        peer.admit_logged(record(seq, shards), 0, at(seq)).unwrap();
    }
    flushed(&peer).await;
    clock.set(later);
    flushed(&peer).await;
    let first: Vec<Exemplar> = peer_examples.take();
    for seq in 21..=30 {
        peer.admit_logged(record(seq, shards), 0, at(seq)).unwrap();
    }
    clock.set(later + 100_000_000_000);
    flushed(&peer).await;
    let rest: Vec<Exemplar> = peer_examples.take();
    let opened_later = |e: &Exemplar| e.window_start > t.div_euclid(1_000_000_000);
    assert!(!first.is_empty() && first.iter().all(|e| !opened_later(e)), "the first windows closed first");
    let (late, open): (Vec<Exemplar>, Vec<Exemplar>) = rest.into_iter().partition(|e| !opened_later(e));
    assert!(!late.is_empty(), "late spans of the closed windows made sets of their own");

    // A replica that holds records 1–30 reads them again: the windows closed among them are
    // the store's already (both of their sets), so it writes only the open ones, as the peer.
    let clock = Arc::new(crate::clock::ManualClock::new(later));
    let (replica, replica_examples, _b) = clocked(clock.clone());
    let (_, floor) = replica.warm_range(later.div_euclid(1_000_000_000), 60);
    assert!(floor <= t.div_euclid(1_000_000_000) - 12, "every window is read again");
    for seq in 1..=30 {
        replica.warm(0, record(seq, shards), floor).await.unwrap();
    }
    replica.warmed(0, true).await;
    clock.set(later + 100_000_000_000);
    flushed(&replica).await;
    let got = replica_examples.take();
    assert!(!open.is_empty());
    assert_eq!(got, open);
}
