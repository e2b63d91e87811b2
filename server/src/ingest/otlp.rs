//! OpenTelemetry ingest (OTLP): what an export means for tailscope, shared by both transports —
//! [`grpc`] (`TraceService/Export` on the gRPC port) and [`http`] (`POST /v1/traces` on its
//! own port, protobuf or JSON) — so any OpenTelemetry SDK's exporter sends to tailscope
//! unchanged.
//!
//! Each span becomes a tailscope span: service from the resource's `service.name` (OTLP's
//! `unknown_service` when absent), operation from the span name, `span_kind` from the span's
//! kind, `peer` of a CLIENT or PRODUCER span from its attributes ([`Peer`]), duration from
//! end − start,
//! status from the span status, and weight from the W3C `tracestate` entry `ot=th:…` (the
//! adjusted count of a probability-sampled span). An export is acknowledged only once its
//! spans are written; spans that cannot be counted (too old, negative duration, …) are
//! reported in `partial_success` with the reasons. Exports carry no client identity, so they
//! are admitted anonymously: an exporter that retries an export after a lost reply may count
//! it twice, which is OTLP's own at-least-once contract.

pub mod grpc;
pub mod http;
mod json;
pub mod pairing;
pub mod wire;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tailscope_proto::batch::BatchBuilder;
use tailscope_proto::v1::{SeriesKey, Span, SpanBatch, SpanStatus};

use crate::ingest::{BatchStats, MAX_LABEL_BYTES};
use crate::series::{Kind, SpanReject};

/// The service name OpenTelemetry SDKs report when none is configured.
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// Converts an export into one anonymous batch grouped by series. Spans without a usable name
/// are counted in `unnamed`. A resource whose `service.name` is set but empty is refused (an
/// absent one is OpenTelemetry's `unknown_service`).
pub fn to_batch(request: &ExportTraceServiceRequest) -> Result<(SpanBatch, u64), String> {
    let mut out = Converter::default();
    for (r, rs) in request.resource_spans.iter().enumerate() {
        let named = rs.resource.as_ref().and_then(|r| string_attribute(&r.attributes, "service.name"));
        let service = Converter::service(named, r)?;
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                out.push(
                    service,
                    &SpanFields {
                        name: &span.name,
                        kind: span.kind,
                        start: span.start_time_unix_nano,
                        end: span.end_time_unix_nano,
                        code: span.status.as_ref().map_or(0, |s| s.code),
                        trace_id: &span.trace_id,
                        span_id: &span.span_id,
                        parent_span_id: &span.parent_span_id,
                        trace_state: &span.trace_state,
                        peer: peer_of(&span.attributes),
                    },
                );
            }
        }
    }
    Ok(out.finish())
}

/// What tailscope reads of one OTLP span, borrowed from wherever it was decoded.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SpanFields<'a> {
    pub name: &'a str,
    pub kind: i32,
    pub start: u64,
    pub end: u64,
    /// `status.code`: 0 unset, 1 ok, 2 error.
    pub code: i32,
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub parent_span_id: &'a [u8],
    pub trace_state: &'a str,
    /// The best peer its attributes name.
    pub peer: Peer<'a>,
}

pub(crate) use tailscope_proto::peer::Peer;

/// The best peer of `attributes` (see [`Peer`]).
fn peer_of(attributes: &[KeyValue]) -> Peer<'_> {
    let mut peer = Peer::default();
    for kv in attributes {
        if let Some(AnyValue::StringValue(v)) = kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            peer.offer(&kv.key, v);
        }
    }
    peer
}

/// The `peer` label of a peer key, cut to [`MAX_LABEL_BYTES`] (empty for none).
fn peer_label(peer: Option<(&str, &str)>) -> String {
    peer.map_or_else(String::new, |(prefix, name)| truncate(&[prefix, name].concat()).to_owned())
}

/// A group of an export: service, operation, kind and peer (its prefix and name), borrowed.
type GroupKey<'a> = (&'a str, &'a str, i32, Option<(&'static str, &'a str)>);

/// Builds one batch from OTLP spans, whichever decoder read them: the one place an OTLP span
/// becomes a tailscope span.
#[derive(Debug, Default)]
pub(crate) struct Converter<'a> {
    // Keys borrow from the request: no allocation per span, one per group.
    // The peer is an `Option`: a (prefix, name) pair of empty strings for the common "no peer"
    // cost the OTLP path 20–30 % (memcmp under this map's lookup rose from 2 % to 17 % of its
    // profile).
    groups: BatchBuilder<GroupKey<'a>>,
    unnamed: u64,
    /// The outgoing spans with a parent: (trace id low, parent span id, start, end), for the
    /// self time of their parents.
    calls: Vec<(u64, u64, i64, i64)>,
}

