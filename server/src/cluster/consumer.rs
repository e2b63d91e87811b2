//! A store replica's reader of one partition's log.
//!
//! It reads the partition's stream with an ordered consumer (ephemeral, no acknowledgements:
//! the position lives in this node's RocksDB, not on the NATS servers) from the position the
//! pipeline holds, and admits each record into the pipeline together with the record's own
//! position ([`Pipeline::admit_logged`]). The epoch that writes a record's merges writes its
//! position in the same synced batch, so after a crash the replica resumes exactly after the
//! last record it wrote: records of a message it had partly applied are skipped one by one.
//!
//! It reads only while this node owns the partition ([`super::assign`]): a partition taken
//! on is read from where this store last left it — or, when it holds nothing of it (or part
//! of a copy, or less than the log still has), from the position of a copy of another
//! owner's it first takes ([`super::copy`]; from the log's start when no owner gives one) —
//! and marked caught up once everything its log held then is written; one handed on is
//! marked not caught up and no longer read (what the store wrote of it stays, unread by
//! queries, until the partition comes back).
//!
//! Before it reads on, it reads again the last 50 s of what the store already holds, offering their spans to the exemplar sets of the windows still open there and
//! nothing else ([`warm`]): those sets live in the shards' memory until a window closes, so a
//! store that restarted, took a copy or took a partition back would otherwise keep other
//! exemplars for those windows than its peers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use tokio::sync::watch;

use super::assign::{Assignment, Replicas};
use crate::pipeline::{Admission, Pipeline};
use crate::store::LogPosition;
use crate::telemetry::Outcome;

/// How long a consumer may stay quiet before it checks that the stream has nothing newer.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(2);
/// How long creating a consumer may take before it is tried again. NATS before 2.9.14
/// places a one-replica consumer on a random peer of the stream, a dead one included, and
/// such a create is never answered; a prompt retry draws again.
pub(super) const CREATE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest pause between two attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How far the clocks of gateways and NATS servers may disagree, in seconds, for exemplar
/// sets rebuilt by [`warm`] to be whole ([`Pipeline::warm_range`]).
const WARM_SLACK_SECONDS: i64 = 10;
/// Tries at rebuilding a partition's exemplar sets before reading on without them.
const WARM_ATTEMPTS: u32 = 3;

/// One partition's log, and where its records go.
#[derive(Debug, Clone)]
pub struct Partition {
    /// The partition.
    pub partition: u32,
    /// Its stream.
    pub stream: String,
    /// Its subject.
    pub subject: String,
    /// The pipeline the records are admitted to.
    pub pipeline: Arc<Pipeline>,
    /// The pipeline's shards (records are routed among them).
    pub shards: usize,
    /// Whether this node's copy of each partition is caught up.
    pub replicas: Arc<Replicas>,
    /// Takes copies of partitions from their other owners.
    pub taker: Arc<super::copy::Taker>,
}

fn owns(a: &Option<Arc<Assignment>>, partition: u32) -> bool {
    a.as_ref().is_some_and(|a| a.owns(partition))
}

