//! A shard: one task that owns the open windows of the series routed to it. It records the
//! spans of every batch it is handed into per-(series, window) histograms and, at each flush
//! epoch, hands the encoded deltas to the coordinator.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tailscope_proto::histogram::{Layout, Recorder};
use tailscope_proto::v1::Span;
use tokio::sync::{mpsc, oneshot};

use super::exemplar_set::ExemplarSet;
use super::ValidatedBatch;
use crate::series::SpanLimits;
use crate::series::{IdBuildHasher, SeriesLabels, Status};
use crate::store::{Exemplar, WindowDelta};
use crate::traffic::TrafficSink;

/// How long a series stays "active" (and known to need no index write) after its last span.
/// A contract, not only a detail: a series idle this long is named again (its labels in the
/// epoch's `series`) with its next span, which is what an [`crate::store::EpochSink`] that keeps
/// labels relies on.
pub const ACTIVE_SECONDS: i64 = 600;
/// Exemplars of a window are written once the window ended this long ago (late spans of it
/// that arrive later start a new set).
const EXEMPLAR_GRACE_SECONDS: i64 = 20;
/// Messages a shard reads from its queue, in order.
#[derive(Debug)]
pub enum ShardMsg {
    /// Record the groups and deltas of `batch` that this shard owns; `epoch` is the flush
    /// epoch the batch belongs to.
    Work {
        /// The epoch the batch was admitted in.
        epoch: u64,
        /// The batch.
        batch: Arc<ValidatedBatch>,
    },
    /// Cluster mode rebuilds the exemplar sets of a partition's open windows from the log
    /// records it had already stored (the cluster consumer): offer the spans of `batch`
    /// this shard owns to sets of their windows kept aside for `partition`, and nothing else
    /// (no histogram, no series, no epoch). Windows starting before `floor` (seconds) are left
    /// out: their first spans may lie before the records read again.
    Warm {
        /// The partition whose records are read again.
        partition: u32,
        /// A record.
        batch: Arc<ValidatedBatch>,
        /// The first window offered to.
        floor: i64,
    },
    /// The end of `partition`'s [`ShardMsg::Warm`]s: with `keep`, the sets kept aside (of
    /// windows still open at the records' latest time) become the shard's; without, they are
    /// dropped (the records were not all read again).
    Warmed {
        /// The partition.
        partition: u32,
        /// Whether every record was read again.
        keep: bool,
    },
    /// Drop every exemplar set of `series` (a partition read again from another position).
    Forget {
        /// The series.
        series: Arc<HashSet<u64>>,
    },
    /// Hand over everything of epochs up to `epoch`.
    Flush {
        /// The epoch being cut.
        epoch: u64,
        /// The coordinator's wall-clock time, in seconds.
        now: i64,
        /// Where to send the deltas.
        reply: oneshot::Sender<Handover>,
    },
}

/// What a shard hands over at a flush.
#[derive(Debug, Default)]
pub struct Handover {
    /// Exemplars of windows that closed.
    pub exemplars: Vec<Exemplar>,
    /// Encoded deltas per series and window.
    pub windows: Vec<WindowDelta>,
    /// Series this shard saw for the first time (since start-up or since they went idle).
    pub series: Vec<(u64, SeriesLabels)>,
    /// Series that received spans in the last ten minutes.
    pub active_series: usize,
}

/// One (series, window)'s delta in an epoch, and whose traffic it counts.
#[derive(Debug)]
struct Open {
    /// Its values as they came, bucketed only when encoded.
    recorder: Recorder,
    /// The group key of the spans it counts, for the sampler (none for self times, which
    /// are not spans of their own).
    key: Option<u64>,
    /// Spans (weighted) that came in full.
    full: u64,
    /// Spans that came folded into clients' deltas.
    folded: u64,
}

impl Open {
    fn new(layout: Layout, key: Option<u64>) -> Open {
        Open { recorder: Recorder::new(layout), key, full: 0, folded: 0 }
    }
}

/// The sink the shards' traffic goes to, once one is set.
type Traffic = Arc<std::sync::OnceLock<Arc<dyn TrafficSink>>>;

/// A group's name as counted: [`crate::cardinality::OVERFLOW`] when it went over its cap.
fn counted(sent: Option<&String>, overflowed: bool) -> &str {
    if overflowed {
        crate::cardinality::OVERFLOW
    } else {
        sent.map_or("", String::as_str)
    }
}

