//! Prometheus remote write out: every flushed epoch's histogram deltas are folded into
//! cumulative per-series counters, and every `send_interval` a snapshot of the series that
//! moved recently is sent to each `[[remote_write]]` target — classic `le` buckets
//! (`span_duration_seconds_bucket`/`_count`/`_sum`, a configurable ladder) and/or native
//! histograms (`span_duration_seconds`, schema chosen by the target) — so an existing
//! Prometheus, Mimir or VictoriaMetrics gets the latency histograms with its own queries.
//!
//! The counters are what a Prometheus scrape of tailscope would read: everything counted so far,
//! late spans included in the next sample (nothing is lost or counted twice; a sample only says
//! "by this time"). They start from zero at start-up, which `rate()` reads as a counter reset,
//! and a series is first sent with a zero sample one interval before its first value, so
//! `rate()` and `increase()` count its first spans too.
//! Requests leave in order from a bounded queue, retried with exponential backoff on 5xx, 429
//! and connection errors; a full queue drops its oldest requests and a 4xx refusal drops the
//! request, both counted in `tailscope_remote_write_samples_dropped_total` — never silently.
//! Since every sample is cumulative, a dropped request loses time resolution, not counts.

pub mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tailscope_proto::histogram::Histogram;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::alerting::receivers::http_config::HttpConfig;
use crate::clock::Clock;
use crate::pipeline::shard::ACTIVE_SECONDS;
use crate::series::{IdBuildHasher, Measure, SeriesLabels};
use crate::store::{EpochSink, EpochWrite};
use crate::telemetry::{Metrics, RemoteDropLabel, RemoteLabel};

#[cfg(test)]
mod tests;

/// Which histogram forms a target receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HistogramForm {
    /// `span_duration_seconds_bucket{le}`, `_count` and `_sum`.
    #[default]
    Classic,
    /// `span_duration_seconds` as a native histogram.
    Native,
    /// Both.
    Both,
}

/// One `[[remote_write]]` target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// Its name in metrics and logs (default: the URL's host and port).
    pub name: String,
    /// Where to `POST`, e.g. `http://prometheus:9090/api/v1/write`.
    pub url: String,
    /// A Prometheus `http_config` YAML file (TLS, basic auth, bearer token, proxy); empty: none.
    pub http_config_file: PathBuf,
    /// Extra headers on every request, e.g. Mimir's tenant: `{ "X-Scope-OrgID" = "team-a" }`.
    pub headers: BTreeMap<String, String>,
    /// `classic`, `native` or `both`.
    pub histograms: HistogramForm,
    /// The classic bucket ladder, seconds, increasing (`+Inf` is added); by default the `le`
    /// values tailscope's own query API shows, 100 µs to 1 h.
    pub buckets: Vec<f64>,
    /// The native histogram schema, -4 to 8: each power of two is split into 2^schema
    /// buckets (7: 0.54 % wide, so Prometheus' quantiles stay within 1 % of tailscope's).
    pub native_schema: i32,
    /// How often a snapshot is sent.
    #[serde(with = "humantime_serde")]
    pub send_interval: Duration,
    /// Series not updated for this long are no longer sent.
    #[serde(with = "humantime_serde")]
    pub series_idle: Duration,
    /// Most samples queued for sending (a native histogram is one sample).
    pub queue_capacity: usize,
    /// Most samples per request.
    pub max_samples_per_send: usize,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay, doubled up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RemoteWriteConfig {
    fn default() -> RemoteWriteConfig {
        RemoteWriteConfig {
            name: String::new(),
            url: String::new(),
            http_config_file: PathBuf::new(),
            headers: BTreeMap::new(),
            histograms: HistogramForm::Classic,
            buckets: crate::query::promql::DEFAULT_LE.iter().copied().filter(|b| b.is_finite()).collect(),
            native_schema: 7,
            send_interval: Duration::from_secs(10),
            series_idle: Duration::from_secs(600),
            queue_capacity: 500_000,
            max_samples_per_send: 2_000,
            timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(30),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Headers the remote-write protocol sets, which `headers` may not change.
const RESERVED_HEADERS: [&str; 5] =
    ["content-type", "content-encoding", "content-length", "x-prometheus-remote-write-version", "user-agent"];

impl RemoteWriteConfig {
    /// Checks what the types alone do not; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => return Err(format!("url {:?}: scheme {} is not http or https", self.url, u.scheme())),
            Err(e) => return Err(format!("url {:?}: {e}", self.url)),
        }
        if self.buckets.is_empty() || self.buckets.iter().any(|b| !b.is_finite() || *b <= 0.0) {
            return Err("buckets: at least one, each a positive finite number of seconds".into());
        }
        if self.buckets.windows(2).any(|w| w[0] >= w[1]) {
            return Err("buckets: must be strictly increasing".into());
        }
        if !(-4..=8).contains(&self.native_schema) {
            return Err(format!("native_schema {}: must be between -4 and 8", self.native_schema));
        }
        if self.send_interval < Duration::from_secs(1) {
            return Err("send_interval: must be at least 1s".into());
        }
        if self.max_samples_per_send == 0 || self.queue_capacity < self.max_samples_per_send {
            return Err("max_samples_per_send must be at least 1 and queue_capacity at least that".into());
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            return Err("min_backoff must be positive and at most max_backoff".into());
        }
        if self.timeout.is_zero() {
            return Err("timeout: must be positive".into());
        }
        for (name, value) in &self.headers {
            let header = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: {name:?} is not a header name"))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(format!(
                    "headers: {name} is set by tailscope (the protocol's own headers cannot be changed)"
                ));
            }
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| format!("headers: the value of {name} is not a header value"))?;
        }
        Ok(())
    }

    /// The name used in metrics and logs.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        reqwest::Url::parse(&self.url)
            .ok()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
            .unwrap_or_else(|| self.url.clone())
    }
}

