//! One incident per cascade, root named, at the pager: a real server evaluates a p99 rule over
//! a cascade (payments slow, checkout and frontend waiting on it) and an unrelated slow
//! `search`; the correlator stamps the alerts and a route grouped by `incident` pages twice —
//! once per incident — and a real Alertmanager fed the same stamped alerts groups them the
//! same way.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::alerting::{alerting_config, alertmanager, summarize, Receiver};
use crate::common::*;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, SpanKind};

/// One request of the chain, as spans of (service, operation, kind, peer, ms).
fn request(slow: bool) -> Vec<(&'static str, &'static str, SpanKind, &'static str, i64)> {
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

/// Sends `n` requests started at `start` (ns), as one batch.
async fn send(grpc: SocketAddr, client_id: u64, start: i64, n: i64, slow: bool) {
    let mut groups = Vec::new();
    for (service, operation, kind, peer, ms) in request(slow) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_pages_once_naming_its_root_and_an_unrelated_failure_once() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, raddr) = Receiver::start().await;
    let am = peers(&["prometheus-alertmanager"], "prometheus-alertmanager");
    let route = |url: String| {
        format!(
            "route:\n  receiver: pager\n  group_by: [incident]\n  group_wait: 2s\n  group_interval: 3s\n  repeat_interval: 1h\n\
             receivers:\n  - name: pager\n    webhook_configs:\n      - url: {url}\n"
        )
    };
    let _am = match &am {
        Some(found) => {
            let am_dir = dir.path().join("am");
            std::fs::create_dir_all(&am_dir).unwrap();
            Some(alertmanager(&found[0], &am_dir, &route(format!("http://{raddr}/am"))).await)
        }
        None => None,
    };
    let rules = r#"
groups:
  - name: tail
    interval: 1s
    rules:
      - alert: HighP99Latency
        expr: histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[30s]))) > 0.5
        labels: {severity: page}
"#;
    let mut config = alerting_config(dir.path(), rules, &route(format!("http://{raddr}/hook")));
    config.alerting.incidents.enabled = true;
    config.alerting.incidents.window = Duration::from_secs(20);
    config.alerting.incidents.baseline = Duration::from_secs(300);
    config.alerting.incidents.refresh = Duration::from_millis(500);
    if let Some((_, addr)) = &_am {
        config.alerting.alertmanager_urls = vec![format!("http://{addr}")];
    }
    let server = start_with(config, Arc::new(tailscope_server::clock::SystemClock)).await;
    let grpc = server.grpc_addr();
    // The baseline: healthy requests over the four minutes before the last half minute.
    let now = now_nanos();
    for minute in 0..4 {
        send(grpc, 100 + minute, now - (270 - 60 * minute as i64) * 1_000_000_000, 200, false).await;
    }
    // The cascade, held until both incidents have paged.
    let mut client = 200;
    let started = Instant::now();
    while receiver.bodies("/hook").len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "pages: {:#?}", receiver.bodies("/hook"));
        send(grpc, client, now_nanos() - 1_000_000_000, 50, true).await;
        client += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Three more group intervals of the same cascade: nothing new to say.
    let quiet_until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < quiet_until {
        send(grpc, client, now_nanos() - 1_000_000_000, 50, true).await;
        client += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pages = receiver.bodies("/hook");
    assert_eq!(pages.len(), 2, "one page per incident: {pages:#?}");
    let page_of = |root: &str| -> &Value {
        pages
            .iter()
            .find(|p| p["commonAnnotations"]["root_service"] == root)
            .unwrap_or_else(|| panic!("{pages:#?}"))
    };
    let cascade = page_of("payments");
    let alerts = cascade["alerts"].as_array().unwrap();
    let mut roles: Vec<(String, String)> = alerts
        .iter()
        .map(|a| {
            (
                a["labels"]["service"].as_str().unwrap().to_owned(),
                a["annotations"]["incident_role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    roles.sort();
    assert_eq!(
        roles,
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
    let search = page_of("search");
    assert_eq!(search["alerts"].as_array().unwrap().len(), 1, "{search}");
    assert_eq!(search["alerts"][0]["labels"]["service"], "search");

    let listed = get_json(server.http_addr(), "/api/v1/incidents").await;
    let listed = listed["data"]["incidents"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 2, "{listed:#?}");
    assert!(listed.iter().any(|i| i["id"] == incident
        && i["root_service"] == "payments"
        && i["alerts"].as_array().unwrap().len() == 3));

    if _am.is_some() {
        // The same stamped alerts, grouped by a real Alertmanager: the same groups, keys and
        // alert fingerprints.
        let deadline = Instant::now() + Duration::from_secs(30);
        while receiver.bodies("/am").len() < 2 {
            assert!(Instant::now() < deadline, "Alertmanager pages: {:#?}", receiver.bodies("/am"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(summarize(&receiver.bodies("/am")), summarize(&pages));
    }
    server.shutdown().await;
}
