//! gRPC ingest: the `tailscope.v1.Ingest/Stream` service. Each stream decodes batches,
//! validates them, offers them to the pipeline and turns durable-epoch progress into
//! acknowledgements.
//!
//! Per-batch problems end the stream with a status naming the batch and what was wrong
//! (`INVALID_ARGUMENT` for malformed input, `RESOURCE_EXHAUSTED` for overload or an oversized
//! batch, `UNAVAILABLE` at shutdown); the client reconnects and resends what is unacknowledged.
//! Processing a stream is sequential, so a refused batch is never followed by an accepted one
//! on the same stream, and a client's accepted watermark always covers a prefix of its batches.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tailscope_proto::histogram::Histogram;
use tailscope_proto::v1::ingest_server::Ingest;
use tailscope_proto::v1::{IngestReply, RejectedSpans, SamplingPolicy, SeriesKey, SpanBatch, Throttle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::clock::Clock;
use crate::config::IngestConfig;
use crate::pipeline::{Admission, GroupRoute, Pipeline, RoutedDelta, SpanReject, ValidatedBatch};
use crate::sampling::Sampler;
use crate::series::{self, SeriesLabels, Status as SpanStatus};
use crate::telemetry::{Form, Metrics, Outcome, Reason};

/// Most series keys whose sampling policies one stream is told.
const MAX_KEYS_PER_STREAM: usize = 10_000;

/// The longest `service` or `operation` label accepted, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

/// The ingest service.
#[derive(Debug, Clone)]
pub struct IngestService {
    pub(crate) pipeline: Arc<Pipeline>,
    pub(crate) metrics: Arc<Metrics>,
    sampler: Arc<Sampler>,
    clock: Arc<dyn Clock>,
    max_spans: usize,
    max_span_weight: u32,
    throttle_high_water: f64,
    cardinality: Arc<crate::cardinality::Cardinality>,
}

impl IngestService {
    /// A service feeding `pipeline`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        config: &IngestConfig,
        sampler: Arc<Sampler>,
        cardinality: Arc<crate::cardinality::Cardinality>,
    ) -> IngestService {
        IngestService {
            pipeline,
            metrics,
            sampler,
            clock,
            max_spans: config.max_spans_per_batch,
            max_span_weight: config.max_span_weight.max(1),
            throttle_high_water: config.throttle_high_water,
            cardinality,
        }
    }
}

/// Counts of one batch, applied to the metrics only once the batch is accepted.
#[derive(Debug, Default)]
pub(crate) struct BatchStats {
    pub(crate) accepted: u64,
    pub(crate) clamped: u64,
    pub(crate) rejected: [u64; SpanReject::ALL.len()],
    /// Refused span records, unweighted (what OTLP's `partial_success` counts).
    pub(crate) rejected_records: u64,
    /// Spans that arrived folded in histogram deltas.
    pub(crate) folded: u64,
    /// Spans counted under `__overflow__` (their service reached its operation cap).
    pub(crate) overflowed: u64,
    /// Span records whose weight was above `ingest.max_span_weight` and was cut to it.
    pub(crate) weight_clamped: u64,
    /// The series keys (group hashes) of the batch.
    pub(crate) keys: Vec<u64>,
}

