//! Series identity: the label set of a series, its stable 64-bit id, and the explicit
//! hash partitioning that assigns series to shards (and, scaled out, to nodes); and the rules
//! a span's time and duration must keep to be counted in one ([`SpanLimits`]), below both
//! ingest and the shards.
//!
//! A series is `{service, operation, status, span_kind, peer}`, of one of two measures: the
//! spans' durations (`span_duration_seconds`) or their self times (`span_self_seconds`: the
//! time a span spent in its own code, not waiting on the calls it made). Its id is the xxh3 hash of the
//! canonical encoding of its labels, so any node computes the same id without coordination; a
//! series of unspecified kind and no peer (all a v1 client sends) is encoded, and hashed,
//! without them, so series written before kinds and peers existed keep their ids. Routing uses
//! the hash of the *group* key (`service`, `operation`) so that a group's `ok` and `error`
//! series, of every kind and peer, live on the same shard and a batch group is handled by one
//! shard.
//!
//! `peer` is the other end of a call: the callee of a service's CLIENT and PRODUCER spans, the
//! caller of its SERVER and CONSUMER spans when known. An edge of the service graph is a pair
//! of such series ([`Edge`]), so its counts and latencies are as exact as any series'.
//!
//! A selector that names no `span_kind` reads a service's own work only — its server,
//! consumer, internal and unspecified spans — never the calls it makes (`SPAN_KIND_CLIENT`,
//! `SPAN_KIND_PRODUCER`), so a slow dependency does not mix into the caller's own latency.

use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

/// Why a span is refused on its own (the batch that carries it is still accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpanReject {
    /// Started before `now - allowed_lateness`.
    TooOld,
    /// Started after `now + max_future_skew`.
    TooFarInFuture,
    /// Duration below zero.
    NegativeDuration,
    /// Duration above `max_span_duration`.
    AbsurdDuration,
}

impl SpanReject {
    /// Every reason, in the order of [`SpanReject::index`].
    pub const ALL: [SpanReject; 4] = [
        SpanReject::TooOld,
        SpanReject::TooFarInFuture,
        SpanReject::NegativeDuration,
        SpanReject::AbsurdDuration,
    ];

    /// The reason as a label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanReject::TooOld => "too_old",
            SpanReject::TooFarInFuture => "too_far_in_future",
            SpanReject::NegativeDuration => "negative_duration",
            SpanReject::AbsurdDuration => "absurd_duration",
        }
    }

    /// A dense index for per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The limits a span's time and duration are checked against.
#[derive(Debug, Clone, Copy)]
pub struct SpanLimits {
    /// Allowed lateness in nanoseconds.
    pub lateness: i64,
    /// Allowed future skew in nanoseconds.
    pub skew: i64,
    /// Longest accepted duration in nanoseconds.
    pub max_duration: i64,
}

impl SpanLimits {
    /// The limits `ingest.allowed_lateness`, `ingest.max_future_skew` and
    /// `ingest.max_span_duration` set.
    pub fn new(lateness: Duration, skew: Duration, max_duration: Duration) -> SpanLimits {
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        SpanLimits { lateness: nanos(lateness), skew: nanos(skew), max_duration: nanos(max_duration) }
    }

    /// Checks a span against the limits at `now` and returns the start of its 10-second window
    /// in seconds.
    #[inline]
    pub fn classify(&self, start: i64, duration: i64, now: i64) -> Result<i64, SpanReject> {
        if duration < 0 {
            return Err(SpanReject::NegativeDuration);
        }
        if duration > self.max_duration {
            return Err(SpanReject::AbsurdDuration);
        }
        self.window_of(start, now)
    }

    /// Checks a start time against the limits at `now` and returns the start of its 10-second
    /// window in seconds.
    #[inline]
    pub fn window_of(&self, start: i64, now: i64) -> Result<i64, SpanReject> {
        if start < now.saturating_sub(self.lateness) {
            return Err(SpanReject::TooOld);
        }
        if start > now.saturating_add(self.skew) {
            return Err(SpanReject::TooFarInFuture);
        }
        let seconds = start.div_euclid(1_000_000_000);
        Ok(seconds - seconds.rem_euclid(tailscope_proto::BASE_WINDOW_SECONDS))
    }
}

