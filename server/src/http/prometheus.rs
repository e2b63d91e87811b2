//! The Prometheus HTTP API, so Grafana reads tailscope as an ordinary Prometheus data source:
//! the same paths, parameters (GET query string and POST form alike), response envelope, value
//! encoding and error types.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value as Json_};

use super::envelope::{self, respond, success, success_with_warnings, ApiError};
use super::AppState;
use crate::query::promql::{self, format_value, Engine, EvalError, Limits, Series, Steps, Value};
use crate::query::{exemplars, labels, parse_time};

/// Most points per series of a range query (as Prometheus).
pub const MAX_POINTS: usize = 11_000;

/// The Prometheus-compatible routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/query", get(query).post(query))
        .route("/api/v1/query_range", get(query_range).post(query_range))
        .route("/api/v1/labels", get(labels).post(labels))
        .route("/api/v1/label/{name}/values", get(label_values))
        .route("/api/v1/series", get(series).post(series))
        .route("/api/v1/metadata", get(metadata))
        .route("/api/v1/status/buildinfo", get(buildinfo))
        .route("/api/v1/query_exemplars", get(exemplars).post(exemplars))
}

/// Request parameters: the query string, then the form body of a POST.
#[derive(Debug, Default)]
pub(super) struct Params(Vec<(String, String)>);

/// Reads the parameters of any request: the query string, then a form body of a POST.
impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Params, Response> {
        let method = req.method().clone();
        let headers = req.headers().clone();
        let query = req.uri().query().map(str::to_owned);
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_data(format!("cannot read the request body: {e}")).into_response())?;
        Ok(Params::new(&method, &headers, query, &body))
    }
}

impl Params {
    fn new(method: &Method, headers: &HeaderMap, query: Option<String>, body: &Bytes) -> Params {
        let mut pairs: Vec<(String, String)> =
            query.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
        let is_form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if method == Method::POST && is_form {
            pairs.extend(form_urlencoded::parse(body).into_owned());
        }
        Params(pairs)
    }

    /// Every parameter's name and value, in order.
    pub(super) fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    pub(super) fn time(&self, name: &str, default: f64) -> Result<f64, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(v) => parse_time(name, v).map_err(ApiError::bad_data),
        }
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        match self.get("limit") {
            None | Some("") => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(ApiError::bad_data(format!(
                    "invalid parameter \"limit\": cannot parse {v:?} to a valid limit"
                ))),
            },
        }
    }
}