impl IngestService {
    /// Validates `batch` and computes its routes. Per-span problems are counted in `stats`;
    /// problems with the batch itself are returned as a status.
    pub(crate) fn validate(
        &self,
        mut batch: SpanBatch,
        stats: &mut BatchStats,
        anonymous: bool,
    ) -> Result<ValidatedBatch, Status> {
        // One span may stand for many (its adjusted count under sampling), but not for
        // billions: a weight above the limit is cut to it and counted.
        for span in batch.groups.iter_mut().flat_map(|g| g.spans.iter_mut()) {
            if span.weight > self.max_span_weight {
                span.weight = self.max_span_weight;
                stats.weight_clamped += 1;
            }
        }
        let seq = batch.seq;
        let bad = |msg: String| Status::invalid_argument(format!("batch seq {seq}: {msg}"));
        if batch.client_id == 0 && !anonymous {
            return Err(bad("client_id must not be 0".into()));
        }
        if seq == 0 {
            return Err(Status::invalid_argument("batch seq must be at least 1"));
        }
        let spans: usize = batch.groups.iter().map(|g| g.spans.len()).sum();
        if spans > self.max_spans {
            return Err(Status::resource_exhausted(format!(
                "batch seq {seq}: {spans} spans, more than the limit of {}; split the batch",
                self.max_spans
            )));
        }
        let now = self.clock.now_nanos();
        let limits = self.pipeline.limits();
        let highest = self.pipeline.layout().highest();
        let shards = self.pipeline.shard_count();
        let mut targets = Vec::new();
        let mut groups = Vec::with_capacity(batch.groups.len());
        for (i, group) in batch.groups.iter().enumerate() {
            let (sent_service, sent_operation) =
                check_key(group.key.as_ref()).map_err(|m| bad(format!("group {i}: {m}")))?;
            let (service, operation) = self.cardinality.admit(sent_service, sent_operation);
            let service_overflow = service != sent_service;
            let overflow = operation != sent_operation;
            if overflow || service_overflow {
                stats.overflowed += group.spans.iter().map(|s| u64::from(s.weight.max(1))).sum::<u64>();
            }
            let hash = series::group_hash(service, operation);
            let shard = series::partition(hash, shards) as u32;
            targets.push(shard);
            self.sampler.observe_full(
                hash,
                service,
                operation,
                group.spans.iter().map(|s| (s.duration_nanos, u64::from(s.weight.max(1)))),
            );
            stats.keys.push(hash);
            groups.push(GroupRoute {
                shard,
                ok_series: series::series_id(service, operation, SpanStatus::Ok),
                error_series: series::series_id(service, operation, SpanStatus::Error),
                overflow,
                service_overflow,
            });
            for span in &group.spans {
                let weight = u64::from(span.weight.max(1));
                match limits.classify(span.start_unix_nanos, span.duration_nanos, now) {
                    Ok(_) => {
                        stats.accepted += weight;
                        if span.duration_nanos as u64 > highest {
                            stats.clamped += weight;
                        }
                    }
                    Err(reason) => {
                        stats.rejected[reason.index()] += weight;
                        stats.rejected_records += 1;
                    }
                }
            }
        }
        let mut deltas = Vec::with_capacity(batch.deltas.len());
        for (i, delta) in batch.deltas.iter().enumerate() {
            let (sent_service, sent_operation) =
                check_key(delta.key.as_ref()).map_err(|m| bad(format!("delta {i}: {m}")))?;
            let (service, operation) = self.cardinality.admit(sent_service, sent_operation);
            let overflow = service != sent_service || operation != sent_operation;
            let histogram = Histogram::decode(&delta.histogram)
                .map_err(|e| bad(format!("delta {i} ({service}/{operation}): {e}")))?;
            let window = delta.window_start_unix_seconds;
            if window.rem_euclid(tailscope_proto::BASE_WINDOW_SECONDS) != 0 {
                return Err(bad(format!(
                    "delta {i} ({service}/{operation}): window_start_unix_seconds {window} is not a multiple of {}",
                    tailscope_proto::BASE_WINDOW_SECONDS
                )));
            }
            // A window is in range when any instant of it is.
            let window_nanos = window.saturating_mul(1_000_000_000);
            let last = window_nanos.saturating_add(tailscope_proto::BASE_WINDOW_SECONDS * 1_000_000_000 - 1);
            let fits = limits.window_of(last, now).is_ok() || limits.window_of(window_nanos, now).is_ok();
            // Counts are the sender's word: a hostile one must not overflow the batch's totals.
            let count = histogram.count();
            let overflows = |total: u64| {
                total.checked_add(count).ok_or_else(|| {
                    bad(format!(
                        "delta {i} ({service}/{operation}): a count of {count} overflows the batch's total"
                    ))
                })
            };
            if !fits {
                let reason = limits.window_of(window_nanos, now).err().unwrap_or(SpanReject::TooOld);
                stats.rejected[reason.index()] = overflows(stats.rejected[reason.index()])?;
                continue;
            }
            if histogram.is_empty() {
                continue;
            }
            stats.accepted = overflows(stats.accepted)?;
            stats.clamped = stats.clamped.saturating_add(histogram.clamped());
            if overflow {
                stats.overflowed = stats.overflowed.saturating_add(count);
            }
            let status = SpanStatus::from_wire(delta.status);
            let hash = series::group_hash(service, operation);
            self.sampler.observe_folded(hash, service, operation, &histogram);
            stats.folded = stats.folded.saturating_add(count);
            stats.keys.push(hash);
            let shard = series::partition(hash, shards) as u32;
            targets.push(shard);
            deltas.push(RoutedDelta {
                shard,
                series: series::series_id(service, operation, status),
                labels: SeriesLabels { service: service.to_owned(), operation: operation.to_owned(), status },
                window_start: window,
                histogram,
            });
        }
        targets.sort_unstable();
        targets.dedup();
        Ok(ValidatedBatch { client_id: batch.client_id, seq, now, batch, groups, deltas, targets })
    }

