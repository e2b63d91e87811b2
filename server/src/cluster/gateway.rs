//! The gateway: admits validated batches into the log instead of a local pipeline.
//!
//! Each admitted batch gets a *ticket* (the gateway's epoch: ingest waits for
//! [`DurableState::epoch`] to reach it) and is cut into per-partition records. A publisher
//! task per partition coalesces what queued while its previous message was in flight into one
//! [`PartitionBatch`](tailscope_proto::v1::PartitionBatch) and publishes it with `Nats-Msg-Id: <gateway>-<partition>-<n>`, retrying
//! the same id until JetStream acknowledges it (a NATS leader election takes seconds; a retry
//! of a message that did land is answered as a duplicate and not stored twice). A ticket is
//! durable once every part of it is acknowledged; the durable epoch is the highest ticket
//! below which every ticket is.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use dashmap::DashMap;
use parking_lot::Mutex;
use tailscope_proto::histogram::Layout;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::ClusterConfig;
use crate::pipeline::{Admission, Admit, DurableState, Pipeline, ValidatedBatch};
use crate::series::SpanLimits;
use crate::telemetry::Metrics;

/// How long a client's marks outlive its last batch.
const CLIENT_IDLE: Duration = Duration::from_secs(600);
/// How long the oldest unacknowledged batch waits before streams tell their clients.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// A record waiting for its partition's publisher.
#[derive(Debug)]
struct Outgoing {
    ticket: u64,
    /// An encoded [`LogRecord`](tailscope_proto::v1::LogRecord).
    record: Vec<u8>,
}

#[derive(Debug)]
struct Tickets {
    /// The next ticket to hand out (tickets start at 1).
    next: u64,
    /// Tickets with parts not yet acknowledged: how many, and since when.
    open: BTreeMap<u64, (usize, Instant)>,
}

impl Tickets {
    /// The highest ticket at or below which every ticket is acknowledged.
    fn durable(&self) -> u64 {
        self.open.keys().next().map_or(self.next - 1, |first| first - 1)
    }
}

#[derive(Debug)]
struct ClientMarks {
    accepted: u64,
    durable: u64,
    /// Accepted seqs and their tickets, oldest first, until durable.
    waiting: VecDeque<(u64, u64)>,
    /// When it last sent a batch.
    last_admitted: Instant,
}

impl Default for ClientMarks {
    fn default() -> Self {
        ClientMarks { accepted: 0, durable: 0, waiting: VecDeque::new(), last_admitted: Instant::now() }
    }
}

/// The [`Admit`] of a cluster node: batches go to the log; the local [`Pipeline`] is fed by
/// the consumers (its layout and limits are the node's, shared by every node).
#[derive(Debug)]
pub struct LogGateway {
    outboxes: Vec<mpsc::Sender<Outgoing>>,
    queue_capacity: usize,
    layout: Layout,
    limits: SpanLimits,
    tickets: Mutex<Tickets>,
    durable: watch::Sender<DurableState>,
    clients: DashMap<u64, Arc<Mutex<ClientMarks>>>,
    /// Per partition, what its failing publishes last answered (None once one succeeds).
    failing: Vec<Mutex<Option<String>>>,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// `ingest.max_seq_gap`.
    max_seq_gap: u64,
    /// A store node's pipeline, whose per-(client, partition) watermarks tell where a client
    /// new to this gateway stands (none on a gateway-only node).
    watermarks: Option<(Arc<Pipeline>, Arc<super::assign::Replicas>)>,
}

