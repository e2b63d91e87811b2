//! `tailscope-load bench`: maximum ingest throughput with pre-encoded batches.
//!
//! Batches are encoded once as templates; each send only prepends the client id and seq
//! fields (protobuf fields may come in any order), so the sender spends its time on the
//! network, not on encoding. The server runs as a separate process, whose CPU time and peak
//! RSS are read from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes};
use prost::Message;
use rand::{Rng, SeedableRng};
use tailscope::{BatchBuilder, SpanKind};
use tailscope_proto::v1::{IngestReply, Span};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::child::{server_bin, ChildServer};

/// Options of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Total spans to send.
    #[arg(long, default_value_t = 20_000_000)]
    spans: u64,
    /// Spans per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent connections (one stream each).
    #[arg(long, default_value_t = 2)]
    connections: u64,
    /// Distinct series (service × operation) the spans spread over.
    #[arg(long, default_value_t = 100)]
    series: usize,
    /// Span start times spread over this many seconds before now (live traffic: about 1;
    /// larger values open more windows per series at once).
    #[arg(long, default_value_t = 1)]
    start_spread: u64,
    /// An already running server's gRPC address; by default a server is started.
    #[arg(long, requires = "pid")]
    grpc: Option<SocketAddr>,
    /// The process id of the server given by --grpc, for CPU and memory readings.
    #[arg(long)]
    pid: Option<u32>,
    /// The tailscope-server binary to start (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Shards of the started server (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// What to send: the native stream, or OTLP export requests over gRPC or HTTP (protobuf),
    /// `--batch` spans each, as an OpenTelemetry SDK does (each answered once durable).
    #[arg(long, value_enum, default_value_t = Protocol::Native)]
    protocol: Protocol,
    /// OTLP only: export requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Serve and send over TLS: the started server gets a certificate made for the run (its
    /// own CA), and every connection verifies it.
    #[arg(long, conflicts_with = "grpc")]
    tls: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Spans that make calls: every second span is a call (CLIENT, naming its callee) made by
    /// the span before it, in the same trace and batch, so self time (and, over OTLP, pairing)
    /// is computed; native spans carry their self time. Without it, every span is a request
    /// of its own.
    #[arg(long)]
    calls: bool,
    /// After the run, ask the started server how many spans it stored (a query over every
    /// series) and how many series are active, and report both next to what was sent. The
    /// RSS figures are read before that query; its own peak is `count_query_peak_rss_bytes`.
    #[arg(long, conflicts_with_all = ["grpc", "tls"])]
    check_counts: bool,
}

/// What `bench` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// `tailscope.v1.Ingest/Stream`, pipelined batches.
    Native,
    /// OTLP `TraceService/Export` on the gRPC port.
    OtlpGrpc,
    /// OTLP `POST /v1/traces` (protobuf) on the OTLP/HTTP port.
    OtlpHttp,
}

/// How the generator reaches the server: plaintext to 127.0.0.1, or TLS to `localhost`
/// trusting the run's CA.
#[derive(Debug, Clone)]
struct Link {
    ca: Option<std::sync::Arc<Vec<u8>>>,
}

impl Link {
    fn url(&self, addr: SocketAddr) -> String {
        match self.ca {
            None => format!("http://{addr}"),
            Some(_) => format!("https://localhost:{}", addr.port()),
        }
    }

    async fn channel(&self, addr: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.url(addr))?;
        if let Some(ca) = &self.ca {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca.as_slice()))
                .domain_name("localhost");
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint.connect().await?)
    }

    fn http(&self) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &self.ca {
            builder = builder.use_rustls_tls().add_root_certificate(reqwest::Certificate::from_pem(ca)?);
        }
        Ok(builder.build()?)
    }
}

/// A CA and a `localhost` certificate it signed, written into `dir` with a web configuration
/// naming them; returns the configuration's path and the CA (PEM).
fn certificates(dir: &Path) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join("server.pem"), cert.pem())?;
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem())?;
    let web = dir.join("web.yml");
    std::fs::write(&web, "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n")?;
    Ok((web, ca.pem().into_bytes()))
}

