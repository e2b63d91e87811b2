//! `tailscope-load freshness` end to end against a real server process it starts.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// On one node an acknowledgement means written to the store the queries read, so every
/// probe is counted by the first query after its acknowledgement (asked as strong reads,
/// which a single node answers as any other).
#[test]
fn on_one_node_every_probe_is_queryable_at_its_acknowledgement() {
    let load = std::path::Path::new(env!("CARGO_BIN_EXE_tailscope-load"));
    let server = load.with_file_name("tailscope-server");
    assert!(server.exists(), "{} is missing: run `cargo build -p tailscope-server` first", server.display());
    // The started server inherits the environment: epochs of 50 ms, so probes are
    // acknowledged in about that (the default second would make this test 30 s long).
    let out = Command::new(load)
        .args([
            "freshness",
            "--probes",
            "30",
            "--pause-ms",
            "5",
            "--jitter-ms",
            "20",
            "--json",
            "--strong",
            "--server-bin",
        ])
        .arg(&server)
        .env("TAILSCOPE_INGEST_FLUSH_INTERVAL", "50ms")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["probes"], 30, "{v}");
    assert_eq!(v["visible_at_ack"], 30, "{v}");
    assert_eq!(v["visible_after_ack_ms"]["max"], 0.0, "{v}");
    assert_eq!(v["strong"], true, "{v}");
    assert!(v["first_query_ms"]["max"].as_f64().unwrap() > 0.0, "{v}");
}
