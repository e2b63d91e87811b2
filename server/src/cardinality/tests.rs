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

/// A gateway of a cluster counts what its `Cardinality` decided and has the rest applied from
/// the names log; in whatever order names come, it counts each span as one node would.
#[test]
fn decided_names_and_applied_proposals_count_as_admission_does() {
    let one_node = Cardinality::new(3, 3, 2, []);
    let gateway = Cardinality::new(3, 3, 2, []);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut proposed = 0;
    for _ in 0..2_000 {
        let (s, o, p) = (format!("s{}", next(5)), format!("o{}", next(6)), format!("p{}", next(4)));
        let peer = if next(3) == 0 { String::new() } else { p };
        let (service, operation, key) = one_node.admit(&s, &o);
        let counted = (service, operation, key, one_node.admit_peer(service, &peer));
        let decided = |c: &Cardinality| {
            let (service, operation, key) = c.decided(&s, &o)?;
            Some((service, operation, key, c.decided_peer(service, &peer)?))
        };
        let answer = match decided(&gateway) {
            Some(answer) => answer,
            None => {
                assert_eq!(decided(&gateway), None, "deciding adds no name");
                proposed += 1;
                gateway.apply(&Names { service: s.clone(), operation: o.clone(), peer: peer.clone() });
                decided(&gateway).expect("an applied proposal is decided")
            }
        };
        assert_eq!(answer, counted, "{s}/{o} peer {peer:?}");
    }
    // Only the names under their caps were ever proposed: 3 services (and the overflow
    // service) × 3 operations, each with its first 2 peers and none.
    assert!(proposed <= 4 * 3 * 3, "{proposed} proposals");
    let unlimited = Cardinality::new(0, 0, 0, []);
    assert_eq!(names(unlimited.decided("a", "x").unwrap()), ("a", "x"), "no cap decides everything");
    assert_eq!(unlimited.decided_peer("a", "b"), Some("b"));
}
