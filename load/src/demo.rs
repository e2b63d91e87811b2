//! `tailscope-load demo`: tailscope working, in a minute, in one terminal.
//!
//! It starts an embedded server (temporary data directory, ports chosen by the system), a
//! local webhook receiver that prints every grouped notification, loads the shipped example
//! rules with their time constants scaled down for a short demo, and runs `steady` →
//! `latency-spike` → `cascade`, printing each service's p99 as the server sees it while the
//! alerts arrive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::run::{run, service_name, RunArgs, Scenario};

/// Options of `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Seconds per phase (steady, latency spike, cascade).
    #[arg(long, default_value_t = 20)]
    pub phase_seconds: u64,
    /// Frontend requests per second.
    #[arg(long, default_value_t = 300.0)]
    pub rate: f64,
    /// The rule files to load (default: the repository's examples/rules).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Seed of the simulated traffic.
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// Runs without incidents, pages grouped by alert name and service: how the cascade paged
    /// before tailscope grouped it by incident.
    #[arg(long)]
    pub without_incidents: bool,
}

/// Rewrites a Prometheus rule file for a short demo: groups evaluate every second, `for` and
/// `keep_firing_for` become 2 s, and range windows shrink (5m → 10s, 30m → 20s, 1h → 30s,
/// 6h → 1m). Returns the YAML.
pub fn scale_rules(text: &str) -> anyhow::Result<String> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(text)?;
    let groups = doc.get_mut("groups").and_then(|g| g.as_sequence_mut()).context("no groups")?;
    for g in groups {
        g["interval"] = "1s".into();
        for r in g.get_mut("rules").and_then(|r| r.as_sequence_mut()).into_iter().flatten() {
            for key in ["for", "keep_firing_for"] {
                if r.get(key).is_some() {
                    r[key] = "2s".into();
                }
            }
            if let Some(expr) = r.get("expr").and_then(|e| e.as_str()) {
                let scaled = expr
                    .replace("[5m]", "[10s]")
                    .replace("[30m]", "[20s]")
                    .replace("[1h]", "[30s]")
                    .replace("[6h]", "[1m]");
                r["expr"] = scaled.into();
            }
        }
    }
    Ok(serde_yaml::to_string(&doc)?)
}

fn example_rules() -> PathBuf {
    // Next to the sources when run from the repository (cargo run / cargo test).
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rules")
}

