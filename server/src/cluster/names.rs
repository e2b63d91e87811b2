//! The names log: how a cluster's gateways agree on the names spans are counted under.
//!
//! The caps on services, operations per service and peers per service
//! ([`crate::cardinality`]) decide by order: the first names of a service up to its cap keep
//! their series, later ones count under `__overflow__`. Each gateway deciding by the order
//! it saw would let two gateways count one operation differently and a service pass its cap
//! once per gateway. So a gateway proposes the names its [`Cardinality`] has not decided to
//! one replicated stream, `<cluster>_names`, and every gateway applies that stream, in its
//! order, to its own `Cardinality` ([`Cardinality::apply`]): the same names in the same order
//! give the same decisions on every gateway, as one node taking every batch would make them.
//! A proposal is answered once this gateway has applied the log up to it.
//!
//! Only names not yet decided are proposed — a known name, or a new one of a service at its
//! cap, is decided from what the gateway applied — so the log holds each name about once;
//! it is bounded (`cluster.max_names_bytes`, `discard: new`): once full, batches with new names
//! are refused (RESOURCE_EXHAUSTED, naming the key) and batches of known ones still go in.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::consumer::{Ordered, MAX_BACKOFF};
use super::{ClusterConfig, ClusterError};
use crate::cardinality::{Cardinality, Names, NamesRefused, SharedNames};

/// A gateway's side of the names log: proposes, and applies every gateway's proposals.
#[derive(Debug)]
pub struct LogNames {
    js: async_nats::jetstream::Context,
    subject: String,
    cardinality: Arc<Cardinality>,
    /// The last sequence of the log applied to `cardinality`.
    applied: watch::Receiver<u64>,
    /// The log's last sequence when this gateway started: proposals wait until it is applied,
    /// so a restarted gateway does not propose again what the log already decided.
    start: u64,
    metrics: Arc<crate::telemetry::Metrics>,
    /// `cluster.max_names_bytes`.
    max_bytes: i64,
}

impl LogNames {
    /// Creates the names log when missing and starts applying it to `cardinality` (which must
    /// hold nothing else: every gateway's starts empty).
    pub async fn start(
        js: async_nats::jetstream::Context,
        config: &ClusterConfig,
        cardinality: Arc<Cardinality>,
        metrics: Arc<crate::telemetry::Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<LogNames>, JoinHandle<()>), ClusterError> {
        let stream = format!("{}_names", config.name);
        let subject = format!("{}.names", config.name);
        let wanted = async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: config.stream_replicas,
            max_bytes: config.max_names_bytes,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let mut opened = super::open_stream(&js, wanted).await?;
        let start = match opened.info().await {
            Ok(info) => info.state.last_sequence,
            Err(e) => return Err(ClusterError::Stream { stream, message: e.to_string() }),
        };
        let (applied_tx, applied) = watch::channel(0);
        let reader =
            Reader { js: js.clone(), stream, subject: subject.clone(), cardinality: cardinality.clone() };
        let task = tokio::spawn(reader.run(applied_tx, stop));
        // Until it has applied what the log holds, a gateway decides no name, so every batch
        // would wait on it: the node is not ready before (for at most the connect timeout).
        let began = std::time::Instant::now();
        let mut caught_up = applied.clone();
        match tokio::time::timeout(config.connect_timeout, caught_up.wait_for(|&a| a >= start)).await {
            Ok(_) => tracing::info!(messages = start, took = ?began.elapsed(), "names log applied"),
            Err(_) => tracing::warn!(
                messages = start,
                applied = *applied.borrow(),
                "the names log is not applied yet; batches with names it decides wait for it"
            ),
        }
        let max_bytes = config.max_names_bytes;
        Ok((Arc::new(LogNames { js, subject, cardinality, applied, start, metrics, max_bytes }), task))
    }

    /// Waits until the log is applied up to `seq`.
    async fn applied_to(&self, seq: u64) -> Result<(), NamesRefused> {
        let mut applied = self.applied.clone();
        let stopped = |_| NamesRefused::Unavailable("the names log's reader stopped".into());
        applied.wait_for(|&a| a >= seq).await.map(|_| ()).map_err(stopped)
    }