/// A time as Prometheus writes it: float seconds (whole seconds without a fraction).
fn json_time(ms: i64) -> Json_ {
    if ms % 1000 == 0 {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

fn parse_duration(name: &str, v: &str) -> Result<Duration, ApiError> {
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 && secs < 1e12 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    promql::parse_duration(v).map_err(|_| {
        ApiError::bad_data(format!("invalid parameter \"{name}\": cannot parse {v:?} to a valid duration"))
    })
}

fn parse_query(s: &AppState, p: &Params) -> Result<promql_parser::parser::Expr, ApiError> {
    let q = p.get("query").unwrap_or("");
    promql::parse_bounded(q, s.query.max_depth).map_err(|e| {
        if e.contains("query.max_depth") {
            s.metrics.limit_hit("query.max_depth");
        }
        ApiError::bad_data(format!("invalid parameter \"query\": {e}"))
    })
}

pub(super) fn deadline(s: &AppState, p: &Params) -> Result<Instant, ApiError> {
    let limit = s.query.timeout;
    let timeout = match p.get("timeout") {
        None | Some("") => limit,
        Some(v) => parse_duration("timeout", v)?.min(limit),
    };
    Ok(Instant::now() + timeout)
}

/// One of the `query.max_concurrency` slots that queries, label and series walks and exemplar
/// reads share, waited for until `deadline`.
async fn query_slot(s: &AppState, deadline: Instant) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let wait = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(wait, s.queries.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => {
            s.metrics.limit_hit("query.max_concurrency");
            Err(ApiError::from(EvalError::Timeout("waiting for a query slot (query.max_concurrency)")))
        }
    }
}

/// Evaluates `expr` at `steps` and renders the answer, both on a blocking thread and both
/// within the request's budget: the deadline covers evaluation *and* building the response,
/// at most `query.max_concurrency` queries run at once (others wait their turn within their
/// deadline), and the work stops when the client leaves.
async fn evaluate(
    s: &AppState,
    expr: promql_parser::parser::Expr,
    steps: Steps,
    deadline: Instant,
    render: fn(Value, &Steps, &crate::query::Budget) -> Result<Vec<u8>, EvalError>,
) -> Result<Response, ApiError> {
    with_engine(s, steps, deadline, move |engine, steps, budget| {
        let value = engine.eval(&expr)?;
        // Bucket histograms leave the engine as bucket series.
        let value = match value {
            Value::Hist(_) => engine.materialized(value)?,
            v => v,
        };
        budget.check("building the response")?;
        render(value, steps, budget)
    })
    .await
}

/// Runs `job` with an engine over the store at `steps` on a blocking thread, within the
/// request's budget ([`evaluate`]'s rules: the deadline, a `query.max_concurrency` slot,
/// cancelled when the client leaves), and answers the JSON it renders.
pub(super) async fn with_engine(
    s: &AppState,
    steps: Steps,
    deadline: Instant,
    job: impl FnOnce(&Engine<'_>, &Steps, &crate::query::Budget) -> Result<Vec<u8>, EvalError> + Send + 'static,
) -> Result<Response, ApiError> {
    let budget = crate::query::Budget::new(deadline);
    let _cancel = budget.cancel_on_drop();
    let _permit = query_slot(s, deadline).await?;
    let source = s.sources.open();
    let retention = s.retention.clone();
    let now = s.clock.now_seconds();
    let limits = Limits {
        max_series: s.query.max_series,
        max_points: MAX_POINTS,
        max_samples: s.query.max_samples,
        deadline,
    };
    let bytes = tokio::task::spawn_blocking(move || {
        let engine = Engine::new(&*source, &steps, now, &retention, limits);
        job(&engine, &steps, &budget)
    })
    .await
    .map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
    .map_err(|e| {
        if let EvalError::Execution(m) = &e {
            if m.contains("query.max_samples") {
                s.metrics.limit_hit("query.max_samples");
            }
        }
        if matches!(e, EvalError::Timeout(_)) {
            s.metrics.limit_hit("query.timeout");
        }
        ApiError::from(e)
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

fn write_json(out: &mut Vec<u8>, v: &impl serde::Serialize) -> Result<(), EvalError> {
    serde_json::to_writer(out, v).map_err(|e| EvalError::Execution(format!("cannot render the answer: {e}")))
}

fn render_instant(value: Value, steps: &Steps, _: &crate::query::Budget) -> Result<Vec<u8>, EvalError> {
    let t = steps.times()[0];
    let data = match value {
        Value::Scalar(v) => json!({"resultType": "scalar", "result": [json_time(t), format_value(v[0])]}),
        Value::Str(st) => json!({"resultType": "string", "result": [json_time(t), st]}),
        Value::Vector(series) => json!({
            "resultType": "vector",
            "result": series.iter().filter_map(|s| s.values[0].map(|v| json!({
                "metric": s.labels,
                "value": [json_time(t), format_value(v)],
            }))).collect::<Vec<_>>(),
        }),
        Value::Hist(_) => json!({"resultType": "vector", "result": []}),
        Value::Native(series) => json!({
            "resultType": "vector",
            "result": series.iter().filter_map(|s| s.values[0].as_ref().map(|h| json!({
                "metric": s.labels,
                "histogram": [json_time(t), native_json(h)],
            }))).collect::<Vec<_>>(),
        }),
    };
    envelope::write_success(|out| write_json(out, &data))
}

/// A native histogram as the Prometheus API writes it: count, sum and `[boundary rule, lower,
/// upper, count]` per bucket, numbers as strings (rule 3: both bounds inclusive).
fn native_json(h: &promql::NativeSample) -> serde_json::Value {
    json!({
        "count": format_value(h.count),
        "sum": format_value(h.sum),
        "buckets": h.buckets.iter().map(|&(lo, hi, n)| json!([3, format_value(lo), format_value(hi), format_value(n)])).collect::<Vec<_>>(),
    })
}

/// A range answer, written point by point (no JSON tree of millions of values in between),
/// checking the budget as it goes.
fn render_matrix(value: Value, steps: &Steps, budget: &crate::query::Budget) -> Result<Vec<u8>, EvalError> {
    let series = match value {
        Value::Scalar(v) => {
            vec![Series { labels: promql::Labels::new(), values: v.into_iter().map(Some).collect() }]
        }
        Value::Vector(series) => series,
        Value::Str(_) => {
            return Err(EvalError::Unsupported(
                "invalid expression type \"string\" for range query, must be Scalar or instant Vector".into(),
            ))
        }
        Value::Hist(_) => Vec::new(),
        Value::Native(series) => return render_native_matrix(&series, steps, budget),
    };
    let times = steps.times();
    envelope::write_success(|out| {
        out.extend_from_slice(br#"{"resultType":"matrix","result":["#);
        let mut first = true;
        for (i, s) in series.iter().filter(|s| s.values.iter().any(Option::is_some)).enumerate() {
            if i % 64 == 0 {
                budget.check("building the response")?;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(br#"{"metric":"#);
            write_json(out, &s.labels)?;
            out.extend_from_slice(br#","values":["#);
            let mut first_point = true;
            for (v, &t) in s.values.iter().zip(times) {
                let Some(v) = v else { continue };
                if !first_point {
                    out.push(b',');
                }
                first_point = false;
                out.push(b'[');
                write_json(out, &json_time(t))?;
                out.extend_from_slice(b",\"");
                out.extend_from_slice(format_value(*v).as_bytes());
                out.extend_from_slice(b"\"]");
            }
            out.extend_from_slice(b"]}");
        }
        out.extend_from_slice(b"]}");
        Ok(())
    })
}

/// A range answer of native histograms: `histograms` instead of `values`.
fn render_native_matrix(
    series: &[promql::NativeSeries],
    steps: &Steps,
    budget: &crate::query::Budget,
) -> Result<Vec<u8>, EvalError> {
    let times = steps.times();
    envelope::write_success(|out| {
        out.extend_from_slice(br#"{"resultType":"matrix","result":["#);
        for (i, s) in series.iter().enumerate() {
            budget.check("building the response")?;
            if i > 0 {
                out.push(b',');
            }
            let points: Vec<serde_json::Value> = s
                .values
                .iter()
                .zip(times)
                .filter_map(|(h, &t)| Some(json!([json_time(t), native_json(h.as_ref()?)])))
                .collect();
            write_json(out, &json!({"metric": s.labels, "histograms": points}))?;
        }
        out.extend_from_slice(b"]}");
        Ok(())
    })
}

async fn query(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        let expr = parse_query(&s, &p)?;
        let now = s.clock.now_nanos() as f64 / 1e9;
        let t = (p.time("time", now)? * 1000.0).round() as i64;
        evaluate(&s, expr, Steps::instant(t), deadline(&s, &p)?, render_instant).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn query_range(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        let expr = parse_query(&s, &p)?;
        let missing = |n: &str| {
            ApiError::bad_data(format!("invalid parameter \"{n}\": cannot parse \"\" to a valid timestamp"))
        };
        let start = p.get("start").ok_or_else(|| missing("start"))?;
        let end = p.get("end").ok_or_else(|| missing("end"))?;
        let start = parse_time("start", start).map_err(ApiError::bad_data)?;
        let end = parse_time("end", end).map_err(ApiError::bad_data)?;
        if end < start {
            return Err(ApiError::bad_data(
                "invalid parameter \"end\": end timestamp must not be before start time",
            ));
        }
        let step = match p.get("step") {
            None | Some("") => {
                return Err(ApiError::bad_data(
                    "invalid parameter \"step\": cannot parse \"\" to a valid duration",
                ))
            }
            // A number of seconds may be zero or negative; Steps::range refuses those.
            Some(v) => match v.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs <= 0.0 => Duration::ZERO,
                _ => parse_duration("step", v)?,
            },
        };
        let step_ms = step.as_millis() as i64;
        let steps =
            Steps::range((start * 1000.0).round() as i64, (end * 1000.0).round() as i64, step_ms, MAX_POINTS)
                .map_err(|e| match e {
                    EvalError::Unsupported(m) if step_ms <= 0 => {
                        ApiError::bad_data(format!("invalid parameter \"step\": {m}"))
                    }
                    other => ApiError::from(other),
                })?;
        evaluate(&s, expr, steps, deadline(&s, &p)?, render_matrix).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The `match[]` selectors of a request, parsed.
fn match_selectors(s: &AppState, p: &Params) -> Result<Vec<promql_parser::parser::VectorSelector>, ApiError> {
    let mut parsed = Vec::new();
    for sel in p.all("match[]") {
        match promql::parse_bounded(sel, s.query.max_depth) {
            Ok(promql_parser::parser::Expr::VectorSelector(vs)) => parsed.push(vs),
            Ok(_) => {
                return Err(ApiError::bad_data(format!(
                    "invalid parameter \"match[]\": {sel:?} is not a series selector"
                )))
            }
            Err(e) => {
                if e.contains("query.max_depth") {
                    s.metrics.limit_hit("query.max_depth");
                }
                return Err(ApiError::bad_data(format!("invalid parameter \"match[]\": {e}")));
            }
        }
    }
    Ok(parsed)
}

/// Runs a series or label walk off the async runtime within the request's budget (the query
/// timeout; cancelled when the client leaves), answering at most `limit` items (the request's
/// `limit`, else `query.max_series`) with Prometheus' warning when more matched. It takes one
/// of the query slots, like a query.
async fn label_walk<T: serde::Serialize + Send + 'static>(
    s: &AppState,
    p: &Params,
    walk: impl FnOnce(
            &dyn crate::store::Source,
            usize,
            &crate::query::Budget,
        ) -> Result<labels::Capped<T>, EvalError>
        + Send
        + 'static,
) -> Response {
    let result = async {
        p.time("start", 0.0)?;
        p.time("end", 0.0)?;
        let limit = p.limit()?.unwrap_or(s.query.max_series).min(s.query.max_series);
        let deadline = deadline(s, p)?;
        let budget = crate::query::Budget::new(deadline);
        let _cancel = budget.cancel_on_drop();
        let _permit = query_slot(s, deadline).await?;
        let source = s.sources.open();
        let found = tokio::task::spawn_blocking(move || walk(&*source, limit, &budget))
            .await
            .map_err(|e| ApiError::internal(format!("label task failed: {e}")))?
            .map_err(ApiError::from)?;
        Ok::<_, ApiError>(found)
    }
    .await;
    match result {
        Ok(found) if found.truncated => {
            s.metrics.limit_hit("query.max_series");
            let warning = "results truncated due to limit (the request's limit, or query.max_series)";
            success_with_warnings(found.items, vec![warning.to_owned()])
        }
        Ok(found) => success(found.items),
        Err(e) => e.into_response(),
    }
}

async fn labels(State(s): State<AppState>, p: Params) -> Response {
    let selectors = match match_selectors(&s, &p) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    label_walk(&s, &p, move |store, limit, budget| labels::names(store, &selectors, limit, budget)).await
}

async fn label_values(State(s): State<AppState>, Path(name): Path<String>, p: Params) -> Response {
    let selectors = match match_selectors(&s, &p) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    label_walk(&s, &p, move |store, limit, budget| labels::values(store, &selectors, &name, limit, budget))
        .await
}

async fn series(State(s): State<AppState>, p: Params) -> Response {
    if p.all("match[]").is_empty() {
        return ApiError::bad_data("no match[] parameter provided").into_response();
    }
    let selectors = match match_selectors(&s, &p) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    label_walk(&s, &p, move |store, limit, budget| labels::series(store, &selectors, limit, budget)).await
}

async fn metadata(State(s): State<AppState>, p: Params) -> Response {
    let entry = |help: &str| json!([{ "type": "histogram", "help": help, "unit": "seconds" }]);
    let all = [
        (promql::METRIC, entry("Duration of spans, by service, operation and status (ok or error).")),
        (
            promql::SELF_NAMES[3],
            entry("Self time of spans: their duration minus the calls they waited on, by service, operation and status."),
        ),
    ];
    let wanted = p.get("metric");
    // Self times are listed once some series has them, as Prometheus lists what it scraped.
    let source = s.sources.open();
    let selfs = tokio::task::spawn_blocking(move || labels::self_times_stored(&*source).unwrap_or(false))
        .await
        .unwrap_or(false);
    let out: serde_json::Map<String, Json_> = all
        .into_iter()
        .filter(|(name, _)| *name == promql::METRIC || selfs)
        .filter(|(name, _)| wanted.is_none_or(|m| m == *name))
        .map(|(name, e)| (name.to_owned(), e))
        .collect();
    success(Json_::Object(out))
}

async fn buildinfo() -> Response {
    success(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": "",
        "branch": "",
        "buildUser": "",
        "buildDate": "",
        "goVersion": "",
    }))
}

/// `GET /api/v1/query_exemplars`: the exemplars of the bucket series the query's selectors
/// select ([`exemplars::select`]).
async fn exemplars(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        let expr = parse_query(&s, &p)?;
        let now = s.clock.now_seconds() as f64;
        let start = p.time("start", now - 3600.0)?;
        let end = p.time("end", now)?;
        if end < start {
            return Err(ApiError::bad_data(
                "invalid parameter \"end\": end timestamp must not be before start time",
            ));
        }
        let selectors: Vec<promql_parser::parser::VectorSelector> =
            promql::selectors(&expr).into_iter().cloned().collect();
        let source = s.sources.open();
        // Within the query timeout, in a query slot, and cancelled when the client leaves.
        let deadline = deadline(&s, &p)?;
        let budget = crate::query::Budget::new(deadline);
        let _cancel = budget.cancel_on_drop();
        let _permit = query_slot(&s, deadline).await?;
        let found =
            tokio::task::spawn_blocking(move || exemplars::select(&*source, &selectors, start, end, &budget))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::from)?;
        Ok::<_, ApiError>(found)
    }
    .await;
    respond(result)
}
