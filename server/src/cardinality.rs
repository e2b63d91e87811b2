//! Caps on the services and on the operations (series keys) of each service, so a client
//! that puts ids into service or operation names (a cardinality bomb) cannot grow memory and
//! disk without bound: beyond `ingest.max_services`, spans of new services are counted under
//! `service="__overflow__"`, and beyond `ingest.max_operations_per_service`, new operations of
//! a service under `operation="__overflow__"` — counted exactly, just not told apart — and
//! `tailscope_spans_overflowed_total` says how many spans went there. Peers (the other end of
//! a service's calls, which a client may name by address) are capped per service the same way
//! (`ingest.max_peers_per_service`, beyond it `peer="__overflow__"`).
//!
//! The first names up to a cap keep their series, so the caps decide by order. One node
//! decides in the order it takes batches ([`Cardinality::admit`]); a cluster's gateways in the
//! order of a log they share ([`SharedNames`]), so a cluster counts
//! as one node would.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::series::{self, IdBuildHasher};

/// The service or operation name overflowing spans are counted under.
pub const OVERFLOW: &str = "__overflow__";

/// The names one span group was sent with, as a gateway proposes them to the others.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Names {
    /// The service sent.
    pub service: String,
    /// The operation sent.
    pub operation: String,
    /// The peer sent (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
}

/// Where a cluster's gateways agree on names: each applies the same proposals in the same
/// order to its own [`Cardinality`] ([`Cardinality::apply`]), so a span is counted under
/// the same names whichever gateway takes it, and no service passes its caps however many
/// gateways take its spans. A gateway counts what its `Cardinality` has decided
/// ([`Cardinality::decided`]) and proposes the rest.
pub trait SharedNames: Send + Sync + std::fmt::Debug {
    /// Proposes `names`; resolves once this gateway's `Cardinality` has applied them (and
    /// every proposal before them), or says why not.
    fn propose(
        &self,
        names: Vec<Names>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), NamesRefused>> + Send + '_>>;
}

/// Why names could not be agreed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamesRefused {
    /// Where the names are agreed on holds no more: new names are refused until an operator
    /// makes room (its limit named in the message); known ones still go in.
    #[error("{0}")]
    Full(String),
    /// Not answered now (an election, a lost connection): the same proposal later may be.
    #[error("{0}")]
    Unavailable(String),
}

/// The services known, and each one's operations, up to the caps.
#[derive(Debug)]
pub struct Cardinality {
    max_services: usize,
    max_operations: usize,
    max_peers: usize,
    /// By a hash of the service name, hashes of its peers.
    peers: DashMap<u64, HashSet<u64, IdBuildHasher>, IdBuildHasher>,
    /// By a hash of the service name, the group hashes of its operations. Both keys are
    /// already hashes, so the maps use them as they are (this runs once per span group).
    services: DashMap<u64, HashSet<u64, IdBuildHasher>, IdBuildHasher>,
    /// How many services `services` holds (its `len()` would lock every shard of the map).
    service_count: AtomicUsize,
}

fn service_key(service: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(service.as_bytes())
}

impl Cardinality {
    /// Caps of `max_services` services, `max_operations` operations and `max_peers` peers per
    /// service (0: no cap), knowing the series already stored as (service, operation, peer).
    pub fn new<'a>(
        max_services: usize,
        max_operations: usize,
        max_peers: usize,
        known: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Cardinality {
        let c = Cardinality {
            max_services,
            max_operations,
            max_peers,
            peers: DashMap::default(),
            services: DashMap::default(),
            service_count: AtomicUsize::new(0),
        };
        for (service, operation, peer) in known {
            let mut ops = c.services.entry(service_key(service)).or_default();
            if operation != OVERFLOW {
                ops.insert(series::group_hash(service, operation));
            }
            if !peer.is_empty() && peer != OVERFLOW {
                c.peers.entry(service_key(service)).or_default().insert(service_key(peer));
            }
        }
        c.service_count.store(c.services.len(), Ordering::Relaxed);
        c
    }

