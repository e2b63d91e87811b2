//! The cost of recording one span on the caller's thread: tailscope's `record` and guard, next
//! to the OpenTelemetry Rust SDK (a span started and ended, with a batch span processor and an
//! exporter that discards), in the same run. No server runs: tailscope's exporter folds what it
//! drains, as it does while a server is unreachable.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::Criterion;
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};
use tailscope::{Client, Status};

#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

fn main() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let client = Client::builder().endpoint(format!("http://{closed}")).service("bench").build().unwrap();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(Discard).build())
        .build();
    let tracer = provider.tracer("bench");

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("record one span");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("tailscope record()", |b| {
        b.iter(|| client.record("GET /users/{id}", Duration::from_micros(1_234), Status::Ok))
    });
    g.bench_function("tailscope start() + drop", |b| b.iter(|| drop(client.start("GET /users/{id}"))));
    g.bench_function("opentelemetry-sdk start + end (batch processor)", |b| {
        b.iter(|| {
            let mut span = tracer.start("GET /users/{id}");
            span.end();
        })
    });
    g.finish();
    c.final_summary();
    let s = client.stats();
    println!(
        "tailscope: recorded {} folded {} dropped (queue full, fold busy) {}",
        s.recorded, s.folded, s.dropped_queue_full
    );
    let _ = provider.shutdown();
}
