//! The tailscope client: record span latencies in a few tens of nanoseconds and stream them to
//! a tailscope server, with exact percentiles even through outages and sampling.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tailscope::BuildError> {
//! let client = tailscope::Client::builder()
//!     .endpoint("http://127.0.0.1:4317")
//!     .service("checkout")
//!     .build()?;
//! {
//!     let mut span = client.start("POST /pay");
//!     // … handle the request; mark it failed if it did:
//!     # let failed = false;
//!     if failed {
//!         span.error();
//!     }
//! } // the duration is recorded here
//! client.record("GET /cart", std::time::Duration::from_millis(12), tailscope::Status::Ok);
//! client.shutdown(std::time::Duration::from_secs(5)).await.ok();
//! # Ok(()) }
//! ```
//!
//! # What it guarantees the host
//!
//! Recording never blocks, never allocates (once an operation name has been seen), never
//! panics and never grows memory without bound: a span goes into a fixed-size lock-free queue;
//! when that is full it is folded into a histogram, and only when that is busy too is it
//! dropped — counted in [`Stats`]. All network work happens on the exporter's own thread.
//!
//! # Exact percentiles through outages and sampling
//!
//! The exporter sends spans in full while the server is reachable and its sampling policy keeps
//! them; every other span (sampled out, server down, circuit breaker open, too much unacked)
//! is folded into a histogram per (operation, status, 10-second window) and sent as a delta
//! once the server is back. Batches carry a random `client_id` and increasing `seq`; after a
//! reconnect every unacknowledged batch is resent with its seq, which the server recognises, so
//! nothing is counted twice. While the client lives, the server's counts and percentiles end up
//! exact.
//!
//! # Integrations
//!
//! - feature `tracing`: [`layer::TailscopeLayer`], a `tracing_subscriber::Layer` recording
//!   span durations;
//! - feature `tower` (and `axum` for route names): [`tower::TailscopeLayer`], timing requests
//!   of any tower service, and [`tower::TailscopeClientLayer`], timing the calls a service
//!   makes;
//! - feature `opentelemetry`: [`otel::TailscopeSpanProcessor`], for a service that already uses
//!   the OpenTelemetry SDK.
//!
//! # Trace context
//!
//! The tower layers read and write W3C `traceparent`, and every span recorded while a request
//! (or a `tracing` span) is worked on joins its trace ([`trace::TraceContext::current`]), so
//! exemplars link to the traces your tracing backend holds.

mod backoff;
mod breaker;
mod calls;
mod exporter;
#[cfg(feature = "tracing")]
pub mod layer;
#[cfg(feature = "opentelemetry")]
pub mod otel;
mod shared;
#[cfg(feature = "tower")]
pub mod tower;
pub mod trace;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;
pub use tailscope_proto as proto;
pub use tailscope_proto::v1::SpanKind;
use tailscope_proto::v1::{SeriesKey, Span, SpanBatch, SpanStatus};
use tokio::sync::{mpsc, oneshot};

pub use crate::backoff::Backoff;
pub use crate::breaker::{Breaker, BreakerState};
use crate::exporter::{Command, Exporter};
use crate::shared::{Anchor, Counters, Folder, Interner, Record, Shared};
pub use crate::shared::{MAX_OPERATION_BYTES, MAX_PEERS, OVERFLOW_OPERATION};

/// The outcome of a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Succeeded.
    Ok,
    /// Failed: counted in the `status="error"` series, and always sent in full.
    Error,
}

impl Status {
    fn wire(self) -> i32 {
        match self {
            Status::Ok => SpanStatus::Ok as i32,
            Status::Error => SpanStatus::Error as i32,
        }
    }
}

