use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as Any, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use rand::{Rng, SeedableRng};

use super::decode_export;
use crate::ingest::otlp::to_batch;

fn attr(key: &str, value: AnyValue) -> KeyValue {
    KeyValue { key: key.into(), value: Some(Any { value: Some(value) }) }
}

/// A random export: resources with and without `service.name` (sometimes not a string),
/// spans of every kind and status with attributes, events and links, odd id lengths.
fn random_export(r: &mut impl Rng) -> ExportTraceServiceRequest {
    let resources = (0..r.gen_range(0..4))
        .map(|_| {
            let mut attributes = vec![attr("host.name", AnyValue::StringValue("h".into()))];
            match r.gen_range(0..4) {
                0 => {}
                1 => attributes.push(attr("service.name", AnyValue::IntValue(3))),
                _ => attributes
                    .push(attr("service.name", AnyValue::StringValue(format!("svc{}", r.gen_range(0..3))))),
            }
            if r.gen_bool(0.2) {
                attributes.push(attr("service.name", AnyValue::StringValue("second".into())));
            }
            let spans = (0..r.gen_range(0..20))
                .map(|i| Span {
                    trace_id: (0..[16, 16, 16, 8, 0][r.gen_range(0..5)]).map(|_| r.gen()).collect(),
                    span_id: (0..[8, 8, 4][r.gen_range(0..3)]).map(|_| r.gen()).collect(),
                    parent_span_id: if r.gen_bool(0.5) {
                        (0..8).map(|_| r.gen()).collect()
                    } else {
                        Vec::new()
                    },
                    trace_state: ["", "ot=th:8", "vendor=x"][r.gen_range(0..3)].into(),
                    name: ["GET /", "", "pay", &"é".repeat(200)][r.gen_range(0..4)].into(),
                    kind: r.gen_range(0..7),
                    start_time_unix_nano: r.gen_range(0..2_000_000_000_000_000_000),
                    end_time_unix_nano: r.gen_range(0..2_000_000_000_000_000_000),
                    attributes: {
                        let mut attributes =
                            vec![attr("http.route", AnyValue::StringValue(format!("/r{i}")))];
                        // Peer attributes of every rank, sometimes empty or not a string.
                        for _ in 0..r.gen_range(0..3) {
                            let key = [
                                "peer.service",
                                "db.system",
                                "messaging.system",
                                "server.address",
                                "net.peer.name",
                            ][r.gen_range(0..5)];
                            let value = match r.gen_range(0..5) {
                                0 => AnyValue::StringValue(String::new()),
                                1 => AnyValue::IntValue(5432),
                                _ => AnyValue::StringValue(
                                    ["payments", "postgresql", "kafka", "10.0.0.7"][r.gen_range(0..4)].into(),
                                ),
                            };
                            attributes.push(attr(key, value));
                        }
                        attributes
                    },
                    events: vec![Event { name: "e".into(), ..Default::default() }],
                    links: vec![Link { trace_id: vec![1; 16], ..Default::default() }],
                    status: r.gen_bool(0.7).then(|| Status { message: "m".into(), code: r.gen_range(0..3) }),
                    ..Default::default()
                })
                .collect();
            ResourceSpans {
                resource: r.gen_bool(0.9).then(|| Resource { attributes, ..Default::default() }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope { name: "s".into(), ..Default::default() }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest { resource_spans: resources }
}

#[test]
fn reading_the_bytes_gives_what_a_full_decode_gives() {
    let mut r = rand::rngs::StdRng::seed_from_u64(8);
    for _ in 0..500 {
        let export = random_export(&mut r);
        let bytes = export.encode_to_vec();
        let full = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decode_export(&bytes).map_err(|e| e.to_string()), to_batch(&full));
    }
}

#[test]
fn an_empty_service_name_is_refused_naming_the_resource() {
    let export = ExportTraceServiceRequest {
        resource_spans: vec![
            ResourceSpans::default(),
            ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![attr("service.name", AnyValue::StringValue(String::new()))],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
    };
    let err = decode_export(&export.encode_to_vec()).expect_err("refused");
    assert!(matches!(&err, super::WireError::Invalid(m) if m.contains("resourceSpans[1]")), "{err}");
}

#[test]
fn broken_bytes_are_errors_never_panics() {
    let mut r = rand::rngs::StdRng::seed_from_u64(9);
    let valid = random_export(&mut r).encode_to_vec();
    for _ in 0..2_000 {
        let mut bytes = valid.clone();
        for _ in 0..r.gen_range(1..4) {
            if bytes.is_empty() {
                break;
            }
            let i = r.gen_range(0..bytes.len());
            match r.gen_range(0..3) {
                0 => bytes[i] = r.gen(),
                1 => bytes.truncate(i),
                _ => bytes.insert(i, r.gen()),
            }
        }
        // Whatever a full decode makes of it, this reader either agrees or says why not.
        if let Ok(Ok(full)) = ExportTraceServiceRequest::decode(bytes.as_slice()).map(|e| to_batch(&e)) {
            if let Ok(mine) = decode_export(&bytes) {
                assert_eq!(mine, full);
            }
        }
        let _ = decode_export(&bytes);
    }
    for bad in [&[0x0a, 0x05, 0x0a][..], &[0xff; 11], &[0x0b], &[0x0a, 0x02, 0x12, 0x05]] {
        assert!(decode_export(bad).is_err(), "{bad:?}");
    }
    let utf8 = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span { name: "ok".into(), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut bytes = utf8.encode_to_vec();
    let at = bytes.windows(2).position(|w| w == b"ok").expect("name");
    bytes[at] = 0xff;
    let err = decode_export(&bytes).expect_err("invalid UTF-8");
    assert!(matches!(&err, super::WireError::Malformed(m) if m.contains("Span.name")), "{err}");
}