/// The `status` label of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// `status="ok"`.
    Ok,
    /// `status="error"`.
    Error,
}

impl Status {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }

    /// The status of a span on the wire (unset counts as ok).
    pub fn from_wire(status: i32) -> Status {
        if status == tailscope_proto::v1::SpanStatus::Error as i32 {
            Status::Error
        } else {
            Status::Ok
        }
    }

    /// Parses a label value.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "ok" => Some(Status::Ok),
            "error" => Some(Status::Error),
            _ => None,
        }
    }
}

/// The `span_kind` label of a series: OpenTelemetry's span kinds, named as Tempo's
/// metrics-generator and the collector's spanmetrics connector name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Kind {
    /// `SPAN_KIND_UNSPECIFIED`: what a v1 client sends.
    #[default]
    Unspecified = 0,
    /// `SPAN_KIND_INTERNAL`.
    Internal = 1,
    /// `SPAN_KIND_SERVER`.
    Server = 2,
    /// `SPAN_KIND_CLIENT`: a call the service makes.
    Client = 3,
    /// `SPAN_KIND_PRODUCER`: a message the service sends.
    Producer = 4,
    /// `SPAN_KIND_CONSUMER`.
    Consumer = 5,
}

impl Kind {
    /// Every kind, in the order of [`Kind::index`].
    pub const ALL: [Kind; 6] =
        [Kind::Unspecified, Kind::Internal, Kind::Server, Kind::Client, Kind::Producer, Kind::Consumer];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unspecified => "SPAN_KIND_UNSPECIFIED",
            Kind::Internal => "SPAN_KIND_INTERNAL",
            Kind::Server => "SPAN_KIND_SERVER",
            Kind::Client => "SPAN_KIND_CLIENT",
            Kind::Producer => "SPAN_KIND_PRODUCER",
            Kind::Consumer => "SPAN_KIND_CONSUMER",
        }
    }

    /// The kind of a wire value (OTLP's numbers; an unknown one reads as unspecified).
    pub fn from_wire(kind: i32) -> Kind {
        usize::try_from(kind).ok().and_then(|i| Kind::ALL.get(i).copied()).unwrap_or_default()
    }

    /// Parses a label value.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind's name in the encoding of a self-time series (never a label value).
    pub fn self_token(self) -> &'static str {
        match self {
            Kind::Unspecified => "self:SPAN_KIND_UNSPECIFIED",
            Kind::Internal => "self:SPAN_KIND_INTERNAL",
            Kind::Server => "self:SPAN_KIND_SERVER",
            Kind::Client => "self:SPAN_KIND_CLIENT",
            Kind::Producer => "self:SPAN_KIND_PRODUCER",
            Kind::Consumer => "self:SPAN_KIND_CONSUMER",
        }
    }

    /// Parses a kind as encoded in a series: a label value, or a self token.
    pub fn parse_token(s: &str) -> Option<(Kind, Measure)> {
        match s.strip_prefix("self:") {
            Some(name) => Some((Kind::parse(name)?, Measure::SelfTime)),
            None => Some((Kind::parse(s)?, Measure::Duration)),
        }
    }

    /// A dense index for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether spans of this kind time what the service asks of others (client calls, sent
    /// messages) rather than its own work: read only by selectors that name `span_kind`.
    pub fn is_outgoing(self) -> bool {
        matches!(self, Kind::Client | Kind::Producer)
    }
}

/// What a series' histograms time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Measure {
    /// The spans' durations: `span_duration_seconds`.
    #[default]
    Duration,
    /// The spans' self times (duration minus the union of their calls):
    /// `span_self_seconds`. Such a series has no peer: a service's own time is the same
    /// whoever called it.
    SelfTime,
}