/// A series' cumulative counters.
#[derive(Debug)]
struct Cumulative {
    count: u64,
    sum: f64,
    /// Per classic bucket (not cumulative across buckets), the last one `+Inf`.
    classic: Vec<u64>,
    /// Native bucket index → count.
    native: BTreeMap<i32, u64>,
    zero: u64,
    /// When it last changed (seconds).
    touched: i64,
    /// Whether it was sent before: a new series is sent with a zero sample one interval
    /// earlier, so `rate()` and `increase()` count its first spans too.
    announced: bool,
}

#[derive(Debug, Default)]
struct Fold {
    /// Each series' labels and when it last had a delta (seconds). The pipeline names a
    /// series again only after [`ACTIVE_SECONDS`] without spans, so labels are kept longer
    /// ([`LABELS_KEPT`]) even when the counters are dropped sooner (`series_idle`).
    labels: HashMap<u64, (SeriesLabels, i64), IdBuildHasher>,
    series: HashMap<u64, Cumulative, IdBuildHasher>,
}

/// How long a series' labels are kept after its last delta: twice the time the shards
/// remember a series before they send its labels again.
const LABELS_KEPT: i64 = 2 * ACTIVE_SECONDS;

/// A request waiting to be sent.
#[derive(Debug)]
struct Pending {
    id: u64,
    body: Vec<u8>,
    samples: usize,
}

#[derive(Debug, Default)]
struct Queue {
    requests: VecDeque<Pending>,
    samples: usize,
    next_id: u64,
}

