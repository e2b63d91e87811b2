//! OTLP over gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on the gRPC
//! port. An export is answered once its spans are durable; refused spans come back in
//! `partial_success`.
//!
//! The service is written out here rather than generated so the request reaches tailscope as
//! bytes ([`RawCodec`]) and is read in place by [`super::wire`]: nothing is allocated per span,
//! attribute or event, which a generated message decoder spends most of its time on.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::partial_success;
use super::wire::{self, WireError};
use crate::ingest::{IngestService, Origin};

/// The gRPC path of the one method.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The OTLP trace service.
#[derive(Debug, Clone)]
pub struct OtlpService {
    ingest: IngestService,
    max_message_bytes: usize,
}

impl OtlpService {
    /// A service feeding the same pipeline as `ingest`, taking exports of at most
    /// `max_message_bytes` (decompressed).
    pub fn new(ingest: IngestService, max_message_bytes: usize) -> OtlpService {
        OtlpService { ingest, max_message_bytes }
    }

    async fn export(&self, bytes: Bytes) -> Result<ExportTraceServiceResponse, Status> {
        let (batch, unnamed) = wire::decode_export(&bytes).map_err(|e| {
            let (reason, message) = match e {
                WireError::Malformed(m) => {
                    ("malformed", format!("not an OTLP ExportTraceServiceRequest in protobuf: {m}"))
                }
                WireError::Invalid(m) => ("invalid", m),
            };
            self.ingest.count_undecodable(reason);
            Status::invalid_argument(message)
        })?;
        let receipt = self.ingest.submit(batch, Origin::Otlp).await.map_err(|e| e.grpc_status())?;
        // Answer once the export is on disk, as the native stream acknowledges; an SDK exports
        // one batch at a time, so its epoch is cut now (group commit), not at the next interval.
        self.ingest.durable(&receipt).await.map_err(|e| e.grpc_status())?;
        Ok(ExportTraceServiceResponse { partial_success: partial_success(&receipt.stats, unnamed) })
    }
}

impl NamedService for OtlpService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

/// The request as its bytes; the response as protobuf.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst).map_err(|e| Status::internal(format!("encoding the response: {e}")))
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The method, as tonic's unary handler wants it.
struct Export(OtlpService);

impl UnaryService<Bytes> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Self::Response>, Status>> + Send>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.export(request.into_inner()).await.map(Response::new) })
    }
}

impl<B> tower_service::Service<http::Request<B>> for OtlpService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let service = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(service.max_message_bytes)
                .max_encoding_message_size(1024 * 1024);
            Ok(grpc.unary(Export(service), req).await)
        })
    }
}
