//! Cluster mode: scale-out on NATS JetStream, in the shape of Mimir's ingest storage.
//!
//! * **Gateway** ([`gateway::LogGateway`], behind the [`Admit`] seam): ingest validates,
//!   limits and samples a batch as it does on one node, then the gateway cuts it into one
//!   [`LogRecord`](tailscope_proto::v1::LogRecord) per partition ([`record::split`]),
//!   coalesces each partition's records and publishes them to the partition's replicated
//!   stream with a `Nats-Msg-Id`, one message in flight per partition (so the log keeps each
//!   client's order). A client's `durable_seq` moves once JetStream acknowledged every part.
//! * **Store** ([`consumer`]): every node reads every partition's stream on its own (an
//!   ordered, ack-less consumer from its own position) and hands the records to the same
//!   sharded [`Pipeline`] a single node uses. The position of each partition is written in
//!   the same synced RocksDB batch as the merges and the per-(client, partition) watermarks,
//!   so a restart or a replay has an exactly-once effect, and records are classified by the
//!   gateway's clock, so every replica computes the same windows.
//! * **Query and alerting** read the local store, which holds every partition: any node
//!   answers any query, and one store down leaves the others answering.
//!
//! The default (no `[cluster]`) is the embedded single process, with no NATS at all.

pub mod consumer;
pub mod gateway;
pub mod record;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::IngestConfig;
use crate::pipeline::{Admit, Pipeline};
use crate::telemetry::Metrics;

/// `[cluster]`: NATS JetStream as the partitioned, replicated log. Empty `nats`: single node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://127.0.0.1:4222`); any one is enough to connect, listing
    /// every server of the NATS cluster lets a node reconnect when one dies.
    pub nats: Vec<String>,
    /// This node's name: unique in the cluster (it names the node's gateway in message ids).
    pub node_id: String,
    /// The cluster's name: its streams are `<name>_p<N>`, their subjects `<name>.p.<N>`.
    pub name: String,
    /// Partitions (one stream each). Fixed when the cluster is created: every node must agree.
    pub partitions: u32,
    /// Copies JetStream keeps of each stream (1, 3 or 5 NATS servers).
    pub stream_replicas: usize,
    /// How long the log keeps messages: a store down longer re-reads from the oldest kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Bytes a partition's stream may hold; a full stream refuses publishes (JetStream's
    /// `discard: new`), so clients are told to back off rather than anything being dropped.
    /// JetStream reserves it on each of `stream_replicas` servers: `partitions` × this must
    /// fit the servers' `max_file_store`.
    pub max_bytes_per_partition: i64,
    /// Most bytes of records a gateway coalesces into one message.
    pub max_message_bytes: usize,
    /// How long a node waits for NATS at start-up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            node_id: String::new(),
            name: "tailscope".into(),
            partitions: 16,
            stream_replicas: 3,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes_per_partition: 256 << 20,
            max_message_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// Checks the values (only when cluster mode is on); names what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        let token =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !token(&self.node_id) {
            return Err((
                "cluster.node_id",
                format!("{:?} must be letters, digits, '-' or '_', and not empty", self.node_id),
            ));
        }
        if !token(&self.name) {
            return Err((
                "cluster.name",
                format!("{:?} must be letters, digits, '-' or '_', and not empty", self.name),
            ));
        }
        if !(1..=1024).contains(&self.partitions) {
            return Err(("cluster.partitions", format!("{} must be between 1 and 1024", self.partitions)));
        }
        if !matches!(self.stream_replicas, 1 | 3 | 5) {
            return Err(("cluster.stream_replicas", format!("{} must be 1, 3 or 5", self.stream_replicas)));
        }
        if self.max_bytes_per_partition < 1 << 20 {
            return Err(("cluster.max_bytes_per_partition", "must be at least 1 MiB".into()));
        }
        if self.max_message_bytes < 1024 {
            return Err(("cluster.max_message_bytes", "must be at least 1024".into()));
        }
        if self.max_age < Duration::from_secs(60) {
            return Err(("cluster.max_age", "must be at least 1m".into()));
        }
        for url in &self.nats {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| ("cluster.nats", format!("{url:?} is not a NATS server address: {e}")))?;
        }
        Ok(())
    }

    /// The stream of partition `p`.
    pub fn stream(&self, p: u32) -> String {
        format!("{}_p{p}", self.name)
    }

    /// The subject of partition `p`.
    pub fn subject(&self, p: u32) -> String {
        format!("{}.p.{p}", self.name)
    }
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No NATS server answered.
    #[error("cannot connect to NATS {urls:?}: {message}")]
    Connect {
        /// The configured URLs.
        urls: Vec<String>,
        /// Why.
        message: String,
    },
    /// A stream could not be created or read.
    #[error("JetStream stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// Why.
        message: String,
    },
}

