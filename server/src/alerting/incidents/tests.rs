use super::blame::Tail;
use super::*;

const T0: i64 = 1_800_000_000_000;

fn alert(name: &str, service: &str, starts_at: i64, ends_at: i64) -> Alert {
    Alert {
        labels: [("alertname", name), ("service", service), ("severity", "page")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        annotations: Labels::new(),
        starts_at,
        ends_at,
        generator_url: String::new(),
    }
}

fn firing(service: &str) -> Alert {
    alert("HighP99Latency", service, T0, T0 + 600_000)
}

fn tails(services: &[(&str, f64, f64)], edges: &[(&str, &str, f64, f64)]) -> Tails {
    Tails {
        services: services.iter().map(|&(s, b, n)| (s.to_owned(), Tail { now: n, base: Some(b) })).collect(),
        edges: edges
            .iter()
            .map(|&(c, s, b, n)| ((c.to_owned(), s.to_owned()), Tail { now: n, base: Some(b) }))
            .collect(),
        calls_per_request: Default::default(),
        selfs: Default::default(),
    }
}

/// payments slow (and its callers waiting on it); search slow on its own.
fn leaf_cascade() -> Tails {
    tails(
        &[("frontend", 0.08, 2.03), ("checkout", 0.06, 2.01), ("payments", 0.05, 2.0), ("search", 0.04, 1.5)],
        &[("frontend", "checkout", 0.062, 2.012), ("checkout", "payments", 0.052, 2.002)],
    )
}

fn by_label<'a>(alerts: &'a [Alert], service: &str) -> &'a Alert {
    alerts.iter().find(|a| a.labels["service"] == service).expect("the service's alert")
}

#[test]
fn a_cascade_is_one_incident_with_its_root_named_and_an_unrelated_failure_another() {
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let mut stamps = HashMap::new();
    let alerts = ["frontend", "checkout", "payments", "search"].map(firing).to_vec();
    let (out, writes) = stamp(&mut stamps, alerts, &leaf_cascade(), &config, T0 + 1000);
    assert_eq!(writes.len(), 4);
    let incident = |s: &str| by_label(&out, s).labels["incident"].clone();
    let id = format!("payments-{}", T0 / 1000);
    for s in ["frontend", "checkout", "payments"] {
        assert_eq!(incident(s), id, "{s}");
        let a = by_label(&out, s).annotations.clone();
        assert_eq!(a["root_service"], "payments");
        assert_eq!(a["root_kind"], "service");
        assert_eq!(a["incident_role"], if s == "payments" { "root" } else { "symptom" });
        assert_eq!(a["incident_services"], "checkout, frontend, payments");
    }
    assert_eq!(by_label(&out, "checkout").annotations["blame"], "checkout→payments p99 52ms → 2s (+1.95s)");
    // The root's annotation says why: its own rise, and no call explains it.
    assert_eq!(by_label(&out, "payments").annotations["blame"], "payments p99 50ms → 2s (+1.95s)");
    assert_eq!(incident("search"), format!("search-{}", T0 / 1000));
    assert_eq!(by_label(&out, "search").annotations["incident_role"], "root");

    // Unchanged on a resend, and nothing written again within the minute.
    let again = ["frontend", "checkout", "payments", "search"].map(firing).to_vec();
    let (out2, writes) = stamp(&mut stamps, again, &leaf_cascade(), &config, T0 + 2000);
    assert_eq!(out2, out);
    assert!(writes.is_empty());

    // Resolved: the same labels, so the same alerts resolve.
    let resolved = alert("HighP99Latency", "payments", T0, T0 + 5000);
    let (out3, writes) = stamp(&mut stamps, vec![resolved], &Tails::default(), &config, T0 + 6000);
    assert_eq!(out3[0].labels["incident"], id);
    assert_eq!(writes.len(), 1);
    let listed = incidents_of(&stamps);
    let cascade = listed.iter().find(|i| i.id == id).expect("listed");
    assert_eq!(
        (cascade.root_service.as_str(), cascade.state, cascade.alerts.len()),
        ("payments", "firing", 3)
    );
    assert_eq!(cascade.alerts[0].role, "root");
}