impl<'a> Converter<'a> {
    /// The service of resource `r` from its `service.name` (`None`: absent or not a string).
    pub fn service(named: Option<&'a str>, r: usize) -> Result<&'a str, String> {
        if named == Some("") {
            return Err(format!("resourceSpans[{r}]: the resource's service.name is empty"));
        }
        Ok(truncate(named.unwrap_or(UNKNOWN_SERVICE)))
    }

    /// Adds one span of `service`.
    pub fn push(&mut self, service: &'a str, span: &SpanFields<'a>) {
        if span.name.is_empty() {
            self.unnamed += 1;
            return;
        }
        let operation = truncate(span.name);
        let start = span.start as i64;
        let end = span.end as i64;
        let status = match span.code {
            c if c == StatusCode::Error as i32 => SpanStatus::Error,
            c if c == StatusCode::Ok as i32 => SpanStatus::Ok,
            _ => SpanStatus::Unset,
        };
        let trace = span.trace_id;
        // OpenTelemetry's `th` is both: the span counts for its adjusted count.
        let weight = weight_from_tracestate(span.trace_state);
        // OTLP's kinds are tailscope's, number for number.
        let kind = span.kind;
        // Only an outgoing span's attributes name its callee; a server span's caller is not
        // in its attributes.
        let peer = if Kind::from_wire(kind).is_outgoing() { span.peer.key() } else { None };
        let trace_id_low = id_u64(trace.get(8..16));
        let parent_span_id = id_u64(span.parent_span_id.get(..8));
        if Kind::from_wire(kind).is_outgoing() && parent_span_id != 0 && end > start {
            self.calls.push((trace_id_low, parent_span_id, start, end));
        }
        let series = || SeriesKey {
            service: service.to_owned(),
            operation: operation.to_owned(),
            kind,
            peer: peer_label(peer),
        };
        self.groups.push(
            (service, operation, kind, peer),
            series,
            Span {
                trace_id_high: id_u64(trace.get(..8)),
                trace_id_low,
                span_id: id_u64(span.span_id.get(..8)),
                parent_span_id,
                start_unix_nanos: start,
                duration_nanos: end.wrapping_sub(start),
                status: status as i32,
                weight,
                adjusted_count: f64::from(weight),
                self_nanos: 0,
            },
        );
    }

    /// The batch (anonymous: client 0, seq 1) and how many spans had no name. A span of a
    /// service's own work whose calls (CLIENT or PRODUCER children) are in the same export
    /// gets its self time: its duration minus their union. Others keep it unknown — their
    /// calls, ending first, may have left in an earlier export.
    pub fn finish(mut self) -> (SpanBatch, u64) {
        let mut batch = self.groups.finish(0, 1, Vec::new());
        if !self.calls.is_empty() {
            self.calls.sort_unstable();
            let mut intervals = Vec::new();
            for group in &mut batch.groups {
                if group.key.as_ref().is_some_and(|k| Kind::from_wire(k.kind).is_outgoing()) {
                    continue;
                }
                for span in &mut group.spans {
                    let of = (span.trace_id_low, span.span_id);
                    let first = self.calls.partition_point(|c| (c.0, c.1) < of);
                    intervals.clear();
                    intervals.extend(
                        self.calls[first..].iter().take_while(|c| (c.0, c.1) == of).map(|c| (c.2, c.3)),
                    );
                    if !intervals.is_empty() && span.span_id != 0 {
                        let start = span.start_unix_nanos;
                        let end = start.saturating_add(span.duration_nanos);
                        span.self_nanos = tailscope_proto::selftime::self_time(start, end, &mut intervals);
                    }
                }
            }
        }
        (batch, self.unnamed)
    }
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Cuts a label to [`MAX_LABEL_BYTES`] at a character boundary.
fn truncate(s: &str) -> &str {
    if s.len() <= MAX_LABEL_BYTES {
        return s;
    }
    let mut end = MAX_LABEL_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn id_u64(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes)
}

/// The adjusted count of a span from its W3C `tracestate`: OpenTelemetry's `ot=th:T` names
/// the rejection threshold T (up to 14 hex digits, trailing zeros omitted) of consistent
/// probability sampling, which kept the span with probability 1 − T/2⁵⁶; its weight is the
/// inverse, rounded. 0 (meaning 1) when absent or malformed.
pub fn weight_from_tracestate(tracestate: &str) -> u32 {
    if tracestate.is_empty() {
        return 0;
    }
    let Some(ot) = tracestate.split(',').map(str::trim).find_map(|m| m.strip_prefix("ot=")) else {
        return 0;
    };
    let Some(th) = ot.split(';').find_map(|kv| kv.strip_prefix("th:")) else { return 0 };
    if th.is_empty() || th.len() > 14 || !th.bytes().all(|b| b.is_ascii_hexdigit()) {
        return 0;
    }
    let Ok(value) = u64::from_str_radix(th, 16) else { return 0 };
    let threshold = value << (4 * (14 - th.len()));
    let kept = (1u64 << 56) - threshold;
    let weight = (1u64 << 56) as f64 / kept as f64;
    if weight <= 1.0 {
        0
    } else {
        weight.round().min(f64::from(u32::MAX)) as u32
    }
}

/// The `partial_success` of an export: how many spans were refused, and why (the reasons
/// count adjusted spans, as tailscope's metrics do).
pub(crate) fn partial_success(stats: &BatchStats, unnamed: u64) -> Option<ExportTracePartialSuccess> {
    let mut reasons: Vec<String> = SpanReject::ALL
        .iter()
        .filter(|r| stats.rejected[r.index()] > 0)
        .map(|r| format!("{} {}", stats.rejected[r.index()], r.as_str()))
        .collect();
    if unnamed > 0 {
        reasons.push(format!("{unnamed} without a span name"));
    }
    let rejected = stats.rejected_records + unnamed;
    (rejected > 0).then(|| ExportTracePartialSuccess {
        rejected_spans: rejected as i64,
        error_message: format!("spans not counted: {}", reasons.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::AnyValue as Any;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{
        ResourceSpans, ScopeSpans, Span as OtlpSpan, Status as OtlpStatus,
    };

    #[test]
    fn tracestate_thresholds_become_adjusted_counts() {
        assert_eq!(weight_from_tracestate(""), 0);
        assert_eq!(weight_from_tracestate("ot=th:0"), 0);
        assert_eq!(weight_from_tracestate("ot=th:8"), 2);
        assert_eq!(weight_from_tracestate("vendor=x, ot=rv:abc;th:c"), 4);
        assert_eq!(weight_from_tracestate("ot=th:fd70a4"), 100); // 1 % sampling
        assert_eq!(weight_from_tracestate("ot=th:zz"), 0);
        assert_eq!(weight_from_tracestate("ot=th:123456789abcdef0"), 0);
    }

    #[test]
    fn spans_are_grouped_by_service_and_name() {
        let span = |name: &str, start: u64, end: u64, code: StatusCode| OtlpSpan {
            trace_id: (1..=16).collect(),
            span_id: vec![9; 8],
            name: name.into(),
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            status: Some(OtlpStatus { message: String::new(), code: code as i32 }),
            ..Default::default()
        };
        let resource = |service: Option<&str>| Resource {
            attributes: service
                .map(|s| KeyValue {
                    key: "service.name".into(),
                    value: Some(Any { value: Some(AnyValue::StringValue(s.into())) }),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(resource(Some("checkout"))),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![
                            span("pay", 100, 350, StatusCode::Ok),
                            span("pay", 200, 210, StatusCode::Error),
                            span("", 0, 1, StatusCode::Unset),
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceSpans {
                    resource: Some(resource(None)),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span(&"x".repeat(300), 5, 4, StatusCode::Unset)],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        let (batch, unnamed) = to_batch(&request).expect("converts");
        assert_eq!(unnamed, 1);
        assert_eq!(batch.groups.len(), 2);
        let pay = &batch.groups[0];
        assert_eq!(
            pay.key.as_ref().map(|k| (k.service.as_str(), k.operation.as_str())),
            Some(("checkout", "pay"))
        );
        assert_eq!(pay.spans[0].duration_nanos, 250);
        assert_eq!(pay.spans[1].status, SpanStatus::Error as i32);
        assert_eq!(pay.spans[0].trace_id_high, 0x0102030405060708);
        assert_eq!(pay.spans[0].trace_id_low, 0x090a0b0c0d0e0f10);
        let other = &batch.groups[1];
        let key = other.key.as_ref().expect("key");
        assert_eq!((key.service.as_str(), key.operation.len()), (UNKNOWN_SERVICE, MAX_LABEL_BYTES));
        // end before start: a negative duration, refused per span by validation later.
        assert_eq!(other.spans[0].duration_nanos, -1);
        // An empty service.name is refused, naming the resource.
        let empty = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans { resource: Some(resource(Some(""))), ..Default::default() }],
        };
        let err = to_batch(&empty).expect_err("refused");
        assert!(err.contains("resourceSpans[0]") && err.contains("service.name is empty"), "{err}");
    }

    #[test]
    fn a_span_whose_calls_are_in_the_export_gets_its_self_time() {
        use tailscope_proto::v1::SpanKind;
        let span = |id: u8, parent: u8, kind: SpanKind, start: u64, end: u64| OtlpSpan {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { Vec::new() } else { vec![parent; 8] },
            name: format!("op{}", kind as i32),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        // A 1,000 ns request whose calls overlap (100–400, 300–500) and follow
                        // (800–900): 500 ns waited, 500 ns its own.
                        span(1, 0, SpanKind::Server, 1_000, 2_000),
                        span(2, 1, SpanKind::Client, 1_100, 1_400),
                        span(3, 1, SpanKind::Client, 1_300, 1_500),
                        span(4, 1, SpanKind::Producer, 1_800, 1_900),
                        // An internal child is not a call.
                        span(5, 1, SpanKind::Internal, 1_000, 2_000),
                        // A request whose calls are not in this export: unknown.
                        span(6, 0, SpanKind::Server, 1_000, 3_000),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let (batch, _) = to_batch(&request).unwrap();
        let of = |kind: SpanKind| -> Vec<(u64, i64)> {
            batch
                .groups
                .iter()
                .filter(|g| g.key.as_ref().is_some_and(|k| k.kind == kind as i32))
                .flat_map(|g| g.spans.iter().map(|s| (s.span_id & 0xff, s.self_nanos)))
                .collect()
        };
        assert_eq!(of(SpanKind::Server), [(1, 500), (6, 0)]);
        assert_eq!(of(SpanKind::Internal), [(5, 0)]);
        assert_eq!(of(SpanKind::Client), [(2, 0), (3, 0)], "calls have no self time");
    }

    #[test]
    fn outgoing_spans_name_their_peer_from_semantic_conventions() {
        use tailscope_proto::v1::SpanKind;
        let attr = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(Any { value: Some(AnyValue::StringValue(v.into())) }),
        };
        let span = |kind: SpanKind, attributes: Vec<KeyValue>| OtlpSpan {
            name: "call".into(),
            kind: kind as i32,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes,
            ..Default::default()
        };
        let cases = [
            (
                SpanKind::Client,
                vec![attr("server.address", "payments"), attr("peer.service", "billing")],
                "billing",
            ),
            (
                SpanKind::Client,
                vec![attr("server.address", "pg.local"), attr("db.system", "postgresql")],
                "db:postgresql",
            ),
            (SpanKind::Client, vec![attr("db.system.name", "mysql")], "db:mysql"),
            (SpanKind::Producer, vec![attr("messaging.system", "kafka")], "mq:kafka"),
            (
                SpanKind::Client,
                vec![attr("net.peer.name", "old"), attr("server.address", "api.stripe.com")],
                "api.stripe.com",
            ),
            (SpanKind::Client, vec![attr("peer.service", ""), attr("http.route", "/x")], ""),
            // A server span's attributes name no caller.
            (SpanKind::Server, vec![attr("peer.service", "frontend")], ""),
            (SpanKind::Internal, vec![attr("peer.service", "frontend")], ""),
            (SpanKind::Client, vec![attr("peer.service", &"p".repeat(300))], &"p".repeat(MAX_LABEL_BYTES)),
        ];
        for (kind, attributes, want) in cases {
            let request = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span(kind, attributes.clone())],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let (batch, _) = to_batch(&request).expect("converts");
            let key = batch.groups[0].key.clone().expect("key");
            assert_eq!((key.kind, key.peer.as_str()), (kind as i32, want), "{attributes:?}");
            let bytes = prost::Message::encode_to_vec(&request);
            assert_eq!(wire::decode_export(&bytes).map_err(|e| e.to_string()), Ok((batch, 0)));
        }
    }
}
