//! The server's own metrics, all named `tailscope_*`, exposed at `GET /metrics` in the
//! Prometheus text format. Every metric the server keeps is declared here.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: &'static str,
}

/// A `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// What happened.
    pub result: &'static str,
}

/// The labels of a refused credential.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// `http`, `grpc` or `otlp_http`.
    pub listener: &'static str,
    /// `missing`, `invalid`, `forbidden`, `lifecycle_disabled`.
    pub reason: &'static str,
}

/// A `limit` label: the configuration key of a limit a request ran into.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// The key, e.g. `query.max_depth`.
    pub limit: &'static str,
}

/// A `form` label: how spans arrived (`full`, or `folded` in a client's histogram delta).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Form {
    /// How.
    pub form: &'static str,
}

/// A `side` label: which end of a call (`client`, `server`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabel {
    /// The end.
    pub side: &'static str,
}

/// A `shard` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// The shard's number.
    pub shard: u32,
}

/// A `column_family` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ColumnFamilyLabel {
    /// The RocksDB column family.
    pub column_family: &'static str,
}

/// A `rule_group` label: the rule file and group name, as `file;group` (Prometheus' form).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleGroupLabel {
    /// `file;group`.
    pub rule_group: String,
}

/// A `state` label (`pending`, `firing`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The alert state.
    pub state: &'static str,
}

/// A `receiver` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiverLabel {
    /// The receiver's name.
    pub receiver: String,
}

/// A `remote` label: a remote-write target's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteLabel {
    /// The target's name.
    pub remote: String,
}

/// `remote` and `reason` labels of samples a remote-write target did not get.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteDropLabel {
    /// The target's name.
    pub remote: String,
    /// `queue_full`, `rejected` (a 4xx answer), `shutdown` (queued at exit), `encoding`,
    /// `unlabelled` (a delta of a series whose labels were not seen).
    pub reason: &'static str,
}

/// `receiver` and `result` labels of a delivery attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabel {
    /// The receiver's name.
    pub receiver: String,
    /// `success`, `server_error` (5xx/429, retried), `client_error` (other 4xx, not
    /// retried), `connection_error`, `timeout`, `breaker_open`.
    pub result: &'static str,
}

