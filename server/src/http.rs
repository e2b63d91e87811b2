//! The HTTP API: health, readiness, self-metrics, and the native tail endpoint.

pub mod alerts;
pub mod envelope;
pub mod prometheus;
pub mod topology;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::clock::Clock;
use crate::pipeline::Pipeline;
use crate::query::{self, QueryError, RangePlan, SeriesFilter};

use crate::store::RetentionConfig;
use crate::store::Store;
use crate::telemetry::{ColumnFamilyLabel, Metrics};
use envelope::ApiError;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The ingest pipeline (readiness, queue depths).
    pub pipeline: Arc<Pipeline>,
    /// The store (its sizes, its health).
    pub store: Store,
    /// What queries read: the store, or in a cluster each partition's owner.
    pub sources: Arc<dyn crate::query::Sources>,
    /// Self-metrics.
    pub metrics: Arc<Metrics>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Retention, for choosing a resolution.
    pub retention: RetentionConfig,
    /// The adaptive sampler.
    pub sampler: std::sync::Arc<crate::sampling::Sampler>,
    /// Rules, alerts, silences.
    pub alerting: Arc<crate::alerting::Alerting>,
    /// Limits of the query API.
    pub query: crate::config::QueryConfig,
    /// One permit per query evaluated at once (`query.max_concurrency`).
    pub queries: Arc<tokio::sync::Semaphore>,
    /// What `POST /-/reload` re-reads.
    pub reloader: crate::reload::Reloader,
    /// Who may read, write and administer.
    pub auth: Arc<crate::auth::Auth>,
    /// Why queries are refused (a cluster node without the query role).
    pub refusing_queries: Option<Arc<str>>,
    /// What a strong read waits for (a cluster store node); none on a single node.
    pub read_barrier: Option<Arc<dyn crate::query::ReadBarrier>>,
    /// Cluster mode: what `/api/v1/status/cluster` reads.
    pub cluster: Option<Arc<crate::cluster::StatusReader>>,
}

/// The routes of the HTTP listener.
pub fn router(state: AppState) -> Router {
    let mut queries =
        Router::new().route("/api/v1/tail", get(tail)).merge(prometheus::routes()).merge(topology::routes());
    queries = queries.route_layer(axum::middleware::from_fn_with_state(state.clone(), read_consistency));
    if let Some(why) = state.refusing_queries.clone() {
        queries =
            queries.route_layer(axum::middleware::from_fn(
                move |_: axum::extract::Request, _: axum::middleware::Next| {
                    let why = why.clone();
                    async move {
                        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why).into_response()
                    }
                },
            ));
    }
    Router::new()
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/sampling", get(sampling))
        .route("/api/v1/status/cluster", get(cluster_status))
        .merge(queries)
        .merge(alerts::routes())
        .layer(axum::middleware::from_fn_with_state(state.auth.clone(), crate::auth::guard_http))
        .with_state(state)
}

/// The header a client asks for a strong read with (Mimir's name and values).
pub const READ_CONSISTENCY: &str = "x-read-consistency";

/// `X-Read-Consistency: strong` makes a query wait until this node sees everything
/// acknowledged before it was sent ([`crate::query::ReadBarrier`]); `eventual` (the default)
/// answers from what is written now. A single node's reads are always strong.
async fn read_consistency(
    State(s): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let strong = match request.headers().get(READ_CONSISTENCY).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("eventual") => false,
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("strong") => true,
        Some(v) => {
            let shown = v.map_or_else(|_| "(not text)".to_owned(), |v| format!("{v:?}"));
            return ApiError::bad_data(format!(
                "header X-Read-Consistency: {shown} is neither \"strong\" nor \"eventual\""
            ))
            .into_response();
        }
    };
    if strong {
        if let Some(barrier) = &s.read_barrier {
            if let Err(why) = barrier.wait().await {
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why).into_response();
            }
        }
    }
    next.run(request).await
}

/// `GET /api/v1/status/cluster`: this node, the cluster's members and each partition's log
/// next to what this node has written of it. A single node says so.
async fn cluster_status(State(s): State<AppState>) -> Response {
    let Some(reader) = &s.cluster else {
        return envelope::success(json!({ "mode": "single" }));
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), reader.read()).await {
        Ok(Ok(status)) => {
            let mut v = serde_json::to_value(status).unwrap_or_default();
            v["mode"] = json!("cluster");
            envelope::success(v)
        }
        Ok(Err(e)) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("cluster status: {e}"))
                .into_response()
        }
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "cluster status: NATS did not answer within 10s",
        )
        .into_response(),
    }
}