/// The deltas of one epoch.
#[derive(Debug, Default)]
struct Accumulator {
    /// Each (series, window)'s delta.
    windows: HashMap<(u64, i64), Open, IdBuildHasher>,
    series: Vec<(u64, SeriesLabels)>,
    /// Histograms already encoded because the epoch held its share of open windows: a few
    /// dozen bytes each instead of the kilobytes of an open one. The store adds deltas of the
    /// same (series, window) as merge operands, so one may be spilled more than once.
    spilled: Vec<WindowDelta>,
    /// Exemplars of windows that had closed when the histograms were spilled.
    spilled_exemplars: Vec<Exemplar>,
    /// Whether this epoch was asked to be cut early for holding too many windows.
    hurried: bool,
}

impl Accumulator {
    /// The windows it holds, open or encoded.
    fn held(&self) -> usize {
        self.windows.len() + self.spilled.len()
    }

    /// Encodes every open histogram into `spilled`, telling `traffic` what each counted.
    fn spill(&mut self, traffic: Option<&dyn TrafficSink>) {
        self.spilled.extend(self.windows.drain().map(|((series, window_start), open)| {
            if let (Some(sink), Some(key)) = (traffic, open.key) {
                sink.recorded(key, open.full, open.folded, &open.recorder);
            }
            WindowDelta { series, window_start, histogram: open.recorder.to_bytes() }
        }));
    }
}

/// The start of the newest window whose exemplars are final at second `now`.
pub(crate) fn closed_before(now: i64) -> i64 {
    now - tailscope_proto::BASE_WINDOW_SECONDS - EXEMPLAR_GRACE_SECONDS
}

/// Offers `span`, of `series`' window starting at `window`, to that window's exemplar set.
/// The draw depends on the span and its place in the window's order only, never on what else
/// the shard saw: replicas applying a partition's log in order (cluster mode) keep the same
/// exemplars.
fn offer(set: &mut ExemplarSet, span: &Span, series: u64, window: i64, status: Status) {
    let exemplar = Exemplar {
        series,
        window_start: window,
        trace_id_high: span.trace_id_high,
        trace_id_low: span.trace_id_low,
        span_id: span.span_id,
        start_unix_nanos: span.start_unix_nanos,
        duration_nanos: span.duration_nanos,
        adjusted_count: span.adjusted_count,
    };
    let mut draw = series
        ^ (window as u64).rotate_left(29)
        ^ span.span_id
        ^ span.trace_id_low
        ^ set.seen().wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    draw |= 1;
    set.offer(&exemplar, status == Status::Error, &mut draw);
}

/// The shard's share of `ingest.max_open_windows`, and how it asks for an early epoch.
#[derive(Debug, Clone)]
pub struct OpenLimit {
    /// Most (series, window) histograms the shard's epoch may hold before it asks.
    pub windows: usize,
    /// Wakes the flusher.
    pub hurry: Arc<tokio::sync::Notify>,
    /// How many windows, open or already encoded, the shard holds for epochs not yet handed
    /// over: admission waits while it is past its bound ([`super::Pipeline`]).
    pub held: Arc<AtomicUsize>,
}

/// A partition's exemplar sets being rebuilt ([`ShardMsg::Warm`]).
struct Warming {
    sets: HashMap<(u64, i64), ExemplarSet, IdBuildHasher>,
    /// The latest log time (seconds) of the records read again.
    now: i64,
    /// The newest window closed at `now`: its set was written when its records were first
    /// read, and a set of it begun later too (late spans), so neither is rebuilt.
    closed: i64,
}

struct ShardState {
    id: u32,
    layout: Layout,
    limits: SpanLimits,
    /// Series seen recently, with the second they were last seen.
    known: HashMap<u64, i64, IdBuildHasher>,
    now: i64,
    /// Exemplars of open windows, per (series, window).
    exemplars: HashMap<(u64, i64), ExemplarSet, IdBuildHasher>,
    /// Per partition being warmed ([`ShardMsg::Warm`]), the sets rebuilt so far: kept apart
    /// so no flush writes a set before it is whole.
    warming: HashMap<u32, Warming>,
    /// A group's self times ((series, window), nanoseconds, weight), recorded after its
    /// durations so the durations' run cache stays open; reused between groups.
    self_times: Vec<((u64, i64), u64, u64)>,
}

impl ShardState {
    fn note_series(&mut self, acc: &mut Accumulator, id: u64, labels: impl FnOnce() -> SeriesLabels) {
        if self.known.insert(id, self.now).is_none() {
            acc.series.push((id, labels()));
        }
    }

