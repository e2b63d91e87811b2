//! The sharded pipeline between ingest and the store.
//!
//! * **Admission** ([`Pipeline::admit`]): a validated batch is checked against its client's
//!   accepted watermark (a resent batch is a duplicate), then handed to every shard that owns
//!   one of its groups, all or nothing: queue slots are reserved on every target shard before
//!   anything is sent, and a full queue refuses the whole batch.
//! * **Shards** ([`shard`]): one task per shard owns the open windows of its series (an HDR
//!   histogram per series and 10-second window) and records spans into them. No locks.
//! * **Flush epochs** ([`Pipeline::run_flusher`]): every `flush_interval` the coordinator cuts
//!   an epoch, collects every shard's deltas, and writes them with the clients' watermarks in
//!   one synced RocksDB write batch. Only then does it publish the new durable watermarks, which
//!   the ingest streams turn into acknowledgements.
//!
//! Admission and the epoch cut are serialized by the *gate*: admission holds it shared while it
//! tags a batch with the current epoch and enqueues it; the cut holds it exclusively while it
//! advances the epoch and snapshots the accepted watermarks. So a batch belongs wholly to one
//! epoch, and an epoch's watermarks cover exactly the batches whose spans it writes.

mod exemplar_set;
pub mod shard;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_proto::v1::SpanBatch;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::IngestConfig;
use crate::store::{EpochSink, EpochWrite, LogPosition, Store, Watermark};
use crate::telemetry::{Metrics, Outcome, ShardLabel};
use crate::traffic::TrafficSink;

use shard::{Handover, ShardMsg};

use crate::series::{Kind, SpanLimits, Status};

/// Where one group of a batch goes.
#[derive(Debug, Clone, Copy)]
pub struct GroupRoute {
    /// The series key (hash of service and operation as counted).
    pub key: u64,
    /// The shard owning the group's series.
    pub shard: u32,
    /// The id of the group's `status="ok"` series (`0` when none of its spans is ok: the shard
    /// reads it for ok spans only).
    pub ok_series: u64,
    /// The id of the group's `status="error"` series (`0` when none of its spans failed).
    pub error_series: u64,
    /// The group's `span_kind`.
    pub kind: crate::series::Kind,
    /// The ids of the group's `status="ok"` and `status="error"` self-time series, when its
    /// spans are the service's own work and some of them carry a self time (each `0` when no
    /// span of that status does).
    pub self_series: Option<(u64, u64)>,
    /// Whether the group's operation is counted as `__overflow__` (its service is at its cap).
    pub overflow: bool,
    /// Whether the group's service is counted as `__overflow__` (the service cap is reached).
    pub service_overflow: bool,
    /// Whether the group's peer is counted as `__overflow__` (its service's peer cap is reached).
    pub peer_overflow: bool,
}

impl GroupRoute {
    /// The id of the group's series of `status`.
    #[inline]
    pub fn series(&self, status: Status) -> u64 {
        match status {
            Status::Ok => self.ok_series,
            Status::Error => self.error_series,
        }
    }

    /// The route of a group of series `{service, operation, span_kind, peer}` named as counted
    /// (a name over its cap already `__overflow__`), whose [`crate::series::group_hash`] is
    /// `key`, among `shards` shards, for its `spans`: only the series ids some span will be
    /// counted in are computed (at 10,000 series per batch, most groups hold one span of one
    /// status, and hashing both ids took 8 % of ingest).
    /// The overflow flags are left false for the caller.
    pub fn counted(
        key: u64,
        service: &str,
        operation: &str,
        kind: Kind,
        peer: &str,
        spans: &[tailscope_proto::v1::Span],
        shards: usize,
    ) -> Self {
        debug_assert_eq!(key, crate::series::group_hash(service, operation));
        // Per status: some span has it, some span of it carries a self time.
        let (mut has, mut timed) = ([false; 2], [false; 2]);
        for span in spans {
            let status = Status::from_wire(span.status) as usize;
            has[status] = true;
            timed[status] |= span.self_nanos > 0;
        }
        let id = |status: Status| match has[status as usize] {
            true => crate::series::series_id(service, operation, status, kind, peer),
            false => 0,
        };
        let self_id = |status: Status| match timed[status as usize] {
            true => crate::series::self_series_id(service, operation, status, kind),
            false => 0,
        };
        GroupRoute {
            key,
            shard: crate::series::partition(key, shards) as u32,
            ok_series: id(Status::Ok),
            error_series: id(Status::Error),
            kind,
            self_series: ((timed[0] || timed[1]) && !kind.is_outgoing())
                .then(|| (self_id(Status::Ok), self_id(Status::Error))),
            overflow: false,
            service_overflow: false,
            peer_overflow: false,
        }
    }
}

