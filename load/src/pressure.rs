//! `tailscope-load pressure`: the server's memory and ingest acknowledgement latency while the
//! heaviest requests its limits allow run, next to idle.
//!
//! A server child process is loaded with `--series` series (1,000 operations per service)
//! and `--history` seconds of windows, with an Alertmanager configuration that has a webhook
//! receiver (served here, answering 200) and an inhibit rule. Then, phase by phase, a probe
//! sends a one-span OTLP/HTTP export every 20 ms (answered once durable, as an SDK waits for
//! it) and times each answer while the phase's requests run, and the server's RSS is read
//! from `/proc` every 20 ms:
//!
//! - `idle`: nothing else;
//! - `query`: `query.max_concurrency` clients repeating the widest range query the limits
//!   allow — a p99 by every label over every series, at the step that brings it just under
//!   `query.max_samples`;
//! - `labels`: four clients repeating `/api/v1/series` over every series and
//!   `/api/v1/label/operation/values`, without a limit;
//! - `alerts`: posts of 5,000 alerts each (distinct `service`, so each is its own group, half
//!   of them inhibited) up to `alerting.max_alerts`, then more, refused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tailscope_proto::v1::ingest_client::IngestClient;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, Span, SpanBatch};

use crate::child::{server_bin, ChildServer};

/// The server's default `query.max_samples`: the widest query is sized to it.
const MAX_SAMPLES: usize = 10_000_000;
/// The server's default `query.max_concurrency`: that many query clients run at once.
const QUERY_CLIENTS: usize = 4;

/// Options of `pressure`.
#[derive(Debug, clap::Args)]
pub struct PressureArgs {
    /// Series to load (1,000 operations per service). At most `query.max_series` (50,000 by
    /// default), so the widest query is one the limits allow.
    #[arg(long, default_value_t = 49_999)]
    series: usize,
    /// Seconds of history each series gets one span per 10-second window of (at most the
    /// allowed lateness, an hour by default).
    #[arg(long, default_value_t = 600)]
    history: u64,
    /// Spans per batch while loading.
    #[arg(long, default_value_t = 10_000)]
    batch_spans: usize,
    /// Seconds each phase lasts.
    #[arg(long, default_value_t = 15)]
    phase: u64,
    /// The tailscope-server binary to start (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    acks: Vec<Duration>,
    peak_rss: u64,
    requests: u64,
    refused: u64,
}

