//! The service graph as series, under the names Tempo's metrics-generator gives it, so
//! Grafana's service map and Node Graph panels (and any query written for Tempo) read
//! tailscope unchanged — and exactly, because an edge's counts and latencies are whole series
//! ([`crate::series::Edge`]), not pairs of sampled spans.
//!
//! | name | series read | value |
//! |---|---|---|
//! | `traces_service_graph_request_total` | the caller's CLIENT/PRODUCER series with a peer | calls |
//! | `traces_service_graph_request_failed_total` | the same, `status="error"` | failed calls |
//! | `traces_service_graph_request_client_seconds_{bucket,count,sum}` | the same | the calls as the caller waited for them |
//! | `traces_service_graph_request_server_seconds_{bucket,count,sum}` | the callee's SERVER/CONSUMER series with a peer | the calls as the callee served them |
//!
//! Every series of an edge (all its operations and statuses) is one group labelled `client`,
//! `server` and, for database and messaging edges, `connection_type` (`database`,
//! `messaging_system`). A plain selector of one of them reads as the counter a Prometheus
//! scraping Tempo would hold: everything since the oldest 10-second window retained.

use promql_parser::label::{MatchOp, Matcher};

use crate::series::Side;

/// Which part of a histogram a name reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// `_bucket`, with `le`.
    Bucket,
    /// `_count`, or the `_total` counters.
    Count,
    /// `_sum`, in seconds.
    Sum,
}

/// One of the graph's metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GraphMetric {
    /// The name.
    pub name: &'static str,
    /// Whose spans it reads.
    pub side: Side,
    /// What it reads of them.
    pub part: Part,
    /// Only failed calls (`status="error"`).
    pub failed_only: bool,
}

const fn metric(name: &'static str, side: Side, part: Part, failed_only: bool) -> GraphMetric {
    GraphMetric { name, side, part, failed_only }
}

/// Every graph name.
pub(super) const METRICS: [GraphMetric; 8] = [
    metric("traces_service_graph_request_total", Side::Client, Part::Count, false),
    metric("traces_service_graph_request_failed_total", Side::Client, Part::Count, true),
    metric("traces_service_graph_request_client_seconds_bucket", Side::Client, Part::Bucket, false),
    metric("traces_service_graph_request_client_seconds_count", Side::Client, Part::Count, false),
    metric("traces_service_graph_request_client_seconds_sum", Side::Client, Part::Sum, false),
    metric("traces_service_graph_request_server_seconds_bucket", Side::Server, Part::Bucket, false),
    metric("traces_service_graph_request_server_seconds_count", Side::Server, Part::Count, false),
    metric("traces_service_graph_request_server_seconds_sum", Side::Server, Part::Sum, false),
];

/// The graph metric a name is, if it is one.
pub(super) fn named(name: &str) -> Option<GraphMetric> {
    METRICS.into_iter().find(|m| m.name == name)
}

/// Index matchers that narrow a selection of `metric` with `matchers` to its candidate
/// series: the side's kinds with a peer, failed calls for the failed counter, and `client` and
/// `server` matchers turned into the `service` and `peer` they are on that side. The group
/// labels are still checked against every matcher afterwards.
pub(super) fn index_matchers(metric: GraphMetric, matchers: &[&Matcher]) -> Vec<Matcher> {
    let regex = |re: &str| regex::Regex::new(&format!("^(?:{re})$")).expect("a fixed regex");
    let kinds = match metric.side {
        Side::Client => "SPAN_KIND_CLIENT|SPAN_KIND_PRODUCER",
        Side::Server => "SPAN_KIND_SERVER|SPAN_KIND_CONSUMER",
    };
    let mut out = vec![
        Matcher::new(MatchOp::Re(regex(kinds)), "span_kind", kinds),
        Matcher::new(MatchOp::NotEqual, "peer", ""),
    ];
    if metric.failed_only {
        out.push(Matcher::new(MatchOp::Equal, "status", "error"));
    }
    for m in matchers {
        let own = match (m.name.as_str(), metric.side) {
            ("client", Side::Client) | ("server", Side::Server) => "service",
            ("client", Side::Server) | ("server", Side::Client) => "peer",
            _ => continue,
        };
        out.push(Matcher { op: m.op.clone(), name: own.to_owned(), value: m.value.clone() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_tempos_and_client_and_server_become_service_and_peer() {
        assert_eq!(named("traces_service_graph_request_total").map(|m| m.side), Some(Side::Client));
        assert_eq!(
            named("traces_service_graph_request_server_seconds_bucket").map(|m| m.part),
            Some(Part::Bucket)
        );
        assert_eq!(named("span_duration_seconds_bucket"), None);
        let client = Matcher::new(MatchOp::Equal, "client", "checkout");
        let server = Matcher::new(MatchOp::Equal, "server", "payments");
        let on = |name| index_matchers(named(name).expect("a graph name"), &[&client, &server]);
        let pairs = |ms: Vec<Matcher>| ms.into_iter().map(|m| (m.name, m.value)).collect::<Vec<_>>();
        let caller = pairs(on("traces_service_graph_request_failed_total"));
        assert!(caller.contains(&("service".into(), "checkout".into())), "{caller:?}");
        assert!(caller.contains(&("peer".into(), "payments".into())), "{caller:?}");
        assert!(caller.contains(&("status".into(), "error".into())), "{caller:?}");
        let callee = pairs(on("traces_service_graph_request_server_seconds_sum"));
        assert!(callee.contains(&("service".into(), "payments".into())), "{callee:?}");
        assert!(callee.contains(&("peer".into(), "checkout".into())), "{callee:?}");
        assert!(!callee.iter().any(|(n, _)| n == "status"), "{callee:?}");
    }
}
