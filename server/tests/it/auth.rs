//! Authentication (issue: locked doors): basic auth in Prometheus' web configuration with read,
//! write and admin users; bearer tokens for span writers on gRPC (the client crate, the Python
//! SDK with `OTEL_EXPORTER_OTLP_HEADERS` over TLS) and OTLP/HTTP; each refusal with the right
//! status, counted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tailscope::{Client, Status};
use tailscope_test_support::pki::Pki;

use crate::common::*;

/// `curl` over TLS trusting `ca`: (HTTP status, body).
fn curl(ca: &Path, args: &[&str], url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_tokens_and_the_lifecycle_are_enforced_on_every_port() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    let hash = |p: &str| bcrypt::hash(p, 4).unwrap();
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\nbasic_auth_users:\n  grafana: {}\n  oncall: {}\n  ops: {}\n",
            hash("grafana-pw"),
            hash("oncall-pw"),
            hash("ops-pw")
        ),
    )
    .unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "writer-token\n").unwrap();
    let mut config = config(&dir.path().join("data"));
    config.server.web_config_file = web;
    config.auth.ingest_token_files = vec![tokens];
    config.auth.write_users = vec!["oncall".into(), "ops".into()];
    config.auth.admin_users = vec!["ops".into()];
    config.auth.enable_lifecycle = true;
    let server = tailscope_server::Server::start(config).await.expect("server starts");
    let api = |path: &str| format!("https://localhost:{}{path}", server.http_addr().port());
    let user = |u: &str, p: &str| format!("{u}:{p}");

    // Reads: any user; none, a wrong password or an unknown user is a 401.
    let (code, body) = curl(&pki.ca, &["-u", &user("grafana", "grafana-pw")], &api("/api/v1/labels"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(curl(&pki.ca, &[], &api("/api/v1/labels")).0, 401);
    assert_eq!(curl(&pki.ca, &["-u", &user("grafana", "nope")], &api("/api/v1/labels")).0, 401);
    assert_eq!(curl(&pki.ca, &["-u", &user("mallory", "x")], &api("/metrics")).0, 401);
    // Writes: silences only for the write users.
    let silence = serde_json::json!({
        "matchers": [{"name": "service", "value": "checkout", "isRegex": false}],
        "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2030-01-01T00:00:00Z",
        "createdBy": "test", "comment": "maintenance"
    })
    .to_string();
    let post = ["-H", "content-type: application/json", "--data-binary", silence.as_str()];
    let grafana = user("grafana", "grafana-pw");
    let oncall = user("oncall", "oncall-pw");
    fn as_user<'a>(credentials: &'a str, post: &[&'a str]) -> Vec<&'a str> {
        [&["-u", credentials][..], post].concat()
    }
    assert_eq!(curl(&pki.ca, &as_user(&grafana, &post), &api("/api/v2/silences")).0, 403);
    let (code, body) = curl(&pki.ca, &as_user(&oncall, &post), &api("/api/v2/silences"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(curl(&pki.ca, &post, &api("/api/v2/alerts")).0, 401, "alerts need a user too");
    // Admin: only ops reloads.
    assert_eq!(curl(&pki.ca, &["-X", "POST", "-u", &user("oncall", "oncall-pw")], &api("/-/reload")).0, 403);
    assert_eq!(curl(&pki.ca, &["-X", "POST", "-u", &user("ops", "ops-pw")], &api("/-/reload")).0, 200);

    // Spans: the client crate with the token is acknowledged; a wrong token never is.
    let grpc = format!("https://localhost:{}", server.grpc_addr().port());
    let writer = |token: &str| {
        Client::builder()
            .endpoint(grpc.clone())
            .service("locked")
            .configure(|c| {
                c.tls_ca_file = Some(pki.ca.clone());
                c.token = Some(token.to_owned());
            })
            .build()
            .unwrap()
    };
    let good = writer("writer-token");
    for _ in 0..10 {
        good.record("GET /in", Duration::from_millis(2), Status::Ok);
    }
    good.flush_within(Duration::from_secs(30)).await.expect("acknowledged with the token");
    let bad = writer("guessed");
    bad.record("GET /in", Duration::from_millis(2), Status::Ok);
    assert!(bad.flush_within(Duration::from_secs(3)).await.is_err(), "a wrong token is never acknowledged");
    drop(bad);

    // OTLP/HTTP: the bearer token, or 401.
    let now = now_nanos();
    let export = serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "locked"}}]},
        "scopeSpans": [{"spans": [{"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708",
            "name": "GET /otlp", "startTimeUnixNano": (now - 1_000_000).to_string(), "endTimeUnixNano": now.to_string()}]}]
    }]})
    .to_string();
    let otlp = format!("https://localhost:{}/v1/traces", server.otlp_http_addr().port());
    let json = ["-H", "content-type: application/json", "--data-binary", export.as_str()];
    assert_eq!(curl(&pki.ca, &json, &otlp).0, 401);
    let with_token = [&json[..], &["-H", "authorization: Bearer writer-token"][..]].concat();
    assert_eq!(curl(&pki.ca, &with_token, &otlp).0, 200);

    // The Python SDK over TLS, its token in OTEL_EXPORTER_OTLP_HEADERS.
    // Python is on every machine this runs on; only TAILSCOPE_SKIP_PEERS skips the SDK.
    let python = peers(&["python3"], "python3").map(|mut p| p.remove(0));
    if let Some(python) = &python {
        let spec = dir.path().join("spans.json");
        let spans: Vec<_> = (0..600)
            .map(|i| serde_json::json!(["GET /py", now - 5_000_000_000 + i * 1_000_000, 3_000_000, false]))
            .collect();
        std::fs::write(&spec, serde_json::json!({"service": "locked", "spans": spans}).to_string()).unwrap();
        let out = Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_spans.py"))
            .arg(&grpc)
            .arg(&spec)
            .arg("grpc")
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", &pki.ca)
            .env("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer writer-token")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Everything accepted is counted; every refusal is counted by listener and reason.
    let (_, body) =
        curl(&pki.ca, &["-u", &user("grafana", "grafana-pw")], &api("/api/v1/tail?service=locked"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let counted: u64 =
        v["data"]["series"].as_array().unwrap().iter().map(|r| r["count"].as_u64().unwrap()).sum();
    let python_spans = if python.is_some() { 600 } else { 0 };
    assert_eq!(counted, 10 + 1 + python_spans, "{v}");
    let (_, text) = curl(&pki.ca, &["-u", &user("grafana", "grafana-pw")], &api("/metrics"));
    for (listener, reason) in [
        ("http", "missing"),
        ("http", "invalid"),
        ("http", "forbidden"),
        ("grpc", "invalid"),
        ("otlp_http", "missing"),
    ] {
        let series = format!("tailscope_auth_failures_total{{listener=\"{listener}\",reason=\"{reason}\"}}");
        assert!(metric(&text, &series) >= 1.0, "{series}\n{text}");
    }
    assert!(!text.contains("writer-token") && !text.contains("grafana-pw"));
    good.shutdown(Duration::from_secs(5)).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_api_is_off_unless_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let r =
        reqwest::Client::new().post(format!("http://{}/-/reload", server.http_addr())).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("auth.enable_lifecycle"));
    server.shutdown().await;
}

/// Watermark poisoning with authentication on: a client id belongs to the credential that
/// first used it, across restarts; another credential naming it is refused and counted; the
/// owner's batches keep being counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_belongs_to_the_credential_that_first_used_it() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "token-a\ntoken-b\n").unwrap();
    let mut c = config(&dir.path().join("data"));
    c.auth.ingest_token_files = vec![tokens];
    let now = now_nanos();
    let make = |seq: u64| {
        batch(9, seq, vec![group("owned", "GET /", vec![span(now - seq as i64, 1_000_000, false)])])
    };
    let server = tailscope_server::Server::start(c.clone()).await.unwrap();
    let mut owner = open_as(server.grpc_addr(), "token-a").await;
    for seq in 1..=5 {
        owner.send(make(seq)).await;
    }
    owner.wait_acked(5).await;
    let mut other = open_as(server.grpc_addr(), "token-b").await;
    other.send(make(6)).await;
    let status = other.wait_error().await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("belongs to another credential"), "{}", status.message());
    for seq in 6..=11 {
        owner.send(make(seq)).await;
    }
    owner.wait_acked(11).await;
    drop(owner);
    server.shutdown().await;

    // After a restart the id is still token-a's.
    let server = tailscope_server::Server::start(c).await.unwrap();
    let mut other = open_as(server.grpc_addr(), "token-b").await;
    other.send(make(12)).await;
    assert_eq!(other.wait_error().await.code(), tonic::Code::PermissionDenied);
    let mut owner = open_as(server.grpc_addr(), "token-a").await;
    owner.send(make(12)).await;
    owner.wait_acked(12).await;
    let rows = tail(server.http_addr(), "service=owned").await;
    assert_eq!(rows.iter().map(|r| r["count"].as_u64().unwrap()).sum::<u64>(), 12, "{rows:?}");
    let m = metrics(server.http_addr()).await;
    assert_eq!(metric(&m, "tailscope_batches_rejected_total{reason=\"not_owner\"}"), 1.0, "{m}");
    server.shutdown().await;
}

/// Watermarks of client ids idle for `ingest.client_idle_timeout` are forgotten: out of memory
/// and their rows out of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_ids_are_forgotten_and_their_rows_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("data"));
    c.ingest.client_idle_timeout = Duration::from_secs(1);
    c.retention.interval = Duration::from_secs(1);
    let server = tailscope_server::Server::start(c).await.unwrap();
    let now = now_nanos();
    let mut s = open(server.grpc_addr()).await;
    s.send(batch(31, 1, vec![group("idle", "GET /", vec![span(now, 1_000_000, false)])])).await;
    s.wait_acked(1).await;
    assert!(server.store().watermarks().unwrap().iter().any(|(id, _)| *id == 31));
    assert_eventually!(
        !server.store().watermarks().unwrap().iter().any(|(id, _)| *id == 31),
        "the idle client's watermark row is still there"
    );
    let m = metrics(server.http_addr()).await;
    assert!(metric(&m, "tailscope_clients_forgotten_total") >= 1.0, "{m}");
    server.shutdown().await;
}
