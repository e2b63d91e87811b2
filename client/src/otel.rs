//! An OpenTelemetry `SpanProcessor` that records every ended span into a [`Client`]: a Rust
//! service that already uses the OpenTelemetry SDK gets tailscope's exact folded histograms and
//! the server's sampling with one line, beside whatever exporters it has.
//!
//! ```no_run
//! # fn demo(client: tailscope::Client) {
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_span_processor(tailscope::otel::TailscopeSpanProcessor::new(client))
//!     .build();
//! # drop(provider);
//! # }
//! ```
//!
//! A span keeps its name (the operation), kind, start, end, status (`Error` fails it) and trace
//! context, so exemplars link to the same traces the SDK's exporters send elsewhere. A CLIENT
//! or PRODUCER span names its callee — the edge of the service graph — by the attributes the
//! server reads from OTLP, the first of `peer.service`/`service.peer.name`,
//! `db.system.name`/`db.system` (`db:<system>`), `messaging.system` (`mq:<system>`),
//! `server.address`/`net.peer.name`.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::trace::{SpanKind as OtelKind, Status as OtelStatus};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use tailscope_proto::peer::Peer;

use crate::{Client, ExportError, Ids, SpanKind, Status};

/// Records ended OpenTelemetry spans into a [`Client`].
#[derive(Debug, Clone)]
pub struct TailscopeSpanProcessor {
    client: Client,
}

impl TailscopeSpanProcessor {
    /// A processor recording into `client`.
    pub fn new(client: Client) -> TailscopeSpanProcessor {
        TailscopeSpanProcessor { client }
    }
}

fn nanos(t: std::time::SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn kind(k: &OtelKind) -> SpanKind {
    match k {
        OtelKind::Client => SpanKind::Client,
        OtelKind::Server => SpanKind::Server,
        OtelKind::Producer => SpanKind::Producer,
        OtelKind::Consumer => SpanKind::Consumer,
        OtelKind::Internal => SpanKind::Internal,
    }
}

/// The callee a CLIENT or PRODUCER span's semantic-convention attributes name, if any, by
/// the server's own ranking ([`Peer`]).
fn peer(span: &SpanData) -> Option<Cow<'_, str>> {
    if !matches!(span.span_kind, OtelKind::Client | OtelKind::Producer) {
        return None;
    }
    let mut peer = Peer::default();
    for kv in &span.attributes {
        if let opentelemetry::Value::String(value) = &kv.value {
            peer.offer(kv.key.as_str(), value.as_str());
        }
    }
    peer.key().map(|(prefix, name)| match prefix {
        "" => Cow::Borrowed(name),
        _ => Cow::Owned([prefix, name].concat()),
    })
}

impl SpanProcessor for TailscopeSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        let peer = peer(&span);
        let op = self.client.operation_id_with_peer(
            &span.name,
            kind(&span.span_kind),
            peer.as_deref().unwrap_or(""),
        );
        let start = nanos(span.start_time);
        let duration = nanos(span.end_time).saturating_sub(start);
        let status = match span.status {
            OtelStatus::Error { .. } => Status::Error,
            _ => Status::Ok,
        };
        let ids = Ids {
            trace_id: u128::from_be_bytes(span.span_context.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(span.span_context.span_id().to_bytes()),
            parent_span_id: u64::from_be_bytes(span.parent_span_id.to_bytes()),
        };
        self.client.record_op_at(op, start, duration, status, ids);
    }

    /// Blocks the calling thread until what was recorded is acknowledged by the server, or the
    /// client's `flush_timeout` passes.
    fn force_flush(&self) -> OTelSdkResult {
        let timeout = self.client.config().flush_timeout;
        block_on(self.client.flush_within(timeout)).map_err(|e| sdk_error(e, timeout))
    }

    /// Flushes (blocking, until `timeout`) and stops the client's exporter.
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        block_on(self.client.stop(timeout)).map_err(|e| sdk_error(e, timeout))
    }
}

fn sdk_error(e: ExportError, timeout: Duration) -> OTelSdkError {
    match e {
        ExportError::Stopped => OTelSdkError::AlreadyShutdown,
        ExportError::Timeout { unacked } => {
            OTelSdkError::InternalFailure(format!("{unacked} spans not acknowledged within {timeout:?}"))
        }
    }
}

/// Runs `f` to completion on this thread (the exporter runs on its own thread, so waiting for
/// its answer needs no runtime).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
