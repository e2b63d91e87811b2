//! `tailscope-load demo`, headless with a short schedule: it runs to completion and shows
//! grouped alerts.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use tailscope_load::demo::{demo, DemoArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_headless_and_shows_grouped_alerts() {
    let out = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let args = DemoArgs { phase_seconds: 9, rate: 300.0, rules: None };
    let received = demo(&args, out.clone(), false).await.unwrap();
    let text = String::from_utf8(out.lock().await.clone()).unwrap();
    eprintln!("{text}");
    assert!(
        text.contains("== Steady") && text.contains("== LatencySpike") && text.contains("== Cascade"),
        "{text}"
    );
    assert!(text.contains("p99 (last 10 s): frontend"), "{text}");
    assert!(text.contains(">> ALERT to pager [firing]"), "{text}");
    // The spike in payments pages for payments (grouped by alert and service).
    assert!(
        received.iter().any(|b| b["groupLabels"]["service"] == "payments"
            && b["groupLabels"]["alertname"] == "HighP99Latency"),
        "{text}"
    );
    assert!(text.contains("grouped notifications received"), "{text}");
}