/// Runs the measurement and prints one row per phase.
pub async fn run(args: PressureArgs) -> anyhow::Result<()> {
    let bin = server_bin(args.server_bin.as_deref())?;
    let dir = tempfile::tempdir()?;
    let hook = receiver().await?;
    let am = dir.path().join("alertmanager.yml");
    std::fs::write(
        &am,
        format!(
            "route:\n  receiver: hook\n  group_by: [alertname, service]\n  group_wait: 0s\n\
             receivers:\n  - name: hook\n    webhook_configs:\n      - url: http://{hook}/\n\
             inhibit_rules:\n  - source_matchers: [severity=\"critical\"]\n    \
             target_matchers: [severity=\"warning\"]\n    equal: [service]\n"
        ),
    )?;
    let data = dir.path().join("data");
    let env = [("TAILSCOPE_ALERTING_ALERTMANAGER_CONFIG", am.display().to_string())];
    let server = ChildServer::start(&bin, &data, "127.0.0.1:0", "127.0.0.1:0", &env)?;
    let pid = server.pid();

    let started = Instant::now();
    let spans = load(server.grpc, args.series, args.history, args.batch_spans).await?;
    println!(
        "loaded {} series, {spans} spans over {} s of history in {:.1} s; RSS {} MiB",
        args.series,
        args.history,
        started.elapsed().as_secs_f64(),
        crate::bench::status_bytes(pid, "VmRSS:")? >> 20
    );

    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let base = format!("http://{}", server.http);
    let phase = Duration::from_secs(args.phase);
    let mut rows = Vec::new();
    rows.push(measure("idle", server.otlp_http, pid, phase, Vec::new()).await?);

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    // The probe's series is selected too.
    let steps = (MAX_SAMPLES / (args.series + 1)).max(2) as u64;
    let (start, end) = (now - args.history, now);
    // `steps` evaluation steps at most: ⌈range / (steps − 1)⌉ apart.
    let step = (end - start).div_ceil(steps - 1).max(1);
    let query = vec![
        ("query", "histogram_quantile(0.99, sum by (le, service, operation, status) (rate(span_duration_seconds_bucket[1m])))".to_owned()),
        ("start", start.to_string()),
        ("end", end.to_string()),
        ("step", step.to_string()),
    ];
    let clients = (0..QUERY_CLIENTS).map(|_| Request::Form("/api/v1/query_range", query.clone())).collect();
    rows.push(measure("query", server.otlp_http, pid, phase, requests(&http, &base, clients)).await?);

    let labels = vec![
        Request::Get("/api/v1/series?match[]={__name__=~\".%2B\"}"),
        Request::Get("/api/v1/series?match[]={__name__=~\".%2B\"}"),
        Request::Get("/api/v1/label/operation/values"),
        Request::Get("/api/v1/label/operation/values"),
    ];
    rows.push(measure("labels", server.otlp_http, pid, phase, requests(&http, &base, labels)).await?);

    let posts = (0..12)
        .map(|i| {
            let alerts: Vec<_> = (0..5_000)
                .map(|j| {
                    let n = i * 5_000 + j;
                    json!({"labels": {
                        "alertname": "Pressure",
                        "service": format!("svc-{}", n / 2),
                        "severity": if n % 2 == 0 { "critical" } else { "warning" },
                    }})
                })
                .collect();
            Request::Json("/api/v2/alerts", serde_json::Value::Array(alerts))
        })
        .collect();
    rows.push(measure("alerts", server.otlp_http, pid, phase, vec![sequence(&http, &base, posts)]).await?);

    let held: Vec<serde_json::Value> = http.get(format!("{base}/api/v2/alerts")).send().await?.json().await?;
    println!("alerts held by the notifier at the end: {}", held.len());
    println!(
        "\n| phase | requests done (refused) | ack p50 | ack p99 | ack max | peak RSS |\n|---|---|---|---|---|---|"
    );
    for mut p in rows {
        p.acks.sort();
        let q =
            |f: f64| p.acks.get(((p.acks.len().max(1) - 1) as f64 * f) as usize).copied().unwrap_or_default();
        println!(
            "| {} | {} ({}) | {:.1} ms | {:.1} ms | {:.1} ms | {} MiB |",
            p.name,
            p.requests,
            p.refused,
            q(0.5).as_secs_f64() * 1e3,
            q(0.99).as_secs_f64() * 1e3,
            q(1.0).as_secs_f64() * 1e3,
            p.peak_rss >> 20
        );
    }
    Ok(())
}

/// One HTTP request a client repeats.
#[derive(Clone)]
enum Request {
    Get(&'static str),
    Form(&'static str, Vec<(&'static str, String)>),
    Json(&'static str, serde_json::Value),
}

impl Request {
    /// Sends it; the answer's status and start when not a 2xx. Fails only when the server is
    /// unreachable.
    async fn send(&self, http: &reqwest::Client, base: &str) -> anyhow::Result<Result<(), String>> {
        let resp = match self {
            Request::Get(path) => http.get(format!("{base}{path}")).send().await,
            Request::Form(path, form) => http.post(format!("{base}{path}")).form(form).send().await,
            Request::Json(path, body) => http.post(format!("{base}{path}")).json(body).send().await,
        }
        .with_context(|| format!("cannot reach {base}"))?;
        let status = resp.status();
        // Read the whole answer, as a client would.
        let body = resp.bytes().await?;
        if status.is_success() {
            return Ok(Ok(()));
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        Ok(Err(format!("{status}: {text}")))
    }
}

/// Counts of a phase's requests: done, and refused (not 2xx), with the first refusal.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    refused: AtomicU64,
    first_refusal: std::sync::Mutex<Option<String>>,
}

impl Counts {
    fn count(&self, answer: Result<(), String>) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = answer {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.first_refusal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
        }
    }
}

/// One client of a phase: started with the stop flag and the counts.
type Client =
    Box<dyn FnOnce(Arc<AtomicBool>, Arc<Counts>) -> tokio::task::JoinHandle<anyhow::Result<()>> + Send>;

/// A phase's load: clients that run until told to stop.
type Load = Vec<Client>;

/// One client per request, each repeating its request until the phase ends.
fn requests(http: &reqwest::Client, base: &str, each: Vec<Request>) -> Load {
    each.into_iter()
        .map(|r| {
            let (http, base) = (http.clone(), base.to_owned());
            Box::new(move |stop: Arc<AtomicBool>, counts: Arc<Counts>| {
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        counts.count(r.send(&http, &base).await?);
                    }
                    Ok(())
                })
            }) as _
        })
        .collect()
}

