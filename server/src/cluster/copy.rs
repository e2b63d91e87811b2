//! A store that takes a partition on starts from a copy of a caught-up owner's, not from the
//! log's start: the log keeps only `cluster.max_age` of history, and replaying a day of it is
//! slower than copying its result.
//!
//! * **Giving** ([`Copies`]): an owner that holds the partition caught up answers a copy's
//!   first page by making a checkpoint of its store ([`Store::checkpoint`]: hard links, one
//!   point of its history) and keeps it, as a session, while the asker reads the partition's
//!   share of it page by page over the read subject ([`super::reads`]). At most
//!   [`MAX_COPIES`] sessions at once; one left idle for [`COPY_IDLE`] is dropped.
//! * **Taking** ([`Taker::take`]): before a store reads a partition it owns from the log, it asks
//!   the partition's other owners for a copy when it holds nothing of it, holds part of an
//!   earlier copy, or fell behind what the log still holds. The copy lands behind a marker
//!   ([`Store::begin_copy`]); its position and the marker's removal are one synced write,
//!   and the pipeline then takes on the copy's position and watermarks, so reading the log
//!   resumes exactly after what the copy holds. With no owner to copy from it reads the log
//!   from its start (what the log dropped is then missing from this replica, and counted).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::Message;

use super::assign::Assignment;
use super::reads::{partition_of, subject, CopiedMsg, CopyOp, Op, ReadReply, ReadRequest};
use crate::clock::{Clock, SystemClock};
use crate::pipeline::Pipeline;
use crate::series::SeriesLabels;
use crate::store::{Checkpoint, Copied, CopyCursor, LogPosition, Share, Store};
use crate::telemetry::{Metrics, Outcome};

/// Copies a store gives at once.
pub const MAX_COPIES: usize = 2;
/// How long a copy's session is kept without a page asked.
pub const COPY_IDLE: Duration = Duration::from_secs(30);
/// Keys one page looks at, at most (a page of a partition with few keys in a large store
/// still answers in time).
const PAGE_SCAN: usize = 500_000;
/// How long one page may take to be answered (the first makes the checkpoint).
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pipeline may take to write what it applied of a partition before a copy.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

struct Session {
    checkpoint: Checkpoint,
    partition: u32,
    members: Vec<u64>,
    position: LogPosition,
    used: Instant,
}

/// The copies this store gives other stores.
pub struct Copies {
    store: Store,
    partitions: u32,
    dir: PathBuf,
    sessions: Mutex<HashMap<u64, Arc<Mutex<Session>>>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copies").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn refused(error: String) -> ReadReply {
    ReadReply { error, ..ReadReply::default() }
}

