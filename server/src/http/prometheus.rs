//! The Prometheus HTTP API, so Grafana reads tailscope as an ordinary Prometheus data source:
//! the same paths, parameters (GET query string and POST form alike), response envelope, value
//! encoding and error types.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value as Json_};

use super::{api_error, AppState};
use crate::query::parse_time;
use crate::query::promql::{self, format_value, Engine, EvalError, Limits, Series, Steps, Value, NAMES};

/// Most points per series of a range query (as Prometheus).
pub const MAX_POINTS: usize = 11_000;
/// Most series one query may select.
pub const MAX_SERIES: usize = 50_000;
/// How long a query may run unless `timeout` asks for less.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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
struct Params(Vec<(String, String)>);

/// Reads the parameters of any request: the query string, then a form body of a POST.
impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Params, Response> {
        let method = req.method().clone();
        let headers = req.headers().clone();
        let query = req.uri().query().map(str::to_owned);
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| bad_data(format!("cannot read the request body: {e}")).into_response())?;
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

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    fn time(&self, name: &str, default: f64) -> Result<f64, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(v) => parse_time(name, v).map_err(bad_data),
        }
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        match self.get("limit") {
            None | Some("") => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(n)),
                Err(_) => {
                    Err(bad_data(format!("invalid parameter \"limit\": cannot parse {v:?} to a valid limit")))
                }
            },
        }
    }
}

/// A Prometheus API error: HTTP status, `errorType` and message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        api_error(self.status, self.kind, self.message)
    }
}

fn bad_data(e: impl std::fmt::Display) -> ApiError {
    ApiError { status: StatusCode::BAD_REQUEST, kind: "bad_data", message: e.to_string() }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "internal", message: e.to_string() }
}

/// Answers with the data, or with the error.
fn respond(result: Result<Json_, ApiError>) -> Response {
    match result {
        Ok(data) => success(data),
        Err(e) => e.into_response(),
    }
}

fn success(data: Json_) -> Response {
    Json(json!({"status": "success", "data": data})).into_response()
}

fn eval_error(e: EvalError) -> ApiError {
    let (status, kind) = match &e {
        EvalError::Unsupported(_) => (StatusCode::BAD_REQUEST, "bad_data"),
        EvalError::Execution(_) => (StatusCode::UNPROCESSABLE_ENTITY, "execution"),
        EvalError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
        EvalError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    ApiError { status, kind, message: e.to_string() }
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
        bad_data(format!("invalid parameter \"{name}\": cannot parse {v:?} to a valid duration"))
    })
}

fn parse_query(p: &Params) -> Result<promql_parser::parser::Expr, ApiError> {
    let q = p.get("query").unwrap_or("");
    promql::parse(q).map_err(|e| bad_data(format!("invalid parameter \"query\": {e}")))
}

fn deadline(p: &Params) -> Result<Instant, ApiError> {
    let timeout = match p.get("timeout") {
        None | Some("") => DEFAULT_TIMEOUT,
        Some(v) => parse_duration("timeout", v)?.min(DEFAULT_TIMEOUT),
    };
    Ok(Instant::now() + timeout)
}

/// Evaluates `expr` at `steps` on a blocking thread.
async fn evaluate(
    s: &AppState,
    expr: promql_parser::parser::Expr,
    steps: Steps,
    deadline: Instant,
) -> Result<Value, ApiError> {
    let store = s.store.clone();
    let retention = s.retention.clone();
    let now = s.clock.now_seconds();
    let limits = Limits { max_series: MAX_SERIES, max_points: MAX_POINTS, deadline };
    tokio::task::spawn_blocking(move || {
        let engine = Engine::new(&store, &steps, now, &retention, limits);
        let value = engine.eval(&expr)?;
        // Bucket histograms leave the engine as bucket series.
        match value {
            Value::Hist(_) => engine.materialized(value),
            v => Ok(v),
        }
    })
    .await
    .map_err(|e| internal(format!("query task failed: {e}")))?
    .map_err(eval_error)
}

async fn query(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        let expr = parse_query(&p)?;
        let now = s.clock.now_nanos() as f64 / 1e9;
        let t = (p.time("time", now)? * 1000.0).round() as i64;
        let value = evaluate(&s, expr, Steps::instant(t), deadline(&p)?).await?;
        Ok::<_, ApiError>(match value {
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
        })
    }
    .await;
    respond(result)
}

