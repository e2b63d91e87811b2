"""Records spans at a steady rate through the real OpenTelemetry Python SDK with all its
defaults (BatchSpanProcessor: a 2,048-span queue, 512-span exports, one export at a time) and
its OTLP/gRPC exporter, the way an instrumented service does.

Usage: otlp_rate.py ENDPOINT SERVICE RATE SECONDS [grpc|http]
(http: ENDPOINT is the full URL, e.g. http://127.0.0.1:4318/v1/traces)

Prints one JSON line: spans created, spans exported (acknowledged), the SDK's "Queue full,
dropping" warnings, and the latency of each export call (what the SDK waits for an
acknowledgement).
"""
import json
import logging
import sys
import time

import importlib
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


class Dropped(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "dropping" in message.lower():
            self.count += 1
            self.messages.append(message)


def timed(protocol, endpoint):
    """The SDK's own OTLP exporter for `protocol`, timing each export call."""
    module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{protocol}.trace_exporter")

    class Timed(module.OTLPSpanExporter):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.latencies = []
            self.exported = 0

        def export(self, spans):
            started = time.perf_counter()
            result = super().export(spans)
            self.latencies.append(time.perf_counter() - started)
            if result.name == "SUCCESS":
                self.exported += len(spans)
            return result

    if protocol == "grpc":
        return Timed(endpoint=endpoint, insecure=True)
    return Timed(endpoint=endpoint)


def main() -> int:
    endpoint, service, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    protocol = sys.argv[5] if len(sys.argv) > 5 else "grpc"
    dropped = Dropped()
    logging.getLogger("opentelemetry").addHandler(dropped)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = timed(protocol, endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # every default
    tracer = provider.get_tracer("tailscope-rate-test")
    total = int(rate * seconds)
    created = 0
    began = time.perf_counter()
    tick = 0.005  # spans are made in bursts every 5 ms, the pace of a busy service
    while created < total:
        # As many as are due by now: a process that falls behind catches up in bursts, so the
        # count is exact and the rate is as close to the asked one as this machine allows.
        due = min(total, int(rate * (time.perf_counter() - began)) + 1)
        while created < due:
            now = time.time_ns()
            duration = 1_000_000 + (created * 7_919 % 997) * 10_000
            span = tracer.start_span("GET /rate", start_time=now - duration)
            span.end(end_time=now)
            created += 1
        delay = tick - (time.perf_counter() - began) % tick
        time.sleep(delay)
    offered_seconds = time.perf_counter() - began
    provider.force_flush(timeout_millis=60_000)
    provider.shutdown()
    lat = sorted(exporter.latencies)

    def q(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

    print(json.dumps({
        "created": created,
        "exported": exporter.exported,
        "offered_seconds": offered_seconds,
        "dropped_warnings": dropped.count,
        "drop_messages": dropped.messages[:3],
        "exports": len(lat),
        "ack_p50": q(0.5),
        "ack_p99": q(0.99),
        "ack_max": lat[-1] if lat else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
