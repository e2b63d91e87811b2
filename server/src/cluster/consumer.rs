//! A store replica's reader of one partition's log.
//!
//! It reads the partition's stream with an ordered consumer (ephemeral, no acknowledgements:
//! the position lives in this node's RocksDB, not on the NATS servers) from the position the
//! pipeline holds, and admits each record into the pipeline together with the record's own
//! position ([`Pipeline::admit_logged`]). The epoch that writes a record's merges writes its
//! position in the same synced batch, so after a crash the replica resumes exactly after the
//! last record it wrote: records of a message it had partly applied are skipped one by one.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use prost::Message;
use tailscope_proto::v1::PartitionBatch;
use tokio::sync::watch;

use crate::pipeline::{Admission, Pipeline};
use crate::store::LogPosition;

/// How long a consumer may stay quiet before it checks that the stream has nothing newer.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// How long creating a consumer may take before it is tried again. NATS before 2.9.14
/// places a one-replica consumer on a random peer of the stream, a dead one included, and
/// such a create is never answered; a prompt retry draws again.
const CREATE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Reads partition `partition` (stream `stream`, subject `subject`) into `pipeline`, routed
/// among `shards` shards, until `stop`. Any failure of NATS (a leader election, a lost
/// connection) recreates the consumer from the pipeline's position.
pub async fn run(
    js: async_nats::jetstream::Context,
    stream: String,
    subject: String,
    partition: u32,
    pipeline: Arc<Pipeline>,
    shards: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            r = read(&js, &stream, &subject, partition, &pipeline, shards) => r,
            _ = stop.wait_for(|&s| s) => return,
        };
        match outcome {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(partition, error = %e, "log consumer interrupted; resuming from the applied position");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|&s| s) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One consumer's life: returns `Ok` when the pipeline closes, `Err` when NATS failed.
async fn read(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
    partition: u32,
    pipeline: &Pipeline,
    shards: usize,
) -> Result<(), String> {
    let from = pipeline.log_position(partition);
    let create = async {
        let stream = js.get_stream(stream).await.map_err(|e| format!("getting the stream: {e}"))?;
        let config = OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.seq.max(1) },
            ..Default::default()
        };
        let consumer =
            stream.create_consumer(config).await.map_err(|e| format!("creating a consumer: {e}"))?;
        let messages = consumer.messages().await.map_err(|e| format!("reading: {e}"))?;
        Ok::<_, String>((stream, messages))
    };
    let (mut stream, mut messages) = tokio::time::timeout(CREATE_TIMEOUT, create)
        .await
        .map_err(|_| format!("no consumer within {CREATE_TIMEOUT:?}"))??;
    loop {
        let message = match tokio::time::timeout(IDLE_CHECK, messages.next()).await {
            Ok(Some(message)) => message.map_err(|e| format!("next message: {e}"))?,
            Ok(None) => break,
            // Quiet: fine if the stream holds nothing newer. An ordered consumer lives on one
            // NATS server; when that server dies its client notices only after missing
            // heartbeats for half a minute, so a stream that moved on means recreate now.
            Err(_) => {
                let last = stream.info().await.map_err(|e| format!("stream info: {e}"))?.state.last_sequence;
                if last > pipeline.log_position(partition).seq {
                    return Err(format!("no message for {IDLE_CHECK:?} while the stream is at {last}; recreating the consumer"));
                }
                continue;
            }
        };
        let seq = message.info().map_err(|e| e.to_string())?.stream_sequence;
        let batch = match PartitionBatch::decode(message.payload.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(partition, seq, error = %e, "skipping a log message that does not decode");
                pipeline.skip_logged(partition, LogPosition { seq, records: u32::MAX });
                continue;
            }
        };
        for (i, record) in batch.records.into_iter().enumerate() {
            let after = LogPosition { seq, records: i as u32 + 1 };
            // The first message may be one an epoch ended inside: its first records are applied.
            if after <= from {
                continue;
            }
            let mut validated = match super::record::rebuild(record, partition, shards) {
                Ok(v) => Arc::new(v),
                Err(e) => {
                    tracing::error!(partition, seq, record = i, error = %e, "skipping a log record that does not hold together");
                    pipeline.skip_logged(partition, after);
                    continue;
                }
            };
            loop {
                match pipeline.admit_logged(validated, partition, after) {
                    Ok(Admission::Accepted | Admission::Duplicate) => break,
                    Ok(Admission::Draining) => return Ok(()),
                    // The store cannot write (disk full, an I/O error): wait, keep the place.
                    Ok(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Err("the store refused a record; re-reading from the applied position".into());
                    }
                    Err(back) => {
                        validated = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        // The whole message is in: a strong read waiting for this sequence may go on.
        pipeline.finish_logged(partition, seq);
    }
    Err("the log's message stream ended".into())
}