    /// The service and operation to count a span of `service`/`operation` under — themselves
    /// (the very references given) while under the caps or already known, else [`OVERFLOW`] for
    /// the one over its cap (a new service over the service cap keeps its operation names,
    /// which the operation cap of the overflow service then bounds) — and the
    /// [`series::group_hash`] of that pair, which it computes on the way (ingest routes by it).
    /// What is not [`Cardinality::decided`] yet is decided by adding it.
    pub fn admit<'a>(&self, service: &'a str, operation: &'a str) -> (&'a str, &'a str, u64) {
        if let Some(decided) = self.decided(service, operation) {
            return decided;
        }
        let service = self.admit_service(service, service_key(service));
        if self.max_operations == 0 || operation == OVERFLOW {
            return (service, operation, series::group_hash(service, operation));
        }
        let key = series::group_hash(service, operation);
        // Checked again under the entry's lock: concurrent new operations cannot pass the cap.
        let mut known = self.services.entry(service_key(service)).or_default();
        if known.len() >= self.max_operations && !known.contains(&key) {
            return (service, OVERFLOW, series::group_hash(service, OVERFLOW));
        }
        known.insert(key);
        (service, operation, key)
    }

    /// The peer to count a span of (admitted) `service` calling or called by `peer` under:
    /// itself while the service is under its peer cap or the peer is known, else [`OVERFLOW`].
    /// No peer (empty) is always itself. What is not [`Cardinality::decided_peer`] yet is
    /// decided by adding it.
    pub fn admit_peer<'a>(&self, service: &str, peer: &'a str) -> &'a str {
        if let Some(decided) = self.decided_peer(service, peer) {
            return decided;
        }
        let pkey = service_key(peer);
        let mut known = self.peers.entry(service_key(service)).or_default();
        if known.len() >= self.max_peers && !known.contains(&pkey) {
            return OVERFLOW;
        }
        known.insert(pkey);
        peer
    }

    /// What [`Cardinality::admit`] would answer, when it can answer without adding a name:
    /// `None` when `service` or `operation` is new and under its cap (only adding it decides).
    /// A name decided stays decided the same way (known names stay known, a full cap stays
    /// full), so a decision read from the names of a log's first entries is the one its
    /// whole log gives.
    pub fn decided<'a>(&self, service: &'a str, operation: &'a str) -> Option<(&'a str, &'a str, u64)> {
        let skey = service_key(service);
        if self.max_operations == 0 || operation == OVERFLOW {
            let service = self.decided_service(service, skey)?;
            return Some((service, operation, series::group_hash(service, operation)));
        }
        // A known service (the common case): its operations decide, one lookup of the map.
        let (service, known) = match self.services.get(&skey) {
            Some(known) => (service, known),
            // A new service is decided only as the overflow service (past the service cap).
            None => match self.decided_service(service, skey)? {
                same if std::ptr::eq(same, service) => return None,
                overflow => (overflow, self.services.get(&service_key(overflow))?),
            },
        };
        let key = series::group_hash(service, operation);
        if known.contains(&key) {
            return Some((service, operation, key));
        }
        (known.len() >= self.max_operations)
            .then(|| (service, OVERFLOW, series::group_hash(service, OVERFLOW)))
    }

    /// What [`Cardinality::admit_peer`] would answer without adding a peer; `None` when `peer`
    /// is new and under the cap of (admitted) `service`.
    pub fn decided_peer<'a>(&self, service: &str, peer: &'a str) -> Option<&'a str> {
        if self.max_peers == 0 || peer.is_empty() || peer == OVERFLOW {
            return Some(peer);
        }
        let known = self.peers.get(&service_key(service))?;
        if known.contains(&service_key(peer)) {
            return Some(peer);
        }
        (known.len() >= self.max_peers).then_some(OVERFLOW)
    }

    /// Decides the names of one span group as ingest does (its service and operation, then
    /// its peer): how a cluster's gateways apply the names they agreed on, in the names
    /// log's order.
    pub fn apply(&self, names: &Names) {
        let (service, _, _) = self.admit(&names.service, &names.operation);
        self.admit_peer(service, &names.peer);
    }

    /// `service` while known, without a cap or the overflow service itself, [`OVERFLOW`] when
    /// new and the service cap is reached; `None` when new under the cap.
    fn decided_service<'a>(&self, service: &'a str, skey: u64) -> Option<&'a str> {
        if self.max_services == 0 || service == OVERFLOW || self.services.contains_key(&skey) {
            return Some(service);
        }
        (self.service_count.load(Ordering::Relaxed) >= self.max_services).then_some(OVERFLOW)
    }

    /// `service` (whose [`service_key`] is `skey`) while under the service cap or known, else
    /// [`OVERFLOW`]; what is not [`Cardinality::decided_service`] yet is decided by adding it.
    fn admit_service<'a>(&self, service: &'a str, skey: u64) -> &'a str {
        if let Some(decided) = self.decided_service(service, skey) {
            return decided;
        }
        match self.services.entry(skey) {
            dashmap::Entry::Occupied(_) => service,
            dashmap::Entry::Vacant(v) => {
                // Reserve a place first: concurrent new services cannot pass the cap together.
                if self.service_count.fetch_add(1, Ordering::Relaxed) >= self.max_services {
                    self.service_count.fetch_sub(1, Ordering::Relaxed);
                    return OVERFLOW;
                }
                v.insert(HashSet::default());
                service
            }
        }
    }
}

#[cfg(test)]
mod tests;
