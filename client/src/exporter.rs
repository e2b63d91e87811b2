//! The background exporter: one thread with its own single-threaded runtime (so the host's
//! runtime, if any, never runs tailscope's work), one bidirectional stream to the server.
//!
//! Each turn it drains the span queue — into the next batch when the connection is healthy and
//! the sampling policy keeps the span, into the fold histograms otherwise — cuts a batch when
//! it is full or old enough (with the folded histograms as deltas), sends unacknowledged
//! batches in seq order, and reads acknowledgements. A new stream resends every unacknowledged
//! batch with its original seq, so the server counts each exactly once.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tailscope_proto::batch::BatchBuilder;
use tailscope_proto::v1::ingest_client::IngestClient;
use tailscope_proto::v1::{HistogramDelta, IngestReply, SeriesKey, Span, SpanBatch, SpanStatus};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

use crate::backoff::Backoff;
use crate::breaker::Breaker;
use crate::shared::{Drop, Record, Shared};
use crate::{BuildError, Config, ExportError};

/// Where a flush's outcome goes.
pub(crate) type Reply = oneshot::Sender<Result<(), ExportError>>;

/// What the client asks of its exporter.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send everything recorded so far; answer once acknowledged or at the deadline.
    Flush { deadline: Instant, reply: oneshot::Sender<Result<(), ExportError>> },
    /// Flush, then stop.
    Shutdown { deadline: Instant, reply: Option<oneshot::Sender<Result<(), ExportError>>> },
}

/// A batch sent (or to be sent) and not yet acknowledged.
#[derive(Debug)]
struct Pending {
    seq: u64,
    batch: SpanBatch,
    spans: u64,
    bytes: usize,
}

struct Conn {
    tx: mpsc::Sender<SpanBatch>,
    replies: Streaming<IngestReply>,
    /// The highest seq handed to this stream.
    sent_upto: u64,
    /// Since when batches handed to this stream have waited without any reply.
    waiting_since: Option<Instant>,
}

type Connecting = tokio::task::JoinHandle<Result<Conn, Status>>;

struct Waiter {
    /// The seq that must be acknowledged; `None` until a batch could be cut.
    target: Option<u64>,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), ExportError>>,
}

pub(crate) struct Exporter {
    shared: Arc<Shared>,
    config: Config,
    client_id: u64,
    next_seq: u64,
    /// Spans of the batch being built, grouped by operation id.
    builder: BatchBuilder<u32>,
    unacked: VecDeque<Pending>,
    unacked_bytes: usize,
    conn: Option<Conn>,
    connecting: Option<Connecting>,
    next_attempt: Instant,
    backoff: Backoff,
    breaker: Breaker,
    last_cut: Instant,
    /// Keep a span iff the low 56 bits of its trace id are at least this (0 keeps all).
    threshold: u64,
    /// Per operation id: its own threshold, and the duration from which spans are always kept
    /// (0: no such rule), from the server's per-key policies.
    policies: Vec<Option<(u64, i64)>>,
    throttled_until: Option<Instant>,
    waiters: Vec<Waiter>,
    connected_once: bool,
    /// For an `https://` endpoint.
    tls: Option<ClientTlsConfig>,
}

impl Exporter {
    pub fn new(
        shared: Arc<Shared>,
        config: Config,
        client_id: u64,
        tls: Option<ClientTlsConfig>,
    ) -> Exporter {
        let now = Instant::now();
        Exporter {
            shared,
            backoff: Backoff::new(config.backoff_base, config.backoff_cap),
            breaker: Breaker::new(config.breaker_threshold, config.breaker_open_for),
            config,
            client_id,
            next_seq: 1,
            builder: BatchBuilder::new(),
            tls,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            conn: None,
            connecting: None,
            next_attempt: now,
            last_cut: now,
            threshold: 0,
            policies: Vec::new(),
            throttled_until: None,
            waiters: Vec::new(),
            connected_once: false,
        }
    }