/// A validated histogram delta, ready to merge.
#[derive(Debug)]
pub struct RoutedDelta {
    /// The series key (hash of service and operation as counted).
    pub key: u64,
    /// The shard owning the series.
    pub shard: u32,
    /// The series id.
    pub series: u64,
    /// The series' labels, for the index.
    pub labels: crate::series::SeriesLabels,
    /// Start of its 10-second window, in seconds.
    pub window_start: i64,
    /// The decoded histogram: durations, or, for a self-time series, the self times of spans
    /// another delta of the batch counts.
    pub histogram: Histogram,
}

/// A batch that passed validation, with its routing computed.
#[derive(Debug)]
pub struct ValidatedBatch {
    /// The sending client.
    pub client_id: u64,
    /// The batch's sequence number.
    pub seq: u64,
    /// The time its spans were classified at, in nanoseconds; shards use the same instant.
    pub now: i64,
    /// The batch as received.
    pub batch: SpanBatch,
    /// One route per group of `batch.groups`.
    pub groups: Vec<GroupRoute>,
    /// Its accepted histogram deltas.
    pub deltas: Vec<RoutedDelta>,
    /// The distinct shards it touches, ascending.
    pub targets: Vec<u32>,
    /// The credential it was sent with (a digest of the token; 0: none).
    pub owner: u64,
}

/// What became of a batch offered to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Enqueued; it is acknowledged once its epoch is written.
    Accepted,
    /// Already accepted before (a resend); acknowledged when durable, not counted again.
    Duplicate,
    /// Shard queues stayed full; the client should resend later.
    Overloaded,
    /// The store failed to write recently; the client should resend later.
    StoreUnavailable,
    /// The server is shutting down.
    Draining,
    /// Its seq is more than `limit` (`ingest.max_seq_gap`) past the client's accepted
    /// `watermark`: no client skips that many batches, so it is refused, and the client's count
    /// is safe from a batch that would make its next ones look like resends.
    SeqGap {
        /// The client's accepted watermark.
        watermark: u64,
        /// `ingest.max_seq_gap`.
        limit: u64,
    },
    /// The client id belongs to another credential: the one that first used it.
    NotOwner,
}

impl Admission {
    /// The refusal of a batch numbered `seq` from a client standing at `watermark`, when it
    /// is more than `limit` (`ingest.max_seq_gap`) past it.
    pub fn past_gap(seq: u64, watermark: u64, limit: u64) -> Option<Admission> {
        (seq.saturating_sub(watermark) > limit).then_some(Admission::SeqGap { watermark, limit })
    }
}

#[derive(Debug, Default)]
struct ClientMarks {
    accepted: u64,
    durable: u64,
    /// The credential the client id belongs to (0: none yet).
    owner: u64,
    /// When it last sent a batch (seconds).
    last_seen: i64,
    /// Whether `owner` or `last_seen` changed since the last write.
    changed: bool,
}

impl ClientMarks {
    /// A client's marks as the store keeps them (`now`: seconds). A row written before
    /// last-seen times were kept counts as seen now, and is written again with it.
    fn stored(mark: crate::store::Watermark, now: i64) -> ClientMarks {
        let last_seen = if mark.last_seen == 0 { now } else { mark.last_seen };
        ClientMarks {
            accepted: mark.seq,
            durable: mark.seq,
            owner: mark.owner,
            last_seen,
            changed: mark.last_seen == 0,
        }
    }
}

#[derive(Debug, Default)]
struct Gate {
    epoch: u64,
    draining: bool,
}

/// What ingest streams watch: the last written epoch, and whether the pipeline has closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurableState {
    /// The number of the last epoch written (epochs start at 1; 0: none yet).
    pub epoch: u64,
    /// No more batches will be accepted or acknowledged.
    pub closed: bool,
}

