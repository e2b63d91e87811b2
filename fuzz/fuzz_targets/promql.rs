//! Any query text, parsed and evaluated over a small in-memory data set: never a panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_server::config::RetentionConfig;
use tailscope_server::query::promql::{Engine, Limits, Source, Steps, WindowFn};
use tailscope_server::series::{SeriesLabels, Status};
use tailscope_server::store::{Resolution, StoreError};

const NOW: i64 = 1_800_000_000;

struct Mem(Vec<(u64, SeriesLabels)>);

impl Source for Mem {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        Ok(self.0.clone())
    }

    fn windows(
        &self,
        res: Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut WindowFn<'_>,
    ) -> Result<(), StoreError> {
        let mut w = res.align(start.max(NOW - 3600));
        while w < end.min(NOW) {
            let mut h = Histogram::new(Layout::default());
            h.record(series % 1_000_000_000 + 1_000, 3);
            f(w, &h.to_bytes()).map_err(|e| StoreError::Corrupt { what: "histogram", message: e.to_string() })?;
            w += res.seconds();
        }
        Ok(())
    }

    fn layout(&self) -> Layout {
        Layout::default()
    }
}

fuzz_target!(|data: &[u8]| {
    // promql-parser panics on numbers too large for a `Duration` (`x[1e90]`, found here); the
    // server contains that in `promql::parse`. libfuzzer-sys installs a hook that aborts at
    // any panic, before `catch_unwind` could contain it, so the default hook is put back: a
    // panic that escapes the target still aborts (libfuzzer-sys checks for it), one that
    // `promql::parse` contains no longer does.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(expr) = tailscope_server::query::promql::parse(text) else { return };
    let labels = |s: &str, o: &str, st| SeriesLabels { service: s.into(), operation: o.into(), status: st };
    let mem = Mem(
        [labels("a", "x", Status::Ok), labels("a", "y", Status::Error), labels("b", "x", Status::Ok)]
            .into_iter()
            .map(|l| (l.id(), l))
            .collect(),
    );
    let retention = RetentionConfig::default();
    let limits = Limits { max_series: 100, max_points: 100, deadline: Instant::now() + Duration::from_secs(1) };
    for steps in [Steps::instant(NOW * 1000), Steps::range((NOW - 600) * 1000, NOW * 1000, 60_000, 100).expect("steps")] {
        let engine = Engine::new(&mem, &steps, NOW, &retention, limits);
        if let Ok(v) = engine.eval(&expr) {
            let _ = engine.materialized(v);
        }
    }
});
