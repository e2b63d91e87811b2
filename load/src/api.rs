//! The server's Prometheus-compatible HTTP API as the load tool calls it (shared by `run`,
//! `plot` and `demo`).

use anyhow::Context;
use serde_json::Value;

/// Posts a form to the server's Prometheus API at `path`; the answer's `data` on success.
pub async fn api(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    form: &[(&str, String)],
) -> anyhow::Result<Value> {
    let base = base.trim_end_matches('/');
    let v: Value = http
        .post(format!("{base}{path}"))
        .form(form)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?
        .json()
        .await?;
    anyhow::ensure!(v["status"] == "success", "{path} {form:?}: {v}");
    Ok(v["data"].clone())
}

/// The value of the sample `name` (without labels) in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
