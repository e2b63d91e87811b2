//! A cap on the operations (series keys) of each service, so a client that puts ids into
//! operation names (a cardinality bomb) cannot grow memory and disk without bound: beyond
//! `ingest.max_operations_per_service`, new operations of that service are counted under
//! `operation="__overflow__"` — counted exactly, just not told apart — and
//! `tailscope_spans_overflowed_total` says how many spans went there.

use std::collections::HashSet;

use dashmap::DashMap;

use crate::series::{self, IdBuildHasher};

/// The operation name overflowing spans are counted under.
pub const OVERFLOW: &str = "__overflow__";

/// Each service's known operations, up to the cap.
#[derive(Debug)]
pub struct Cardinality {
    cap: usize,
    /// By a hash of the service name, the group hashes of its operations. Both keys are
    /// already hashes, so the maps use them as they are (this runs once per span group).
    services: DashMap<u64, HashSet<u64, IdBuildHasher>, IdBuildHasher>,
}

fn service_key(service: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(service.as_bytes())
}

impl Cardinality {
    /// A cap of `cap` operations per service (0: none), knowing the series already stored.
    pub fn new<'a>(cap: usize, known: impl IntoIterator<Item = (&'a str, &'a str)>) -> Cardinality {
        let c = Cardinality { cap, services: DashMap::default() };
        for (service, operation) in known {
            if operation != OVERFLOW {
                c.services
                    .entry(service_key(service))
                    .or_default()
                    .insert(series::group_hash(service, operation));
            }
        }
        c
    }

    /// The operation to count a span of `service`/`operation` under: itself while the service
    /// is under its cap or the operation is known, else [`OVERFLOW`].
    pub fn admit<'a>(&self, service: &str, operation: &'a str) -> &'a str {
        if self.cap == 0 || operation == OVERFLOW {
            return operation;
        }
        let key = series::group_hash(service, operation);
        let service = service_key(service);
        if let Some(known) = self.services.get(&service) {
            if known.contains(&key) {
                return operation;
            }
            if known.len() >= self.cap {
                return OVERFLOW;
            }
        }
        let mut known = self.services.entry(service).or_default();
        if known.len() >= self.cap && !known.contains(&key) {
            return OVERFLOW;
        }
        known.insert(key);
        operation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_operations_beyond_the_cap_overflow_and_known_ones_do_not() {
        let c = Cardinality::new(3, [("a", "x"), ("a", OVERFLOW)]);
        assert_eq!(c.admit("a", "x"), "x");
        assert_eq!(c.admit("a", "y"), "y");
        assert_eq!(c.admit("a", "z"), "z");
        assert_eq!(c.admit("a", "w"), OVERFLOW);
        assert_eq!(c.admit("a", "y"), "y", "known operations keep their series");
        assert_eq!(c.admit("b", "w"), "w", "the cap is per service");
        assert_eq!(c.admit("a", OVERFLOW), OVERFLOW);
        let unlimited = Cardinality::new(0, []);
        assert!((0..10_000).all(|i| unlimited.admit("a", &i.to_string()) != OVERFLOW));
    }
}