/// The matcher name that selects self-time series ([`Measure::SelfTime`]) when it equals
/// [`SELF_MEASURE`]: set by the query engine for `span_self_seconds` names, never a label of a
/// series. Without it, only duration series are selected.
pub const MEASURE_MATCHER: &str = "__measure__";
/// The value of [`MEASURE_MATCHER`] for self-time series.
pub const SELF_MEASURE: &str = "self";

/// The labels of one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesLabels {
    /// `service`.
    pub service: String,
    /// `operation`.
    pub operation: String,
    /// `status`.
    pub status: Status,
    /// `span_kind`.
    pub kind: Kind,
    /// `peer`: the other end of the spans' calls; empty for none (the label is then absent).
    pub peer: String,
    /// What the series times.
    pub measure: Measure,
}

/// The longest label value accepted (`service`, `operation`, `peer`), in bytes. A
/// series-family entry's labels are followed by a `u32` hour, whose value (past 1970's 256th
/// hour) never reads as the length of a peer.
pub const MAX_LABEL_BYTES: usize = 256;

impl SeriesLabels {
    /// The label names every series has, in their canonical order (`peer`, which only some
    /// series have, follows them).
    pub const NAMES: [&'static str; 4] = ["service", "operation", "status", "span_kind"];

    /// Labels of a series of unspecified kind and no peer.
    pub fn new(service: impl Into<String>, operation: impl Into<String>, status: Status) -> SeriesLabels {
        SeriesLabels {
            service: service.into(),
            operation: operation.into(),
            status,
            kind: Kind::Unspecified,
            peer: String::new(),
            measure: Measure::Duration,
        }
    }

    /// The self-time series of a series of the service's own work: same service, operation,
    /// status and kind, no peer.
    pub fn self_time(&self) -> SeriesLabels {
        SeriesLabels { peer: String::new(), measure: Measure::SelfTime, ..self.clone() }
    }

    /// The series id of these labels.
    pub fn id(&self) -> u64 {
        hash_labels(self.strings())
    }

    /// The strings the labels are encoded as ([`label_strings`]).
    fn strings(&self) -> ([&str; 5], usize) {
        label_strings(&self.service, &self.operation, self.status, self.kind, &self.peer, self.measure)
    }

    /// Encodes the labels for the series index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.service.len() + self.operation.len() + self.peer.len() + 48);
        encode_strings(&mut out, self.strings());
        out
    }

