//! Cluster mode: scale-out on NATS JetStream, in the shape of Mimir's ingest storage.
//!
//! * **Gateway** ([`gateway::LogGateway`], behind the [`Admit`] seam): ingest validates,
//!   limits and samples a batch as it does on one node, then the gateway cuts it into one
//!   [`LogRecord`](tailscope_proto::v1::LogRecord) per partition ([`record::split`]),
//!   coalesces each partition's records and publishes them to the partition's replicated
//!   stream with a `Nats-Msg-Id`, one message in flight per partition (so the log keeps each
//!   client's order). A client's `durable_seq` moves once JetStream acknowledged every part.
//! * **Store** ([`consumer`]): each store node reads the streams of the partitions it owns
//!   ([`assign`]: `replication_factor` owners per partition by rendezvous hashing over the
//!   live stores) on its own (an ordered, ack-less consumer from its own position) and hands
//!   the records to the same sharded [`Pipeline`] a single node uses. The position of each
//!   partition is written in the same synced RocksDB batch as the merges and the
//!   per-(client, partition) watermarks, so a restart or a replay has an exactly-once effect,
//!   and records are classified by the gateway's clock, so every replica computes the same
//!   windows. A store that takes on a partition it holds nothing of starts from a copy of an
//!   owner's store ([`copy`]) instead of the log's start.
//! * **Query and alerting** read each partition from a caught-up owner ([`reads`]), merged
//!   as on one node; with two owners per partition one store down leaves every query
//!   answered. Every node evaluates the alert rules; the one holding the ruler lease
//!   ([`lease`]) sends the notifications.
//!
//! The default (no `[cluster]`) is the embedded single process, with no NATS at all.

pub mod access;
pub mod assign;
pub mod claims;
pub mod config;
pub mod consumer;
pub mod copy;
pub mod drain;
pub mod gateway;
pub mod lease;
pub mod members;
pub mod names;
pub mod reads;
pub mod record;
pub mod register;
pub mod strong;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::config::{ClusterConfig, Role};
use crate::pipeline::{Admit, Pipeline};
use crate::telemetry::Metrics;