impl Copies {
    /// Copies of `store`'s partitions, checkpointed under its directory's `copies/` (what an
    /// earlier run left there is removed).
    pub fn new(store: Store, partitions: u32) -> Copies {
        let dir = store.path().join("copies");
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the checkpoints of an earlier run");
            }
        }
        // Ids of an earlier run's sessions are not mistaken for this run's.
        let seed = SystemClock.now_nanos() as u64;
        Copies { store, partitions, dir, sessions: Mutex::default(), next: AtomicU64::new(seed | 1) }
    }

    /// Answers a page of a copy of `partition` (blocking: it reads the checkpoint). A new copy
    /// is refused unless this store holds the partition caught up (`ready`).
    pub fn page(
        &self,
        partition: Option<u32>,
        op: CopyOp,
        ready: &dyn Fn(u32) -> bool,
        budget: usize,
    ) -> ReadReply {
        let Some(partition) = partition.filter(|&p| p < self.partitions) else {
            return refused(format!("a copy names one partition below {}", self.partitions));
        };
        let session = if op.session == 0 {
            if !ready(partition) {
                return ReadReply { not_caught_up: vec![partition], ..ReadReply::default() };
            }
            // Nothing of the partition written (a cluster's first start): no checkpoint to make.
            match self.store.log_positions() {
                Ok(at) if at.iter().all(|&(p, at)| p != partition || at.seq == 0) => {
                    return ReadReply::default()
                }
                Ok(_) => {}
                Err(e) => return refused(format!("reading the store's positions: {e}")),
            }
            match self.open(partition) {
                Ok(Some(s)) => s,
                Ok(None) => return ReadReply { busy: true, ..ReadReply::default() },
                Err(e) => return refused(e),
            }
        } else {
            let found = self.sessions.lock().get(&op.session).cloned();
            match found {
                Some(s) => (op.session, s),
                None => {
                    return refused(format!("no copy {} (ended, or idle over {COPY_IDLE:?})", op.session))
                }
            }
        };
        let (id, session) = session;
        if op.end {
            self.sessions.lock().remove(&id);
            return ReadReply::default();
        }
        let mut s = session.lock();
        if s.partition != partition {
            return refused(format!("copy {id} is of partition {}, not {partition}", s.partition));
        }
        s.used = Instant::now();
        let from = CopyCursor { family: op.family, after: op.resume.then_some(op.after) };
        let clients = super::clients_of(partition);
        let page = s.checkpoint.page(&s.members, &clients, &from, budget.saturating_sub(4096), PAGE_SCAN);
        let mut reply = ReadReply {
            session: id,
            position_seq: s.position.seq,
            position_records: s.position.records,
            ..ReadReply::default()
        };
        match page {
            Err(e) => {
                drop(s);
                self.sessions.lock().remove(&id);
                return refused(format!("reading copy {id}: {e}"));
            }
            Ok((records, next)) => {
                reply.copied = records
                    .into_iter()
                    .map(|c| CopiedMsg { family: c.family, key: c.key, value: c.value })
                    .collect();
                match next {
                    Some(c) => {
                        reply.truncated = true;
                        reply.resume_family = c.family;
                        reply.resume_after = c.after.unwrap_or_default();
                    }
                    None => {
                        drop(s);
                        self.sessions.lock().remove(&id);
                    }
                }
            }
        }
        reply
    }

    /// Starts a copy of `partition`: a checkpoint of the store and the partition's series in
    /// it. `None`: [`MAX_COPIES`] are being given.
    #[allow(clippy::type_complexity)]
    fn open(&self, partition: u32) -> Result<Option<(u64, Arc<Mutex<Session>>)>, String> {
        {
            let mut sessions = self.sessions.lock();
            sessions.retain(|_, s| s.try_lock().is_none_or(|s| s.used.elapsed() < COPY_IDLE));
            if sessions.len() >= MAX_COPIES {
                return Ok(None);
            }
        }
        let id = self.next.fetch_add(2, Ordering::Relaxed);
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let checkpoint = self
            .store
            .checkpoint(&self.dir.join(id.to_string()))
            .map_err(|e| format!("cannot make a checkpoint: {e}"))?;
        let in_partition = share_fn(self.partitions, partition);
        let share = Share { series: &in_partition, clients: super::clients_of(partition) };
        let members = checkpoint.members(&share).map_err(|e| format!("reading the checkpoint: {e}"))?;
        let position = checkpoint.position(partition).map_err(|e| format!("reading the checkpoint: {e}"))?;
        tracing::info!(
            partition,
            copy = id,
            series = members.len(),
            ?position,
            "giving a copy of a partition"
        );
        let session =
            Arc::new(Mutex::new(Session { checkpoint, partition, members, position, used: Instant::now() }));
        let mut sessions = self.sessions.lock();
        if sessions.len() >= MAX_COPIES {
            return Ok(None);
        }
        sessions.insert(id, session.clone());
        Ok(Some((id, session)))
    }
}

/// What a store needs to take copies of partitions from other owners.
#[derive(Debug, Clone)]
pub struct Taker {
    /// The NATS client (core request and reply).
    pub client: async_nats::Client,
    /// `cluster.name`.
    pub name: String,
    /// `cluster.partitions`.
    pub partitions: u32,
    /// This node's store.
    pub store: Store,
    /// Self-metrics.
    pub metrics: Arc<Metrics>,
    /// Held while a copy is taken: one at a time, so a store taking on many partitions
    /// loads its peers (and itself) with one checkpoint scan at a time.
    pub one_at_a_time: Arc<tokio::sync::Semaphore>,
}

/// Why an owner gave no copy.
enum Refusal {
    /// It gives as many as it gives at once.
    Busy,
    /// The copy failed (the owner is down, a page did not land).
    Failed(String),
}

