//! Caps on the services and on the operations (series keys) of each service, so a client
//! that puts ids into service or operation names (a cardinality bomb) cannot grow memory and
//! disk without bound: beyond `ingest.max_services`, spans of new services are counted under
//! `service="__overflow__"`, and beyond `ingest.max_operations_per_service`, new operations of
//! a service under `operation="__overflow__"` — counted exactly, just not told apart — and
//! `tailscope_spans_overflowed_total` says how many spans went there. Peers (the other end of
//! a service's calls, which a client may name by address) are capped per service the same way
//! (`ingest.max_peers_per_service`, beyond it `peer="__overflow__"`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::series::{self, IdBuildHasher};

/// The service or operation name overflowing spans are counted under.
pub const OVERFLOW: &str = "__overflow__";

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
    pub fn admit<'a>(&self, service: &'a str, operation: &'a str) -> (&'a str, &'a str, u64) {
        let skey = service_key(service);
        if self.max_operations == 0 || operation == OVERFLOW {
            let service = self.admit_service(service, skey);
            return (service, operation, series::group_hash(service, operation));
        }
        let key = series::group_hash(service, operation);
        // A known service (the common case): its operations decide, one lookup of the map.
        if let Some(known) = self.services.get(&skey) {
            if known.contains(&key) {
                return (service, operation, key);
            }
            if known.len() >= self.max_operations {
                return (service, OVERFLOW, series::group_hash(service, OVERFLOW));
            }
        }
        let admitted = self.admit_service(service, skey);
        let (service, skey, key) = match std::ptr::eq(admitted, service) {
            true => (service, skey, key),
            false => (admitted, service_key(admitted), series::group_hash(admitted, operation)),
        };
        let mut known = self.services.entry(skey).or_default();
        if known.len() >= self.max_operations && !known.contains(&key) {
            return (service, OVERFLOW, series::group_hash(service, OVERFLOW));
        }
        known.insert(key);
        (service, operation, key)
    }

    /// The peer to count a span of (admitted) `service` calling or called by `peer` under:
    /// itself while the service is under its peer cap or the peer is known, else [`OVERFLOW`].
    /// No peer (empty) is always itself.
    pub fn admit_peer<'a>(&self, service: &str, peer: &'a str) -> &'a str {
        if self.max_peers == 0 || peer.is_empty() || peer == OVERFLOW {
            return peer;
        }
        let (skey, pkey) = (service_key(service), service_key(peer));
        if let Some(known) = self.peers.get(&skey) {
            if known.contains(&pkey) {
                return peer;
            }
        }
        let mut known = self.peers.entry(skey).or_default();
        if known.len() >= self.max_peers && !known.contains(&pkey) {
            return OVERFLOW;
        }
        known.insert(pkey);
        peer
    }

    /// `service` (whose [`service_key`] is `skey`) while under the service cap or known, else
    /// [`OVERFLOW`].
    fn admit_service<'a>(&self, service: &'a str, skey: u64) -> &'a str {
        if self.max_services == 0 || service == OVERFLOW {
            return service;
        }
        if self.services.contains_key(&skey) {
            return service;
        }
        if self.service_count.load(Ordering::Relaxed) >= self.max_services {
            return OVERFLOW;
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
mod tests {
    use super::*;

    #[test]
    fn new_peers_beyond_the_cap_overflow_per_service() {
        let c = Cardinality::new(0, 0, 2, [("checkout", "pay", "payments"), ("checkout", "x", OVERFLOW)]);
        assert_eq!(c.admit_peer("checkout", "payments"), "payments");
        assert_eq!(c.admit_peer("checkout", "db:postgres"), "db:postgres");
        assert_eq!(c.admit_peer("checkout", "10.0.0.7"), OVERFLOW);
        assert_eq!(c.admit_peer("checkout", "db:postgres"), "db:postgres", "known peers keep their series");
        assert_eq!(c.admit_peer("checkout", ""), "", "no peer is no peer");
        assert_eq!(c.admit_peer("frontend", "10.0.0.7"), "10.0.0.7", "the cap is per service");
        let unlimited = Cardinality::new(0, 0, 0, []);
        assert!((0..1_000).all(|i| unlimited.admit_peer("a", &i.to_string()) != OVERFLOW));
    }

    #[test]
    fn new_operations_beyond_the_cap_overflow_and_known_ones_do_not() {
        let c = Cardinality::new(0, 3, 0, [("a", "x", ""), ("a", OVERFLOW, "")]);
        let op = |s, o| {
            let (service, operation, key) = c.admit(s, o);
            assert_eq!(key, series::group_hash(service, operation), "the key of the pair admitted");
            operation
        };
        assert_eq!(op("a", "x"), "x");
        assert_eq!(op("a", "y"), "y");
        assert_eq!(op("a", "z"), "z");
        assert_eq!(op("a", "w"), OVERFLOW);
        assert_eq!(op("a", "y"), "y", "known operations keep their series");
        assert_eq!(op("b", "w"), "w", "the cap is per service");
        assert_eq!(op("a", OVERFLOW), OVERFLOW);
        let unlimited = Cardinality::new(0, 0, 0, []);
        assert!((0..10_000).all(|i| unlimited.admit("a", &i.to_string()).1 != OVERFLOW));
    }

    /// The names `admit` counts under, without the key.
    fn names<'a>((service, operation, _): (&'a str, &'a str, u64)) -> (&'a str, &'a str) {
        (service, operation)
    }

    #[test]
    fn new_services_beyond_the_cap_overflow_with_their_operations_capped() {
        let c = Cardinality::new(2, 3, 0, [("known", "x", "")]);
        assert_eq!(names(c.admit("known", "x")), ("known", "x"));
        assert_eq!(names(c.admit("second", "x")), ("second", "x"));
        assert_eq!(names(c.admit("third", "a")), (OVERFLOW, "a"));
        assert_eq!(names(c.admit("fourth", "b")), (OVERFLOW, "b"));
        assert_eq!(names(c.admit("fifth", "c")), (OVERFLOW, "c"));
        // The overflow service's own operations are capped like any service's.
        assert_eq!(names(c.admit("sixth", "d")), (OVERFLOW, OVERFLOW));
        assert_eq!(names(c.admit("second", "y")), ("second", "y"), "known services keep their series");
        // Services already stored count against the cap after a restart.
        let restarted = Cardinality::new(2, 3, 0, [("known", "x", ""), ("second", "x", "")]);
        assert_eq!(names(restarted.admit("third", "a")), (OVERFLOW, "a"));
        // Many threads racing to add new services never pass the cap.
        let racing = std::sync::Arc::new(Cardinality::new(100, 0, 0, []));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = racing.clone();
                std::thread::spawn(move || {
                    (0..1_000).filter(|i| c.admit(&format!("s{t}-{i}"), "op").0 != OVERFLOW).count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        assert_eq!(admitted, 100);
    }
}
