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

/// A `form` label: how spans arrived (`full`, or `folded` in a client's histogram delta).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Form {
    /// How.
    pub form: &'static str,
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
            batches: Family::default(),
            batches_rejected: Family::default(),
            ingest_streams: Gauge::default(),
            shard_queue_depth: Family::default(),
            flushes: Family::default(),
            flush_duration: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            flush_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 12)),
            flush_operands: Counter::default(),
            active_series: Gauge::default(),
            store_bytes: Family::default(),
            retention_partitions_deleted: Counter::default(),
            corrupt_operands: Counter::default(),
            spans_received: Family::default(),
            sampling_budget: Gauge::default(),
            sampling_keys: Gauge::default(),
            spans_throttled: Family::default(),
            throttle_replies: Counter::default(),
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
        Metrics { registry, ..m }
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