async fn query_range(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        let expr = parse_query(&p)?;
        let missing =
            |n: &str| bad_data(format!("invalid parameter \"{n}\": cannot parse \"\" to a valid timestamp"));
        let start = p.get("start").ok_or_else(|| missing("start"))?;
        let end = p.get("end").ok_or_else(|| missing("end"))?;
        let start = parse_time("start", start).map_err(bad_data)?;
        let end = parse_time("end", end).map_err(bad_data)?;
        if end < start {
            return Err(bad_data("invalid parameter \"end\": end timestamp must not be before start time"));
        }
        let step = match p.get("step") {
            None | Some("") => {
                return Err(bad_data("invalid parameter \"step\": cannot parse \"\" to a valid duration"))
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
                        bad_data(format!("invalid parameter \"step\": {m}"))
                    }
                    other => eval_error(other),
                })?;
        let times: Vec<i64> = steps.times().to_vec();
        let value = evaluate(&s, expr, steps, deadline(&p)?).await?;
        let matrix = |series: Vec<Series>| -> Json_ {
            let out: Vec<Json_> = series
                .into_iter()
                .filter(|s| s.values.iter().any(Option::is_some))
                .map(|s| {
                    let values: Vec<Json_> = s
                        .values
                        .iter()
                        .zip(&times)
                        .filter_map(|(v, &t)| v.map(|v| json!([json_time(t), format_value(v)])))
                        .collect();
                    json!({"metric": s.labels, "values": values})
                })
                .collect();
            json!({"resultType": "matrix", "result": out})
        };
        Ok::<_, ApiError>(match value {
            Value::Scalar(v) => matrix(vec![Series {
                labels: promql::Labels::new(),
                values: v.into_iter().map(Some).collect(),
            }]),
            Value::Vector(series) => matrix(series),
            Value::Str(_) => {
                return Err(bad_data(
                    "invalid expression type \"string\" for range query, must be Scalar or instant Vector",
                ))
            }
            Value::Hist(_) => matrix(Vec::new()),
        })
    }
    .await;
    respond(result)
}

