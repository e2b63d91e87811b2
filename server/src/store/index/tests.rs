use promql_parser::label::Matcher;

use super::*;

fn labels(service: &str, operation: &str, status: Status) -> SeriesLabels {
    SeriesLabels::new(service, operation, status)
}

/// 7 services × 40 operations × both statuses, plus one series with an empty service.
fn filled() -> (SeriesIndex, Vec<(u64, SeriesLabels)>) {
    let index = SeriesIndex::default();
    let mut all = Vec::new();
    for s in 0..7 {
        for o in 0..40 {
            for status in [Status::Ok, Status::Error] {
                let l = labels(&format!("svc-{s}"), &format!("op-{o:02}"), status);
                all.push((l.id(), l));
            }
        }
    }
    let l = labels("", "orphan", Status::Ok);
    all.push((l.id(), l));
    index.extend(all.iter().map(|(id, l)| (*id, l.clone(), 10)));
    all.sort_unstable_by_key(|(id, _)| *id);
    (index, all)
}

/// The label matchers of a selector written in PromQL.
fn sel(text: &str) -> Vec<Matcher> {
    match promql_parser::parser::parse(text).expect("parses") {
        promql_parser::parser::Expr::VectorSelector(vs) => vs.matchers.matchers,
        other => panic!("{other:?}"),
    }
}

#[test]
fn selection_from_posting_lists_equals_a_filter_over_every_series() {
    let (index, all) = filled();
    let cases: Vec<Vec<Matcher>> = [
        r#"x"#,
        r#"x{service="svc-3"}"#,
        r#"x{service="svc-3", operation="op-07"}"#,
        r#"x{operation="op-07", status="error"}"#,
        r#"x{service="nope"}"#,
        r#"x{service=""}"#,
        r#"x{service!="svc-1"}"#,
        r#"x{service=~"svc-[12]"}"#,
        r#"x{operation=~"op-0.*", status!="ok"}"#,
        r#"x{service!~"svc-.*"}"#,
        r#"x{service=~".*"}"#,
        r#"x{region=""}"#,
        r#"x{region="eu"}"#,
        r#"x{service="svc-2", operation=~"op-1[0-4]"}"#,
        r#"x{operation=~"op-3.", service=~"svc-[0-3]", status="ok"}"#,
    ]
    .iter()
    .map(|t| sel(t).into_iter().filter(|m| m.name != "__name__").collect())
    .collect();
    for matchers in &cases {
        let refs: Vec<&Matcher> = matchers.iter().collect();
        let expected: Vec<(u64, SeriesLabels)> = all
            .iter()
            .filter(|(_, l)| refs.iter().all(|m| m.is_match(l.get(&m.name).unwrap_or(""))))
            .cloned()
            .collect();
        assert_eq!(index.select(&refs, usize::MAX), expected, "{matchers:?}");
        // At most n of them: the first n when a posting list gave the candidates, else any n.
        let cut = index.select(&refs, 3);
        assert_eq!(cut.len(), expected.len().min(3), "{matchers:?}");
        assert!(cut.iter().all(|s| expected.contains(s)), "{matchers:?}");
    }
}

#[test]
fn label_values_come_from_the_keys_sorted_and_cut_at_the_limit() {
    let (index, _) = filled();
    let (services, more) = index.values("service", 100);
    assert_eq!(
        services,
        (0..7).map(|s| format!("svc-{s}")).collect::<Vec<_>>(),
        "the empty value is left out"
    );
    assert!(!more);
    let (first, more) = index.values("operation", 3);
    assert_eq!(first, vec!["op-00", "op-01", "op-02"]);
    assert!(more);
    assert_eq!(index.values("status", 10), (vec!["error".to_owned(), "ok".to_owned()], false));
    assert_eq!(index.values("region", 10), (vec![], false));
    assert_eq!(index.values("service", 0), (vec![], true));
}

