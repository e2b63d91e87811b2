//! OTLP over HTTP: `POST /v1/traces` on its own listener (`server.otlp_http_addr`, 4318 by
//! default, the OpenTelemetry specification's port), with `application/x-protobuf` or
//! `application/json` bodies, optionally `Content-Encoding: gzip`.
//!
//! As the OTLP/HTTP specification asks: the answer has the request's content type; a refused
//! export gets a 4xx with a `google.rpc.Status` body naming what was wrong; throttling is a
//! 429 or 503 with `Retry-After`. The body is bounded twice: as received and once inflated
//! (`ingest.max_batch_bytes`), so a gzip bomb is a 413, not an allocation. Browsers get CORS
//! for the origins configured in `server.otlp_http_cors_origins`.

use std::io::Read;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::json;
use super::wire::{self, WireError};
use super::{partial_success, to_batch};
use crate::ingest::{IngestError, IngestService, Origin};

#[cfg(test)]
mod tests;

/// What the HTTP transport needs besides the ingest door.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest body accepted, as received and once inflated.
    pub max_body_bytes: usize,
    /// Origins allowed to send from a browser (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone)]
struct HttpState {
    ingest: IngestService,
    config: HttpConfig,
}

/// The routes of the OTLP/HTTP listener.
pub fn router(ingest: IngestService, config: HttpConfig) -> Router {
    Router::new()
        .route("/v1/traces", post(export).options(preflight))
        .fallback(not_found)
        .with_state(HttpState { ingest, config })
}

/// The two encodings OTLP/HTTP defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// `google.rpc.Status`, the body of an OTLP/HTTP error.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// A refused export: the HTTP status, the gRPC code for the body, the message, and
/// `Retry-After` seconds when the sender should try again.
#[derive(Debug)]
struct Refusal {
    status: u16,
    code: tonic::Code,
    message: String,
    retry_after: Option<u32>,
}

impl Refusal {
    fn new(status: u16, code: tonic::Code, message: impl Into<String>) -> Refusal {
        Refusal { status, code, message: message.into(), retry_after: None }
    }

    fn from_ingest(e: &IngestError) -> Refusal {
        let (status, retry_after) = e.http_status();
        Refusal { status, code: e.grpc_status().code(), message: e.to_string(), retry_after }
    }