/// The seam between ingest and what admits its batches: today the epoch [`Pipeline`]; a
/// log-backed cluster gateway implements the same (append per partition, durable at the
/// log's offset). Ingest adapters see only this.
pub trait Admit: Send + Sync + std::fmt::Debug {
    /// Offers a validated batch, all or nothing, and names the epoch an accepted batch is
    /// durable with (once [`DurableState::epoch`] reaches it). When a queue it needs is full,
    /// nothing is enqueued and the batch is handed back (`Err`), so the caller can wait and
    /// offer it again.
    fn admit(&self, batch: Arc<ValidatedBatch>) -> Result<(Admission, u64), Arc<ValidatedBatch>>;
    /// Subscribes to durable-epoch progress.
    fn subscribe(&self) -> watch::Receiver<DurableState>;
    /// Asks for the current epoch to be written soon: a caller is waiting for it (group
    /// commit). Every caller that asks within the group-commit delay shares one synced write.
    fn hurry(&self);
    /// The highest durable seq of `client`.
    fn durable_seq(&self, client: u64) -> u64;
    /// Whether `seq` was already accepted from `client` (a cheap check before validation).
    fn is_duplicate(&self, client: u64, seq: u64) -> bool;
    /// Whether every accepted batch of `client` is durable.
    fn is_settled(&self, client: u64) -> bool;
    /// The fullest queue's fill level, 0..=1.
    fn pressure(&self) -> f64;
    /// The number of partitions (shards) batches are routed to.
    fn shard_count(&self) -> usize;
    /// The histogram layout.
    fn layout(&self) -> Layout;
    /// The span limits.
    fn limits(&self) -> SpanLimits;
    /// Why acknowledgements are held up right now, when they are (a cluster's log electing a
    /// leader, or full): open streams then tell their clients so within a second, as a
    /// throttle, so a client waiting for an acknowledgement hears from the server and keeps
    /// its stream; a refused batch's error says it too.
    fn stalled(&self) -> Option<String> {
        None
    }
}

impl Admit for Pipeline {
    /// The number of shards.
    fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The histogram layout.
    fn layout(&self) -> Layout {
        self.layout
    }

    /// The span limits.
    fn limits(&self) -> SpanLimits {
        self.limits
    }

    /// Subscribes to durable-epoch progress.
    fn subscribe(&self) -> watch::Receiver<DurableState> {
        self.durable.subscribe()
    }

    /// Asks for the current epoch to be written soon: a caller is waiting for it (group commit).
    /// Every caller that asks within the group-commit delay shares one synced write.
    fn hurry(&self) {
        self.hurry.notify_one();
    }

    /// The highest durable seq of `client`.
    fn durable_seq(&self, client: u64) -> u64 {
        self.clients.get(&client).map_or(0, |m| m.lock().durable)
    }

    /// Whether `seq` was already accepted from `client` (a cheap check before validation).
    fn is_duplicate(&self, client: u64, seq: u64) -> bool {
        self.clients.get(&client).is_some_and(|m| seq <= m.lock().accepted)
    }

    /// Whether every accepted batch of `client` is durable.
    fn is_settled(&self, client: u64) -> bool {
        self.clients.get(&client).is_none_or(|m| {
            let m = m.lock();
            m.durable >= m.accepted
        })
    }

    /// The fullest shard queue's fill level, 0..=1.
    fn pressure(&self) -> f64 {
        self.shards
            .iter()
            .map(|tx| 1.0 - tx.capacity() as f64 / self.queue_capacity as f64)
            .fold(0.0, f64::max)
    }

    /// A batch of client 0 is anonymous (OTLP exports carry no client identity): it is never a
    /// duplicate and leaves no watermark.
    fn admit(&self, batch: Arc<ValidatedBatch>) -> Result<(Admission, u64), Arc<ValidatedBatch>> {
        self.admit_at(batch, None)
    }
}

impl Pipeline {
    /// Cluster mode: offers a record of partition `partition`'s log, as [`Admit::admit`] does a
    /// client's batch, and moves the partition's position to `after` (the record's own
    /// position, counted) in the same step, so the epoch that writes the record writes the
    /// position too. Its client id is already the (client, partition) one. A record the log
    /// holds was checked by its gateway, so no seq gap or owner is refused; a duplicate
    /// (a client's resend through another gateway) moves the position and nothing else.
    pub fn admit_logged(
        &self,
        batch: Arc<ValidatedBatch>,
        partition: u32,
        after: LogPosition,
    ) -> Result<Admission, Arc<ValidatedBatch>> {
        self.admit_at(batch, Some((partition, after))).map(|(admission, _)| admission)
    }