impl LogGateway {
    /// Starts the gateway and one publisher per partition. On `stop` it refuses new batches,
    /// publishes what it accepted (for at most `shutdown_timeout`) and closes.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &ClusterConfig,
        limits: super::GatewayLimits,
        js: async_nats::jetstream::Context,
        pipeline: Arc<Pipeline>,
        replicas: Arc<super::assign::Replicas>,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
        shutdown_timeout: Duration,
    ) -> (Arc<LogGateway>, Vec<JoinHandle<()>>) {
        let queue_capacity = limits.queue_capacity;
        let mut outboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..config.partitions {
            let (tx, rx) = mpsc::channel(queue_capacity);
            outboxes.push(tx);
            receivers.push(rx);
        }
        let gateway = Arc::new(LogGateway {
            outboxes,
            queue_capacity,
            layout: pipeline.layout(),
            limits: pipeline.limits(),
            tickets: Mutex::new(Tickets { next: 1, open: BTreeMap::new() }),
            durable: watch::Sender::new(DurableState::default()),
            clients: DashMap::new(),
            failing: (0..config.partitions).map(|_| Mutex::new(None)).collect(),
            draining: AtomicBool::new(false),
            metrics,
            max_seq_gap: limits.max_seq_gap,
            watermarks: config.has(super::Role::Store).then(|| (pipeline.clone(), replicas)),
        });
        // A new incarnation each start: a message id of a previous run is never reused.
        let incarnation = format!("{}.{:x}", config.node_id, rand_nonce());
        let mut tasks = Vec::new();
        for (p, rx) in receivers.into_iter().enumerate() {
            let publisher = Publisher {
                gateway: gateway.clone(),
                js: js.clone(),
                subject: config.subject(p as u32),
                partition: p as u32,
                incarnation: incarnation.clone(),
                max_bytes: config.max_message_bytes,
                compression: config.log_compression,
            };
            tasks.push(tokio::spawn(publisher.run(rx)));
        }
        let closing = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let mut prune = tokio::time::interval(CLIENT_IDLE / 10);
            loop {
                tokio::select! {
                    _ = prune.tick() => closing.forget_idle_clients(),
                    _ = stop.wait_for(|&s| s) => break,
                }
            }
            closing.draining.store(true, Ordering::SeqCst);
            let deadline = tokio::time::Instant::now() + shutdown_timeout;
            let mut durable = closing.durable.subscribe();
            let settled = |g: &LogGateway| g.tickets.lock().open.is_empty();
            while !settled(&closing) {
                if tokio::time::timeout_at(deadline, durable.changed()).await.is_err() {
                    tracing::error!("closing with log publishes unacknowledged; their clients resend them");
                    break;
                }
            }
            closing.durable.send_modify(|s| s.closed = true);
        }));
        (gateway, tasks)
    }

    /// Forgets the clients with nothing unacknowledged that sent nothing for [`CLIENT_IDLE`]:
    /// the gateway's marks only spare a resend another trip through the log (the stores'
    /// per-partition watermarks are what keep it from counting twice), so memory stays
    /// bounded by the clients of the last minutes.
    fn forget_idle_clients(&self) {
        let durable = self.durable.borrow().epoch;
        self.clients.retain(|_, m| {
            let m = m.lock();
            let settled = m.waiting.back().is_none_or(|w| w.1 <= durable);
            !(settled && m.last_admitted.elapsed() >= CLIENT_IDLE)
        });
    }

    /// Where this node's store has client `client`: the highest of its per-partition
    /// watermarks (none without the store role, or unless it holds every partition caught up:
    /// a client's latest batches may have gone only to partitions other stores hold).
    fn stored_watermark(&self, client: u64) -> Option<u64> {
        let (pipeline, replicas) = self.watermarks.as_ref()?;
        let partitions = self.outboxes.len() as u32;
        if !(0..partitions).all(|p| replicas.caught_up(p)) {
            return None;
        }
        Some((0..partitions).map(|p| pipeline.durable_seq(super::client_key(client, p))).max().unwrap_or(0))
    }

    /// Marks one part of each of `tickets` acknowledged and publishes the new durable epoch.
    fn acknowledged(&self, tickets: &[u64]) {
        let durable = {
            let mut t = self.tickets.lock();
            for ticket in tickets {
                if let Some((left, _)) = t.open.get_mut(ticket) {
                    *left -= 1;
                    if *left == 0 {
                        t.open.remove(ticket);
                    }
                }
            }
            t.durable()
        };
        self.durable.send_if_modified(|s| {
            let moved = durable > s.epoch;
            s.epoch = s.epoch.max(durable);
            moved
        });
    }
}