    pub(crate) fn record_accepted(&self, stats: &BatchStats) {
        let m = &self.metrics;
        m.batches.get_or_create(&Outcome { result: "accepted" }).inc();
        m.spans_accepted.inc_by(stats.accepted);
        m.spans_received.get_or_create(&Form { form: "full" }).inc_by(stats.accepted - stats.folded);
        m.spans_received.get_or_create(&Form { form: "folded" }).inc_by(stats.folded);
        m.spans_clamped.inc_by(stats.clamped);
        m.spans_overflowed.inc_by(stats.overflowed);
        m.span_weights_clamped.inc_by(stats.weight_clamped);
        for reason in SpanReject::ALL {
            let n = stats.rejected[reason.index()];
            if n > 0 {
                m.spans_rejected.get_or_create(&Reason { reason: reason.as_str() }).inc_by(n);
            }
        }
    }

    fn throttle(&self) -> Option<Throttle> {
        let pressure = self.pipeline.pressure();
        (pressure >= self.throttle_high_water).then(|| Throttle {
            delay_millis: (100.0 * pressure / self.throttle_high_water.max(0.01)) as u32,
            reason: format!("shard queues {:.0}% full", pressure * 100.0),
        })
    }
}

/// How long a batch waits for space in full shard queues before it is refused. While it
/// waits, the stream is not read, so HTTP/2 flow control pushes back on the client: short
/// bursts are absorbed, sustained overload is refused with RESOURCE_EXHAUSTED.
const ADMISSION_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

impl IngestService {
    async fn admit_with_backpressure(&self, batch: ValidatedBatch) -> Admission {
        self.admit_in_epoch(batch).await.0
    }

