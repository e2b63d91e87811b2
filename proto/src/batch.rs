//! The one span grouper: spans gathered into the groups of a [`SpanBatch`], one group per
//! series, in the order each series was first seen. The client's batches, its exporter's and
//! the server's OTLP conversion all group through it; each keys the groups its own way (owned
//! names, an operation id, names borrowed from a request), so a series is looked up without
//! building its [`SeriesKey`] more than once per batch.

use std::collections::HashMap;
use std::hash::Hash;

use crate::v1::{HistogramDelta, SeriesGroup, SeriesKey, Span, SpanBatch};

/// Spans grouped by series key `K`. Keys may come from untrusted requests: the index is
/// hashed with a randomly seeded hasher (foldhash's), several times cheaper per span than the
/// standard SipHash and still not predictable from outside.
#[derive(Debug)]
pub struct BatchBuilder<K> {
    index: HashMap<K, usize, foldhash::fast::RandomState>,
    groups: Vec<SeriesGroup>,
    spans: usize,
}

impl<K> Default for BatchBuilder<K> {
    fn default() -> Self {
        BatchBuilder { index: HashMap::default(), groups: Vec::new(), spans: 0 }
    }
}

impl<K: Hash + Eq> BatchBuilder<K> {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `span` to the group of `key`; `series` names that group's series, and is called
    /// only when `key` is new to the batch.
    pub fn push(&mut self, key: K, series: impl FnOnce() -> SeriesKey, span: Span) {
        let groups = &mut self.groups;
        let i = *self.index.entry(key).or_insert_with(|| {
            groups.push(SeriesGroup { key: Some(series()), spans: Vec::with_capacity(8) });
            groups.len() - 1
        });
        self.groups[i].spans.push(span);
        self.spans += 1;
    }

    /// Spans added since the last [`BatchBuilder::take`].
    pub fn len(&self) -> usize {
        self.spans
    }

    /// Whether no span was added since the last [`BatchBuilder::take`].
    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Takes the groups built so far, leaving the builder empty.
    pub fn take(&mut self) -> Vec<SeriesGroup> {
        self.index.clear();
        self.spans = 0;
        std::mem::take(&mut self.groups)
    }

    /// Takes the groups built so far as batch `seq` of `client_id`, with `deltas`.
    pub fn finish(&mut self, client_id: u64, seq: u64, deltas: Vec<HistogramDelta>) -> SpanBatch {
        SpanBatch { client_id, seq, groups: self.take(), deltas }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service: &str, operation: &str) -> SeriesKey {
        SeriesKey { service: service.into(), operation: operation.into(), ..Default::default() }
    }

    fn span(start: i64) -> Span {
        Span { start_unix_nanos: start, duration_nanos: 1, ..Span::default() }
    }

    #[test]
    fn spans_group_by_key_in_first_seen_order_and_the_builder_starts_over() {
        let mut b = BatchBuilder::new();
        let mut named = 0;
        for (i, (s, o)) in
            [("a", "x"), ("b", "x"), ("a", "x"), ("a", "y"), ("b", "x")].into_iter().enumerate()
        {
            b.push(
                (s, o),
                || {
                    named += 1;
                    key(s, o)
                },
                span(i as i64),
            );
        }
        assert_eq!((b.len(), named), (5, 3), "a series is named once per batch");
        let batch = b.finish(7, 3, Vec::new());
        assert_eq!((batch.client_id, batch.seq), (7, 3));
        let got: Vec<(String, Vec<i64>)> = batch
            .groups
            .iter()
            .map(|g| {
                let k = g.key.as_ref().unwrap();
                (
                    format!("{}/{}", k.service, k.operation),
                    g.spans.iter().map(|s| s.start_unix_nanos).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("a/x".to_string(), vec![0, 2]), ("b/x".to_string(), vec![1, 4]), ("a/y".to_string(), vec![3])]
        );
        assert!(b.is_empty());
        b.push(("a", "x"), || key("a", "x"), span(9));
        assert_eq!(b.take().len(), 1, "the index starts over with the batch");
    }
}
