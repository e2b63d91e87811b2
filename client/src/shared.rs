//! What the recording threads and the exporter share: the span queue, the operation names,
//! the fold-over histograms and the counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_queue::ArrayQueue;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use tailscope_proto::histogram::{Histogram, Layout};
use tailscope_proto::v1::SpanKind;

/// The longest operation name the server accepts, in bytes.
pub const MAX_OPERATION_BYTES: usize = 256;
/// The operation spans are counted under once the operation limit is reached.
pub const OVERFLOW_OPERATION: &str = "__overflow__";

/// One recorded span, fixed-size so queueing it allocates nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Record {
    pub op: u32,
    pub status: i32,
    pub start: i64,
    pub duration: i64,
    pub trace_hi: u64,
    pub trace_lo: u64,
    pub span_id: u64,
    pub parent: u64,
    /// Self time in nanoseconds; 0 unknown.
    pub self_ns: i64,
}

impl Record {
    /// The 10-second window the span started in, in Unix seconds.
    pub fn window(&self) -> i64 {
        self.start.div_euclid(1_000_000_000).div_euclid(tailscope_proto::BASE_WINDOW_SECONDS)
            * tailscope_proto::BASE_WINDOW_SECONDS
    }
}

/// The most distinct peers a client names (the server's default `ingest.max_peers_per_service`);
/// beyond, new peers count as [`OVERFLOW_OPERATION`].
pub const MAX_PEERS: usize = 64;

/// Operation names, each with its span kind and peer, as small integers. Lookups of known
/// names take a read lock and allocate nothing; beyond `limit` names, new ones count as
/// [`OVERFLOW_OPERATION`] (of unspecified kind, without a peer).
#[derive(Debug)]
pub(crate) struct Interner {
    /// Per kind (by its wire number), name → id, for operations without a peer.
    ids: RwLock<ByKind>,
    /// Per peer, then per kind, name → id.
    peered: RwLock<FxHashMap<Box<str>, ByKind>>,
    names: RwLock<Vec<Operation>>,
    limit: usize,
}

/// What an operation id stands for.
#[derive(Debug, Clone)]
pub(crate) struct Operation {
    pub name: Arc<str>,
    pub kind: SpanKind,
    /// Empty for none.
    pub peer: Arc<str>,
}

/// Per span kind (by its wire number), operation name → id.
type ByKind = [FxHashMap<Box<str>, u32>; KINDS];

/// How many span kinds there are.
const KINDS: usize = 6;

fn kind_index(kind: SpanKind) -> usize {
    usize::try_from(kind as i32).unwrap_or(0).min(KINDS - 1)
}

impl Interner {
    pub fn new(limit: usize) -> Interner {
        let names = vec![Operation {
            name: Arc::from(OVERFLOW_OPERATION),
            kind: SpanKind::Unspecified,
            peer: Arc::from(""),
        }];
        let mut ids: ByKind = Default::default();
        ids[0].insert(Box::from(OVERFLOW_OPERATION), 0);
        Interner {
            ids: RwLock::new(ids),
            peered: RwLock::new(FxHashMap::default()),
            names: RwLock::new(names),
            limit: limit.max(1),
        }
    }

    /// The id of `name` as a span of unspecified kind.
    #[inline]
    pub fn id(&self, name: &str) -> u32 {
        self.id_of(name, SpanKind::Unspecified)
    }

    /// The id of `name` as a span of `kind`.
    #[inline]
    pub fn id_of(&self, name: &str, kind: SpanKind) -> u32 {
        if let Some(&id) = self.ids.read()[kind_index(kind)].get(name) {
            return id;
        }
        self.insert(name, kind)
    }

    /// The id of `name` as a span of `kind` whose other end is `peer` (none when empty).
    #[inline]
    pub fn id_with_peer(&self, name: &str, kind: SpanKind, peer: &str) -> u32 {
        if peer.is_empty() {
            return self.id_of(name, kind);
        }
        {
            let peered = self.peered.read();
            // Past the cap an unknown peer reads as the overflow peer, without the write lock:
            // callers a request names cannot make every request take it.
            let by_kind = match peered.get(peer) {
                None if peered.len() >= MAX_PEERS => peered.get(OVERFLOW_OPERATION),
                found => found,
            };
            if let Some(&id) = by_kind.and_then(|by_kind| by_kind[kind_index(kind)].get(name)) {
                return id;
            }
        }
        self.insert_peered(name, kind, peer)
    }

