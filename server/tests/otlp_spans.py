"""Sends spans with known durations to tailscope through the real OpenTelemetry Python SDK and
its OTLP exporter. Usage: otlp_spans.py ENDPOINT SPEC.json [grpc|http]
(http: ENDPOINT is the full URL, e.g. http://127.0.0.1:4318/v1/traces; TLS and headers come from
the SDK's own environment variables, OTEL_EXPORTER_OTLP_CERTIFICATE and OTEL_EXPORTER_OTLP_HEADERS)

SPEC: {"service": str, "spans": [[operation, start_unix_nanos, duration_nanos, is_error], ...]}
"""
import importlib
import json
import sys

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode


def main() -> int:
    endpoint, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    provider = TracerProvider(resource=Resource.create({"service.name": spec["service"]}))
    protocol = sys.argv[3] if len(sys.argv) > 3 else "grpc"
    module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{protocol}.trace_exporter")
    if protocol == "grpc":
        # https:// endpoints: the CA from OTEL_EXPORTER_OTLP_CERTIFICATE; headers (a bearer
        # token) from OTEL_EXPORTER_OTLP_HEADERS, as any deployment would set them.
        exporter = module.OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    else:
        exporter = module.OTLPSpanExporter(endpoint=endpoint)
    # A queue that holds every span: the default (2,048) drops what does not fit.
    queue = len(spec["spans"]) + 1
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=queue, max_export_batch_size=512))
    tracer = provider.get_tracer("tailscope-otlp-test")
    for operation, start, duration, is_error in spec["spans"]:
        span = tracer.start_span(operation, start_time=start)
        if is_error:
            span.set_status(Status(StatusCode.ERROR, "failed"))
        span.end(end_time=start + duration)
    if not provider.force_flush(timeout_millis=30_000):
        print("force_flush timed out", file=sys.stderr)
        return 1
    provider.shutdown()
    print(f"exported {len(spec['spans'])} spans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
