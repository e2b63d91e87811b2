//! Remote write into a real Prometheus (Debian's `prometheus`, started with
//! `--web.enable-remote-write-receiver --enable-feature=native-histograms`): the same spans
//! answer the same quantile queries on both sides — within the classic bucket that holds
//! tailscope's answer, and within 1 % through native histograms — and a target that is
//! unreachable for a while gets everything once it is back, counting what its queue could not
//! hold.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use rand::{Rng, SeedableRng};
use tailscope_server::remote_write::{HistogramForm, RemoteWriteConfig};

fn prometheus_binary() -> Option<PathBuf> {
    peers(&["prometheus"], "prometheus")?.pop()
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A Prometheus receiving remote writes (and native histograms) on `addr`, storing in `dir`.
async fn start_prometheus(bin: &Path, dir: &Path, addr: SocketAddr) -> Peer {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 1m\n").unwrap();
    let log_path = dir.join("prometheus.log");
    let peer = Peer(
        std::process::Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--web.enable-remote-write-receiver")
            .arg("--enable-feature=native-histograms")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    assert_eventually!(
        reqwest::get(format!("http://{addr}/-/ready")).await.is_ok_and(|r| r.status().is_success()),
        "prometheus did not become ready: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    peer
}

/// An instant query now: `("service/operation" or "", value)` per row, sorted.
async fn query(addr: SocketAddr, expr: &str) -> Vec<(String, f64)> {
    let body: serde_json::Value =
        reqwest::get(format!("http://{addr}/api/v1/query?query={}", form_encode(expr)))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(body["status"], "success", "{expr}: {body}");
    let mut rows: Vec<(String, f64)> = body["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let m = &r["metric"];
            let key = match (m["service"].as_str(), m["operation"].as_str()) {
                (Some(s), Some(o)) => format!("{s}/{o}"),
                _ => String::new(),
            };
            (key, r["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn target(name: &str, url: String, form: HistogramForm) -> RemoteWriteConfig {
    RemoteWriteConfig {
        name: name.into(),
        url,
        histograms: form,
        send_interval: Duration::from_secs(1),
        max_backoff: Duration::from_millis(500),
        ..RemoteWriteConfig::default()
    }
}

/// Four series of lognormal durations (medians 5, 20, 80 and 300 ms) over the last 20 s,
/// streamed to `server`; returns how many spans.
async fn send_spans(server: &tailscope_server::Server) -> u64 {
    let mut r = rand::rngs::StdRng::seed_from_u64(11);
    let now = now_nanos();
    let mut s = open(server.grpc_addr()).await;
    let mut total = 0;
    for (i, (service, operation, median_ms)) in
        [("api", "GET /a", 5.0), ("api", "GET /b", 20.0), ("db", "query", 80.0), ("db", "scan", 300.0)]
            .into_iter()
            .enumerate()
    {
        let spans: Vec<_> = (0..3_000i64)
            .map(|k| {
                let z: f64 = (-2.0 * r.gen_range(1e-12f64..1.0).ln()).sqrt()
                    * (r.gen::<f64>() * std::f64::consts::TAU).cos();
                let duration = (median_ms * 1e6 * (0.6 * z).exp()) as i64;
                span(now - 20_000_000_000 + k * 6_000_000, duration, false)
            })
            .collect();
        total += spans.len() as u64;
        s.send(batch(1, i as u64 + 1, vec![group(service, operation, spans)])).await;
    }
    s.wait_acked(4).await;
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fed_by_remote_write_answers_our_quantiles() {
    let Some(bin) = prometheus_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _prometheus = start_prometheus(&bin, &dir.path().join("prometheus"), addr).await;
    let url = format!("http://{addr}/api/v1/write");
    let mut c = config(&dir.path().join("tailscope"));
    c.remote_write = vec![
        target("classic", url.clone(), HistogramForm::Classic),
        target("native", url, HistogramForm::Native),
    ];
    let server = tailscope_server::Server::start(c).await.unwrap();
    let total = send_spans(&server).await;

    let count = |rows: Vec<(String, f64)>| rows.first().map_or(0.0, |r| r.1);
    assert_eventually!(
        within = Duration::from_secs(60);
        count(query(addr, "sum(span_duration_seconds_count)").await) == total as f64
            && count(query(addr, "sum(histogram_count(span_duration_seconds))").await) == total as f64,
        "prometheus never held all {total} spans"
    );
    let ladder = RemoteWriteConfig::default().buckets;
    println!("| series | q | tailscope | Prometheus classic (default ladder) | Prometheus native (schema 7) | native error |");
    println!("|---|---|---|---|---|---|");
    for q in [0.5, 0.99] {
        let ours = query(
            server.http_addr(),
            &format!("histogram_quantile({q}, sum by (service, operation, le) (increase(span_duration_seconds_bucket[5m])))"),
        )
        .await;
        let classic = query(
            addr,
            &format!("histogram_quantile({q}, sum by (service, operation, le) (increase(span_duration_seconds_bucket[5m])))"),
        )
        .await;
        let native = query(
            addr,
            &format!(
                "histogram_quantile({q}, sum by (service, operation) (increase(span_duration_seconds[5m])))"
            ),
        )
        .await;
        assert_eq!(ours.len(), 4, "{ours:?}");
        assert_eq!(
            ours.iter().map(|r| &r.0).collect::<Vec<_>>(),
            classic.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        assert_eq!(
            ours.iter().map(|r| &r.0).collect::<Vec<_>>(),
            native.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        for ((key, want), ((_, c), (_, n))) in ours.iter().zip(classic.iter().zip(&native)) {
            let upper = ladder.iter().copied().find(|&b| b >= *want).unwrap_or(f64::INFINITY);
            let lower = ladder.iter().copied().rev().find(|&b| b < *want).unwrap_or(0.0);
            assert!(
                *c >= lower && *c <= upper,
                "{key} p{q}: classic {c} outside ({lower}, {upper}] around {want}"
            );
            let error = (n - want) / want;
            assert!(
                error.abs() <= 0.01,
                "{key} p{q}: native {n} vs tailscope {want} ({:+.2} %)",
                error * 100.0
            );
            println!(
                "| {key} | {q} | {:.2} ms | {:.2} ms | {:.2} ms | {:+.2} % |",
                want * 1e3,
                c * 1e3,
                n * 1e3,
                error * 100.0
            );
        }
    }
    let text = metrics(server.http_addr()).await;
    assert!(metric(&text, r#"tailscope_remote_write_samples_total{remote="classic"}"#) > 0.0);
    assert!(!text.contains("tailscope_remote_write_samples_dropped_total{"), "{text}");
    server.shutdown().await;
}

/// The target is down for `outage`, then a Prometheus comes up at its address: a target whose
/// queue holds the outage delivers everything and drops nothing; one whose queue is too small
/// counts what it dropped — and both end with every span counted, since samples are
/// cumulative.
async fn an_unreachable_target_loses_nothing_that_fits_the_queue(outage: Duration) {
    let Some(bin) = prometheus_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}/api/v1/write");
    let mut c = config(&dir.path().join("tailscope"));
    c.remote_write = vec![
        target("roomy", url.clone(), HistogramForm::Classic),
        RemoteWriteConfig {
            queue_capacity: 8,
            max_samples_per_send: 4,
            ..target("small", url, HistogramForm::Native)
        },
    ];
    let server = tailscope_server::Server::start(c).await.unwrap();
    let total = send_spans(&server).await;
    tokio::time::sleep(outage).await;
    let text = metrics(server.http_addr()).await;
    assert!(metric(&text, r#"tailscope_remote_write_retries_total{remote="roomy"}"#) > 0.0, "{text}");
    assert!(metric(&text, r#"tailscope_remote_write_queued_samples{remote="roomy"}"#) > 0.0, "{text}");

    let _prometheus = start_prometheus(&bin, &dir.path().join("prometheus"), addr).await;
    let count = |rows: Vec<(String, f64)>| rows.first().map_or(0.0, |r| r.1);
    assert_eventually!(
        within = Duration::from_secs(60);
        count(query(addr, "sum(span_duration_seconds_count)").await) == total as f64
            && count(query(addr, "sum(histogram_count(span_duration_seconds))").await) == total as f64,
        "prometheus never held all {total} spans after the outage"
    );
    let text = metrics(server.http_addr()).await;
    assert!(!text.contains(r#"remote="roomy",reason"#), "the roomy queue dropped: {text}");
    let dropped =
        metric(&text, r#"tailscope_remote_write_samples_dropped_total{remote="small",reason="queue_full"}"#);
    assert!(dropped > 0.0, "{text}");
    println!("outage {outage:?}: roomy target dropped 0, small target dropped {dropped} samples (counted); both exact after");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_for_five_seconds_loses_nothing_that_fits_the_queue() {
    an_unreachable_target_loses_nothing_that_fits_the_queue(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: a minute of outage"]
async fn an_unreachable_target_for_sixty_seconds_loses_nothing_that_fits_the_queue() {
    an_unreachable_target_loses_nothing_that_fits_the_queue(Duration::from_secs(60)).await;
}

/// What a receiver of ours saw: each request's headers and inflated body.
type Seen = std::sync::Arc<parking_lot::Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

/// A receiver answering `status` to every request, keeping what it got.
async fn receiver(status: u16) -> (SocketAddr, Seen) {
    let seen: Seen = Default::default();
    let kept = seen.clone();
    let app = axum::Router::new().route(
        "/api/v1/write",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap_or_default();
                kept.lock().push((headers, raw));
                (axum::http::StatusCode::from_u16(status).unwrap(), "out of bounds")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// The protocol's headers, the target's own (a tenant) and its http_config credentials go with
/// every request; a 4xx drops the request and counts it, a 5xx is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_protocol_headers_and_refusals_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, ok_seen) = receiver(200).await;
    let (refusing, refused_seen) = receiver(400).await;
    let (failing, failing_seen) = receiver(503).await;
    let http_config = dir.path().join("http_config.yml");
    std::fs::write(&http_config, "basic_auth:\n  username: writer\n  password: s3cret\n").unwrap();
    let mut c = config(&dir.path().join("tailscope"));
    c.remote_write = vec![
        RemoteWriteConfig {
            headers: [("X-Scope-OrgID".to_owned(), "team-a".to_owned())].into(),
            http_config_file: http_config,
            ..target("ok", format!("http://{ok}/api/v1/write"), HistogramForm::Classic)
        },
        target("refusing", format!("http://{refusing}/api/v1/write"), HistogramForm::Classic),
        target("failing", format!("http://{failing}/api/v1/write"), HistogramForm::Classic),
    ];
    let server = tailscope_server::Server::start(c).await.unwrap();
    send_spans(&server).await;
    assert_eventually!(
        !ok_seen.lock().is_empty() && !refused_seen.lock().is_empty() && failing_seen.lock().len() >= 3,
        "every receiver was called"
    );
    let (headers, body) = ok_seen.lock()[0].clone();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header("content-encoding").as_deref(), Some("snappy"));
    assert_eq!(header("content-type").as_deref(), Some("application/x-protobuf"));
    assert_eq!(header("x-prometheus-remote-write-version").as_deref(), Some("0.1.0"));
    assert_eq!(header("x-scope-orgid").as_deref(), Some("team-a"));
    assert_eq!(header("authorization").as_deref(), Some("Basic d3JpdGVyOnMzY3JldA=="));
    assert!(body.windows(27).any(|w| w == b"span_duration_seconds_count"), "a WriteRequest of our series");
    // The tenant header went to its own target only.
    assert!(refused_seen.lock()[0].0.get("x-scope-orgid").is_none());
    let text = metrics(server.http_addr()).await;
    assert!(
        metric(&text, r#"tailscope_remote_write_samples_dropped_total{remote="refusing",reason="rejected"}"#)
            > 0.0,
        "{text}"
    );
    assert!(metric(&text, r#"tailscope_remote_write_retries_total{remote="failing"}"#) >= 2.0, "{text}");
    assert!(!text.contains(r#"remote_write_samples_dropped_total{remote="failing""#), "{text}");
    server.shutdown().await;
}
