//! TLS on every port (issue: locked doors), with certificates made in the test: curl for the
//! HTTP API and OTLP/HTTP, the client crate for gRPC; a certificate rotated on disk and
//! reloaded while a stream stays open; mutual TLS refusing a missing or foreign certificate.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tailscope::{Client, Status};
use tailscope_test_support::pki::Pki;

use crate::common::*;

/// `curl` over TLS trusting `ca`, with `extra` arguments; (exit success, stdout).
fn curl(ca: &Path, extra: &[&str], url: &str) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn web_config(dir: &Path, pki: &Pki, mutual: bool) -> std::path::PathBuf {
    let mut yaml = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    if mutual {
        yaml.push_str(&format!(
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            pki.ca.display()
        ));
    }
    let path = dir.join(if mutual { "web-mutual.yml" } else { "web.yml" });
    std::fs::write(&path, yaml).expect("web config written");
    path
}

fn tls_client(grpc: std::net::SocketAddr, ca: &Path) -> Client {
    Client::builder()
        .endpoint(format!("https://localhost:{}", grpc.port()))
        .service("secure")
        .configure(|c| c.tls_ca_file = Some(ca.to_owned()))
        .build()
        .expect("a TLS client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_serves_tls_and_a_rotated_certificate_is_taken_without_dropping_streams() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    let mut config = config(&dir.path().join("data"));
    config.server.web_config_file = web_config(dir.path(), &pki, false);
    let server = tailscope_server::Server::start(config).await.expect("server starts with TLS");
    let (http, otlp) = (server.http_addr().port(), server.otlp_http_addr().port());

    // The HTTP API over TLS; plaintext is refused and counted.
    let (ok, body) = curl(&pki.ca, &[], &format!("https://localhost:{http}/-/ready"));
    assert!(ok && body.contains("ready"), "{body}");
    assert!(reqwest::get(format!("http://127.0.0.1:{http}/-/ready")).await.is_err());

    // gRPC through the client crate, and OTLP/HTTP (JSON) through curl.
    let client = tls_client(server.grpc_addr(), &pki.ca);
    for i in 0..100u64 {
        client.record("GET /a", Duration::from_micros(100 + i), Status::Ok);
    }
    client.flush_within(Duration::from_secs(30)).await.expect("acknowledged over TLS");
    let now = now_nanos();
    let export = serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "secure"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708",
            "name": "GET /otlp", "startTimeUnixNano": (now - 2_000_000).to_string(),
            "endTimeUnixNano": now.to_string(), "kind": 2
        }]}]
    }]});
    let (ok, body) = curl(
        &pki.ca,
        &["-H", "content-type: application/json", "--data-binary", &export.to_string()],
        &format!("https://localhost:{otlp}/v1/traces"),
    );
    assert!(ok, "OTLP/HTTP over TLS: {body}");

    // Rotated on disk (another CA) and reloaded: new connections get the new certificate; the
    // client's open stream goes on.
    let next = Pki::new(dir.path(), "next-");
    std::fs::copy(&next.server_cert, &pki.server_cert).unwrap();
    std::fs::copy(&next.server_key, &pki.server_key).unwrap();
    server.reload().expect("reload");
    let url = format!("https://localhost:{http}/api/v1/tail?service=secure");
    assert!(!curl(&pki.ca, &[], &url).0, "the old CA no longer verifies new connections");
    let streams_before = client.stats();
    for i in 0..100u64 {
        client.record("GET /a", Duration::from_micros(200 + i), Status::Ok);
    }
    client.flush_within(Duration::from_secs(30)).await.expect("the open stream still acknowledges");
    let after = client.stats();
    assert_eq!(after.acked, 200, "{after:?}");
    assert_eq!(after.reconnects, streams_before.reconnects, "the stream was not dropped: {after:?}");
    let (ok, body) = curl(&next.ca, &[], &url);
    assert!(ok, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let counted: u64 =
        v["data"]["series"].as_array().unwrap().iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 201, "{v}");
    let (_, text) = curl(&next.ca, &[], &format!("https://localhost:{http}/metrics"));
    assert!(
        metric(&text, "tailscope_tls_handshake_failures_total") >= 2.0,
        "plaintext and the old CA: {text}"
    );
    client.shutdown(Duration::from_secs(5)).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_the_ca_s_clients_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    let rogue = Pki::new(dir.path(), "rogue-");
    let mut config = config(&dir.path().join("data"));
    config.server.web_config_file = web_config(dir.path(), &pki, true);
    let server = tailscope_server::Server::start(config).await.expect("server starts with mutual TLS");
    let url = format!("https://localhost:{}/-/ready", server.http_addr().port());
    let cert = |p: &Pki| {
        vec![
            "--cert".to_string(),
            p.client_cert.display().to_string(),
            "--key".into(),
            p.client_key.display().to_string(),
        ]
    };
    let with = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&pki.ca, &args, &url)
    };
    assert!(with(cert(&pki)).0, "the CA's client is served");
    assert!(!with(Vec::new()).0, "no client certificate");
    assert!(!with(cert(&rogue)).0, "another CA's client certificate");

    // gRPC: the client crate with its certificate is acknowledged; without one it never is.
    let grpc = server.grpc_addr();
    let good = Client::builder()
        .endpoint(format!("https://localhost:{}", grpc.port()))
        .service("mutual")
        .configure(|c| {
            c.tls_ca_file = Some(pki.ca.clone());
            c.tls_cert_file = Some(pki.client_cert.clone());
            c.tls_key_file = Some(pki.client_key.clone());
        })
        .build()
        .unwrap();
    good.record("GET /m", Duration::from_millis(1), Status::Ok);
    good.flush_within(Duration::from_secs(30)).await.expect("acknowledged with a client certificate");
    let anonymous = tls_client(grpc, &pki.ca);
    anonymous.record("GET /m", Duration::from_millis(1), Status::Ok);
    assert!(anonymous.flush_within(Duration::from_secs(3)).await.is_err(), "no certificate, no ack");
    let args = cert(&pki);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, metrics_text) =
        curl(&pki.ca, &args, &format!("https://localhost:{}/metrics", server.http_addr().port()));
    assert!(metric(&metrics_text, "tailscope_tls_handshake_failures_total") >= 3.0, "{metrics_text}");
    good.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(anonymous);
    server.shutdown().await;
}

