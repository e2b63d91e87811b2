//! The exporter against a scripted in-process ingest server: batching by size and time, seq
//! numbering, resending in order after a lost stream, folding while the server is down, giving
//! up on a server that takes batches and never answers, and obeying the sampling policy.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tailscope::proto::histogram::Histogram;
use tailscope::proto::v1::ingest_server::{Ingest, IngestServer};
use tailscope::proto::v1::{IngestReply, SamplingPolicy, SpanBatch, SpanStatus};
use tailscope::{BreakerState, Client, Status};
use tailscope_test_support::assert_eventually;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;

/// What the scripted server does with each stream.
#[derive(Default)]
struct Script {
    /// Streams opened so far.
    streams: usize,
    /// Every batch received: (stream number, batch).
    received: Vec<(usize, SpanBatch)>,
    /// On stream 1: end the stream with UNAVAILABLE after this many batches, acking none.
    drop_first_after: Option<usize>,
    /// Sampling probability to announce in every reply.
    probability: Option<f64>,
    /// Take every batch and never answer, the stream left open: a hung server.
    silent: bool,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<Script>>);

#[tonic::async_trait]
impl Ingest for Fake {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<IngestReply, tonic::Status>> + Send>>;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<SpanBatch>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let script = self.0.clone();
        let stream_no = {
            let mut s = script.lock();
            s.streams += 1;
            s.streams
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut on_stream = 0;
            while let Ok(Some(batch)) = inbound.message().await {
                on_stream += 1;
                let (seq, drop_now, probability) = {
                    let mut s = script.lock();
                    s.received.push((stream_no, batch.clone()));
                    let drop_now = stream_no == 1 && s.drop_first_after.is_some_and(|n| on_stream >= n);
                    (batch.seq, drop_now, s.probability)
                };
                if drop_now {
                    let _ = tx.send(Err(tonic::Status::unavailable("scripted outage"))).await;
                    return;
                }
                if stream_no == 1 && script.lock().drop_first_after.is_some() || script.lock().silent {
                    continue; // acks nothing before the outage, or nothing ever
                }
                let sampling = probability.map(|p| SamplingPolicy {
                    default_probability: p,
                    default_set: true,
                    keys: Vec::new(),
                });
                let reply = IngestReply { durable_seq: seq, sampling, ..IngestReply::default() };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve_on(listener: tokio::net::TcpListener, script: Arc<Mutex<Script>>) {
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(Fake(script)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
}

async fn fake_server(script: Script) -> (String, Arc<Mutex<Script>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let script = Arc::new(Mutex::new(script));
    serve_on(listener, script.clone()).await;
    (endpoint, script)
}

fn client(endpoint: &str, f: impl FnOnce(&mut tailscope::Config)) -> Client {
    Client::builder().endpoint(endpoint).service("svc").configure(f).build().unwrap()
}

/// Waits until the client's stream is open, so what it records next is sent in full.
async fn connected(c: &Client) {
    assert_eventually!(within = Duration::from_secs(10); c.stats().connected, "not connected: {:?}", c.stats());
}

/// Spans in a batch, in full plus folded in its deltas.
fn counted(batch: &SpanBatch) -> u64 {
    let full: u64 = batch.groups.iter().map(|g| g.spans.len() as u64).sum();
    let folded: u64 = batch.deltas.iter().map(|d| Histogram::decode(&d.histogram).unwrap().count()).sum();
    full + folded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_cut_by_size_and_numbered_from_one() {
    let (endpoint, script) = fake_server(Script::default()).await;
    let c = client(&endpoint, |c| {
        c.max_batch_spans = 100;
        c.max_batch_delay = Duration::from_millis(20);
    });
    connected(&c).await;
    for i in 0..1_000u64 {
        c.record(if i % 2 == 0 { "GET /a" } else { "GET /b" }, Duration::from_micros(100 + i), Status::Ok);
    }
    c.flush().await.unwrap();
    let s = script.lock();
    let seqs: Vec<u64> = s.received.iter().map(|(_, b)| b.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(s.received.iter().all(|(_, b)| b.groups.iter().map(|g| g.spans.len()).sum::<usize>() <= 100));
    assert_eq!(s.received.iter().map(|(_, b)| counted(b)).sum::<u64>(), 1_000);
    let client_ids: std::collections::BTreeSet<u64> = s.received.iter().map(|(_, b)| b.client_id).collect();
    assert_eq!(client_ids.len(), 1);
    assert_ne!(*client_ids.first().unwrap(), 0);
    let stats = c.stats();
    assert_eq!((stats.recorded, stats.acked), (1_000, 1_000), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_cut_by_time_when_traffic_is_light() {
    let (endpoint, _script) = fake_server(Script::default()).await;
    let c = client(&endpoint, |c| c.max_batch_delay = Duration::from_millis(50));
    connected(&c).await;
    c.record("GET /slow-trickle", Duration::from_millis(3), Status::Ok);
    // No flush: the batch delay alone must send it.
    assert_eventually!(within = Duration::from_secs(10); c.stats().acked >= 1, "not sent: {:?}", c.stats());
    assert_eq!(c.stats().acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_batches_are_resent_in_order_after_a_lost_stream() {
    let (endpoint, script) = fake_server(Script { drop_first_after: Some(3), ..Script::default() }).await;
    let c = client(&endpoint, |c| {
        c.max_batch_spans = 50;
        c.backoff_base = Duration::from_millis(10);
    });
    connected(&c).await;
    for i in 0..400u64 {
        c.record("POST /pay", Duration::from_micros(1_000 + i), Status::Ok);
    }
    if let Err(e) = c.flush().await {
        let s = script.lock();
        let seen: Vec<(usize, u64, u64)> = s.received.iter().map(|(n, b)| (*n, b.seq, counted(b))).collect();
        panic!("{e}: streams {}, received {seen:?}, {:?}", s.streams, c.stats());
    }
    let s = script.lock();
    let first: Vec<&SpanBatch> = s.received.iter().filter(|(n, _)| *n == 1).map(|(_, b)| b).collect();
    let second: Vec<&SpanBatch> = s.received.iter().filter(|(n, _)| *n == 2).map(|(_, b)| b).collect();
    assert_eq!(first.len(), 3);
    // The new stream starts by resending the unacknowledged batches, same seqs, same spans, in order.
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a, b);
    }
    let seqs: Vec<u64> = second.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(second.iter().map(|b| counted(b)).sum::<u64>(), 400);
    assert!(c.stats().reconnects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_opens_the_breaker_and_spans_are_folded_then_sent_as_deltas() {
    // A port with nothing listening yet.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let c = client(&format!("http://{addr}"), |c| {
        c.backoff_base = Duration::from_millis(5);
        c.backoff_cap = Duration::from_millis(20);
        c.breaker_threshold = 2;
        c.breaker_open_for = Duration::from_millis(200);
    });
    for i in 0..500u64 {
        let status = if i % 100 == 0 { Status::Error } else { Status::Ok };
        c.record("GET /a", Duration::from_micros(500 + i), status);
    }
    assert_eventually!(within = Duration::from_secs(10); c.stats().breaker == BreakerState::Open, "breaker not open: {:?}", c.stats());
    let stats = c.stats();
    assert_eq!(stats.breaker, BreakerState::Open);
    assert_eq!((stats.folded, stats.sent), (500, 0), "{stats:?}");
    // The server comes up where the client expects it: the folded spans arrive as deltas.
    let script = Arc::new(Mutex::new(Script::default()));
    serve_on(tokio::net::TcpListener::bind(addr).await.unwrap(), script.clone()).await;
    c.flush_within(Duration::from_secs(20)).await.unwrap();
    let s = script.lock();
    assert_eq!(s.received.iter().map(|(_, b)| counted(b)).sum::<u64>(), 500);
    let errors: u64 = s
        .received
        .iter()
        .flat_map(|(_, b)| &b.deltas)
        .filter(|d| d.status == SpanStatus::Error as i32)
        .map(|d| Histogram::decode(&d.histogram).unwrap().count())
        .sum();
    assert_eq!(errors, 5);
    assert_eq!(c.stats().breaker, BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampling_policy_thins_full_spans_keeps_errors_and_folds_the_rest() {
    let (endpoint, script) = fake_server(Script { probability: Some(0.1), ..Script::default() }).await;
    let c = client(&endpoint, |c| c.max_batch_delay = Duration::from_millis(10));
    // The first reply carries the policy.
    c.record("warm-up", Duration::from_micros(1), Status::Ok);
    c.flush().await.unwrap();
    for i in 0..20_000u64 {
        let status = if i % 1_000 == 0 { Status::Error } else { Status::Ok };
        c.record("GET /hot", Duration::from_micros(200 + i % 700), status);
    }
    c.flush().await.unwrap();
    let s = script.lock();
    let hot = |b: &SpanBatch| -> (u64, u64) {
        let full = b
            .groups
            .iter()
            .filter(|g| g.key.as_ref().unwrap().operation == "GET /hot")
            .flat_map(|g| &g.spans)
            .filter(|sp| sp.status != SpanStatus::Error as i32)
            .count() as u64;
        let errors =
            b.groups.iter().flat_map(|g| &g.spans).filter(|sp| sp.status == SpanStatus::Error as i32).count()
                as u64;
        (full, errors)
    };
    let (full, errors) = s.received.iter().map(|(_, b)| hot(b)).fold((0, 0), |a, (f, e)| (a.0 + f, a.1 + e));
    assert_eq!(errors, 20, "every error is sent in full");
    // 10 % of 19,980 ok spans by trace id: 1,998 expected; ±5 σ.
    assert!((1_800..=2_200).contains(&full), "{full}");
    assert_eq!(s.received.iter().map(|(_, b)| counted(b)).sum::<u64>(), 20_001);
    // Kept spans carry their adjusted count (informational; they still count once): the ok
    // ones of GET /hot stand for 10 each, errors for themselves.
    for sp in s
        .received
        .iter()
        .flat_map(|(_, b)| &b.groups)
        .filter(|g| g.key.as_ref().unwrap().operation == "GET /hot")
        .flat_map(|g| &g.spans)
    {
        let want = if sp.status == SpanStatus::Error as i32 { 1.0 } else { 10.0 };
        assert!((sp.adjusted_count - want).abs() < 1e-9, "{sp:?}");
        assert_eq!(sp.weight, 0);
    }
}

/// A server that takes batches and never answers (paused, or behind a half-open connection)
/// keeps TCP happy; only the ack timeout notices. Each silent stream counts as a failure, so
/// the breaker opens and the spans recorded meanwhile are folded, not queued for a dead stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_opens_the_breaker() {
    let (endpoint, script) = fake_server(Script { silent: true, ..Script::default() }).await;
    let c = client(&endpoint, |c| {
        c.max_batch_delay = Duration::from_millis(10);
        c.ack_timeout = Duration::from_millis(200);
        c.backoff_base = Duration::from_millis(10);
        c.breaker_threshold = 3;
        c.breaker_open_for = Duration::from_secs(600);
    });
    connected(&c).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0u64;
    while c.stats().breaker != BreakerState::Open && Instant::now() < deadline {
        c.record("GET /slow", Duration::from_millis(1 + i % 10), Status::Ok);
        i += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = c.stats();
    assert_eq!(s.breaker, BreakerState::Open, "{s:?}");
    assert!(s.ack_timeouts >= 1, "{s:?}");
    assert_eq!(s.acked, 0);
    assert!(script.lock().streams >= 2, "the client reconnected before giving up");
    // While it is open, what is recorded folds (kept for the server's return).
    for _ in 0..1_000 {
        c.record("GET /slow", Duration::from_millis(3), Status::Ok);
    }
    assert_eventually!(within = Duration::from_secs(30); c.stats().folded >= s.folded + 1_000, "not folded: {:?}", c.stats());
    let after = c.stats();
    assert!(after.folded >= s.folded + 1_000, "{after:?}");
    assert!(!after.connected);
}

/// Consistent by trace, end to end through three clients: three services whose servers ask
/// for 5 %, 20 % and 60 % record the same 20,000 traces (each trace one span per service).
/// Every trace the 5 % service sent in full was sent in full by the other two, so a trace
/// sampled at the lowest probability is complete everywhere; and each service kept about its
/// share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_kept_at_the_lowest_probability_are_complete_in_every_service() {
    let probabilities = [0.05, 0.2, 0.6];
    let mut services = Vec::new();
    for p in probabilities {
        let (endpoint, script) = fake_server(Script { probability: Some(p), ..Script::default() }).await;
        let c = client(&endpoint, |c| c.max_batch_delay = Duration::from_millis(10));
        // The first reply carries the policy.
        c.record("warm-up", Duration::from_micros(1), Status::Ok);
        c.flush().await.unwrap();
        services.push((c, script));
    }
    let mut r = fastrand::Rng::with_seed(9);
    let traces: Vec<u128> = (0..20_000).map(|_| r.u128(..)).collect();
    for &trace_id in &traces {
        for (c, _) in &services {
            let ids = tailscope::Ids { trace_id, span_id: r.u64(..) | 1, parent_span_id: 0 };
            c.record_with("GET /t", Duration::from_micros(300), Status::Ok, ids);
        }
    }
    let mut kept: Vec<std::collections::HashSet<u128>> = Vec::new();
    for (c, script) in &services {
        c.flush().await.unwrap();
        let s = script.lock();
        let ids = s
            .received
            .iter()
            .flat_map(|(_, b)| &b.groups)
            .filter(|g| g.key.as_ref().unwrap().operation == "GET /t")
            .flat_map(|g| &g.spans)
            .map(|sp| (u128::from(sp.trace_id_high) << 64) | u128::from(sp.trace_id_low))
            .collect();
        kept.push(ids);
    }
    for (k, p) in kept.iter().zip(probabilities) {
        // Binomial(20,000, p): within ±5 σ of its mean.
        let (mean, sd) = (20_000.0 * p, (20_000.0 * p * (1.0 - p)).sqrt());
        assert!((k.len() as f64 - mean).abs() < 5.0 * sd, "{} kept at {p}", k.len());
    }
    assert!(kept[0].is_subset(&kept[1]) && kept[1].is_subset(&kept[2]));
    let recorded: std::collections::HashSet<u128> = traces.into_iter().collect();
    assert!(kept[0].is_subset(&recorded));
}