#[test]
fn series_past_the_horizon_are_retired_and_their_values_with_them() {
    let index = SeriesIndex::default();
    let old = labels("gone", "op", Status::Error);
    let kept = labels("kept", "op", Status::Ok);
    index.extend([(old.id(), old.clone(), 100), (kept.id(), kept.clone(), 100)]);
    // A window in hour 200 moves `kept` forward; nothing is changed until it is applied.
    let newer = index.newer([(kept.id(), 200 * 3600 + 5), (kept.id(), 150 * 3600), (0xdead, 300 * 3600)]);
    assert_eq!(newer, vec![(kept.id(), kept.clone(), 200)]);
    let mut both = vec![old.id(), kept.id()];
    both.sort_unstable();
    assert_eq!(index.expired(150), both);
    index.extend(newer);
    assert_eq!(index.expired(150), vec![old.id()]);
    // A series written since it was named expired is kept.
    assert_eq!(index.retire(&[old.id(), kept.id()], 150), 1);
    assert_eq!(index.all(), vec![(kept.id(), kept)]);
    assert_eq!(index.values("service", 10).0, vec!["kept"]);
    assert_eq!(index.values("status", 10).0, vec!["ok"]);
    let gone = sel(r#"x{service="gone"}"#);
    assert!(index.select(&gone.iter().filter(|m| m.name == "service").collect::<Vec<_>>(), 1).is_empty());
}

#[test]
fn an_hour_is_never_lowered() {
    let index = SeriesIndex::default();
    let l = labels("a", "b", Status::Ok);
    index.extend([(l.id(), l.clone(), 50)]);
    index.extend([(l.id(), l.clone(), 40)]);
    assert_eq!(index.all().len(), 1);
    assert_eq!(index.expired(50), Vec::<u64>::new());
    assert_eq!(index.expired(51), vec![l.id()]);
    assert_eq!(hour_of(-5), 0);
    assert_eq!(hour_of(7200), 2);
}

#[test]
fn a_posting_list_goes_from_one_id_to_a_set_and_back_and_selections_follow() {
    let mut p = Posting::One(5);
    p.insert(5);
    assert!(matches!(p, Posting::One(5)), "the same id twice is held once");
    p.insert(3);
    p.insert(9);
    assert_eq!((p.len(), p.iter().collect::<Vec<_>>()), (3, vec![3, 5, 9]));
    assert!(!p.remove(5));
    assert!(!p.remove(9));
    assert!(matches!(p, Posting::One(3)), "{p:?}");
    assert!(!p.remove(4), "another id leaves it as it is");
    assert!(p.remove(3), "its last id empties it");

    // Through the index: series retired one by one, selections equal to a filter each time.
    let index = SeriesIndex::default();
    let series: Vec<SeriesLabels> = (0..3)
        .flat_map(|o| [Status::Ok, Status::Error].map(|s| labels("svc", &format!("op-{o}"), s)))
        .collect();
    index.extend(series.iter().map(|l| (l.id(), l.clone(), 10)));
    let mut left = series.clone();
    for gone in &series {
        assert_eq!(index.retire(&[gone.id()], 11), 1);
        left.retain(|l| l != gone);
        for text in [r#"x{operation="op-1"}"#, r#"x{service="svc"}"#, r#"x{operation=~"op-[01]"}"#] {
            let matchers = sel(text);
            let refs: Vec<&Matcher> = matchers.iter().filter(|m| m.name != "__name__").collect();
            let mut expected: Vec<(u64, SeriesLabels)> = left
                .iter()
                .filter(|l| refs.iter().all(|m| m.is_match(l.get(&m.name).unwrap_or(""))))
                .map(|l| (l.id(), l.clone()))
                .collect();
            expected.sort_unstable_by_key(|(id, _)| *id);
            assert_eq!(index.select(&refs, usize::MAX), expected, "{text} after retiring {gone:?}");
        }
    }
    assert_eq!(index.values("operation", 10), (vec![], false));
}