    /// Cluster mode: moves partition `partition`'s position past records that admit nothing
    /// (a message that does not decode is skipped, named in the log).
    pub fn skip_logged(&self, partition: u32, after: LogPosition) {
        let _gate = self.gate.read();
        self.note_position(partition, after);
        // A strong read waits for whole messages, which only this reaches.
        self.applied.notify_waiters();
    }

    /// Cluster mode: every record of message `seq` of partition `partition`'s log was offered
    /// and taken, so the position moves past the whole message (what a strong read compares
    /// with the stream's last sequence).
    pub fn finish_logged(&self, partition: u32, seq: u64) {
        self.skip_logged(partition, LogPosition { seq, records: u32::MAX });
    }

    /// Cluster mode: the log records a store had stored up to where it resumes reading
    /// `partition` are read again to rebuild the exemplar sets of the windows still open
    /// there (they live in the shards' memory until a window closes, so a restart or a copy
    /// starts without them, and the replica would keep other exemplars than its peers).
    /// Given the log time `at` (seconds) of the last stored message, returns from what log
    /// time to read again and the first window to rebuild: every window still open then, each
    /// with every span it was offered — while the clocks of gateways and NATS servers agree
    /// within `slack` seconds and no span is stamped more than twice that ahead of its
    /// gateway's clock (`ingest.max_future_skew` allows more, but reading that much log again
    /// at every restart would cost far more than the rare span it would catch).
    pub fn warm_range(&self, at: i64, slack: i64) -> (i64, i64) {
        let floor = shard::closed_before(at) - slack;
        (floor - slack, floor)
    }

    /// Cluster mode: offers `batch`, a record of `partition`'s log the store already holds, to
    /// the exemplar sets being rebuilt for windows from `floor` on ([`ShardMsg::Warm`]).
    pub async fn warm(&self, partition: u32, batch: Arc<ValidatedBatch>, floor: i64) -> Result<(), String> {
        for &s in &batch.targets {
            let warm = ShardMsg::Warm { partition, batch: Arc::clone(&batch), floor };
            self.shards[s as usize].send(warm).await.map_err(|_| "the pipeline closed".to_owned())?;
        }
        Ok(())
    }

