//! Any bytes as an ingest message, the way the server takes them apart: the protobuf decode,
//! each span classified against the clock, each histogram delta decoded and re-encoded.
//! Never a panic or an unbounded allocation. The whole server path (validation, admission,
//! counting) is exercised by the bounded property run in `server/tests/malformed.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tailscope_proto::histogram::Histogram;
use tailscope_proto::v1::SpanBatch;
use tailscope_server::config::IngestConfig;
use tailscope_server::pipeline::SpanLimits;

const NOW: i64 = 1_800_000_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = SpanBatch::decode(data) else { return };
    let limits = SpanLimits::new(&IngestConfig::default());
    let mut accepted = 0u64;
    for group in &batch.groups {
        for span in &group.spans {
            if limits.classify(span.start_unix_nanos, span.duration_nanos, NOW).is_ok() {
                accepted = accepted.saturating_add(u64::from(span.weight.max(1)));
            }
        }
    }
    for delta in &batch.deltas {
        if let Ok(h) = Histogram::decode(&delta.histogram) {
            assert_eq!(Histogram::decode(&h.to_bytes()).expect("re-encoding decodes"), h);
            let _ = limits.window_of(delta.window_start_unix_seconds.saturating_mul(1_000_000_000), NOW);
            accepted = accepted.saturating_add(h.count());
        }
    }
    // What decodes re-encodes stably (bytes, since NaN adjusted counts are not equal to
    // themselves).
    let bytes = batch.encode_to_vec();
    assert_eq!(SpanBatch::decode(bytes.as_slice()).expect("re-encoded").encode_to_vec(), bytes);
    let _ = accepted;
});
