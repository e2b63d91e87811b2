//! tailscope client library.
//!
//! This release provides [`BatchBuilder`], which groups spans by series into the wire format of
//! `tailscope.v1.Ingest/Stream` and numbers batches for idempotent delivery. The background
//! exporter (batching by time, resend after reconnect, circuit breaker, histogram folding) is
//! built on it.

use std::collections::HashMap;

pub use tailscope_proto as proto;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, Span, SpanBatch};

/// Groups spans by `{service, operation}` and numbers the batches it produces.
#[derive(Debug)]
pub struct BatchBuilder {
    client_id: u64,
    next_seq: u64,
    index: HashMap<(String, String), usize>,
    groups: Vec<SeriesGroup>,
    spans: usize,
}

impl BatchBuilder {
    /// A builder for client `client_id` (must not be 0), whose first batch gets seq 1.
    pub fn new(client_id: u64) -> BatchBuilder {
        BatchBuilder { client_id, next_seq: 1, index: HashMap::new(), groups: Vec::new(), spans: 0 }
    }

    /// Adds a span of series `{service, operation}`.
    pub fn push(&mut self, service: &str, operation: &str, span: Span) {
        let groups = &mut self.groups;
        let i = *self.index.entry((service.to_owned(), operation.to_owned())).or_insert_with(|| {
            groups.push(SeriesGroup {
                key: Some(SeriesKey { service: service.to_owned(), operation: operation.to_owned() }),
                spans: Vec::new(),
            });
            groups.len() - 1
        });
        self.groups[i].spans.push(span);
        self.spans += 1;
    }

    /// Spans added since the last batch.
    pub fn len(&self) -> usize {
        self.spans
    }

    /// Whether no span was added since the last batch.
    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Takes the spans added so far as the next batch.
    pub fn finish(&mut self) -> SpanBatch {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index.clear();
        self.spans = 0;
        SpanBatch {
            client_id: self.client_id,
            seq,
            groups: std::mem::take(&mut self.groups),
            deltas: Vec::new(),
        }
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
