//! Strong reads: a query that must see everything acknowledged before it was asked.
//!
//! A cluster node's gateway acknowledges a batch once JetStream holds it, and a store applies
//! the log behind that, so a query sent right after an acknowledgement may miss the batch for
//! up to a flush interval (eventual consistency, the default). [`LogBarrier`] is Mimir's
//! `X-Read-Consistency: strong` on this log: it reads each partition's last stream sequence,
//! then waits until this node's store has written every message up to it (asking for an early
//! epoch once they are all applied), or refuses after `cluster.strong_read_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use crate::pipeline::Pipeline;
use crate::store::LogPosition;
use crate::telemetry::{Metrics, Outcome};

/// Stream-info requests in flight at once.
const CONCURRENT_INFO: usize = 16;
/// Partitions named in a refusal; the rest are counted.
const NAMED: usize = 4;

/// The barrier of a store node: the partitions' streams and the pipeline that writes them.
#[derive(Debug)]
pub struct LogBarrier {
    js: async_nats::jetstream::Context,
    /// Each partition with its stream's name.
    streams: Vec<(u32, String)>,
    pipeline: Arc<Pipeline>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl LogBarrier {
    /// A barrier over `streams` (partition, stream name), waiting at most `timeout`.
    pub fn new(
        js: async_nats::jetstream::Context,
        streams: Vec<(u32, String)>,
        pipeline: Arc<Pipeline>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> LogBarrier {
        LogBarrier { js, streams, pipeline, timeout, metrics }
    }

    /// Where each non-empty partition of `partitions` ends now: its last message, whole.
    async fn ends(&self, partitions: &[u32]) -> Result<Vec<(u32, LogPosition)>, String> {
        let streams: Vec<(u32, String)> =
            self.streams.iter().filter(|(p, _)| partitions.contains(p)).cloned().collect();
        Ok(log_ends(&self.js, &streams)
            .await?
            .into_iter()
            // A stream whose messages all aged out holds nothing to wait for.
            .filter(|end| end.messages > 0)
            .map(|end| (end.partition, LogPosition { seq: end.last_seq, records: u32::MAX }))
            .collect())
    }

    /// Waits until this node's store has written everything `partitions`' logs hold now.
    pub async fn wait_for(&self, partitions: &[u32]) -> Result<(), String> {
        if partitions.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let ends = match tokio::time::timeout(self.timeout, self.ends(partitions)).await {
            Ok(Ok(ends)) => ends,
            Ok(Err(e)) => return self.done("log_error", started, Err(format!("strong read: {e}"))),
            Err(_) => {
                return self.done(
                    "log_error",
                    started,
                    Err(format!("strong read: the log's positions were not read within {:?}", self.timeout)),
                )
            }
        };
        let left = self.timeout.saturating_sub(started.elapsed());
        match self.pipeline.wait_written(&ends, left).await {
            Ok(()) => self.done("ok", started, Ok(())),
            Err(behind) => {
                let named: Vec<String> = behind
                    .iter()
                    .take(NAMED)
                    .map(|(p, end, at)| format!("partition {p} written to message {} of {}", at.seq, end.seq))
                    .collect();
                let more = behind.len().saturating_sub(NAMED);
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                let message = format!(
                    "strong read: this node's store has not caught up with the log within {:?} \
                     (cluster.strong_read_timeout): {}{more}",
                    self.timeout,
                    named.join(", ")
                );
                self.done("timeout", started, Err(message))
            }
        }
    }

    fn done(&self, result: &'static str, started: Instant, r: Result<(), String>) -> Result<(), String> {
        self.metrics.strong_reads.get_or_create(&Outcome { result }).inc();
        self.metrics.strong_read_wait.observe(started.elapsed().as_secs_f64());
        r
    }
}

/// Where a partition's log ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEnd {
    /// The partition.
    pub partition: u32,
    /// The stream's last sequence (0: nothing was ever published).
    pub last_seq: u64,
    /// Messages the stream holds now.
    pub messages: u64,
}

/// Where each of `streams` (partition, stream name) ends now, in partition order.
pub async fn log_ends(
    js: &async_nats::jetstream::Context,
    streams: &[(u32, String)],
) -> Result<Vec<LogEnd>, String> {
    // Owned values in the futures: borrowed ones make them too general to box as `Send`.
    let infos = futures::stream::iter(streams.to_vec())
        .map(|(p, name)| {
            let js = js.clone();
            async move {
                let stream = js
                    .get_stream(name)
                    .await
                    .map_err(|e| format!("cannot read where partition {p}'s log ends: {e}"))?;
                let state = &stream.cached_info().state;
                Ok::<_, String>(LogEnd {
                    partition: p,
                    last_seq: state.last_sequence,
                    messages: state.messages,
                })
            }
        })
        .buffer_unordered(CONCURRENT_INFO);
    let mut ends: Vec<LogEnd> = infos.try_collect().await?;
    ends.sort_by_key(|e| e.partition);
    Ok(ends)
}
