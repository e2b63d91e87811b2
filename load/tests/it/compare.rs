//! `tailscope-load compare` end to end at a small size: a real tailscope process, a real
//! Prometheus backfilled with promtool and a native-histogram Prometheus fed by remote write,
//! the same queries asked of each, every answer checked against the exact quantiles.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use tailscope_test_support::peers;

#[test]
fn compare_asks_tailscope_and_real_prometheus_the_same_queries_and_checks_every_answer() {
    let Some(found) = peers(&["promtool", "prometheus"], "prometheus") else { return };
    let load = std::path::Path::new(env!("CARGO_BIN_EXE_tailscope-load"));
    let server = load.with_file_name("tailscope-server");
    assert!(server.exists(), "{} is missing: run `cargo build -p tailscope-server` first", server.display());
    let out = Command::new(load)
        .args(["compare", "--series", "20", "--history", "15m", "--rate", "4", "--steps", "30"])
        .args(["--repeat", "1", "--check-steps", "100", "--native", "--json", "--server-bin"])
        .arg(&server)
        .arg("--promtool")
        .arg(&found[0])
        .arg("--prometheus")
        .arg(&found[1])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {stdout}"));

    // 15 minutes × 20 series × 4 spans/s, every five seconds of a series drawn from a Poisson-
    // free count: exactly rate × seconds.
    assert_eq!(v["spans"], 20 * 900 * 4);
    let rows = v["rows"].as_array().unwrap();
    // {fresh, compacted} × {by operation, by series} × {instant, range} × {classic, native}.
    assert_eq!(rows.len(), 16, "{v:#}");
    for r in rows {
        let ours = &r["tailscope_error"];
        let theirs = &r["peer_error"];
        // Every group at every checked time answered, within tailscope's 1 %.
        assert!(ours["checked"].as_u64().unwrap() > 0, "{r:#}");
        assert_eq!(ours["missing"], 0, "{r:#}");
        assert!(ours["max"].as_f64().unwrap() <= 0.01, "tailscope off by more than 1 %: {r:#}");
        // The peers answered the same groups. (Their errors have no fixed bound to assert: a
        // Prometheus rate reads the samples in (t − 5m, t], so the spans of the first scrape
        // interval are not in it, and the p99 of a few hundred spans moves when they leave.)
        assert_eq!(theirs["checked"], ours["checked"], "{r:#}");
        assert_eq!(theirs["missing"], 0, "{r:#}");
        // Native histograms at schema 3 are closer to the exact p99 than the default buckets
        // (the spans are seeded, so both peers' answers are the same in every run).
        if r["peer"] == "prometheus-native" {
            let classic = rows
                .iter()
                .find(|c| c["peer"] == "prometheus" && ["state", "by", "shape"].iter().all(|k| c[k] == r[k]))
                .unwrap();
            let median = |row: &serde_json::Value| row["peer_error"]["median"].as_f64().unwrap();
            assert!(median(r) < median(classic), "native {r:#} vs classic {classic:#}");
        }
        for side in ["tailscope", "peer_result"] {
            assert!(r[side]["bytes"].as_u64().unwrap() > 0, "{r:#}");
            assert!(r[side]["median_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
        }
    }
}
