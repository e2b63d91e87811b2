//! The `tailscope-server` binary: `check-config`, `check-rules`, SIGHUP reloading the rules,
//! and a graceful exit on SIGTERM that writes and acknowledges everything accepted.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::common::*;

fn server_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tailscope-server"))
}

#[test]
fn check_config_prints_the_effective_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../tailscope.example.toml");
    let out =
        server_bin().args(["check-config", example]).env("TAILSCOPE_INGEST_SHARDS", "3").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("grpc_addr = \"127.0.0.1:4317\""), "{stdout}");
    assert!(stdout.contains("shards = 3"), "env overrides the file: {stdout}");
    assert!(stdout.contains("window_10s = \"2days\""), "{stdout}");
}

const EXAMPLE_RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rules");

#[test]
fn the_shipped_rule_files_pass_check_rules_and_promtool() {
    let out = server_bin().args(["check-rules", EXAMPLE_RULES]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for file in ["errors.yml", "latency.yml", "slo.yml"] {
        assert!(stdout.contains(file), "{stdout}");
    }
    assert!(stdout.contains("SUCCESS: 1 groups, 2 rules found"), "the SLO file's two burn rates: {stdout}");
    // The same files pass Prometheus' own checker.
    let Some(promtool) = peers(&["promtool"], "prometheus") else { return };
    let files: Vec<_> = std::fs::read_dir(EXAMPLE_RULES).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 3);
    let out = Command::new(&promtool[0]).args(["check", "rules"]).args(&files).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_rules_names_file_group_rule_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yml");
    std::fs::write(&good, "groups:\n  - name: ok\n    rules:\n      - alert: A\n        expr: '1'\n")
        .unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "groups:\n  - name: latency\n    rules:\n      - alert: A\n        expr: '1'\n      - alert: P99\n        expr: histogram_quantile(0.99, rate(span_duration_seconds_bucket[5m]) > 1\n").unwrap();
    let out = server_bin().arg("check-rules").arg(&good).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stdout.contains("good.yml") && stdout.contains("SUCCESS: 1 groups, 1 rules found"), "{stdout}");
    assert!(stderr.contains("bad.yml"), "{stderr}");
    assert!(stderr.contains("group \"latency\", rule 2: \"P99\": could not parse expression"), "{stderr}");
    let out = server_bin().arg("check-rules").arg(dir.path().join("missing.yml")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yml");
    std::fs::write(&rules, "groups:\n  - name: g\n    rules:\n      - alert: Before\n        expr: '1'\n")
        .unwrap();
    let config = dir.path().join("tailscope.toml");
    std::fs::write(&config, format!("[alerting]\nrule_files = [{:?}]\n", rules.display().to_string()))
        .unwrap();
    let config = config.display().to_string();
    let (child, _, http) = spawn_server(&dir.path().join("data"), &[("TAILSCOPE_CONFIG", &config)]);
    let child = Peer(child);
    let name = || async move {
        get_json(http, "/api/v1/rules").await["data"]["groups"][0]["rules"][0]["name"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(name().await.as_deref(), Some("Before"));
    std::fs::write(&rules, "groups:\n  - name: g\n    rules:\n      - alert: After\n        expr: '1'\n")
        .unwrap();
    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert_eventually!(name().await.as_deref() == Some("After"), "SIGHUP did not reload the rules");
}

#[test]
fn check_config_names_the_file_and_key_that_are_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\ndata_dir = \"/tmp/x\"\n\n[retention]\nwindow_5s = \"1d\"\n").unwrap();
    let out = server_bin().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("window_5s"), "{stderr}");
    assert!(stderr.contains("line 5"), "{stderr}");

    let out = server_bin().arg("check-config").arg(dir.path().join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("missing.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_and_acknowledges_everything_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // Epochs far apart: only the shutdown's final flush can acknowledge these batches.
    let (mut child, grpc, http) = spawn_server(dir.path(), &[("TAILSCOPE_INGEST_FLUSH_INTERVAL", "60s")]);
    let now = now_nanos();
    let mut s = open(grpc).await;
    for seq in 1..=10 {
        s.send(batch(
            11,
            seq,
            vec![group("term", "op", (0..100).map(|i| span(now - i, 2_000_000, false)).collect())],
        ))
        .await;
    }
    assert_eventually!(
        metric(&metrics(http).await, "tailscope_batches_total{result=\"accepted\"}") == 10.0,
        "batches not accepted"
    );
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let end = s.wait_error().await;
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert_eq!(s.acked, 10);
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}");

    let (mut child, _, http) = spawn_server(dir.path(), &[]);
    assert_eq!(tail(http, "service=term").await[0]["count"], 1000);
    child.kill().unwrap();
    child.wait().unwrap();
}
