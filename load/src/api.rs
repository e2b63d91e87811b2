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