    fn apply(&mut self, acc: &mut Accumulator, work: &ValidatedBatch, traffic: Option<&dyn TrafficSink>) {
        self.now = self.now.max(work.now.div_euclid(1_000_000_000));
        for (group, route) in work.batch.groups.iter().zip(&work.groups) {
            if route.shard != self.id {
                continue;
            }
            let key = group.key.as_ref();
            let service = counted(key.map(|k| &k.service), route.service_overflow);
            let operation = counted(key.map(|k| &k.operation), route.overflow);
            let mut seen = [false; 2];
            // Spans of a group mostly share a series and window: the two maps are looked up
            // once per run of them, not once per span.
            let mut open: Option<((u64, i64), &mut Open, &mut ExemplarSet)> = None;
            let mut timed_self = [false; 2];
            self.self_times.clear();
            for span in &group.spans {
                let Ok(window) = self.limits.classify(span.start_unix_nanos, span.duration_nanos, work.now)
                else {
                    continue;
                };
                let status = Status::from_wire(span.status);
                let series = route.series(status);
                seen[status as usize] = true;
                let at = (series, window);
                let (histogram, exemplars) = match open {
                    Some((key, ref mut h, ref mut e)) if key == at => (h, e),
                    _ => {
                        open = None;
                        let layout = self.layout;
                        let h = acc.windows.entry(at).or_insert_with(|| {
                            if let Some(sink) = traffic {
                                sink.track(route.key, service, operation);
                            }
                            Open::new(layout, Some(route.key))
                        });
                        let e = self.exemplars.entry(at).or_default();
                        let (_, h, e) = open.insert((at, h, e));
                        (h, e)
                    }
                };
                offer(exemplars, span, series, window, status);
                let weight = u64::from(span.weight.max(1));
                histogram.recorder.record(span.duration_nanos as u64, weight);
                histogram.full = histogram.full.saturating_add(weight);
                if let (Some((ok, error)), true) = (route.self_series, span.self_nanos > 0) {
                    let series = if status == Status::Ok { ok } else { error };
                    timed_self[status as usize] = true;
                    let own = span.self_nanos.min(span.duration_nanos) as u64;
                    self.self_times.push(((series, window), own, u64::from(span.weight.max(1))));
                }
            }
            // The self times, with a run cache of their own (they share series and window as
            // the durations do).
            let mut open_self: Option<((u64, i64), &mut Recorder)> = None;
            for &(at, own, weight) in &self.self_times {
                let histogram = match open_self {
                    Some((key, ref mut h)) if key == at => h,
                    _ => {
                        open_self = None;
                        let layout = self.layout;
                        let h =
                            &mut acc.windows.entry(at).or_insert_with(|| Open::new(layout, None)).recorder;
                        &mut open_self.insert((at, h)).1
                    }
                };
                histogram.record(own, weight);
            }
            let labels = |status| SeriesLabels {
                service: service.to_owned(),
                operation: operation.to_owned(),
                status,
                kind: route.kind,
                peer: counted(key.map(|k| &k.peer), route.peer_overflow).to_owned(),
                measure: crate::series::Measure::Duration,
            };
            for (status, series) in [(Status::Ok, route.ok_series), (Status::Error, route.error_series)] {
                if seen[status as usize] {
                    self.note_series(acc, series, || labels(status));
                }
            }
            if let Some((ok, error)) = route.self_series {
                for (status, series) in [(Status::Ok, ok), (Status::Error, error)] {
                    if timed_self[status as usize] {
                        self.note_series(acc, series, || labels(status).self_time());
                    }
                }
            }
        }
        let me = self.id;
        for delta in work.deltas.iter().filter(|d| d.shard == me) {
            let layout = self.layout;
            // Self times are not spans of their own: only durations are traffic.
            let spans = delta.labels.measure == crate::series::Measure::Duration;
            let open = acc.windows.entry((delta.series, delta.window_start)).or_insert_with(|| {
                if let (Some(sink), true) = (traffic, spans) {
                    sink.track(delta.key, &delta.labels.service, &delta.labels.operation);
                }
                Open::new(layout, spans.then_some(delta.key))
            });
            open.recorder.merge(&delta.histogram);
            if spans {
                open.folded = open.folded.saturating_add(delta.histogram.count());
            }
            self.note_series(acc, delta.series, || delta.labels.clone());
        }
    }

    /// [`ShardMsg::Warm`]: offers `work`'s spans of windows from `floor` on to their exemplar
    /// sets, as [`ShardState::apply`] did when the records were first read.
    fn warm(&mut self, partition: u32, work: &ValidatedBatch, floor: i64) {
        let now = work.now.div_euclid(1_000_000_000);
        self.now = self.now.max(now);
        let w = self.warming.entry(partition).or_insert_with(|| Warming {
            sets: HashMap::default(),
            now: i64::MIN,
            closed: i64::MIN,
        });
        // Windows close as the records' time passes them, as they did the first time (give or
        // take the flush that wrote them).
        w.now = w.now.max(now);
        if closed_before(w.now) > w.closed {
            w.closed = closed_before(w.now);
            let closed = w.closed;
            w.sets.retain(|&(_, window), _| window > closed);
        }
        for (group, route) in work.batch.groups.iter().zip(&work.groups) {
            if route.shard != self.id {
                continue;
            }
            for span in &group.spans {
                let Ok(window) = self.limits.classify(span.start_unix_nanos, span.duration_nanos, work.now)
                else {
                    continue;
                };
                if window < floor || window <= w.closed {
                    continue;
                }
                let status = Status::from_wire(span.status);
                let series = route.series(status);
                offer(w.sets.entry((series, window)).or_default(), span, series, window, status);
            }
        }
    }

