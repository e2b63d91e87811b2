//! Client/server span pairing for OpenTelemetry spans, as Tempo's service-graph processor
//! pairs them: a CLIENT (or PRODUCER) span of service A with span id X and a SERVER (or
//! CONSUMER) span of service B whose parent is X, in the same trace, are the two ends of one
//! call A→B. An OTLP SERVER span never names its caller, and a CLIENT span may name no callee
//! (no `peer.service`, `server.address`, … attribute), so pairing is how they get one.
//!
//! The two ends arrive in exports of different services, in either order. tailscope counts
//! every span once, when its export is acknowledged — it holds no span back waiting for its
//! other end (that would delay the acknowledgement, which makes SDKs drop spans, or count it
//! after acknowledging it, which a crash would lose). So the end that arrives **second** is
//! labelled: each end is remembered for [`WAIT`] (at most [`CAPACITY`] of each side, oldest
//! forgotten first), and a span whose other end is remembered gets it as its `peer` at once.
//! Spans that find no other end are counted as unpaired (`tailscope_topology_unpaired_spans_
//! total{side}`), so how much of the graph pairing drew is visible. A CLIENT span that names
//! its callee by attribute keeps it (its edge is then complete from the caller's side alone);
//! it is still remembered, so the callee's SERVER span learns its caller.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tailscope_proto::batch::BatchBuilder;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, Span, SpanBatch};

use crate::series::Kind;

/// How long an end waits for its other end.
pub const WAIT: Duration = Duration::from_secs(10);
/// The most ends of one side remembered.
pub const CAPACITY: usize = 10_000;

/// A span's identity within its trace: (trace id high, trace id low, span id).
type End = (u64, u64, u64);

/// Remembered ends of one side: the service at each (shared by a group's spans), in arrival
/// order for expiry. Span ids come from requests: the map's hasher is randomly seeded.
#[derive(Debug, Default)]
struct Side {
    services: HashMap<End, Arc<str>, foldhash::fast::RandomState>,
    order: VecDeque<(i64, End)>,
}

impl Side {
    fn remember(&mut self, end: End, service: &Arc<str>, now: i64, capacity: usize) {
        if self.services.insert(end, Arc::clone(service)).is_none() {
            self.order.push_back((now, end));
        }
        while self.services.len() > capacity {
            match self.order.pop_front() {
                Some((_, old)) => {
                    self.services.remove(&old);
                }
                None => break,
            }
        }
    }

    fn expire(&mut self, before: i64) {
        while self.order.front().is_some_and(|(at, _)| *at < before) {
            if let Some((_, end)) = self.order.pop_front() {
                self.services.remove(&end);
            }
        }
    }

    /// The service at `end`, forgotten once taken (one call has one other end).
    fn take(&mut self, end: &End) -> Option<Arc<str>> {
        self.services.remove(end)
    }
}

/// What one batch's pairing did, per side.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Paired {
    /// SERVER/CONSUMER spans that got their caller.
    pub servers: u64,
    /// CLIENT/PRODUCER spans without a callee attribute that got their callee.
    pub clients: u64,
    /// SERVER/CONSUMER spans counted without a caller.
    pub servers_unpaired: u64,
    /// CLIENT/PRODUCER spans without a callee attribute counted without one.
    pub clients_unpaired: u64,
}

/// The remembered ends of both sides.
#[derive(Debug)]
pub struct Pairing {
    state: Mutex<(Side, Side)>,
    wait_nanos: i64,
    capacity: usize,
}

impl Default for Pairing {
    fn default() -> Self {
        Pairing::new(WAIT, CAPACITY)
    }
}