    /// Offers a batch, waiting up to [`ADMISSION_PATIENCE`] for queue space; also returns the
    /// epoch an accepted batch is durable with.
    pub(crate) async fn admit_in_epoch(&self, batch: ValidatedBatch) -> (Admission, u64) {
        let mut batch = Arc::new(batch);
        let deadline = tokio::time::Instant::now() + ADMISSION_PATIENCE;
        loop {
            match self.pipeline.admit_in_epoch(batch) {
                Ok(outcome) => return outcome,
                Err(_) if tokio::time::Instant::now() >= deadline => return (Admission::Overloaded, 0),
                Err(back) => batch = back,
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

fn check_key(key: Option<&SeriesKey>) -> Result<(&str, &str), String> {
    let key = key.ok_or("missing series key")?;
    for (name, value) in [("service", &key.service), ("operation", &key.operation)] {
        if value.is_empty() {
            return Err(format!("empty {name} name"));
        }
        if value.len() > MAX_LABEL_BYTES {
            return Err(format!("{name} name is {} bytes, longer than {MAX_LABEL_BYTES}", value.len()));
        }
    }
    Ok((&key.service, &key.operation))
}

/// Maps an error from decoding the inbound stream to the status and counter reason it gets.
/// `None` means the client went away, which is not the client's fault to report.
fn inbound_error(status: &Status) -> Option<(Status, &'static str)> {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Some((
            Status::resource_exhausted(format!("batch too large: {}; split it", status.message())),
            "oversized",
        )),
        Code::Internal => {
            Some((Status::invalid_argument(format!("malformed batch: {}", status.message())), "malformed"))
        }
        _ => None,
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<IngestReply, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = ReplyStream;

    async fn stream(
        &self,
        request: Request<Streaming<SpanBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let service = self.clone();
        tokio::spawn(async move {
            service.metrics.ingest_streams.inc();
            service.serve_stream(inbound, tx).await;
            service.metrics.ingest_streams.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The per-stream state.
struct StreamState {
    client: Option<u64>,
    acked: u64,
    /// The series keys this client sent, whose sampling policies it is told.
    keys: std::collections::HashSet<u64>,
    /// The sampler generation last told.
    told: u64,
    rejected: BTreeMap<&'static str, u64>,
    tx: mpsc::Sender<Result<IngestReply, Status>>,
}

impl StreamState {
    /// Sends an acknowledgement when the client's durable seq moved; false when the client is gone.
    async fn ack(&mut self, pipeline: &Pipeline, sampler: &Sampler, throttle: Option<Throttle>) -> bool {
        let Some(client) = self.client else { return true };
        let durable = pipeline.durable_seq(client);
        if durable <= self.acked && throttle.is_none() {
            return true;
        }
        self.acked = self.acked.max(durable);
        let generation = sampler.generation();
        let sampling = (generation > self.told && !self.keys.is_empty()).then(|| {
            self.told = generation;
            SamplingPolicy {
                default_probability: 1.0,
                default_set: false,
                keys: sampler.policies(self.keys.iter().copied()),
            }
        });
        let reply = IngestReply {
            durable_seq: self.acked,
            sampling,
            throttle,
            rejected: self
                .rejected
                .iter()
                .map(|(&reason, &count)| RejectedSpans { reason: reason.to_owned(), count })
                .collect(),
        };
        self.tx.send(Ok(reply)).await.is_ok()
    }

    async fn fail(&self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }
}

impl IngestService {
    async fn serve_stream(
        &self,
        mut inbound: Streaming<SpanBatch>,
        tx: mpsc::Sender<Result<IngestReply, Status>>,
    ) {
        let mut durable = self.pipeline.subscribe();
        let mut st = StreamState {
            client: None,
            acked: 0,
            keys: Default::default(),
            told: 0,
            rejected: BTreeMap::new(),
            tx,
        };
        // Whether to read more batches: false once the client half-closed or the server drains.
        let mut reading = true;
        loop {
            tokio::select! {
                changed = durable.changed() => {
                    let closed = changed.is_err() || durable.borrow_and_update().closed;
                    if !st.ack(&self.pipeline, &self.sampler, None).await {
                        return;
                    }
                    if closed {
                        st.fail(Status::unavailable("server is shutting down; reconnect and resend unacknowledged batches")).await;
                        return;
                    }
                    if !reading && st.client.is_none_or(|c| self.pipeline.is_settled(c)) {
                        return;
                    }
                }
                msg = inbound.message(), if reading => match msg {
                    Ok(Some(batch)) => {
                        if let Err(status) = self.offer(&mut st, batch, &mut reading).await {
                            st.fail(status).await;
                            return;
                        }
                    }
                    Ok(None) => {
                        // The client is done sending; finish once what it sent is acknowledged.
                        reading = false;
                        if st.client.is_none_or(|c| self.pipeline.is_settled(c)) && st.ack(&self.pipeline, &self.sampler, None).await {
                            return;
                        }
                    }
                    Err(status) => {
                        if let Some((status, reason)) = inbound_error(&status) {
                            self.metrics.reject_batch(reason);
                            st.fail(status).await;
                        }
                        return;
                    }
                },
            }
        }
    }

    /// Handles one batch. An error ends the stream with that status.
    async fn offer(&self, st: &mut StreamState, batch: SpanBatch, reading: &mut bool) -> Result<(), Status> {
        match st.client {
            Some(c) if c != batch.client_id => {
                self.metrics.reject_batch("invalid");
                return Err(Status::invalid_argument(format!(
                    "batch seq {}: client_id {:016x} differs from this stream's client {c:016x}",
                    batch.seq, batch.client_id
                )));
            }
            _ => st.client = Some(batch.client_id),
        }
        let (client, seq) = (batch.client_id, batch.seq);
        if self.pipeline.is_duplicate(client, seq) {
            self.metrics.batches.get_or_create(&Outcome { result: "duplicate" }).inc();
            if !st.ack(&self.pipeline, &self.sampler, None).await {
                return Err(Status::cancelled("client went away"));
            }
            return Ok(());
        }
        let mut stats = BatchStats::default();
        let validated = match self.validate(batch, &mut stats, false) {
            Ok(v) => v,
            Err(status) => {
                let reason = if status.code() == Code::ResourceExhausted { "oversized" } else { "invalid" };
                self.metrics.reject_batch(reason);
                return Err(status);
            }
        };
        match self.admit_with_backpressure(validated).await {
            Admission::Accepted => {
                self.record_accepted(&stats);
                // Bounded: a client with more keys than this is told the policies of the first.
                for &k in &stats.keys {
                    if st.keys.len() < MAX_KEYS_PER_STREAM {
                        st.keys.insert(k);
                    }
                }
                for reason in SpanReject::ALL {
                    let n = stats.rejected[reason.index()];
                    if n > 0 {
                        *st.rejected.entry(reason.as_str()).or_default() += n;
                    }
                }
                if let Some(t) = self.throttle() {
                    self.metrics.throttle_replies.inc();
                    if !st.ack(&self.pipeline, &self.sampler, Some(t)).await {
                        return Err(Status::cancelled("client went away"));
                    }
                }
                Ok(())
            }
            Admission::Duplicate => {
                self.metrics.batches.get_or_create(&Outcome { result: "duplicate" }).inc();
                Ok(())
            }
            Admission::Overloaded => {
                self.metrics.reject_batch("overloaded");
                self.metrics
                    .spans_throttled
                    .get_or_create(&Reason { reason: "overloaded" })
                    .inc_by(stats.accepted);
                Err(Status::resource_exhausted(format!(
                    "batch seq {seq}: shard queues are full; resend after a backoff"
                )))
            }
            Admission::StoreUnavailable => {
                self.metrics.reject_batch("store_unavailable");
                self.metrics
                    .spans_throttled
                    .get_or_create(&Reason { reason: "store_unavailable" })
                    .inc_by(stats.accepted);
                Err(Status::unavailable(format!(
                    "batch seq {seq}: the store cannot write right now; resend after a backoff"
                )))
            }
            Admission::Draining => {
                // Stop reading; the final epoch's acknowledgement and UNAVAILABLE follow.
                *reading = false;
                Ok(())
            }
        }
    }
}
