//! Chaos: the server process paused with SIGSTOP under load (a hung server, not a dead one),
//! then resumed. The host keeps recording, the client notices (ack timeout), its breaker opens
//! and it folds, its memory stays bounded, and after SIGCONT every span recorded is counted
//! exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tailscope::{Client, Status};

/// How long the server stays stopped (`CHAOS_PAUSE_SECONDS`, default the 30 s).
fn pause_seconds() -> u64 {
    std::env::var("CHAOS_PAUSE_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_loses_nothing_and_does_not_stall_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, http) = spawn_server(dir.path(), &[]);
    let child = Peer(child);
    let pid = child.0.id().to_string();
    let client = Client::builder().endpoint(format!("http://{grpc}")).service("chaos").build().unwrap();

    // The host: 5,000 spans a second, on its own thread, timing every record call.
    let host = {
        let client = client.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut recorded, mut slowest) = (0u64, Duration::ZERO);
            let started = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * 5000.0) as u64;
                while recorded < due {
                    let t = Instant::now();
                    client.record("POST /pay", Duration::from_millis(20 + recorded % 30), Status::Ok);
                    slowest = slowest.max(t.elapsed());
                    recorded += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (recorded, slowest)
        });
        (stop, thread)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // TCP stays up (the kernel still completes handshakes), so only the client's ack timeout
    // can tell the server is hung; then reconnects time out and the breaker opens.
    let paused = Instant::now();
    let mut opened_after = None;
    while paused.elapsed() < Duration::from_secs(pause_seconds()) {
        if opened_after.is_none() && client.stats().breaker == tailscope::BreakerState::Open {
            opened_after = Some(paused.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = client.stats();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    host.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let (recorded, slowest) = host.1.join().unwrap();
    client.flush_within(Duration::from_secs(60)).await.unwrap();
    let stats = client.stats();
    eprintln!(
        "paused {} s: breaker open after {opened_after:?}; {recorded} spans recorded, slowest record call {slowest:?}; while paused: acked {}, unacked bytes {}, folded {}; after: {stats:?}",
        pause_seconds(),
        during.acked,
        during.unacked_bytes,
        during.folded
    );
    assert!(opened_after.is_some(), "the breaker never opened while the server was paused: {during:?}");
    assert!(during.ack_timeouts >= 1 && during.folded > 0, "{during:?}");
    assert_eq!(stats.recorded, recorded);
    assert_eq!(stats.acked, recorded, "everything acknowledged after SIGCONT");
    let dropped =
        stats.dropped_queue_full + stats.dropped_fold_full + stats.dropped_rejected + stats.dropped_unacked;
    assert_eq!(dropped, 0);
    // The client kept what it could not send within its bound (32 MiB by default).
    assert!(during.unacked_bytes <= 32 << 20);
    let rows = tail(http, "service=chaos").await;
    let counted: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, recorded, "counted exactly once: {rows:?}");
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}
