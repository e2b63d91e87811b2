use super::*;
use crate::alerting::fingerprint;
use crate::alerting::matchers::{Matcher, Op};

fn alert(pairs: &[(&str, &str)], ends_at: i64) -> Alert {
    Alert {
        labels: pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        annotations: Labels::new(),
        starts_at: 0,
        ends_at,
        generator_url: String::new(),
    }
}

fn rule() -> InhibitRule {
    InhibitRule {
        source: vec![Matcher::new("severity", Op::Equal, "page").expect("matcher")],
        target: vec![Matcher::new("severity", Op::Equal, "ticket").expect("matcher")],
        equal: vec!["service".into()],
    }
}

/// The scan the index replaces, as the reference.
fn scan(rules: &[InhibitRule], alerts: &[Alert], target: &Alert, now: i64) -> Vec<u64> {
    let mut out: Vec<u64> = alerts
        .iter()
        .filter(|s| fingerprint(&s.labels) != fingerprint(&target.labels) && !s.resolved(now))
        .filter(|s| {
            rules.iter().any(|r| {
                r.target.iter().all(|m| m.matches(&target.labels))
                    && r.source.iter().all(|m| m.matches(&s.labels))
                    && r.equal.iter().all(|l| s.labels.get(l) == target.labels.get(l))
            })
        })
        .map(|s| fingerprint(&s.labels))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[test]
fn the_index_answers_what_a_scan_of_every_alert_answers() {
    let rules = vec![rule(), InhibitRule { equal: vec![], ..rule() }];
    let mut alerts = Vec::new();
    for i in 0..60 {
        let service = format!("s{}", i % 7);
        let severity = if i % 3 == 0 { "page" } else { "ticket" };
        let mut a = alert(&[("alertname", &format!("A{i}")), ("severity", severity)], 1_000 + i * 10);
        if i % 5 != 0 {
            a.labels.insert("service".into(), service);
        }
        alerts.push(a);
    }
    let index = InhibitIndex::build(&rules, alerts.iter().map(|a| (fingerprint(&a.labels), a)));
    for now in [0, 1_200, 1_400, 5_000] {
        for target in &alerts {
            let got = index.inhibitors(&rules, fingerprint(&target.labels), target, now);
            assert_eq!(got, scan(&rules, &alerts, target, now), "{target:?} at {now}");
        }
    }
}

#[test]
fn an_update_moves_an_alerts_end() {
    let rules = vec![rule()];
    let page = alert(&[("severity", "page"), ("service", "a")], 100);
    let ticket = alert(&[("severity", "ticket"), ("service", "a")], 1_000);
    let mut index = InhibitIndex::build(&rules, [(fingerprint(&page.labels), &page)]);
    let t = fingerprint(&ticket.labels);
    assert_eq!(index.inhibitors(&rules, t, &ticket, 50), vec![fingerprint(&page.labels)]);
    assert!(index.inhibitors(&rules, t, &ticket, 150).is_empty(), "the source resolved");
    let renewed = Alert { ends_at: 500, ..page.clone() };
    index.add(&rules, fingerprint(&page.labels), &renewed);
    assert_eq!(index.inhibitors(&rules, t, &ticket, 150).len(), 1);
    // Missing and empty `equal` labels differ, as in the scan.
    let other = alert(&[("severity", "ticket"), ("service", "")], 1_000);
    assert!(index.inhibitors(&rules, fingerprint(&other.labels), &other, 150).is_empty());
}