    /// Every label the series has as (name, value): those of [`SeriesLabels::NAMES`] in that
    /// order, then `peer` when it is not empty.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("service", self.service.as_str()),
            ("operation", self.operation.as_str()),
            ("status", self.status.as_str()),
            ("span_kind", self.kind.as_str()),
        ]
        .into_iter()
        .chain((!self.peer.is_empty()).then_some(("peer", self.peer.as_str())))
    }

    /// The edge of the service graph the series times, if it is one: a CLIENT or PRODUCER
    /// series with a peer (the caller's view), or a SERVER or CONSUMER series with a peer (the
    /// callee's view).
    pub fn edge(&self) -> Option<Edge<'_>> {
        if self.peer.is_empty() || self.measure != Measure::Duration {
            return None;
        }
        match self.kind {
            Kind::Client | Kind::Producer => {
                Some(Edge { client: &self.service, server: &self.peer, side: Side::Client, kind: self.kind })
            }
            Kind::Server | Kind::Consumer => {
                Some(Edge { client: &self.peer, server: &self.service, side: Side::Server, kind: self.kind })
            }
            Kind::Unspecified | Kind::Internal => None,
        }
    }

    /// Decodes labels written by [`SeriesLabels::encode`].
    pub fn decode(bytes: &[u8]) -> Option<SeriesLabels> {
        match SeriesLabels::decode_prefix(bytes)? {
            (labels, []) => Some(labels),
            _ => None,
        }
    }

    /// Decodes labels written by [`SeriesLabels::encode`] at the start of `bytes`, and
    /// returns the bytes after them. The kind is there only when it is not unspecified or a
    /// peer follows it; what follows the labels in the series family (a `u32` hour, far above
    /// any kind name's or peer's length) never reads as either.
    pub fn decode_prefix(bytes: &[u8]) -> Option<(SeriesLabels, &[u8])> {
        let (service, rest) = take_str(bytes)?;
        let (operation, rest) = take_str(rest)?;
        let (status, rest) = take_str(rest)?;
        let (kind, measure, explicit, rest) =
            match take_str(rest).and_then(|(k, after)| Some((Kind::parse_token(k)?, after))) {
                Some(((kind, measure), after)) => (kind, measure, true, after),
                None => (Kind::Unspecified, Measure::Duration, false, rest),
            };
        // A peer follows an explicit kind, and is never longer than MAX_LABEL_BYTES.
        let (peer, rest) = match take_str(rest) {
            Some((peer, after))
                if explicit
                    && measure == Measure::Duration
                    && !peer.is_empty()
                    && peer.len() <= MAX_LABEL_BYTES =>
            {
                (peer, after)
            }
            _ => ("", rest),
        };
        let labels = SeriesLabels {
            service: service.to_owned(),
            operation: operation.to_owned(),
            status: Status::parse(status)?,
            kind,
            peer: peer.to_owned(),
            measure,
        };
        Some((labels, rest))
    }

    /// Whether every one of `matchers` matches these labels (a label the series does not have
    /// reads as empty, as in Prometheus). Matchers that name no `span_kind` select a service's
    /// own work only: series of outgoing kinds ([`Kind::is_outgoing`]) are left out.
    /// Self-time series are selected only by a [`MEASURE_MATCHER`] for them, duration series
    /// only without one.
    pub fn matches(&self, matchers: &[&promql_parser::label::Matcher]) -> bool {
        let wants_self = matchers.iter().any(|m| m.name == MEASURE_MATCHER && m.value == SELF_MEASURE);
        (self.measure == Measure::SelfTime) == wants_self
            && (!self.kind.is_outgoing() || matchers.iter().any(|m| m.name == "span_kind"))
            && matchers
                .iter()
                .filter(|m| m.name != MEASURE_MATCHER)
                .all(|m| m.is_match(self.get(&m.name).unwrap_or("")))
    }

    /// The value of label `name`, if the series has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        match name {
            "service" => Some(&self.service),
            "operation" => Some(&self.operation),
            "status" => Some(self.status.as_str()),
            "span_kind" => Some(self.kind.as_str()),
            "peer" if !self.peer.is_empty() => Some(&self.peer),
            MEASURE_MATCHER if self.measure == Measure::SelfTime => Some(SELF_MEASURE),
            _ => None,
        }
    }
}