/// Every self-metric of the server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Spans counted into histograms (weighted; histogram deltas included).
    pub spans_accepted: Counter,
    /// Spans refused one by one, by reason.
    pub spans_rejected: Family<Reason, Counter>,
    /// Spans above the histogram's range, counted at its top.
    pub spans_clamped: Counter,
    /// Span records whose weight (adjusted count) was cut to `ingest.max_span_weight`.
    pub span_weights_clamped: Counter,
    /// Batches received, by result (`accepted`, `duplicate`, `rejected`).
    pub batches: Family<Outcome, Counter>,
    /// Batches refused, by reason.
    pub batches_rejected: Family<Reason, Counter>,
    /// Open ingest streams.
    pub ingest_streams: Gauge,
    /// Work items waiting in each shard's queue.
    pub shard_queue_depth: Family<ShardLabel, Gauge>,
    /// Flush epochs, by result (`ok`, `error`).
    pub flushes: Family<Outcome, Counter>,
    /// Epochs cut early because an OTLP export was waiting (group commit).
    pub early_epochs: Counter,
    /// Cluster mode: messages this node's gateway published to the log (acknowledged).
    pub log_messages: Counter,
    /// Cluster mode: bytes of those messages, as published (compressed).
    pub log_bytes: Counter,
    /// Cluster mode: bytes of those messages as encoded, before compression.
    pub log_encoded_bytes: Counter,
    /// Cluster mode: log publishes retried (no NATS leader, a timeout, a full stream).
    pub log_publish_retries: Counter,
    /// Cluster mode: names (a span group's service, operation and peer) this node's gateway
    /// added to the names log (a proposal the log already held, made by another gateway or
    /// batch with the very same names, is not counted).
    pub names_proposed: Counter,
    /// Cluster mode: 1 while this node holds the ruler lease (sends alert notifications).
    pub ruler_lease: Gauge,
    /// Cluster mode: strong reads, by outcome (`ok`, `timeout`, `log_error`).
    pub strong_reads: Family<Outcome, Counter>,
    /// Cluster mode: time a strong read waited for this node's store.
    pub strong_read_wait: Histogram,
    /// Cluster mode: reads this node asked of other store nodes, by outcome (`ok`,
    /// `not_caught_up`: some partitions were passed on, `error`: down, busy or failed).
    pub peer_reads: Family<Outcome, Counter>,
    /// Cluster mode: how long each read asked of another store node took (all its pages).
    pub peer_read_duration: Histogram,
    /// Cluster mode: reads this node answered for other nodes, by outcome (`ok`, `error`,
    /// `busy`: refused at the limit of reads at once).
    pub peer_reads_served: Family<Outcome, Counter>,
    /// Cluster mode: partitions this store took on from a copy of another owner's, by outcome
    /// (`copied`; `abandoned`: read from the log instead; `lost`: behind the log with no owner
    /// to copy from).
    pub partition_copies: Family<Outcome, Counter>,
    /// Cluster mode: bytes of partition copies landed in this store.
    pub partition_copy_bytes: Counter,
    /// Cluster mode: rebuilds of a partition's open windows' exemplar sets from its log, by
    /// result (`rebuilt`, `abandoned`).
    pub exemplar_rebuilds: Family<Outcome, Counter>,
    /// Cluster mode: log records read again to rebuild exemplar sets.
    pub exemplar_rebuild_records: Counter,
    /// Requests refused or cut because they ran into a limit, by the limit's key.
    pub limit_hits: Family<LimitLabel, Counter>,
    /// Time to collect and write one flush epoch.
    pub flush_duration: Histogram,
    /// Bytes of one flush epoch's RocksDB write batch.
    pub flush_bytes: Histogram,
    /// Histogram merge operands written.
    pub flush_operands: Counter,
    /// Series that received spans in the last ten minutes.
    pub active_series: Gauge,
    /// Live data in the store, by column family.
    pub store_bytes: Family<ColumnFamilyLabel, Gauge>,
    /// Expired time partitions deleted by retention.
    pub retention_partitions_deleted: Counter,
    /// Series forgotten by the index because their newest window passed every retention.
    pub series_retired: Counter,
    /// Stored histograms found corrupt and skipped while merging.
    pub corrupt_operands: Counter,
    /// Accepted spans by how they arrived: in full, or folded by clients.
    pub spans_received: Family<Form, Counter>,
    /// The sampler's effective budget of full spans per second.
    pub sampling_budget: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Series keys the sampler tracks.
    pub sampling_keys: Gauge,
    /// Spans in batches refused for overload (clients resend or fold them), by reason.
    pub spans_throttled: Family<Reason, Counter>,
    /// Replies that asked a client to slow down.
    pub throttle_replies: Counter,
    /// Spans counted under `operation="__overflow__"` (their service reached its cap).
    pub spans_overflowed: Counter,
    /// OpenTelemetry spans that got the other end of their call by pairing, by side.
    pub topology_paired_spans: Family<SideLabel, Counter>,
    /// OpenTelemetry spans counted without the other end of their call, by side.
    pub topology_unpaired_spans: Family<SideLabel, Counter>,
    /// Rule group evaluations.
    pub rule_evaluations: Family<RuleGroupLabel, Counter>,
    /// Rules whose evaluation failed.
    pub rule_evaluation_failures: Family<RuleGroupLabel, Counter>,
    /// Evaluations skipped because the previous one overran the interval.
    pub rule_group_iterations_missed: Family<RuleGroupLabel, Counter>,
    /// Duration of a group's last evaluation.
    pub rule_group_last_duration: Family<RuleGroupLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Active alerts by state.
    pub alerts: Family<StateLabel, Gauge>,
    /// Alerts received by the notifier (from rules or `POST /api/v2/alerts`).
    pub alerts_received: Counter,
    /// Alert updates dropped because the notifier's queue was full (rules resend them).
    pub alerts_dropped: Counter,
    /// Notifications delivered, per receiver.
    pub notifications: Family<ReceiverLabel, Counter>,
    /// Notifications given up on (retried at the next group interval), per receiver.
    pub notifications_failed: Family<ReceiverLabel, Counter>,
    /// Every delivery attempt, by receiver and result.
    pub notification_attempts: Family<AttemptLabel, Counter>,
    /// Time from a group's flush to its notification's delivery, retries included.
    pub notification_latency: Histogram,
    /// Alerts forwarded to external Alertmanagers, by result.
    pub alerts_forwarded: Family<Outcome, Counter>,
    /// TLS handshakes that failed (no certificate, a wrong one, not TLS, too slow).
    pub tls_handshake_failures: Counter,
    /// Clients whose watermarks were forgotten after `ingest.client_idle_timeout`.
    pub clients_forgotten: Counter,
    /// Requests refused for their credentials, by listener and reason.
    pub auth_failures: Family<AuthLabel, Counter>,
    /// Samples delivered to remote-write targets.
    pub remote_write_sent: Family<RemoteLabel, Counter>,
    /// Samples a remote-write target did not get, by reason.
    pub remote_write_dropped: Family<RemoteDropLabel, Counter>,
    /// Remote-write requests retried (5xx, 429, connection errors, timeouts).
    pub remote_write_retries: Family<RemoteLabel, Counter>,
    /// Samples waiting to be sent, per target.
    pub remote_write_queued: Family<RemoteLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tailscope");
        let m = Metrics {
            spans_accepted: Counter::default(),
            spans_rejected: Family::default(),
            spans_clamped: Counter::default(),
            span_weights_clamped: Counter::default(),
            batches: Family::default(),
            batches_rejected: Family::default(),
            ingest_streams: Gauge::default(),
            shard_queue_depth: Family::default(),
            flushes: Family::default(),
            early_epochs: Counter::default(),
            log_messages: Counter::default(),
            log_bytes: Counter::default(),
            log_encoded_bytes: Counter::default(),
            log_publish_retries: Counter::default(),
            names_proposed: Counter::default(),
            ruler_lease: Gauge::default(),
            strong_reads: Family::default(),
            strong_read_wait: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            peer_reads: Family::default(),
            peer_read_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            peer_reads_served: Family::default(),
            partition_copies: Family::default(),
            partition_copy_bytes: Counter::default(),
            exemplar_rebuilds: Family::default(),
            exemplar_rebuild_records: Counter::default(),
            limit_hits: Family::default(),
            flush_duration: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            flush_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 12)),
            flush_operands: Counter::default(),
            active_series: Gauge::default(),
            store_bytes: Family::default(),
            retention_partitions_deleted: Counter::default(),
            series_retired: Counter::default(),
            corrupt_operands: Counter::default(),
            spans_received: Family::default(),
            sampling_budget: Gauge::default(),
            sampling_keys: Gauge::default(),
            spans_throttled: Family::default(),
            throttle_replies: Counter::default(),
            spans_overflowed: Counter::default(),
            topology_paired_spans: Family::default(),
            topology_unpaired_spans: Family::default(),
            rule_evaluations: Family::default(),
            rule_evaluation_failures: Family::default(),
            rule_group_iterations_missed: Family::default(),
            rule_group_last_duration: Family::default(),
            alerts: Family::default(),
            alerts_received: Counter::default(),
            alerts_dropped: Counter::default(),
            notifications: Family::default(),
            notifications_failed: Family::default(),
            notification_attempts: Family::default(),
            notification_latency: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            alerts_forwarded: Family::default(),
            tls_handshake_failures: Counter::default(),
            auth_failures: Family::default(),
            clients_forgotten: Counter::default(),
            remote_write_sent: Family::default(),
            remote_write_dropped: Family::default(),
            remote_write_retries: Family::default(),
            remote_write_queued: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "spans_accepted",
            "Spans counted into histograms (weighted, histogram deltas included)",
            m.spans_accepted.clone(),
        );
        r.register("spans_rejected", "Spans refused one by one, by reason", m.spans_rejected.clone());
        r.register(
            "spans_clamped",
            "Spans longer than the histogram range, counted at its top",
            m.spans_clamped.clone(),
        );
        r.register(
            "span_weights_clamped",
            "Span records whose weight (adjusted count) was above ingest.max_span_weight and was cut to it",
            m.span_weights_clamped.clone(),
        );
        r.register("batches", "Ingest batches received, by result", m.batches.clone());
        r.register("batches_rejected", "Ingest batches refused, by reason", m.batches_rejected.clone());
        r.register("ingest_streams", "Open ingest streams", m.ingest_streams.clone());
        r.register(
            "shard_queue_depth",
            "Work items waiting in each shard's queue",
            m.shard_queue_depth.clone(),
        );
        r.register("flushes", "Flush epochs, by result", m.flushes.clone());
        r.register(
            "limit_hits",
            "Requests refused or cut short because they ran into a limit, by the limit's configuration key",
            m.limit_hits.clone(),
        );
        r.register(
            "log_messages",
            "Cluster mode: messages this node's gateway published to the partitions' log and JetStream acknowledged",
            m.log_messages.clone(),
        );
        r.register(
            "log_bytes",
            "Cluster mode: bytes of the messages published to the log, as published (compressed: cluster.log_compression)",
            m.log_bytes.clone(),
        );
        r.register(
            "log_encoded_bytes",
            "Cluster mode: bytes of the messages published to the log as encoded, before compression",
            m.log_encoded_bytes.clone(),
        );
        r.register(
            "log_publish_retries",
            "Cluster mode: log publishes retried with the same message id (no stream leader, a timeout, a full stream)",
            m.log_publish_retries.clone(),
        );
        r.register(
            "names_proposed",
            "Cluster mode: names (a span group's service, operation and peer) this gateway added to the names log the gateways agree on",
            m.names_proposed.clone(),
        );
        r.register(
            "ruler_lease",
            "Cluster mode: 1 while this node holds the ruler lease and sends the alert notifications",
            m.ruler_lease.clone(),
        );
        r.register(
            "strong_reads",
            "Cluster mode: strong reads (X-Read-Consistency: strong), by outcome",
            m.strong_reads.clone(),
        );
        r.register(
            "strong_read_wait_seconds",
            "Cluster mode: how long a strong read waited for this node's store to write what the log held",
            m.strong_read_wait.clone(),
        );
        r.register(
            "peer_reads",
            "Cluster mode: reads this node asked of other store nodes, by outcome",
            m.peer_reads.clone(),
        );
        r.register(
            "peer_read_seconds",
            "Cluster mode: how long each read asked of another store node took, all its pages",
            m.peer_read_duration.clone(),
        );
        r.register(
            "peer_reads_served",
            "Cluster mode: reads this node answered for other nodes, by outcome",
            m.peer_reads_served.clone(),
        );
        r.register(
            "partition_copies",
            "Cluster mode: partitions taken on from a copy of another store's, by outcome",
            m.partition_copies.clone(),
        );
        r.register(
            "partition_copy_bytes",
            "Cluster mode: bytes of partition copies landed in this store",
            m.partition_copy_bytes.clone(),
        );
        r.register(
            "exemplar_rebuilds",
            "Cluster mode: rebuilds of a partition's open windows' exemplar sets from its log, by result",
            m.exemplar_rebuilds.clone(),
        );
        r.register(
            "exemplar_rebuild_records",
            "Cluster mode: log records read again to rebuild exemplar sets",
            m.exemplar_rebuild_records.clone(),
        );
        r.register(
            "early_epochs",
            "Flush epochs cut early because an OTLP export was waiting for durability (group commit)",
            m.early_epochs.clone(),
        );
        r.register(
            "flush_duration_seconds",
            "Time to collect and durably write one flush epoch",
            m.flush_duration.clone(),
        );
        r.register("flush_bytes", "Bytes in one flush epoch's RocksDB write batch", m.flush_bytes.clone());
        r.register("flush_operands", "Histogram merge operands written", m.flush_operands.clone());
        r.register(
            "active_series",
            "Series that received spans in the last ten minutes",
            m.active_series.clone(),
        );
        r.register(
            "store_bytes",
            "Live SST and memtable bytes in the store, by column family",
            m.store_bytes.clone(),
        );
        r.register(
            "retention_partitions_deleted",
            "Expired time partitions deleted by retention",
            m.retention_partitions_deleted.clone(),
        );
        r.register(
            "series_retired",
            "Series forgotten by the series index because their newest window passed every retention",
            m.series_retired.clone(),
        );
        r.register(
            "corrupt_operands",
            "Stored histograms found corrupt and skipped while merging",
            m.corrupt_operands.clone(),
        );
        r.register(
            "spans_received",
            "Accepted spans by how they arrived: in full (kept by sampling) or folded by clients",
            m.spans_received.clone(),
        );
        r.register(
            "sampling_budget_effective",
            "Full spans per second the sampler currently allows (shrinks under overload)",
            m.sampling_budget.clone(),
        );
        r.register("sampling_keys", "Series keys the sampler tracks", m.sampling_keys.clone());
        r.register(
            "spans_throttled",
            "Spans in batches refused for overload (clients resend or fold them), by reason",
            m.spans_throttled.clone(),
        );
        r.register(
            "throttle_replies",
            "Replies that asked a client to slow down",
            m.throttle_replies.clone(),
        );
        r.register(
            "spans_overflowed",
            "Spans counted under operation=\"__overflow__\" because their service reached ingest.max_operations_per_service",
            m.spans_overflowed.clone(),
        );
        r.register(
            "topology_paired_spans",
            "OpenTelemetry SERVER spans that got their caller, and CLIENT spans without a callee attribute that got their callee, by pairing the two ends of a call",
            m.topology_paired_spans.clone(),
        );
        r.register(
            "topology_unpaired_spans",
            "OpenTelemetry SERVER spans counted without their caller, and CLIENT spans without a callee attribute counted without one, by side",
            m.topology_unpaired_spans.clone(),
        );
        r.register("rule_evaluations", "Rule group evaluations", m.rule_evaluations.clone());
        r.register(
            "rule_evaluation_failures",
            "Rules whose evaluation failed",
            m.rule_evaluation_failures.clone(),
        );
        r.register(
            "rule_group_iterations_missed",
            "Rule group evaluations skipped because the previous one overran the interval",
            m.rule_group_iterations_missed.clone(),
        );
        r.register(
            "rule_group_last_duration_seconds",
            "Duration of the last evaluation of each rule group",
            m.rule_group_last_duration.clone(),
        );
        r.register("alerts", "Active alerts, by state", m.alerts.clone());
        r.register("alerts_received", "Alerts received by the notifier", m.alerts_received.clone());
        r.register(
            "alerts_dropped",
            "Alert updates dropped because the notifier's queue was full (rules resend them)",
            m.alerts_dropped.clone(),
        );
        r.register("notifications", "Notifications delivered, per receiver", m.notifications.clone());
        r.register(
            "notifications_failed",
            "Notifications given up on until the next group interval, per receiver",
            m.notifications_failed.clone(),
        );
        r.register(
            "notification_attempts",
            "Webhook delivery attempts, by receiver and result",
            m.notification_attempts.clone(),
        );
        r.register(
            "notification_latency_seconds",
            "Time from a group flush to its notification's delivery, retries included",
            m.notification_latency.clone(),
        );
        r.register(
            "remote_write_samples",
            "Samples delivered to remote-write targets",
            m.remote_write_sent.clone(),
        );
        r.register(
            "remote_write_samples_dropped",
            "Samples a remote-write target did not get, by reason",
            m.remote_write_dropped.clone(),
        );
        r.register(
            "remote_write_retries",
            "Remote-write requests retried (5xx, 429, connection errors, timeouts)",
            m.remote_write_retries.clone(),
        );
        r.register(
            "remote_write_queued_samples",
            "Samples waiting to be sent to a remote-write target",
            m.remote_write_queued.clone(),
        );
        r.register(
            "alerts_forwarded",
            "Alerts forwarded to external Alertmanagers, by result",
            m.alerts_forwarded.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed on any listener (a wrong or missing client certificate, not TLS, too slow)",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "clients_forgotten",
            "Clients whose watermarks were forgotten after ingest.client_idle_timeout without a batch",
            m.clients_forgotten.clone(),
        );
        r.register(
            "auth_failures",
            "Requests refused for their credentials, by listener (http, grpc, otlp_http) and reason",
            m.auth_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a request refused for its credentials.
    pub fn auth_failure(&self, listener: &'static str, reason: &'static str) {
        self.auth_failures.get_or_create(&AuthLabel { listener, reason }).inc();
    }

    /// Counts a request that ran into the limit `limit` (its configuration key).
    pub fn limit_hit(&self, limit: &'static str) {
        self.limit_hits.get_or_create(&LimitLabel { limit }).inc();
    }

    /// Counts a refused batch.
    pub fn reject_batch(&self, reason: &'static str) {
        self.batches.get_or_create(&Outcome { result: "rejected" }).inc();
        self.batches_rejected.get_or_create(&Reason { reason }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
