//! W3C trace context: the `traceparent` a request carries in and out, and the context of the
//! request (or `tracing` span) being worked on, so every span recorded inside it — by the
//! tower layers, the `tracing` layer or by hand — joins the caller's trace, and exemplars link
//! to the traces Tempo or Jaeger hold.
//!
//! ```
//! use tailscope::trace::TraceContext;
//! let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
//! assert_eq!(ctx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
//! assert_eq!(ctx.child(7).traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01");
//! ```

use std::cell::Cell;

/// A span's place in a trace: the trace id, the span's id, and whether the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The 128-bit trace id (never 0).
    pub trace_id: u128,
    /// The span's 64-bit id (never 0).
    pub span_id: u64,
    /// The `sampled` trace flag.
    pub sampled: bool,
}

thread_local! {
    static CURRENT: Cell<Option<TraceContext>> = const { Cell::new(None) };
}

impl TraceContext {
    /// A new trace, sampled, with a random trace id and span id.
    pub fn root() -> TraceContext {
        TraceContext {
            trace_id: u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(1..)),
            span_id: fastrand::u64(1..),
            sampled: true,
        }
    }

    /// A span in this trace, child of this one, with id `span_id` (0 picks a random one).
    pub fn child(&self, span_id: u64) -> TraceContext {
        let span_id = if span_id == 0 { fastrand::u64(1..) } else { span_id };
        TraceContext { span_id, ..*self }
    }

    /// Parses a `traceparent` header value as W3C Trace Context level 1 defines it: version
    /// `00` exactly (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), later versions by
    /// their first four fields; ids of all zeros, upper-case hex and version `ff` are invalid.
    pub fn parse(traceparent: &str) -> Option<TraceContext> {
        let bytes = traceparent.trim_matches([' ', '\t']).as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        // Version 00 has exactly four fields; a later one may add fields after a dash.
        let version = &bytes[..2];
        if (version == b"00" && bytes.len() != 55)
            || (bytes.len() > 55 && bytes[55] != b'-')
            || version == b"ff"
        {
            return None;
        }
        let hex = |field: &[u8]| -> Option<u128> {
            field.iter().try_fold(0u128, |acc, &b| {
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => return None,
                };
                Some(acc << 4 | u128::from(digit))
            })
        };
        hex(version)?;
        let trace_id = hex(&bytes[3..35])?;
        let span_id = u64::try_from(hex(&bytes[36..52])?).ok()?;
        let flags = hex(&bytes[53..55])?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The `traceparent` header value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }

    /// The context of the request or `tracing` span being worked on on this thread, if any.
    pub fn current() -> Option<TraceContext> {
        CURRENT.with(Cell::get)
    }

    /// Makes `ctx` the current context until the returned guard drops (then the one before is
    /// current again).
    pub fn enter(ctx: TraceContext) -> Entered {
        Entered { before: CURRENT.with(|c| c.replace(Some(ctx))) }
    }

    /// The trace context of a span recorded with these ids.
    pub fn ids(&self, parent: Option<&TraceContext>) -> crate::Ids {
        crate::Ids {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id: parent.map_or(0, |p| p.span_id),
        }
    }
}

/// Keeps a context current; see [`TraceContext::enter`].
#[derive(Debug)]
#[must_use = "the context is current only while the guard lives"]
pub struct Entered {
    before: Option<TraceContext>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let before = self.before;
        CURRENT.with(|c| c.set(before));
    }
}

/// The W3C `baggage` member by which tailscope's client layer tells a callee who calls it:
/// `ts.caller=<service>`. The callee's server layer records its span with that caller as
/// peer, so the edge appears from both ends of the service graph.
pub const CALLER_KEY: &str = "ts.caller";

/// The most bytes of `baggage` a request carries (W3C Baggage's limit).
pub const MAX_BAGGAGE_BYTES: usize = 8192;

/// The most members of `baggage` a request carries (W3C Baggage's limit).
pub const MAX_BAGGAGE_MEMBERS: usize = 64;

/// The value of member `key` in a W3C `baggage` header value, percent-decoded; `None` when
/// absent, or when its value does not decode to UTF-8. Borrowed when nothing was encoded.
pub fn baggage_get<'a>(baggage: &'a str, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    baggage.split(',').find_map(|member| {
        let (k, rest) = member.split_once('=')?;
        if k.trim_matches([' ', '\t']) != key {
            return None;
        }
        // Properties (`;k=v`) follow the value.
        let value = rest.split(';').next().unwrap_or("").trim_matches([' ', '\t']);
        percent_decode(value)
    })
}

/// `baggage` (a W3C `baggage` header value, possibly empty) with member `key` set to
/// `value`, percent-encoded: an earlier member of that key is removed, the others keep their
/// order. `None` when the result would pass W3C Baggage's limits ([`MAX_BAGGAGE_BYTES`],
/// [`MAX_BAGGAGE_MEMBERS`]); the caller then sends the header unchanged.
pub fn baggage_set(baggage: &str, key: &str, value: &str) -> Option<String> {
    let mut out = String::with_capacity(baggage.len() + key.len() + value.len() + 2);
    let mut members = 0;
    for member in baggage.split(',') {
        let trimmed = member.trim_matches([' ', '\t']);
        let same_key = trimmed.split_once('=').is_some_and(|(k, _)| k.trim_matches([' ', '\t']) == key);
        if trimmed.is_empty() || same_key {
            continue;
        }
        out.push_str(trimmed);
        out.push(',');
        members += 1;
    }
    out.push_str(key);
    out.push('=');
    percent_encode(value, &mut out);
    (members < MAX_BAGGAGE_MEMBERS && out.len() <= MAX_BAGGAGE_BYTES).then_some(out)
}

/// Whether W3C Baggage lets `b` stand for itself in a value (`baggage-octet`, less `%`).
fn plain(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

fn percent_encode(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

fn percent_decode(value: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !value.contains('%') {
        return Some(std::borrow::Cow::Borrowed(value));
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi << 4 | lo) as u8);
                i += 3;
            }
            // A stray `%` stands for itself, as W3C Baggage asks of a lenient reader.
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

#[cfg(test)]
mod tests;