/// The strings a series' labels are encoded as, in order, and how many of them there are: the
/// kind only when it is not unspecified or a peer follows, the peer only when there is one; a
/// self-time series always with its kind's self token ([`Kind::self_token`]), never a peer.
#[inline]
fn label_strings<'a>(
    service: &'a str,
    operation: &'a str,
    status: Status,
    kind: Kind,
    peer: &'a str,
    measure: Measure,
) -> ([&'a str; 5], usize) {
    if measure == Measure::SelfTime {
        return ([service, operation, status.as_str(), kind.self_token(), ""], 4);
    }
    let n = if !peer.is_empty() {
        5
    } else if kind != Kind::Unspecified {
        4
    } else {
        3
    };
    ([service, operation, status.as_str(), kind.as_str(), peer], n)
}

fn encode_strings(out: &mut Vec<u8>, (parts, n): ([&str; 5], usize)) {
    for s in &parts[..n] {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
}

/// The xxh3 hash of the encoding of `strings`, on the stack when it fits.
fn hash_labels((parts, n): ([&str; 5], usize)) -> u64 {
    let mut buf = [0u8; 256];
    let needed: usize = parts[..n].iter().map(|s| s.len() + 4).sum();
    if needed <= buf.len() {
        let mut at = 0;
        for s in &parts[..n] {
            buf[at..at + 4].copy_from_slice(&(s.len() as u32).to_be_bytes());
            buf[at + 4..at + 4 + s.len()].copy_from_slice(s.as_bytes());
            at += 4 + s.len();
        }
        xxh3_64(&buf[..at])
    } else {
        let mut v = Vec::with_capacity(needed);
        encode_strings(&mut v, (parts, n));
        xxh3_64(&v)
    }
}

fn take_str(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let s = bytes.get(4..4 + len)?;
    Some((std::str::from_utf8(s).ok()?, &bytes[4 + len..]))
}

/// The stable id of series `{service, operation, status, span_kind, peer}`: the hash of its
/// [`SeriesLabels::encode`] form.
pub fn series_id(service: &str, operation: &str, status: Status, kind: Kind, peer: &str) -> u64 {
    hash_labels(label_strings(service, operation, status, kind, peer, Measure::Duration))
}

/// The stable id of the self-time series of `{service, operation, status, span_kind}`.
pub fn self_series_id(service: &str, operation: &str, status: Status, kind: Kind) -> u64 {
    hash_labels(label_strings(service, operation, status, kind, "", Measure::SelfTime))
}

/// Which side of a call a series times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The caller's CLIENT or PRODUCER spans: the call as the caller waited for it.
    Client,
    /// The callee's SERVER or CONSUMER spans: the call as the callee served it.
    Server,
}

/// An edge of the service graph, as one series sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Edge<'a> {
    /// The calling service.
    pub client: &'a str,
    /// The called service, or an uninstrumented system (`db:postgres`).
    pub server: &'a str,
    /// Which side's spans the series holds.
    pub side: Side,
    /// The span kind of the series.
    pub kind: Kind,
}

impl Edge<'_> {
    /// Tempo's `connection_type`: `messaging_system` for producer/consumer edges, `database`
    /// for a `db:` peer, else empty (a synchronous call between services).
    pub fn connection_type(&self) -> &'static str {
        if matches!(self.kind, Kind::Producer | Kind::Consumer) {
            "messaging_system"
        } else if self.server.starts_with("db:") {
            "database"
        } else {
            ""
        }
    }
}

/// The routing hash of a group key `{service, operation}`.
pub fn group_hash(service: &str, operation: &str) -> u64 {
    // Same canonical form as a series id, with the status left out; hashed in one pass over a
    // buffer (the streaming hasher gives the same value and took 4 % of the server's CPU at
    // 10,000 series). The value decides a group's shard and cluster partition: it must not change.
    hash_labels(([service, operation, "", "", ""], 2))
}

/// The partition (shard, or node when scaled out) of a routing hash among `n`: a multiply-shift
/// range reduction, uniform for a uniform hash and cheaper than a modulo.
#[inline]
pub fn partition(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

/// A hasher for keys that are already uniform hashes (series ids): one multiply, no SipHash.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    #[inline]
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
}

