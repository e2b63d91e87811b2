// Records spans at a steady rate through the real OpenTelemetry Node.js SDK with all its
// defaults (BatchSpanProcessor: a 2,048-span queue, 512-span exports) and one of its OTLP
// exporters, the way an instrumented service does.
//
// Usage: node otlp_rate.mjs grpc|http|proto ENDPOINT SERVICE RATE SECONDS
//   grpc: ENDPOINT http://127.0.0.1:4317; http (JSON) and proto: http://127.0.0.1:4318/v1/traces
//
// Prints one JSON line: spans created, spans the SDK reported dropping, the latency of each
// export call, and the export results that failed.
import { diag, DiagLogLevel } from "@opentelemetry/api";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BatchSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";

const [protocol, endpoint, service, rateArg, secondsArg] = process.argv.slice(2);
const rate = Number(rateArg);
const seconds = Number(secondsArg);
const modules = {
  grpc: "@opentelemetry/exporter-trace-otlp-grpc",
  http: "@opentelemetry/exporter-trace-otlp-http",
  proto: "@opentelemetry/exporter-trace-otlp-proto",
};
const { OTLPTraceExporter } = await import(modules[protocol]);

let dropped = 0;
const warnings = [];
diag.setLogger(
  {
    error: (m) => warnings.push(String(m)),
    warn: (m) => {
      const found = /Dropped (\d+) spans/.exec(String(m));
      if (found) dropped += Number(found[1]);
      warnings.push(String(m));
    },
    info: () => {},
    debug: () => {},
    verbose: () => {},
  },
  DiagLogLevel.WARN,
);

const exporter = new OTLPTraceExporter({ url: endpoint });
const latencies = [];
const failures = [];
const exportOriginal = exporter.export.bind(exporter);
exporter.export = (spans, done) => {
  const started = process.hrtime.bigint();
  exportOriginal(spans, (result) => {
    latencies.push(Number(process.hrtime.bigint() - started) / 1e9);
    if (result.code !== 0) failures.push(String(result.error));
    done(result);
  });
};
const provider = new TracerProvider({
  resource: resourceFromAttributes({ "service.name": service }),
  spanProcessors: [new BatchSpanProcessor({ exporter })], // every default
});
const tracer = provider.getTracer("tailscope-rate-test");

const total = Math.floor(rate * seconds);
let created = 0;
const began = process.hrtime.bigint();
const elapsed = () => Number(process.hrtime.bigint() - began) / 1e9;
while (created < total) {
  // As many as are due by now: the count is exact, the rate as close as this machine allows.
  const due = Math.min(total, Math.floor(rate * elapsed()) + 1);
  while (created < due) {
    const now = Date.now();
    const span = tracer.startSpan("GET /rate", { startTime: now - 1 - (created % 50) });
    span.end(now);
    created++;
  }
  await new Promise((resolve) => setTimeout(resolve, 5));
}
const offeredSeconds = elapsed();
await provider.forceFlush();
await provider.shutdown();
latencies.sort((a, b) => a - b);
const q = (p) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : null);
console.log(
  JSON.stringify({
    created,
    offered_seconds: offeredSeconds,
    dropped,
    failures: failures.slice(0, 3),
    warnings: warnings.slice(0, 3),
    exports: latencies.length,
    ack_p50: q(0.5),
    ack_p99: q(0.99),
    ack_max: latencies.length ? latencies[latencies.length - 1] : null,
  }),
);