    /// [`ShardMsg::Warmed`].
    fn warmed(&mut self, partition: u32, keep: bool) {
        if let Some(w) = self.warming.remove(&partition).filter(|_| keep) {
            self.exemplars.extend(w.sets);
        }
    }

    fn hand_over(&mut self, mut acc: Accumulator, now: i64, traffic: Option<&dyn TrafficSink>) -> Handover {
        self.now = self.now.max(now);
        let horizon = self.now - ACTIVE_SECONDS;
        self.known.retain(|_, &mut seen| seen >= horizon);
        acc.spill(traffic);
        let windows = acc.spilled;
        let mut exemplars = acc.spilled_exemplars;
        self.take_closed_exemplars(&mut exemplars);
        // A backfill may have grown these maps far beyond what live traffic keeps: give the
        // memory back.
        if self.exemplars.capacity() > 4 * self.exemplars.len() + 4096 {
            self.exemplars.shrink_to_fit();
        }
        if self.known.capacity() > 4 * self.known.len() + 4096 {
            self.known.shrink_to_fit();
        }
        Handover { windows, series: acc.series, active_series: self.known.len(), exemplars }
    }

    /// Moves the exemplars of every window closed by now into `out`.
    fn take_closed_exemplars(&mut self, out: &mut Vec<Exemplar>) {
        let closed = closed_before(self.now);
        let done: Vec<(u64, i64)> = self.exemplars.keys().filter(|(_, w)| *w <= closed).copied().collect();
        for key in done {
            if let Some(set) = self.exemplars.remove(&key) {
                set.into_exemplars(key.0, key.1, out);
            }
        }
    }

    /// Encodes the epoch's open histograms and takes the exemplars of closed windows out of
    /// the open sets, when the epoch holds its share of `ingest.max_open_windows`.
    fn spill(&mut self, acc: &mut Accumulator, traffic: Option<&dyn TrafficSink>) {
        acc.spill(traffic);
        self.take_closed_exemplars(&mut acc.spilled_exemplars);
    }
}

/// Runs shard `id` until its queue closes.
pub async fn run(
    id: u32,
    mut rx: mpsc::Receiver<ShardMsg>,
    layout: Layout,
    limits: SpanLimits,
    open: OpenLimit,
    traffic: Traffic,
) {
    let mut state = ShardState {
        id,
        layout,
        limits,
        known: HashMap::default(),
        now: 0,
        exemplars: HashMap::default(),
        warming: HashMap::new(),
        self_times: Vec::new(),
    };
    // Work of the epoch being filled, and of the next one: a batch admitted just after the
    // coordinator cut an epoch can reach this queue before that epoch's Flush message.
    let mut current = Accumulator::default();
    let mut next = Accumulator::default();
    // The pipeline's first epoch is 1.
    let mut open_epoch = 1u64;
    while let Some(msg) = rx.recv().await {
        let traffic = traffic.get().map(|t| &**t);
        match msg {
            ShardMsg::Work { epoch, batch } => {
                let acc = if epoch <= open_epoch { &mut current } else { &mut next };
                state.apply(acc, &batch, traffic);
                if acc.windows.len() >= open.windows {
                    // Batches already queued behind the flush request keep opening windows:
                    // they are encoded as they go, so the open histograms stay bounded (and
                    // admission waits once the encoded ones reach their bound).
                    state.spill(acc, traffic);
                    if !acc.hurried {
                        acc.hurried = true;
                        open.hurry.notify_one();
                    }
                }
            }
            ShardMsg::Warm { partition, batch, floor } => state.warm(partition, &batch, floor),
            ShardMsg::Warmed { partition, keep } => state.warmed(partition, keep),
            ShardMsg::Forget { series } => state.exemplars.retain(|(s, _), _| !series.contains(s)),
            ShardMsg::Flush { epoch, now, reply } => {
                let done = std::mem::replace(&mut current, std::mem::take(&mut next));
                open_epoch = epoch + 1;
                // The coordinator may have given up (shutdown); the deltas then die with it,
                // unacknowledged, and their clients resend them.
                let _ = reply.send(state.hand_over(done, now, traffic));
            }
        }
        open.held.store(current.held() + next.held(), Ordering::Relaxed);
    }
}
