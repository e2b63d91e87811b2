//! An `ExportTraceServiceRequest` read straight from its protobuf bytes: only the fields
//! tailscope uses (the resource's `service.name`; each span's name, kind, times, status code,
//! ids and `trace_state`), borrowed from the buffer — no allocation per span, attribute, event
//! or link, which a full decode spends most of its time on. Everything else is skipped by wire
//! type. What it does read it checks as a full decoder would (wire types, lengths, UTF-8), and
//! it gives what [`super::to_batch`] gives for the same request (a test holds the two equal).

use tailscope_proto::v1::SpanBatch;

use crate::series::Kind;

use super::{Converter, Peer, SpanFields};

#[cfg(test)]
mod tests;

/// A position in a protobuf message.
struct Reader<'a> {
    buf: &'a [u8],
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

impl<'a> Reader<'a> {
    #[inline]
    fn varint(&mut self) -> Result<u64, String> {
        // Keys, lengths and enums are mostly one byte.
        if let Some((&b, rest)) = self.buf.split_first() {
            if b < 0x80 {
                self.buf = rest;
                return Ok(u64::from(b));
            }
        }
        self.long_varint()
    }

    fn long_varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for (i, &b) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err("invalid varint".into())
    }

    /// The next field's number and wire type, or `None` at the end.
    #[inline]
    fn key(&mut self) -> Result<Option<(u64, u8)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        if field == 0 {
            return Err("invalid field number 0".into());
        }
        Ok(Some((field, wire)))
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err("buffer underflow".into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "length too large".to_owned())?;
        self.take(n)
    }

    #[inline]
    fn fixed64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "buffer underflow".to_owned())?))
    }

    /// A length-delimited field's bytes; `field` names it if its wire type is wrong.
    fn len_field(&mut self, field: &str, wire: u8) -> Result<&'a [u8], String> {
        expect(field, wire, LEN)?;
        self.bytes()
    }

    /// A string field, checked for UTF-8.
    fn str_field(&mut self, field: &str, wire: u8) -> Result<&'a str, String> {
        let b = self.len_field(field, wire)?;
        std::str::from_utf8(b).map_err(|_| format!("{field}: invalid UTF-8"))
    }

    /// A `fixed64` field.
    fn fixed64_field(&mut self, field: &str, wire: u8) -> Result<u64, String> {
        expect(field, wire, FIXED64)?;
        self.fixed64()
    }

    /// A varint field (an enum), as protobuf's `int32` reads it.
    fn i32_field(&mut self, field: &str, wire: u8) -> Result<i32, String> {
        expect(field, wire, VARINT)?;
        Ok(self.varint()? as i32)
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            other => Err(format!("unsupported wire type {other}")),
        }
    }
}

fn expect(field: &str, wire: u8, want: u8) -> Result<(), String> {
    if wire == want {
        Ok(())
    } else {
        Err(format!("{field}: wire type {wire}, expected {want}"))
    }
}

/// The `service.name` of a `Resource`, when it is a string attribute (the first one wins).
fn service_name(resource: &[u8]) -> Result<Option<&str>, String> {
    let mut r = Reader { buf: resource };
    let mut found = None;
    while let Some((field, wire)) = r.key()? {
        if field != 1 {
            r.skip(wire)?;
            continue;
        }
        let (key, value) = key_value(r.len_field("Resource.attributes", wire)?, |_| true)?;
        if found.is_none() && key == "service.name" {
            found = Some(value);
        }
    }
    Ok(found.flatten())
}

