//! The native protocol: `tailscope.v1.Ingest/Stream`. Each stream decodes batches, submits
//! them through the ingest door and turns durable-epoch progress into acknowledgements, with
//! the sampling policies and throttle hints the client applies.
//!
//! Per-batch problems end the stream with a status naming the batch and what was wrong
//! (`INVALID_ARGUMENT` for malformed input, `RESOURCE_EXHAUSTED` for overload or an oversized
//! batch, `UNAVAILABLE` at shutdown); the client reconnects and resends what is unacknowledged.
//! Processing a stream is sequential, so a refused batch is never followed by an accepted one
//! on the same stream, and a client's accepted watermark always covers a prefix of its batches.

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use tailscope_proto::v1::ingest_server::Ingest;
use tailscope_proto::v1::{IngestReply, RejectedSpans, SamplingPolicy, SpanBatch, Throttle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{Decided, IngestError, IngestService, NamesAhead, Origin};
use crate::pipeline::Admit;
use crate::sampling::Sampler;
use crate::series::SpanReject;
use crate::telemetry::Outcome;

/// Most series keys whose sampling policies one stream is told.
const MAX_KEYS_PER_STREAM: usize = 10_000;

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
        // The credential the stream authenticated with (the gRPC guard puts it there).
        let owner = request.extensions().get::<crate::auth::Credential>().map_or(0, |c| c.0);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let service = self.clone();
        tokio::spawn(async move {
            service.metrics.ingest_streams.inc();
            service.serve_stream(inbound, tx, owner).await;
            service.metrics.ingest_streams.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The per-stream state.
struct StreamState {
    client: Option<u64>,
    /// The credential the stream authenticated with (0: none).
    owner: u64,
    acked: u64,
    /// The series keys this client sent, whose sampling policies it is told.
    keys: std::collections::HashSet<u64>,
    /// The sampler generation last told.
    told: u64,
    rejected: BTreeMap<&'static str, u64>,
    tx: mpsc::Sender<Result<IngestReply, Status>>,
}

/// A batch read ahead, its encoded size, and its names' decisions when every one was decided as
/// it was read: ready at once then, else once its new names are agreed on (or the proposal
/// gave up), without decisions (submitting looks them up).
type Ahead<'a> =
    Pin<Box<dyn std::future::Future<Output = (SpanBatch, usize, Option<Vec<Decided>>)> + Send + 'a>>;

/// Most encoded bytes of batches a stream reads ahead while earlier ones wait for their names
/// (the HTTP/2 window of a stream; one larger batch is still read when none waits).
const AHEAD_BYTES: usize = 4 << 20;

/// How often a stream whose acknowledgements are held up tells its client.
const STALL_NOTICE: std::time::Duration = std::time::Duration::from_secs(1);

impl StreamState {
    /// Sends an acknowledgement when the client's durable seq moved; false when the client is gone.
    async fn ack(&mut self, pipeline: &dyn Admit, sampler: &Sampler, throttle: Option<Throttle>) -> bool {
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
        owner: u64,
    ) {
        let mut durable = self.pipeline.subscribe();
        let mut st = StreamState {
            client: None,
            owner,
            acked: 0,
            keys: Default::default(),
            told: 0,
            rejected: BTreeMap::new(),
            tx,
        };
        // Whether to read more batches: false once the client half-closed or the server drains.
        let mut reading = true;
        // Batches read while an earlier one waits for its new names to be agreed on (a cluster
        // gateway), with their encoded sizes: their own names are proposed meanwhile, and
        // they are submitted one by one, in order, each once its proposal came back.
        let mut ahead: FuturesOrdered<Ahead<'_>> = FuturesOrdered::new();
        let mut ahead_bytes = 0usize;
        // While acknowledgements are held up (a cluster's log electing a leader), a client
        // waiting for one is told so every second: a reply keeps its stream alive, and the
        // throttle slows it meanwhile.
        let mut heartbeat = tokio::time::interval(STALL_NOTICE);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut submit = None;
            tokio::select! {
                _ = heartbeat.tick() => {
                    let waiting = st.client.is_some_and(|c| !self.pipeline.is_settled(c));
                    if let (true, Some(reason)) = (waiting, self.pipeline.stalled()) {
                        let throttle = Throttle { delay_millis: STALL_NOTICE.as_millis() as u32 / 2, reason };
                        if !st.ack(self.pipeline.as_ref(), &self.sampler, Some(throttle)).await {
                            return;
                        }
                    }
                }
                changed = durable.changed() => {
                    let closed = changed.is_err() || durable.borrow_and_update().closed;
                    if !st.ack(self.pipeline.as_ref(), &self.sampler, None).await {
                        return;
                    }
                    if closed {
                        st.fail(Status::unavailable("server is shutting down; reconnect and resend unacknowledged batches")).await;
                        return;
                    }
                    if !reading && ahead.is_empty() && st.client.is_none_or(|c| self.pipeline.is_settled(c)) {
                        return;
                    }
                }
                Some((batch, size, decided)) = ahead.next(), if !ahead.is_empty() => {
                    ahead_bytes -= size;
                    submit = Some((batch, decided));
                }
                msg = inbound.message(), if reading && ahead_bytes < AHEAD_BYTES => match msg {
                    // Names found decided now stay so: submitting takes the decisions instead
                    // of looking the names up again.
                    Ok(Some(batch)) => match self.names_ahead(&batch) {
                        None if ahead.is_empty() => submit = Some((batch, None)),
                        Some(NamesAhead::Decided(decided)) if ahead.is_empty() => submit = Some((batch, Some(decided))),
                        found => {
                            let size = prost::Message::encoded_len(&batch);
                            ahead_bytes += size;
                            ahead.push_back(Box::pin(async move {
                                let decided = match found {
                                    Some(NamesAhead::Decided(decided)) => Some(decided),
                                    Some(NamesAhead::Proposed(proposal)) => {
                                        proposal.await;
                                        None
                                    }
                                    None => None,
                                };
                                (batch, size, decided)
                            }));
                        }
                    },
                    Ok(None) => {
                        // The client is done sending; finish once what it sent is acknowledged.
                        reading = false;
                        if ahead.is_empty() && st.client.is_none_or(|c| self.pipeline.is_settled(c)) && st.ack(self.pipeline.as_ref(), &self.sampler, None).await {
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
            if let Some((batch, decided)) = submit {
                if let Err(status) = self.offer(&mut st, batch, decided, &mut reading).await {
                    st.fail(status).await;
                    return;
                }
                // The last batch read ahead of a half-close, and nothing left to acknowledge.
                let done =
                    !reading && ahead.is_empty() && st.client.is_none_or(|c| self.pipeline.is_settled(c));
                if done && st.ack(self.pipeline.as_ref(), &self.sampler, None).await {
                    return;
                }
            }
        }
    }

    /// Handles one batch (`decided`: its names' decisions, when every one was found decided
    /// as it was read). An error ends the stream with that status.
    async fn offer(
        &self,
        st: &mut StreamState,
        batch: SpanBatch,
        decided: Option<Vec<Decided>>,
        reading: &mut bool,
    ) -> Result<(), Status> {
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
            if !st.ack(self.pipeline.as_ref(), &self.sampler, None).await {
                return Err(Status::cancelled("client went away"));
            }
            return Ok(());
        }
        match self.submit_decided(batch, Origin::Native, st.owner, decided).await {
            Ok(receipt) if receipt.duplicate => Ok(()),
            Ok(receipt) => {
                let stats = receipt.stats;
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
                    if !st.ack(self.pipeline.as_ref(), &self.sampler, Some(t)).await {
                        return Err(Status::cancelled("client went away"));
                    }
                }
                Ok(())
            }
            Err(IngestError::Draining) => {
                // Stop reading; the final epoch's acknowledgement and UNAVAILABLE follow.
                *reading = false;
                Ok(())
            }
            Err(e) => Err(e.grpc_status()),
        }
    }
}
