#!/usr/bin/env bash
# The names log at a million names: one cluster node (all roles, 8 partitions, R3 over three
# NATS servers) loaded with SPANS spans over SERIES names it has never seen, then restarted on
# the same data: how long until it is ready, and how long applying the names log took (its
# log line). SERVER picks the server binary. Needs nats-server and a release build.
set -u
B=${B:-target/release}; SERVER=${SERVER:-$B/tailscope-server}; LOAD=$B/tailscope-load
SERIES=${SERIES:-1000000}; SPANS=${SPANS:-2000000}
D=${D:-/tmp/tailscope-names-catchup}; rm -rf $D; mkdir -p $D
source "$(dirname "$0")/nats-cluster.sh"
nats_cluster $D > /dev/null 2>&1
export TAILSCOPE_CLUSTER_PARTITIONS=8 TAILSCOPE_INGEST_MAX_OPERATIONS_PER_SERVICE=$((SERIES/10+1)) TAILSCOPE_QUERY_MAX_SERIES=$((SERIES+1))
start() { TAILSCOPE_CLUSTER_NODE_ID=a $SERVER --data-dir $D/a --grpc-addr 127.0.0.1:14317 --http-addr 127.0.0.1:19090 --otlp-http-addr 127.0.0.1:0 > $D/a$1.log 2>&1 & echo $! > $D/a.pid
  for i in $(seq 240); do curl -sf 127.0.0.1:19090/-/ready >/dev/null && break; sleep 0.25; done; }
t0=$(date +%s.%N); start 1; t1=$(date +%s.%N); echo "first start ready in $(python3 -c "print(round($t1-$t0,2))") s"
$LOAD bench --grpc 127.0.0.1:14317 --pid $(cat $D/a.pid) --spans $SPANS --series $SERIES --connections 2 > $D/bench.out 2>&1
grep -h "throughput\|acks" $D/bench.out
curl -s 127.0.0.1:19090/metrics | grep -E "^tailscope_names_proposed_total"
curl -s "127.0.0.1:18221/jsz?streams=true&accounts=true" | python3 -c '
import sys, json
for a in json.load(sys.stdin).get("account_details", []):
    for s in a.get("stream_detail", []):
        if s["name"].endswith("_names"): print("names log:", s["state"]["messages"], "messages,", s["state"]["bytes"], "bytes")'
kill $(cat $D/a.pid); while kill -0 $(cat $D/a.pid) 2>/dev/null; do sleep 0.1; done
t0=$(date +%s.%N); start 2; t1=$(date +%s.%N); echo "restart ready in $(python3 -c "print(round($t1-$t0,2))") s"
grep -h "names log applied\|names log is not applied" $D/a2.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220
ps -o rss= -p $(cat $D/a.pid) | awk '{print "RSS after restart", int($1/1024), "MB"}'
kill $(cat $D/a.pid); while kill -0 $(cat $D/a.pid) 2>/dev/null; do sleep 0.1; done
for p in n1 n2 n3; do kill $(cat $D/$p.pid) 2>/dev/null; done; sleep 1
