//! One incident per cascade, root named, at the pager: a real server evaluates a p99 rule over
//! a cascade (payments slow, checkout and frontend waiting on it) and an unrelated slow
//! `search`; the correlator stamps the alerts and a route grouped by `incident` pages twice —
//! once per incident — and a real Alertmanager fed the same stamped alerts groups them the
//! same way; when the cascade ends, the resolves arrive in the same two groups. A middle root (a caller's own code slow, its callee healthy) and a virtual root
//! (calls to an uninstrumented database slow) are named as such.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::alerting::{alerting_config, alertmanager, summarize, write, Receiver};
use crate::common::*;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, SpanKind};

/// A span of one request: (service, operation, kind, peer, ms).
type Hop = (&'static str, &'static str, SpanKind, &'static str, i64);

/// One request of the chain frontend → checkout → payments, payments' own code slow; and of
/// the unrelated `search`.
fn leaf_root(slow: bool) -> Vec<Hop> {
    let (p, s) = if slow { (2_000, 1_500) } else { (50, 40) };
    vec![
        ("payments", "Charge", SpanKind::Server, "checkout", p),
        ("checkout", "Charge", SpanKind::Client, "payments", p + 2),
        ("checkout", "POST /checkout", SpanKind::Server, "frontend", p + 10),
        ("frontend", "POST /checkout", SpanKind::Client, "checkout", p + 12),
        ("frontend", "GET /buy", SpanKind::Server, "", p + 30),
        ("search", "GET /search", SpanKind::Server, "", s),
    ]
}

/// One request of web → orders → stock, orders' own code slow (stock healthy); and of
/// shop → cart → db:postgres, cart's queries slow.
fn middle_and_virtual_roots(slow: bool) -> Vec<Hop> {
    let (own, query) = if slow { (2_000, 1_900) } else { (60, 4) };
    vec![
        ("stock", "Reserve", SpanKind::Server, "orders", 40),
        ("orders", "Reserve", SpanKind::Client, "stock", 42),
        ("orders", "POST /order", SpanKind::Server, "web", own),
        ("web", "POST /order", SpanKind::Client, "orders", own + 2),
        ("web", "GET /buy", SpanKind::Server, "", own + 20),
        ("cart", "SELECT cart", SpanKind::Client, "db:postgres", query),
        ("cart", "GET /cart", SpanKind::Server, "shop", query + 16),
        ("shop", "GET /cart", SpanKind::Client, "cart", query + 18),
        ("shop", "GET /", SpanKind::Server, "", query + 36),
    ]
}

/// Sends `n` requests started at `start` (ns), as one batch.
async fn send(grpc: SocketAddr, client_id: u64, start: i64, n: i64, hops: Vec<Hop>) {
    let mut groups = Vec::new();
    for (service, operation, kind, peer, ms) in hops {
        let spans = (0..n).map(|i| span(start + i * 1_000_000, ms * 1_000_000, false)).collect();
        let key = SeriesKey {
            service: service.into(),
            operation: operation.into(),
            kind: kind as i32,
            peer: peer.into(),
        };
        groups.push(SeriesGroup { key: Some(key), spans });
    }
    let mut s = open(grpc).await;
    s.send(batch(client_id, 1, groups)).await;
    s.wait_acked(1).await;
}

/// The alert rule of these tests: a p99 over half a second, per service.
const RULES: &str = r#"
groups:
  - name: tail
    interval: 1s
    rules:
      - alert: HighP99Latency
        expr: histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[30s]))) > 0.5
        labels: {severity: page}
"#;

/// The pager's route: one group per incident.
fn route(url: String) -> String {
    format!(
        "route:\n  receiver: pager\n  group_by: [incident]\n  group_wait: 2s\n  group_interval: 3s\n  repeat_interval: 1h\n\
         receivers:\n  - name: pager\n    webhook_configs:\n      - url: {url}\n"
    )
}

/// Requests of one scenario sent to a server, healthy or slow.
struct Traffic {
    grpc: SocketAddr,
    requests: fn(bool) -> Vec<Hop>,
    /// The next stream's client id.
    client: u64,
}

impl Traffic {
    /// Healthy requests over the four minutes before the last half minute.
    async fn baseline(&mut self) {
        let now = now_nanos();
        for minute in 0..4 {
            let start = now - (270 - 60 * minute) * 1_000_000_000;
            send(self.grpc, 100 + minute as u64, start, 200, (self.requests)(false)).await;
        }
    }