/// The id a store keeps a client's watermark under for one partition: a client's seqs are
/// checked per partition, since each partition's log carries only its share of a batch.
pub fn client_key(client_id: u64, partition: u32) -> u64 {
    if client_id == 0 {
        return 0;
    }
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&client_id.to_be_bytes());
    bytes[8..].copy_from_slice(&partition.to_be_bytes());
    // Never 0 (the anonymous client).
    xxhash_rust::xxh3::xxh3_64(&bytes).max(1)
}

/// A started cluster node: its gateway, and the tasks of its publishers and consumers.
#[derive(Debug)]
pub struct Cluster {
    gateway: Arc<gateway::LogGateway>,
    /// Publisher and consumer tasks.
    pub tasks: Vec<JoinHandle<()>>,
    max_batch_bytes: usize,
}

/// Room a log message needs beyond the batch it carries (record and message fields, the
/// counted names that may be longer than what was sent).
const RECORD_ENVELOPE_BYTES: usize = 64 << 10;

impl Cluster {
    /// Connects to NATS, creates the partitions' streams when missing, and starts this node's
    /// gateway (publishing) and store consumers (feeding `pipeline`).
    pub async fn start(
        config: &ClusterConfig,
        ingest: &IngestConfig,
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
        shutdown_timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        let connect_err = |message: String| ClusterError::Connect { urls: config.nats.clone(), message };
        let addrs = config
            .nats
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| connect_err(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let client = loop {
            let attempt = async_nats::ConnectOptions::new()
                .name(format!("tailscope-{}", config.node_id))
                .connect(addrs.clone());
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(client)) => break client,
                Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(Err(e)) => return Err(connect_err(e.to_string())),
                Err(_) => return Err(connect_err(format!("no answer within {:?}", config.connect_timeout))),
            }
        };
        // A batch's share of a partition is published whole (its seq is checked per partition),
        // so no batch may be larger than a NATS message can be, less room for the envelope.
        let max_payload = client.server_info().max_payload;
        let max_batch_bytes = ingest.max_batch_bytes.min(max_payload.saturating_sub(RECORD_ENVELOPE_BYTES));
        if max_batch_bytes < ingest.max_batch_bytes {
            tracing::warn!(
                max_payload,
                max_batch_bytes,
                "cluster mode: ingest.max_batch_bytes is cut to what a NATS message can hold (raise max_payload in the NATS configuration to allow more)"
            );
        }
        let js = async_nats::jetstream::new(client);
        for p in 0..config.partitions {
            ensure_stream(&js, config, p).await?;
        }
        let (gateway, mut tasks) = gateway::LogGateway::start(
            config,
            ingest,
            js.clone(),
            pipeline.clone(),
            metrics,
            stop.clone(),
            shutdown_timeout,
        );
        let shards = pipeline.shard_count();
        for p in 0..config.partitions {
            tasks.push(tokio::spawn(consumer::run(
                js.clone(),
                config.stream(p),
                config.subject(p),
                p,
                pipeline.clone(),
                shards,
                stop.clone(),
            )));
        }
        tracing::info!(
            node = %config.node_id,
            partitions = config.partitions,
            nats = ?config.nats,
            "cluster mode: publishing to and consuming every partition's stream"
        );
        Ok(Cluster { gateway, tasks, max_batch_bytes })
    }

    /// The largest batch this node takes: `ingest.max_batch_bytes`, or less when the NATS
    /// servers' `max_payload` is smaller.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    /// The gateway, which ingest admits batches through.
    pub fn gateway(&self) -> Arc<dyn Admit> {
        self.gateway.clone()
    }
}

/// Creates partition `p`'s stream unless it exists (another node may have created it).
async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    config: &ClusterConfig,
    p: u32,
) -> Result<(), ClusterError> {
    use async_nats::jetstream::stream;
    let name = config.stream(p);
    let wanted = stream::Config {
        name: name.clone(),
        subjects: vec![config.subject(p)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: config.stream_replicas,
        max_age: config.max_age,
        max_bytes: config.max_bytes_per_partition,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        max_message_size: i32::try_from(config.max_message_bytes.max(16 << 20)).unwrap_or(i32::MAX),
        ..Default::default()
    };
    // Two nodes starting together may both try; whoever loses finds it made.
    let mut last = String::new();
    for _ in 0..20 {
        match js.get_or_create_stream(wanted.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if last.contains("insufficient storage") {
        last += &format!(
            " ({} partitions × cluster.max_bytes_per_partition {} bytes are reserved on the NATS servers' max_file_store)",
            config.partitions, config.max_bytes_per_partition
        );
    }
    Err(ClusterError::Stream { stream: name, message: last })
}

#[cfg(test)]
mod tests;
