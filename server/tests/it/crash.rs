//! A server killed with SIGKILL while a client streams: after a restart nothing acknowledged is
//! lost, and after the client resends what was not acknowledged, every span counts exactly once.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;

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
    let (mut child, grpc, _) = spawn_server(dir.path(), &[]);

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
    // A burst that is not waited for, then SIGKILL right away: these are in flight.
    while sent < BATCHES / 2 {
        sent += 1;
        s.send(make_batch(sent, now)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acked = s.acked;
    drop(s);
    eprintln!("killed with {sent} batches sent, {acked} acknowledged");

    let (mut child, grpc, http) = spawn_server(dir.path(), &[]);
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
