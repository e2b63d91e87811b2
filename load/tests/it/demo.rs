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
    // The spike in payments pages for payments, grouped by alert and service. Which of the
    // shipped page rules crosses first (the p99 rule or the SLO burn rate) depends on how the
    // few seconds of the phase fall on a busy machine; either is the page the demo promises.
    assert!(
        received.iter().any(|b| b["receiver"] == "pager"
            && b["groupLabels"]["service"] == "payments"
            && b["groupLabels"].as_object().is_some_and(|g| g.contains_key("alertname"))),
        "{text}"
    );
    assert!(text.contains("grouped notifications received"), "{text}");
}
