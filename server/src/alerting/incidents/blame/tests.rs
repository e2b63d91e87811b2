use rand::{Rng, SeedableRng};

use super::*;

fn tail(base: f64, now: f64) -> Tail {
    Tail { now, base: Some(base) }
}

fn tails(services: &[(&str, f64, f64)], edges: &[(&str, &str, f64, f64)]) -> Tails {
    Tails {
        services: services.iter().map(|&(s, b, n)| (s.to_owned(), tail(b, n))).collect(),
        edges: edges.iter().map(|&(c, s, b, n)| ((c.to_owned(), s.to_owned()), tail(b, n))).collect(),
        calls_per_request: BTreeMap::new(),
        selfs: BTreeMap::new(),
    }
}

fn root(t: &Tails, service: &str) -> (String, bool) {
    let v = explain(t, service, &Thresholds::default());
    (v.root, v.virtual_root)
}

/// frontend → checkout → payments; `search` on its own.
fn chain(payments: (f64, f64), checkout_own_extra: f64) -> Tails {
    let p = payments.1 - payments.0;
    tails(
        &[
            ("frontend", 0.080, 0.080 + p + checkout_own_extra),
            ("checkout", 0.060, 0.060 + p + checkout_own_extra),
            ("payments", payments.0, payments.1),
            ("search", 0.040, 1.5),
        ],
        &[
            ("frontend", "checkout", 0.062, 0.062 + p + checkout_own_extra),
            ("checkout", "payments", 0.052, 0.052 + p),
            ("frontend", "search", 0.041, 0.041),
        ],
    )
}

#[test]
fn a_slow_leaf_is_the_root_of_its_callers() {
    let t = chain((0.050, 2.0), 0.0);
    for s in ["frontend", "checkout", "payments"] {
        assert_eq!(root(&t, s), ("payments".to_owned(), false), "{s}");
    }
    let v = explain(&t, "frontend", &Thresholds::default());
    assert_eq!(v.path, ["frontend", "checkout", "payments"]);
    let blame = v.blame.expect("frontend is a symptom");
    assert_eq!((blame.caller.as_str(), blame.callee.as_str()), ("frontend", "checkout"));
    assert_eq!(explain(&t, "payments", &Thresholds::default()).blame, None);
    // The unrelated slow service is its own root: frontend's calls to it did not rise.
    assert_eq!(root(&t, "search"), ("search".to_owned(), false));
    let b = blame_edge(&t, "checkout", &Thresholds::default()).expect("blame");
    assert_eq!(b.to_string(), "checkout→payments p99 52ms → 2s (+1.95s)");
}

#[test]
fn retries_count_every_call_the_caller_waited_on() {
    // payments 50 ms → 2 s; checkout times out after 1 s and tries three times: its calls'
    // p99 rose 0.95 s, but it waits three of them per request — 2.95 s, its own rise.
    let mut t =
        tails(&[("checkout", 0.06, 3.0), ("payments", 0.05, 2.0)], &[("checkout", "payments", 0.05, 1.0)]);
    assert_eq!(
        root(&t, "checkout").0,
        "checkout",
        "without the calls per request, the retries hide the cause"
    );
    t.calls_per_request.insert(("checkout".into(), "payments".into()), tail(1.0, 3.0));
    assert_eq!(root(&t, "checkout").0, "payments");
    let b = blame_edge(&t, "checkout", &Thresholds::default()).expect("blame");
    assert_eq!(b.to_string(), "checkout→payments p99 50ms → 1s (+950ms), 3.0 calls per request (was 1.0)");
}

#[test]
fn a_slow_middle_is_the_root_and_its_healthy_callee_is_not_blamed() {
    let t = chain((0.050, 0.050), 2.0);
    assert_eq!(root(&t, "frontend"), ("checkout".to_owned(), false));
    assert_eq!(root(&t, "checkout"), ("checkout".to_owned(), false));
    assert_eq!(explain(&t, "frontend", &Thresholds::default()).path, ["frontend", "checkout"]);
}