impl From<String> for Refusal {
    fn from(e: String) -> Refusal {
        Refusal::Failed(e)
    }
}

/// What [`Taker::take`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// The store holds the partition up to where the log still has it: it reads on.
    NotNeeded,
    /// A copy landed, from `from`, holding the log up to `position`.
    Copied {
        /// The owner it came from.
        from: String,
        /// Where reading the log resumes after.
        position: LogPosition,
        /// Records landed.
        records: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// No owner gave a copy: the partition is read from the log's start.
    FromLog,
}

fn share_fn(partitions: u32, partition: u32) -> impl Fn(&SeriesLabels) -> bool + Sync {
    move |l: &SeriesLabels| partition_of(l, partitions) == partition
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("a store task failed: {e}"))
}

impl Taker {
    /// Before `pipeline` reads `partition` from the log (whose first message is `first_seq`):
    /// takes a copy from one of the partition's other owners when this store holds nothing
    /// of it, part of an earlier copy, or less than the log's first message needs.
    pub async fn take(
        &self,
        pipeline: &Pipeline,
        partition: u32,
        first_seq: u64,
        assignment: &Assignment,
    ) -> Result<Taken, String> {
        let store = self.store.clone();
        let landing =
            blocking(move || store.copying()).await?.map_err(|e| e.to_string())?.contains(&partition);
        let from = pipeline.log_position(partition);
        let behind = from.seq > 0 && from.seq.saturating_add(1) < first_seq;
        if !(landing || from.seq == 0 || behind) {
            return Ok(Taken::NotNeeded);
        }
        let _one = self.one_at_a_time.acquire().await.map_err(|e| e.to_string())?;
        let me = assignment.me();
        let peers: Vec<String> = assignment
            .owners(partition)
            .into_iter()
            .chain(assignment.leaving(partition))
            .filter(|o| *o != me)
            .map(str::to_owned)
            .collect();
        let mut busy = Vec::new();
        for peer in peers {
            match self.copy_from(pipeline, partition, &peer, from, landing).await {
                Ok(Some(taken)) => {
                    self.metrics.partition_copies.get_or_create(&Outcome { result: "copied" }).inc();
                    return Ok(taken);
                }
                Ok(None) => tracing::debug!(partition, peer, "no newer copy of the partition there"),
                Err(Refusal::Busy) => busy.push(peer),
                Err(Refusal::Failed(e)) => {
                    tracing::warn!(partition, peer, error = %e, "a copy of the partition failed; trying the next owner")
                }
            }
        }
        // An owner giving other copies now gives this one later: ask again rather than read a
        // log that may no longer hold everything.
        if !busy.is_empty() {
            return Err(format!("{busy:?} give as many copies as they give at once; asking again"));
        }
        // Nothing landed: what part of a copy did is wiped, and the log is read from its start.
        let store = self.store.clone();
        let landed =
            blocking(move || store.copying()).await?.map_err(|e| e.to_string())?.contains(&partition);
        if landed {
            let wiped = self.wipe(pipeline, partition, Store::abandon_copy).await?;
            self.metrics.partition_copies.get_or_create(&Outcome { result: "abandoned" }).inc();
            tracing::warn!(
                partition,
                wiped,
                "no owner gave a copy; what part of one landed is wiped and the log is read from its start"
            );
        }
        if behind || (from.seq == 0 && first_seq > 1) {
            self.metrics.partition_copies.get_or_create(&Outcome { result: "lost" }).inc();
            tracing::error!(
                partition,
                applied = from.seq,
                first_seq,
                "no owner gave a copy and the log no longer holds what this store lacks: this replica misses the messages before {first_seq}"
            );
        }
        Ok(Taken::FromLog)
    }