    /// One batch of requests, slow or healthy, ended a second ago.
    async fn batch(&mut self, slow: bool) {
        send(self.grpc, self.client, now_nanos() - 1_000_000_000, 50, (self.requests)(slow)).await;
        self.client += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// Slow requests until `done` (at most a minute).
    async fn slow_until(&mut self, done: impl FnMut() -> bool) {
        self.until(true, Duration::from_secs(60), done).await;
    }

    /// Slow or healthy requests until `done`, at most `within`.
    async fn until(&mut self, slow: bool, within: Duration, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(
                started.elapsed() < within,
                "not done within {within:?} of {} requests",
                ["healthy", "slow"][usize::from(slow)]
            );
            self.batch(slow).await;
        }
    }

    /// Slow requests for `d`.
    async fn slow_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.batch(true).await;
        }
    }
}

/// The incident ids of `pages`, sorted.
fn incident_ids(pages: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> =
        pages.iter().map(|p| p["groupLabels"]["incident"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

/// What a run of [`cascade`] leaves: the pages, the server (still running) and the
/// Alertmanager's, when one was found.
struct Paged {
    pages: Vec<Value>,
    traffic: Traffic,
    server: tailscope_server::Server,
    receiver: Receiver,
    alertmanager: bool,
    _dir: tempfile::TempDir,
    _am: Option<(Peer, String)>,
}

/// A server with a p99 rule per service and incidents on, routed `group_by: [incident]` to a
/// receiver (and a real Alertmanager beside it, when installed, fed the same alerts): four
/// minutes of healthy baseline of `requests`, then the slow ones until two pages arrived,
/// then three more group intervals of the same.
async fn cascade(requests: fn(bool) -> Vec<Hop>) -> Paged {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let am = peers(&["prometheus-alertmanager"], "prometheus-alertmanager");
    let am = match &am {
        Some(found) => {
            let am_dir = dir.path().join("am");
            std::fs::create_dir_all(&am_dir).unwrap();
            Some(alertmanager(&found[0], &am_dir, &route(format!("http://{raddr}/am"))).await)
        }
        None => None,
    };
    let mut config = alerting_config(dir.path(), RULES, &route(format!("http://{raddr}/hook")));
    config.alerting.incidents.enabled = true;
    config.alerting.incidents.window = Duration::from_secs(20);
    config.alerting.incidents.baseline = Duration::from_secs(300);
    config.alerting.incidents.refresh = Duration::from_millis(500);
    if let Some((_, addr)) = &am {
        config.alerting.alertmanager_urls = vec![format!("http://{addr}")];
    }
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let mut traffic = Traffic { grpc: server.grpc_addr(), requests, client: 200 };
    traffic.baseline().await;
    // The cascade, held until both incidents have paged...
    traffic.slow_until(|| receiver.bodies("/hook").len() >= 2).await;
    // ...and three more group intervals of the same: nothing new to say.
    traffic.slow_for(Duration::from_secs(9)).await;
    let pages = receiver.bodies("/hook");
    Paged { pages, traffic, server, receiver, alertmanager: am.is_some(), _dir: dir, _am: am }
}

impl Paged {
    /// The page whose incident `root` is the root of.
    fn of(&self, root: &str) -> &Value {
        self.pages
            .iter()
            .find(|p| p["commonAnnotations"]["root_service"] == root)
            .unwrap_or_else(|| panic!("no page rooted at {root}: {:#?}", self.pages))
    }

    /// Each alert's (service, incident_role) in `page`, sorted.
    fn roles(page: &Value) -> Vec<(String, String)> {
        let mut roles: Vec<(String, String)> = page["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["service"].as_str().unwrap().to_owned(),
                    a["annotations"]["incident_role"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        roles.sort();
        roles
    }

    /// The same stamped alerts, grouped by a real Alertmanager: the same groups, keys and
    /// alert fingerprints.
    async fn alertmanager_agrees(&self) {
        if !self.alertmanager {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.receiver.bodies("/am").len() < self.pages.len() {
            assert!(Instant::now() < deadline, "Alertmanager pages: {:#?}", self.receiver.bodies("/am"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(summarize(&self.receiver.bodies("/am")), summarize(&self.pages));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_pages_once_naming_its_root_and_an_unrelated_failure_once() {
    let mut run = cascade(leaf_root).await;
    let pages = &run.pages;
    assert_eq!(pages.len(), 2, "one page per incident: {pages:#?}");
    let cascade = run.of("payments");
    let alerts = cascade["alerts"].as_array().unwrap();
    assert_eq!(
        Paged::roles(cascade),
        [
            ("checkout".into(), "symptom".into()),
            ("frontend".into(), "symptom".into()),
            ("payments".into(), "root".into())
        ]
    );
    let incident = cascade["groupLabels"]["incident"].as_str().unwrap();
    assert!(incident.starts_with("payments-"), "{cascade}");
    assert_eq!(cascade["groupKey"], format!("{{}}:{{incident=\"{incident}\"}}"));
    let checkout = alerts.iter().find(|a| a["labels"]["service"] == "checkout").unwrap();
    let blame = checkout["annotations"]["blame"].as_str().unwrap();
    assert!(blame.starts_with("checkout→payments p99 "), "{blame}");
    let search = run.of("search");
    assert_eq!(search["alerts"].as_array().unwrap().len(), 1, "{search}");
    assert_eq!(search["alerts"][0]["labels"]["service"], "search");

    let listed = get_json(run.server.http_addr(), "/api/v1/incidents").await;
    let listed = listed["data"]["incidents"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 2, "{listed:#?}");
    assert!(listed.iter().any(|i| i["id"] == incident
        && i["root_service"] == "payments"
        && i["alerts"].as_array().unwrap().len() == 3));
    run.alertmanager_agrees().await;

    // The cascade ends: healthy requests until each incident's group last said "resolved".
    // The resolves arrive in the same two groups, nothing else does, and every alert is
    // resolved in the end.
    let paged_keys: BTreeSet<String> = group_keys(pages);
    let receiver = &run.receiver;
    let all_resolved = || {
        let bodies = receiver.bodies("/hook");
        paged_keys.iter().all(|key| {
            bodies
                .iter()
                .rev()
                .find(|b| b["groupKey"] == key.as_str())
                .is_some_and(|b| b["status"] == "resolved")
        })
    };
    run.traffic.until(false, Duration::from_secs(120), all_resolved).await;
    let bodies = run.receiver.bodies("/hook");
    assert_eq!(group_keys(&bodies), paged_keys, "{bodies:#?}");
    for key in &paged_keys {
        let last = bodies.iter().rev().find(|b| b["groupKey"] == key.as_str()).unwrap();
        let alerts = last["alerts"].as_array().unwrap();
        assert!(alerts.iter().all(|a| a["status"] == "resolved"), "{last:#}");
        let want = if key.contains("payments-") { 3 } else { 1 };
        assert_eq!(alerts.len(), want, "{last:#}");
    }
    run.server.shutdown().await;
}

/// The group keys of `bodies`.
fn group_keys(bodies: &[Value]) -> BTreeSet<String> {
    bodies.iter().map(|b| b["groupKey"].as_str().unwrap().to_owned()).collect()
}

/// web → orders → stock with orders' own code slow: one incident rooted at orders, web its
/// symptom, stock (healthy) absent. shop → cart → db:postgres with cart's queries slow: one
/// incident rooted at the uninstrumented database, both services its symptoms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_root_and_an_uninstrumented_root_are_named() {
    let run = cascade(middle_and_virtual_roots).await;
    assert_eq!(run.pages.len(), 2, "one page per incident: {:#?}", run.pages);
    let middle = run.of("orders");
    assert_eq!(Paged::roles(middle), [("orders".into(), "root".into()), ("web".into(), "symptom".into())]);
    assert_eq!(middle["commonAnnotations"]["root_kind"], "service", "{middle}");
    let database = run.of("db:postgres");
    assert_eq!(
        Paged::roles(database),
        [("cart".into(), "symptom".into()), ("shop".into(), "symptom".into())]
    );
    assert_eq!(database["commonAnnotations"]["root_kind"], "virtual", "{database}");
    let cart =
        database["alerts"].as_array().unwrap().iter().find(|a| a["labels"]["service"] == "cart").unwrap();
    let blame = cart["annotations"]["blame"].as_str().unwrap();
    assert!(blame.starts_with("cart→db:postgres p99 "), "{blame}");
    run.alertmanager_agrees().await;
    run.server.shutdown().await;
}

/// A server killed by SIGKILL mid-incident comes back with the same incidents: after the
/// restart the cascade goes on for three group intervals, and nobody is paged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_incident_keeps_its_incidents_and_pages_nobody_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let rules = write(dir.path(), "rules.yml", RULES);
    let notifier = write(dir.path(), "alertmanager.yml", &route(format!("http://{raddr}/hook")));
    let toml = format!(
        "[alerting]\nrule_files = [{:?}]\nalertmanager_config = {:?}\nresend_delay = \"1s\"\n\n\
         [alerting.incidents]\nenabled = true\nwindow = \"20s\"\nbaseline = \"300s\"\nrefresh = \"500ms\"\n",
        rules.display().to_string(),
        notifier.display().to_string()
    );
    let file = write(dir.path(), "tailscope.toml", &toml).display().to_string();
    let env = [("TAILSCOPE_CONFIG", file.as_str())];
    let data = dir.path().join("data");
    let (child, grpc, _) = spawn_server(&data, &env);
    let mut child = Peer(child);
    let mut traffic = Traffic { grpc, requests: leaf_root, client: 200 };
    traffic.baseline().await;
    traffic.slow_until(|| receiver.bodies("/hook").len() >= 2).await;
    let paged = incident_ids(&receiver.bodies("/hook"));
    assert!(paged[0].starts_with("payments-") && paged[1].starts_with("search-"), "{paged:?}");

    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let (restarted, grpc, http) = spawn_server(&data, &env);
    let _child = Peer(restarted);
    traffic.grpc = grpc;
    traffic.slow_for(Duration::from_secs(9)).await;
    // The restarted server did evaluate: its four alerts fire again, stamped with the same
    // incidents (so the quiet receiver below is the dedup, not a server that said nothing).
    // The notifier's alerts (Alertmanager's API), where the stamps are.
    let alerts = get_json(http, "/api/v2/alerts").await;
    let mut firing: Vec<(String, String)> = alerts
        .as_array()
        .unwrap_or_else(|| panic!("{alerts}"))
        .iter()
        .filter(|a| a["status"]["state"] == "active")
        .map(|a| {
            let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_owned();
            (label("service"), label("incident"))
        })
        .collect();
    firing.sort();
    let cascade = |s: &str| (s.to_owned(), paged[0].clone());
    assert_eq!(
        firing,
        [
            cascade("checkout"),
            cascade("frontend"),
            cascade("payments"),
            ("search".to_owned(), paged[1].clone())
        ],
        "{alerts:#}"
    );
    let pages = receiver.bodies("/hook");
    assert_eq!(pages.len(), 2, "paged again after the restart: {pages:#?}");
    let listed = get_json(http, "/api/v1/incidents").await;
    let mut ids: Vec<String> = listed["data"]["incidents"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, paged, "{listed:#}");
}

/// With `inhibit_symptoms`, a per-team route beside the incident route pages a team only for
/// the incidents rooted at its services: the incident's page tells of the symptoms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symptoms_are_muted_in_routes_that_do_not_group_by_incident() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let notifier = format!(
        "route:\n  receiver: pager\n  group_by: [incident]\n  group_wait: 1s\n  group_interval: 2s\n  repeat_interval: 1h\n  routes:\n\
         \x20   - receiver: pager\n      continue: true\n\
         \x20   - receiver: team\n      group_by: [service]\n      matchers: ['service=~\"checkout|payments\"']\n\
         receivers:\n  - name: pager\n    webhook_configs:\n      - url: http://{raddr}/pager\n\
         \x20 - name: team\n    webhook_configs:\n      - url: http://{raddr}/team\n"
    );
    let mut config = alerting_config(dir.path(), "groups: []\n", &notifier);
    config.alerting.incidents.enabled = true;
    config.alerting.incidents.inhibit_symptoms = true;
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let alert = |service: &str, role: &str| {
        serde_json::json!({
            "labels": {"alertname": "HighP99Latency", "service": service, "incident": "payments-1764504000"},
            "annotations": {"incident_role": role, "root_service": "payments"},
        })
    };
    let alerts = serde_json::json!([
        alert("payments", "root"),
        alert("checkout", "symptom"),
        alert("frontend", "symptom")
    ]);
    let posted = reqwest::Client::new()
        .post(format!("http://{}/api/v2/alerts", server.http_addr()))
        .json(&alerts)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.bodies("/pager").is_empty() || receiver.bodies("/team").is_empty() {
        assert!(Instant::now() < deadline, "pages: {:#?}", receiver.bodies("/pager"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two more group intervals: checkout's team group has only a muted symptom to tell.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let services = |path: &str| -> Vec<Vec<String>> {
        receiver
            .bodies(path)
            .iter()
            .map(|b| {
                let mut s: Vec<String> = b["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a["labels"]["service"].as_str().unwrap().to_owned())
                    .collect();
                s.sort();
                s
            })
            .collect()
    };
    assert_eq!(services("/pager"), [["checkout", "frontend", "payments"]]);
    assert_eq!(services("/team"), [["payments"]]);
    server.shutdown().await;
}