#[test]
fn the_example_web_config_is_valid_for_prometheus_and_for_tailscope() {
    let Some(_) = peers(&["promtool"], "prometheus") else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    std::fs::copy(&pki.server_cert, dir.path().join("tailscope.crt")).unwrap();
    std::fs::copy(&pki.server_key, dir.path().join("tailscope.key")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("clients-ca.crt")).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/web-config.yml");
    let path = dir.path().join("web-config.yml");
    std::fs::copy(example, &path).unwrap();
    let out = Command::new("promtool").args(["check", "web-config"]).arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tailscope_server::tls::Tls::load(&path).unwrap().is_some());
}

/// The server process itself: a certificate rotated on disk and `SIGHUP` — new connections
/// get the new certificate, a client's open stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_a_rotated_certificate_in_the_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    let web = web_config(dir.path(), &pki, false);
    let web = web.display().to_string();
    let (child, grpc, http) =
        spawn_server(&dir.path().join("data"), &[("TAILSCOPE_WEB_CONFIG_FILE", web.as_str())]);
    let child = Peer(child);
    let url = format!("https://localhost:{}/-/healthy", http.port());
    assert!(curl(&pki.ca, &[], &url).0);
    let client = tls_client(grpc, &pki.ca);
    client.record("GET /a", Duration::from_millis(1), Status::Ok);
    client.flush_within(Duration::from_secs(30)).await.expect("acknowledged over TLS");
    let next = Pki::new(dir.path(), "next-");
    std::fs::copy(&next.server_cert, &pki.server_cert).unwrap();
    std::fs::copy(&next.server_key, &pki.server_key).unwrap();
    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert_eventually!(curl(&next.ca, &[], &url).0, "the new certificate is not served after SIGHUP");
    assert!(!curl(&pki.ca, &[], &url).0, "the old one is no longer served");
    let reconnects = client.stats().reconnects;
    client.record("GET /a", Duration::from_millis(1), Status::Ok);
    client.flush_within(Duration::from_secs(30)).await.expect("the open stream still acknowledges");
    assert_eq!(client.stats().reconnects, reconnects, "the stream was not dropped");
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}
