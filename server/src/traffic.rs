//! The seam between what the pipeline's shards record and who wants to know it per key.

use tailscope_proto::histogram::Recorder;

/// Where the shards tell what traffic they recorded: the seam through which the adaptive
/// sampler learns each key's throughput and durations from the deltas the shards build anyway,
/// once per (series, window) and epoch instead of once per span group at admission (at 10,000
/// series per batch that is once per span, each a cold lookup). The pipeline is given one
/// with `Pipeline::feed_traffic`; a cluster node, whose shards see only the partitions it
/// stores, feeds its sampler at admission instead.
pub trait TrafficSink: Send + Sync + std::fmt::Debug {
    /// A shard opened, in the epoch being filled, a (series, window) of the group `key`, whose
    /// service and operation are counted as `service`/`operation`.
    fn track(&self, key: u64, service: &str, operation: &str);
    /// A (series, window) of `key` recorded, in one epoch, `full` spans (weighted) that came in
    /// full and `folded` that clients folded into deltas, with their `durations`.
    fn recorded(&self, key: u64, full: u64, folded: u64, durations: &Recorder);
    /// Every shard has told the traffic of an epoch, which was admitted over `seconds`.
    fn covered(&self, seconds: f64);
}