fn rand_nonce() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    xxhash_rust::xxh3::xxh3_64(&[nanos.to_be_bytes().as_slice(), &std::process::id().to_be_bytes()].concat())
}

impl Admit for LogGateway {
    fn admit(&self, batch: Arc<ValidatedBatch>) -> Result<(Admission, u64), Arc<ValidatedBatch>> {
        if self.draining.load(Ordering::SeqCst) {
            return Ok((Admission::Draining, 0));
        }
        let client = (batch.client_id != 0).then(|| self.clients.entry(batch.client_id).or_default().clone());
        let mut marks = client.as_ref().map(|c| c.lock());
        if let Some(m) = &marks {
            if batch.seq <= m.accepted {
                let ticket = m.waiting.back().map_or(0, |w| w.1);
                return Ok((Admission::Duplicate, ticket));
            }
            // As on a single node, a seq far past where the client stands is refused: it would
            // make the stores skip the client's real batches as resends. A client new to this
            // gateway (one that failed over from another) stands where this node's store has
            // it; a gateway-only node cannot know that, so checks from its second batch on.
            let stands =
                if m.accepted > 0 { Some(m.accepted) } else { self.stored_watermark(batch.client_id) };
            if let Some(gap) = stands.and_then(|w| Admission::past_gap(batch.seq, w, self.max_seq_gap)) {
                return Ok((gap, 0));
            }
        }
        let records = super::record::split(&batch);
        let mut permits = Vec::with_capacity(records.len());
        for (p, _) in &records {
            match self.outboxes[*p as usize].try_reserve() {
                Ok(permit) => permits.push(permit),
                Err(_) => {
                    drop(permits);
                    drop(marks);
                    return Err(batch);
                }
            }
        }
        let ticket = {
            let mut t = self.tickets.lock();
            let ticket = t.next;
            t.next += 1;
            if !records.is_empty() {
                t.open.insert(ticket, (records.len(), Instant::now()));
            }
            ticket
        };
        if let Some(m) = marks.as_mut() {
            m.accepted = batch.seq;
            m.waiting.push_back((batch.seq, ticket));
            m.last_admitted = Instant::now();
        }
        drop(marks);
        let empty = records.is_empty();
        for (permit, (_, record)) in permits.into_iter().zip(records) {
            permit.send(Outgoing { ticket, record });
        }
        if empty {
            self.acknowledged(&[]);
        }
        Ok((Admission::Accepted, ticket))
    }

    fn subscribe(&self) -> watch::Receiver<DurableState> {
        self.durable.subscribe()
    }

    /// Publishers send as soon as their previous message is acknowledged: nothing to hurry.
    fn hurry(&self) {}

    fn durable_seq(&self, client: u64) -> u64 {
        let Some(marks) = self.clients.get(&client).map(|c| c.clone()) else { return 0 };
        let durable = self.durable.borrow().epoch;
        let mut m = marks.lock();
        while let Some(&(seq, ticket)) = m.waiting.front() {
            if ticket > durable {
                break;
            }
            m.durable = seq;
            m.waiting.pop_front();
        }
        m.durable
    }

    fn is_duplicate(&self, client: u64, seq: u64) -> bool {
        self.clients.get(&client).is_some_and(|m| seq <= m.lock().accepted)
    }

    fn is_settled(&self, client: u64) -> bool {
        let accepted = self.clients.get(&client).map_or(0, |m| m.lock().accepted);
        self.durable_seq(client) >= accepted
    }

    fn pressure(&self) -> f64 {
        self.outboxes
            .iter()
            .map(|tx| 1.0 - tx.capacity() as f64 / self.queue_capacity as f64)
            .fold(0.0, f64::max)
    }

    fn shard_count(&self) -> usize {
        self.outboxes.len()
    }