#[test]
fn an_uninstrumented_callee_is_a_virtual_root() {
    let t = tails(
        &[("frontend", 0.08, 2.1), ("checkout", 0.06, 2.0)],
        &[("frontend", "checkout", 0.062, 2.05), ("checkout", "db:postgres", 0.004, 1.9)],
    );
    assert_eq!(root(&t, "frontend"), ("db:postgres".to_owned(), true));
    assert_eq!(root(&t, "checkout"), ("db:postgres".to_owned(), true));
}

#[test]
fn a_cycle_is_cut_at_its_least_explained_member() {
    // a ⇄ b: b's calls back into a rose a little, a's calls to b rose most, b's own tail rose
    // most of all — b's own code.
    let t = tails(&[("a", 0.05, 1.5), ("b", 0.04, 1.45)], &[("a", "b", 0.04, 1.45), ("b", "a", 0.01, 0.9)]);
    assert_eq!(root(&t, "a").0, "b");
    assert_eq!(root(&t, "b").0, "b");
    let v = explain(&t, "a", &Thresholds::default());
    assert_eq!(v.path, ["a", "b"]);
}

#[test]
fn a_diamond_and_a_fan_out_lead_to_the_one_slow_callee() {
    // cart and checkout both call payments; frontend calls both and eight healthy services.
    let healthy: Vec<String> = (0..8).map(|i| format!("svc{i}")).collect();
    let mut services =
        vec![("frontend", 0.1, 2.1), ("cart", 0.05, 2.0), ("checkout", 0.06, 2.0), ("payments", 0.05, 1.95)];
    let mut edges = vec![
        ("frontend", "cart", 0.05, 2.0),
        ("frontend", "checkout", 0.06, 2.0),
        ("cart", "payments", 0.05, 1.95),
        ("checkout", "payments", 0.05, 1.95),
    ];
    for h in &healthy {
        services.push((h, 0.02, 0.02));
        edges.push(("frontend", h, 0.02, 0.021));
    }
    let t = tails(&services, &edges);
    for s in ["frontend", "cart", "checkout", "payments"] {
        assert_eq!(root(&t, s).0, "payments", "{s}");
    }
    assert_eq!(root(&t, "svc3").0, "svc3");
}

#[test]
fn a_callee_that_explains_little_of_the_tail_is_not_blamed() {
    // checkout's own p99 rose 2 s; its payments calls rose 0.3 s (less than half): its own
    // code (or its queueing) is the root.
    let t =
        tails(&[("checkout", 0.06, 2.06), ("payments", 0.05, 0.35)], &[("checkout", "payments", 0.05, 0.35)]);
    assert_eq!(root(&t, "checkout").0, "checkout");
    // Below the least rise, or without a baseline, nothing is blamed either.
    let t = tails(&[("checkout", 0.001, 0.009)], &[("checkout", "payments", 0.001, 0.008)]);
    assert_eq!(root(&t, "checkout").0, "checkout");
    let mut t = chain((0.05, 2.0), 0.0);
    t.edges.get_mut(&("checkout".to_owned(), "payments".to_owned())).expect("edge").base = None;
    assert_eq!(root(&t, "frontend").0, "checkout");
}