/// Trace context of a span, for linking tailscope's exemplars to your traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ids {
    /// The 128-bit trace id (0: the current trace's, see [`trace::TraceContext::current`],
    /// with the current span as parent; else a random one is made).
    pub trace_id: u128,
    /// The span's id (0: a random one is made).
    pub span_id: u64,
    /// The parent span's id, 0 for a root span.
    pub parent_span_id: u64,
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The endpoint is not a valid `http://host:port` URI.
    #[error("invalid endpoint {endpoint:?}: {message}")]
    Endpoint {
        /// What was given.
        endpoint: String,
        /// Why it is invalid.
        message: String,
    },
    /// The service name is empty or longer than 256 bytes.
    #[error("invalid service name {0:?}: it must be 1 to 256 bytes")]
    Service(String),
    /// The exporter thread could not be started.
    #[error("cannot start the exporter thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A TLS file (`tls_ca_file`, `tls_cert_file`, `tls_key_file`) cannot be read.
    #[error("{path}: {source}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a flush or shutdown did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The deadline passed with spans still unacknowledged.
    #[error("deadline passed with {unacked} spans not acknowledged by the server")]
    Timeout {
        /// Spans recorded but not (yet) acknowledged.
        unacked: u64,
    },
    /// The exporter has stopped (the client was shut down).
    #[error("the exporter has stopped")]
    Stopped,
}

/// Tuning of a client; every field has a default (see [`ClientBuilder`]).
#[derive(Debug, Clone)]
pub struct Config {
    /// The server's gRPC address (default `http://127.0.0.1:4317`).
    pub endpoint: String,
    /// The `service` label of every span.
    pub service: String,
    /// Spans the queue holds between exporter turns (default 65,536; 64 bytes each).
    pub queue_capacity: usize,
    /// Most spans per batch (default 4,096).
    pub max_batch_spans: usize,
    /// Longest a span waits before its batch is cut (default 1 s).
    pub max_batch_delay: Duration,
    /// Bytes of sent but unacknowledged batches kept for resending (default 32 MiB); beyond,
    /// spans are folded instead of batched.
    pub max_unacked_bytes: usize,
    /// Most (operation, status, window) histograms folded at once (default 4,096).
    pub max_fold_windows: usize,
    /// Most distinct operation names (default 2,000); more count as `__overflow__`.
    pub max_operations: usize,
    /// First reconnect delay bound (default 100 ms); doubles per failure.
    pub backoff_base: Duration,
    /// Largest reconnect delay bound (default 10 s).
    pub backoff_cap: Duration,
    /// Consecutive failures that open the circuit breaker (default 5).
    pub breaker_threshold: u32,
    /// How long the breaker stays open before a probe (default 15 s).
    pub breaker_open_for: Duration,
    /// Connect timeout (default 2 s).
    pub connect_timeout: Duration,
    /// Longest the stream may hold sent batches without any reply (default 5 s; the server
    /// acknowledges every flush, once a second by default). Beyond it the server is taken for
    /// hung — paused, or a half-open connection — and the stream counts as failed: the client
    /// reconnects, and the breaker opens if that keeps failing.
    pub ack_timeout: Duration,
    /// How often the exporter drains the queue (default 2 ms).
    pub poll_interval: Duration,
    /// Default deadline of [`Client::flush`] (default 10 s).
    pub flush_timeout: Duration,
    /// For an `https://` endpoint: a CA certificate (PEM) to trust besides the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// For mutual TLS: this client's certificate (PEM) and [`Config::tls_key_file`] its key.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The key of [`Config::tls_cert_file`] (PEM).
    pub tls_key_file: Option<std::path::PathBuf>,
    /// A bearer token sent with every stream (the server's `auth.ingest_token_files`).
    pub token: Option<String>,
    /// How long the exporter keeps flushing after the last handle is dropped without a
    /// [`Client::shutdown`] (default 2 s).
    pub drop_flush_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            endpoint: "http://127.0.0.1:4317".into(),
            service: "unknown_service".into(),
            queue_capacity: 65_536,
            max_batch_spans: 4_096,
            max_batch_delay: Duration::from_secs(1),
            max_unacked_bytes: 32 << 20,
            max_fold_windows: 4_096,
            max_operations: 2_000,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(10),
            breaker_threshold: 5,
            breaker_open_for: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(2),
            flush_timeout: Duration::from_secs(10),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            token: None,
            drop_flush_timeout: Duration::from_secs(2),
        }
    }
}

/// Builds a [`Client`].
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    config: Config,
}

