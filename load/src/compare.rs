//! `tailscope-load compare`: the same spans in tailscope and in a real Prometheus, both asked the
//! same quantile queries over HTTP in one run — latency, server CPU per query, bytes, and each
//! answer's error against the exact quantile of the spans.
//!
//! The spans are generated in time order, five seconds of every series at a time, each five
//! seconds of a series from its own seed (so any window's spans can be generated again for the
//! exact answer). They go to a tailscope server started for the run over the native stream, and
//! the same spans become:
//! * classic histograms with Prometheus' default buckets, sampled every `--scrape-interval` as
//!   a scrape would read them, written as OpenMetrics and backfilled into a real Prometheus with
//!   `promtool tsdb create-blocks-from openmetrics` (its data in persisted blocks, as a
//!   Prometheus that has been running holds anything older than a couple of hours);
//! * with `--native`, native histograms at schema 3 (client_golang's default bucket factor
//!   1.1), remote-written in time order to a second Prometheus run with
//!   `--enable-feature=native-histograms` (its data in the head, as recent data is).
//!
//! tailscope is measured twice: right after ingest ("fresh": much of it still in memtables)
//! and after a restart on its flushed and fully compacted store ("compacted").

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tailscope_proto::v1::ingest_client::IngestClient;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, Span, SpanBatch};
use tailscope_server::remote_write::wire;

use crate::bench::{backs_off, cpu_seconds, status_bytes};
use crate::child::{server_bin, ChildServer};

/// Seconds of one series generated from one seed: the grid every exact answer is computed on.
const UNIT: i64 = 5;
/// The services the series spread over (series `s` is `service-{s % 10}`, `operation-{s / 10}`).
const SERVICES: usize = 10;
/// client_golang's `DefBuckets`, the buckets of a Prometheus histogram nobody tuned.
const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// The native histograms' schema: client_golang's default `NativeHistogramBucketFactor` 1.1.
const NATIVE_SCHEMA: i32 = 3;
/// The queries' rate range, seconds.
const RANGE: i64 = 300;
/// Spans per ingest batch.
const BATCH_SPANS: usize = 4000;

/// Options of `compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Series: 10 services, `series / 10` operations each (every operation in every service).
    #[arg(long, default_value_t = 100)]
    series: usize,
    /// History the spans cover, ending a minute before the run starts (e.g. 1h, 24h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    history: Duration,
    /// Spans per second of each series.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// How often Prometheus' classic samples are taken (a multiple of 5 s).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    scrape_interval: Duration,
    /// Steps of the range queries over the history (each a multiple of 5 s).
    #[arg(long, default_value_t = 240)]
    steps: u64,
    /// Times each query is asked of each server, after one warm-up that is not measured.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Steps of each range answer checked against the exact quantile of the spans.
    #[arg(long, default_value_t = 12)]
    check_steps: usize,
    /// Also compare with native histograms: a second Prometheus with
    /// `--enable-feature=native-histograms`, fed the same spans by remote write at schema 3.
    #[arg(long)]
    native: bool,
    /// The tailscope-server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The Prometheus binary.
    #[arg(long, default_value = "prometheus")]
    prometheus: PathBuf,
    /// The promtool binary.
    #[arg(long, default_value = "promtool")]
    promtool: PathBuf,
    /// Seed of the spans.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// The spans: which series, which seconds, how many per second.
#[derive(Debug, Clone)]
struct Dataset {
    seed: u64,
    series: usize,
    rate: f64,
    /// Unix seconds of the first unit (a whole minute).
    start: i64,
    units: i64,
}

impl Dataset {
    fn service(s: usize) -> String {
        format!("service-{}", s % SERVICES)
    }

    fn operation(s: usize) -> String {
        format!("operation-{}", s / SERVICES)
    }

    fn end(&self) -> i64 {
        self.start + self.units * UNIT
    }