/// A running remote-write target (see the module documentation).
#[derive(Debug)]
pub struct RemoteWriter {
    config: RemoteWriteConfig,
    name: String,
    bounds: Vec<u64>,
    fold: Mutex<Fold>,
    queue: Mutex<Queue>,
    ready: Notify,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl RemoteWriter {
    /// Starts the target's snapshot and sender tasks; they end when `stop` turns true.
    pub fn start(
        config: RemoteWriteConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<RemoteWriter>, Vec<JoinHandle<()>>), String> {
        config.validate()?;
        let http =
            HttpConfig::load(&config.http_config_file).map_err(|e| format!("http_config_file: {e}"))?;
        let name = config.display_name();
        let bounds = config.buckets.iter().map(|&b| (b * 1e9).round() as u64).collect();
        let writer = Arc::new(RemoteWriter {
            config,
            name,
            bounds,
            fold: Mutex::new(Fold::default()),
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            clock,
            metrics,
        });
        let snapshots = tokio::spawn(writer.clone().snapshot_loop(stop.clone()));
        let sender = tokio::spawn(writer.clone().send_loop(http, stop));
        Ok((writer, vec![snapshots, sender]))
    }

    fn label(&self) -> RemoteLabel {
        RemoteLabel { remote: self.name.clone() }
    }

    fn dropped(&self, reason: &'static str, samples: usize) {
        self.metrics
            .remote_write_dropped
            .get_or_create(&RemoteDropLabel { remote: self.name.clone(), reason })
            .inc_by(samples as u64);
    }

    /// Folds one delta into its series' counters.
    fn add(&self, c: &mut Cumulative, h: &Histogram) {
        let layout = h.layout();
        for (index, n) in h.iter_nonzero() {
            let highest = layout.highest_equivalent(index);
            let bucket = self.bounds.partition_point(|&b| b < highest);
            c.classic[bucket] += n;
            let median = layout.median_equivalent(index);
            if median == 0 {
                c.zero += n;
            } else {
                let i = wire::native_index(median as f64 / 1e9, self.config.native_schema);
                *c.native.entry(i).or_default() += n;
            }
        }
        c.count += h.count();
        c.sum += h.sum() as f64 / 1e9;
    }

    /// Takes a snapshot of the series that moved within `series_idle` and queues it.
    fn snapshot(&self) {
        let now_ns = self.clock.now_nanos();
        let (now, ts) = (now_ns.div_euclid(1_000_000_000), now_ns.div_euclid(1_000_000));
        let idle = i64::try_from(self.config.series_idle.as_secs()).unwrap_or(i64::MAX);
        let form = self.config.histograms;
        let mut series: Vec<wire::TimeSeries> = Vec::new();
        {
            let mut fold = self.fold.lock();
            let Fold { labels, series: counters } = &mut *fold;
            counters.retain(|_, c| c.touched >= now.saturating_sub(idle));
            labels.retain(|_, (_, seen)| *seen >= now.saturating_sub(idle.max(LABELS_KEPT)));
            let mut ids: Vec<u64> = counters.keys().copied().collect();
            ids.sort_unstable();
            let before = ts - i64::try_from(self.config.send_interval.as_millis()).unwrap_or(i64::MAX);
            for id in ids {
                let (Some(c), Some((l, _))) = (counters.get_mut(&id), labels.get(&id)) else { continue };
                let fresh = !std::mem::replace(&mut c.announced, true);
                let [bucket, count, sum, native] = match l.measure {
                    Measure::Duration => crate::query::promql::NAMES,
                    Measure::SelfTime => crate::query::promql::SELF_NAMES,
                };
                let base = |name: &str, le: Option<String>| {
                    let mut out = vec![wire::Label { name: "__name__".into(), value: name.into() }];
                    if let Some(le) = le {
                        out.push(wire::Label { name: "le".into(), value: le });
                    }
                    out.extend(l.pairs().map(|(k, v)| wire::Label { name: k.into(), value: v.into() }));
                    out.sort_by(|a, b| a.name.cmp(&b.name));
                    out
                };
                let samples = |value: f64| {
                    let zero = fresh.then_some(wire::Sample { value: 0.0, timestamp: before });
                    zero.into_iter().chain([wire::Sample { value, timestamp: ts }]).collect::<Vec<_>>()
                };
                if matches!(form, HistogramForm::Classic | HistogramForm::Both) {
                    let mut cumulative = 0u64;
                    for (i, n) in c.classic.iter().enumerate() {
                        cumulative += n;
                        let le = self
                            .config
                            .buckets
                            .get(i)
                            .map_or_else(|| "+Inf".to_owned(), |&b| crate::query::promql::format_value(b));
                        series.push(wire::TimeSeries {
                            labels: base(bucket, Some(le)),
                            samples: samples(cumulative as f64),
                            histograms: Vec::new(),
                        });
                    }
                    for (name, value) in [(count, c.count as f64), (sum, c.sum)] {
                        series.push(wire::TimeSeries {
                            labels: base(name, None),
                            samples: samples(value),
                            histograms: Vec::new(),
                        });
                    }
                }
                if matches!(form, HistogramForm::Native | HistogramForm::Both) {
                    let schema = self.config.native_schema;
                    let zero =
                        fresh.then(|| wire::native_histogram(&BTreeMap::new(), 0, 0.0, schema, before));
                    let now = wire::native_histogram(&c.native, c.zero, c.sum, schema, ts);
                    series.push(wire::TimeSeries {
                        labels: base(native, None),
                        samples: Vec::new(),
                        histograms: zero.into_iter().chain([now]).collect(),
                    });
                }
            }
        }
        for chunk in series.chunks(self.config.max_samples_per_send) {
            let samples = chunk.iter().map(|t| t.samples.len() + t.histograms.len()).sum();
            let request = wire::WriteRequest { timeseries: chunk.to_vec() };
            match wire::encode(&request) {
                Ok(body) => self.enqueue(body, samples),
                Err(e) => {
                    tracing::error!(remote = %self.name, error = %e, "cannot compress a remote-write request");
                    self.dropped("encoding", samples);
                }
            }
        }
    }

    /// Queues a request; a full queue gives up its oldest requests (their samples are
    /// superseded by this newer one).
    fn enqueue(&self, body: Vec<u8>, samples: usize) {
        let mut q = self.queue.lock();
        let id = q.next_id;
        q.next_id += 1;
        q.samples += samples;
        q.requests.push_back(Pending { id, body, samples });
        while q.samples > self.config.queue_capacity {
            let Some(old) = q.requests.pop_front() else { break };
            q.samples -= old.samples;
            self.dropped("queue_full", old.samples);
        }
        self.metrics.remote_write_queued.get_or_create(&self.label()).set(q.samples as i64);
        drop(q);
        self.ready.notify_one();
    }

    async fn snapshot_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.send_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.snapshot()).await;
                }
                _ = stopped(&mut stop) => return,
            }
        }
    }

    /// At shutdown: what is still queued is not sent, and counted.
    fn abandon(&self) {
        let mut q = self.queue.lock();
        let samples = std::mem::take(&mut q.samples);
        q.requests.clear();
        drop(q);
        if samples > 0 {
            tracing::warn!(remote = %self.name, samples, "shutting down with remote-write samples unsent");
            self.dropped("shutdown", samples);
        }
    }

    async fn send_loop(self: Arc<Self>, http: HttpConfig, mut stop: watch::Receiver<bool>) {
        let mut backoff = self.config.min_backoff;
        loop {
            let next = {
                let q = self.queue.lock();
                q.requests.front().map(|p| (p.id, p.body.clone(), p.samples))
            };
            let Some((id, body, samples)) = next else {
                tokio::select! {
                    _ = self.ready.notified() => continue,
                    _ = stopped(&mut stop) => return self.abandon(),
                }
            };
            let mut request = http.authorize(http.client.post(&self.config.url));
            for (name, value) in &self.config.headers {
                request = request.header(name, value);
            }
            let request = request
                .timeout(self.config.timeout)
                .header("content-type", "application/x-protobuf")
                .header("content-encoding", "snappy")
                .header("x-prometheus-remote-write-version", "0.1.0")
                .header("user-agent", concat!("tailscope/", env!("CARGO_PKG_VERSION")))
                .body(body);
            let outcome = tokio::select! {
                r = request.send() => r,
                _ = stopped(&mut stop) => return self.abandon(),
            };
            let retry = match outcome {
                Ok(resp) if resp.status().is_success() => {
                    self.metrics.remote_write_sent.get_or_create(&self.label()).inc_by(samples as u64);
                    false
                }
                Ok(resp) if resp.status().is_server_error() || resp.status().as_u16() == 429 => {
                    tracing::warn!(remote = %self.name, status = %resp.status(), "remote write refused for now; retrying");
                    true
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    tracing::error!(remote = %self.name, %status, body = %text.trim(), "remote write refused the request; dropping it");
                    self.dropped("rejected", samples);
                    false
                }
                Err(e) => {
                    tracing::warn!(remote = %self.name, error = %e, "remote write failed; retrying");
                    true
                }
            };
            if retry {
                self.metrics.remote_write_retries.get_or_create(&self.label()).inc();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut stop) => return self.abandon(),
                }
                backoff = (backoff * 2).min(self.config.max_backoff);
                continue;
            }
            backoff = self.config.min_backoff;
            let mut q = self.queue.lock();
            // The request may have been dropped for space meanwhile: remove only what was sent.
            if q.requests.front().is_some_and(|p| p.id == id) {
                if let Some(p) = q.requests.pop_front() {
                    q.samples -= p.samples;
                }
            }
            self.metrics.remote_write_queued.get_or_create(&self.label()).set(q.samples as i64);
        }
    }
}

/// Returns once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl EpochSink for RemoteWriter {
    fn written(&self, write: &EpochWrite) {
        let now = self.clock.now_seconds();
        let mut fold = self.fold.lock();
        for (id, labels) in &write.series {
            fold.labels.entry(*id).or_insert_with(|| (labels.clone(), now));
        }
        let n = self.bounds.len() + 1;
        for w in &write.windows {
            match fold.labels.get_mut(&w.series) {
                Some((_, seen)) => *seen = now,
                None => {
                    self.dropped("unlabelled", 1);
                    continue;
                }
            }
            // Deltas were validated on their way in.
            let Ok(h) = Histogram::decode(&w.histogram) else { continue };
            let Fold { series, .. } = &mut *fold;
            let c = series.entry(w.series).or_insert_with(|| Cumulative {
                count: 0,
                sum: 0.0,
                classic: vec![0; n],
                native: BTreeMap::new(),
                zero: 0,
                touched: now,
                announced: false,
            });
            c.touched = now;
            self.add(c, &h);
        }
    }
}