impl ClientBuilder {
    /// The server's gRPC address, e.g. `http://127.0.0.1:4317`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.config.endpoint = endpoint.into();
        self
    }

    /// The `service` label of every span.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.config.service = service.into();
        self
    }

    /// Replaces the whole configuration (endpoint and service included).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Changes the configuration in place.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Starts the exporter thread and returns the client. Connecting happens in the
    /// background: a server that is down is not an error here.
    pub fn build(self) -> Result<Client, BuildError> {
        let config = self.config;
        let bad_endpoint =
            |message: String| BuildError::Endpoint { endpoint: config.endpoint.clone(), message };
        let uri: tonic::transport::Uri = config.endpoint.parse().map_err(|e| bad_endpoint(format!("{e}")))?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(bad_endpoint("expected http://host:port or https://host:port".into()));
        }
        if config.service.is_empty() || config.service.len() > MAX_OPERATION_BYTES {
            return Err(BuildError::Service(config.service));
        }
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(config.queue_capacity.max(1)),
            ops: Interner::new(config.max_operations),
            fold: Mutex::new(Folder::new(config.max_fold_windows)),
            counters: Counters::default(),
            anchor: Anchor::now(),
        });
        let tls = exporter::tls_config(&config)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let exporter = Exporter::new(shared.clone(), config.clone(), random_client_id(), tls);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new()
            .name("tailscope-exporter".into())
            .spawn(move || runtime.block_on(exporter.run(rx)))?;
        Ok(Client {
            inner: Arc::new(Handle { shared, commands: tx, thread: Mutex::new(Some(thread)), config }),
        })
    }
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    config: Config,
}

/// A handle to a tailscope exporter; cheap to clone, and shared by every thread that records.
///
/// Dropping the last handle without [`Client::shutdown`] lets the exporter flush for
/// `drop_flush_timeout` in the background, then stop.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Handle>,
}

/// What a client did, since it was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Spans recorded.
    pub recorded: u64,
    /// Spans put into batches in full.
    pub sent: u64,
    /// Spans (in full or folded) the server acknowledged as durable.
    pub acked: u64,
    /// Spans folded into histograms instead of being sent in full.
    pub folded: u64,
    /// Spans dropped because the queue was full and the fold histograms busy.
    pub dropped_queue_full: u64,
    /// Spans dropped because the fold histograms reached `max_fold_windows`.
    pub dropped_fold_full: u64,
    /// Spans in batches the server refused as malformed (never resent).
    pub dropped_rejected: u64,
    /// Spans still unacknowledged when the exporter stopped.
    pub dropped_unacked: u64,
    /// Spans the server reported it could not count (too old, …), on the current stream.
    pub server_rejected: u64,
    /// Reconnections after the first connection.
    pub reconnects: u64,
    /// Streams given up because no reply came within `ack_timeout`.
    pub ack_timeouts: u64,
    /// The circuit breaker's state.
    pub breaker: BreakerState,
    /// Whether a stream to the server is open.
    pub connected: bool,
    /// Bytes of batches kept for resending.
    pub unacked_bytes: u64,
}