#[test]
fn staggered_alerts_join_and_a_rerooted_incident_keeps_its_id() {
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let mut stamps = HashMap::new();
    // frontend fires first, while only checkout's own tail explains it.
    let early = tails(
        &[("frontend", 0.08, 1.0), ("checkout", 0.06, 0.98), ("payments", 0.05, 0.06)],
        &[("frontend", "checkout", 0.062, 0.99), ("checkout", "payments", 0.052, 0.06)],
    );
    let (out, _) = stamp(&mut stamps, vec![firing("frontend")], &early, &config, T0);
    let id = out[0].labels["incident"].clone();
    assert_eq!(id, format!("checkout-{}", T0 / 1000));
    assert_eq!(out[0].annotations["root_service"], "checkout");
    // Then the cascade shows payments as the root: frontend keeps its id, re-rooted, and
    // checkout and payments join it.
    let later = [firing("frontend"), firing("checkout"), firing("payments")].to_vec();
    let (out, _) = stamp(&mut stamps, later, &leaf_cascade(), &config, T0 + 40_000);
    for a in &out {
        assert_eq!(a.labels["incident"], id, "{:?}", a.labels);
        assert_eq!(a.annotations["root_service"], "payments");
    }
}

#[test]
fn incidents_rerooted_onto_one_root_are_one_incident_named_after_it() {
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let mut stamps = HashMap::new();
    let ticket = |s: &str| alert("SloBurn", s, T0, T0 + 600_000);
    // First each service's tail rises with no call to explain it: three incidents, each its own
    // root.
    let apart = tails(&[("frontend", 0.08, 0.6), ("checkout", 0.06, 0.58), ("payments", 0.05, 0.57)], &[]);
    let first = ["checkout", "frontend", "payments"].map(ticket).to_vec();
    let (out, _) = stamp(&mut stamps, first, &apart, &config, T0);
    let own: Vec<String> = out.iter().map(|a| a.labels["incident"].clone()).collect();
    let payments = format!("payments-{}", T0 / 1000);
    assert_eq!(own, ["checkout", "frontend", "payments"].map(|s| format!("{s}-{}", T0 / 1000)));
    // Then the cascade blames payments. The pages, sent in the same batch as the tickets' resend
    // and ahead of them, join the incident named after payments whatever the ids' order; the
    // tickets keep their labels (their fingerprints must not change) and are listed inside it.
    let page = |s: &str| alert("HighP99Latency", s, T0 + 30_000, T0 + 600_000);
    let mut later: Vec<Alert> = ["frontend", "checkout", "payments"].map(page).to_vec();
    later.extend(["checkout", "frontend", "payments"].map(ticket));
    let (out, writes) = stamp(&mut stamps, later, &leaf_cascade(), &config, T0 + 30_000);
    assert!(!writes.is_empty());
    for a in &out {
        assert_eq!(a.annotations["root_service"], "payments", "{:?}", a.labels);
        assert_eq!(a.annotations["incident_services"], "checkout, frontend, payments");
        if a.labels["alertname"] == "SloBurn" {
            assert_eq!(a.labels["incident"], format!("{}-{}", a.labels["service"], T0 / 1000));
        } else {
            assert_eq!(a.labels["incident"], payments, "{:?}", a.labels);
        }
    }
    let listed = incidents_of(&stamps);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].id.as_str(), listed[0].root_service.as_str()), (payments.as_str(), "payments"));
    assert_eq!(listed[0].labels, own);
    assert_eq!(listed[0].alerts.len(), 6);
    // The merge is kept: a store restored from these stamps lists the same one incident.
    let restored: HashMap<u64, Stamp> = stamps
        .iter()
        .map(|(fp, s)| (*fp, serde_json::from_slice(&serde_json::to_vec(s).unwrap()).unwrap()))
        .collect();
    assert_eq!(incidents_of(&restored), listed);
}

