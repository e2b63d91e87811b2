//! Series identity: the label set of a series, its stable 64-bit id, and the explicit
//! hash partitioning that assigns series to shards (and, scaled out, to nodes); and the rules
//! a span's time and duration must keep to be counted in one ([`SpanLimits`]), below both
//! ingest and the shards.
//!
//! A series is `{service, operation, status}`. Its id is the xxh3 hash of the canonical
//! encoding of its labels, so any node computes the same id without coordination. Routing
//! uses the hash of the *group* key (`service`, `operation`) so that a group's `ok` and `error`
//! series live on the same shard and a batch group is handled by one shard.

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

/// The labels of one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesLabels {
    /// `service`.
    pub service: String,
    /// `operation`.
    pub operation: String,
    /// `status`.
    pub status: Status,
}

impl SeriesLabels {
    /// The series id of these labels.
    pub fn id(&self) -> u64 {
        series_id(&self.service, &self.operation, self.status)
    }

    /// Encodes the labels for the series index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.service.len() + self.operation.len() + 8);
        encode_labels(&mut out, &self.service, &self.operation, self.status);
        out
    }

    /// Decodes labels written by [`SeriesLabels::encode`].
    pub fn decode(bytes: &[u8]) -> Option<SeriesLabels> {
        match SeriesLabels::decode_prefix(bytes)? {
            (labels, []) => Some(labels),
            _ => None,
        }
    }

    /// Decodes labels written by [`SeriesLabels::encode`] at the start of `bytes`, and
    /// returns the bytes after them.
    pub fn decode_prefix(bytes: &[u8]) -> Option<(SeriesLabels, &[u8])> {
        let (service, rest) = take_str(bytes)?;
        let (operation, rest) = take_str(rest)?;
        let (status, rest) = take_str(rest)?;
        let labels = SeriesLabels {
            service: service.to_owned(),
            operation: operation.to_owned(),
            status: Status::parse(status)?,
        };
        Some((labels, rest))
    }

    /// Whether every one of `matchers` matches these labels (a label the series does not have
    /// reads as empty, as in Prometheus).
    pub fn matches(&self, matchers: &[&promql_parser::label::Matcher]) -> bool {
        matchers.iter().all(|m| m.is_match(self.get(&m.name).unwrap_or("")))
    }

    /// The value of label `name`, if the series has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        match name {
            "service" => Some(&self.service),
            "operation" => Some(&self.operation),
            "status" => Some(self.status.as_str()),
            _ => None,
        }
    }
}

fn encode_labels(out: &mut Vec<u8>, service: &str, operation: &str, status: Status) {
    for s in [service, operation, status.as_str()] {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
}

fn take_str(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let s = bytes.get(4..4 + len)?;
    Some((std::str::from_utf8(s).ok()?, &bytes[4 + len..]))
}

/// The stable id of series `{service, operation, status}`.
pub fn series_id(service: &str, operation: &str, status: Status) -> u64 {
    let mut buf = [0u8; 256];
    let needed = service.len() + operation.len() + status.as_str().len() + 12;
    if needed <= buf.len() {
        let mut at = 0;
        for s in [service, operation, status.as_str()] {
            buf[at..at + 4].copy_from_slice(&(s.len() as u32).to_be_bytes());
            buf[at + 4..at + 4 + s.len()].copy_from_slice(s.as_bytes());
            at += 4 + s.len();
        }
        xxh3_64(&buf[..at])
    } else {
        let mut v = Vec::with_capacity(needed);
        encode_labels(&mut v, service, operation, status);
        xxh3_64(&v)
    }
}

/// The routing hash of a group key `{service, operation}`.
pub fn group_hash(service: &str, operation: &str) -> u64 {
    // Same canonical form as a series id, with the status left out.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(service.len() as u32).to_be_bytes());
    h.update(service.as_bytes());
    h.update(&(operation.len() as u32).to_be_bytes());
    h.update(operation.as_bytes());
    h.digest()
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
        let a = series_id("checkout", "POST /pay", Status::Ok);
        assert_eq!(a, series_id("checkout", "POST /pay", Status::Ok));
        assert_ne!(a, series_id("checkout", "POST /pay", Status::Error));
        // Length prefixes keep label boundaries: "ab"+"c" differs from "a"+"bc".
        assert_ne!(series_id("ab", "c", Status::Ok), series_id("a", "bc", Status::Ok));
        let long = "x".repeat(300);
        let labels = SeriesLabels { service: long.clone(), operation: "op".into(), status: Status::Ok };
        assert_eq!(labels.id(), series_id(&long, "op", Status::Ok));
    }

    #[test]
    fn labels_round_trip() {
        let l = SeriesLabels { service: "api".into(), operation: "GET /".into(), status: Status::Error };
        assert_eq!(SeriesLabels::decode(&l.encode()), Some(l.clone()));
        assert_eq!(SeriesLabels::decode(&l.encode()[..5]), None);
        assert_eq!(l.get("status"), Some("error"));
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