impl Client {
    /// A builder with the defaults of [`Config`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Starts timing a span of `operation`; its duration is recorded when the guard drops.
    #[inline]
    pub fn start(&self, operation: &str) -> SpanGuard<'_> {
        self.start_kind(operation, SpanKind::Unspecified)
    }

    /// Like [`Client::start`], for a span of `kind`: [`SpanKind::Client`] for a call this
    /// service makes, which the server keeps apart from the service's own latency.
    #[inline]
    pub fn start_kind(&self, operation: &str, kind: SpanKind) -> SpanGuard<'_> {
        SpanGuard {
            client: self,
            op: self.inner.shared.ops.id_of(operation, kind),
            started: Instant::now(),
            ids: Ids::default(),
            status: Status::Ok,
            outgoing: kind.is_outgoing(),
        }
    }

    /// Records a span of `operation` that just ended after `duration`.
    #[inline]
    pub fn record(&self, operation: &str, duration: Duration, status: Status) {
        self.record_with(operation, duration, status, Ids::default());
    }

    /// Like [`Client::record`], for a span of `kind`.
    #[inline]
    pub fn record_kind(&self, operation: &str, kind: SpanKind, duration: Duration, status: Status) {
        let op = self.inner.shared.ops.id_of(operation, kind);
        self.record_op(op, duration, status, Ids::default(), 0);
    }

    /// Starts timing a call this service makes to `peer` — another service by its own
    /// `service` name, or an uninstrumented system such as `db:postgres` — as a
    /// [`SpanKind::Client`] span of `operation`. The server keeps it apart from the service's
    /// own latency and draws it as the edge from this service to `peer` of the service graph,
    /// with exact counts and latencies.
    #[inline]
    pub fn start_client(&self, operation: &str, peer: &str) -> SpanGuard<'_> {
        SpanGuard {
            client: self,
            op: self.inner.shared.ops.id_with_peer(operation, SpanKind::Client, peer),
            started: Instant::now(),
            ids: Ids::default(),
            status: Status::Ok,
            outgoing: true,
        }
    }

    /// Records a span of `operation` of `kind` whose other end is `peer` (see
    /// [`Client::start_client`]; for a [`SpanKind::Server`] span, the caller) that just ended
    /// after `duration`.
    #[inline]
    pub fn record_peer(
        &self,
        operation: &str,
        kind: SpanKind,
        peer: &str,
        duration: Duration,
        status: Status,
    ) {
        let op = self.inner.shared.ops.id_with_peer(operation, kind, peer);
        self.record_op(op, duration, status, Ids::default(), 0);
    }

    /// Records a request this service served for `caller` (empty: unknown) that just ended
    /// after `duration`, of which `own` was spent in its own code rather than waiting on the
    /// calls it made: its self time, which the server keeps as `span_self_seconds`. The tower
    /// layer measures it by itself; this is for spans timed elsewhere.
    #[inline]
    pub fn record_served(
        &self,
        operation: &str,
        caller: &str,
        duration: Duration,
        own: Duration,
        status: Status,
    ) {
        let op = self.inner.shared.ops.id_with_peer(operation, SpanKind::Server, caller);
        let nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
        let own = i64::try_from(own.as_nanos()).unwrap_or(i64::MAX).clamp(1, nanos.max(1));
        self.record_op(op, duration, status, Ids::default(), own);
    }

    /// Like [`Client::record`], with the span's trace context.
    #[inline]
    pub fn record_with(&self, operation: &str, duration: Duration, status: Status, ids: Ids) {
        let op = self.inner.shared.ops.id(operation);
        self.record_op(op, duration, status, ids, 0);
    }

    #[inline]
    fn record_op(&self, op: u32, duration: Duration, status: Status, ids: Ids, self_nanos: i64) {
        let end = self.inner.shared.anchor.unix_nanos(Instant::now());
        let nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
        self.offer(op, end.saturating_sub(nanos), nanos, status, ids, self_nanos);
    }

    /// Records a span of `operation` that started at `start` (wall-clock time) and took
    /// `duration`: for spans reported late, such as from a queue or a batch job.
    pub fn record_at(
        &self,
        operation: &str,
        start: std::time::SystemTime,
        duration: Duration,
        status: Status,
    ) {
        let op = self.inner.shared.ops.id(operation);
        let start = match start.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        };
        let nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
        self.offer(op, start, nanos, status, Ids::default(), 0);
    }

    /// Queues a span; `self_nanos` is its self time (0: unknown).
    #[inline]
    fn offer(&self, op: u32, start: i64, duration: i64, status: Status, ids: Ids, self_nanos: i64) {
        let (trace, parent) = match ids.trace_id {
            0 => match trace::TraceContext::current() {
                Some(current) => (current.trace_id, current.span_id),
                None => (u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(1..)), 0),
            },
            trace => (trace, ids.parent_span_id),
        };
        self.inner.shared.offer(Record {
            op,
            status: status.wire(),
            start,
            duration,
            trace_hi: (trace >> 64) as u64,
            trace_lo: trace as u64,
            span_id: if ids.span_id == 0 { fastrand::u64(1..) } else { ids.span_id },
            parent,
            self_ns: self_nanos,
        });
    }

    /// Records a span of operation id `op` that started at `start` (Unix nanoseconds) and took
    /// `duration` nanoseconds.
    #[inline]
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn record_op_at(&self, op: u32, start: i64, duration: i64, status: Status, ids: Ids) {
        self.offer(op, start, duration, status, ids, 0);
    }

    /// Records a span of `operation` that started at `started` and ends now.
    #[inline]
    pub fn record_since(&self, operation: &str, started: Instant, status: Status) {
        self.record_op_since(self.operation_id(operation, SpanKind::Unspecified), started, status);
    }

    #[inline]
    pub(crate) fn operation_id(&self, operation: &str, kind: SpanKind) -> u32 {
        self.inner.shared.ops.id_of(operation, kind)
    }

    #[cfg(feature = "tower")]
    #[inline]
    pub(crate) fn operation_id_with_peer(&self, operation: &str, kind: SpanKind, peer: &str) -> u32 {
        self.inner.shared.ops.id_with_peer(operation, kind, peer)
    }

    #[inline]
    pub(crate) fn record_op_since(&self, op: u32, started: Instant, status: Status) {
        self.record_op_since_ids(op, started, status, Ids::default(), Own::Unknown);
    }

    /// Records a span of operation id `op` that started at `started` and ends now.
    #[inline]
    pub(crate) fn record_op_since_ids(
        &self,
        op: u32,
        started: Instant,
        status: Status,
        ids: Ids,
        own: Own<'_>,
    ) {
        let start = self.inner.shared.anchor.unix_nanos(started);
        let nanos = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
        let self_nanos = match own {
            Own::Unknown => 0,
            Own::Call => {
                calls::note(start, nanos);
                0
            }
            Own::Made(calls) => calls.self_time(start, start.saturating_add(nanos)),
        };
        self.offer(op, start, nanos, status, ids, self_nanos);
    }

    /// Waits until everything recorded before this call is acknowledged by the server, or
    /// until the configured `flush_timeout`.
    pub async fn flush(&self) -> Result<(), ExportError> {
        self.flush_within(self.inner.config.flush_timeout).await
    }

    /// Like [`Client::flush`], with its own deadline.
    pub async fn flush_within(&self, timeout: Duration) -> Result<(), ExportError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        self.inner.commands.send(Command::Flush { deadline, reply }).map_err(|_| ExportError::Stopped)?;
        rx.await.unwrap_or(Err(ExportError::Stopped))
    }

    /// Flushes (until `timeout`), then stops the exporter. Spans recorded afterwards are
    /// counted as dropped.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), ExportError> {
        let result = self.stop(timeout).await;
        let thread = self.inner.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }

    /// Flushes (until `timeout`) and tells the exporter to stop, without waiting for its thread.
    pub(crate) async fn stop(&self, timeout: Duration) -> Result<(), ExportError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        self.inner
            .commands
            .send(Command::Shutdown { deadline, reply: Some(reply) })
            .map_err(|_| ExportError::Stopped)?;
        rx.await.unwrap_or(Err(ExportError::Stopped))
    }

    /// What the client did so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let queued = self.inner.shared.queue.len() as u64;
        let dropped_queue_full = get(&c.dropped[0]);
        let dropped_fold_full = get(&c.dropped[1]);
        let folded = get(&c.folded);
        Stats {
            recorded: get(&c.drained)
                + queued
                + get(&c.folded_on_overflow)
                + dropped_queue_full
                + dropped_fold_full,
            sent: get(&c.sent),
            acked: get(&c.acked),
            folded,
            dropped_queue_full,
            dropped_fold_full,
            dropped_rejected: get(&c.dropped[2]),
            dropped_unacked: get(&c.dropped[3]),
            server_rejected: get(&c.server_rejected),
            reconnects: get(&c.reconnects),
            ack_timeouts: get(&c.ack_timeouts),
            breaker: BreakerState::from_u8(c.breaker.load(Ordering::Relaxed)),
            connected: c.connected.load(Ordering::Relaxed),
            unacked_bytes: get(&c.unacked_bytes),
        }
    }

    /// The configuration the client runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let deadline = Instant::now() + self.config.drop_flush_timeout;
        let _ = self.commands.send(Command::Shutdown { deadline, reply: None });
    }
}

