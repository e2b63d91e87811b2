//! Any query text, parsed and evaluated over a small in-memory data set: never a panic, and
//! never a stack overflow. Inputs starting with `#!` are read as a recipe for a deeply nested
//! expression (each further byte picks a wrapper around what was built so far, up to
//! thousands deep), which a fuzzer would otherwise need thousands of typed brackets to reach.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tailscope_proto::histogram::Layout;
use tailscope_server::query::promql::{Engine, Limits, Steps};
use tailscope_server::series::{SeriesLabels, Status};
use tailscope_server::store::{MemoryStore, RetentionConfig};

const NOW: i64 = 1_800_000_000;

/// Three series with a span every 10 s over the last hour, built once.
fn data() -> &'static MemoryStore {
    static DATA: std::sync::OnceLock<MemoryStore> = std::sync::OnceLock::new();
    DATA.get_or_init(|| {
        let labels = |s: &str, o: &str, st| SeriesLabels { service: s.into(), operation: o.into(), status: st };
        let mut mem = MemoryStore::new(Layout::default());
        for l in [labels("a", "x", Status::Ok), labels("a", "y", Status::Error), labels("b", "x", Status::Ok)] {
            let nanos = l.id() % 1_000_000_000 + 1_000;
            for t in (NOW - 3600..NOW).step_by(10) {
                mem.record(l.clone(), t, nanos, 3);
            }
        }
        mem
    })
}

fuzz_target!(|data: &[u8]| {
    // promql-parser panics on numbers too large for a `Duration` (`x[1e90]`, found here); the
    // server contains that in `promql::parse`. libfuzzer-sys installs a hook that aborts at
    // any panic, before `catch_unwind` could contain it, so the default hook is put back: a
    // panic that escapes the target still aborts (libfuzzer-sys checks for it), one that
    // `promql::parse` contains no longer does.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let owned;
    let text = match data.strip_prefix(b"#!") {
        Some(recipe) => {
            owned = nested(recipe);
            owned.as_str()
        }
        None => match std::str::from_utf8(data) {
            Ok(t) => t,
            Err(_) => return,
        },
    };
    let Ok(expr) = tailscope_server::query::promql::parse(text) else { return };
    let mem = data();
    let retention = RetentionConfig::default();
    let limits = Limits {
        max_series: 100,
        max_points: 100,
        max_samples: 10_000,
        deadline: Instant::now() + Duration::from_secs(1),
    };
    for steps in [Steps::instant(NOW * 1000), Steps::range((NOW - 600) * 1000, NOW * 1000, 60_000, 100).expect("steps")] {
        let engine = Engine::new(mem, &steps, NOW, &retention, limits);
        if let Ok(v) = engine.eval(&expr) {
            let _ = engine.materialized(v);
        }
    }
});

/// A nested expression: each byte wraps what was built so far (a byte repeated up to 64 times
/// by its high bits), so short inputs reach thousands of levels.
fn nested(recipe: &[u8]) -> String {
    const WRAPS: [&str; 8] = [
        "sum({})",
        "({})",
        "-{}",
        "{} + 1",
        "1 * {}",
        "histogram_quantile(0.9, {})",
        "rate(span_duration_seconds_bucket[5m]) and {}",
        "{} or vector(1)",
    ];
    let mut q = String::from("rate(span_duration_seconds_count[1m])");
    for &b in recipe {
        for _ in 0..=(b >> 3) {
            q = WRAPS[usize::from(b & 7)].replace("{}", &q);
            if q.len() > 200_000 {
                return q;
            }
        }
    }
    q
}