    /// Cluster mode: ends the rebuilding of `partition`'s exemplar sets ([`ShardMsg::Warmed`]).
    pub async fn warmed(&self, partition: u32, keep: bool) {
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Warmed { partition, keep }).await;
        }
    }

    /// Cluster mode: drops every exemplar set of `series` (a partition about to be read
    /// again from another position, whose sets are rebuilt then).
    pub async fn forget_exemplars(&self, series: HashSet<u64>) {
        let series = Arc::new(series);
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Forget { series: Arc::clone(&series) }).await;
        }
    }

    /// How far partition `partition`'s log was applied (durable or not).
    pub fn log_position(&self, partition: u32) -> LogPosition {
        self.log.lock().get(&partition).map(|p| p.0).unwrap_or_default()
    }

    /// How far partition `partition`'s log was written: what queries read includes it.
    pub fn written_log_position(&self, partition: u32) -> LogPosition {
        self.written.lock().get(&partition).copied().unwrap_or_default()
    }

    /// Cluster mode: waits until every `(partition, position)` of `targets` is written (a
    /// strong read), asking for an early epoch once all of them are applied, for at most
    /// `timeout`. On time-out, names each partition still behind: its target and where it was
    /// written to.
    pub async fn wait_written(
        &self,
        targets: &[(u32, LogPosition)],
        timeout: std::time::Duration,
    ) -> Result<(), Vec<(u32, LogPosition, LogPosition)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut durable = self.durable.subscribe();
        let mut hurried = false;
        loop {
            // Registered before looking, so a message finished meanwhile still wakes us.
            let applied = self.applied.notified();
            tokio::pin!(applied);
            applied.as_mut().enable();
            let behind: Vec<(u32, LogPosition, LogPosition)> = {
                let written = self.written.lock();
                targets
                    .iter()
                    .filter_map(|&(p, target)| {
                        let at = written.get(&p).copied().unwrap_or_default();
                        (at < target).then_some((p, target, at))
                    })
                    .collect()
            };
            if behind.is_empty() {
                return Ok(());
            }
            if !hurried && behind.iter().all(|&(p, target, _)| self.log_position(p) >= target) {
                // All applied: the next epoch makes them visible; don't wait for its tick.
                self.hurry.notify_one();
                hurried = true;
            }
            tokio::select! {
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(behind);
                    }
                    // A new epoch: if it missed some, the next one is asked for again.
                    hurried = false;
                }
                _ = applied => {}
                _ = tokio::time::sleep_until(deadline) => return Err(behind),
            }
        }
    }

    /// Cluster mode: forgets partition `partition` before a copy of it lands — its position
    /// and its clients (`clients`: their keys) — once everything applied of it is written
    /// (its reader has stopped, so nothing more is). Errs when the store did not write it
    /// within `timeout`.
    pub async fn release(
        &self,
        partition: u32,
        clients: &std::ops::Range<u64>,
        timeout: std::time::Duration,
    ) -> Result<(), String> {
        let applied = self.log_position(partition);
        if let Err(behind) = self.wait_written(&[(partition, applied)], timeout).await {
            return Err(format!("partition {partition} not written within {timeout:?}: {behind:?}"));
        }
        self.clients.retain(|key, _| !clients.contains(key));
        self.log.lock().remove(&partition);
        self.written.lock().remove(&partition);
        Ok(())
    }

    /// Cluster mode: takes on a copy of partition `partition` that landed in the store: its
    /// position and its clients' watermarks, as a restart would read them.
    pub fn adopt(&self, partition: u32, position: LogPosition, marks: Vec<(u64, crate::store::Watermark)>) {
        let now = self.clock.now_seconds();
        for (client, mark) in marks {
            self.clients.insert(client, Arc::new(Mutex::new(ClientMarks::stored(mark, now))));
        }
        self.log.lock().insert(partition, (position, false));
        self.written.lock().insert(partition, position);
        self.applied.notify_waiters();
    }

    fn note_position(&self, partition: u32, after: LogPosition) {
        let mut log = self.log.lock();
        let at = log.entry(partition).or_default();
        if after > at.0 {
            *at = (after, true);
        }
    }

    fn admit_at(
        &self,
        batch: Arc<ValidatedBatch>,
        logged: Option<(u32, LogPosition)>,
    ) -> Result<(Admission, u64), Arc<ValidatedBatch>> {
        let gate = self.gate.read();
        if gate.draining {
            return Ok((Admission::Draining, gate.epoch));
        }
        if !self.store_healthy.load(Ordering::Relaxed) {
            return Ok((Admission::StoreUnavailable, gate.epoch));
        }
        let client = match batch.client_id {
            0 => None,
            id => match self.clients.get(&id).map(|c| c.clone()) {
                Some(c) => Some(c),
                // A new client numbers from 1; no entry is made for one refused.
                None => match Admission::past_gap(batch.seq, 0, self.max_seq_gap) {
                    Some(gap) if logged.is_none() => return Ok((gap, gate.epoch)),
                    _ => Some(self.clients.entry(id).or_default().clone()),
                },
            },
        };
        let mut marks = client.as_ref().map(|c| c.lock());
        if let Some(m) = &marks {
            if m.owner != 0 && batch.owner != m.owner && logged.is_none() {
                return Ok((Admission::NotOwner, gate.epoch));
            }
            if batch.seq <= m.accepted {
                if let Some((partition, after)) = logged {
                    self.note_position(partition, after);
                }
                return Ok((Admission::Duplicate, gate.epoch));
            }
            if let Some(gap) = Admission::past_gap(batch.seq, m.accepted, self.max_seq_gap) {
                if logged.is_none() {
                    return Ok((gap, gate.epoch));
                }
            }
        }
        // An epoch is written whole, in one batch: while the last one is being written the
        // shards keep filling the next, and at a million active series that grew epochs of
        // several hundred thousand windows — a write batch of ~1 GB and memtables past their
        // budget. Past its bound a shard takes nothing more until its epoch is handed over.
        if batch.targets.iter().any(|&s| self.held[s as usize].load(Ordering::Relaxed) >= self.epoch_windows)
        {
            self.hurry.notify_one();
            return Err(batch);
        }
        let mut permits = Vec::with_capacity(batch.targets.len());
        for &s in &batch.targets {
            match self.shards[s as usize].try_reserve() {
                Ok(p) => permits.push(p),
                Err(_) => {
                    drop(permits);
                    drop(marks);
                    return Err(batch);
                }
            }
        }
        if let Some(m) = marks.as_mut() {
            m.accepted = batch.seq;
            if m.owner == 0 && batch.owner != 0 {
                m.owner = batch.owner;
                m.changed = true;
            }
            // Kept to the minute: the mark is rewritten once a minute at most for this alone.
            let seen = batch.now.div_euclid(1_000_000_000);
            if seen >= m.last_seen + 60 {
                m.last_seen = seen;
                m.changed = true;
            }
        }
        for p in permits {
            p.send(ShardMsg::Work { epoch: gate.epoch, batch: Arc::clone(&batch) });
        }
        if let Some((partition, after)) = logged {
            self.note_position(partition, after);
        }
        Ok((Admission::Accepted, gate.epoch))
    }
}