    /// The spans of series `s` in unit `unit`: (start, duration), nanoseconds. Three shapes
    /// (lognormal, bimodal, Pareto tail), each drifting over the hour so quantiles move.
    fn spans(&self, s: usize, unit: i64) -> Vec<(i64, i64)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, s as u64, unit as u64));
        let expected = self.rate * UNIT as f64;
        let n = expected as usize + usize::from(rng.gen_bool(expected.fract()));
        let at = (self.start + unit * UNIT) * 1_000_000_000;
        let phase = (unit * UNIT) as f64 / 3600.0 * std::f64::consts::TAU + s as f64;
        let drift = 1.0 + 0.5 * phase.sin();
        (0..n)
            .map(|_| {
                let seconds = match s % 3 {
                    0 => {
                        let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
                        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                        0.02 * (1.0 + (s % 7) as f64 / 4.0) * drift * (0.6 * z).exp()
                    }
                    1 if rng.gen_bool(0.95) => rng.gen_range(0.002..0.003),
                    1 => rng.gen_range(0.4..0.6) * drift,
                    _ => 0.005 * drift * rng.gen_range(f64::EPSILON..1.0f64).powf(-1.0 / 1.2),
                };
                let nanos = (seconds.min(60.0) * 1e9) as i64;
                (at + rng.gen_range(0..UNIT * 1_000_000_000), nanos.max(1))
            })
            .collect()
    }

    /// The exact `q` quantile (nearest rank) of the spans of `members` that start in
    /// `[t - RANGE, t)`, seconds; `None` if there are none.
    fn exact(&self, members: &[usize], t: i64, q: f64) -> Option<f64> {
        let first = ((t - RANGE - self.start) / UNIT).max(0);
        let last = ((t - self.start) / UNIT).min(self.units);
        let mut all: Vec<i64> = Vec::new();
        for &s in members {
            for unit in first..last {
                all.extend(self.spans(s, unit).into_iter().map(|(_, d)| d));
            }
        }
        if all.is_empty() {
            return None;
        }
        all.sort_unstable();
        let rank = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len());
        Some(all[rank - 1] as f64 / 1e9)
    }
}

