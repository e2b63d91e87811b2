//! Configuration: one TOML file, overridden by `TAILSCOPE_*` environment variables, overridden
//! by command-line flags. Unknown keys and unknown `TAILSCOPE_*` variables are errors.
//!
//! Environment variables are named after the key: `TAILSCOPE_<SECTION>_<KEY>` in upper case
//! (`TAILSCOPE_INGEST_SHARDS=4`), except the `[server]` section whose keys need no section
//! (`TAILSCOPE_GRPC_ADDR`, `TAILSCOPE_HTTP_ADDR`, `TAILSCOPE_DATA_DIR`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tailscope_proto::histogram::Layout;

pub use crate::store::RetentionConfig;

/// Environment variables with the prefix that are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["TAILSCOPE_LOG", "TAILSCOPE_CONFIG", "TAILSCOPE_LOG_FORMAT"];

/// Errors that name the file, key or variable that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the key, line and column.
        message: String,
    },
    /// An environment variable is unknown or its value does not fit its key.
    #[error("invalid environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What was wrong.
        message: String,
    },
    /// A value parsed but is out of range.
    #[error("invalid config value {key}: {message}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What was wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listeners, data directory and process behaviour.
    pub server: ServerConfig,
    /// The gRPC ingest pipeline.
    pub ingest: IngestConfig,
    /// Histogram precision and range.
    pub histogram: HistogramConfig,
    /// How long each resolution is kept.
    pub retention: RetentionConfig,
    /// The adaptive sampler's budget.
    pub sampling: crate::sampling::SamplingConfig,
    /// Alerting rules and notifications.
    pub alerting: crate::alerting::AlertingConfig,
    /// Limits of the query API.
    pub query: QueryConfig,
    /// Who may write and administer (the users are the web configuration's).
    pub auth: crate::auth::AuthConfig,
    /// Prometheus remote-write targets that receive the latency histograms (`[[remote_write]]`).
    pub remote_write: Vec<crate::remote_write::RemoteWriteConfig>,
    /// Cluster mode on NATS JetStream (off unless `nats` names servers).
    pub cluster: crate::cluster::config::ClusterConfig,
}

/// `[query]`: what one request to the query API may cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Deepest expression accepted (operators, brackets and calls nested); deeper text is
    /// refused before it is parsed.
    pub max_depth: usize,
    /// Longest a query may run; a request's own `timeout` may only shorten it.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most series one query may select, and most items a series or label request answers
    /// (more are cut, with a warning, as Prometheus does for `limit`).
    pub max_series: usize,
    /// Most samples (selected series × evaluation steps) one query may hold, as Prometheus'
    /// `query.max-samples`.
    pub max_samples: usize,
    /// Queries (and label, series and exemplar reads) served at once; more wait their turn
    /// within their timeout.
    pub max_concurrency: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_depth: crate::query::promql::DEFAULT_MAX_DEPTH,
            timeout: Duration::from_secs(30),
            max_series: 50_000,
            max_samples: 10_000_000,
            max_concurrency: 4,
        }
    }
}

/// `[server]`: listeners, data directory and process behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the gRPC listener (tailscope ingest and OTLP trace service).
    pub grpc_addr: SocketAddr,
    /// Address of the HTTP listener (query API, health, metrics).
    pub http_addr: SocketAddr,
    /// Address of the OTLP/HTTP listener (`POST /v1/traces`).
    pub otlp_http_addr: SocketAddr,
    /// Origins browsers may send OTLP/HTTP from (`*` for any); empty: no CORS.
    pub otlp_http_cors_origins: Vec<String>,
    /// Directory of the embedded RocksDB store; created when missing.
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may take to flush and acknowledge what was accepted.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Connections open at once on each listener; the next is accepted when one closes.
    pub max_connections: usize,
    /// How long an HTTP client may take to send a request's headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a gRPC client may take to send the HTTP/2 preface.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Prometheus' web configuration file (`--web.config.file`): with `tls_server_config`,
    /// every listener serves TLS (mutual with `client_auth_type`); empty: plaintext.
    pub web_config_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 4317)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9797)),
            otlp_http_addr: SocketAddr::from(([127, 0, 0, 1], 4318)),
            otlp_http_cors_origins: Vec::new(),
            data_dir: PathBuf::from("./tailscope-data"),
            shutdown_timeout: Duration::from_secs(10),
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            web_config_file: PathBuf::new(),
        }
    }
}