/// One client sending `requests` once each, in order, until they are done or the phase ends.
fn sequence(http: &reqwest::Client, base: &str, requests: Vec<Request>) -> Client {
    let (http, base) = (http.clone(), base.to_owned());
    Box::new(move |stop: Arc<AtomicBool>, counts: Arc<Counts>| {
        tokio::spawn(async move {
            for r in requests {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                counts.count(r.send(&http, &base).await?);
            }
            Ok(())
        })
    })
}

/// Runs `load` for `length` while probing acknowledgements and sampling RSS.
async fn measure(
    name: &'static str,
    otlp_http: SocketAddr,
    pid: u32,
    length: Duration,
    load: Load,
) -> anyhow::Result<Phase> {
    eprintln!("phase {name}: {} s", length.as_secs());
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let tasks: Vec<_> = load.into_iter().map(|start| start(stop.clone(), counts.clone())).collect();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(crate::bench::status_bytes(pid, "VmRSS:").unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let probe_client = reqwest::Client::new();
    let url = format!("http://{otlp_http}/v1/traces");
    let mut acks = Vec::new();
    let until = Instant::now() + length;
    while Instant::now() < until {
        let sent = Instant::now();
        let resp = probe_client
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(probe())
            .send()
            .await
            .context("OTLP probe")?;
        anyhow::ensure!(resp.status().is_success(), "OTLP probe answered {}", resp.status());
        acks.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let peak_rss = sampler.await?;
    if let Some(e) = counts.first_refusal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        eprintln!("phase {name}: first refusal: {e}");
    }
    Ok(Phase {
        name,
        acks,
        peak_rss,
        requests: counts.done.load(Ordering::Relaxed),
        refused: counts.refused.load(Ordering::Relaxed),
    })
}

/// Wall-clock time, Unix nanoseconds (what spans are stamped with).
pub(crate) fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// One OTLP export of one span, encoded.
fn probe() -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan};
    use prost::Message;
    let start = now_nanos() as u64;
    let span = OtlpSpan {
        trace_id: start.to_be_bytes().repeat(2),
        span_id: start.to_le_bytes().to_vec(),
        name: "ack".into(),
        start_time_unix_nano: start,
        end_time_unix_nano: start + 1_000_000,
        ..Default::default()
    };
    let service = KeyValue {
        key: "service.name".into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue("probe".into())) }),
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: vec![service], ..Default::default() }),
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// Loads `series` series with one span per 10-second window over `history` seconds; returns
/// the spans sent.
async fn load(grpc: SocketAddr, series: usize, history: u64, batch_spans: usize) -> anyhow::Result<u64> {
    let mut client = IngestClient::connect(format!("http://{grpc}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut replies = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let now = now_nanos();
    let windows = (history / 10).max(1) as i64;
    let per_batch = (batch_spans / windows as usize).max(1);
    let batches: Vec<std::ops::Range<usize>> =
        (0..series).step_by(per_batch).map(|s| s..(s + per_batch).min(series)).collect();
    let last = batches.len() as u64;
    if last == 0 {
        bail!("nothing to load: --series is 0");
    }
    let sender = tokio::spawn(async move {
        for (i, range) in batches.into_iter().enumerate() {
            let groups = range
                .map(|s| SeriesGroup {
                    key: Some(SeriesKey {
                        service: format!("svc-{:03}", s / 1000),
                        operation: format!("op-{:03}", s % 1000),
                        ..Default::default()
                    }),
                    spans: (0..windows)
                        .map(|w| Span {
                            start_unix_nanos: now - (w * 10 + 5) * 1_000_000_000,
                            duration_nanos: 1_000_000 + (s as i64 % 97) * 100_000 + w * 1_000,
                            span_id: (s as u64) << 16 | w as u64,
                            ..Default::default()
                        })
                        .collect(),
                })
                .collect();
            let batch = SpanBatch { client_id: 0x10ad, seq: i as u64 + 1, groups, deltas: vec![] };
            if tx.send(batch).await.is_err() {
                break;
            }
        }
        tx
    });
    loop {
        let reply = replies.message().await?.context("load stream ended")?;
        if reply.durable_seq >= last {
            break;
        }
    }
    drop(sender.await?);
    Ok(series as u64 * windows as u64)
}

/// A webhook receiver that answers 200 to everything; its address.
async fn receiver() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
