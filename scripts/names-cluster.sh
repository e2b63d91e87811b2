#!/usr/bin/env bash
# What agreeing on names costs a gateway: one cluster node (all roles, 8 partitions, R3 over
# three NATS servers) loaded by `tailscope-load bench` with SERIES names it has never seen, then
# the names it added to the names log and the log's size. SERVER picks the server binary (to
# compare builds). Needs nats-server and a release build.
set -u
B=${B:-target/release}; SERVER=${SERVER:-$B/tailscope-server}
SPANS=${SPANS:-2000000}; SERIES=${SERIES:-100000}
D=${D:-/tmp/tailscope-names}; rm -rf $D; mkdir -p $D
source "$(dirname "$0")/nats-cluster.sh"
nats_cluster $D > /dev/null 2>&1
export TAILSCOPE_CLUSTER_PARTITIONS=8
TAILSCOPE_CLUSTER_NODE_ID=a $SERVER --data-dir $D/a --grpc-addr 127.0.0.1:14317 --http-addr 127.0.0.1:19090 --otlp-http-addr 127.0.0.1:0 > $D/a.log 2>&1 & A=$!
for i in $(seq 60); do curl -sf 127.0.0.1:19090/-/ready >/dev/null && break; sleep 0.5; done
sleep 3
$B/tailscope-load bench --grpc 127.0.0.1:14317 --pid $A --spans $SPANS --series $SERIES --connections 2 > $D/bench.out 2>&1
grep -h "throughput\|acks\|server CPU" $D/bench.out
curl -s 127.0.0.1:19090/metrics | grep -E "^tailscope_names_proposed_total|^tailscope_active_series "
curl -s "127.0.0.1:18221/jsz?streams=true&accounts=true" | python3 -c '
import sys, json
for a in json.load(sys.stdin).get("account_details", []):
    for s in a.get("stream_detail", []):
        if s["name"].endswith("_names"):
            print("names log:", s["state"]["messages"], "messages,", s["state"]["bytes"], "bytes")'
kill $A; wait $A 2>/dev/null
for p in n1 n2 n3; do kill $(cat $D/$p.pid) 2>/dev/null; done
sleep 2