/// `[ingest]`: the sharded pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Number of shards; 0 means one per CPU core.
    pub shards: usize,
    /// Batches each shard's queue holds before new batches are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Fraction of a shard queue above which clients are told to throttle.
    pub throttle_high_water: f64,
    /// Largest encoded batch accepted, in bytes.
    pub max_batch_bytes: usize,
    /// Most spans one batch may carry.
    pub max_spans_per_batch: usize,
    /// Most spans one span record may stand for (its weight, or OTLP's adjusted count from
    /// `tracestate`); a larger weight is cut to this and counted.
    pub max_span_weight: u32,
    /// How often a flush epoch writes all shards' deltas and acknowledges their batches.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// When an OTLP export waits for its spans to be durable, the epoch is cut this long after
    /// it arrived instead of at the next flush interval; every export arriving meanwhile shares
    /// the one synced write (group commit).
    #[serde(with = "humantime_serde")]
    pub group_commit_delay: Duration,
    /// How far in the past a span may start and still be counted in its own window.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// How far in the future a span may start (clock skew between hosts).
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Spans longer than this are rejected as absurd; between the histogram's highest value and
    /// this they are clamped.
    #[serde(with = "humantime_serde")]
    pub max_span_duration: Duration,
    /// Most operations one service may have (0: no limit); spans of further new operations
    /// are counted under `operation="__overflow__"`.
    pub max_operations_per_service: usize,
    /// Most peers (services called or calling, databases, hosts) one service may have (0: no
    /// limit); spans with further new peers are counted under `peer="__overflow__"`.
    pub max_peers_per_service: usize,
    /// Most services (0: no limit); spans of further new services are counted under
    /// `service="__overflow__"` (keeping their operation names, capped as any service's).
    pub max_services: usize,
    /// Most (series, window) histograms the shards hold open for one epoch, together; reaching
    /// it encodes them (a few dozen bytes each instead of kilobytes) and cuts the epoch early,
    /// so spans spread over many series and windows (a backfill of the whole allowed lateness)
    /// cost a bounded amount of memory. While the last epoch is still being written, the next
    /// holds at most twice this (open or encoded); then admission waits.
    pub max_open_windows: usize,
    /// How far past its accepted watermark a client's next batch may be numbered. A client
    /// numbers its batches one by one and resends from its watermark, so a batch further
    /// ahead is refused (INVALID_ARGUMENT): it would make the client's later batches look like
    /// resends, acknowledged and never counted.
    pub max_seq_gap: u64,
    /// How long a client id may send nothing before its watermark is forgotten (its row
    /// deleted; a client coming back after that starts over as a new one). 0: kept forever.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            shards: 0,
            queue_capacity: 256,
            throttle_high_water: 0.75,
            max_batch_bytes: 16 * 1024 * 1024,
            max_spans_per_batch: 100_000,
            max_span_weight: 100_000,
            flush_interval: Duration::from_secs(1),
            group_commit_delay: Duration::from_millis(5),
            allowed_lateness: Duration::from_secs(3600),
            max_future_skew: Duration::from_secs(60),
            max_span_duration: Duration::from_secs(24 * 3600),
            max_operations_per_service: 10_000,
            max_peers_per_service: 64,
            max_services: 5_000,
            max_open_windows: 200_000,
            max_seq_gap: 1_000_000,
            client_idle_timeout: Duration::from_secs(30 * 86_400),
        }
    }
}

impl IngestConfig {
    /// The number of shards to run.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.shards
        }
    }
}