/// Random DAGs: one injected slow service per component, latency propagated to every caller
/// that waits on it; every affected service is rooted at the injected one, so the incidents
/// are exactly the injected roots.
#[test]
fn random_graphs_find_the_injected_roots() {
    let mut r = rand::rngs::StdRng::seed_from_u64(14);
    for round in 0..300 {
        let mut t = Tails::default();
        let mut injected = BTreeSet::new();
        let mut affected: Vec<(String, String)> = Vec::new();
        for component in 0..2 {
            let n = r.gen_range(2..12);
            let name = |i: usize| format!("c{component}s{i:02}");
            // Edges only from lower to higher index: a DAG.
            let mut callees: Vec<Vec<usize>> = vec![Vec::new(); n];
            for (i, list) in callees.iter_mut().enumerate() {
                for j in i + 1..n {
                    if r.gen_bool(0.35) {
                        list.push(j);
                    }
                }
            }
            let slow = r.gen_range(0..n);
            injected.insert(name(slow));
            let rise = r.gen_range(0.5..3.0);
            // Own rise of each service: the slow one's, or the largest rise among its callees.
            let mut own_rise = vec![0.0f64; n];
            for i in (0..n).rev() {
                own_rise[i] = if i == slow {
                    rise
                } else {
                    callees[i].iter().map(|&j| own_rise[j]).fold(0.0, f64::max)
                };
            }
            for i in 0..n {
                let base = r.gen_range(0.01..0.1);
                t.services.insert(name(i), tail(base, base + own_rise[i]));
                for &j in &callees[i] {
                    let eb = r.gen_range(0.005..0.05);
                    t.edges.insert((name(i), name(j)), tail(eb, eb + own_rise[j]));
                }
                if own_rise[i] > 0.0 {
                    affected.push((name(i), name(slow)));
                }
            }
        }
        let mut roots = BTreeSet::new();
        for (service, want) in &affected {
            let v = explain(&t, service, &Thresholds::default());
            assert_eq!(&v.root, want, "round {round}: {service} via {:?}", v.path);
            roots.insert(v.root);
        }
        assert_eq!(roots, injected, "round {round}");
    }
}

#[test]
fn a_caller_whose_own_code_rose_more_than_its_calls_is_the_root() {
    // checkout's p99 rose 2 s; its calls to payments 1.1 s (enough to blame on their own),
    // but its own code (self time) 1.5 s: the larger contribution wins, so checkout is the
    // root, not a symptom of payments.
    let mut t = tails(
        &[("frontend", 0.08, 2.08), ("checkout", 0.06, 2.06), ("payments", 0.05, 1.15)],
        &[("frontend", "checkout", 0.062, 2.062), ("checkout", "payments", 0.052, 1.152)],
    );
    assert_eq!(root(&t, "frontend").0, "payments", "without self times the edge explains the rise");
    t.selfs.insert("checkout".into(), tail(0.010, 1.510));
    t.selfs.insert("frontend".into(), tail(0.020, 0.021));
    assert_eq!(root(&t, "checkout"), ("checkout".to_owned(), false));
    assert_eq!(root(&t, "frontend"), ("checkout".to_owned(), false));
    assert_eq!(
        root_reason(&t, "checkout").as_deref(),
        Some("checkout p99 60ms → 2.06s (+2s); self time p99 10ms → 1.51s (+1.5s); calls at most checkout→payments 52ms → 1.15s (+1.1s)")
    );
    assert_eq!(
        root_reason(&t, "payments").as_deref(),
        Some("payments p99 50ms → 1.15s (+1.1s)"),
        "no self times, no calls"
    );
    // Its own code flat while its calls rose: the callee is blamed as before.
    t.selfs.insert("checkout".into(), tail(0.010, 0.012));
    t.services.insert("payments".into(), tail(0.05, 2.0));
    t.edges.insert(("checkout".into(), "payments".into()), tail(0.052, 2.002));
    assert_eq!(root(&t, "frontend").0, "payments");
}

#[test]
fn with_self_times_a_retry_storm_is_blamed_on_its_callee_early() {
    // The first seconds of a retry storm: checkout's p99 is three timed-out attempts (3 s),
    // but over the window its calls per request have only begun to rise, so its edge's wait
    // (1 s × 1.06) rose far less than half of checkout's rise.
    let mut t = tails(
        &[("checkout", 0.602, 3.01), ("payments", 0.589, 2.37)],
        &[("checkout", "payments", 0.589, 1.0)],
    );
    t.calls_per_request.insert(("checkout".into(), "payments".into()), tail(1.0, 1.06));
    assert_eq!(root(&t, "checkout").0, "checkout", "without self times the edge does not explain it");
    // checkout's own code did not slow: its rise is waiting, and the only call that rose is it.
    t.selfs.insert("checkout".into(), tail(0.026, 0.026));
    assert_eq!(root(&t, "checkout").0, "payments");
    // A call that did not rise by min_ratio is still not blamed.
    t.edges.insert(("checkout".into(), "payments".into()), tail(0.589, 0.6));
    t.calls_per_request.clear();
    assert_eq!(root(&t, "checkout").0, "checkout");
}