/// A `KeyValue`'s key, and its value when it is a string and `wanted(key)` (the key comes
/// first in every encoder's output; a value read before its key is kept as well).
fn key_value(bytes: &[u8], wanted: impl Fn(&str) -> bool) -> Result<(&str, Option<&str>), String> {
    let mut kv = Reader { buf: bytes };
    let (mut key, mut value) = ("", None);
    while let Some((field, wire)) = kv.key()? {
        match field {
            1 => {
                key = kv.str_field("KeyValue.key", wire)?;
                if !wanted(key) {
                    return Ok((key, None));
                }
            }
            2 => {
                let mut any = Reader { buf: kv.len_field("KeyValue.value", wire)? };
                value = None;
                while let Some((field, wire)) = any.key()? {
                    if field == 1 {
                        value = Some(any.str_field("AnyValue.string_value", wire)?);
                    } else {
                        // Another kind of value: whatever came before is replaced (oneof).
                        value = None;
                        any.skip(wire)?;
                    }
                }
            }
            _ => kv.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn span<'a>(bytes: &'a [u8]) -> Result<SpanFields<'a>, String> {
    let mut r = Reader { buf: bytes };
    let mut s = SpanFields::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => s.trace_id = r.len_field("Span.trace_id", wire)?,
            2 => s.span_id = r.len_field("Span.span_id", wire)?,
            3 => s.trace_state = r.str_field("Span.trace_state", wire)?,
            4 => s.parent_span_id = r.len_field("Span.parent_span_id", wire)?,
            5 => s.name = r.str_field("Span.name", wire)?,
            6 => s.kind = r.i32_field("Span.kind", wire)?,
            // Attributes name the callee of an outgoing span only; the kind comes before them
            // in every encoder's output, so the attributes of other spans are skipped whole.
            9 if s.kind == 0 || Kind::from_wire(s.kind).is_outgoing() => {
                let (key, value) = key_value(r.len_field("Span.attributes", wire)?, Peer::wants)?;
                if let Some(value) = value {
                    s.peer.offer(key, value);
                }
            }
            7 => s.start = r.fixed64_field("Span.start_time_unix_nano", wire)?,
            8 => s.end = r.fixed64_field("Span.end_time_unix_nano", wire)?,
            15 => {
                let mut st = Reader { buf: r.len_field("Span.status", wire)? };
                while let Some((field, wire)) = st.key()? {
                    if field == 3 {
                        s.code = st.i32_field("Status.code", wire)?;
                    } else {
                        st.skip(wire)?;
                    }
                }
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(s)
}

/// Why an export could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Not a protobuf `ExportTraceServiceRequest`.
    Malformed(String),
    /// Well-formed, but refused (an empty `service.name`).
    Invalid(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Malformed(m) | WireError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Reads an export and converts it as [`super::to_batch`] does; the error says what was wrong.
pub fn decode_export(bytes: &[u8]) -> Result<(SpanBatch, u64), WireError> {
    read_export(bytes).map_err(WireError::Malformed)?
}

/// The conversion's own refusal inside the reader's result.
type Converted = Result<(SpanBatch, u64), WireError>;

fn read_export(bytes: &[u8]) -> Result<Converted, String> {
    let mut out = Converter::default();
    let mut request = Reader { buf: bytes };
    let mut r = 0;
    // A resource's spans may come before its resource in the bytes: remember them.
    let mut scopes: Vec<&[u8]> = Vec::new();
    while let Some((field, wire)) = request.key()? {
        if field != 1 {
            request.skip(wire)?;
            continue;
        }
        let mut rs = Reader { buf: request.len_field("ExportTraceServiceRequest.resource_spans", wire)? };
        scopes.clear();
        let mut named = None;
        while let Some((field, wire)) = rs.key()? {
            match field {
                1 => {
                    named = service_name(rs.len_field("ResourceSpans.resource", wire)?)?;
                }
                2 => {
                    scopes.push(rs.len_field("ResourceSpans.scope_spans", wire)?);
                }
                _ => rs.skip(wire)?,
            }
        }
        let service = match Converter::service(named, r) {
            Ok(s) => s,
            Err(m) => return Ok(Err(WireError::Invalid(m))),
        };
        for scope in &scopes {
            let mut ss = Reader { buf: scope };
            while let Some((field, wire)) = ss.key()? {
                if field == 2 {
                    out.push(service, &span(ss.len_field("ScopeSpans.spans", wire)?)?);
                } else {
                    ss.skip(wire)?;
                }
            }
        }
        r += 1;
    }
    Ok(Ok(out.finish()))
}