/// Reads `p`'s log into its pipeline while this node owns it, until `stop`.
pub async fn run(
    js: async_nats::jetstream::Context,
    p: Partition,
    mut owners: watch::Receiver<Option<Arc<Assignment>>>,
    mut stop: watch::Receiver<bool>,
) {
    let partition = p.partition;
    let mut read_before = false;
    loop {
        tokio::select! {
            r = owners.wait_for(|a| owns(a, partition)) => if r.is_err() { return },
            _ = stop.wait_for(|&s| s) => return,
        }
        // Read before by this process: its exemplar sets are of where reading stopped.
        if read_before {
            tokio::select! {
                () = forget_exemplars(&p) => {}
                _ = stop.wait_for(|&s| s) => return,
            }
        }
        read_before = true;
        let taken = tokio::select! {
            t = take(&js, &p, &owners) => t,
            _ = stop.wait_for(|&s| s) => return,
        };
        let stopped = tokio::select! {
            () = rebuild_exemplars(&js, &p) => false,
            _ = stop.wait_for(|&s| s) => true,
        };
        if stopped {
            p.pipeline.warmed(partition, false).await;
            return;
        }
        tracing::info!(partition, from = ?p.pipeline.log_position(partition), ?taken, "reading a partition this node now owns");
        let catch_up = tokio::spawn(catch_up(js.clone(), p.clone()));
        tokio::select! {
            _ = read_owned(&js, &p, &mut stop) => {
                catch_up.abort();
                return;
            }
            r = owners.wait_for(|a| !owns(a, partition)) => {
                catch_up.abort();
                p.replicas.set(partition, false);
                if r.is_err() {
                    return;
                }
                tracing::info!(partition, "partition handed on to another store; no longer reading it");
            }
        }
    }
}