/// Starts a server child process on a temporary data directory (dropped after the server,
/// which is killed first); with `--tls`, serving TLS with a certificate made for the run.
fn start_server(args: &BenchArgs) -> anyhow::Result<(ChildServer, tempfile::TempDir, Link)> {
    let bin = server_bin(args.server_bin.as_deref())?;
    let dir = tempfile::tempdir()?;
    let mut env = vec![("TAILSCOPE_INGEST_SHARDS", args.shards.to_string())];
    // The spans spread over ten services: past the default 10,000 operations of each, the caps
    // (and the count check's selection) are raised so every series is its own.
    if args.series > 100_000 {
        env.push(("TAILSCOPE_INGEST_MAX_OPERATIONS_PER_SERVICE", (args.series / 10 + 1).to_string()));
        env.push(("TAILSCOPE_QUERY_MAX_SERIES", (args.series + 1).to_string()));
        env.push(("TAILSCOPE_QUERY_TIMEOUT", "10m".to_owned()));
    }
    let mut link = Link { ca: None };
    if args.tls {
        let (web, ca) = certificates(dir.path())?;
        env.push(("TAILSCOPE_WEB_CONFIG_FILE", web.display().to_string()));
        link.ca = Some(std::sync::Arc::new(ca));
    }
    let server = ChildServer::start(&bin, &dir.path().join("data"), "127.0.0.1:0", "127.0.0.1:0", &env)?;
    Ok((server, dir, link))
}

/// Whether tailscope refused with a code that asks to back off and send again
/// (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`).
pub(crate) fn backs_off(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::ResourceExhausted | tonic::Code::Unavailable)
}

/// CPU seconds (user + system) of process `pid`.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ), from `getconf` (asked once).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `/proc/<pid>/status` field in kB, as bytes.
pub(crate) fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
    Ok(kb * 1024)
}

/// How many distinct batch bodies to send over and over: 16, or as many as it takes for every
/// series to be in one when `--series` is more than 16 batches hold (then each body takes the
/// next `--batch` series in turn instead of picking them at random).
fn template_count(args: &BenchArgs) -> usize {
    if args.series > TEMPLATES * args.batch {
        args.series.div_ceil(args.batch)
    } else {
        TEMPLATES
    }
}

/// The bodies sent over and over when the series fit in them at random.
const TEMPLATES: usize = 16;

/// Encodes `templates` distinct batch bodies (groups only, no client id or seq).
fn templates(args: &BenchArgs, count: usize) -> Vec<Bytes> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    let covering = count > TEMPLATES;
    (0..count)
        .map(|t| {
            let mut b = BatchBuilder::new(1);
            let mut caller = 0;
            for j in 0..args.batch {
                let s =
                    if covering { (t * args.batch + j) % args.series } else { rng.gen_range(0..args.series) };
                let z: f64 = rng.gen_range(-3.0..3.0);
                let duration = (20e6 * (0.8 * z).exp()) as i64;
                let span = Span {
                    trace_id_high: rng.gen(),
                    trace_id_low: rng.gen(),
                    span_id: rng.gen(),
                    parent_span_id: 0,
                    start_unix_nanos: now - rng.gen_range(0..args.start_spread.max(1) as i64 * 1_000_000_000),
                    duration_nanos: duration,
                    status: i32::from(rng.gen_bool(0.01)) * 2,
                    weight: 0,
                    adjusted_count: 1.0,
                    self_nanos: if args.calls { duration / 2 } else { 0 },
                };
                let is_call = args.calls && b.len() % 2 == 1;
                // A call is made by the request before it, under its service and operation.
                let s = if is_call { caller } else { s };
                caller = s;
                let (service, operation) = (format!("service-{}", s % 10), format!("operation-{s}"));
                if is_call {
                    let callee = format!("service-{}", (s + 1) % 10);
                    b.push_peer(
                        &service,
                        &operation,
                        SpanKind::Client,
                        &callee,
                        Span { self_nanos: 0, ..span },
                    );
                } else if args.calls {
                    b.push_kind(&service, &operation, SpanKind::Server, span);
                } else {
                    b.push(&service, &operation, span);
                }
            }
            let mut batch = b.finish();
            batch.client_id = 0;
            batch.seq = 0;
            Bytes::from(batch.encode_to_vec())
        })
        .collect()
}