/// How many shares of `ingest.max_open_windows` an epoch may hold, open or encoded, before
/// admission waits for it to be handed over to the writer.
const EPOCH_SHARES: usize = 2;

/// The pipeline: shard queues, client watermarks and the flush coordinator's state.
#[derive(Debug)]
pub struct Pipeline {
    shards: Vec<mpsc::Sender<ShardMsg>>,
    queue_capacity: usize,
    /// Per shard, the windows it holds for epochs not yet handed over (open and encoded).
    held: Vec<Arc<std::sync::atomic::AtomicUsize>>,
    /// How many of them a shard may hold before admission waits: [`EPOCH_SHARES`] of its
    /// share of `ingest.max_open_windows`.
    epoch_windows: usize,
    gate: RwLock<Gate>,
    clients: DashMap<u64, Arc<Mutex<ClientMarks>>>,
    durable: watch::Sender<DurableState>,
    store: Store,
    metrics: Arc<Metrics>,
    store_healthy: AtomicBool,
    layout: Layout,
    limits: SpanLimits,
    clock: Arc<dyn Clock>,
    /// Woken when a caller waits for durability (an OTLP export), or a shard holds
    /// `ingest.max_open_windows` of its share: the flusher cuts an epoch after the group-commit
    /// delay instead of at its next tick.
    hurry: Arc<tokio::sync::Notify>,
    group_commit_delay: std::time::Duration,
    /// `ingest.max_seq_gap`.
    max_seq_gap: u64,
    /// Clients idle since before this (seconds) are forgotten with the next epoch (0: none).
    forget_before: std::sync::atomic::AtomicI64,
    /// Told of every durable epoch.
    sinks: RwLock<Vec<Arc<dyn EpochSink>>>,
    /// Cluster mode: how far each partition's log was admitted, and whether that changed since
    /// the last epoch was cut.
    log: Mutex<std::collections::HashMap<u32, (LogPosition, bool)>>,
    /// Cluster mode: how far each partition's log was written (what queries see).
    written: Mutex<std::collections::HashMap<u32, LogPosition>>,
    /// Cluster mode: woken when a log message was applied whole (strong reads wait on it).
    applied: tokio::sync::Notify,
    /// Told of the traffic every shard recorded, per epoch (shared with the shards).
    traffic: Arc<std::sync::OnceLock<Arc<dyn TrafficSink>>>,
}

impl Pipeline {
    /// Tells `sink` of every epoch written from now on.
    pub fn add_sink(&self, sink: Arc<dyn EpochSink>) {
        self.sinks.write().push(sink);
    }

    /// Tells `sink` of the traffic the shards record from now on; once (a later call is
    /// ignored and answers false).
    pub fn feed_traffic(&self, sink: Arc<dyn TrafficSink>) -> bool {
        self.traffic.set(sink).is_ok()
    }