/// splitmix64 over the three parts of a unit's seed.
fn mix(seed: u64, series: u64, unit: u64) -> u64 {
    let mut z = seed ^ series.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ unit.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A series' counters as a scrape reads them: everything that started before the scrape.
#[derive(Debug, Default, Clone)]
struct Counters {
    classic: [u64; DEFAULT_BUCKETS.len()],
    count: u64,
    sum: f64,
    native: BTreeMap<i32, u64>,
}

impl Counters {
    fn observe(&mut self, seconds: f64, native: bool) {
        if let Some(i) = DEFAULT_BUCKETS.iter().position(|&b| seconds <= b) {
            self.classic[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
        if native {
            *self.native.entry(wire::native_index(seconds, NATIVE_SCHEMA)).or_default() += 1;
        }
    }

    /// The classic histogram's OpenMetrics lines at unix second `ts`.
    fn openmetrics(&self, labels: &str, ts: i64, out: &mut impl Write) -> std::io::Result<()> {
        let mut cumulative = 0;
        for (le, n) in DEFAULT_BUCKETS.iter().zip(self.classic) {
            cumulative += n;
            writeln!(out, "span_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative} {ts}")?;
        }
        writeln!(out, "span_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {} {ts}", self.count)?;
        writeln!(out, "span_duration_seconds_count{{{labels}}} {} {ts}", self.count)?;
        writeln!(out, "span_duration_seconds_sum{{{labels}}} {} {ts}", self.sum)
    }
}

/// A peer process (Prometheus), killed when dropped.
struct Peer {
    child: Child,
    base: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Prometheus on `data` (a free port, a config without scrape targets) and waits until
/// it is ready.
async fn start_prometheus(bin: &Path, dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<Peer> {
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(&config, "global:\n  scrape_interval: 1m\n")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join(name).display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--storage.tsdb.retention.time=100y")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {} (Debian's `prometheus` package)", bin.display()))?;
    let mut peer = Peer { child, base: format!("http://127.0.0.1:{port}") };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http.get(format!("{}/-/ready", peer.base)).send().await {
            if r.status().is_success() {
                return Ok(peer);
            }
        }
        if let Some(status) = peer.child.try_wait()? {
            bail!("{name} exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        if Instant::now() > deadline {
            bail!("{name} not ready after 2 minutes: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Batches sent to tailscope and not yet acknowledged, at most: past it the loader waits.
const UNACKED: usize = 64;

/// Consecutive refusals (each after a longer backoff, to 1 s) before the loader gives up.
const REFUSALS: u32 = 120;

/// One ingest stream: batches go in, acknowledgements are read alongside.
struct Stream {
    tx: tokio::sync::mpsc::Sender<SpanBatch>,
    acked: tokio::sync::watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<Result<(), tonic::Status>>,
}

impl Stream {
    async fn open(grpc: std::net::SocketAddr) -> anyhow::Result<Stream> {
        let mut client = IngestClient::connect(format!("http://{grpc}")).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let mut replies = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let (acked_tx, acked) = tokio::sync::watch::channel(0);
        let reader = tokio::spawn(async move {
            while let Some(reply) = replies.message().await? {
                acked_tx.send_replace(reply.durable_seq);
            }
            Ok(())
        });
        Ok(Stream { tx, acked, reader })
    }

    /// Why it ended: the status tailscope ended it with, if any.
    async fn end(&mut self) -> anyhow::Result<tonic::Status> {
        match (&mut self.reader).await {
            Ok(Err(status)) => Ok(status),
            Ok(Ok(())) => Ok(tonic::Status::unavailable("tailscope ended the ingest stream")),
            Err(e) => Err(anyhow!(e)),
        }
    }
}

/// The native stream to tailscope as a client should keep it: batches numbered one by one,
/// kept until acknowledged, and on a refusal to back off (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`)
/// or a broken connection resent from the watermark on a new stream — tailscope counts each
/// batch once.
struct Ingest {
    grpc: std::net::SocketAddr,
    stream: Stream,
    seq: u64,
    /// The highest seq acknowledged as durable.
    acked: u64,
    unacked: std::collections::VecDeque<SpanBatch>,
    groups: Vec<SeriesGroup>,
    spans: usize,
    /// Refusals backed off from, for the report.
    refusals: u64,
}

impl Ingest {
    async fn connect(grpc: std::net::SocketAddr) -> anyhow::Result<Ingest> {
        let stream = Stream::open(grpc).await?;
        Ok(Ingest {
            grpc,
            stream,
            seq: 0,
            acked: 0,
            unacked: Default::default(),
            groups: Vec::new(),
            spans: 0,
            refusals: 0,
        })
    }

    async fn push(&mut self, group: SeriesGroup) -> anyhow::Result<()> {
        self.spans += group.spans.len();
        self.groups.push(group);
        if self.spans >= BATCH_SPANS {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> anyhow::Result<()> {
        if self.groups.is_empty() {
            return Ok(());
        }
        self.seq += 1;
        let batch = SpanBatch {
            client_id: 0xc0_3a7e,
            seq: self.seq,
            groups: std::mem::take(&mut self.groups),
            deltas: vec![],
        };
        self.spans = 0;
        self.unacked.push_back(batch.clone());
        if self.stream.tx.send(batch).await.is_err() {
            self.recover().await?;
        }
        while self.unacked.len() > UNACKED {
            let oldest = self.unacked.front().map_or(0, |b| b.seq);
            self.wait_for(oldest).await?;
        }
        Ok(())
    }

    /// Waits until `seq` is durable, recovering the stream as often as tailscope asks.
    async fn wait_for(&mut self, seq: u64) -> anyhow::Result<()> {
        while self.acked < seq {
            let waited = self.stream.acked.wait_for(|&a| a >= seq).await.map(|a| *a);
            match waited {
                Ok(a) => self.acknowledged(a),
                Err(_) => self.recover().await?,
            }
        }
        Ok(())
    }

    fn acknowledged(&mut self, durable: u64) {
        self.acked = self.acked.max(durable);
        while self.unacked.front().is_some_and(|b| b.seq <= self.acked) {
            self.unacked.pop_front();
        }
    }

    /// The stream ended: if tailscope asked for a backoff (or could not be reached), waits,
    /// opens a new stream and resends every unacknowledged batch with its seq; otherwise fails
    /// with tailscope's reason.
    async fn recover(&mut self) -> anyhow::Result<()> {
        let acked = *self.stream.acked.borrow();
        self.acknowledged(acked);
        let mut why = self.stream.end().await?;
        for attempt in 1..=REFUSALS {
            // A stream the connection under it broke (the server died or restarted; tonic gives
            // the transport's error as the source, under whatever code) is tried again as well.
            let broken = std::error::Error::source(&why).is_some();
            if !(backs_off(why.code()) || broken) {
                bail!("tailscope refused a batch: {why}");
            }
            self.refusals += 1;
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(20)))).await;
            let mut stream = match Stream::open(self.grpc).await {
                Ok(stream) => stream,
                Err(e) => {
                    why = tonic::Status::unavailable(format!("cannot reconnect: {e:#}"));
                    continue;
                }
            };
            let mut resent = true;
            for batch in &self.unacked {
                if stream.tx.send(batch.clone()).await.is_err() {
                    resent = false;
                    break;
                }
            }
            if resent {
                self.stream = stream;
                return Ok(());
            }
            let acked = *stream.acked.borrow();
            self.acknowledged(acked);
            why = stream.end().await?;
        }
        bail!("tailscope refused {REFUSALS} times in a row, the last: {why}")
    }

    /// Sends what is left and waits until every batch is durable; returns the refusals backed
    /// off from.
    async fn finish(mut self) -> anyhow::Result<u64> {
        self.send().await?;
        self.wait_for(self.seq).await?;
        Ok(self.refusals)
    }
}

/// Generates the spans and hands them to tailscope, to the OpenMetrics file and (with
/// `native`) to the native Prometheus by remote write. Returns the spans generated and the
/// times tailscope asked the loader to back off (each time it resent from its watermark).
async fn load(
    data: &Dataset,
    scrape: i64,
    grpc: std::net::SocketAddr,
    openmetrics: &Path,
    native: Option<&str>,
) -> anyhow::Result<(u64, u64)> {
    let mut ingest = Ingest::connect(grpc).await?;
    let mut om = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(openmetrics)?);
    writeln!(om, "# TYPE span_duration_seconds histogram")?;
    let labels: Vec<String> = (0..data.series)
        .map(|s| format!("service=\"{}\",operation=\"{}\"", Dataset::service(s), Dataset::operation(s)))
        .collect();
    let mut counters = vec![Counters::default(); data.series];
    let http = reqwest::Client::new();
    let mut spans = 0u64;
    let sample = |counters: &[Counters], ts: i64, om: &mut std::io::BufWriter<std::fs::File>| {
        counters.iter().zip(&labels).try_for_each(|(c, l)| c.openmetrics(l, ts, om))
    };
    sample(&counters, data.start, &mut om)?;
    if let Some(url) = native {
        remote_write(&http, url, &counters, data.start).await?;
    }
    for unit in 0..data.units {
        for (s, c) in counters.iter_mut().enumerate() {
            let generated = data.spans(s, unit);
            spans += generated.len() as u64;
            for &(_, d) in &generated {
                c.observe(d as f64 / 1e9, native.is_some());
            }
            let spans = generated
                .into_iter()
                .map(|(start, duration)| Span {
                    span_id: start as u64 ^ duration as u64,
                    start_unix_nanos: start,
                    duration_nanos: duration,
                    adjusted_count: 1.0,
                    ..Default::default()
                })
                .collect();
            let key = SeriesKey {
                service: Dataset::service(s),
                operation: Dataset::operation(s),
                ..Default::default()
            };
            ingest.push(SeriesGroup { key: Some(key), spans }).await?;
        }
        let ts = data.start + (unit + 1) * UNIT;
        if (ts - data.start) % scrape == 0 {
            sample(&counters, ts, &mut om)?;
            if let Some(url) = native {
                remote_write(&http, url, &counters, ts).await?;
            }
        }
    }
    writeln!(om, "# EOF")?;
    om.flush()?;
    let refusals = ingest.finish().await?;
    Ok((spans, refusals))
}

/// Every series' native histogram at unix second `ts`, remote-written to `url`.
async fn remote_write(
    http: &reqwest::Client,
    url: &str,
    counters: &[Counters],
    ts: i64,
) -> anyhow::Result<()> {
    let timeseries = counters
        .iter()
        .enumerate()
        .map(|(s, c)| {
            let mut labels = vec![
                wire::Label { name: "__name__".into(), value: "span_duration_seconds".into() },
                wire::Label { name: "operation".into(), value: Dataset::operation(s) },
                wire::Label { name: "service".into(), value: Dataset::service(s) },
            ];
            labels.sort_by(|a, b| a.name.cmp(&b.name));
            let histogram = wire::native_histogram(&c.native, 0, c.sum, NATIVE_SCHEMA, ts * 1000);
            wire::TimeSeries { labels, samples: vec![], histograms: vec![histogram] }
        })
        .collect();
    let body = wire::encode(&wire::WriteRequest { timeseries })?;
    let response = http
        .post(url)
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body)
        .send()
        .await?;
    if !response.status().is_success() {
        let status = response.status();
        bail!("remote write to {url}: {status} {}", response.text().await.unwrap_or_default());
    }
    Ok(())
}

/// Something asked the queries: its base URL and process.
struct Target<'a> {
    name: &'a str,
    base: String,
    pid: u32,
}

/// One answer: wall time, the server's CPU time, body bytes, and its `data`.
struct Answer {
    seconds: f64,
    cpu: f64,
    bytes: usize,
    data: Value,
}

async fn ask(
    http: &reqwest::Client,
    target: &Target<'_>,
    path: &str,
    form: &[(&str, String)],
) -> anyhow::Result<Answer> {
    let cpu = cpu_seconds(target.pid)?;
    let started = Instant::now();
    let body = http
        .post(format!("{}{path}", target.base))
        .form(form)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", target.name))?
        .bytes()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(target.pid)? - cpu;
    let v: Value = serde_json::from_slice(&body).with_context(|| format!("{}: not JSON", target.name))?;
    anyhow::ensure!(v["status"] == "success", "{} {path} {form:?}: {v}", target.name);
    Ok(Answer { seconds, cpu, bytes: body.len(), data: v["data"].clone() })
}

/// A query's answer as group → points (unix seconds, value).
fn points(data: &Value) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut out = BTreeMap::new();
    for row in data["result"].as_array().into_iter().flatten() {
        let m = &row["metric"];
        let key = match (m["service"].as_str(), m["operation"].as_str()) {
            (Some(s), Some(o)) => format!("{s}/{o}"),
            (None, Some(o)) => o.to_owned(),
            _ => String::new(),
        };
        let values: Vec<&Value> = match row.get("values") {
            Some(v) => v.as_array().into_iter().flatten().collect(),
            None => vec![&row["value"]],
        };
        let parsed = values
            .into_iter()
            .filter_map(|p| Some((p[0].as_f64()? as i64, p[1].as_str()?.parse::<f64>().ok()?)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        out.insert(key, parsed);
    }
    out
}

/// The queries: p99 by operation (every service's series of it summed) and by series.
const GROUPINGS: [&[&str]; 2] = [&["operation"], &["service", "operation"]];

/// How a peer writes the query for a grouping.
type Expression = fn(&[&str]) -> String;

fn classic(by: &[&str]) -> String {
    format!(
        "histogram_quantile(0.99, sum by ({}, le) (rate(span_duration_seconds_bucket[5m])))",
        by.join(", ")
    )
}

fn native(by: &[&str]) -> String {
    format!("histogram_quantile(0.99, sum by ({}) (rate(span_duration_seconds[5m])))", by.join(", "))
}

/// Errors of an answer against the exact quantiles at the checked times.
#[derive(Debug, Default)]
struct Errors {
    /// |relative error| of each checked point.
    all: Vec<f64>,
    /// Exact points the answer had no value for.
    missing: usize,
}

impl Errors {
    fn summary(&mut self) -> Value {
        let median = median(&mut self.all);
        json!({
            "checked": self.all.len(),
            "missing": self.missing,
            "median": median,
            "max": self.all.iter().copied().reduce(f64::max),
        })
    }
}

/// Checks `answer` at `times` against the exact p99 of each group.
fn check(
    data: &Dataset,
    members: &BTreeMap<String, Vec<usize>>,
    answer: &BTreeMap<String, Vec<(i64, f64)>>,
    times: &[i64],
    exact: &mut BTreeMap<(String, i64), Option<f64>>,
) -> Errors {
    let mut errors = Errors::default();
    for (key, series) in members {
        let got: BTreeMap<i64, f64> =
            answer.get(key).map(|p| p.iter().copied().collect()).unwrap_or_default();
        for &t in times {
            let want = *exact.entry((key.clone(), t)).or_insert_with(|| data.exact(series, t, 0.99));
            match (want, got.get(&t)) {
                (Some(w), Some(g)) => errors.all.push((g - w).abs() / w),
                (Some(_), None) => errors.missing += 1,
                _ => {}
            }
        }
    }
    errors
}

/// The median of `v`, which is left sorted; `None` when empty.
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Asks `targets` (tailscope first) the same query `repeat` times each, interleaved, after a
/// warm-up; returns each one's measurement and its last answer.
async fn measure(
    http: &reqwest::Client,
    targets: &[(&Target<'_>, String)],
    path: &str,
    form: &[(&str, String)],
    repeat: usize,
) -> anyhow::Result<Vec<(Value, Value)>> {
    let with_query = |expr: &str| {
        let mut f = vec![("query", expr.to_owned())];
        f.extend(form.iter().cloned());
        f
    };
    for (target, expr) in targets {
        ask(http, target, path, &with_query(expr)).await?;
    }
    let mut seconds = vec![Vec::new(); targets.len()];
    let mut cpu = vec![0.0; targets.len()];
    let mut last = Vec::new();
    for _ in 0..repeat.max(1) {
        last.clear();
        for (i, (target, expr)) in targets.iter().enumerate() {
            let a = ask(http, target, path, &with_query(expr)).await?;
            seconds[i].push(a.seconds);
            cpu[i] += a.cpu;
            last.push((a.bytes, a.data));
        }
    }
    Ok(targets
        .iter()
        .enumerate()
        .map(|(i, (target, expr))| {
            let (bytes, data) = last[i].clone();
            let median_seconds = median(&mut seconds[i]);
            let report = json!({
                "server": target.name,
                "query": expr,
                "median_seconds": median_seconds,
                "min_seconds": seconds[i].first().copied(),
                "cpu_seconds_per_query": cpu[i] / repeat.max(1) as f64,
                "bytes": bytes,
            });
            (report, data)
        })
        .collect())
}

/// One pass over every query shape: tailscope next to each peer.
#[allow(clippy::too_many_arguments)]
async fn pass(
    state: &str,
    args: &CompareArgs,
    data: &Dataset,
    tailscope: &Target<'_>,
    peers: &[(&Target<'_>, Expression)],
    members: &[BTreeMap<String, Vec<usize>>; 2],
    exact: &mut BTreeMap<(String, i64), Option<f64>>,
) -> anyhow::Result<Vec<Value>> {
    let http = reqwest::Client::new();
    let end = data.end();
    // As a dashboard asks: the whole history in `steps` steps (15 s for an hour in 240), ending
    // now. Checked are the steps on the 10 s grid (between grid points an answer reads the
    // windows around the step) whose rate window lies wholly in the data.
    let steps = args.steps.max(1) as i64;
    let step = (data.units * UNIT / steps / UNIT * UNIT).max(UNIT);
    let first = end - steps * step;
    let range_times: Vec<i64> =
        (0..=steps).map(|i| first + i * step).filter(|t| t % 10 == 0 && t - RANGE >= data.start).collect();
    let checked: Vec<i64> = if range_times.len() <= args.check_steps {
        range_times.clone()
    } else {
        (0..args.check_steps)
            .map(|i| range_times[i * (range_times.len() - 1) / (args.check_steps - 1).max(1)])
            .collect()
    };
    let mut rows = Vec::new();
    for (g, by) in GROUPINGS.iter().enumerate() {
        for (shape, path, form, times) in [
            ("instant", "/api/v1/query", vec![("time", end.to_string())], vec![end]),
            (
                "range",
                "/api/v1/query_range",
                vec![("start", first.to_string()), ("end", end.to_string()), ("step", step.to_string())],
                checked.clone(),
            ),
        ] {
            for (peer, peer_expr) in peers {
                let targets = [(tailscope, classic(by)), (*peer, peer_expr(by))];
                let measured = measure(&http, &targets, path, &form, args.repeat).await?;
                let [(ours, our_answer), (theirs, their_answer)] = &measured[..] else {
                    bail!("two servers asked, {} answers", measured.len())
                };
                let mut error =
                    |answer: &Value| check(data, &members[g], &points(answer), &times, exact).summary();
                let (our_error, their_error) = (error(our_answer), error(their_answer));
                let ratio = ours["median_seconds"].as_f64().unwrap_or(f64::NAN)
                    / theirs["median_seconds"].as_f64().unwrap_or(f64::NAN);
                rows.push(json!({
                    "state": state,
                    "by": by.join(","),
                    "shape": shape,
                    "peer": peer.name,
                    "tailscope": ours,
                    "peer_result": theirs,
                    "latency_ratio": ratio,
                    "tailscope_error": our_error,
                    "peer_error": their_error,
                }));
            }
        }
    }
    Ok(rows)
}

/// A metric of Prometheus' own `/metrics`.
async fn own_metric(http: &reqwest::Client, target: &Target<'_>, name: &str) -> anyhow::Result<f64> {
    let text = http.get(format!("{}/metrics", target.base)).send().await?.text().await?;
    tailscope_load::api::metric_value(&text, name)
        .with_context(|| format!("no {name} in {}'s /metrics", target.name))
}

/// Waits until Prometheus has had a compaction cycle and its block count has not changed for
/// ten seconds; returns the count.
async fn settled_blocks(http: &reqwest::Client, target: &Target<'_>) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = (f64::NAN, Instant::now());
    loop {
        let triggered = own_metric(http, target, "prometheus_tsdb_compactions_triggered_total").await?;
        let blocks = own_metric(http, target, "prometheus_tsdb_blocks_loaded").await?;
        if blocks != last.0 {
            last = (blocks, Instant::now());
        } else if triggered >= 1.0 && last.1.elapsed() >= Duration::from_secs(10) {
            return Ok(blocks);
        }
        if Instant::now() > deadline {
            bail!("{} did not settle its blocks in 10 minutes", target.name);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sends SIGTERM to tailscope, flushes and compacts its store, and starts it again.
fn compacted(
    server: &mut ChildServer,
    bin: &Path,
    data_dir: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<ChildServer> {
    server.stop()?;
    {
        let store = tailscope_server::store::Store::open(
            data_dir,
            tailscope_proto::histogram::Layout::default(),
            &tailscope_server::telemetry::Metrics::new(),
        )?;
        store.flush()?;
        for res in tailscope_server::store::Resolution::ALL {
            store.compact(res)?;
        }
    }
    ChildServer::start(bin, data_dir, "127.0.0.1:0", "127.0.0.1:0", env)
}

/// Runs the comparison.
pub async fn run(args: CompareArgs) -> anyhow::Result<()> {
    let scrape = args.scrape_interval.as_secs() as i64;
    if scrape < UNIT || scrape % UNIT != 0 {
        bail!("--scrape-interval must be a multiple of {UNIT} s");
    }
    if args.series == 0 || args.history.as_secs() < 2 * RANGE as u64 || args.rate.is_nan() || args.rate <= 0.0
    {
        bail!("--series must be positive, --history at least 10m, --rate positive");
    }
    let bin = server_bin(args.server_bin.as_deref())?;
    let dir = tempfile::tempdir()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let end = now / 60 * 60 - 60;
    let units = args.history.as_secs() as i64 / UNIT;
    let data =
        Dataset { seed: args.seed, series: args.series, rate: args.rate, start: end - units * UNIT, units };
    let mut members: [BTreeMap<String, Vec<usize>>; 2] = Default::default();
    for s in 0..args.series {
        members[0].entry(Dataset::operation(s)).or_default().push(s);
        members[1].entry(format!("{}/{}", Dataset::service(s), Dataset::operation(s))).or_default().push(s);
    }

    let env = vec![
        ("TAILSCOPE_INGEST_ALLOWED_LATENESS", format!("{}s", args.history.as_secs() + 900)),
        ("TAILSCOPE_QUERY_MAX_SERIES", (args.series * 2 + 1).max(50_000).to_string()),
    ];
    let tailscope_dir = dir.path().join("tailscope");
    let mut server = ChildServer::start(&bin, &tailscope_dir, "127.0.0.1:0", "127.0.0.1:0", &env)?;
    let native_peer = if args.native {
        Some(
            start_prometheus(
                &args.prometheus,
                dir.path(),
                "prometheus-native",
                &["--enable-feature=native-histograms", "--web.enable-remote-write-receiver"],
            )
            .await?,
        )
    } else {
        None
    };
    let openmetrics = dir.path().join("spans.om");
    let started = Instant::now();
    let native_url = native_peer.as_ref().map(|p| format!("{}/api/v1/write", p.base));
    let (spans, refusals) = load(&data, scrape, server.grpc, &openmetrics, native_url.as_deref()).await?;
    let load_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {spans} spans over {} series in {load_seconds:.1} s ({refusals} backoffs asked by tailscope, each batch resent from the watermark)",
        args.series
    );

    let started = Instant::now();
    let out = Command::new(&args.promtool)
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&openmetrics)
        .arg(dir.path().join("prometheus"))
        .output()
        .with_context(|| format!("cannot run {} (Debian's `prometheus` package)", args.promtool.display()))?;
    anyhow::ensure!(out.status.success(), "promtool: {}", String::from_utf8_lossy(&out.stderr));
    let backfill_seconds = started.elapsed().as_secs_f64();
    let openmetrics_bytes = std::fs::metadata(&openmetrics)?.len();
    std::fs::remove_file(&openmetrics)?;
    eprintln!(
        "backfilled Prometheus from {openmetrics_bytes} bytes of OpenMetrics in {backfill_seconds:.1} s"
    );
    let classic_peer = start_prometheus(&args.prometheus, dir.path(), "prometheus", &[]).await?;

    let prometheus =
        Target { name: "prometheus", base: classic_peer.base.clone(), pid: classic_peer.child.id() };
    let native_target = native_peer.as_ref().map(|p| Target {
        name: "prometheus-native",
        base: p.base.clone(),
        pid: p.child.id(),
    });
    let mut peers: Vec<(&Target<'_>, Expression)> = vec![(&prometheus, classic)];
    if let Some(t) = &native_target {
        peers.push((t, native));
    }
    let http = reqwest::Client::new();
    let mut exact = BTreeMap::new();
    let mut rows = Vec::new();
    let fresh = Target { name: "tailscope", base: format!("http://{}", server.http), pid: server.pid() };
    rows.extend(pass("fresh", &args, &data, &fresh, &peers, &members, &mut exact).await?);
    let server = compacted(&mut server, &bin, &tailscope_dir, &env)?;
    // Prometheus compacts promtool's 2-hour blocks in the background, at its first compaction
    // tick (a minute after start): the second pass waits until that has run and settled.
    let blocks = settled_blocks(&http, &prometheus).await?;
    eprintln!("Prometheus settled at {blocks} blocks");
    let settled = Target { name: "tailscope", base: format!("http://{}", server.http), pid: server.pid() };
    rows.extend(pass("compacted", &args, &data, &settled, &peers, &members, &mut exact).await?);

    let report = json!({
        "series": args.series,
        "history_seconds": args.history.as_secs(),
        "spans": spans,
        "rate_per_series": args.rate,
        "scrape_interval_seconds": scrape,
        "steps": args.steps,
        "repeat": args.repeat,
        "load_seconds": load_seconds,
        "load_backoffs": refusals,
        "openmetrics_bytes": openmetrics_bytes,
        "backfill_seconds": backfill_seconds,
        "tailscope_peak_rss_bytes": status_bytes(server.pid(), "VmHWM:")?,
        "prometheus_peak_rss_bytes": status_bytes(prometheus.pid, "VmHWM:")?,
        "rows": rows,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

/// The report as a markdown table.
fn print_table(report: &Value) {
    println!(
        "{} series, {} s of history, {} spans; Prometheus scraped every {} s",
        report["series"], report["history_seconds"], report["spans"], report["scrape_interval_seconds"]
    );
    println!("| tailscope | p99 by | shape | peer | tailscope ms | peer ms | ratio | CPU ms (t/p) | bytes (t/p) | tailscope error max | peer error median / max |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let pct = |v: &Value| v.as_f64().map_or("–".to_owned(), |x| format!("{:.2} %", x * 100.0));
    for r in report["rows"].as_array().into_iter().flatten() {
        let (t, p) = (&r["tailscope"], &r["peer_result"]);
        let ms = |v: &Value| v["median_seconds"].as_f64().unwrap_or(f64::NAN) * 1e3;
        let cpu = |v: &Value| v["cpu_seconds_per_query"].as_f64().unwrap_or(f64::NAN) * 1e3;
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2}× | {:.0} / {:.0} | {} / {} | {} ({} missing) | {} / {} ({} missing) |",
            r["state"].as_str().unwrap_or(""),
            r["by"].as_str().unwrap_or(""),
            r["shape"].as_str().unwrap_or(""),
            r["peer"].as_str().unwrap_or(""),
            ms(t),
            ms(p),
            r["latency_ratio"].as_f64().unwrap_or(f64::NAN),
            cpu(t),
            cpu(p),
            t["bytes"],
            p["bytes"],
            pct(&r["tailscope_error"]["max"]),
            r["tailscope_error"]["missing"],
            pct(&r["peer_error"]["median"]),
            pct(&r["peer_error"]["max"]),
            r["peer_error"]["missing"],
        );
    }
}

#[cfg(test)]
mod tests;