    /// The ids a name already known has, of any kind and peer, without adding it.
    pub fn lookup(&self, name: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self.ids.read().iter().filter_map(|ids| ids.get(name).copied()).collect();
        for by_kind in self.peered.read().values() {
            out.extend(by_kind.iter().filter_map(|ids| ids.get(name).copied()));
        }
        out
    }

    #[cold]
    fn insert(&self, name: &str, kind: SpanKind) -> u32 {
        let name = sanitize(name);
        let mut ids = self.ids.write();
        let ids = &mut ids[kind_index(kind)];
        if let Some(&id) = ids.get(name) {
            return id;
        }
        let Some(id) = self.push(name, kind, "") else { return 0 };
        ids.insert(Box::from(name), id);
        id
    }

    #[cold]
    fn insert_peered(&self, name: &str, kind: SpanKind, peer: &str) -> u32 {
        let (name, mut peer) = (sanitize(name), sanitize(peer));
        let mut peered = self.peered.write();
        // Peers can come from the requests a service serves (the caller its `baggage` names):
        // past the cap, new ones share one peer, as the server's own cap does.
        if peered.len() >= MAX_PEERS && !peered.contains_key(peer) {
            peer = OVERFLOW_OPERATION;
        }
        let ids = &mut peered.entry(Box::from(peer)).or_default()[kind_index(kind)];
        if let Some(&id) = ids.get(name) {
            return id;
        }
        let Some(id) = self.push(name, kind, peer) else { return 0 };
        ids.insert(Box::from(name), id);
        id
    }

    /// A new id for the operation, unless the limit is reached.
    fn push(&self, name: &str, kind: SpanKind, peer: &str) -> Option<u32> {
        let mut names = self.names.write();
        if names.len() > self.limit {
            return None;
        }
        let id = names.len() as u32;
        names.push(Operation { name: Arc::from(name), kind, peer: Arc::from(peer) });
        Some(id)
    }

    /// What operation id `id` stands for (an unknown id reads as the overflow operation).
    pub fn operation(&self, id: u32) -> Operation {
        let names = self.names.read();
        names.get(id as usize).unwrap_or(&names[0]).clone()
    }
}

