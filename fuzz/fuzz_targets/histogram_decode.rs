//! Any bytes as an encoded histogram: decoded or refused, never a panic or an unbounded
//! allocation; whatever decodes re-encodes to an equal histogram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailscope_proto::histogram::{Histogram, Layout};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Histogram::decode(data) {
        let again = Histogram::decode(&h.to_bytes()).expect("re-encoding decodes");
        assert_eq!(again, h);
        let _ = h.quantile(0.99);
        let mut target = Histogram::new(Layout::default());
        target.merge_encoded(data).expect("valid once, valid twice");
    }
});
