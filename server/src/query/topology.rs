//! The service graph over one range, as nodes and edges with their statistics — what
//! `GET /api/v1/topology` answers and what Grafana's Node Graph panel draws. Read through the
//! PromQL engine over the graph's series ([`promql`](super::promql)'s service-graph names and
//! `span_duration_seconds`), so it is exact exactly as those are.

use std::collections::BTreeMap;

use super::promql::{self, Engine, EvalError, Labels, Value};

#[cfg(test)]
mod tests;

/// One call edge over the range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgeStats {
    /// `database`, `messaging_system` or empty.
    pub connection_type: String,
    /// Calls made (the caller's count).
    pub calls: f64,
    /// Calls that failed.
    pub failed: f64,
    /// Mean time the caller waited, in seconds.
    pub mean_seconds: Option<f64>,
    /// p99 of the time the caller waited, in seconds.
    pub p99_seconds: Option<f64>,
}

/// One service, or an uninstrumented system only seen as a callee, over the range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStats {
    /// Its own spans (server, consumer, internal and unspecified).
    pub spans: f64,
    /// Those that failed.
    pub errors: f64,
    /// p99 of its own spans, in seconds.
    pub p99_seconds: Option<f64>,
    /// False for a node known only as some caller's peer (`db:postgres`): Tempo's virtual node.
    pub instrumented: bool,
}

/// Nodes by name and edges by (client, server).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    /// Every service with spans in the range, and every peer called.
    pub nodes: BTreeMap<String, NodeStats>,
    /// Every edge with calls in the range.
    pub edges: BTreeMap<(String, String), EdgeStats>,
}

/// The graph over the `range` seconds before the engine's (single) step.
pub fn graph(engine: &Engine<'_>, range: i64) -> Result<Graph, EvalError> {
    let by_edge = "client, server, connection_type";
    let edge_values = |expr: &str| -> Result<Vec<(Labels, f64)>, EvalError> { values(engine, expr) };
    let mut g = Graph::default();
    for (labels, calls) in
        edge_values(&format!("sum by ({by_edge}) (increase(traces_service_graph_request_total[{range}s]))"))?
    {
        let key = (label(&labels, "client"), label(&labels, "server"));
        let stats = g.edges.entry(key).or_default();
        stats.connection_type = label(&labels, "connection_type");
        stats.calls = calls;
    }
    let stat = |g: &mut Graph, expr: String, set: fn(&mut EdgeStats, f64)| -> Result<(), EvalError> {
        for (labels, v) in edge_values(&expr)? {
            if let Some(e) = g.edges.get_mut(&(label(&labels, "client"), label(&labels, "server"))) {
                set(e, v);
            }
        }
        Ok(())
    };
    stat(
        &mut g,
        format!("sum by ({by_edge}) (increase(traces_service_graph_request_failed_total[{range}s]))"),
        |e, v| e.failed = v,
    )?;
    stat(
        &mut g,
        format!("sum by ({by_edge}) (increase(traces_service_graph_request_client_seconds_sum[{range}s]))"),
        |e, v| e.mean_seconds = (e.calls > 0.0).then(|| v / e.calls),
    )?;
    stat(
        &mut g,
        format!(
            "histogram_quantile(0.99, sum by ({by_edge}, le) \
             (rate(traces_service_graph_request_client_seconds_bucket[{range}s])))"
        ),
        |e, v| e.p99_seconds = v.is_finite().then_some(v),
    )?;
    for (labels, spans) in
        values(engine, &format!("sum by (service) (increase(span_duration_seconds_count[{range}s]))"))?
    {
        let node = g.nodes.entry(label(&labels, "service")).or_default();
        node.spans = spans;
        node.instrumented = true;
    }
    for (labels, errors) in values(
        engine,
        &format!("sum by (service) (increase(span_duration_seconds_count{{status=\"error\"}}[{range}s]))"),
    )? {
        g.nodes.entry(label(&labels, "service")).or_default().errors = errors;
    }
    for (labels, p99) in values(
        engine,
        &format!(
            "histogram_quantile(0.99, sum by (service, le) (rate(span_duration_seconds_bucket[{range}s])))"
        ),
    )? {
        g.nodes.entry(label(&labels, "service")).or_default().p99_seconds = p99.is_finite().then_some(p99);
    }
    let ends: Vec<String> = g.edges.keys().flat_map(|(c, s)| [c.clone(), s.clone()]).collect();
    for end in ends {
        g.nodes.entry(end).or_default();
    }
    Ok(g)
}

fn label(labels: &Labels, name: &str) -> String {
    labels.get(name).cloned().unwrap_or_default()
}

/// The first step's value of every series of `expr`.
fn values(engine: &Engine<'_>, expr: &str) -> Result<Vec<(Labels, f64)>, EvalError> {
    let parsed = promql::parse(expr).map_err(EvalError::Unsupported)?;
    let value = engine.eval(&parsed)?;
    match engine.materialized(value)? {
        Value::Vector(series) => {
            Ok(series.into_iter().filter_map(|s| Some((s.labels, s.values.first().copied()??))).collect())
        }
        _ => Ok(Vec::new()),
    }
}