    /// Lets `pipeline` write what it applied of `partition` and forget it, then wipes it from
    /// the store with `wipe` ([`Store::begin_copy`] or [`Store::abandon_copy`]); returns how
    /// many series went.
    async fn wipe(
        &self,
        pipeline: &Pipeline,
        partition: u32,
        wipe: fn(&Store, u32, &Share<'_>) -> Result<u64, crate::store::StoreError>,
    ) -> Result<u64, String> {
        pipeline.release(partition, &super::clients_of(partition), RELEASE_TIMEOUT).await?;
        let (store, partitions) = (self.store.clone(), self.partitions);
        blocking(move || {
            let is = share_fn(partitions, partition);
            wipe(&store, partition, &Share { series: &is, clients: super::clients_of(partition) })
        })
        .await?
        .map_err(|e| e.to_string())
    }

    /// The ids of the series of `partition` this store holds.
    pub async fn series_of(&self, partition: u32) -> Result<HashSet<u64>, String> {
        let (store, partitions) = (self.store.clone(), self.partitions);
        blocking(move || {
            let is = share_fn(partitions, partition);
            store.series_of(&Share { series: &is, clients: super::clients_of(partition) })
        })
        .await?
        .map_err(|e| e.to_string())
    }

    async fn ask(&self, peer: &str, partition: u32, op: CopyOp) -> Result<ReadReply, String> {
        let request = ReadRequest { partitions: vec![partition], op: Some(Op::Copy(op)) };
        let r =
            async_nats::Request::new().payload(request.encode_to_vec().into()).timeout(Some(PAGE_TIMEOUT));
        let reply = self
            .client
            .send_request(subject(&self.name, peer), r)
            .await
            .map_err(|e| format!("asking {peer}: {e}"))?;
        let reply = ReadReply::decode(reply.payload)
            .map_err(|e| format!("{peer}: a reply that does not decode: {e}"))?;
        if reply.error.is_empty() {
            Ok(reply)
        } else {
            Err(format!("{peer}: {}", reply.error))
        }
    }

    /// Lands a copy of `partition` from `peer`; `None` when it has none newer than `from`.
    async fn copy_from(
        &self,
        pipeline: &Pipeline,
        partition: u32,
        peer: &str,
        from: LogPosition,
        landing: bool,
    ) -> Result<Option<Taken>, Refusal> {
        let started = Instant::now();
        let mut reply = self.ask(peer, partition, CopyOp::default()).await?;
        if reply.busy {
            return Err(Refusal::Busy);
        }
        if reply.not_caught_up.contains(&partition) {
            return Ok(None);
        }
        let session = reply.session;
        let position = LogPosition { seq: reply.position_seq, records: reply.position_records };
        if position.seq == 0 || (!landing && position <= from) {
            if session != 0 {
                let end = CopyOp { session, end: true, ..CopyOp::default() };
                let _ = self.ask(peer, partition, end).await;
            }
            return Ok(None);
        }
        let clients = super::clients_of(partition);
        let wiped = self.wipe(pipeline, partition, Store::begin_copy).await?;
        tracing::info!(partition, peer, ?position, wiped, "taking a copy of a partition");
        let mut members = HashSet::new();
        let (mut records, mut bytes) = (0u64, 0u64);
        loop {
            let copied: Vec<Copied> = std::mem::take(&mut reply.copied)
                .into_iter()
                .map(|c| Copied { family: c.family, key: c.key, value: c.value })
                .collect();
            records += copied.len() as u64;
            let size: u64 = copied.iter().map(|c| (c.key.len() + c.value.len()) as u64).sum();
            bytes += size;
            let (store, partitions, clients) = (self.store.clone(), self.partitions, clients.clone());
            members = blocking(move || {
                let is = share_fn(partitions, partition);
                store.land(&copied, &is, &mut members, &clients).map(|()| members)
            })
            .await?
            .map_err(|e| format!("landing a page from {peer}: {e}"))?;
            self.metrics.partition_copy_bytes.inc_by(size);
            if !reply.truncated {
                break;
            }
            let next = CopyOp {
                session,
                family: reply.resume_family,
                resume: true,
                after: std::mem::take(&mut reply.resume_after),
                end: false,
            };
            reply = self.ask(peer, partition, next).await?;
        }
        let store = self.store.clone();
        let marks = blocking(move || store.finish_copy(partition, position, &clients))
            .await?
            .map_err(|e| e.to_string())?;
        pipeline.adopt(partition, position, marks);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            partition,
            peer,
            ?position,
            series = members.len(),
            records,
            bytes,
            seconds,
            "took a copy of a partition; reading its log from there"
        );
        Ok(Some(Taken::Copied { from: peer.to_owned(), position, records, bytes }))
    }
}

#[cfg(test)]
mod tests;