impl Pairing {
    /// Pairing that remembers `capacity` ends of each side for `wait`.
    pub fn new(wait: Duration, capacity: usize) -> Pairing {
        Pairing {
            state: Mutex::default(),
            wait_nanos: i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX),
            capacity,
        }
    }

    /// Labels the spans of `batch` whose other end is remembered (or in the same batch), and
    /// remembers the batch's own ends; `now` in Unix nanoseconds.
    pub fn pair(&self, batch: &mut SpanBatch, now: i64) -> Paired {
        let roles: Vec<Option<Role>> = batch.groups.iter().map(role).collect();
        // Most batches of a service that calls nothing pair nothing, and take no lock.
        if roles.iter().all(Option::is_none) {
            return Paired::default();
        }
        let mut guard = self.state.lock();
        let (clients, servers) = &mut *guard;
        clients.expire(now.saturating_sub(self.wait_nanos));
        servers.expire(now.saturating_sub(self.wait_nanos));
        // Every end of this batch first, so two ends in one export pair too.
        for (g, role) in batch.groups.iter().zip(&roles) {
            let (Some(role), Some(key)) = (role, g.key.as_ref()) else { continue };
            let side = match role {
                Role::Calls => &mut *clients,
                Role::Requests => &mut *servers,
            };
            let service: Arc<str> = Arc::from(key.service.as_str());
            for s in g.spans.iter().filter(|s| role.end(s) != 0) {
                side.remember((s.trace_id_high, s.trace_id_low, role.end(s)), &service, now, self.capacity);
            }
        }
        let mut paired = Paired::default();
        // Moved spans, by their group and the peer found.
        let mut moved: BatchBuilder<(usize, Arc<str>)> = BatchBuilder::new();
        for (i, (g, role)) in batch.groups.iter_mut().zip(&roles).enumerate() {
            let Some(key) = g.key.as_ref() else { continue };
            // A call that names its callee keeps it.
            let (role, other_side, found, missed) = match role {
                Some(Role::Requests) => {
                    (Role::Requests, &mut *clients, &mut paired.servers, &mut paired.servers_unpaired)
                }
                Some(Role::Calls) if key.peer.is_empty() => {
                    (Role::Calls, &mut *servers, &mut paired.clients, &mut paired.clients_unpaired)
                }
                _ => continue,
            };
            g.spans.retain(|s| {
                let id = role.end(s);
                if id == 0 {
                    // A request without a parent has no caller; a call without an id no end.
                    return true;
                }
                // A service calling itself is no edge.
                match other_side.take(&(s.trace_id_high, s.trace_id_low, id)).filter(|o| **o != *key.service)
                {
                    Some(peer) => {
                        *found += 1;
                        let series = || SeriesKey { peer: peer.to_string(), ..key.clone() };
                        moved.push((i, Arc::clone(&peer)), series, *s);
                        false
                    }
                    None => {
                        *missed += 1;
                        true
                    }
                }
            });
        }
        drop(guard);
        if !moved.is_empty() {
            batch.groups.retain(|g| !g.spans.is_empty());
            batch.groups.extend(moved.take());
        }
        paired
    }
}

/// What a group's spans are to pairing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Calls (CLIENT, PRODUCER): their span ids are ends.
    Calls,
    /// Requests without a caller (SERVER, CONSUMER, no peer), some with a parent: their
    /// parents are ends.
    Requests,
}

impl Role {
    /// The end a span of this role is known by (0: none).
    fn end(self, s: &Span) -> u64 {
        match self {
            Role::Calls => s.span_id,
            Role::Requests => s.parent_span_id,
        }
    }
}

