//! A server killed with SIGKILL while a client streams: after a restart nothing acknowledged is
//! lost, and after the client resends what was not acknowledged, every span counts exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Starts `tailscope-server` as a child process on ephemeral ports; returns it with its addresses.
fn spawn_server(dir: &Path) -> (Child, SocketAddr, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailscope-server"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(dir)
        .env("TAILSCOPE_INGEST_FLUSH_INTERVAL", "100ms")
        .env("TAILSCOPE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn tailscope-server");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let started = loop {
        let line = lines.next().expect("server exited before starting").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "tailscope started" {
            break v;
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let addr = |k: &str| started["fields"][k].as_str().unwrap().parse().unwrap();
    (child, addr("grpc_addr"), addr("http_addr"))
}

const SPANS_PER_BATCH: u64 = 100;
const BATCHES: u64 = 300;

fn make_batch(seq: u64, now: i64) -> tailscope_proto::v1::SpanBatch {
    let spans =
        (0..SPANS_PER_BATCH).map(|i| span(now - (i as i64) * 1_000, 1_000_000 + i as i64, false)).collect();
    batch(0xC0FFEE, seq, vec![group("crashy", "op", spans)])
}

async fn count(http: SocketAddr) -> u64 {
    tail(http, "service=crashy").await.first().map_or(0, |r| r["count"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_nanos();
    let (mut child, grpc, _) = spawn_server(dir.path());

    // Stream batches steadily; kill the server once a good part of them is acknowledged.
    let mut s = open(grpc).await;
    let mut sent = 0;
    while s.acked < BATCHES / 3 {
        if sent < BATCHES {
            sent += 1;
            if s.tx.send(make_batch(sent, now)).await.is_err() {
                break;
            }
        }
        if let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_millis(2), s.replies.message()).await {
            s.acked = s.acked.max(r.durable_seq);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acked = s.acked;
    drop(s);
    assert!(acked < sent || sent == BATCHES, "some batches should be in flight at the kill");

    let (mut child, grpc, http) = spawn_server(dir.path());
    let after_restart = count(http).await;
    assert!(
        after_restart >= acked * SPANS_PER_BATCH,
        "acked spans lost: {after_restart} < {}",
        acked * SPANS_PER_BATCH
    );
    assert!(after_restart <= sent * SPANS_PER_BATCH, "more spans than were sent: {after_restart}");

    // The client resends everything it has no ack for, and then the rest.
    let mut s = open(grpc).await;
    for seq in acked + 1..=BATCHES {
        s.send(make_batch(seq, now)).await;
    }
    s.wait_acked(BATCHES).await;
    assert_eq!(count(http).await, BATCHES * SPANS_PER_BATCH, "every span exactly once");
    child.kill().unwrap();
    child.wait().unwrap();
}
