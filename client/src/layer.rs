//! A `tracing_subscriber::Layer` that records the duration of every closed `tracing` span —
//! from creation to close, awaits included — under the span's name.
//!
//! A span counts as failed when it has an `error` field (`true`, or any non-boolean value), when
//! it is at `ERROR` level, or when an `ERROR` event happens inside it.
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

use crate::{Client, Status};

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
}

/// Sets `error` from a field named `error`.
struct ErrorField<'a>(&'a mut bool);

impl Visit for ErrorField<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "error" {
            *self.0 = value;
        }
    }

    fn record_debug(&mut self, field: &Field, _value: &dyn std::fmt::Debug) {
        if field.name() == "error" {
            *self.0 = true;
        }
    }
}

impl<S> Layer<S> for TailscopeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut error = *attrs.metadata().level() == Level::ERROR;
        attrs.record(&mut ErrorField(&mut error));
        span.extensions_mut().insert(Timing { started: Instant::now(), error });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(t) = extensions.get_mut::<Timing>() {
            values.record(&mut ErrorField(&mut t.error));
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
        self.client.record_since(span.name(), t.started, status);
    }
}
