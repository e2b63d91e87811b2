//! Helpers for the integration tests: start a real server in-process on 127.0.0.1:0 with a
//! temporary data dir, talk to it over real gRPC and HTTP.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tailscope_proto::v1::ingest_client::IngestClient;
use tailscope_proto::v1::{IngestReply, SeriesGroup, SeriesKey, Span, SpanBatch, SpanStatus};
use tailscope_server::clock::{Clock, SystemClock};
use tailscope_server::{Config, Server};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

pub use tailscope_test_support::{assert_eventually, on_path, peers, proc_status_bytes, Peer};

pub fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.data_dir = dir.to_path_buf();
    c.ingest.shards = 2;
    c.ingest.flush_interval = Duration::from_millis(50);
    c
}

pub async fn start(dir: &Path) -> Server {
    Server::start(config(dir)).await.expect("server starts")
}

pub async fn start_with(config: Config, clock: Arc<dyn Clock>) -> Server {
    Server::start_with_clock(config, clock).await.expect("server starts")
}

pub fn now_nanos() -> i64 {
    SystemClock.now_nanos()
}

pub fn span(start: i64, duration: i64, error: bool) -> Span {
    Span {
        trace_id_high: 1,
        trace_id_low: start as u64,
        span_id: 2,
        parent_span_id: 0,
        start_unix_nanos: start,
        duration_nanos: duration,
        status: if error { SpanStatus::Error as i32 } else { SpanStatus::Ok as i32 },
        weight: 0,
        adjusted_count: 0.0,
        self_nanos: 0,
    }
}

pub fn group(service: &str, operation: &str, spans: Vec<Span>) -> SeriesGroup {
    SeriesGroup {
        key: Some(SeriesKey { service: service.into(), operation: operation.into(), ..Default::default() }),
        spans,
    }
}

pub fn batch(client_id: u64, seq: u64, groups: Vec<SeriesGroup>) -> SpanBatch {
    SpanBatch { client_id, seq, groups, deltas: vec![] }
}

/// One open ingest stream.
pub struct Stream {
    pub tx: mpsc::Sender<SpanBatch>,
    pub replies: Streaming<IngestReply>,
    pub acked: u64,
}

pub async fn connect(addr: std::net::SocketAddr) -> IngestClient<Channel> {
    IngestClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
}

pub async fn open(addr: std::net::SocketAddr) -> Stream {
    let mut client = connect(addr).await;
    let (tx, rx) = mpsc::channel(64);
    let replies = client.stream(ReceiverStream::new(rx)).await.expect("open stream").into_inner();
    Stream { tx, replies, acked: 0 }
}

/// A stream whose requests carry `Authorization: Bearer <token>`.
pub async fn open_as(addr: std::net::SocketAddr, token: &str) -> Stream {
    let mut client = connect(addr).await;
    let (tx, rx) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    let replies = client.stream(request).await.expect("open stream").into_inner();
    Stream { tx, replies, acked: 0 }
}

impl Stream {
    pub async fn send(&mut self, b: SpanBatch) {
        self.tx.send(b).await.expect("stream open");
    }

    /// Waits until the server acknowledges `seq`; returns the last reply.
    pub async fn wait_acked(&mut self, seq: u64) -> IngestReply {
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(30), self.replies.message())
                .await
                .expect("ack within 30 s")
                .expect("stream ok")
                .expect("stream open");
            self.acked = self.acked.max(reply.durable_seq);
            if reply.durable_seq >= seq {
                return reply;
            }
        }
    }

    /// Reads replies until the stream ends with an error status, which it returns.
    pub async fn wait_error(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.replies.message())
                .await
                .expect("reply within 30 s")
            {
                Ok(Some(r)) => self.acked = self.acked.max(r.durable_seq),
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => return status,
            }
        }
    }
}

pub async fn get_json(http: std::net::SocketAddr, path_and_query: &str) -> serde_json::Value {
    reqwest::get(format!("http://{http}{path_and_query}")).await.expect("http").json().await.expect("json")
}

/// `expr` evaluated now through the Prometheus API: each result row's values of `labels`
/// (empty for a label it lacks), with its value.
pub async fn instant_rows(
    http: std::net::SocketAddr,
    expr: &str,
    labels: &[&str],
) -> std::collections::BTreeMap<Vec<String>, f64> {
    let v = get_json(http, &format!("/api/v1/query?query={}", form_encode(expr))).await;
    assert_eq!(v["status"], "success", "{v}");
    v["data"]["result"]
        .as_array()
        .expect("a vector")
        .iter()
        .map(|r| {
            let key = labels.iter().map(|l| r["metric"][l].as_str().unwrap_or("").to_owned()).collect();
            (key, r["value"][1].as_str().expect("a value").parse().expect("a number"))
        })
        .collect()
}