/// Encodes `count` distinct OTLP export requests of `args.batch` spans each, one resource per
/// service, as an SDK would send them.
fn otlp_templates(args: &BenchArgs, count: usize) -> Vec<Bytes> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{
        status, ResourceSpans, ScopeSpans, Span as OtlpSpan, Status,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (0..count)
        .map(|_| {
            let mut by_service: std::collections::BTreeMap<usize, Vec<OtlpSpan>> = Default::default();
            let mut last: Option<(usize, OtlpSpan)> = None;
            for i in 0..args.batch {
                let s = rng.gen_range(0..args.series);
                let z: f64 = rng.gen_range(-3.0..3.0);
                let start = now - rng.gen_range(0..args.start_spread.max(1) * 1_000_000_000);
                let error = rng.gen_bool(0.01);
                let mut span = OtlpSpan {
                    trace_id: rng.gen::<[u8; 16]>().to_vec(),
                    span_id: rng.gen::<[u8; 8]>().to_vec(),
                    name: format!("operation-{s}"),
                    kind: 2,
                    start_time_unix_nano: start,
                    end_time_unix_nano: start + (20e6 * (0.8 * z).exp()) as u64,
                    status: error
                        .then(|| Status { code: status::StatusCode::Error as i32, ..Default::default() }),
                    ..Default::default()
                };
                // A call made by the request before it: its child, half as long, naming its callee.
                if let Some((caller, request)) = last.take().filter(|_| args.calls && i % 2 == 1) {
                    span.name = request.name.clone();
                    span.trace_id = request.trace_id.clone();
                    span.parent_span_id = request.span_id.clone();
                    span.kind = 3;
                    span.start_time_unix_nano = request.start_time_unix_nano;
                    span.end_time_unix_nano = request.start_time_unix_nano
                        + (request.end_time_unix_nano - request.start_time_unix_nano) / 2;
                    span.attributes = vec![KeyValue {
                        key: "peer.service".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(format!(
                                "service-{}",
                                (caller + 1) % 10
                            ))),
                        }),
                    }];
                    by_service.entry(caller % 10).or_default().push(span);
                    continue;
                }
                if args.calls {
                    last = Some((s, span.clone()));
                }
                by_service.entry(s % 10).or_default().push(span);
            }
            let resource_spans = by_service
                .into_iter()
                .map(|(service, spans)| ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![KeyValue {
                            key: "service.name".into(),
                            value: Some(AnyValue {
                                value: Some(any_value::Value::StringValue(format!("service-{service}"))),
                            }),
                        }],
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                    ..Default::default()
                })
                .collect();
            Bytes::from(ExportTraceServiceRequest { resource_spans }.encode_to_vec())
        })
        .collect()
}

/// A pre-encoded OTLP export body, sent as is.
#[derive(Debug, Default, Clone)]
struct RawCodec;

#[derive(Debug, Default, Clone)]
struct RawEncoder;

#[derive(Debug, Default, Clone)]
struct IgnoreDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for IgnoreDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = IgnoreDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> IgnoreDecoder {
        IgnoreDecoder
    }
}

