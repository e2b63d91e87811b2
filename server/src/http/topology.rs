//! `GET /api/v1/topology?start=&end=`: the service graph over a range (default: the hour
//! before `end`, which defaults to now) as the frames Grafana's Node Graph panel draws —
//! `nodes` (`id`, `title`, `subtitle`, `mainstat`, `secondarystat`, `arc__ok`, `arc__error`,
//! `detail__*`) and `edges` (`id`, `source`, `target`, `mainstat`, `secondarystat`,
//! `detail__*`) — with exact counts and p99s ([`crate::query::topology`]).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::envelope::ApiError;
use super::prometheus::{deadline, with_engine, Params};
use super::AppState;
use crate::query::promql::{EvalError, Steps};
use crate::query::topology;

/// The topology route.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/topology", get(topology_handler))
}

async fn topology_handler(State(s): State<AppState>, p: Params) -> Response {
    let result = async {
        for (key, _) in p.pairs() {
            if !matches!(key, "start" | "end" | "timeout") {
                return Err(ApiError::bad_data(format!(
                    "unknown parameter \"{key}\" (expected start, end, timeout)"
                )));
            }
        }
        let now = s.clock.now_nanos() as f64 / 1e9;
        let end = p.time("end", now)?;
        let start = p.time("start", end - 3600.0)?;
        if end <= start {
            return Err(ApiError::bad_data("end timestamp must be after start time"));
        }
        let range = ((end - start).ceil() as i64).max(1);
        let steps = Steps::instant((end * 1000.0).round() as i64);
        with_engine(&s, steps, deadline(&s, &p)?, move |engine, _, budget| {
            let g = topology::graph(engine, range)?;
            budget.check("building the response")?;
            render(&g, range)
        })
        .await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

fn render(g: &topology::Graph, range: i64) -> Result<Vec<u8>, EvalError> {
    let per_second = |n: f64| n / range as f64;
    let nodes: Vec<_> = g
        .nodes
        .iter()
        .map(|(id, n)| {
            let error_ratio = if n.spans > 0.0 { n.errors / n.spans } else { 0.0 };
            json!({
                "id": id,
                "title": id,
                "subtitle": if n.instrumented { "" } else { "not instrumented" },
                "mainstat": n.p99_seconds,
                "secondarystat": per_second(n.spans),
                "arc__ok": if n.spans > 0.0 { 1.0 - error_ratio } else { 0.0 },
                "arc__error": error_ratio,
                "detail__spans": n.spans,
                "detail__errors": n.errors,
                "detail__p99_seconds": n.p99_seconds,
                "detail__instrumented": n.instrumented,
            })
        })
        .collect();
    let edges: Vec<_> = g
        .edges
        .iter()
        .map(|((client, server), e)| {
            json!({
                "id": format!("{client}->{server}"),
                "source": client,
                "target": server,
                "mainstat": per_second(e.calls),
                "secondarystat": e.p99_seconds,
                "detail__connection_type": e.connection_type,
                "detail__calls": e.calls,
                "detail__failed": e.failed,
                "detail__mean_seconds": e.mean_seconds,
                "detail__p99_seconds": e.p99_seconds,
            })
        })
        .collect();
    let body = json!({
        "status": "success",
        "data": { "range_seconds": range, "nodes": nodes, "edges": edges },
    });
    serde_json::to_vec(&body).map_err(|e| EvalError::Execution(format!("cannot encode the answer: {e}")))
}