/// Drops the exemplar sets of `p`'s series once what was applied of it is written (its
/// series are then all in the store).
async fn forget_exemplars(p: &Partition) {
    let applied = p.pipeline.log_position(p.partition);
    let mut wait = Duration::from_millis(100);
    loop {
        let written = p.pipeline.wait_written(&[(p.partition, applied)], Duration::from_secs(60)).await;
        let series = match written {
            Ok(()) => p.taker.series_of(p.partition).await,
            Err(behind) => Err(format!("not written yet: {behind:?}")),
        };
        match series {
            Ok(series) => return p.pipeline.forget_exemplars(series).await,
            Err(e) => {
                tracing::warn!(partition = p.partition, error = %e, "cannot list the partition's series yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// [`warm`], tried [`WARM_ATTEMPTS`] times; after that `p` is read on with its open windows'
/// exemplar sets starting empty (logged: its exemplars of those windows may then differ from
/// its peers'). One partition at a time (with the copies): reading every partition's recent
/// log at once on a restart loads NATS and the store's cores with all of it together.
async fn rebuild_exemplars(js: &async_nats::jetstream::Context, p: &Partition) {
    let Ok(_one) = p.taker.one_at_a_time.acquire().await else { return };
    let started = Instant::now();
    for attempt in 1..=WARM_ATTEMPTS {
        match warm(js, p).await {
            Ok(records) => {
                p.pipeline.warmed(p.partition, true).await;
                let metrics = &p.taker.metrics;
                metrics.exemplar_rebuild_records.inc_by(records);
                if records > 0 {
                    metrics.exemplar_rebuilds.get_or_create(&Outcome { result: "rebuilt" }).inc();
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(
                        partition = p.partition,
                        records,
                        seconds,
                        "rebuilt the exemplar sets of the partition's open windows"
                    );
                }
                return;
            }
            Err(e) => {
                p.pipeline.warmed(p.partition, false).await;
                tracing::warn!(partition = p.partition, attempt, error = %e, "cannot read the log again to rebuild the open windows' exemplar sets");
                tokio::time::sleep(MAX_BACKOFF).await;
            }
        }
    }
    p.taker.metrics.exemplar_rebuilds.get_or_create(&Outcome { result: "abandoned" }).inc();
    tracing::error!(
        partition = p.partition,
        "reading on without the exemplar sets of the windows open where the store resumes: this replica's exemplars of those windows may differ from its peers'"
    );
}

/// Reads `p`'s log again, from a little before the last message its store holds up to the
/// position it resumes after, offering each record's spans to the exemplar sets of the windows
/// still open there ([`Pipeline::warm`], [`Pipeline::warm_range`]): the sets come out as they
/// were when the records were first read, here or on a peer. A record that repeats an earlier
/// one's client and sequence was a resend, not applied, and is left out here too. Returns how
/// many records were offered.
async fn warm(js: &async_nats::jetstream::Context, p: &Partition) -> Result<u64, String> {
    let to = p.pipeline.log_position(p.partition);
    if to.seq == 0 {
        return Ok(0);
    }
    let stream = js.get_stream(&p.stream).await.map_err(|e| format!("getting the stream: {e}"))?;
    let last = match stream.get_raw_message(to.seq).await {
        Ok(m) => m,
        // Gone from the log (older than its `max_age`): so are the windows it could hold.
        Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(0)
        }
        Err(e) => return Err(format!("reading message {}: {e}", to.seq)),
    };
    let at = last.time.unix_timestamp();
    let (start, floor) = p.pipeline.warm_range(at, WARM_SLACK_SECONDS);
    let from = last.time - Duration::from_secs(u64::try_from(at - start).unwrap_or(0));
    let mut log =
        Ordered::open(js, &p.stream, &p.subject, DeliverPolicy::ByStartTime { start_time: from }).await?;
    let mut resent: HashMap<u64, u64> = HashMap::new();
    let (mut records, mut read) = (0, 0);
    loop {
        // Quiet while the stream holds messages past what was read: made again (an error).
        let Some((message, seq)) = log.next(move || read).await? else { continue };
        read = seq;
        if seq > to.seq {
            return Ok(records);
        }
        // What did not read the first time was skipped then too.
        let Ok(batch) = super::record::open(&message.payload, message.headers.as_ref()) else { continue };
        for (i, record) in batch.records.into_iter().enumerate() {
            if (LogPosition { seq, records: i as u32 + 1 }) > to {
                return Ok(records);
            }
            let Ok(validated) = super::record::rebuild(record, p.partition, p.shards) else { continue };
            if validated.client_id != 0 {
                let seen = resent.entry(validated.client_id).or_default();
                if validated.seq <= *seen {
                    continue;
                }
                *seen = validated.seq;
            }
            p.pipeline.warm(p.partition, Arc::new(validated), floor).await?;
            records += 1;
        }
        if seq == to.seq {
            return Ok(records);
        }
    }
}

/// Takes a copy of `p` from another owner when this store needs one ([`super::copy`]),
/// trying again until one landed or none is to be had.
async fn take(
    js: &async_nats::jetstream::Context,
    p: &Partition,
    owners: &watch::Receiver<Option<Arc<Assignment>>>,
) -> super::copy::Taken {
    let mut wait = Duration::from_millis(100);
    loop {
        let assignment = owners.borrow().clone();
        let first_seq = match js.get_stream(&p.stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.first_sequence).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let outcome = match (assignment, first_seq) {
            (Some(a), Ok(first_seq)) => p.taker.take(&p.pipeline, p.partition, first_seq, &a).await,
            (None, _) => Err("the partitions' owners are not known yet".to_owned()),
            (_, Err(e)) => Err(format!("reading the stream: {e}")),
        };
        match outcome {
            Ok(taken) => return taken,
            Err(e) => {
                tracing::warn!(partition = p.partition, error = %e, "cannot decide on or take a copy of the partition yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Marks `p` caught up once its store has written every message its log held now.
async fn catch_up(js: async_nats::jetstream::Context, p: Partition) {
    let mut wait = Duration::from_millis(100);
    let end = loop {
        match super::strong::log_ends(&js, &[(p.partition, p.stream.clone())]).await {
            Ok(ends) => break ends.first().map_or(0, |e| if e.messages == 0 { 0 } else { e.last_seq }),
            Err(e) => {
                tracing::debug!(partition = p.partition, error = %e, "cannot read where the log ends yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    };
    let target = [(p.partition, LogPosition { seq: end, records: u32::MAX })];
    while end > 0 && p.pipeline.wait_written(&target, Duration::from_secs(60)).await.is_err() {}
    p.replicas.set(p.partition, true);
    tracing::info!(partition = p.partition, end, "caught up with the partition's log; answering its reads");
}

/// Reads `p` until `stop` or the pipeline closes. Any failure of NATS (a leader election, a
/// lost connection) recreates the consumer from the pipeline's position.
async fn read_owned(js: &async_nats::jetstream::Context, p: &Partition, stop: &mut watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            r = read(js, &p.stream, &p.subject, p.partition, &p.pipeline, p.shards) => r,
            _ = stop.wait_for(|&s| s) => return,
        };
        match outcome {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(partition = p.partition, error = %e, "log consumer interrupted; resuming from the applied position");
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
    let start = DeliverPolicy::ByStartSequence { start_sequence: from.seq.max(1) };
    let mut log = Ordered::open(js, stream, subject, start).await?;
    loop {
        let Some((message, seq)) = log.next(|| pipeline.log_position(partition).seq).await? else {
            continue;
        };
        let batch = match super::record::open(&message.payload, message.headers.as_ref()) {
            Ok(batch) => batch,
            Err(super::record::Unreadable::Corrupt(e)) => {
                tracing::error!(partition, seq, error = %e, "skipping a log message that does not decompress or decode");
                pipeline.skip_logged(partition, LogPosition { seq, records: u32::MAX });
                continue;
            }
            // Kept in the log: read again (with backoff) until a store that knows it reads it.
            Err(super::record::Unreadable::UnknownEncoding(e)) => {
                return Err(format!(
                    "message {seq} is compressed as {e:?}, which this version cannot read; upgrade this store"
                ))
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
}

/// A stream's subject read in order by an ordered consumer (ephemeral, no acknowledgements:
/// the reader keeps its own place), which notices its consumer gone quiet while the stream
/// moved on.
pub(super) struct Ordered {
    stream: async_nats::jetstream::stream::Stream,
    messages: async_nats::jetstream::consumer::pull::Ordered,
}

impl Ordered {
    /// `subject` of `stream` from `from` on; tries for [`CREATE_TIMEOUT`].
    pub(super) async fn open(
        js: &async_nats::jetstream::Context,
        stream: &str,
        subject: &str,
        from: DeliverPolicy,
    ) -> Result<Ordered, String> {
        let create = async {
            let stream = js.get_stream(stream).await.map_err(|e| format!("getting the stream: {e}"))?;
            let config = OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: from,
                ..Default::default()
            };
            let consumer =
                stream.create_consumer(config).await.map_err(|e| format!("creating a consumer: {e}"))?;
            let messages = consumer.messages().await.map_err(|e| format!("reading: {e}"))?;
            Ok::<_, String>(Ordered { stream, messages })
        };
        tokio::time::timeout(CREATE_TIMEOUT, create)
            .await
            .map_err(|_| format!("no consumer within {CREATE_TIMEOUT:?}"))?
    }

    /// The next message and its stream sequence; `None` after [`IDLE_CHECK`] of quiet while
    /// the stream holds nothing past `applied` (the reader's place). An error means the
    /// consumer is to be made again: an ordered consumer lives on one NATS server, and when
    /// that server dies its client notices only after missing heartbeats for half a minute,
    /// so a stream that moved on while it was quiet means recreate now.
    pub(super) async fn next(
        &mut self,
        applied: impl Fn() -> u64,
    ) -> Result<Option<(async_nats::jetstream::Message, u64)>, String> {
        let message = match tokio::time::timeout(IDLE_CHECK, self.messages.next()).await {
            Ok(Some(message)) => message.map_err(|e| format!("next message: {e}"))?,
            Ok(None) => return Err("the stream's messages ended".into()),
            Err(_) => {
                let last =
                    self.stream.info().await.map_err(|e| format!("stream info: {e}"))?.state.last_sequence;
                if last > applied() {
                    return Err(format!(
                        "no message for {IDLE_CHECK:?} while the stream is at {last}; recreating the consumer"
                    ));
                }
                return Ok(None);
            }
        };
        let seq = message.info().map_err(|e| e.to_string())?.stream_sequence;
        Ok(Some((message, seq)))
    }
}