pub async fn tail(http: std::net::SocketAddr, query: &str) -> Vec<serde_json::Value> {
    let v = get_json(http, &format!("/api/v1/tail?{query}")).await;
    assert_eq!(v["status"], "success", "{v}");
    v["data"]["series"].as_array().cloned().unwrap_or_default()
}

pub async fn metrics(http: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{http}/metrics")).await.expect("http").text().await.expect("text")
}

/// The value of the sample whose name-and-labels text is exactly `series` (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) of process `pid` so far (its own threads, not its children).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// Starts `tailscope-server` as a child process on ephemeral ports; returns it with its addresses.
pub fn spawn_server(dir: &Path, env: &[(&str, &str)]) -> (Child, SocketAddr, SocketAddr) {
    spawn_server_at(dir, env, "127.0.0.1:0", "127.0.0.1:0")
}

/// Like [`spawn_server`], on the given addresses (to restart a server where clients expect it).
pub fn spawn_server_at(
    dir: &Path,
    env: &[(&str, &str)],
    grpc: &str,
    http: &str,
) -> (Child, SocketAddr, SocketAddr) {
    let (child, grpc, http, _) = spawn_server_logged(dir, env, grpc, http);
    (child, grpc, http)
}

/// Like [`spawn_server_at`], also returning what the server logs at ERROR and WARN.
pub fn spawn_server_logged(
    dir: &Path,
    env: &[(&str, &str)],
    grpc: &str,
    http: &str,
) -> (Child, SocketAddr, SocketAddr, Log) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailscope-server"))
        .args([
            "--grpc-addr",
            grpc,
            "--http-addr",
            http,
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(dir)
        .env("TAILSCOPE_INGEST_FLUSH_INTERVAL", "100ms")
        .env("TAILSCOPE_LOG", "info")
        .envs(env.iter().copied())
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
    // Keep draining stderr so the child never blocks on a full pipe; error and warning lines
    // are kept for the tests that check what the server said.
    let said = Log::default();
    let kept = said.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("\"ERROR\"")
                || line.contains("\"WARN\"")
                || line.contains("tailscope_server::cluster")
                || line.contains("panicked")
            {
                kept.lock().push(line);
            }
        }
    });
    let addr = |k: &str| started["fields"][k].as_str().unwrap().parse().unwrap();
    (child, addr("grpc_addr"), addr("http_addr"), said)
}

/// Error and warning lines a child server logged.
pub type Log = Arc<parking_lot::Mutex<Vec<String>>>;

/// Delivers `batches` (seqs 1..=n) the way a well-behaved client does: streams them, and after
/// a refusal (RESOURCE_EXHAUSTED, UNAVAILABLE) reconnects and resends everything not yet
/// acknowledged. Returns the number of refusals it went through.
pub async fn deliver(addr: SocketAddr, batches: Vec<SpanBatch>) -> u32 {
    let last = batches.last().map_or(0, |b| b.seq);
    let batches = Arc::new(batches);
    let mut acked = 0;
    let mut refusals = 0;
    while acked < last {
        let mut s = open(addr).await;
        let tx = s.tx.clone();
        let todo = batches.clone();
        let from = acked;
        let sender = tokio::spawn(async move {
            for b in todo.iter().filter(|b| b.seq > from) {
                if tx.send(b.clone()).await.is_err() {
                    break;
                }
            }
        });
        loop {
            match tokio::time::timeout(Duration::from_secs(30), s.replies.message())
                .await
                .expect("reply in 30 s")
            {
                Ok(Some(r)) => {
                    acked = acked.max(r.durable_seq);
                    if acked >= last {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    assert!(
                        matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable),
                        "unexpected refusal: {status:?}"
                    );
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
        }
        sender.abort();
    }
    refusals
}

/// `s` percent-encoded for a URL's query (unreserved characters kept).
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// POSTs an OTLP/JSON export to the OTLP/HTTP listener and expects 200.
pub async fn post_otlp_json(otlp_http: SocketAddr, body: Vec<u8>) {
    let resp = reqwest::Client::new()
        .post(format!("http://{otlp_http}/v1/traces"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap_or_default());
}

/// A client of `service` sending to `grpc` in batches of at most 50 ms, once it is connected
/// (so nothing is folded for want of a stream).
pub async fn connected(service: &str, grpc: SocketAddr) -> tailscope::Client {
    let client = tailscope::Client::builder()
        .endpoint(format!("http://{grpc}"))
        .service(service)
        .configure(|c| c.max_batch_delay = Duration::from_millis(50))
        .build()
        .expect("client");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !client.stats().connected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client
}