#[test]
fn a_new_alert_ahead_of_its_rerooted_incident_in_one_batch_joins_it() {
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let mut stamps = HashMap::new();
    let early = tails(&[("frontend", 0.08, 1.0)], &[]);
    let (out, _) = stamp(&mut stamps, vec![firing("frontend")], &early, &config, T0);
    let id = out[0].labels["incident"].clone();
    assert_eq!(id, format!("frontend-{}", T0 / 1000));
    // payments' alert comes first in the batch that re-roots frontend's onto payments.
    let later = vec![firing("payments"), firing("frontend")];
    let (out, _) = stamp(&mut stamps, later, &leaf_cascade(), &config, T0 + 40_000);
    for a in &out {
        assert_eq!(a.labels["incident"], id, "{:?}", a.labels);
    }
    assert_eq!(incidents_of(&stamps).len(), 1);
}

#[test]
fn alerts_without_a_service_or_already_stamped_pass_untouched() {
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let mut stamps = HashMap::new();
    let mut plain = firing("x");
    plain.labels.remove("service");
    let mut stamped = firing("y");
    stamped.labels.insert("incident".into(), "given".into());
    let never_firing = alert("A", "z", T0, T0 + 1);
    let input = vec![plain, stamped, never_firing];
    let (out, writes) = stamp(&mut stamps, input.clone(), &leaf_cascade(), &config, T0 + 10);
    assert_eq!(out, input);
    assert!(writes.is_empty() && stamps.is_empty());
}

#[test]
fn an_uninstrumented_root_is_named_as_virtual() {
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let t = tails(&[("checkout", 0.06, 2.0)], &[("checkout", "db:postgres", 0.004, 1.95)]);
    let (out, _) = stamp(&mut HashMap::new(), vec![firing("checkout")], &t, &config, T0);
    assert_eq!(out[0].labels["incident"], format!("db:postgres-{}", T0 / 1000));
    assert_eq!(out[0].annotations["root_kind"], "virtual");
    assert_eq!(out[0].annotations["incident_role"], "symptom");
}

/// The stage end to end over an in-memory store: stamps persist, and a restarted stage gives
/// the same alerts the same incident.
#[tokio::test]
async fn stamps_survive_a_restart() {
    use crate::clock::ManualClock;
    use crate::store::MemoryStore;

    #[derive(Debug, Default)]
    struct Capture(Mutex<Vec<Alert>>);
    impl Sink for Capture {
        fn send(&self, alerts: Vec<Alert>) {
            self.0.lock().extend(alerts);
        }
    }
    let store = Arc::new(MemoryStore::default());
    let env = Environment {
        sources: store.clone(),
        state: store.clone(),
        retention: RetentionConfig::default(),
        clock: Arc::new(ManualClock::new(T0 * 1_000_000)),
        metrics: Arc::new(Metrics::default()),
    };
    let config = IncidentsConfig { enabled: true, ..IncidentsConfig::default() };
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..2 {
        let capture = Arc::new(Capture::default());
        let (_stop, stop) = tokio::sync::watch::channel(false);
        let (c, task) = Correlator::start(config.clone(), env.clone(), capture.clone(), 16, stop);
        // What the first run stamped is there before anything is sent again.
        let restored: Vec<String> = c.incidents().into_iter().map(|i| i.id).collect();
        assert_eq!(restored, seen);
        c.send(vec![firing("checkout")]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while capture.0.lock().is_empty() {
            assert!(Instant::now() < deadline, "nothing passed the stage");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen.push(capture.0.lock()[0].labels["incident"].clone());
        assert_eq!(c.incidents().len(), 1);
        task.abort();
    }
    assert_eq!(seen[0], seen[1]);
}
