#!/usr/bin/env bash
# The test command: installs what the build and the tests need when it is missing, then runs
# the fast suite and, after it, the soak suite (the long scenarios).
#
#   scripts/test.sh          both suites (what CI runs)
#   scripts/test.sh --fast   the fast suite only
#   scripts/test.sh --soak   the soak suite only
set -euo pipefail
cd "$(dirname "$0")/.."

suites=(fast soak)
case "${1:-}" in
  --fast) suites=(fast) ;;
  --soak) suites=(soak) ;;
  "") ;;
  *) echo "usage: scripts/test.sh [--fast|--soak]" >&2; exit 2 ;;
esac

# What the build needs: libclang and g++.
bash scripts/build-deps.sh
need_apt=()
# Real peers the tests compare against: Prometheus (promtool backfill + queries, rule checks).
command -v promtool >/dev/null && command -v prometheus >/dev/null || need_apt+=(prometheus)
# ... and Alertmanager, the oracle of the notifier's grouping and webhook body.
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
# ... and NATS, the log of cluster mode (JetStream; Debian's 2.9.10).
command -v nats-server >/dev/null || need_apt+=(nats-server)
# curl is the HTTP client of the TLS tests (certificates, client certificates).
command -v curl >/dev/null || need_apt+=(curl ca-certificates)
# The load tool's PNG charts set their text in a system font.
[ -n "$(find /usr/share/fonts -name '*.ttf' -print -quit 2>/dev/null)" ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The real OpenTelemetry client the OTLP tests drive.
if ! python3 -c "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc.trace_exporter, opentelemetry.exporter.otlp.proto.http.trace_exporter" 2>/dev/null; then
  echo "installing: opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http (PyPI)"
  python3 -m pip install -q opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http
fi

# The real OpenTelemetry Node.js SDK and exporters the OTLP tests drive (Node 20 is on the machine).
if [ ! -d server/tests/node/node_modules/@opentelemetry/sdk-trace ]; then
  echo "installing: the OpenTelemetry Node.js SDK and OTLP exporters (npm ci in server/tests/node)"
  npm ci --prefix server/tests/node --no-audit --no-fund --loglevel=error
fi

cargo --version
# A one-shot build gains nothing from incremental state; it only costs disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
for suite in "${suites[@]}"; do
  started=$SECONDS
  case $suite in
    fast)
      echo "== fast suite: cargo test --workspace"
      cargo test --workspace
      ;;
    soak)
      # One at a time: these measure the server under load, pauses and outages...
      waiting=(
        alerting::a_receiver_down_for_minutes_gets_the_notification_once_when_back
        remote_write::an_unreachable_target_for_sixty_seconds_loses_nothing_that_fits_the_queue
        client::a_sixty_second_outage_ends_exact
        cluster::every_node_counts_exactly_across_a_nats_leader_kill_a_node_kill_and_a_new_node
        cluster::a_nats_leader_election_costs_a_client_no_timeout_no_reconnect_and_no_span
        cluster::a_ruler_failover_mid_incident_loses_no_resolve_and_repeats_at_most_once
        cluster::a_strong_read_on_another_node_sees_every_acknowledged_span_and_the_status_shows_the_members
      )
      skips=()
      for t in "${waiting[@]}"; do skips+=(--skip "$t"); done
      # --workspace, as the fast suite: the same feature resolution, so the server's tests are
      # not built a second time (with -p tailscope-server they were, 4 minutes of it). Only the
      # server's `it` has ignored tests; the load tool's runs none of them.
      echo "== soak suite: cargo test --workspace --test it -- --ignored --test-threads=1 (all but the outages)"
      cargo test --workspace --test it -- --ignored --test-threads=1 "${skips[@]}"
      # ...except these, which spend their minutes waiting out an outage (a receiver, a
      # remote-write target, the server itself, at 500 spans/s; NATS servers, nodes and a
      # ruler killed, on small fixed workloads that check counts, not speed) and so run side
      # by side.
      echo "== soak suite: the outages side by side (--exact --test-threads=${#waiting[@]})"
      cargo test --workspace --test it -- --ignored --exact --test-threads=${#waiting[@]} "${waiting[@]}"
      ;;
  esac
  echo "== $suite suite: $((SECONDS - started)) s (build included)"
done