    /// Starts the shard tasks and returns the pipeline with their join handles. Durable
    /// watermarks are loaded from the store so resends after a restart are recognised.
    pub fn start(
        config: &IngestConfig,
        store: Store,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Pipeline>, Vec<JoinHandle<()>>), crate::store::StoreError> {
        let n = config.shard_count();
        let layout = store.layout();
        let limits =
            SpanLimits::new(config.allowed_lateness, config.max_future_skew, config.max_span_duration);
        let mut shards = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        let hurry = Arc::new(tokio::sync::Notify::new());
        let share = (config.max_open_windows / n).max(1);
        let mut held = Vec::with_capacity(n);
        let traffic = Arc::new(std::sync::OnceLock::new());
        for id in 0..n {
            let (tx, rx) = mpsc::channel(config.queue_capacity);
            shards.push(tx);
            let open = shard::OpenLimit { windows: share, hurry: hurry.clone(), held: Arc::default() };
            held.push(Arc::clone(&open.held));
            let traffic = Arc::clone(&traffic);
            handles.push(tokio::spawn(shard::run(id as u32, rx, layout, limits, open, traffic)));
        }
        let clients = DashMap::new();
        let now = clock.now_seconds();
        for (client, mark) in store.watermarks()? {
            clients.insert(client, Arc::new(Mutex::new(ClientMarks::stored(mark, now))));
        }
        let positions = store.log_positions()?;
        let written = positions.iter().copied().collect();
        let log = positions.into_iter().map(|(p, at)| (p, (at, false))).collect();
        let pipeline = Pipeline {
            shards,
            queue_capacity: config.queue_capacity,
            held,
            epoch_windows: share.saturating_mul(EPOCH_SHARES),
            // Epochs start at 1, so a durable epoch of 0 means that nothing was written yet.
            gate: RwLock::new(Gate { epoch: 1, draining: false }),
            clients,
            durable: watch::Sender::new(DurableState::default()),
            store,
            metrics,
            store_healthy: AtomicBool::new(true),
            layout,
            limits,
            clock,
            hurry,
            group_commit_delay: config.group_commit_delay,
            max_seq_gap: config.max_seq_gap,
            forget_before: std::sync::atomic::AtomicI64::new(0),
            sinks: RwLock::new(Vec::new()),
            log: Mutex::new(log),
            written: Mutex::new(written),
            applied: tokio::sync::Notify::new(),
            traffic,
        };
        Ok((Arc::new(pipeline), handles))
    }

    /// Asks the next epoch to forget the clients that sent nothing since `before` (seconds)
    /// and have nothing unwritten: out of memory and, in the same write as the epoch, out of
    /// the store. Their ids are free again (a client seen after that starts over from seq 1).
    pub fn forget_idle_clients(&self, before: i64) {
        self.forget_before.store(before, Ordering::Relaxed);
    }

    /// Whether new batches are accepted and the store writes.
    pub fn is_ready(&self) -> bool {
        self.store_healthy.load(Ordering::Relaxed) && !self.gate.read().draining
    }

