//! Hostile and broken input: every case gets a clear gRPC status and a counter, the server
//! keeps serving, and what was accepted before is intact.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use prost::Message;
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_proto::v1::{HistogramDelta, IngestReply, SeriesKey, SpanBatch};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

/// A codec that sends raw bytes as the request message, so tests can send anything.
#[derive(Debug, Default, Clone)]
struct RawCodec;

#[derive(Debug, Default, Clone)]
struct RawEncoder;

#[derive(Debug, Default, Clone)]
struct ReplyDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for ReplyDecoder {
    type Item = IngestReply;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<IngestReply>, tonic::Status> {
        IngestReply::decode(src).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = IngestReply;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

/// Sends `payloads` as raw messages on one stream and returns the status that ends it.
async fn send_raw(addr: std::net::SocketAddr, payloads: Vec<Vec<u8>>) -> tonic::Status {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/tailscope.v1.Ingest/Stream");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for p in payloads {
        tx.send(p).await.unwrap();
    }
    let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut replies = match grpc.streaming(request, path, RawCodec).await {
        Ok(r) => r.into_inner(),
        Err(status) => return status,
    };
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), replies.message())
            .await
            .expect("answer")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => return status,
        }
    }
}

fn good_batch(client: u64, seq: u64) -> SpanBatch {
    batch(client, seq, vec![group("shop", "GET /cart", vec![span(now_nanos(), 3_000_000, false)])])
}

/// A cluster node's configuration over the NATS server(s) `urls` (one partition stream per
/// partition, one copy each), so the same input tests run against a gateway.
fn on_cluster(cfg: &mut tailscope_server::Config, urls: &str) {
    cfg.cluster.nats = urls.split(',').map(str::to_owned).collect();
    cfg.cluster.node_id = "gw".into();
    cfg.cluster.partitions = 2;
    cfg.cluster.stream_replicas = 1;
    cfg.cluster.max_bytes_per_partition = 64 << 20;
}