/// Each series key's observed and kept throughput and its sampling probability.
async fn sampling(State(s): State<AppState>) -> Response {
    let keys: Vec<Value> = s
        .sampler
        .snapshot()
        .into_iter()
        .map(|(service, operation, v)| {
            json!({
                "service": service,
                "operation": operation,
                "observed_per_second": v.observed_per_second,
                "kept_per_second": v.kept_per_second,
                "probability": v.probability,
                "always_keep_above_seconds": v.always_keep_above_nanos as f64 / 1e9,
            })
        })
        .collect();
    let kept: f64 = keys.iter().filter_map(|k| k["kept_per_second"].as_f64()).sum();
    envelope::success(json!({
        "budget": s.sampler.budget(),
        "share": s.sampler.share(),
        "effective_budget": s.sampler.effective_budget(),
        "kept_per_second": kept,
        "keys": keys,
    }))
}

async fn healthy() -> &'static str {
    "tailscope is healthy.\n"
}

async fn ready(State(s): State<AppState>) -> Response {
    if s.pipeline.is_ready() {
        (StatusCode::OK, "tailscope is ready.\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "tailscope is not ready: the store is failing or the server is shutting down.\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    s.pipeline.refresh_metrics();
    s.alerting.refresh_metrics();
    let store = s.store.clone();
    let sizes = tokio::task::spawn_blocking(move || store.sizes()).await.unwrap_or_default();
    for (column_family, bytes) in sizes {
        s.metrics.store_bytes.get_or_create(&ColumnFamilyLabel { column_family }).set(bytes as i64);
    }
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.encode(),
    )
        .into_response()
}

/// `GET /api/v1/tail?service=&operation=&start=&end=`: per series, count, min, max, mean and
/// p50/p90/p99/p99.9 (in seconds) over the range, from the merged histograms. `end` defaults to
/// now and `start` to one hour before `end`.
async fn tail(State(s): State<AppState>, Query(params): Query<HashMap<String, String>>) -> Response {
    envelope::respond(tail_body(&s, &params).await.map_err(ApiError::from))
}

async fn tail_body(s: &AppState, params: &HashMap<String, String>) -> Result<Value, QueryError> {
    for key in params.keys() {
        if !matches!(key.as_str(), "service" | "operation" | "span_kind" | "peer" | "start" | "end") {
            return Err(QueryError::BadData(format!(
                "unknown parameter \"{key}\" (expected service, operation, span_kind, peer, start, end)"
            )));
        }
    }
    let now = s.clock.now_nanos() as f64 / 1e9;
    let end = params.get("end").map(|v| query::parse_time("end", v)).transpose()?.unwrap_or(now);
    let start =
        params.get("start").map(|v| query::parse_time("start", v)).transpose()?.unwrap_or(end - 3600.0);
    if end < start {
        return Err(QueryError::BadData("end timestamp must not be before start time".into()));
    }
    let filter = SeriesFilter {
        service: params.get("service").cloned(),
        operation: params.get("operation").cloned(),
        span_kind: params.get("span_kind").cloned(),
        peer: params.get("peer").cloned(),
    };
    let plan = RangePlan::new(start.floor() as i64, end.ceil() as i64, now as i64, &s.retention);
    let source = s.sources.open();
    // Within the query timeout, and cancelled when the client leaves (the guard is dropped
    // with this future).
    let budget = query::Budget::new(std::time::Instant::now() + s.query.timeout);
    let _cancel = budget.cancel_on_drop();
    let (resolution, covered) = (plan.coarsest(), (plan.start, plan.end));
    let rows = tokio::task::spawn_blocking(move || query::merged_series(&*source, &filter, &plan, &budget))
        .await
        .map_err(|e| QueryError::BadData(format!("query task failed: {e}")))??;
    let secs = |ns: Option<u64>| ns.map(|v| v as f64 / 1e9);
    let series: Vec<Value> = rows
        .iter()
        .map(|r| {
            let h = &r.histogram;
            json!({
                "service": r.labels.service,
                "operation": r.labels.operation,
                "status": r.labels.status.as_str(),
                "span_kind": r.labels.kind.as_str(),
                "peer": r.labels.peer,
                "count": h.count(),
                "clamped": h.clamped(),
                "min": secs(h.min()),
                "max": secs(h.max()),
                "mean": h.mean().map(|m| m / 1e9),
                "p50": secs(h.quantile(0.5)),
                "p90": secs(h.quantile(0.9)),
                "p99": secs(h.quantile(0.99)),
                "p999": secs(h.quantile(0.999)),
            })
        })
        .collect();
    Ok(json!({
        "resolution": resolution.name(),
        "start": covered.0,
        "end": covered.1,
        "series": series,
    }))
}