/// Builds [`IdHasher`]s.
pub type IdBuildHasher = BuildHasherDefault<IdHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let id = |s: &str, o: &str, st| series_id(s, o, st, Kind::Unspecified, "");
        let a = id("checkout", "POST /pay", Status::Ok);
        assert_eq!(a, id("checkout", "POST /pay", Status::Ok));
        assert_ne!(a, id("checkout", "POST /pay", Status::Error));
        // Length prefixes keep label boundaries: "ab"+"c" differs from "a"+"bc".
        assert_ne!(id("ab", "c", Status::Ok), id("a", "bc", Status::Ok));
        // The id of a series of unspecified kind is the one it had before kinds: the hash of
        // its three labels.
        let mut v1 = Vec::new();
        for s in ["checkout", "POST /pay", "ok"] {
            v1.extend_from_slice(&(s.len() as u32).to_be_bytes());
            v1.extend_from_slice(s.as_bytes());
        }
        assert_eq!(a, xxh3_64(&v1));
        for kind in Kind::ALL.into_iter().skip(1) {
            assert_ne!(a, series_id("checkout", "POST /pay", Status::Ok, kind, ""), "{kind:?}");
        }
        // A peer makes another series, also of unspecified kind.
        let peered = series_id("checkout", "POST /pay", Status::Ok, Kind::Unspecified, "payments");
        assert_ne!(a, peered);
        assert_ne!(peered, series_id("checkout", "POST /pay", Status::Ok, Kind::Client, "payments"));
        let long = "x".repeat(300);
        for kind in [Kind::Unspecified, Kind::Client] {
            for peer in ["", "payments", long.as_str()] {
                let labels = SeriesLabels {
                    kind,
                    peer: peer.to_owned(),
                    ..SeriesLabels::new(long.clone(), "op", Status::Ok)
                };
                assert_eq!(labels.id(), series_id(&long, "op", Status::Ok, kind, peer));
                assert_eq!(labels.id(), xxh3_64(&labels.encode()));
                let short =
                    SeriesLabels { kind, peer: peer.to_owned(), ..SeriesLabels::new("s", "op", Status::Ok) };
                assert_eq!(short.id(), xxh3_64(&short.encode()));
            }
        }
    }

    #[test]
    fn edges_are_read_off_kind_and_peer() {
        let series = |service: &str, kind, peer: &str| SeriesLabels {
            kind,
            peer: peer.to_owned(),
            ..SeriesLabels::new(service, "op", Status::Ok)
        };
        let caller = series("checkout", Kind::Client, "payments");
        let edge = caller.edge().expect("a client series with a peer is an edge");
        assert_eq!((edge.client, edge.server, edge.side), ("checkout", "payments", Side::Client));
        assert_eq!(edge.connection_type(), "");
        let callee = series("payments", Kind::Server, "checkout");
        let edge = callee.edge().expect("a server series with a peer is an edge");
        assert_eq!((edge.client, edge.server, edge.side), ("checkout", "payments", Side::Server));
        assert_eq!(
            series("checkout", Kind::Client, "db:postgres").edge().map(|e| e.connection_type()),
            Some("database")
        );
        assert_eq!(
            series("orders", Kind::Producer, "kafka").edge().map(|e| e.connection_type()),
            Some("messaging_system")
        );
        assert_eq!(series("checkout", Kind::Client, "").edge(), None);
        assert_eq!(series("checkout", Kind::Internal, "x").edge(), None);
        assert_eq!(caller.get("peer"), Some("payments"));
        assert_eq!(series("a", Kind::Client, "").get("peer"), None);
        assert_eq!(caller.pairs().last(), Some(("peer", "payments")));
        assert_eq!(series("a", Kind::Client, "").pairs().count(), 4);
    }

    #[test]
    fn labels_round_trip() {
        let longest = "p".repeat(MAX_LABEL_BYTES);
        let kinds_and_peers = Kind::ALL
            .into_iter()
            .flat_map(|k| [(k, ""), (k, "payments"), (k, "SPAN_KIND_CLIENT")])
            .chain([(Kind::Client, longest.as_str())]);
        for (kind, peer) in kinds_and_peers {
            let l = SeriesLabels {
                kind,
                peer: peer.to_owned(),
                ..SeriesLabels::new("api", "GET /", Status::Error)
            };
            assert_eq!(SeriesLabels::decode(&l.encode()), Some(l.clone()));
            assert_eq!(SeriesLabels::decode(&l.encode()[..5]), None);
            // Followed by a series-family hour, which is not a kind.
            let mut entry = l.encode();
            entry.extend_from_slice(&493_000u32.to_be_bytes());
            assert_eq!(SeriesLabels::decode_prefix(&entry), Some((l.clone(), &493_000u32.to_be_bytes()[..])));
            assert_eq!(l.get("status"), Some("error"));
            assert_eq!(l.get("span_kind"), Some(kind.as_str()));
            assert_eq!(Kind::from_wire(kind as i32), kind);
        }
        assert_eq!(Kind::from_wire(17), Kind::Unspecified);
    }

    #[test]
    fn selectors_without_span_kind_read_a_services_own_work() {
        use promql_parser::label::{MatchOp, Matcher};
        let service = Matcher::new(MatchOp::Equal, "service", "checkout");
        let any_kind =
            Matcher::new(MatchOp::Re(regex::Regex::new("^(?:.*)$").expect("re")), "span_kind", ".*");
        let client = Matcher::new(MatchOp::Equal, "span_kind", "SPAN_KIND_CLIENT");
        for kind in Kind::ALL {
            let l = SeriesLabels { kind, ..SeriesLabels::new("checkout", "pay", Status::Ok) };
            assert_eq!(l.matches(&[&service]), !matches!(kind, Kind::Client | Kind::Producer), "{kind:?}");
            assert!(l.matches(&[&service, &any_kind]), "{kind:?}");
            assert_eq!(l.matches(&[&client]), kind == Kind::Client);
        }
    }

    #[test]
    fn self_time_series_are_their_own_and_selected_only_by_name() {
        use promql_parser::label::{MatchOp, Matcher};
        let duration =
            SeriesLabels { kind: Kind::Server, ..SeriesLabels::new("checkout", "pay", Status::Ok) };
        let own = duration.self_time();
        assert_eq!(own.measure, Measure::SelfTime);
        assert_ne!(own.id(), duration.id());
        assert_eq!(own.id(), self_series_id("checkout", "pay", Status::Ok, Kind::Server));
        assert_eq!(own.id(), xxh3_64(&own.encode()));
        // A peer is dropped: a service's own time is the same whoever called it.
        let called = SeriesLabels { peer: "frontend".into(), ..duration.clone() };
        assert_eq!(called.self_time(), own);
        assert_eq!(own.edge(), None);
        // Every kind round-trips, alone and followed by a series-family hour.
        for kind in Kind::ALL {
            let l = SeriesLabels { kind, ..own.clone() };
            assert_eq!(SeriesLabels::decode(&l.encode()), Some(l.clone()));
            let mut entry = l.encode();
            entry.extend_from_slice(&493_000u32.to_be_bytes());
            assert_eq!(SeriesLabels::decode_prefix(&entry), Some((l.clone(), &493_000u32.to_be_bytes()[..])));
            assert_ne!(l.id(), SeriesLabels { kind, ..duration.clone() }.id());
        }
        // Selected only with the measure matcher, which the other series never match.
        let service = Matcher::new(MatchOp::Equal, "service", "checkout");
        let selfs = Matcher::new(MatchOp::Equal, MEASURE_MATCHER, SELF_MEASURE);
        assert!(duration.matches(&[&service]));
        assert!(!own.matches(&[&service]));
        assert!(own.matches(&[&service, &selfs]));
        assert!(!duration.matches(&[&service, &selfs]));
        assert_eq!(own.get(MEASURE_MATCHER), Some(SELF_MEASURE));
        assert_eq!(duration.get(MEASURE_MATCHER), None);
        assert_eq!(own.pairs().count(), 4, "the measure is not a label");
    }

    #[test]
    fn group_hash_is_the_length_prefixed_pair_hashed_as_it_always_was() {
        // The value places a group in a shard and a cluster partition across releases.
        let streamed = |service: &str, operation: &str| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&(service.len() as u32).to_be_bytes());
            h.update(service.as_bytes());
            h.update(&(operation.len() as u32).to_be_bytes());
            h.update(operation.as_bytes());
            h.digest()
        };
        let long = "o".repeat(300);
        for (service, operation) in [("svc", "op"), ("", ""), ("checkout", &long[..]), (&long[..], "x")] {
            assert_eq!(group_hash(service, operation), streamed(service, operation), "{service}/{operation}");
        }
    }

    #[test]
    fn partitions_spread_evenly() {
        let n = 8;
        let mut counts = vec![0usize; n];
        for i in 0..80_000 {
            counts[partition(group_hash("svc", &format!("op{i}")), n)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{c}");
        }
    }
}
