//! Overload: raw senders that ignore sampling offer more full spans than a deliberately small
//! server (one shard, two-slot queue) takes, for 60 s, as fast as it acknowledges them, 256
//! batches in flight each. The server pushes back (HTTP/2 flow control, then RESOURCE_EXHAUSTED
//! after its admission patience; the senders resend), keeps answering queries, stays within its
//! memory bound, counts every accepted span exactly once, shrinks its sampling budget while
//! overloaded and restores it within a minute after the burst.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::*;
use tailscope_proto::v1::SeriesGroup;

const BUDGET: f64 = 10_000.0;

/// Sends batches of `groups` as fast as the server takes them until `until`, at most 256 in
/// flight, resending everything unacknowledged on a new stream after a refusal. Returns the
/// spans acknowledged and the batches refused.
async fn burst(
    addr: std::net::SocketAddr,
    client_id: u64,
    groups: Vec<SeriesGroup>,
    until: Instant,
) -> (u64, u64) {
    let per_batch: u64 = groups.iter().map(|g| g.spans.len() as u64).sum();
    let (mut next, mut acked_spans, mut refusals) = (1u64, 0u64, 0u64);
    let mut unacked: VecDeque<u64> = VecDeque::new();
    loop {
        let mut s = open(addr).await;
        let mut ok = true;
        for &seq in &unacked {
            if s.tx.send(batch(client_id, seq, groups.clone())).await.is_err() {
                ok = false;
                break;
            }
        }
        while ok {
            let sending = Instant::now() < until && unacked.len() < 256;
            if !sending && unacked.is_empty() {
                return (acked_spans, refusals);
            }
            tokio::select! {
                sent = s.tx.send(batch(client_id, next, groups.clone())), if sending => {
                    if sent.is_err() {
                        ok = false;
                    } else {
                        unacked.push_back(next);
                        next += 1;
                    }
                }
                reply = tokio::time::timeout(Duration::from_secs(30), s.replies.message()) => match reply {
                    Ok(Ok(Some(r))) => {
                        while unacked.front().is_some_and(|&q| q <= r.durable_seq) {
                            unacked.pop_front();
                            acked_spans += per_batch;
                        }
                    }
                    Ok(Err(status)) => {
                        assert!(
                            matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable),
                            "{status}"
                        );
                        refusals += 1;
                        ok = false;
                    }
                    Ok(Ok(None)) | Err(_) => ok = false,
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

async fn effective_budget(http: std::net::SocketAddr) -> f64 {
    get_json(http, "/api/v1/sampling").await["data"]["effective_budget"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_overload_is_survived_and_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let budget = BUDGET.to_string();
    let (mut child, grpc, http) = spawn_server(
        dir.path(),
        &[
            ("TAILSCOPE_INGEST_SHARDS", "1"),
            ("TAILSCOPE_INGEST_QUEUE_CAPACITY", "2"),
            ("TAILSCOPE_SAMPLING_BUDGET", budget.as_str()),
            ("TAILSCOPE_SAMPLING_INTERVAL", "200ms"),
        ],
    );
    let now = now_nanos();
    // 500 operations of 2 spans per batch: cheap to send, costly to ingest (every group is a
    // series lookup, a sampler key and an exemplar set), so the senders outrun the server.
    let groups: Vec<SeriesGroup> = (0..500)
        .map(|g| {
            group(
                "burst",
                &format!("op{g}"),
                (0..2).map(|i| span(now - i * 1_000_000, 1_000_000 * (1 + g % 50), false)).collect(),
            )
        })
        .collect();
    let seconds = std::env::var("OVERLOAD_TEST_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let until = Instant::now() + Duration::from_secs(seconds);
    let senders: Vec<_> = (1..=4u64).map(|c| tokio::spawn(burst(grpc, c, groups.clone(), until))).collect();

    // Meanwhile the server answers queries, and its budget shrinks.
    let (mut slowest, mut queries, mut lowest_budget) = (Duration::ZERO, 0, BUDGET);
    while Instant::now() < until {
        let t = Instant::now();
        let v = get_json(http, "/api/v1/query?query=sum(rate(span_duration_seconds_count%5B1m%5D))").await;
        assert_eq!(v["status"], "success", "{v}");
        slowest = slowest.max(t.elapsed());
        queries += 1;
        lowest_budget = lowest_budget.min(effective_budget(http).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (mut acked, mut refusals) = (0, 0);
    for s in senders {
        let (a, r) = s.await.unwrap();
        acked += a;
        refusals += r;
    }
    let burst_end = Instant::now();
    let rows = tail(http, "service=burst").await;
    let counted: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, acked, "every acknowledged span exactly once");
    // Saturated: the shard queue stayed above its high-water mark, so the budget was cut
    // (HTTP/2 flow control and admission patience absorb the rest; refusals are counted).
    assert!(lowest_budget < BUDGET / 2.0, "the server was never overloaded: lowest budget {lowest_budget}");
    assert!(slowest < Duration::from_secs(5), "a query took {slowest:?}");
    let peak = peak_rss_bytes(child.id());
    assert!(peak < 512 << 20, "peak RSS {peak} bytes");
    // Recovery: the full budget is back within a minute.
    let mut recovered = None;
    while burst_end.elapsed() < Duration::from_secs(60) {
        if effective_budget(http).await >= BUDGET {
            recovered = Some(burst_end.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = recovered.expect("the budget did not recover within a minute");
    println!(
        "overload: {acked} spans acknowledged, {refusals} refusals, {queries} queries (slowest {slowest:?}), \
         lowest budget {lowest_budget}, recovered {recovered:?} after the burst, peak RSS {} MiB",
        peak >> 20
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
