//! A `tracing_subscriber::Layer` that records the duration of every closed `tracing` span —
//! from creation to close, awaits included — under the span's name.
//!
//! A span counts as failed when it has an `error` field (`true`, or any non-boolean value), when
//! it is at `ERROR` level, or when an `ERROR` event happens inside it. Its kind is its
//! `otel.kind` field (`server`, `client`, `producer`, `consumer`, `internal`; as
//! `tracing-opentelemetry` reads it), else unspecified.
//!
//! Trace context: a span is in its parent span's trace; a span without one is in the trace its
//! `traceparent` field names (a W3C header value, e.g. from the incoming request), else in the
//! current one ([`TraceContext::current`], e.g. the request the tower layer is serving), else in
//! a new trace. While a span is entered its context is current, so spans recorded inside it by
//! hand or by the tower client layer are its children.
//!
//! ```no_run
//! use tracing_subscriber::prelude::*;
//! # fn demo(client: tailscope::Client) {
//! tracing_subscriber::registry().with(tailscope::layer::TailscopeLayer::new(client)).init();
//! # }
//! ```

use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::trace::{Entered, TraceContext};
use tailscope_proto::selftime::Calls;

use crate::{Client, Own, SpanKind, Status};

/// Records `tracing` spans into a [`Client`].
#[derive(Debug, Clone)]
pub struct TailscopeLayer {
    client: Client,
}

impl TailscopeLayer {
    /// A layer recording into `client`.
    pub fn new(client: Client) -> TailscopeLayer {
        TailscopeLayer { client }
    }
}

struct Timing {
    started: Instant,
    error: bool,
    kind: SpanKind,
    ctx: TraceContext,
    parent: Option<TraceContext>,
    /// What was current before each entry of this span still open, innermost last.
    entered: Vec<Entered>,
    /// The calls made while the span was entered (for a span of the service's own work).
    calls: Calls,
    /// The open call sets the span's entries replaced, restored as it exits.
    outer: Vec<Option<Calls>>,
}

/// Reads the fields the layer cares about: `error`, `otel.kind` and `traceparent`.
#[derive(Default)]
struct Fields {
    error: Option<bool>,
    kind: Option<SpanKind>,
    traceparent: Option<TraceContext>,
}

impl Visit for Fields {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "error" {
            self.error = Some(value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "otel.kind" => self.kind = kind_named(value),
            "traceparent" => self.traceparent = TraceContext::parse(value),
            "error" => self.error = Some(true),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "error" => self.error = Some(true),
            "otel.kind" => self.kind = kind_named(format!("{value:?}").trim_matches('"')),
            "traceparent" => self.traceparent = TraceContext::parse(format!("{value:?}").trim_matches('"')),
            _ => {}
        }
    }
}

fn kind_named(name: &str) -> Option<SpanKind> {
    Some(match name.to_ascii_lowercase().as_str() {
        "server" => SpanKind::Server,
        "client" => SpanKind::Client,
        "producer" => SpanKind::Producer,
        "consumer" => SpanKind::Consumer,
        "internal" => SpanKind::Internal,
        _ => return None,
    })
}

impl<S> Layer<S> for TailscopeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let error = fields.error.unwrap_or(false) || *attrs.metadata().level() == Level::ERROR;
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Timing>().map(|t| t.ctx))
            .or(fields.traceparent)
            .or_else(TraceContext::current);
        let ctx = parent.map_or_else(TraceContext::root, |p| p.child(0));
        span.extensions_mut().insert(Timing {
            started: Instant::now(),
            error,
            kind: fields.kind.unwrap_or(SpanKind::Unspecified),
            ctx,
            parent,
            entered: Vec::new(),
            calls: Calls::new(),
            outer: Vec::new(),
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(t) = extensions.get_mut::<Timing>() {
            let mut fields = Fields::default();
            values.record(&mut fields);
            t.error = fields.error.unwrap_or(t.error);
            t.kind = fields.kind.unwrap_or(t.kind);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(t) = extensions.get_mut::<Timing>() {
            t.entered.push(TraceContext::enter(t.ctx));
            if !t.kind.is_outgoing() {
                t.outer.push(crate::calls::enter(t.calls));
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(t) = extensions.get_mut::<Timing>() {
            drop(t.entered.pop());
            if let Some(before) = t.outer.pop() {
                t.calls = crate::calls::leave(before);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() != Level::ERROR {
            return;
        }
        if let Some(span) = ctx.event_span(event) {
            let mut extensions = span.extensions_mut();
            if let Some(t) = extensions.get_mut::<Timing>() {
                t.error = true;
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let extensions = span.extensions();
        let Some(t) = extensions.get::<Timing>() else { return };
        let status = if t.error { Status::Error } else { Status::Ok };
        let op = self.client.operation_id(span.name(), t.kind);
        let own = if t.kind.is_outgoing() { Own::Call } else { Own::Made(&t.calls) };
        self.client.record_op_since_ids(op, t.started, status, t.ctx.ids(t.parent.as_ref()), own);
    }
}
