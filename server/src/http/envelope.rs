//! The Prometheus HTTP API's envelope, typed: every JSON answer of the `/api/v1` endpoints is
//! `{"status":"success","data":…}` (with `warnings` when there are any) or
//! `{"status":"error","errorType":…,"error":…}`, built here and nowhere else.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::query::promql::EvalError;
use crate::query::QueryError;

/// The envelope.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Envelope<T> {
    /// An answer.
    Success {
        /// The answer.
        data: T,
        /// What the caller should know about it (a cut list, …).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
    },
    /// A refusal or a failure.
    Error {
        /// Prometheus' error type: `bad_data`, `execution`, `timeout`, `internal`, ….
        #[serde(rename = "errorType")]
        error_type: &'static str,
        /// What was wrong.
        error: String,
    },
}

/// `data` as a successful answer.
pub fn success<T: Serialize>(data: T) -> Response {
    Json(Envelope::Success { data, warnings: Vec::new() }).into_response()
}

/// `data` as a successful answer with `warnings`.
pub fn success_with_warnings<T: Serialize>(data: T, warnings: Vec<String>) -> Response {
    Json(Envelope::Success { data, warnings }).into_response()
}

/// The answer, or the error.
pub fn respond<T: Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(data) => success(data),
        Err(e) => e.into_response(),
    }
}

/// An API error: HTTP status, `errorType` and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Prometheus' `errorType`.
    pub kind: &'static str,
    /// What was wrong.
    pub message: String,
}

impl ApiError {
    /// Any error.
    pub fn new(status: StatusCode, kind: &'static str, message: impl std::fmt::Display) -> ApiError {
        ApiError { status, kind, message: message.to_string() }
    }

    /// 400 `bad_data`: the request is malformed.
    pub fn bad_data(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_data", message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Envelope::<()>::Error { error_type: self.kind, error: self.message };
        (self.status, Json(body)).into_response()
    }
}

impl From<EvalError> for ApiError {
    fn from(e: EvalError) -> ApiError {
        let (status, kind) = match &e {
            EvalError::Unsupported(_) => (StatusCode::BAD_REQUEST, "bad_data"),
            EvalError::Execution(_) => (StatusCode::UNPROCESSABLE_ENTITY, "execution"),
            EvalError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            EvalError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, kind, e)
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        match e {
            QueryError::BadData(m) => ApiError::bad_data(m),
            QueryError::Store(e) => ApiError::internal(e),
            QueryError::Limit(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", m),
        }
    }
}

/// `{"status":"success","data":…}` with `data` written by `f`: for answers too large to build
/// as a tree first (a range query's matrix is written point by point).
pub fn write_success(f: impl FnOnce(&mut Vec<u8>) -> Result<(), EvalError>) -> Result<Vec<u8>, EvalError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"status":"success","data":"#);
    f(&mut out)?;
    out.push(b'}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_is_prometheus() {
        let ok = serde_json::to_value(Envelope::Success { data: [1, 2], warnings: Vec::new() }).unwrap();
        assert_eq!(ok, serde_json::json!({"status": "success", "data": [1, 2]}));
        let warned =
            serde_json::to_value(Envelope::Success { data: "x", warnings: vec!["cut".into()] }).unwrap();
        assert_eq!(warned, serde_json::json!({"status": "success", "data": "x", "warnings": ["cut"]}));
        let err = serde_json::to_value(Envelope::<()>::Error { error_type: "bad_data", error: "no".into() })
            .unwrap();
        assert_eq!(err, serde_json::json!({"status": "error", "errorType": "bad_data", "error": "no"}));
        let streamed = write_success(|out| {
            out.extend_from_slice(b"[1,2]");
            Ok(())
        })
        .unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&streamed).unwrap(), ok);
    }
}