/// The count of `service` once the store has it (at once on a single node; a cluster node
/// applies the log behind its acknowledgements).
async fn counted(http: std::net::SocketAddr, service: &str) -> serde_json::Value {
    let rows = tail(http, &format!("service={service}")).await;
    rows.first().map_or(serde_json::Value::Null, |r| r["count"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_a_clear_status_and_nothing_accepted_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    malformed_input(config(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_the_same_answers_from_a_cluster_gateway() {
    let Some(bin) = tailscope_test_support::peers(&["nats-server"], "nats-server") else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = tailscope_test_support::nats::NatsCluster::start(&bin[0], &dir.path().join("nats"), 1);
    let mut cfg = config(&dir.path().join("node"));
    on_cluster(&mut cfg, &nats.urls());
    malformed_input(cfg).await;
}

/// A cluster node judges a client new to its gateway by its own store only once it holds
/// every partition caught up (shown on its status page); a single node at once.
async fn holding_every_partition(http: std::net::SocketAddr) {
    let status = || async move {
        reqwest::get(format!("http://{http}/api/v1/status/cluster"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    if status().await["data"]["mode"] != "cluster" {
        return;
    }
    tailscope_test_support::assert_eventually!(
        status().await["data"]["partitions"].as_array().unwrap().iter().all(|p| p["caught_up"] == true),
        "the node never held every partition caught up: {}",
        status().await
    );
}

async fn malformed_input(mut cfg: tailscope_server::Config) {
    cfg.ingest.max_batch_bytes = 64 * 1024;
    cfg.ingest.max_spans_per_batch = 1_000;
    let server = tailscope_server::Server::start(cfg).await.unwrap();
    let (grpc, http) = (server.grpc_addr(), server.http_addr());
    holding_every_partition(http).await;

    // Some good data first.
    let mut s = open(grpc).await;
    s.send(good_batch(1, 1)).await;
    s.wait_acked(1).await;

    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "non-protobuf payload",
            b"\xff\xff\xff\xff this is not protobuf".to_vec(),
            Code::InvalidArgument,
            "malformed batch",
        ),
        ("oversized batch", vec![0u8; 100 * 1024], Code::ResourceExhausted, "too large"),
        (
            "too many spans",
            batch(2, 1, vec![group("s", "o", (0..1_001).map(|_| span(now_nanos(), 1, false)).collect())])
                .encode_to_vec(),
            Code::ResourceExhausted,
            "1001 spans",
        ),
        (
            "empty service name",
            batch(2, 1, vec![group("", "GET /", vec![])]).encode_to_vec(),
            Code::InvalidArgument,
            "empty service name",
        ),
        ("invalid UTF-8 label", invalid_utf8_batch(), Code::InvalidArgument, "UTF-8"),
        ("corrupt histogram delta", corrupt_delta_batch(), Code::InvalidArgument, "delta 0 (shop/GET /cart)"),
        ("zero client id", good_batch(0, 1).encode_to_vec(), Code::InvalidArgument, "client_id"),
        (
            "seq far past the watermark",
            good_batch(9, u64::MAX).encode_to_vec(),
            Code::InvalidArgument,
            "ingest.max_seq_gap (1000000) past client 9's accepted watermark 0",
        ),
        (
            "delta counts overflowing",
            overflowing_deltas_batch(),
            Code::InvalidArgument,
            "overflows the batch's total",
        ),
    ];
    for (name, payload, code, needle) in cases {
        let status = send_raw(grpc, vec![payload]).await;
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(status.message().contains(needle), "{name}: {:?} lacks {needle:?}", status.message());
    }

    let m = metrics(http).await;
    assert_eq!(metric(&m, "tailscope_batches_rejected_total{reason=\"malformed\"}"), 2.0, "{m}");
    assert_eq!(metric(&m, "tailscope_batches_rejected_total{reason=\"oversized\"}"), 2.0);
    assert_eq!(metric(&m, "tailscope_batches_rejected_total{reason=\"invalid\"}"), 4.0);

    // Still serving, and the earlier data is intact.
    let mut s = open(grpc).await;
    s.send(good_batch(1, 2)).await;
    s.wait_acked(2).await;
    tailscope_test_support::assert_eventually!(
        counted(http, "shop").await == 2,
        "{}",
        counted(http, "shop").await
    );
    assert!(reqwest::get(format!("http://{http}/-/ready")).await.unwrap().status().is_success());
    server.shutdown().await;
}

/// A batch whose service label is not UTF-8, encoded by hand (prost refuses to build one).
fn invalid_utf8_batch() -> Vec<u8> {
    let key = SeriesKey { service: "AB".into(), operation: "op".into(), ..Default::default() };
    let mut group = tailscope_proto::v1::SeriesGroup { key: Some(key), spans: vec![] }.encode_to_vec();
    let at = group.windows(2).position(|w| w == b"AB").unwrap();
    group[at] = 0xC3;
    group[at + 1] = 0x28; // an invalid two-byte sequence
    let mut out = SpanBatch { client_id: 3, seq: 1, groups: vec![], deltas: vec![] }.encode_to_vec();
    out.push(0x1a); // field 3 (groups), length-delimited
    prost::encoding::encode_varint(group.len() as u64, &mut out);
    out.extend_from_slice(&group);
    out
}

/// Two deltas of 2⁶³ spans each: valid histograms whose sum does not fit a u64.
fn overflowing_deltas_batch() -> Vec<u8> {
    let mut h = Histogram::new(Layout::default());
    h.record(1_000_000, 1 << 63);
    let window = now_nanos() / 1_000_000_000 / 10 * 10;
    let delta = HistogramDelta {
        key: Some(SeriesKey { service: "shop".into(), operation: "GET /cart".into(), ..Default::default() }),
        status: 0,
        window_start_unix_seconds: window,
        histogram: h.to_bytes(),
        self_histogram: Vec::new(),
    };
    SpanBatch { client_id: 5, seq: 1, groups: vec![], deltas: vec![delta.clone(), delta] }.encode_to_vec()
}

fn corrupt_delta_batch() -> Vec<u8> {
    let mut h = Histogram::new(Layout::default());
    h.record(1_000_000, 5);
    let mut bytes = h.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] = 9; // the bucket count no longer adds up to the total
    let window = now_nanos() / 1_000_000_000 / 10 * 10;
    SpanBatch {
        client_id: 4,
        seq: 1,
        groups: vec![],
        deltas: vec![HistogramDelta {
            key: Some(SeriesKey {
                service: "shop".into(),
                operation: "GET /cart".into(),
                ..Default::default()
            }),
            status: 0,
            window_start_unix_seconds: window,
            histogram: bytes,
            self_histogram: Vec::new(),
        }],
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_deltas_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut h = Histogram::new(Layout::default());
    for v in [1_000_000u64, 2_000_000, 400_000_000] {
        h.record(v, 1000);
    }
    let window = now_nanos() / 1_000_000_000 / 10 * 10;
    let mut b = good_batch(8, 1);
    b.deltas.push(HistogramDelta {
        key: Some(SeriesKey { service: "shop".into(), operation: "GET /cart".into(), ..Default::default() }),
        status: 0,
        window_start_unix_seconds: window,
        histogram: h.to_bytes(),
        self_histogram: Vec::new(),
    });
    let mut s = open(server.grpc_addr()).await;
    s.send(b).await;
    s.wait_acked(1).await;
    let rows = tail(server.http_addr(), "service=shop").await;
    assert_eq!(rows[0]["count"], 3001);
    assert_eq!(rows[0]["max"], 0.4);
    // A delta window that is not aligned is refused.
    let mut bad = good_batch(8, 2);
    bad.deltas.push(HistogramDelta {
        key: Some(SeriesKey { service: "a".into(), operation: "b".into(), ..Default::default() }),
        status: 0,
        window_start_unix_seconds: window + 3,
        histogram: h.to_bytes(),
        self_histogram: Vec::new(),
    });
    let status = send_raw(server.grpc_addr(), vec![bad.encode_to_vec()]).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("not a multiple of 10"), "{status:?}");
    server.shutdown().await;
}

/// Sends one raw message on its own stream and closes it; the replies, or the status that
/// ended the stream.
async fn send_one(addr: std::net::SocketAddr, payload: Vec<u8>) -> Result<Vec<IngestReply>, tonic::Status> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/tailscope.v1.Ingest/Stream");
    let request = tonic::Request::new(tokio_stream::once(payload));
    let mut replies = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), replies.message())
            .await
            .expect("answer")
        {
            Ok(Some(r)) => out.push(r),
            Ok(None) => return Ok(out),
            Err(status) => return Err(status),
        }
    }
}

/// Values a hostile or buggy sender might put in a field, and some ordinary ones.
fn pick<T: Copy>(r: &mut impl rand::Rng, values: &[T]) -> T {
    values[r.gen_range(0..values.len())]
}

fn hostile_batch(r: &mut impl rand::Rng) -> SpanBatch {
    use tailscope_proto::v1::{SeriesGroup, Span};
    let now = now_nanos();
    // Mostly valid labels, so most batches reach the span checks; now and then an empty or
    // too long one, which refuses the whole batch.
    let names = ["shop", "GET /cart", "é🦀", "__overflow__", "x"];
    let long = "n".repeat(300);
    let name = |r: &mut dyn rand::RngCore| -> String {
        match rand::Rng::gen_range(r, 0..40) {
            0 => long.clone(),
            1 => String::new(),
            i => names[i % names.len()].to_owned(),
        }
    };
    let key = |r: &mut dyn rand::RngCore| {
        Some(SeriesKey { service: name(r), operation: name(r), ..Default::default() })
    };
    let times = [i64::MIN, -1, 0, 1, now, now - 3_600_000_000_000, now + 3_600_000_000_000, i64::MAX];
    let durations = [i64::MIN, -1, 0, 1, 3_000_000, 3_600_000_000_000, 86_400_000_000_000, i64::MAX];
    let groups = (0..r.gen_range(0..5))
        .map(|_| SeriesGroup {
            key: key(r),
            spans: (0..r.gen_range(0..20))
                .map(|_| Span {
                    trace_id_high: r.gen(),
                    trace_id_low: r.gen(),
                    span_id: r.gen(),
                    parent_span_id: r.gen(),
                    start_unix_nanos: if r.gen() {
                        pick(r, &times)
                    } else {
                        now - r.gen_range(0..60_000_000_000)
                    },
                    duration_nanos: if r.gen() {
                        pick(r, &durations)
                    } else {
                        r.gen_range(0..10_000_000_000)
                    },
                    status: pick(r, &[0, 1, 2, 3, -1, i32::MAX]),
                    weight: pick(r, &[0, 1, 2, 100, u32::MAX]),
                    adjusted_count: pick(r, &[0.0, 1.0, 100.0, -1.0, f64::NAN, f64::INFINITY]),
                    self_nanos: if r.gen() { pick(r, &durations) } else { 0 },
                })
                .collect(),
        })
        .collect();
    let aligned = now / 1_000_000_000 / 10 * 10;
    let deltas = (0..r.gen_range(0..4))
        .map(|_| {
            let mut h = Histogram::new(Layout::default());
            for _ in 0..r.gen_range(0..4) {
                h.record(pick(r, &[0, 1, 1_000_000, u64::MAX]), pick(r, &[1, 1_000, 1 << 62, u64::MAX]));
            }
            let mut histogram = h.to_bytes();
            if r.gen_ratio(1, 4) {
                let at = r.gen_range(0..histogram.len());
                histogram[at] = r.gen();
            }
            HistogramDelta {
                key: key(r),
                status: pick(r, &[0, 1, 2, 9]),
                window_start_unix_seconds: pick(
                    r,
                    &[aligned, aligned - 600, aligned + 3, 0, i64::MIN, i64::MAX - 7],
                ),
                // The same spans' self times, more of them than spans, or garbage.
                self_histogram: match r.gen_range(0..4) {
                    0 => Vec::new(),
                    1 => histogram.clone(),
                    2 => {
                        let mut more = Histogram::new(Layout::default());
                        more.record(5, 1 << 62);
                        more.to_bytes()
                    }
                    _ => (0..r.gen_range(0..40)).map(|_| r.gen()).collect(),
                },
                histogram,
            }
        })
        .collect();
    // Never client 1, whose batches the test checks afterwards.
    let client: u64 = r.gen();
    SpanBatch {
        client_id: pick(r, &[0, 2, client | 2, client | 2, client | 2, u64::MAX]),
        seq: pick(r, &[0, 1, 1, 1, 2, u64::MAX]),
        groups,
        deltas,
    }
}

/// A bounded property run (`TAILSCOPE_PROPERTY_CASES`, default 300; `TAILSCOPE_PROPERTY_SEED` to
/// replay): hostile field values, corrupted encodings and random bytes, each on its own stream.
/// Every one is acknowledged or refused with a clear status (never an internal error, never a
/// panic on the server), and data accepted before is intact. The cargo-fuzz target
/// `batch_decode` explores the same ground without a bound.
#[test]
fn hostile_batches_are_refused_or_counted_never_a_panic() {
    hostile_batches_on(None);
}

#[test]
fn hostile_batches_to_a_cluster_gateway_are_refused_or_counted_never_a_panic() {
    let Some(bin) = tailscope_test_support::peers(&["nats-server"], "nats-server") else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = tailscope_test_support::nats::NatsCluster::start(&bin[0], &dir.path().join("nats"), 1);
    hostile_batches_on(Some(&nats.urls()));
}

/// Hostile batches against a single node, or a cluster node over the NATS server `urls`.
fn hostile_batches_on(cluster: Option<&str>) {
    // The server runs on a runtime of its own whose threads are named, so the panic hook
    // (process-wide) counts the panics of this server only, not those of the other tests of
    // this binary (some of which provoke panics that the server contains, on purpose).
    const THREADS: &str = "hostile-server";
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_some_and(|n| n == THREADS) {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREADS)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(hostile_batches(&PANICS, cluster));
}

async fn hostile_batches(panics: &std::sync::atomic::AtomicUsize, cluster: Option<&str>) {
    use rand::{Rng, SeedableRng};
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (cases, seed) = (env("TAILSCOPE_PROPERTY_CASES", 300), env("TAILSCOPE_PROPERTY_SEED", 20261127));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest.max_spans_per_batch = 50;
    if let Some(urls) = cluster {
        on_cluster(&mut cfg, urls);
    }
    let server = tailscope_server::Server::start(cfg).await.unwrap();
    let (grpc, http) = (server.grpc_addr(), server.http_addr());
    holding_every_partition(http).await;
    let intact =
        |seq| batch(1, seq, vec![group("intact", "GET /", vec![span(now_nanos(), 3_000_000, false)])]);
    let mut s = open(grpc).await;
    s.send(intact(1)).await;
    s.wait_acked(1).await;

    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut acked, mut refused) = (0, 0);
    for case in 0..cases {
        let payload = match case % 3 {
            0 => hostile_batch(&mut r).encode_to_vec(),
            1 => {
                let mut bytes = hostile_batch(&mut r).encode_to_vec();
                for _ in 0..r.gen_range(1..4) {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = r.gen_range(0..bytes.len());
                    match r.gen_range(0..3) {
                        0 => bytes[at] = r.gen(),
                        1 => bytes.truncate(at),
                        _ => bytes.insert(at, r.gen()),
                    }
                }
                bytes
            }
            _ => (0..r.gen_range(0..200)).map(|_| r.gen()).collect(),
        };
        match send_one(grpc, payload.clone()).await {
            Ok(_) => acked += 1,
            Err(status) => {
                refused += 1;
                assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted),
                    "seed {seed} case {case}: {status:?} for {payload:?}"
                );
                assert!(!status.message().is_empty(), "seed {seed} case {case}: no message");
            }
        }
        assert_eq!(panics.load(std::sync::atomic::Ordering::SeqCst), 0, "seed {seed} case {case}: a panic");
    }
    println!("{cases} hostile batches (seed {seed}): {acked} taken, {refused} refused");
    assert!(acked > 0 && refused > 0, "the generator exercised one side only");

    let mut s = open(grpc).await;
    s.send(intact(2)).await;
    s.wait_acked(2).await;
    tailscope_test_support::assert_eventually!(
        counted(http, "intact").await == 2,
        "{}",
        counted(http, "intact").await
    );
    assert!(reqwest::get(format!("http://{http}/-/ready")).await.unwrap().status().is_success());
    server.shutdown().await;
}
