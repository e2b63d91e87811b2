//! tailscope's wire contract: the gRPC ingest protocol (`tailscope.v1`) and the histogram
//! encoding shared by the server, the client crate and anything else that sends deltas, and
//! the one span grouper that builds batches ([`batch::BatchBuilder`]).

pub mod batch;
pub mod codec;
pub mod histogram;
pub mod peer;
pub mod selftime;

/// Generated types and gRPC stubs of `tailscope/v1/ingest.proto`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("tailscope.v1");
}

impl v1::SpanKind {
    /// Whether spans of this kind time what a service asks of others (CLIENT calls, PRODUCER
    /// messages) rather than its own work.
    pub fn is_outgoing(self) -> bool {
        matches!(self, v1::SpanKind::Client | v1::SpanKind::Producer)
    }
}

/// The width of a histogram window at the base resolution, in seconds.
pub const BASE_WINDOW_SECONDS: i64 = 10;