/// A name the server accepts: not empty, at most [`MAX_OPERATION_BYTES`] (cut at a character
/// boundary).
fn sanitize(name: &str) -> &str {
    if name.is_empty() {
        return "unnamed";
    }
    let mut end = name.len().min(MAX_OPERATION_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// What the folder keys its histograms by: operation id, status and window start.
pub(crate) type FoldKey = (u32, i32, i64);
/// The durations folded under a key, and the self times of those spans that had one.
pub(crate) type Folded = (Histogram, Option<Histogram>);

/// Spans counted but not sent in full, as histograms per (operation, status, window).
#[derive(Debug)]
pub(crate) struct Folder {
    /// Per (operation, status, window): the durations, and the self times of the spans that
    /// had one.
    entries: HashMap<FoldKey, Folded>,
    limit: usize,
    spans: u64,
}

impl Folder {
    pub fn new(limit: usize) -> Folder {
        Folder { entries: HashMap::new(), limit, spans: 0 }
    }

    /// Counts `r`; false (nothing counted) when it needs a new histogram and the limit is
    /// reached.
    pub fn add(&mut self, r: &Record) -> bool {
        let key = (r.op, r.status, r.window());
        let full = self.entries.len() >= self.limit;
        let h = match self.entries.get_mut(&key) {
            Some(h) => h,
            None if full => return false,
            None => self.entries.entry(key).or_insert_with(|| (Histogram::new(Layout::default()), None)),
        };
        h.0.record(r.duration.max(0) as u64, 1);
        if r.self_ns > 0 {
            let own = r.self_ns.min(r.duration.max(1)) as u64;
            h.1.get_or_insert_with(|| Histogram::new(Layout::default())).record(own, 1);
        }
        self.spans += 1;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Spans counted since the last [`Folder::take`].
    pub fn spans(&self) -> u64 {
        self.spans
    }

    pub fn take(&mut self) -> Vec<(FoldKey, Folded)> {
        self.spans = 0;
        self.entries.drain().collect()
    }
}

/// Why spans were dropped (counted, never silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    /// The queue was full and the fold histograms were busy.
    QueueFull = 0,
    /// The fold histograms reached their limit of (operation, status, window) entries.
    FoldFull = 1,
    /// The server refused the batch as malformed.
    Rejected = 2,
    /// The client shut down before the server acknowledged them.
    Unacked = 3,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub drained: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub folded: AtomicU64,
    /// Of `folded`, those folded on the recording thread because the queue was full.
    pub folded_on_overflow: AtomicU64,
    pub dropped: [AtomicU64; 4],
    pub reconnects: AtomicU64,
    pub ack_timeouts: AtomicU64,
    pub breaker: AtomicU8,
    pub connected: std::sync::atomic::AtomicBool,
    pub unacked_bytes: AtomicU64,
    pub server_rejected: AtomicU64,
}

impl Counters {
    pub fn drop(&self, why: Drop, n: u64) {
        self.dropped[why as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// Converts `Instant`s to Unix nanoseconds without reading the wall clock per span.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Anchor {
    instant: Instant,
    unix_nanos: i64,
}

impl Anchor {
    pub fn now() -> Anchor {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Anchor { instant: Instant::now(), unix_nanos: unix.as_nanos() as i64 }
    }

    #[inline]
    pub fn unix_nanos(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.unix_nanos.saturating_add(d.as_nanos() as i64),
            None => self.unix_nanos.saturating_sub(self.instant.duration_since(at).as_nanos() as i64),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub queue: ArrayQueue<Record>,
    pub ops: Interner,
    pub fold: Mutex<Folder>,
    pub counters: Counters,
    pub anchor: Anchor,
}

impl Shared {
    /// Hands a span to the exporter without blocking: into the queue, or when it is full into
    /// the fold histograms, or when those are busy or full it is dropped and counted.
    #[inline]
    pub fn offer(&self, r: Record) {
        if let Err(r) = self.queue.push(r) {
            self.overflow(r);
        }
    }

    #[cold]
    fn overflow(&self, r: Record) {
        match self.fold.try_lock() {
            Some(mut f) => {
                if f.add(&r) {
                    self.counters.folded.fetch_add(1, Ordering::Relaxed);
                    self.counters.folded_on_overflow.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.drop(Drop::FoldFull, 1);
                }
            }
            None => self.counters.drop(Drop::QueueFull, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interner_sanitizes_and_caps_names() {
        let i = Interner::new(3);
        let a = i.id("GET /a");
        assert_eq!(i.id("GET /a"), a);
        let name = |id| i.operation(id).name;
        assert_eq!(&*name(i.id("")), "unnamed");
        let long = "é".repeat(200);
        assert_eq!(name(i.id(&long)).len(), MAX_OPERATION_BYTES);
        // The limit is reached: new names overflow, known ones keep their ids.
        assert_eq!(i.id("GET /c"), 0);
        assert_eq!(i.id_with_peer("GET /d", SpanKind::Client, "payments"), 0);
        assert_eq!(&*name(0), OVERFLOW_OPERATION);
        assert_eq!(i.id("GET /a"), a);
    }

    #[test]
    fn a_name_of_two_kinds_is_two_operations() {
        let i = Interner::new(10);
        let plain = i.id("charge");
        let client = i.id_of("charge", SpanKind::Client);
        assert_ne!(plain, client);
        assert_eq!(i.id_of("charge", SpanKind::Client), client);
        let (p, c) = (i.operation(plain), i.operation(client));
        assert_eq!((p.kind, c.kind), (SpanKind::Unspecified, SpanKind::Client));
        assert_eq!((&*p.name, &*c.name), ("charge", "charge"));
        let mut both = i.lookup("charge");
        both.sort_unstable();
        assert_eq!(both, vec![plain.min(client), plain.max(client)]);
        assert!(i.lookup("refund").is_empty());
    }

    #[test]
    fn a_name_called_on_two_peers_is_two_operations() {
        let i = Interner::new(10);
        let unnamed_peer = i.id_of("charge", SpanKind::Client);
        assert_eq!(i.id_with_peer("charge", SpanKind::Client, ""), unnamed_peer);
        let payments = i.id_with_peer("charge", SpanKind::Client, "payments");
        let stripe = i.id_with_peer("charge", SpanKind::Client, "ext:api.stripe.com");
        let served = i.id_with_peer("charge", SpanKind::Server, "payments");
        assert_eq!(i.id_with_peer("charge", SpanKind::Client, "payments"), payments);
        let mut ids = vec![unnamed_peer, payments, stripe, served];
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4);
        let op = i.operation(payments);
        assert_eq!((&*op.name, op.kind, &*op.peer), ("charge", SpanKind::Client, "payments"));
        assert_eq!(&*i.operation(unnamed_peer).peer, "");
        let mut all = i.lookup("charge");
        all.sort_unstable();
        assert_eq!(all, ids);
    }

    #[test]
    fn peers_past_the_cap_share_the_overflow_peer() {
        let i = Interner::new(1_000);
        let ids: Vec<u32> = (0..MAX_PEERS)
            .map(|n| i.id_with_peer("GET /a", SpanKind::Server, &format!("caller-{n}")))
            .collect();
        assert!(ids.iter().all(|&id| id != 0));
        let late = i.id_with_peer("GET /a", SpanKind::Server, "one-too-many");
        let op = i.operation(late);
        assert_eq!((&*op.name, &*op.peer), ("GET /a", OVERFLOW_OPERATION));
        // Every later newcomer lands on the same operation; known peers keep theirs.
        assert_eq!(i.id_with_peer("GET /a", SpanKind::Server, "and-another"), late);
        assert_eq!(i.id_with_peer("GET /a", SpanKind::Server, "caller-7"), ids[7]);
    }

    #[test]
    fn folder_counts_per_window_and_respects_its_limit() {
        let mut f = Folder::new(2);
        let r = |op, start: i64| Record { op, start, duration: 5_000_000, status: 1, ..Record::default() };
        assert!(f.add(&r(1, 1_000_000_000_000)));
        assert!(f.add(&r(1, 1_000_000_000_000 + 9_000_000_000)));
        assert!(f.add(&r(1, 1_000_000_000_000 + 10_000_000_000)));
        assert!(!f.add(&r(2, 1_000_000_000_000)));
        assert_eq!(f.spans(), 3);
        let mut taken = f.take();
        taken.sort_by_key(|(k, _)| *k);
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].0, taken[0].1 .0.count()), ((1, 1, 1_000), 2));
        assert_eq!((taken[1].0 .2, taken[1].1 .0.count()), (1_010, 1));
        // No span had a self time: no self histogram.
        assert!(taken.iter().all(|(_, (_, own))| own.is_none()));
        // Self times are folded beside the durations, each cut to its span's duration.
        assert!(f.add(&Record { self_ns: 2_000_000, ..r(1, 1_000_000_000_000) }));
        assert!(f.add(&Record { self_ns: 9_000_000, ..r(1, 1_000_000_000_000) }));
        assert!(f.add(&r(1, 1_000_000_000_000)));
        let taken = f.take();
        let (durations, own) = &taken[0].1;
        let own = own.as_ref().expect("self times were folded");
        assert_eq!((durations.count(), own.count()), (3, 2));
        assert!(own.max().is_some_and(|m| m <= 5_000_000 * 1001 / 1000), "{:?}", own.max());
        assert!(f.is_empty());
    }

    #[test]
    fn a_full_queue_folds_and_counts() {
        let shared = Shared {
            queue: ArrayQueue::new(1),
            ops: Interner::new(10),
            fold: Mutex::new(Folder::new(10)),
            counters: Counters::default(),
            anchor: Anchor::now(),
        };
        let r = Record { op: 1, start: 1_000_000_000_000, duration: 1_000, status: 1, ..Record::default() };
        shared.offer(r);
        shared.offer(r);
        assert_eq!(shared.queue.len(), 1);
        assert_eq!(shared.counters.folded.load(Ordering::Relaxed), 1);
        let guard = shared.fold.lock();
        shared.offer(r);
        drop(guard);
        assert_eq!(shared.counters.dropped[Drop::QueueFull as usize].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn anchor_converts_instants_both_ways() {
        let a = Anchor::now();
        let later = a.instant + Duration::from_millis(1500);
        assert_eq!(a.unix_nanos(later) - a.unix_nanos, 1_500_000_000);
        if let Some(earlier) = a.instant.checked_sub(Duration::from_millis(20)) {
            assert_eq!(a.unix_nanos - a.unix_nanos(earlier), 20_000_000);
        }
    }
}
