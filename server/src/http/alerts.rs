//! Alerting endpoints: Prometheus' `/api/v1/rules` and `/api/v1/alerts` (Grafana's alert list
//! reads them), `/-/reload`, and Alertmanager's API v2 for alerts and silences.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::envelope::{success, ApiError};
use super::AppState;
use crate::alerting::eval::{ActiveAlert, State as AlertState};
use crate::alerting::notify::NotifierError;
use crate::alerting::silences::{PostableSilence, SilenceError};
use crate::alerting::{parse_rfc3339, rfc3339, Alert, Labels, ZERO_TIME};

/// The alerting routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/incidents", get(incidents).post(incidents))
        .route("/-/reload", post(reload).put(reload))
        .route("/api/v2/alerts", get(v2_alerts).post(post_alerts))
        .route("/api/v2/silences", get(list_silences).post(post_silence))
        .route("/api/v2/silence/{id}", get(get_silence).delete(delete_silence))
}

/// `GET /api/v1/incidents`: open and recently resolved incidents with their alerts, roots and
/// blame edges (empty when `[alerting.incidents]` is disabled).
async fn incidents(State(s): State<AppState>) -> Response {
    let enabled = s.alerting.incidents();
    success(json!({ "enabled": enabled.is_some(), "incidents": enabled.unwrap_or_default() })).into_response()
}

/// Go's `strconv.FormatFloat(v, 'e', -1, 64)`, as Prometheus prints an alert's value.
fn go_e(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    crate::alerting::template::go_exponent(v, None)
}

fn time_or_zero(ms: Option<i64>) -> String {
    ms.map_or_else(|| ZERO_TIME.to_owned(), rfc3339)
}

fn alert_json(a: &ActiveAlert) -> Value {
    let mut v = json!({
        "labels": a.labels,
        "annotations": a.annotations,
        "state": a.state.as_str(),
        "activeAt": rfc3339(a.active_at),
        "value": go_e(a.value),
    });
    if let Some(k) = a.keep_firing_since {
        v["keepFiringSince"] = json!(rfc3339(k));
    }
    v
}

/// `GET /api/v1/rules`, with Prometheus' filters `type`, `rule_name[]`, `rule_group[]`,
/// `file[]`.
async fn rules(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let params: Vec<(String, String)> =
        form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect();
    let all = |name: &str| -> Vec<&str> {
        params.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    };
    let kind = all("type").first().copied().unwrap_or("");
    if !matches!(kind, "" | "alert" | "record") {
        return ApiError::bad_data(format!("invalid query parameter type='{kind}'")).into_response();
    }
    let (names, groups_wanted, files) = (all("rule_name[]"), all("rule_group[]"), all("file[]"));
    let mut groups = Vec::new();
    for g in s.alerting.groups() {
        let file = g.group.file.display().to_string();
        if !groups_wanted.is_empty() && !groups_wanted.contains(&g.group.name.as_str())
            || !files.is_empty() && !files.contains(&file.as_str())
        {
            continue;
        }
        let state = g.snapshot();
        let mut rules = Vec::new();
        if kind != "record" {
            for (rule, rs) in g.group.rules.iter().zip(&state.rules) {
                if !names.is_empty() && !names.contains(&rule.name.as_str()) {
                    continue;
                }
                let labels: Labels = rule.labels.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
                let annotations: Labels =
                    rule.annotations.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
                let health = match (&rs.last_error, rs.last_evaluation) {
                    (Some(_), _) => "err",
                    (None, Some(_)) => "ok",
                    (None, None) => "unknown",
                };
                let mut r = json!({
                    "state": rs.state().as_str(),
                    "name": rule.name,
                    "query": rule.query,
                    "duration": rule.for_.as_secs_f64(),
                    "keepFiringFor": rule.keep_firing_for.as_secs_f64(),
                    "labels": labels,
                    "annotations": annotations,
                    "alerts": rs.alerts.values().filter(|a| a.state != AlertState::Inactive).map(alert_json).collect::<Vec<_>>(),
                    "health": health,
                    "evaluationTime": rs.evaluation_time.as_secs_f64(),
                    "lastEvaluation": time_or_zero(rs.last_evaluation),
                    "type": "alerting",
                });
                if let Some(e) = &rs.last_error {
                    r["lastError"] = json!(e);
                }
                rules.push(r);
            }
        }
        if !names.is_empty() && rules.is_empty() {
            continue;
        }
        groups.push(json!({
            "name": g.group.name,
            "file": file,
            "rules": rules,
            "interval": g.group.interval.as_secs_f64(),
            "limit": g.group.limit,
            "evaluationTime": state.evaluation_time.as_secs_f64(),
            "lastEvaluation": time_or_zero(state.last_evaluation),
        }));
    }
    success(json!({"groups": groups}))
}

/// `GET /api/v1/alerts`: every pending and firing alert.
async fn alerts(State(s): State<AppState>) -> Response {
    let mut out = Vec::new();
    for g in s.alerting.groups() {
        for rs in &g.snapshot().rules {
            out.extend(rs.alerts.values().filter(|a| a.state != AlertState::Inactive).map(alert_json));
        }
    }
    success(json!({"alerts": out}))
}