/// Times one span; records it when dropped.
#[derive(Debug)]
#[must_use = "the span is recorded when the guard drops; dropping it at once records ~0 s"]
pub struct SpanGuard<'a> {
    client: &'a Client,
    op: u32,
    started: Instant,
    ids: Ids,
    status: Status,
    /// A call this service makes: counted out of the self time of the request being served.
    outgoing: bool,
}

impl SpanGuard<'_> {
    /// Marks the span failed.
    pub fn error(&mut self) -> &mut Self {
        self.status = Status::Error;
        self
    }

    /// Sets the span's outcome.
    pub fn set_status(&mut self, status: Status) -> &mut Self {
        self.status = status;
        self
    }

    /// Attaches trace context.
    pub fn set_ids(&mut self, ids: Ids) -> &mut Self {
        self.ids = ids;
        self
    }
}

impl Drop for SpanGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let shared = &self.client.inner.shared;
        let start = shared.anchor.unix_nanos(self.started);
        let nanos = i64::try_from(self.started.elapsed().as_nanos()).unwrap_or(i64::MAX);
        if self.outgoing {
            calls::note(start, nanos);
        }
        self.client.offer(self.op, start, nanos, self.status, self.ids, 0);
    }
}

/// What a span recorded when it ends tells of self time.
#[cfg_attr(not(any(feature = "tower", feature = "tracing")), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Own<'a> {
    /// Nothing: its self time is unknown.
    Unknown,
    /// It is a call this service made: counted out of the self time of what is being served.
    Call,
    /// It made these calls: its self time is its duration minus their union.
    Made(&'a tailscope_proto::selftime::Calls),
}

