use super::*;

fn nodes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

#[test]
fn every_partition_has_replication_factor_owners_spread_evenly() {
    let partitions = 256;
    let stores = nodes(4);
    let a = Assignment::new("node-0", stores.clone(), 2, partitions);
    let mut held = std::collections::HashMap::<&str, usize>::new();
    for p in 0..partitions {
        let owners = a.owners(p);
        assert_eq!(owners.len(), 2, "partition {p}");
        assert_ne!(owners[0], owners[1]);
        for o in owners {
            *held.entry(o).or_default() += 1;
        }
    }
    // 512 copies over 4 stores: 128 each on average; rendezvous keeps each within ±25 %.
    assert_eq!(held.values().sum::<usize>(), 512);
    for (node, n) in &held {
        assert!((96..=160).contains(n), "{node} holds {n} of 512 copies");
    }
    // The node's own view agrees with the owner lists.
    let owned = a.owned();
    assert_eq!(owned.len(), held["node-0"]);
    assert!(owned.iter().all(|&p| a.owners(p).contains(&"node-0")));
}

#[test]
fn a_joining_store_takes_copies_and_nothing_else_moves() {
    let partitions = 256;
    let before = Assignment::new("node-0", nodes(3), 2, partitions);
    let after = Assignment::new("node-0", nodes(4), 2, partitions);
    let mut moved = 0;
    for p in 0..partitions {
        let (b, a) = (before.owners(p), after.owners(p));
        if b != a {
            moved += 1;
            // The only change: node-3 came in, replacing at most one previous owner.
            assert!(a.contains(&"node-3"), "partition {p}: {b:?} → {a:?}");
            assert_eq!(b.iter().filter(|o| !a.contains(o)).count(), 1, "partition {p}: {b:?} → {a:?}");
        }
    }
    // node-3 should take about half the partitions (2 copies of 4 stores).
    assert!((96..=160).contains(&moved), "{moved} of 256 partitions changed owners");
}

#[test]
fn a_leaving_store_hands_on_only_its_own_copies() {
    let partitions = 256;
    let before = Assignment::new("node-0", nodes(4), 2, partitions);
    let gone: Vec<String> = nodes(4).into_iter().filter(|n| n != "node-2").collect();
    let after = Assignment::new("node-0", gone, 2, partitions);
    for p in 0..partitions {
        let (b, a) = (before.owners(p), after.owners(p));
        if b.contains(&"node-2") {
            // The other owner keeps it; the next in the ranking takes node-2's copy.
            assert!(b.iter().filter(|o| **o != "node-2").all(|o| a.contains(o)), "partition {p}");
            assert!(!a.contains(&"node-2"));
        } else {
            assert_eq!(b, a, "partition {p} moved though node-2 did not hold it");
        }
    }
}

#[test]
fn replication_zero_or_more_than_the_stores_means_every_store() {
    for replication in [0, 2, 5] {
        let a = Assignment::new("node-1", nodes(2), replication, 8);
        for p in 0..8 {
            let mut owners = a.owners(p);
            owners.sort();
            assert_eq!(owners, ["node-0", "node-1"], "replication {replication}");
        }
        assert_eq!(a.owned(), (0..8).collect::<Vec<_>>());
    }
    // Alone, a node owns everything; a node that is not a store owns nothing.
    assert_eq!(Assignment::new("node-0", nodes(1), 2, 4).owned(), [0, 1, 2, 3]);
    assert!(Assignment::new("gw", nodes(3), 2, 4).owned().is_empty());
}

#[test]
fn replicas_answer_only_once_caught_up() {
    let r = Replicas::new(3);
    assert!(!r.caught_up(1));
    r.set(1, true);
    assert!(r.caught_up(1) && !r.caught_up(0));
    r.set(1, false);
    assert!(!r.caught_up(1));
    // Out of range: never.
    r.set(7, true);
    assert!(!r.caught_up(7));
}

#[test]
fn a_draining_store_owns_nothing_for_the_others_but_keeps_what_it_held_for_itself() {
    let partitions = 64;
    let before = Assignment::new("node-1", nodes(3), 2, partitions);
    let after = Assignment::new("node-1", nodes(3), 2, partitions).with_draining(vec!["node-1".into()]);
    let seen_by_0 = Assignment::new("node-0", nodes(3), 2, partitions).with_draining(vec!["node-1".into()]);
    assert!(after.draining_me() && !seen_by_0.draining_me());
    assert_eq!(after.stores(), ["node-0", "node-2"]);
    for p in 0..partitions {
        // The live stores own every partition, two copies each, as if node-1 had left.
        assert_eq!(after.owners(p).len(), 2);
        assert!(!after.owners(p).contains(&"node-1"));
        assert_eq!(after.owners(p), seen_by_0.owners(p), "partition {p}");
        // node-1 is named as the leaving holder exactly where it held a copy, and keeps
        // reading those until it has left.
        let held = before.owners(p).contains(&"node-1");
        assert_eq!(after.leaving(p) == ["node-1"], held, "partition {p}");
        assert_eq!(after.owns(p), held, "partition {p}");
        assert!(before.owners(p).iter().all(|o| *o == "node-1" || after.owners(p).contains(o)));
    }
    assert_eq!(after.owned(), before.owned());
    // Without a draining store nobody is leaving.
    assert!((0..partitions).all(|p| before.leaving(p).is_empty()));
}