/// `POST /-/reload`: certificates, rule files and notifier configuration, each all or nothing.
async fn reload(State(s): State<AppState>) -> Response {
    let reloader = s.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.reload()).await {
        Ok(Ok(())) => (StatusCode::OK, "").into_response(),
        Ok(Err(e)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to reload config: {e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reload task failed: {e}\n")).into_response(),
    }
}

/// An Alertmanager API v2 error: the message as a JSON string.
fn v2_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!(message.to_string()))).into_response()
}

async fn v2_alerts(State(s): State<AppState>) -> Response {
    match s.alerting.notifier().alerts_json().await {
        Ok(alerts) => Json(alerts).into_response(),
        Err(e) => v2_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert {
    labels: Labels,
    #[serde(default)]
    annotations: Labels,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default, rename = "generatorURL")]
    generator_url: String,
}

/// `POST /api/v2/alerts`: alerts from any source, notified like the rules' own.
async fn post_alerts(State(s): State<AppState>, body: Bytes) -> Response {
    let posted: Vec<PostableAlert> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return v2_error(StatusCode::BAD_REQUEST, format!("invalid alerts: {e}")),
    };
    let notifier = s.alerting.notifier();
    let now = notifier.now();
    let timeout = notifier.resolve_timeout().as_millis() as i64;
    let mut alerts = Vec::with_capacity(posted.len());
    for (i, p) in posted.into_iter().enumerate() {
        let time = |name: &str, v: &Option<String>| -> Result<Option<i64>, String> {
            match v.as_deref() {
                None | Some("") => Ok(None),
                Some(t) => match parse_rfc3339(t) {
                    // Go's zero time (however written) means "not set".
                    Some(ms) if Some(ms) == parse_rfc3339(ZERO_TIME) => Ok(None),
                    Some(ms) => Ok(Some(ms)),
                    None => Err(format!("alert {i}: {name}: not an RFC 3339 time: {t:?}")),
                },
            }
        };
        let (starts, ends) = match (time("startsAt", &p.starts_at), time("endsAt", &p.ends_at)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return v2_error(StatusCode::BAD_REQUEST, e),
        };
        if p.labels.is_empty() {
            return v2_error(StatusCode::BAD_REQUEST, format!("alert {i}: at least one label pair required"));
        }
        if let Some(bad) = p.labels.keys().find(|k| !crate::alerting::rules::valid_label_name(k)) {
            return v2_error(StatusCode::BAD_REQUEST, format!("alert {i}: invalid label name {bad:?}"));
        }
        // Alertmanager's defaults: a resolve posted without a start starts when it ends.
        let starts_at = starts.or(ends.filter(|&e| e < now)).unwrap_or(now);
        let ends_at = ends.unwrap_or(now.max(starts_at) + timeout);
        if ends_at < starts_at {
            return v2_error(
                StatusCode::BAD_REQUEST,
                format!("alert {i}: start time must be before end time"),
            );
        }
        alerts.push(Alert {
            labels: p.labels,
            annotations: p.annotations,
            starts_at,
            ends_at,
            generator_url: p.generator_url,
        });
    }
    // Admitted (and routed) by the notifier, all or none.
    match notifier.post(alerts).await {
        Ok(()) => {}
        Err(e @ NotifierError::Full) => {
            s.metrics.limit_hit("alerting.max_alerts");
            return v2_error(StatusCode::TOO_MANY_REQUESTS, e);
        }
        Err(e @ NotifierError::Stopped) => return v2_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
    (StatusCode::OK, "").into_response()
}

async fn list_silences(State(s): State<AppState>) -> Response {
    let notifier = s.alerting.notifier();
    Json(notifier.silences().list(notifier.now())).into_response()
}

fn silence_error(e: SilenceError) -> Response {
    match e {
        SilenceError::Invalid(m) => v2_error(StatusCode::BAD_REQUEST, m),
        SilenceError::NotFound(_) => v2_error(StatusCode::NOT_FOUND, e),
        SilenceError::Limit(m) => v2_error(StatusCode::TOO_MANY_REQUESTS, m),
        SilenceError::Store(e) => v2_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn post_silence(State(s): State<AppState>, body: Bytes) -> Response {
    let p: PostableSilence = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return v2_error(StatusCode::BAD_REQUEST, format!("invalid silence: {e}")),
    };
    let notifier = s.alerting.notifier();
    match notifier.silences().upsert(p, notifier.now()) {
        Ok(id) => Json(json!({"silenceID": id})).into_response(),
        Err(e) => silence_error(e),
    }
}

async fn get_silence(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let notifier = s.alerting.notifier();
    match notifier.silences().get(&id, notifier.now()) {
        Some(v) => Json(v).into_response(),
        None => silence_error(SilenceError::NotFound(id)),
    }
}

async fn delete_silence(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let notifier = s.alerting.notifier();
    match notifier.silences().expire(&id, notifier.now()) {
        Ok(()) => (StatusCode::OK, "").into_response(),
        Err(e) => silence_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_as_prometheus_does() {
        assert_eq!(go_e(1.5), "1.5e+00");
        assert_eq!(go_e(0.000_25), "2.5e-04");
        assert_eq!(go_e(12345.0), "1.2345e+04");
        assert_eq!(go_e(f64::NAN), "NaN");
    }
}