    fn stalled(&self) -> Option<String> {
        let since = self.tickets.lock().open.values().next().map(|(_, since)| *since)?;
        let waited = since.elapsed();
        // What NATS answers (a full stream: "maximum bytes exceeded"), else the likely cause.
        let failing = self
            .failing
            .iter()
            .enumerate()
            .find_map(|(p, e)| e.lock().as_ref().map(|e| format!("partition {p}: {e}")));
        if waited < STALLED_AFTER && failing.is_none() {
            return None;
        }
        let why = failing.unwrap_or_else(|| "NATS electing a stream leader?".into());
        Some(format!("the log has not acknowledged a batch for {} ms ({why})", waited.as_millis()))
    }

    fn layout(&self) -> Layout {
        self.layout
    }

    fn limits(&self) -> SpanLimits {
        self.limits
    }
}

/// Publishes one partition's records, one message in flight.
struct Publisher {
    gateway: Arc<LogGateway>,
    js: async_nats::jetstream::Context,
    subject: String,
    partition: u32,
    incarnation: String,
    max_bytes: usize,
    compression: super::config::LogCompression,
}

impl Publisher {
    /// Publishes until the gateway has closed (after its drain: what was accepted is published
    /// or its deadline passed).
    async fn run(self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut seq = 0u64;
        let mut tickets = Vec::new();
        let mut state = self.gateway.durable.subscribe();
        loop {
            let first = tokio::select! {
                biased;
                first = rx.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
                _ = state.wait_for(|s| s.closed) => return,
            };
            tickets.clear();
            let mut bytes = first.record.len();
            tickets.push(first.ticket);
            let mut records = vec![first.record];
            while bytes < self.max_bytes {
                match rx.try_recv() {
                    Ok(next) => {
                        bytes += next.record.len();
                        tickets.push(next.ticket);
                        records.push(next.record);
                    }
                    Err(_) => break,
                }
            }
            seq += 1;
            let message = super::record::message(&self.incarnation, seq, self.partition, &records);
            let packed = match self.compression {
                super::config::LogCompression::Snappy => super::record::compress(&message),
                super::config::LogCompression::None => None,
            };
            let encoded = message.len() as u64;
            let (payload, compressed) = match packed {
                Some(packed) => (bytes::Bytes::from(packed), true),
                None => (bytes::Bytes::from(message), false),
            };
            let id = format!("{}-{}-{seq}", self.incarnation, self.partition);
            if !self.publish(payload, compressed, &id).await {
                // Closed while NATS refused: never acknowledged, so its clients resend it.
                return;
            }
            self.gateway.metrics.log_encoded_bytes.inc_by(encoded);
            self.gateway.acknowledged(&tickets);
        }
    }

    /// Publishes until JetStream acknowledges, always with the same id; false if the gateway
    /// closed first. A `compressed` payload is marked so in [`super::record::ENCODING_HEADER`].
    async fn publish(&self, payload: bytes::Bytes, compressed: bool, id: &str) -> bool {
        let mut backoff = Duration::from_millis(50);
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let attempt = async {
                let publish = PublishMessage::build().payload(payload.clone()).message_id(id);
                let publish = if compressed {
                    publish.header(super::record::ENCODING_HEADER, super::record::SNAPPY)
                } else {
                    publish
                };
                let ack =
                    self.js.send_publish(self.subject.clone(), publish).await.map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            };
            match attempt.await {
                Ok(_ack) => {
                    *self.gateway.failing[self.partition as usize].lock() = None;
                    self.gateway.metrics.log_messages.inc();
                    self.gateway.metrics.log_bytes.inc_by(payload.len() as u64);
                    if let Some(since) = failing_since {
                        tracing::info!(partition = self.partition, after = ?since.elapsed(), "log publishes acknowledged again");
                    }
                    return true;
                }
                Err(e) => {
                    *self.gateway.failing[self.partition as usize].lock() = Some(e.clone());
                    self.gateway.metrics.log_publish_retries.inc();
                    if failing_since.is_none() {
                        failing_since = Some(std::time::Instant::now());
                        tracing::warn!(partition = self.partition, error = %e, "log publish failed; retrying with the same message id");
                    }
                    if self.gateway.durable.borrow().closed {
                        return false;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
    }
}