/// What of `[ingest]` a cluster node's gateway needs.
#[derive(Debug, Clone, Copy)]
pub struct GatewayLimits {
    /// `ingest.max_batch_bytes`.
    pub max_batch_bytes: usize,
    /// `ingest.queue_capacity`: records waiting per partition.
    pub queue_capacity: usize,
    /// `ingest.max_seq_gap`.
    pub max_seq_gap: u64,
    /// `ingest.client_idle_timeout`: how long a client id's owner outlives its last claim.
    pub client_idle_timeout: Duration,
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
    /// A file naming how this node reaches NATS (a certificate, a key, a password, a token, a
    /// seed) cannot be used.
    #[error("cluster.{key}: {error}")]
    Access {
        /// The configuration key naming the file.
        key: &'static str,
        /// What is wrong with it.
        error: crate::files::FileError,
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

/// Whether a connection that failed so would fail again the same way: NATS refused this node's
/// credentials, or TLS could not be agreed (a certificate that does not verify, on either side).
fn permanent(e: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as K;
    if matches!(e.kind(), K::AuthorizationViolation | K::Authentication | K::Tls) {
        return true;
    }
    // A failed handshake comes as an I/O error holding TLS's own.
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let io = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if c.is::<rustls::Error>() || io.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The bits of a client key below the partition.
const CLIENT_BITS: u32 = 48;

/// The id a store keeps a client's watermark under for one partition: a client's seqs are
/// checked per partition, since each partition's log carries only its share of a batch. The
/// partition is the key's top 16 bits (`cluster.partitions` ≤ 1024), so one partition's
/// watermarks are one key range ([`clients_of`]) a copy of the partition carries.
pub fn client_key(client_id: u64, partition: u32) -> u64 {
    if client_id == 0 {
        return 0;
    }
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&client_id.to_be_bytes());
    bytes[8..].copy_from_slice(&partition.to_be_bytes());
    let low = xxhash_rust::xxh3::xxh3_64(&bytes) & ((1 << CLIENT_BITS) - 1);
    // Never 0 (the anonymous client).
    (u64::from(partition) << CLIENT_BITS) | low.max(1)
}

/// The keys [`client_key`] gives for `partition`.
pub fn clients_of(partition: u32) -> std::ops::Range<u64> {
    let p = u64::from(partition);
    (p << CLIENT_BITS)..((p + 1) << CLIENT_BITS)
}

/// The addresses a node's listeners are bound to, which it announces to the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// gRPC (native and OTLP).
    pub grpc: std::net::SocketAddr,
    /// HTTP.
    pub http: std::net::SocketAddr,
    /// OTLP/HTTP.
    pub otlp_http: std::net::SocketAddr,
}

/// A started cluster node: its gateway, and the tasks of its publishers and consumers.
#[derive(Debug)]
pub struct Cluster {
    gateway: Arc<gateway::LogGateway>,
    /// Publisher and consumer tasks.
    pub tasks: Vec<JoinHandle<()>>,
    max_batch_bytes: usize,
    ruler: watch::Receiver<bool>,
    barrier: Option<Arc<dyn crate::query::ReadBarrier>>,
    sources: Option<Arc<reads::ClusterSources>>,
    status: Arc<StatusReader>,
    drain: Option<drain::Drain>,
    owners: watch::Receiver<Option<Arc<assign::Assignment>>>,
    names: Option<Arc<names::LogNames>>,
    claims: Option<Arc<claims::Claims>>,
}

/// How long a gateway waits for JetStream to acknowledge one publish before it retries.
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Room a log message needs beyond the batch it carries (record and message fields, the
/// counted names that may be longer than what was sent).
const RECORD_ENVELOPE_BYTES: usize = 64 << 10;

impl Cluster {
    /// Connects to NATS, creates the partitions' streams when missing, and starts this node's
    /// gateway (publishing; its names agreed on in `cardinality`, which starts empty) and
    /// store consumers (feeding `pipeline`).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &ClusterConfig,
        bound: Bound,
        ingest: GatewayLimits,
        cardinality: Arc<crate::cardinality::Cardinality>,
        store: crate::store::Store,
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
        shutdown_timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        let connect_err = |message: String| ClusterError::Connect { urls: config.nats.clone(), message };
        let access = access::NatsAccess::load(config)?;
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut last = None;
        let client = loop {
            let attempt = access.options(format!("tailscope-{}", config.node_id)).connect(access.addrs());
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(client)) => break client,
                // Refused credentials or a certificate that does not verify stay so: no retry.
                Ok(Err(e)) if permanent(&e) => return Err(connect_err(e.to_string())),
                Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                    last = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(Err(e)) => return Err(connect_err(e.to_string())),
                Err(_) => {
                    let last = last.map(|e| format!(" (the last attempt: {e})")).unwrap_or_default();
                    return Err(connect_err(format!("no answer within {:?}{last}", config.connect_timeout)));
                }
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
        let mut js = async_nats::jetstream::new(client.clone());
        // A publish to a leader that just died is answered by nobody: give up on it soon and
        // retry (with the same message id) against the next leader.
        js.set_timeout(PUBLISH_ACK_TIMEOUT);
        for p in 0..config.partitions {
            ensure_stream(&js, config, p).await?;
        }
        let mut tasks = Vec::new();
        let (names, claims) = if config.has(Role::Gateway) {
            let (names, task) =
                names::LogNames::start(js.clone(), config, cardinality, metrics.clone(), stop.clone())
                    .await?;
            tasks.push(task);
            let (claims, task) =
                claims::Claims::start(js.clone(), config, ingest.client_idle_timeout, stop.clone()).await?;
            tasks.push(task);
            (Some(names), Some(claims))
        } else {
            (None, None)
        };
        let replicas = Arc::new(assign::Replicas::new(config.partitions));
        let (owners_tx, owners) = watch::channel(None);
        let (draining_tx, draining) = watch::channel(false);
        let (gateway, gateway_tasks) = gateway::LogGateway::start(
            config,
            ingest,
            js.clone(),
            pipeline.clone(),
            replicas.clone(),
            metrics.clone(),
            stop.clone(),
            shutdown_timeout,
        );
        tasks.extend(gateway_tasks);
        tasks.push(tokio::spawn(assign::run(
            js.clone(),
            config.clone(),
            owners_tx,
            draining.clone(),
            stop.clone(),
        )));
        let shards = pipeline.shard_count();
        let partitions = if config.has(Role::Store) { config.partitions } else { 0 };
        let taker = Arc::new(copy::Taker {
            client: client.clone(),
            name: config.name.clone(),
            partitions: config.partitions,
            store: store.clone(),
            metrics: metrics.clone(),
            one_at_a_time: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        for p in 0..partitions {
            let partition = consumer::Partition {
                partition: p,
                stream: config.stream(p),
                subject: config.subject(p),
                pipeline: pipeline.clone(),
                shards,
                replicas: replicas.clone(),
                taker: taker.clone(),
            };
            tasks.push(tokio::spawn(consumer::run(js.clone(), partition, owners.clone(), stop.clone())));
        }
        let streams: Vec<(u32, String)> = (0..config.partitions).map(|p| (p, config.stream(p))).collect();
        let log_barrier = config.has(Role::Store).then(|| {
            Arc::new(strong::LogBarrier::new(
                js.clone(),
                streams.clone(),
                pipeline.clone(),
                config.strong_read_timeout,
                metrics.clone(),
            ))
        });
        if let Some(barrier) = &log_barrier {
            let server = reads::Server {
                client: client.clone(),
                name: config.name.clone(),
                node_id: config.node_id.clone(),
                partitions: config.partitions,
                store: store.clone(),
                replicas: replicas.clone(),
                barrier: barrier.clone(),
                copies: Arc::new(copy::Copies::new(store.clone(), config.partitions)),
                metrics: metrics.clone(),
            };
            tasks.push(tokio::spawn(reads::serve(server, stop.clone())));
        }
        let sources = if config.has(Role::Query) || config.has(Role::Ruler) {
            let sources = reads::ClusterSources::start(
                access.clone(),
                &config.node_id,
                config.name.clone(),
                config.partitions,
                store.clone(),
                config.has(Role::Store).then(|| replicas.clone()),
                owners.clone(),
                log_barrier.clone(),
                metrics.clone(),
            )
            .await
            .map_err(connect_err)?;
            Some(Arc::new(sources))
        } else {
            None
        };
        let barrier = sources.as_ref().map(|s| {
            Arc::new(reads::ClusterBarrier::new((**s).clone(), config.strong_read_timeout))
                as Arc<dyn crate::query::ReadBarrier>
        });
        // Without the ruler role the node never holds the lease, so never sends.
        let (holding, ruler) = watch::channel(false);
        if config.has(Role::Ruler) {
            tasks.push(tokio::spawn(lease::run(
                js.clone(),
                config.name.clone(),
                config.stream_replicas,
                config.node_id.clone(),
                holding,
                metrics.clone(),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(members::run(
            js.clone(),
            config.name.clone(),
            config.stream_replicas,
            members::Member::me(config, bound),
            draining,
            stop.clone(),
        )));
        // Reads need the partitions' owners: wait for the first member list (the members'
        // stream is made by the first announcement, so this is a moment).
        let mut first = owners.clone();
        let known = tokio::time::timeout(config.connect_timeout, first.wait_for(|a| a.is_some())).await;
        if !matches!(known, Ok(Ok(_))) {
            tracing::warn!(
                timeout = ?config.connect_timeout,
                "the member list could not be read yet; queries are refused until it is"
            );
        }
        let drain = config.has(Role::Store).then(|| drain::Drain {
            client: client.clone(),
            name: config.name.clone(),
            timeout: config.drain_timeout,
            draining: draining_tx,
            owners: owners.clone(),
            replicas: replicas.clone(),
            partitions: config.partitions,
        });
        let status = Arc::new(StatusReader {
            js: js.clone(),
            name: config.name.clone(),
            node_id: config.node_id.clone(),
            roles: config.roles.clone(),
            streams,
            pipeline: config.has(Role::Store).then(|| pipeline.clone()),
            ruler: ruler.clone(),
            owners: owners.clone(),
            replicas,
        });
        tracing::info!(
            node = %config.node_id,
            partitions = config.partitions,
            roles = %config.roles_text(),
            nats = ?config.nats,
            "cluster mode: started"
        );
        Ok(Cluster {
            gateway,
            tasks,
            max_batch_bytes,
            ruler,
            barrier,
            sources,
            status,
            drain,
            owners,
            names,
            claims,
        })
    }

    /// What a store runs before it stops ([`drain::Drain::run`]); `None` on other nodes.
    pub fn take_drain(&mut self) -> Option<drain::Drain> {
        self.drain.take()
    }

    /// The largest batch this node takes: `ingest.max_batch_bytes`, or less when the NATS
    /// servers' `max_payload` is smaller.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    /// Whether this node holds the ruler lease (sends alert notifications).
    pub fn ruler(&self) -> watch::Receiver<bool> {
        self.ruler.clone()
    }

    /// What a strong read waits for on this node: each partition's owner (none without the
    /// query or ruler role).
    pub fn read_barrier(&self) -> Option<Arc<dyn crate::query::ReadBarrier>> {
        self.barrier.clone()
    }

    /// What queries and rules read: each partition from a caught-up owner (none without the
    /// query or ruler role).
    pub fn sources(&self) -> Option<Arc<dyn crate::query::Sources>> {
        self.sources.clone().map(|s| s as Arc<dyn crate::query::Sources>)
    }

    /// The partitions' owners and the live gateways, as this node last read the members.
    pub fn assignment(&self) -> watch::Receiver<Option<Arc<assign::Assignment>>> {
        self.owners.clone()
    }

    /// Where this gateway agrees on names with the others (none without the gateway role).
    pub fn names(&self) -> Option<Arc<dyn crate::cardinality::SharedNames>> {
        self.names.clone().map(|n| n as Arc<dyn crate::cardinality::SharedNames>)
    }

    /// Where this gateway agrees with the others on whose a client id is (none without the
    /// gateway role).
    pub fn owners(&self) -> Option<Arc<dyn crate::ingest::SharedOwners>> {
        self.claims.clone().map(|c| c as Arc<dyn crate::ingest::SharedOwners>)
    }

    /// What `GET /api/v1/status/cluster` reads.
    pub fn status(&self) -> Arc<StatusReader> {
        self.status.clone()
    }

    /// The gateway, which ingest admits batches through.
    pub fn gateway(&self) -> Arc<dyn Admit> {
        self.gateway.clone()
    }
}

/// What `GET /api/v1/status/cluster` shows: this node, the members, and each partition's log
/// next to what this node's store has written of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// This node.
    pub node_id: String,
    /// `cluster.name`.
    pub cluster: String,
    /// This node's roles.
    pub roles: Vec<Role>,
    /// Whether this node holds the ruler lease (sends the notifications).
    pub ruler_lease: bool,
    /// The nodes that announced themselves within the last `MEMBER_TTL`, by id.
    pub members: Vec<members::Member>,
    /// Each partition.
    pub partitions: Vec<PartitionStatus>,
}

/// One partition's log and this node's place in it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u32,
    /// The stream's last sequence.
    pub log_last_seq: u64,
    /// Messages the stream holds.
    pub log_messages: u64,
    /// The stores that own it, best first (queries read it from the first caught up).
    pub owners: Vec<String>,
    /// Whether this node's store owns it and has caught up with its log (absent without the
    /// store role).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<bool>,
    /// The last message this node's store wrote whole (absent without the store role).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_seq: Option<u64>,
    /// Messages the log holds that this node's store has not written yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind_messages: Option<u64>,
}

/// Reads a [`Status`] (from NATS and this node's pipeline) when asked.
#[derive(Debug)]
pub struct StatusReader {
    js: async_nats::jetstream::Context,
    name: String,
    node_id: String,
    roles: Vec<Role>,
    streams: Vec<(u32, String)>,
    pipeline: Option<Arc<Pipeline>>,
    ruler: watch::Receiver<bool>,
    owners: watch::Receiver<Option<Arc<assign::Assignment>>>,
    replicas: Arc<assign::Replicas>,
}

impl StatusReader {
    /// The status now; names what could not be read from NATS.
    pub async fn read(&self) -> Result<Status, String> {
        let members = members::list(&self.js, &self.name).await?;
        let ends = strong::log_ends(&self.js, &self.streams).await?;
        let assignment = self.owners.borrow().clone();
        let partitions = ends
            .into_iter()
            .map(|end| {
                let written = self.pipeline.as_ref().map(|p| p.written_log_position(end.partition));
                PartitionStatus {
                    owners: assignment
                        .as_ref()
                        .map(|a| a.owners(end.partition).into_iter().map(str::to_owned).collect())
                        .unwrap_or_default(),
                    caught_up: self.pipeline.as_ref().map(|_| self.replicas.caught_up(end.partition)),
                    partition: end.partition,
                    log_last_seq: end.last_seq,
                    log_messages: end.messages,
                    written_seq: written.map(whole_messages),
                    behind_messages: written
                        .map(|w| end.last_seq.saturating_sub(whole_messages(w)).min(end.messages)),
                }
            })
            .collect();
        Ok(Status {
            node_id: self.node_id.clone(),
            cluster: self.name.clone(),
            roles: self.roles.clone(),
            ruler_lease: *self.ruler.borrow(),
            members,
            partitions,
        })
    }
}

/// The last message written whole at `at`.
fn whole_messages(at: crate::store::LogPosition) -> u64 {
    if at.records == u32::MAX {
        at.seq
    } else {
        at.seq.saturating_sub(1)
    }
}

/// Creates partition `p`'s stream unless it exists (another node may have created it).
async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    config: &ClusterConfig,
    p: u32,
) -> Result<(), ClusterError> {
    use async_nats::jetstream::stream;
    let wanted = stream::Config {
        name: config.stream(p),
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
    open_stream(js, wanted).await.map(|_| ()).map_err(|mut e| {
        if let ClusterError::Stream { message, .. } = &mut e {
            if message.contains("insufficient storage") {
                *message += &format!(
                    " ({} partitions × cluster.max_bytes_per_partition {} bytes are reserved on the NATS servers' max_file_store)",
                    config.partitions, config.max_bytes_per_partition
                );
            }
        }
        e
    })
}

/// Opens the stream `wanted` describes, creating it unless it exists; tries for ten seconds
/// (two nodes starting together may both create it: whoever loses finds it made).
async fn open_stream(
    js: &async_nats::jetstream::Context,
    wanted: async_nats::jetstream::stream::Config,
) -> Result<async_nats::jetstream::stream::Stream, ClusterError> {
    let mut last = String::new();
    for _ in 0..20 {
        match js.get_or_create_stream(wanted.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(ClusterError::Stream { stream: wanted.name, message: last })
}

#[cfg(test)]
mod tests;
