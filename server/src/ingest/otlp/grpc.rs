//! OTLP over gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on the gRPC
//! port. An export is answered once its spans are durable; refused spans come back in
//! `partial_success`.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

use super::{partial_success, to_batch};
use crate::ingest::{IngestService, Origin};

/// The OTLP trace service.
#[derive(Debug, Clone)]
pub struct OtlpService {
    ingest: IngestService,
}

impl OtlpService {
    /// A service feeding the same pipeline as `ingest`.
    pub fn new(ingest: IngestService) -> OtlpService {
        OtlpService { ingest }
    }
}

#[tonic::async_trait]
impl TraceService for OtlpService {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let (batch, unnamed) = to_batch(request.get_ref()).map_err(|m| {
            self.ingest.count_undecodable("invalid");
            Status::invalid_argument(m)
        })?;
        let receipt = self.ingest.submit(batch, Origin::Otlp).await.map_err(|e| e.grpc_status())?;
        // Answer once the export is on disk, as the native stream acknowledges; an SDK exports
        // one batch at a time, so its epoch is cut now (group commit), not at the next interval.
        self.ingest.durable(&receipt).await.map_err(|e| e.grpc_status())?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: partial_success(&receipt.stats, unnamed),
        }))
    }
}