/// Groups spans by `{service, operation, kind}` and numbers the batches it produces.
#[derive(Debug)]
pub struct BatchBuilder {
    client_id: u64,
    next_seq: u64,
    groups: tailscope_proto::batch::BatchBuilder<(String, String, i32, String)>,
}

impl BatchBuilder {
    /// A builder for client `client_id` (must not be 0), whose first batch gets seq 1.
    pub fn new(client_id: u64) -> BatchBuilder {
        BatchBuilder { client_id, next_seq: 1, groups: Default::default() }
    }

    /// Adds a span of series `{service, operation}` of unspecified kind.
    pub fn push(&mut self, service: &str, operation: &str, span: Span) {
        self.push_kind(service, operation, SpanKind::Unspecified, span);
    }

    /// Adds a span of series `{service, operation}` of `kind`.
    pub fn push_kind(&mut self, service: &str, operation: &str, kind: SpanKind, span: Span) {
        self.push_peer(service, operation, kind, "", span);
    }

    /// Adds a span of series `{service, operation}` of `kind` whose other end is `peer` (the
    /// service called, for a [`SpanKind::Client`] span; the caller, for a
    /// [`SpanKind::Server`] one; none when empty).
    pub fn push_peer(&mut self, service: &str, operation: &str, kind: SpanKind, peer: &str, span: Span) {
        let kind = kind as i32;
        let series = || SeriesKey {
            service: service.to_owned(),
            operation: operation.to_owned(),
            kind,
            peer: peer.to_owned(),
        };
        self.groups.push((service.to_owned(), operation.to_owned(), kind, peer.to_owned()), series, span);
    }

    /// Spans added since the last batch.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether no span was added since the last batch.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Takes the spans added so far as the next batch.
    pub fn finish(&mut self) -> SpanBatch {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.groups.finish(self.client_id, seq, Vec::new())
    }
}

/// A random, non-zero client id.
pub fn random_client_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_spans_by_series_and_numbers_batches() {
        let mut b = BatchBuilder::new(9);
        let span = Span { duration_nanos: 5, ..Span::default() };
        b.push("api", "GET /a", span);
        b.push("api", "GET /b", span);
        b.push("api", "GET /a", span);
        assert_eq!(b.len(), 3);
        let first = b.finish();
        assert_eq!((first.client_id, first.seq), (9, 1));
        assert_eq!(first.groups.len(), 2);
        assert_eq!(first.groups[0].spans.len(), 2);
        assert!(b.is_empty());
        assert_eq!(b.finish().seq, 2);
        assert_ne!(random_client_id(), 0);
    }
}