/// Runs the demo; everything it shows goes to `out`. Returns the notifications received.
pub async fn demo(args: &DemoArgs, out: Arc<Mutex<Vec<u8>>>, echo: bool) -> anyhow::Result<Vec<Value>> {
    let say = move |line: String| {
        let out = out.clone();
        async move {
            if echo {
                println!("{line}");
            }
            out.lock().await.extend_from_slice(format!("{line}\n").as_bytes());
        }
    };
    let dir = tempfile::tempdir()?;

    // The webhook receiver: prints each grouped notification.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let app =
        axum::Router::new().fallback(axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                "ok"
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let printer = {
        let (received, say) = (received.clone(), say.clone());
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                say(describe_notification(&body)).await;
                received.lock().await.push(body);
            }
        })
    };

    // The rules and the notifier configuration.
    let rules_dir = args.rules.clone().unwrap_or_else(example_rules);
    let paths = tailscope_server::alerting::expand_rule_paths(std::slice::from_ref(&rules_dir))
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!paths.is_empty(), "no rule files in {}", rules_dir.display());
    let mut rule_files = Vec::new();
    for p in &paths {
        let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
        let scaled = dir.path().join(p.file_name().context("rule file name")?);
        std::fs::write(&scaled, scale_rules(&text)?)?;
        rule_files.push(scaled);
    }
    let notifier = dir.path().join("alertmanager.yml");
    let pages_by = if args.without_incidents { "[alertname, service]" } else { "[incident]" };
    std::fs::write(
        &notifier,
        format!(
            "route:\n  receiver: team\n  group_by: [alertname, service]\n  group_wait: 1s\n  group_interval: 5s\n  repeat_interval: 1h\n  routes:\n    - matchers: ['severity=\"page\"']\n      receiver: pager\n      group_by: {pages_by}\nreceivers:\n  - name: team\n    webhook_configs: [{{url: 'http://{hook}/team'}}]\n  - name: pager\n    webhook_configs: [{{url: 'http://{hook}/pager'}}]\ninhibit_rules:\n  - source_matchers: ['severity=\"page\"']\n    target_matchers: ['severity=\"ticket\"']\n    equal: [service]\n"
        ),
    )?;
    let mut config = tailscope_server::Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse()?;
    config.server.http_addr = "127.0.0.1:0".parse()?;
    config.server.otlp_http_addr = "127.0.0.1:0".parse()?;
    config.server.data_dir = dir.path().join("data");
    config.ingest.flush_interval = Duration::from_millis(200);
    config.alerting.rule_files = rule_files;
    config.alerting.alertmanager_config = notifier;
    config.alerting.resend_delay = Duration::from_secs(5);
    // Incidents over the demo's short phases: the last 20 s against the two minutes before.
    config.alerting.incidents.enabled = !args.without_incidents;
    config.alerting.incidents.window = Duration::from_secs(20);
    config.alerting.incidents.baseline = Duration::from_secs(120);
    config.alerting.incidents.refresh = Duration::from_secs(1);
    let server = tailscope_server::Server::start(config).await?;
    let http = format!("http://{}", server.http_addr());
    say(format!(
        "tailscope demo: server on gRPC {} and {http} (Grafana: add it as a Prometheus data source); \
         rules {} (time constants scaled down); webhook receiver on {hook}",
        server.grpc_addr(),
        rules_dir.display()
    ))
    .await;

    // Percentiles as the server sees them, every two seconds.
    let watcher = {
        let (http, say) = (http.clone(), say.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let q =
                "histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[10s])))";
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let Ok(data) =
                    crate::api::api(&client, &http, "/api/v1/query", &[("query", q.to_owned())]).await
                else {
                    continue;
                };
                let mut parts: Vec<(usize, String)> = data["result"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| {
                        let name = s["metric"]["service"].as_str()?;
                        let p99: f64 = s["value"][1].as_str()?.parse().ok()?;
                        let order = (0..8).position(|i| service_name(i) == name).unwrap_or(99);
                        Some((order, format!("{name} {:.0} ms", p99 * 1e3)))
                    })
                    .collect();
                parts.sort();
                if !parts.is_empty() {
                    let line: Vec<String> = parts.into_iter().map(|(_, s)| s).collect();
                    say(format!("  p99 (last 10 s): {}", line.join(" · "))).await;
                }
            }
        })
    };

    for scenario in [Scenario::Steady, Scenario::LatencySpike, Scenario::Cascade] {
        say(format!("\n== {scenario:?} for {} s ==", args.phase_seconds)).await;
        let run_args = RunArgs {
            scenario,
            rate: args.rate,
            duration: Duration::from_secs(args.phase_seconds),
            services: 3,
            operations: 2,
            endpoint: format!("http://{}", server.grpc_addr()),
            http: http.clone(),
            json: false,
            quiet: true,
            compare: false,
            seed: args.seed,
            settle: Duration::ZERO,
            plot: None,
        };
        let mut buf = Vec::new();
        run(&run_args, &mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            say(format!("  {line}")).await;
        }
    }
    // Let the last evaluations and notifications through.
    tokio::time::sleep(Duration::from_secs(3)).await;
    watcher.abort();
    let incidents = crate::api::api(&reqwest::Client::new(), &http, "/api/v1/incidents", &[]).await;
    server.shutdown().await;
    printer.abort();
    let received = received.lock().await.clone();
    let pages = received.iter().filter(|b| b["receiver"] == "pager").count();
    say(format!("\n{} grouped notifications received, {pages} of them pages.", received.len())).await;
    for i in incidents.ok().and_then(|d| d["incidents"].as_array().cloned()).unwrap_or_default() {
        let members: Vec<String> = i["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                format!(
                    "{} {} ({})",
                    a["alertname"].as_str().unwrap_or("?"),
                    a["service"].as_str().unwrap_or("?"),
                    a["role"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let id = i["id"].as_str().unwrap_or("?");
        let merged: Vec<&str> = i["labels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|l| *l != id)
            .collect();
        let merged =
            if merged.is_empty() { String::new() } else { format!(" (merged: {})", merged.join(", ")) };
        say(format!(
            "incident {id}{merged}: root {} — {}",
            i["root_service"].as_str().unwrap_or("?"),
            members.join(", ")
        ))
        .await;
    }
    Ok(received)
}

/// One line per notification: receiver, status, group and each alert with its summary.
pub fn describe_notification(body: &Value) -> String {
    let alerts: Vec<String> = body["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let l = &a["labels"];
            let op = l["operation"].as_str().map(|o| format!(" {o}")).unwrap_or_default();
            let role = match (a["annotations"]["incident_role"].as_str(), a["annotations"]["blame"].as_str())
            {
                (Some("root"), Some(why)) => format!(" — ROOT: {why}"),
                (Some("root"), None) => " — ROOT".to_owned(),
                (Some(_), Some(blame)) => format!(" — symptom: {blame}"),
                _ => String::new(),
            };
            format!(
                "{} {}{op} [{}]: {}{role}",
                l["alertname"].as_str().unwrap_or("?"),
                l["service"].as_str().unwrap_or("?"),
                a["status"].as_str().unwrap_or("?"),
                a["annotations"]["summary"].as_str().unwrap_or("")
            )
        })
        .collect();
    format!(
        "  >> ALERT to {} [{}] group {}: {} alert(s)\n     {}",
        body["receiver"].as_str().unwrap_or("?"),
        body["status"].as_str().unwrap_or("?"),
        body["groupKey"].as_str().unwrap_or("?"),
        alerts.len(),
        alerts.join("\n     ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_scaled_for_a_short_demo() {
        let text = "groups:\n  - name: g\n    interval: 30s\n    rules:\n      - alert: A\n        expr: rate(x[5m]) and rate(x[1h])\n        for: 5m\n";
        let scaled = scale_rules(text).unwrap();
        assert!(scaled.contains("interval: 1s"), "{scaled}");
        assert!(scaled.contains("for: 2s"), "{scaled}");
        assert!(scaled.contains("rate(x[10s]) and rate(x[30s])"), "{scaled}");
    }
}