/// The label sets of every stored series that one of the `match[]` selectors selects (all
/// series when there are none), each with the names it matched.
async fn matching_series(s: &AppState, p: &Params) -> Result<Vec<promql::Labels>, ApiError> {
    let selectors = p.all("match[]");
    let mut parsed = Vec::new();
    for sel in &selectors {
        match promql::parse(sel) {
            Ok(promql_parser::parser::Expr::VectorSelector(vs)) => parsed.push(vs),
            Ok(_) => {
                return Err(bad_data(format!(
                    "invalid parameter \"match[]\": {sel:?} is not a series selector"
                )))
            }
            Err(e) => return Err(bad_data(format!("invalid parameter \"match[]\": {e}"))),
        }
    }
    let store = s.store.clone();
    let all =
        tokio::task::spawn_blocking(move || store.series()).await.map_err(internal)?.map_err(internal)?;
    let mut out = std::collections::BTreeSet::new();
    for (_, labels) in &all {
        for name in NAMES {
            let les: Vec<String> = if name == promql::BUCKET {
                promql::DEFAULT_LE.iter().map(|&v| format_value(v)).collect()
            } else {
                vec![String::new()]
            };
            for le in les {
                let mut set = promql::Labels::new();
                set.insert("__name__".into(), name.into());
                for k in ["service", "operation", "status"] {
                    if let Some(v) = labels.get(k) {
                        set.insert(k.into(), v.into());
                    }
                }
                if !le.is_empty() {
                    set.insert("le".into(), le);
                }
                let selected = parsed.is_empty()
                    || parsed.iter().any(|vs| {
                        vs.name.as_deref().is_none_or(|n| n == name)
                            && vs
                                .matchers
                                .matchers
                                .iter()
                                .all(|m| m.is_match(set.get(&m.name).map_or("", |v| v)))
                    });
                if selected {
                    out.insert(set);
                }
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// The distinct label names (`name` = None) or values of label `name` of the series the
/// `match[]` selectors select, sorted, cut at `limit`.
async fn label_answer(s: &AppState, p: &Params, name: Option<&str>) -> Result<Json_, ApiError> {
    p.time("start", 0.0)?;
    p.time("end", 0.0)?;
    let limit = p.limit()?;
    let sets = matching_series(s, p).await?;
    let found: std::collections::BTreeSet<String> = match name {
        None => sets.iter().flat_map(|l| l.keys().cloned()).collect(),
        Some(n) => sets.iter().filter_map(|l| l.get(n).cloned()).collect(),
    };
    Ok(json!(found.into_iter().take(limit.unwrap_or(usize::MAX)).collect::<Vec<_>>()))
}

async fn labels(State(s): State<AppState>, p: Params) -> Response {
    respond(label_answer(&s, &p, None).await)
}

async fn label_values(State(s): State<AppState>, Path(name): Path<String>, p: Params) -> Response {
    respond(label_answer(&s, &p, Some(&name)).await)
}

async fn series(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        if p.all("match[]").is_empty() {
            return Err(bad_data("no match[] parameter provided"));
        }
        p.time("start", 0.0)?;
        p.time("end", 0.0)?;
        let limit = p.limit()?;
        let mut sets = matching_series(&s, &p).await?;
        if let Some(n) = limit {
            sets.truncate(n);
        }
        Ok::<_, ApiError>(json!(sets))
    }
    .await;
    respond(result)
}

async fn metadata(p: Params) -> Response {
    let entry = json!([{
        "type": "histogram",
        "help": "Duration of spans, by service, operation and status (ok or error).",
        "unit": "seconds",
    }]);
    match p.get("metric") {
        Some(m) if m != promql::METRIC => success(json!({})),
        _ => success(json!({ promql::METRIC: entry })),
    }
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

/// Most exemplars one query returns.
pub const MAX_EXEMPLARS: usize = 10_000;

/// Exemplars of the bucket series the query's selectors select, in Prometheus' shape: grouped by
/// series (with the `le` of the default ladder the span falls in), each with its trace and span
/// id (and, when the sender said, its sampling adjusted count), duration in seconds and end time.
async fn exemplars(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        let expr = parse_query(&p)?;
        let now = s.clock.now_seconds() as f64;
        let start = p.time("start", now - 3600.0)?;
        let end = p.time("end", now)?;
        if end < start {
            return Err(bad_data("invalid parameter \"end\": end timestamp must not be before start time"));
        }
        let selectors: Vec<promql_parser::parser::VectorSelector> =
            promql::selectors(&expr).into_iter().cloned().collect();
        let store = s.store.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<Json_, crate::store::StoreError> {
            let mut groups: std::collections::BTreeMap<promql::Labels, Vec<Json_>> = Default::default();
            let mut total = 0;
            'series: for (id, labels) in store.series()? {
                let from = start.floor() as i64 - tailscope_proto::BASE_WINDOW_SECONDS;
                for e in store.exemplars(id, from, end.ceil() as i64 + 1)? {
                    let seconds = e.duration_nanos as f64 / 1e9;
                    let at = (e.start_unix_nanos + e.duration_nanos) as f64 / 1e9;
                    if at < start || at > end {
                        continue;
                    }
                    let le =
                        promql::DEFAULT_LE.iter().copied().find(|&le| seconds <= le).unwrap_or(f64::INFINITY);
                    let mut set = promql::Labels::new();
                    set.insert("__name__".into(), promql::BUCKET.into());
                    for k in ["service", "operation", "status"] {
                        if let Some(v) = labels.get(k) {
                            set.insert(k.into(), v.into());
                        }
                    }
                    set.insert("le".into(), format_value(le));
                    let selected = selectors.iter().any(|vs| {
                        vs.name.as_deref().is_none_or(|n| n == promql::BUCKET)
                            && vs
                                .matchers
                                .matchers
                                .iter()
                                .all(|m| m.is_match(set.get(&m.name).map_or("", |v| v)))
                    });
                    if !selected {
                        continue;
                    }
                    let mut ids = json!({
                        "trace_id": format!("{:016x}{:016x}", e.trace_id_high, e.trace_id_low),
                        "span_id": format!("{:016x}", e.span_id),
                    });
                    if e.adjusted_count > 0.0 {
                        ids["adjusted_count"] = format_value(e.adjusted_count).into();
                    }
                    groups.entry(set).or_default().push(json!({
                        "labels": ids,
                        "value": format_value(seconds),
                        "timestamp": at,
                    }));
                    total += 1;
                    if total >= MAX_EXEMPLARS {
                        break 'series;
                    }
                }
            }
            Ok(Json_::Array(
                groups
                    .into_iter()
                    .map(|(labels, ex)| json!({"seriesLabels": labels, "exemplars": ex}))
                    .collect(),
            ))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        Ok::<_, ApiError>(found)
    }
    .await;
    respond(result)
}