/// Sends `exports` OTLP export requests over one connection, `in_flight` at a time, each
/// answered once its spans are durable; refused ones are sent again after a pause. Returns
/// the acknowledgement latencies and the number of refusals.
async fn otlp_connection(
    protocol: Protocol,
    link: Link,
    addr: SocketAddr,
    exports: u64,
    in_flight: usize,
    bodies: Vec<Bytes>,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let channel = match protocol {
        Protocol::OtlpGrpc => Some(link.channel(addr).await?),
        _ => None,
    };
    let http = link.http()?;
    let url = format!("{}/v1/traces", link.url(addr));
    let mut workers = Vec::new();
    for _ in 0..in_flight.max(1) {
        let (next, bodies, channel, http, url) =
            (next.clone(), bodies.clone(), channel.clone(), http.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut refusals = 0u64;
            let path = http::uri::PathAndQuery::from_static(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            );
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= exports {
                    return Ok::<_, anyhow::Error>((latencies, refusals));
                }
                let body = bodies[i as usize % bodies.len()].clone();
                loop {
                    let started = Instant::now();
                    let refused = match &channel {
                        Some(channel) => {
                            let mut client = tonic::client::Grpc::new(channel.clone());
                            client.ready().await?;
                            match client
                                .unary(tonic::Request::new(body.clone()), path.clone(), RawCodec)
                                .await
                            {
                                Ok(_) => false,
                                Err(s) if backs_off(s.code()) => true,
                                Err(s) => bail!("export failed: {s}"),
                            }
                        }
                        None => {
                            let r = http
                                .post(&url)
                                .header("content-type", "application/x-protobuf")
                                .body(body.clone())
                                .send()
                                .await?;
                            match r.status().as_u16() {
                                200 => false,
                                429 | 503 => true,
                                code => bail!("export failed: {code} {}", r.text().await.unwrap_or_default()),
                            }
                        }
                    };
                    if !refused {
                        latencies.push(started.elapsed());
                        break;
                    }
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let (mut latencies, mut refusals) = (Vec::new(), 0);
    for w in workers {
        let (l, r) = w.await??;
        latencies.extend(l);
        refusals += r;
    }
    Ok((latencies, refusals))
}

/// A pre-encoded batch: the client id and seq fields, then a template body.
#[derive(Debug, Clone)]
struct Encoded {
    client_id: u64,
    seq: u64,
    body: Bytes,
}

#[derive(Debug, Default, Clone)]
struct PreEncodedCodec;

#[derive(Debug, Default, Clone)]
struct PreEncoder;

#[derive(Debug, Default, Clone)]
struct ReplyDecoder;

impl Encoder for PreEncoder {
    type Item = Encoded;
    type Error = tonic::Status;
    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_u8(0x09); // field 1, fixed64
        dst.put_u64_le(item.client_id);
        dst.put_u8(0x10); // field 2, varint
        let mut seq = Vec::with_capacity(10);
        prost::encoding::encode_varint(item.seq, &mut seq);
        dst.put_slice(&seq);
        dst.put_slice(&item.body);
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

impl Codec for PreEncodedCodec {
    type Encode = Encoded;
    type Decode = IngestReply;
    type Encoder = PreEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> PreEncoder {
        PreEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

/// Streams `batches` batches over one connection and waits until the last is acknowledged.
/// After a refusal (RESOURCE_EXHAUSTED, UNAVAILABLE) it reconnects and resends everything not
/// yet acknowledged, as a real client does. Returns the number of refusals.
async fn connection(
    link: Link,
    grpc: SocketAddr,
    client_id: u64,
    batches: u64,
    bodies: Vec<Bytes>,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let channel = link.channel(grpc).await?;
    let path = http::uri::PathAndQuery::from_static("/tailscope.v1.Ingest/Stream");
    let mut acked = 0;
    let mut refusals = 0;
    // When each batch was (last) sent, by seq: its acknowledgement latency is from there.
    let sent: std::sync::Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec![None; batches as usize + 1]));
    let mut latencies = Vec::with_capacity(batches as usize);
    while acked < batches {
        let mut client = tonic::client::Grpc::new(channel.clone());
        client.ready().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut replies = client.streaming(request, path.clone(), PreEncodedCodec).await?.into_inner();
        let (bodies, times) = (bodies.clone(), sent.clone());
        let from = acked + 1;
        let sender = tokio::spawn(async move {
            for seq in from..=batches {
                let body = bodies[seq as usize % bodies.len()].clone();
                times.lock().unwrap_or_else(|e| e.into_inner())[seq as usize] = Some(Instant::now());
                if tx.send(Encoded { client_id, seq, body }).await.is_err() {
                    return None;
                }
            }
            // Keep the stream open until the acknowledgements are read.
            Some(tx)
        });
        loop {
            match replies.message().await {
                // Throttle hints are expected while the benchmark saturates the server.
                Ok(Some(r)) => {
                    let now = Instant::now();
                    let times = sent.lock().unwrap_or_else(|e| e.into_inner());
                    for seq in acked + 1..=r.durable_seq.min(batches) {
                        if let Some(t) = times[seq as usize] {
                            latencies.push(now - t);
                        }
                    }
                    drop(times);
                    acked = acked.max(r.durable_seq);
                    if acked >= batches {
                        break;
                    }
                }
                Ok(None) => bail!("stream of client {client_id} ended at ack {acked} of {batches}"),
                Err(status) if backs_off(status.code()) => {
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                Err(status) => bail!("stream of client {client_id} failed at ack {acked}: {status}"),
            }
        }
        sender.abort();
    }
    Ok((refusals, latencies))
}

/// What the server at `http` stored: the spans it counts over every series in the last hour,
/// its active series, and how long the count took to answer.
async fn stored_counts(http: SocketAddr) -> anyhow::Result<(f64, f64, f64)> {
    let client = reqwest::Client::new();
    let base = format!("http://{http}");
    let started = Instant::now();
    let data = tailscope_load::api::api(
        &client,
        &base,
        "/api/v1/query",
        &[("query", "sum by (service) (increase(span_duration_seconds_count[1h]))".to_owned())],
    )
    .await?;
    let took = started.elapsed().as_secs_f64();
    let counted = data["result"]
        .as_array()
        .context("no result")?
        .iter()
        .filter_map(|r| r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
        .sum();
    let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let active = tailscope_load::api::metric_value(&metrics, "tailscope_active_series")
        .context("no tailscope_active_series in /metrics")?;
    Ok((counted, active, took))
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (_child, grpc, otlp_http, pid, link) = match (args.grpc, args.pid) {
        (Some(g), Some(p)) => (None, g, None, p, Link { ca: None }),
        _ => {
            let (server, dir, link) = start_server(&args)?;
            let (g, h, p) = (server.grpc, server.otlp_http, server.pid());
            (Some((server, dir)), g, Some(h), p, link)
        }
    };
    let per_connection = args.spans / args.batch as u64 / args.connections;
    let bodies = match args.protocol {
        Protocol::Native => templates(&args, template_count(&args)),
        _ => otlp_templates(&args, TEMPLATES),
    };
    let rss_before = status_bytes(pid, "VmRSS:")?;
    let cpu_before = cpu_seconds(pid)?;
    let own_before = cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let mut refusals = 0;
    let mut latencies = Vec::new();
    if args.protocol == Protocol::Native {
        let mut tasks = Vec::new();
        for k in 0..args.connections {
            let client_id = rand::thread_rng().gen::<u64>() | 1;
            tasks.push(tokio::spawn(connection(
                link.clone(),
                grpc,
                client_id + k,
                per_connection,
                bodies.clone(),
            )));
        }
        for t in tasks {
            let (r, l) = t.await??;
            refusals += r;
            latencies.extend(l);
        }
    } else {
        let addr = match args.protocol {
            Protocol::OtlpGrpc => grpc,
            _ => otlp_http.context("OTLP/HTTP needs a server started by bench")?,
        };
        let mut tasks = Vec::new();
        for _ in 0..args.connections {
            tasks.push(tokio::spawn(otlp_connection(
                args.protocol,
                link.clone(),
                addr,
                per_connection,
                args.in_flight,
                bodies.clone(),
            )));
        }
        for t in tasks {
            let (l, r) = t.await??;
            latencies.extend(l);
            refusals += r;
        }
    }
    latencies.sort_unstable();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64())
    };
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    // The generator's own cost, so the numbers say what limited them: on a machine whose cores
    // the two share, throughput is bounded by both.
    let own = cpu_seconds(std::process::id())? - own_before;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Let idle memory settle for the RSS reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spans = per_connection * args.connections * args.batch as u64;
    // Read before the count below: the check's query (every series, with the query limit
    // raised for it) is not ingest, and its own peak is reported beside it.
    let (rss, peak_rss) = (status_bytes(pid, "VmRSS:")?, status_bytes(pid, "VmHWM:")?);
    let counted = match (&_child, args.check_counts) {
        (Some((server, _)), true) => match stored_counts(server.http).await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("cannot count what the server stored: {e:#}");
                None
            }
        },
        _ => None,
    };
    let report = serde_json::json!({
        "spans": spans,
        "batch_size": args.batch,
        "connections": args.connections,
        "series": args.series,
        "start_spread_seconds": args.start_spread,
        "seconds": elapsed.as_secs_f64(),
        "spans_per_second": spans as f64 / elapsed.as_secs_f64(),
        "server_cpu_seconds": cpu,
        "server_cpu_seconds_per_million_spans": cpu / (spans as f64 / 1e6),
        "generator_cpu_seconds_per_million_spans": own / (spans as f64 / 1e6),
        "generator_ceiling_spans_per_core_second": spans as f64 / own.max(1e-9),
        "machine_busy": (cpu + own) / (elapsed.as_secs_f64() * cores),
        "server_rss_bytes_before": rss_before,
        "server_rss_bytes": rss,
        "server_peak_rss_bytes": peak_rss,
        "count_query_peak_rss_bytes": counted.map(|_| status_bytes(pid, "VmHWM:")).transpose()?,
        "refusals": refusals,
        "protocol": format!("{:?}", args.protocol),
        "ack_seconds_p50": quantile(0.5),
        "ack_seconds_p99": quantile(0.99),
        "spans_counted": counted.map(|c| c.0),
        "active_series": counted.map(|c| c.1),
        "count_query_seconds": counted.map(|c| c.2),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "sent {spans} spans in {:.2} s over {} connections, {} spans per batch, {} series",
            elapsed.as_secs_f64(),
            args.connections,
            args.batch,
            args.series
        );
        println!(
            "  throughput        {:>12.0} spans/s (end to end, acknowledged = durable)",
            report["spans_per_second"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  server CPU        {:>12.3} s, {:.3} CPU-s per million spans",
            cpu,
            report["server_cpu_seconds_per_million_spans"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  generator CPU     {:>12.3} s, {:.3} CPU-s per million spans (ceiling {:.1} M spans/s per core)",
            own,
            report["generator_cpu_seconds_per_million_spans"].as_f64().unwrap_or(0.0),
            report["generator_ceiling_spans_per_core_second"].as_f64().unwrap_or(0.0) / 1e6
        );
        println!(
            "  machine           {:>11.0}% of {cores} cores busy (server + generator)",
            report["machine_busy"].as_f64().unwrap_or(0.0) * 100.0
        );
        println!(
            "  server RSS        {:>12} bytes now, {} peak, {} before",
            report["server_rss_bytes"], report["server_peak_rss_bytes"], rss_before
        );
        if let Some((stored, active, took)) = counted {
            println!(
                "  stored            {stored:>12.0} spans counted of {spans} sent, {active:.0} active series (counted in {took:.1} s, server RSS peak {} with the count)",
                report["count_query_peak_rss_bytes"]
            );
        }
        if let (Some(p50), Some(p99)) = (quantile(0.5), quantile(0.99)) {
            println!(
                "  {}       p50 {:.1} ms, p99 {:.1} ms ({refusals} refused)",
                if args.protocol == Protocol::Native { "batch acks " } else { "export acks" },
                p50 * 1e3,
                p99 * 1e3
            );
        }
    }
    Ok(())
}