    fn respond(self, encoding: Encoding) -> Response {
        let body = match encoding {
            Encoding::Protobuf => RpcStatus { code: self.code as i32, message: self.message }.encode_to_vec(),
            Encoding::Json => serde_json::to_vec(&serde_json::json!({
                "code": self.code as i32,
                "message": self.message,
            }))
            .unwrap_or_default(),
        };
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = (status, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

async fn not_found() -> Response {
    Refusal::new(404, tonic::Code::NotFound, "not found: OTLP/HTTP takes POST /v1/traces")
        .respond(Encoding::Json)
}

/// The CORS origin to allow for this request, if any.
fn allowed_origin(config: &HttpConfig, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    config.cors_origins.iter().any(|o| o == "*" || o == text).then(|| origin.clone())
}

fn with_cors(mut response: Response, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// A browser's preflight: which methods and headers an allowed origin may use.
async fn preflight(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let Some(origin) = allowed_origin(&s.config, &headers) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
    let asked = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("content-type, content-encoding"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    with_cors(response, Some(origin))
}

async fn export(State(s): State<HttpState>, request: Request) -> Response {
    let origin = allowed_origin(&s.config, request.headers());
    if request.method() != Method::POST {
        return with_cors(StatusCode::METHOD_NOT_ALLOWED.into_response(), origin);
    }
    let response = match receive(&s, request).await {
        Ok(response) => response,
        Err((refusal, encoding)) => refusal.respond(encoding),
    };
    with_cors(response, origin)
}

/// Reads, decodes and submits one export; answers once its spans are durable.
async fn receive(s: &HttpState, request: Request) -> Result<Response, (Refusal, Encoding)> {
    let headers = request.headers().clone();
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let encoding = match media.as_str() {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        _ => {
            s.ingest.count_undecodable("unsupported_media_type");
            return Err((
                Refusal::new(
                    415,
                    tonic::Code::InvalidArgument,
                    format!(
                        "unsupported content type {content_type:?}: send application/x-protobuf or application/json"
                    ),
                ),
                Encoding::Json,
            ));
        }
    };
    let refuse = |reason: &'static str, refusal: Refusal| {
        s.ingest.count_undecodable(reason);
        (refusal, encoding)
    };
    let limit = s.config.max_body_bytes;
    let body = read_body(request.into_body(), limit).await.map_err(|r| refuse("oversized", r))?;
    let body = match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => body,
        Some(e) if e.eq_ignore_ascii_case("gzip") => inflate(&body, limit).map_err(|r| {
            let reason = if r.status == 413 { "oversized" } else { "malformed" };
            refuse(reason, r)
        })?,
        Some(other) => {
            return Err(refuse(
                "unsupported_media_type",
                Refusal::new(
                    415,
                    tonic::Code::InvalidArgument,
                    format!("unsupported content encoding {other:?}: send gzip or none"),
                ),
            ))
        }
    };
    let bad = |reason, m: String| refuse(reason, Refusal::new(400, tonic::Code::InvalidArgument, m));
    let (batch, unnamed) = match encoding {
        // Read in place: only the fields tailscope uses, nothing allocated per span.
        Encoding::Protobuf => wire::decode_export(&body).map_err(|e| match e {
            WireError::Malformed(m) => bad(
                "malformed",
                format!("the body is not an OTLP ExportTraceServiceRequest in protobuf: {m}"),
            ),
            WireError::Invalid(m) => bad("invalid", m),
        })?,
        Encoding::Json => {
            let export = json::export_from_json(&body)
                .map_err(|e| bad("malformed", format!("the body is not OTLP/JSON: {e}")))?;
            to_batch(&export).map_err(|m| bad("invalid", m))?
        }
    };
    let receipt =
        s.ingest.submit(batch, Origin::Otlp).await.map_err(|e| (Refusal::from_ingest(&e), encoding))?;
    s.ingest.durable(&receipt).await.map_err(|e| (Refusal::from_ingest(&e), encoding))?;
    let partial = partial_success(&receipt.stats, unnamed);
    let body = match encoding {
        Encoding::Protobuf => ExportTraceServiceResponse { partial_success: partial }.encode_to_vec(),
        Encoding::Json => {
            let value = match partial {
                // int64 fields are strings in OTLP/JSON (proto3's JSON mapping).
                Some(p) => serde_json::json!({"partialSuccess": {
                    "rejectedSpans": p.rejected_spans.to_string(),
                    "errorMessage": p.error_message,
                }}),
                None => serde_json::json!({}),
            };
            serde_json::to_vec(&value).unwrap_or_default()
        }
    };
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response())
}

/// The body, refused with a 413 past `limit` bytes (without reading the rest into memory).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Refusal> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // axum names the limit in its error's text only.
        if e.to_string().contains("length limit") {
            Refusal::new(
                413,
                tonic::Code::ResourceExhausted,
                format!(
                    "the body is larger than {limit} bytes (ingest.max_batch_bytes); send smaller exports"
                ),
            )
        } else {
            Refusal::new(400, tonic::Code::InvalidArgument, format!("cannot read the body: {e}"))
        }
    })
}

/// Inflates a gzip body, refusing with a 413 once it grows past `limit` bytes.
fn inflate(body: &[u8], limit: usize) -> Result<Bytes, Refusal> {
    let mut out = Vec::new();
    let read = flate2::read::GzDecoder::new(body).take(limit as u64 + 1).read_to_end(&mut out);
    match read {
        Err(e) => {
            Err(Refusal::new(400, tonic::Code::InvalidArgument, format!("the body is not valid gzip: {e}")))
        }
        Ok(n) if n > limit => Err(Refusal::new(
            413,
            tonic::Code::ResourceExhausted,
            format!(
                "the body inflates to more than {limit} bytes (ingest.max_batch_bytes); send smaller exports"
            ),
        )),
        Ok(_) => Ok(Bytes::from(out)),
    }
}
