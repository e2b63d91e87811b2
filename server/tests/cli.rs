//! The `tailscope-server` binary: `check-config`, and a graceful exit on SIGTERM that writes and
//! acknowledges everything accepted.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

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