/// `[histogram]`: precision and range of every latency histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistogramConfig {
    /// Significant decimal digits (1..=4); 2 means at most 1 % relative error.
    pub significant_digits: u8,
    /// Lowest discernible duration.
    #[serde(with = "humantime_serde")]
    pub lowest: Duration,
    /// Highest trackable duration; longer spans are clamped to it and counted.
    #[serde(with = "humantime_serde")]
    pub highest: Duration,
}

impl Default for HistogramConfig {
    fn default() -> Self {
        HistogramConfig {
            significant_digits: Layout::DEFAULT_SIGNIFICANT_DIGITS,
            lowest: Duration::from_nanos(Layout::DEFAULT_LOWEST),
            highest: Duration::from_nanos(Layout::DEFAULT_HIGHEST),
        }
    }
}

impl HistogramConfig {
    /// The histogram layout, in nanoseconds.
    pub fn layout(&self) -> Result<Layout, ConfigError> {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Layout::new(self.significant_digits, nanos(self.lowest), nanos(self.highest))
            .map_err(|e| ConfigError::Invalid { key: "histogram", message: e.to_string() })
    }
}

/// Values given on the command line; they win over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--grpc-addr`.
    pub grpc_addr: Option<SocketAddr>,
    /// `--http-addr`.
    pub http_addr: Option<SocketAddr>,
    /// `--otlp-http-addr`.
    pub otlp_http_addr: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--web-config-file`.
    pub web_config_file: Option<PathBuf>,
}

impl Config {
    /// Parses a TOML document; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        Ok(config)
    }

    /// Reads the file (or starts from the defaults), applies `env` and `overrides`, validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                Config::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        if let Some(a) = overrides.grpc_addr {
            config.server.grpc_addr = a;
        }
        if let Some(a) = overrides.http_addr {
            config.server.http_addr = a;
        }
        if let Some(a) = overrides.otlp_http_addr {
            config.server.otlp_http_addr = a;
        }
        if let Some(d) = &overrides.data_dir {
            config.server.data_dir = d.clone();
        }
        if let Some(w) = &overrides.web_config_file {
            config.server.web_config_file = w.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Applies `TAILSCOPE_*` variables; other variables are ignored.
    pub fn apply_env(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TAILSCOPE_") && !NON_CONFIG_ENV.contains(&k.as_str()))
            .collect();
        if vars.is_empty() {
            return Ok(());
        }
        vars.sort();
        let env_err = |var: &str, message: String| ConfigError::Env { var: var.to_owned(), message };
        let mut doc = toml::Table::try_from(&*self).map_err(|e| env_err("TAILSCOPE_*", e.to_string()))?;
        for (var, raw) in &vars {
            let (section, key) = env_key(&doc, var).ok_or_else(|| {
                env_err(var, "not a tailscope setting (see tailscope.example.toml for the keys)".into())
            })?;
            let slot = doc
                .get_mut(&section)
                .and_then(|s| s.as_table_mut())
                .and_then(|t| t.get_mut(&key))
                .ok_or_else(|| env_err(var, "not a tailscope setting".into()))?;
            *slot = typed_like(slot, raw).map_err(|m| env_err(var, m))?;
            // Convert after each variable so an error names the variable that caused it.
            *self = toml::Value::Table(doc.clone())
                .try_into()
                .map_err(|e: toml::de::Error| env_err(var, e.message().to_owned()))?;
        }
        Ok(())
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.histogram.layout()?;
        self.sampling.validate().map_err(|message| ConfigError::Invalid { key: "sampling", message })?;
        self.alerting.validate().map_err(|message| ConfigError::Invalid { key: "alerting", message })?;
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        let srv = &self.server;
        if srv.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if srv.header_read_timeout.is_zero() || srv.handshake_timeout.is_zero() {
            return invalid(
                "server.header_read_timeout",
                "header_read_timeout and handshake_timeout must be positive",
            );
        }
        self.cluster.validate().map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        let i = &self.ingest;
        if i.shards > 1024 {
            return invalid("ingest.shards", "must be at most 1024");
        }
        if i.queue_capacity < 2 {
            return invalid("ingest.queue_capacity", "must be at least 2");
        }
        if !(0.0..=1.0).contains(&i.throttle_high_water) {
            return invalid("ingest.throttle_high_water", "must be between 0 and 1");
        }
        if i.max_batch_bytes < 1024 {
            return invalid("ingest.max_batch_bytes", "must be at least 1024");
        }
        if i.max_seq_gap == 0 {
            return invalid("ingest.max_seq_gap", "must be at least 1");
        }
        if i.max_open_windows == 0 {
            return invalid("ingest.max_open_windows", "must be at least 1");
        }
        if i.max_span_weight == 0 {
            return invalid("ingest.max_span_weight", "must be at least 1");
        }
        if i.max_spans_per_batch == 0 {
            return invalid("ingest.max_spans_per_batch", "must be at least 1");
        }
        if i.flush_interval < Duration::from_millis(10) || i.flush_interval > Duration::from_secs(60) {
            return invalid("ingest.flush_interval", "must be between 10ms and 60s");
        }
        if i.group_commit_delay > i.flush_interval {
            return invalid("ingest.group_commit_delay", "must be at most ingest.flush_interval");
        }
        if i.max_span_duration < self.histogram.highest {
            return invalid("ingest.max_span_duration", "must be at least histogram.highest");
        }
        let r = &self.retention;
        if r.window_10s < Duration::from_secs(3600) || r.window_1m < r.window_10s || r.window_1h < r.window_1m
        {
            return invalid(
                "retention",
                "window_10s must be at least 1h, and window_1m and window_1h at least as long as the finer one",
            );
        }
        if r.interval < Duration::from_secs(1) {
            return invalid("retention.interval", "must be at least 1s");
        }
        if !(1..=2_000).contains(&self.query.max_depth) {
            return invalid("query.max_depth", "must be between 1 and 2000");
        }
        if self.query.max_samples == 0 || self.query.max_concurrency == 0 {
            return invalid("query.max_samples", "max_samples and max_concurrency must be at least 1");
        }
        if self.query.max_series == 0 {
            return invalid("query.max_series", "must be at least 1");
        }
        if self.query.timeout < Duration::from_millis(1) {
            return invalid("query.timeout", "must be at least 1ms");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, target) in self.remote_write.iter().enumerate() {
            target
                .validate()
                .map_err(|m| ConfigError::Invalid { key: "remote_write", message: format!("[{i}] {m}") })?;
            if !names.insert(target.display_name()) {
                return Err(ConfigError::Invalid {
                    key: "remote_write",
                    message: format!(
                        "[{i}] name {:?} is used twice; give each target its own name",
                        target.display_name()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The configuration as TOML, the way `check-config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Maps `TAILSCOPE_<SECTION>_<KEY>` (or `TAILSCOPE_<KEY>` for `[server]`) to a key of `doc`.
fn env_key(doc: &toml::Table, var: &str) -> Option<(String, String)> {
    let rest = var.strip_prefix("TAILSCOPE_")?.to_ascii_lowercase();
    for (section, table) in doc {
        let Some(table) = table.as_table() else { continue };
        for key in table.keys() {
            let bare = section == "server" && rest == *key;
            if bare || rest == format!("{section}_{key}") {
                return Some((section.clone(), key.clone()));
            }
        }
    }
    None
}

/// Parses `raw` as the same TOML type as `current`.
fn typed_like(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    Ok(match current {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| format!("expected an integer, got {raw:?}"))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| format!("expected a number, got {raw:?}"))?)
        }
        toml::Value::Boolean(_) => toml::Value::Boolean(
            raw.trim().parse().map_err(|_| format!("expected true or false, got {raw:?}"))?,
        ),
        // A list of strings: comma-separated (`TAILSCOPE_CLUSTER_NATS=nats://a:4222,nats://b:4222`).
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    })
}

#[cfg(test)]
mod tests;