fn role(g: &SeriesGroup) -> Option<Role> {
    let key = g.key.as_ref()?;
    match Kind::from_wire(key.kind) {
        k if k.is_outgoing() => Some(Role::Calls),
        Kind::Server | Kind::Consumer
            if key.peer.is_empty() && g.spans.iter().any(|s| s.parent_span_id != 0) =>
        {
            Some(Role::Requests)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(service: &str, kind: Kind, peer: &str, spans: Vec<Span>) -> SeriesGroup {
        SeriesGroup {
            key: Some(SeriesKey {
                service: service.into(),
                operation: "op".into(),
                kind: kind as i32,
                peer: peer.into(),
            }),
            spans,
        }
    }

    fn span(trace: u64, id: u64, parent: u64) -> Span {
        Span {
            trace_id_low: trace,
            span_id: id,
            parent_span_id: parent,
            duration_nanos: 5,
            ..Span::default()
        }
    }

    fn peers(batch: &SpanBatch) -> Vec<(String, i32, String, usize)> {
        let mut out: Vec<_> = batch
            .groups
            .iter()
            .map(|g| {
                let k = g.key.as_ref().unwrap();
                (k.service.clone(), k.kind, k.peer.clone(), g.spans.len())
            })
            .collect();
        out.sort();
        out
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn the_end_that_arrives_second_is_labelled_either_way() {
        let p = Pairing::default();
        // checkout's calls arrive first: one names its callee, one does not.
        let mut first = SpanBatch {
            groups: vec![
                group("checkout", Kind::Client, "payments", vec![span(1, 10, 0)]),
                group("checkout", Kind::Client, "", vec![span(2, 20, 0)]),
            ],
            ..SpanBatch::default()
        };
        let done = p.pair(&mut first, 100 * S);
        assert_eq!(done, Paired { clients_unpaired: 1, ..Paired::default() });
        // payments' requests arrive next: both get their caller; a third has none.
        let mut second = SpanBatch {
            groups: vec![group(
                "payments",
                Kind::Server,
                "",
                vec![span(1, 11, 10), span(2, 21, 20), span(3, 31, 30)],
            )],
            ..SpanBatch::default()
        };
        let done = p.pair(&mut second, 101 * S);
        assert_eq!(done, Paired { servers: 2, servers_unpaired: 1, ..Paired::default() });
        assert_eq!(
            peers(&second),
            [
                ("payments".into(), Kind::Server as i32, "".into(), 1),
                ("payments".into(), Kind::Server as i32, "checkout".into(), 2)
            ]
        );
        // The other way round: the request first, then the call without a callee attribute.
        let mut request = SpanBatch {
            groups: vec![group("payments", Kind::Server, "", vec![span(4, 41, 40)])],
            ..SpanBatch::default()
        };
        assert_eq!(p.pair(&mut request, 102 * S).servers_unpaired, 1);
        let mut call = SpanBatch {
            groups: vec![group("checkout", Kind::Client, "", vec![span(4, 40, 0)])],
            ..SpanBatch::default()
        };
        assert_eq!(p.pair(&mut call, 103 * S).clients, 1);
        assert_eq!(peers(&call), [("checkout".into(), Kind::Client as i32, "payments".into(), 1)]);
    }

    #[test]
    fn both_ends_in_one_export_pair_and_ends_are_forgotten_after_the_wait() {
        let p = Pairing::new(WAIT, 3);
        let mut both = SpanBatch {
            groups: vec![
                group("payments", Kind::Server, "", vec![span(1, 11, 10)]),
                group("checkout", Kind::Client, "", vec![span(1, 10, 0)]),
            ],
            ..SpanBatch::default()
        };
        let done = p.pair(&mut both, 100 * S);
        assert_eq!((done.servers, done.clients), (1, 1), "both ends are labelled");
        assert_eq!(
            peers(&both),
            [
                ("checkout".into(), Kind::Client as i32, "payments".into(), 1),
                ("payments".into(), Kind::Server as i32, "checkout".into(), 1)
            ]
        );
        // A call remembered 11 s ago is forgotten.
        let mut old = SpanBatch {
            groups: vec![group("a", Kind::Client, "b", vec![span(7, 70, 0)])],
            ..SpanBatch::default()
        };
        p.pair(&mut old, 200 * S);
        let mut late = SpanBatch {
            groups: vec![group("b", Kind::Server, "", vec![span(7, 71, 70)])],
            ..SpanBatch::default()
        };
        assert_eq!(p.pair(&mut late, 211 * S).servers_unpaired, 1);
        // At most `capacity` ends of a side: the oldest go first.
        let calls: Vec<Span> = (1..=5).map(|i| span(9, i, 0)).collect();
        let mut many =
            SpanBatch { groups: vec![group("a", Kind::Client, "b", calls)], ..SpanBatch::default() };
        p.pair(&mut many, 300 * S);
        let served: Vec<Span> = (1..=5).map(|i| span(9, 100 + i, i)).collect();
        let mut replies =
            SpanBatch { groups: vec![group("b", Kind::Server, "", served)], ..SpanBatch::default() };
        let done = p.pair(&mut replies, 300 * S);
        assert_eq!((done.servers, done.servers_unpaired), (3, 2));
        // Internal and unspecified spans, and self-calls, are left alone.
        let mut own = SpanBatch {
            groups: vec![
                group("a", Kind::Internal, "", vec![span(8, 80, 0)]),
                group("a", Kind::Client, "", vec![span(8, 81, 0)]),
                group("a", Kind::Server, "", vec![span(8, 82, 81)]),
            ],
            ..SpanBatch::default()
        };
        let done = p.pair(&mut own, 400 * S);
        assert_eq!(done, Paired { servers_unpaired: 1, clients_unpaired: 1, ..Paired::default() });
    }
}
