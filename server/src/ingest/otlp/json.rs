//! OTLP/JSON to the protobuf types: the specification's JSON encoding of an
//! `ExportTraceServiceRequest` — lowerCamelCase keys (the protobuf field names are accepted
//! too), trace and span ids as hex (not base64), 64-bit integers as strings or numbers, enums
//! as numbers or names. Decoded by hand, field by field, so every error names the field, and
//! no generated serde mapping with its known gaps is involved. Only what tailscope reads is
//! kept.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as Any, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use serde_json::Value;

#[cfg(test)]
mod tests;

/// A field of `v` by its JSON name or its protobuf name.
fn field<'a>(v: &'a Value, json: &str, proto: &str) -> Option<&'a Value> {
    v.get(json).or_else(|| v.get(proto)).filter(|f| !f.is_null())
}

fn array<'a>(v: &'a Value, json: &str, proto: &str, at: &str) -> Result<&'a [Value], String> {
    match field(v, json, proto) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("{at}.{json}: expected an array")),
    }
}

fn string(v: &Value, json: &str, proto: &str, at: &str) -> Result<String, String> {
    match field(v, json, proto) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{at}.{json}: expected a string")),
    }
}

/// A 64-bit unsigned integer written as a number or a decimal string.
fn uint64(v: &Value, json: &str, proto: &str, at: &str) -> Result<u64, String> {
    match field(v, json, proto) {
        None => Ok(0),
        Some(Value::Number(n)) => {
            n.as_u64().ok_or_else(|| format!("{at}.{json}: {n} is not an unsigned integer"))
        }
        Some(Value::String(s)) => {
            s.parse().map_err(|_| format!("{at}.{json}: {s:?} is not an unsigned integer"))
        }
        Some(_) => Err(format!("{at}.{json}: expected an integer")),
    }
}

/// An id written as hex (OTLP/JSON's rule for trace and span ids), of `len` bytes or empty.
fn hex_id(v: &Value, json: &str, proto: &str, len: usize, at: &str) -> Result<Vec<u8>, String> {
    let text = string(v, json, proto, at)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.len() != 2 * len || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{at}.{json}: {text:?} is not {len} bytes of hex"));
    }
    (0..len).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())).collect()
}

/// An enum written as its number or its name (`names[i]` is the name of `i`).
fn enumeration(v: &Value, json: &str, proto: &str, names: &[&str], at: &str) -> Result<i32, String> {
    match field(v, json, proto) {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| format!("{at}.{json}: {n} is not an enum value")),
        Some(Value::String(s)) => names
            .iter()
            .position(|name| name == s)
            .map(|i| i as i32)
            .ok_or_else(|| format!("{at}.{json}: unknown value {s:?}")),
        Some(_) => Err(format!("{at}.{json}: expected a number or a name")),
    }
}

const SPAN_KINDS: [&str; 6] = [
    "SPAN_KIND_UNSPECIFIED",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_CONSUMER",
];
const STATUS_CODES: [&str; 3] = ["STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"];

/// The string attributes whose keys `wanted` accepts (what tailscope reads; other values are
/// skipped).
fn attributes(v: &Value, at: &str, wanted: fn(&str) -> bool) -> Result<Vec<KeyValue>, String> {
    let mut out = Vec::new();
    for (i, kv) in array(v, "attributes", "attributes", at)?.iter().enumerate() {
        let key = match field(kv, "key", "key") {
            Some(Value::String(k)) if !wanted(k) => continue,
            _ => string(kv, "key", "key", &format!("{at}.attributes[{i}]"))?,
        };
        let value = field(kv, "value", "value")
            .and_then(|val| field(val, "stringValue", "string_value"))
            .and_then(Value::as_str)
            .map(|s| Any { value: Some(AnyValue::StringValue(s.to_owned())) });
        if let Some(value) = value {
            out.push(KeyValue { key, value: Some(value) });
        }
    }
    Ok(out)
}

fn span(v: &Value, at: &str) -> Result<Span, String> {
    if !v.is_object() {
        return Err(format!("{at}: expected an object"));
    }
    let status = match field(v, "status", "status") {
        None => None,
        Some(st) => Some(Status {
            code: enumeration(st, "code", "code", &STATUS_CODES, &format!("{at}.status"))?,
            message: string(st, "message", "message", &format!("{at}.status"))?,
        }),
    };
    Ok(Span {
        trace_id: hex_id(v, "traceId", "trace_id", 16, at)?,
        span_id: hex_id(v, "spanId", "span_id", 8, at)?,
        parent_span_id: hex_id(v, "parentSpanId", "parent_span_id", 8, at)?,
        trace_state: string(v, "traceState", "trace_state", at)?,
        name: string(v, "name", "name", at)?,
        kind: enumeration(v, "kind", "kind", &SPAN_KINDS, at)?,
        start_time_unix_nano: uint64(v, "startTimeUnixNano", "start_time_unix_nano", at)?,
        end_time_unix_nano: uint64(v, "endTimeUnixNano", "end_time_unix_nano", at)?,
        status,
        attributes: attributes(v, at, super::Peer::wants)?,
        ..Default::default()
    })
}

/// Decodes an OTLP/JSON `ExportTraceServiceRequest`; an error names the field.
pub fn export_from_json(body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    let root: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    if !root.is_object() {
        return Err("expected an object with resourceSpans".into());
    }
    let mut resource_spans = Vec::new();
    for (r, rs) in array(&root, "resourceSpans", "resource_spans", "")?.iter().enumerate() {
        let at = format!("resourceSpans[{r}]");
        let resource = match field(rs, "resource", "resource") {
            Some(res) => Some(Resource {
                attributes: attributes(res, &format!("{at}.resource"), |k| k == "service.name")?,
                ..Default::default()
            }),
            None => None,
        };
        let mut scope_spans = Vec::new();
        for (s, ss) in array(rs, "scopeSpans", "scope_spans", &at)?.iter().enumerate() {
            let at = format!("{at}.scopeSpans[{s}]");
            let spans = array(ss, "spans", "spans", &at)?
                .iter()
                .enumerate()
                .map(|(i, v)| span(v, &format!("{at}.spans[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            scope_spans.push(ScopeSpans { spans, ..Default::default() });
        }
        resource_spans.push(ResourceSpans { resource, scope_spans, ..Default::default() });
    }
    Ok(ExportTraceServiceRequest { resource_spans })
}