    /// Publishes `payload` until JetStream acknowledges it; its sequence (of the first copy,
    /// for a proposal another gateway or an earlier try already made) and whether it was such
    /// a duplicate.
    async fn publish(&self, payload: bytes::Bytes) -> Result<(u64, bool), NamesRefused> {
        let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&payload));
        let mut backoff = Duration::from_millis(50);
        loop {
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id);
            let attempt = async {
                let ack =
                    self.js.send_publish(self.subject.clone(), publish).await.map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            };
            match attempt.await {
                Ok(ack) => return Ok((ack.sequence, ack.duplicate)),
                // A full log stays full: say so rather than wait.
                Err(e) if e.contains("maximum bytes exceeded") => {
                    return Err(NamesRefused::Full(format!(
                        "the names log is full (cluster.max_names_bytes = {}): no new service, operation or peer can be agreed on ({e})",
                        self.max_bytes
                    )));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "names log publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

impl SharedNames for LogNames {
    fn propose(
        &self,
        mut names: Vec<Names>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), NamesRefused>> + Send + '_>> {
        Box::pin(async move {
            self.applied_to(self.start).await?;
            // What the log decided meanwhile (another batch, another gateway) is not proposed.
            names.retain(|n| !decided(&self.cardinality, n));
            if names.is_empty() {
                return Ok(());
            }
            // In messages NATS takes (a batch may bring a hundred thousand new names).
            let mut last = 0;
            let messages = proposals(&names).map_err(|e| NamesRefused::Unavailable(e.to_string()))?;
            for (payload, count) in messages {
                let (seq, duplicate) = self.publish(payload.into()).await?;
                if !duplicate {
                    self.metrics.names_proposed.inc_by(count as u64);
                }
                last = last.max(seq);
            }
            self.applied_to(last).await
        })
    }
}

/// The most a names log message carries (NATS refuses messages above its `max_payload`,
/// 1 MiB by default).
const PROPOSAL_BYTES: usize = 256 << 10;

/// `names` as proposal messages (JSON arrays) of at most [`PROPOSAL_BYTES`] each, in order,
/// with how many names each holds. A name is at most 3 × 256 bytes, 6 × that escaped, so
/// every message holds one at least.
fn proposals(names: &[Names]) -> Result<Vec<(Vec<u8>, usize)>, serde_json::Error> {
    let mut messages = Vec::new();
    let (mut message, mut count) = (b"[".to_vec(), 0);
    for n in names {
        let encoded = serde_json::to_vec(n)?;
        if count > 0 && message.len() + 1 + encoded.len() + 1 > PROPOSAL_BYTES {
            message.push(b']');
            messages.push((std::mem::replace(&mut message, b"[".to_vec()), count));
            count = 0;
        }
        if count > 0 {
            message.push(b',');
        }
        message.extend_from_slice(&encoded);
        count += 1;
    }
    if count > 0 {
        message.push(b']');
        messages.push((message, count));
    }
    Ok(messages)
}

/// Whether `cardinality` decides every name of `n` without adding one.
fn decided(cardinality: &Cardinality, n: &Names) -> bool {
    cardinality
        .decided(&n.service, &n.operation)
        .is_some_and(|(service, _, _)| cardinality.decided_peer(service, &n.peer).is_some())
}

/// Applies the names log, in order, to a gateway's [`Cardinality`].
struct Reader {
    js: async_nats::jetstream::Context,
    stream: String,
    subject: String,
    cardinality: Arc<Cardinality>,
}

impl Reader {
    /// Applies the log until `stop`, starting again after the last message applied whenever
    /// NATS fails.
    async fn run(self, applied: watch::Sender<u64>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                r = self.read(&applied) => r,
                _ = stop.wait_for(|&s| s) => return,
            };
            tracing::warn!(error = %outcome, "names log reader interrupted; resuming after the last name applied");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|&s| s) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One consumer's life; returns why it ended.
    async fn read(&self, applied: &watch::Sender<u64>) -> String {
        let from = DeliverPolicy::ByStartSequence { start_sequence: *applied.borrow() + 1 };
        let mut log = match Ordered::open(&self.js, &self.stream, &self.subject, from).await {
            Ok(log) => log,
            Err(e) => return e,
        };
        loop {
            let (message, seq) = match log.next(|| *applied.borrow()).await {
                Ok(Some(next)) => next,
                Ok(None) => continue,
                Err(e) => return e,
            };
            if seq <= *applied.borrow() {
                continue;
            }
            match serde_json::from_slice::<Vec<Names>>(&message.payload) {
                Ok(names) => names.iter().for_each(|n| self.cardinality.apply(n)),
                // Every gateway skips the same message, so they still agree.
                Err(e) => {
                    tracing::error!(seq, error = %e, "skipping a names log message that does not decode")
                }
            }
            applied.send_replace(seq);
        }
    }
}

#[cfg(test)]
mod tests;