    /// Runs until shut down (or until every client handle is gone).
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping: Option<(Instant, Option<Reply>)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                cmd = commands.recv(), if stopping.is_none() => match cmd {
                    Some(Command::Flush { deadline, reply }) => {
                        self.waiters.push(Waiter { target: None, deadline, reply });
                    }
                    Some(Command::Shutdown { deadline, reply }) => stopping = Some((deadline, reply)),
                    None => stopping = Some((Instant::now() + self.config.drop_flush_timeout, None)),
                },
                reply = next_reply(&mut self.conn) => self.on_reply(reply),
                done = join(&mut self.connecting) => {
                    self.connecting = None;
                    self.on_connected(done);
                }
            }
            let now = Instant::now();
            self.check_ack_timeout(now);
            self.drain(now);
            let flushing = stopping.is_some() || !self.waiters.is_empty();
            self.cut(now, flushing);
            self.maybe_connect(now);
            self.send();
            self.answer_waiters(now);
            if let Some((deadline, reply)) = &mut stopping {
                let done = self.everything_acked();
                if done || now >= *deadline {
                    let unacked: u64 = self.unacked.iter().map(|p| p.spans).sum::<u64>()
                        + self.builder.len() as u64
                        + self.shared.fold.lock().spans();
                    self.shared.counters.drop(Drop::Unacked, unacked);
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(if done { Ok(()) } else { Err(ExportError::Timeout { unacked }) });
                    }
                    return;
                }
            }
        }
    }

    fn can_send(&self, now: Instant) -> bool {
        self.conn.is_some()
            && self.unacked_bytes < self.config.max_unacked_bytes
            && self.throttled_until.is_none_or(|t| now >= t)
    }

    /// Moves queued spans into the batch being built, or into the fold histograms.
    fn drain(&mut self, now: Instant) {
        let send = self.can_send(now);
        let shared = self.shared.clone();
        let mut fold = None;
        let (mut drained, mut folded, mut dropped) = (0u64, 0u64, 0u64);
        while let Some(r) = self.shared.queue.pop() {
            drained += 1;
            match self.keeps(&r) {
                Some(adjusted_count) if send => {
                    let (service, ops) = (&self.config.service, &self.shared.ops);
                    let series = || {
                        let op = ops.operation(r.op);
                        SeriesKey {
                            service: service.clone(),
                            operation: op.name.to_string(),
                            kind: op.kind as i32,
                            peer: op.peer.to_string(),
                        }
                    };
                    self.builder.push(r.op, series, r.span(adjusted_count));
                }
                _ => {
                    let f = fold.get_or_insert_with(|| shared.fold.lock());
                    if f.add(&r) {
                        folded += 1;
                    } else {
                        dropped += 1;
                    }
                }
            }
            if self.builder.len() >= self.config.max_batch_spans {
                drop(fold.take());
                self.cut_batch(now, false);
            }
        }
        drop(fold);
        let c = &self.shared.counters;
        c.drained.fetch_add(drained, Ordering::Relaxed);
        c.folded.fetch_add(folded, Ordering::Relaxed);
        if dropped > 0 {
            c.drop(Drop::FoldFull, dropped);
        }
    }

    /// Whether the sampling policy sends `r` in full, and if so its adjusted count: errors
    /// always (1), spans at least as slow as their key's recent p99 always (1), others iff the
    /// low 56 bits of the trace id reach the key's threshold (consistent by trace across
    /// services), standing for 2⁵⁶ / (2⁵⁶ − threshold) spans.
    fn keeps(&self, r: &Record) -> Option<f64> {
        if r.status == SpanStatus::Error as i32 {
            return Some(1.0);
        }
        let (threshold, slow) =
            self.policies.get(r.op as usize).copied().flatten().unwrap_or((self.threshold, 0));
        if (slow > 0 && r.duration >= slow) || threshold == 0 {
            Some(1.0)
        } else if (r.trace_lo & ((1 << 56) - 1)) >= threshold {
            Some(adjusted_count(threshold))
        } else {
            None
        }
    }

    /// Cuts a batch when the one being built is old enough (or a flush asks for it).
    fn cut(&mut self, now: Instant, flushing: bool) {
        let due = now.saturating_duration_since(self.last_cut) >= self.config.max_batch_delay;
        if due || flushing {
            self.cut_batch(now, true);
        }
    }

    /// Turns the spans built so far (and, when connected, the folded histograms) into the next
    /// batch.
    fn cut_batch(&mut self, now: Instant, with_deltas: bool) {
        self.last_cut = now;
        let mut deltas = Vec::new();
        let mut delta_spans = 0;
        if with_deltas && self.can_send(now) {
            let mut fold = self.shared.fold.lock();
            if !fold.is_empty() {
                delta_spans = fold.spans();
                for ((op, status, window), (h, own)) in fold.take() {
                    deltas.push(HistogramDelta {
                        key: Some(self.key(op)),
                        status,
                        window_start_unix_seconds: window,
                        histogram: h.to_bytes(),
                        self_histogram: own.map_or_else(Vec::new, |own| own.to_bytes()),
                    });
                }
            }
        }
        if self.builder.is_empty() && deltas.is_empty() {
            return;
        }
        let spans = self.builder.len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch = self.builder.finish(self.client_id, seq, deltas);
        let bytes = batch.encoded_len();
        self.unacked_bytes += bytes;
        self.shared.counters.unacked_bytes.store(self.unacked_bytes as u64, Ordering::Relaxed);
        self.shared.counters.sent.fetch_add(spans, Ordering::Relaxed);
        self.unacked.push_back(Pending { seq, batch, spans: spans + delta_spans, bytes });
    }

    fn key(&self, op: u32) -> SeriesKey {
        let op = self.shared.ops.operation(op);
        SeriesKey {
            service: self.config.service.clone(),
            operation: op.name.to_string(),
            kind: op.kind as i32,
            peer: op.peer.to_string(),
        }
    }

    fn maybe_connect(&mut self, now: Instant) {
        if self.conn.is_some() || self.connecting.is_some() || now < self.next_attempt {
            return;
        }
        let allowed = self.breaker.allow(now);
        self.publish_breaker(now);
        if !allowed {
            return;
        }
        let endpoint = self.config.endpoint.clone();
        let timeout = self.config.connect_timeout;
        let token = self.config.token.clone();
        self.connecting = Some(tokio::spawn(connect(endpoint, timeout, self.tls.clone(), token)));
    }

    fn on_connected(&mut self, result: Result<Conn, Status>) {
        let now = Instant::now();
        match result {
            Ok(conn) => {
                if self.connected_once {
                    self.shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                self.connected_once = true;
                // Not yet a success for the breaker or the backoff: a paused server still
                // completes TCP handshakes. The first reply is (`on_reply`).
                self.conn = Some(conn);
                self.shared.counters.connected.store(true, Ordering::Relaxed);
            }
            Err(_) => self.failed(now),
        }
        self.publish_breaker(now);
    }

    fn failed(&mut self, now: Instant) {
        self.disconnected();
        self.breaker.on_failure(now);
        self.next_attempt = now + self.backoff.next_delay();
        self.publish_breaker(now);
    }

    fn disconnected(&mut self) {
        self.conn = None;
        self.shared.counters.connected.store(false, Ordering::Relaxed);
    }

    fn publish_breaker(&self, now: Instant) {
        self.shared.counters.breaker.store(self.breaker.state(now).as_u8(), Ordering::Relaxed);
    }

    /// A stream whose batches wait longer than `ack_timeout` for any reply has failed: the
    /// server is paused or the connection half-open, and nothing else would notice for as
    /// long as TCP keeps the connection.
    fn check_ack_timeout(&mut self, now: Instant) {
        let hung = self
            .conn
            .as_ref()
            .and_then(|c| c.waiting_since)
            .is_some_and(|t| now.saturating_duration_since(t) >= self.config.ack_timeout);
        if hung {
            self.shared.counters.ack_timeouts.fetch_add(1, Ordering::Relaxed);
            self.failed(now);
        }
    }

    /// Hands unacknowledged batches to the stream in seq order, as far as it takes them.
    fn send(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        let from = conn.sent_upto;
        for p in self.unacked.iter().filter(|p| p.seq > from) {
            match conn.tx.try_send(p.batch.clone()) {
                Ok(()) => {
                    conn.sent_upto = p.seq;
                    conn.waiting_since.get_or_insert_with(Instant::now);
                }
                Err(mpsc::error::TrySendError::Full(_)) => break,
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }

    fn on_reply(&mut self, reply: Result<Option<IngestReply>, Status>) {
        let now = Instant::now();
        match reply {
            Ok(Some(r)) => {
                self.breaker.on_success();
                self.backoff.reset();
                self.publish_breaker(now);
                self.ack(r.durable_seq);
                if let Some(c) = self.conn.as_mut() {
                    // Any reply shows the server alive; wait afresh for what is still out.
                    c.waiting_since = (c.sent_upto > r.durable_seq).then_some(now);
                }
                if let Some(policy) = r.sampling {
                    if policy.default_set {
                        self.threshold = threshold(policy.default_probability);
                    }
                    for kp in policy.keys {
                        let Some(key) = kp.key.filter(|k| k.service == self.config.service) else { continue };
                        // A policy names an operation; it holds for every kind the name is used in.
                        for op in self.shared.ops.lookup(&key.operation) {
                            let op = op as usize;
                            if self.policies.len() <= op {
                                self.policies.resize(op + 1, None);
                            }
                            self.policies[op] = Some((threshold(kp.probability), kp.always_keep_above_nanos));
                        }
                    }
                }
                if let Some(t) = r.throttle.filter(|t| t.delay_millis > 0) {
                    self.throttled_until = Some(now + Duration::from_millis(u64::from(t.delay_millis)));
                }
                let rejected: u64 = r.rejected.iter().map(|x| x.count).sum();
                self.shared.counters.server_rejected.store(rejected, Ordering::Relaxed);
            }
            // The server ended the stream cleanly: reconnect and resend what is unacked.
            Ok(None) => self.disconnected(),
            Err(status) if status.code() == Code::InvalidArgument => {
                // A malformed batch is never resent: drop the one the status names.
                let seq = batch_seq(status.message()).or(self.unacked.front().map(|p| p.seq));
                if let Some(i) = self.unacked.iter().position(|p| Some(p.seq) == seq) {
                    if let Some(p) = self.unacked.remove(i) {
                        self.unacked_bytes -= p.bytes;
                        self.shared.counters.drop(Drop::Rejected, p.spans);
                    }
                }
                self.disconnected();
            }
            Err(_) => self.failed(now),
        }
    }

    fn ack(&mut self, durable: u64) {
        let mut acked = 0;
        while self.unacked.front().is_some_and(|p| p.seq <= durable) {
            if let Some(p) = self.unacked.pop_front() {
                acked += p.spans;
                self.unacked_bytes -= p.bytes;
            }
        }
        let c = &self.shared.counters;
        c.acked.fetch_add(acked, Ordering::Relaxed);
        c.unacked_bytes.store(self.unacked_bytes as u64, Ordering::Relaxed);
    }

    fn everything_acked(&self) -> bool {
        self.shared.queue.is_empty()
            && self.builder.is_empty()
            && self.unacked.is_empty()
            && self.shared.fold.lock().is_empty()
    }

    fn answer_waiters(&mut self, now: Instant) {
        let last_cut_seq = self.next_seq - 1;
        let front = self.unacked.front().map(|p| p.seq);
        let connected = self.can_send(now);
        let fold_empty = self.shared.fold.lock().is_empty();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &mut self.waiters[i];
            // A target is set once everything recorded before the flush is in a batch.
            if w.target.is_none() && (connected || fold_empty) {
                w.target = Some(last_cut_seq);
            }
            let done = w.target.is_some_and(|t| front.is_none_or(|f| f > t));
            if done || now >= w.deadline {
                let w = self.waiters.swap_remove(i);
                let unacked = self.unacked.iter().map(|p| p.spans).sum();
                let _ = w.reply.send(if done { Ok(()) } else { Err(ExportError::Timeout { unacked }) });
            } else {
                i += 1;
            }
        }
    }
}

impl Record {
    /// The span this record stands for, counting for `adjusted_count` spans.
    fn span(&self, adjusted_count: f64) -> Span {
        Span {
            trace_id_high: self.trace_hi,
            trace_id_low: self.trace_lo,
            span_id: self.span_id,
            parent_span_id: self.parent,
            start_unix_nanos: self.start,
            duration_nanos: self.duration,
            status: self.status,
            weight: 0,
            adjusted_count,
            self_nanos: self.self_ns,
        }
    }
}

/// The consistent-sampling threshold for probability `p`: keep a span iff the low 56 bits of
/// its trace id are at least `(1 − p) · 2⁵⁶` (OpenTelemetry's `th`).
pub(crate) fn threshold(p: f64) -> u64 {
    if p.is_nan() || p >= 1.0 {
        return 0;
    }
    let p = p.max(0.0);
    (((1.0 - p) * (1u64 << 56) as f64) as u64).min((1 << 56) - 1)
}

/// How many spans one kept at `threshold` stands for: 2⁵⁶ / (2⁵⁶ − threshold).
pub(crate) fn adjusted_count(threshold: u64) -> f64 {
    (1u64 << 56) as f64 / ((1u64 << 56) - threshold.min((1 << 56) - 1)) as f64
}

/// The seq a status message names ("batch seq N: …").
fn batch_seq(message: &str) -> Option<u64> {
    let rest = message.split("batch seq ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The TLS settings of an `https://` endpoint: the system's roots, the configured CA, and
/// the client's own certificate for mutual TLS; `None` for `http://`.
pub(crate) fn tls_config(config: &Config) -> Result<Option<ClientTlsConfig>, BuildError> {
    if !config.endpoint.starts_with("https://") {
        return Ok(None);
    }
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| BuildError::TlsFile { path: path.clone(), source })
    };
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = &config.tls_ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

async fn connect(
    endpoint: String,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
    token: Option<String>,
) -> Result<Conn, Status> {
    let mut endpoint =
        Endpoint::from_shared(endpoint).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let channel = endpoint
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(16);
    let mut client = IngestClient::new(channel);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::invalid_argument("the token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let call = client.stream(request);
    let replies = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| Status::deadline_exceeded("stream not answered"))??
        .into_inner();
    Ok(Conn { tx, replies, sent_upto: 0, waiting_since: None })
}

async fn next_reply(conn: &mut Option<Conn>) -> Result<Option<IngestReply>, Status> {
    match conn {
        Some(c) => c.replies.message().await,
        None => std::future::pending().await,
    }
}

async fn join(connecting: &mut Option<Connecting>) -> Result<Conn, Status> {
    match connecting {
        Some(handle) => handle.await.unwrap_or_else(|e| Err(Status::internal(e.to_string()))),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_opentelemetry_th() {
        assert_eq!(threshold(1.0), 0);
        assert_eq!(threshold(f64::NAN), 0);
        assert_eq!(threshold(0.5), 1 << 55);
        assert_eq!(threshold(0.0), (1 << 56) - 1);
        // About 1 % of uniformly random trace ids pass a 1 % threshold.
        let th = threshold(0.01);
        let kept = (0..100_000).filter(|_| (fastrand::u64(..) & ((1 << 56) - 1)) >= th).count();
        assert!((800..=1_200).contains(&kept), "{kept}");
    }

    #[test]
    fn adjusted_counts_invert_the_probability() {
        assert_eq!(adjusted_count(threshold(1.0)), 1.0);
        assert_eq!(adjusted_count(threshold(0.5)), 2.0);
        assert!((adjusted_count(threshold(0.01)) - 100.0).abs() < 1e-6);
        // A zero probability keeps nothing; the count stays finite anyway.
        assert!(adjusted_count(threshold(0.0)).is_finite());
    }

    #[test]
    fn consistent_sampling_keeps_traces_of_the_lowest_probability_everywhere() {
        // Three services sampling at 5 %, 20 % and 60 %: every trace the 5 % one keeps is kept
        // by the other two, so traces sampled there are complete.
        let keep = |trace_lo: u64, p: f64| (trace_lo & ((1 << 56) - 1)) >= threshold(p);
        let mut kept_low = 0;
        for _ in 0..200_000 {
            let t = fastrand::u64(..);
            if keep(t, 0.05) {
                kept_low += 1;
                assert!(keep(t, 0.2) && keep(t, 0.6));
            }
            if keep(t, 0.2) {
                assert!(keep(t, 0.6));
            }
        }
        assert!((9_000..=11_000).contains(&kept_low), "{kept_low}");
    }

    #[test]
    fn malformed_batch_statuses_name_their_seq() {
        assert_eq!(batch_seq("batch seq 42: group 0: empty service name"), Some(42));
        assert_eq!(batch_seq("malformed batch: decode error"), None);
    }
}
