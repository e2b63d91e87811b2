use std::time::{Duration, Instant};

use super::*;
use crate::query::Budget;
use crate::series::Status;
use crate::store::MemoryStore;

/// Series only: these functions never read windows.
type Index = MemoryStore;

fn index(n: usize) -> Index {
    let mut idx = MemoryStore::default();
    for i in 0..n {
        idx.add_series(SeriesLabels::new(
            format!("svc-{:03}", i % 7),
            format!("op-{i:05}"),
            if i % 3 == 0 { Status::Error } else { Status::Ok },
        ));
    }
    idx
}

fn selector(text: &str) -> VectorSelector {
    match promql::parse(text).expect("parses") {
        promql_parser::parser::Expr::VectorSelector(vs) => vs,
        other => panic!("{other:?}"),
    }
}

fn budget() -> Budget {
    Budget::new(Instant::now() + Duration::from_secs(30))
}

#[test]
fn every_series_is_exposed_as_buckets_count_sum_and_a_native_histogram() {
    let idx = index(2);
    let all = series(&idx, &[], usize::MAX, &budget()).expect("series");
    assert_eq!(all.items.len(), 2 * (promql::DEFAULT_LE.len() + 3));
    let native = series(&idx, &[selector("span_duration_seconds")], usize::MAX, &budget()).expect("series");
    assert_eq!(native.items.len(), 2);
    assert!(native.items.iter().all(|s| !s.contains_key("le")));
    assert!(!all.truncated);
    let counts =
        series(&idx, &[selector("span_duration_seconds_count")], usize::MAX, &budget()).expect("series");
    assert_eq!(counts.items.len(), 2);
    let le = series(&idx, &[selector("span_duration_seconds_bucket{le=\"0.5\"}")], usize::MAX, &budget())
        .expect("series");
    assert_eq!(le.items.len(), 2);
    assert!(le.items.iter().all(|s| s["le"] == "0.5"));
}

#[test]
fn a_limit_keeps_the_first_sets_in_order_and_says_it_cut() {
    let idx = index(500);
    let full = series(&idx, &[], usize::MAX, &budget()).expect("series");
    let cut = series(&idx, &[], 100, &budget()).expect("series");
    assert!(cut.truncated);
    assert_eq!(cut.items.iter().collect::<Vec<_>>(), full.items.iter().take(100).collect::<Vec<_>>());
}

#[test]
fn names_and_values_follow_the_selectors() {
    let idx = index(50);
    let names = names(&idx, &[selector("span_duration_seconds_sum")], usize::MAX, &budget()).expect("names");
    assert_eq!(
        names.items.into_iter().collect::<Vec<_>>(),
        ["__name__", "operation", "service", "span_kind", "status"]
    );
    let with_le = names_all(&idx);
    assert!(with_le.contains(&"le".to_owned()));
    let services = values(&idx, &[], "service", usize::MAX, &budget()).expect("values");
    assert_eq!(services.items.len(), 7);
    let errors = values(
        &idx,
        &[selector("{status=\"error\", service=\"svc-000\"}")],
        "operation",
        usize::MAX,
        &budget(),
    )
    .expect("values");
    // i % 7 == 0 and i % 3 == 0: i in 0, 21, 42.
    assert_eq!(errors.items.into_iter().collect::<Vec<_>>(), ["op-00000", "op-00021", "op-00042"]);
    let les = values(&idx, &[], "le", 3, &budget()).expect("values");
    assert_eq!(les.items.len(), 3);
    assert!(les.truncated);
}

fn names_all(idx: &Index) -> Vec<String> {
    names(idx, &[], usize::MAX, &budget()).expect("names").items.into_iter().collect()
}

#[test]
fn an_expired_or_cancelled_budget_stops_the_walk() {
    let idx = index(10);
    let late = Budget::new(Instant::now() - Duration::from_secs(1));
    assert!(matches!(series(&idx, &[], 10, &late), Err(EvalError::Timeout(_))));
    let b = budget();
    drop(b.cancel_on_drop());
    assert!(matches!(values(&idx, &[], "service", 10, &b), Err(EvalError::Execution(_))));
}