    /// Runs flush epochs every `interval` until `stop` turns true, then drains: refuses new
    /// batches, writes a final epoch (retrying until `deadline`) and closes.
    pub async fn run_flusher(
        self: Arc<Self>,
        interval: std::time::Duration,
        mut stop: watch::Receiver<bool>,
        shutdown_timeout: std::time::Duration,
    ) {
        // The first regular epoch one interval after start (an interval's first tick is
        // immediate: an epoch cut then could take a batch that arrived at once, so a test of
        // early epochs would see it acknowledged without one).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = EpochWrite::default();
        let mut last_cut = Instant::now();
        loop {
            let hurried = tokio::select! {
                _ = tick.tick() => false,
                _ = self.hurry.notified() => true,
                _ = stop.wait_for(|&s| s) => break,
            };
            if hurried {
                // Group commit: let the exports arriving meanwhile join this epoch.
                tokio::select! {
                    _ = tokio::time::sleep(self.group_commit_delay) => {}
                    _ = stop.wait_for(|&s| s) => break,
                }
                self.metrics.early_epochs.inc();
                // The next regular epoch is a full interval after this one.
                tick.reset();
            }
            self.flush_epoch(&mut pending, &mut last_cut).await;
        }
        self.gate.write().draining = true;
        let deadline = Instant::now() + shutdown_timeout;
        loop {
            self.flush_epoch(&mut pending, &mut last_cut).await;
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if !pending.is_empty() {
            tracing::error!(
                windows = pending.windows.len(),
                "shutting down with an unwritten epoch; its batches were never acknowledged and will be resent"
            );
        }
        self.durable.send_modify(|s| s.closed = true);
    }

    /// Cuts, collects and writes one epoch. A failed write is kept in `pending` and retried
    /// with the next epoch; nothing it holds is acknowledged until it is written.
    /// `last_cut` is when the epoch before was cut: this one's batches were admitted since.
    async fn flush_epoch(&self, pending: &mut EpochWrite, last_cut: &mut Instant) {
        let started = Instant::now();
        let (epoch, watermarks, forgotten, log_positions, admitted_over) = {
            let mut gate = self.gate.write();
            let epoch = gate.epoch;
            gate.epoch += 1;
            let admitted_over = std::mem::replace(last_cut, Instant::now()).elapsed();
            // Under the gate no batch is admitted: a client forgotten here cannot be mid-batch.
            let before = self.forget_before.swap(0, Ordering::Relaxed);
            let mut forgotten = Vec::new();
            if before > 0 {
                self.clients.retain(|id, m| {
                    let m = m.lock();
                    let idle = m.last_seen < before && m.accepted == m.durable && !m.changed;
                    if idle {
                        forgotten.push(*id);
                    }
                    !idle
                });
            }
            let marks: Vec<(u64, Watermark)> = self
                .clients
                .iter()
                .filter_map(|e| {
                    let mut m = e.value().lock();
                    let due = m.accepted > m.durable || m.changed;
                    m.changed = false;
                    due.then_some((
                        *e.key(),
                        Watermark { seq: m.accepted, owner: m.owner, last_seen: m.last_seen },
                    ))
                })
                .collect();
            let positions: Vec<(u32, LogPosition)> = self
                .log
                .lock()
                .iter_mut()
                .filter_map(|(p, (at, changed))| std::mem::take(changed).then_some((*p, *at)))
                .collect();
            (epoch, marks, forgotten, positions, admitted_over)
        };
        if !forgotten.is_empty() {
            tracing::info!(clients = forgotten.len(), "forgetting the watermarks of idle clients");
            self.metrics.clients_forgotten.inc_by(forgotten.len() as u64);
        }
        let mut replies = Vec::with_capacity(self.shards.len());
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            if tx.send(ShardMsg::Flush { epoch, now: self.clock.now_seconds(), reply }).await.is_ok() {
                replies.push(rx);
            }
        }
        let mut write =
            EpochWrite { watermarks, forgotten_clients: forgotten, log_positions, ..EpochWrite::default() };
        let mut active = 0;
        for rx in replies {
            if let Ok(Handover { windows, series, active_series, exemplars }) = rx.await {
                write.windows.extend(windows);
                write.series.extend(series);
                write.exemplars.extend(exemplars);
                active += active_series;
            }
        }
        self.metrics.active_series.set(active as i64);
        if let Some(traffic) = self.traffic.get() {
            traffic.covered(admitted_over.as_secs_f64());
        }
        pending.absorb(write);
        if pending.is_empty() {
            self.durable.send_modify(|s| s.epoch = epoch);
            return;
        }
        let batch = std::mem::take(pending);
        let store = self.store.clone();
        let sinks = self.sinks.read().clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = store.write_epoch(&batch);
            if r.is_ok() {
                for sink in &sinks {
                    sink.written(&batch);
                }
            }
            (batch, r)
        })
        .await;
        match result {
            Ok((batch, Ok((bytes, operands)))) => {
                if !batch.log_positions.is_empty() {
                    let mut written = self.written.lock();
                    for &(p, at) in &batch.log_positions {
                        let w = written.entry(p).or_default();
                        *w = (*w).max(at);
                    }
                }
                for &(client, mark) in &batch.watermarks {
                    if let Some(m) = self.clients.get(&client) {
                        let mut m = m.lock();
                        m.durable = m.durable.max(mark.seq);
                    }
                }
                self.store_healthy.store(true, Ordering::Relaxed);
                self.metrics.flushes.get_or_create(&Outcome { result: "ok" }).inc();
                self.metrics.flush_bytes.observe(bytes as f64);
                self.metrics.flush_operands.inc_by(operands as u64);
                self.metrics.flush_duration.observe(started.elapsed().as_secs_f64());
                self.durable.send_modify(|s| s.epoch = epoch);
            }
            Ok((batch, Err(e))) => {
                tracing::error!(error = %e, epoch, "flush failed; keeping the epoch to retry, acknowledgements held back");
                self.metrics.flushes.get_or_create(&Outcome { result: "error" }).inc();
                self.store_healthy.store(false, Ordering::Relaxed);
                *pending = batch;
            }
            Err(e) => {
                tracing::error!(error = %e, epoch, "flush task failed; its batches will be resent by their clients");
                self.metrics.flushes.get_or_create(&Outcome { result: "error" }).inc();
            }
        }
    }

    /// Updates the queue-depth gauges (called before metrics are encoded).
    pub fn refresh_metrics(&self) {
        for (i, tx) in self.shards.iter().enumerate() {
            let depth = tx.max_capacity() - tx.capacity();
            self.metrics.shard_queue_depth.get_or_create(&ShardLabel { shard: i as u32 }).set(depth as i64);
        }
    }
}

#[cfg(test)]
mod tests;
