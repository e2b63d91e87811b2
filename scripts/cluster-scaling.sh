#!/usr/bin/env bash
# Ingest scaling: one node pinned to one core vs two cluster stores pinned to one core each
# (replication factor 1, so each stores half), NATS as three servers unpinned; CPU of every
# process read from /proc before and after. Needs nats-server and a release build.
set -u
B=${B:-target/release}; SPANS=${SPANS:-4000000}; SERIES=${SERIES:-1000}
D=${D:-/tmp/tailscope-scale}; rm -rf $D; mkdir -p $D
cpu() { local t=0; for p in "$@"; do set -- $(cut -d' ' -f14,15 /proc/$p/stat); t=$((t+$1+$2)); done; echo $t; }
now() { date +%s.%N; }
settle() { curl -s -H 'X-Read-Consistency: strong' "127.0.0.1:$1/api/v1/tail?start=0&end=4000000000" -o /dev/null -w "%{http_code}"; }
# Single node on core 0.
taskset -c 0 $B/tailscope-server --data-dir $D/single --grpc-addr 127.0.0.1:44317 --http-addr 127.0.0.1:49090 --otlp-http-addr 127.0.0.1:0 > $D/single.log 2>&1 & S=$!
for i in $(seq 60); do curl -sf 127.0.0.1:49090/-/ready >/dev/null && break; sleep 0.5; done
c0=$(cpu $S); t0=$(now)
$B/tailscope-load bench --grpc 127.0.0.1:44317 --pid $S --spans $SPANS --series $SERIES --connections 2 > $D/single.bench 2>&1
t1=$(now); c1=$(cpu $S)
python3 -c "w=$t1-$t0; print('single node, one core: %d spans in %.2f s = %.0f spans/s; server %.3f CPU-s per million' % ($SPANS, w, $SPANS/w, ($c1-$c0)/100/($SPANS/1e6)))"
kill $S; wait $S 2>/dev/null
# The cluster.
source "$(dirname "$0")/nats-cluster.sh"
nats_cluster $D
export TAILSCOPE_CLUSTER_PARTITIONS=8 TAILSCOPE_CLUSTER_REPLICATION_FACTOR=1
start() { # id core grpc http
  TAILSCOPE_CLUSTER_NODE_ID=$1 taskset -c $2 $B/tailscope-server --data-dir $D/$1 --grpc-addr 127.0.0.1:$3 --http-addr 127.0.0.1:$4 --otlp-http-addr 127.0.0.1:0 > $D/$1.log 2>&1 & echo $! > $D/$1.pid
  for i in $(seq 60); do curl -sf 127.0.0.1:$4/-/ready >/dev/null && break; sleep 0.5; done
}
start a 0 14317 19090; start b 1 24317 29090
sleep 8
curl -s 127.0.0.1:19090/api/v1/status/cluster | python3 -c '
import sys,json; d=json.load(sys.stdin)["data"]
print("owners:", [p["owners"] for p in d["partitions"]])'
P="$(cat $D/a.pid) $(cat $D/b.pid)"; N="$(cat $D/n1.pid) $(cat $D/n2.pid) $(cat $D/n3.pid)"
c0=$(cpu $P); n0=$(cpu $N); t0=$(now)
$B/tailscope-load bench --grpc 127.0.0.1:14317 --pid $(cat $D/a.pid) --spans $((SPANS/2)) --series $SERIES --connections 1 > $D/a.bench 2>&1 & GA=$!
$B/tailscope-load bench --grpc 127.0.0.1:24317 --pid $(cat $D/b.pid) --spans $((SPANS/2)) --series $SERIES --connections 1 > $D/b.bench 2>&1 & GB=$!
wait $GA $GB
ta=$(now)
echo "strong settle a $(settle 19090) b $(settle 29090)"
t1=$(now); c1=$(cpu $P); n1=$(cpu $N)
python3 -c "
w=$t1-$t0; a=$ta-$t0; m=$SPANS/1e6
print('cluster, two stores on one core each: %d spans acknowledged in %.2f s, stored (strong read on both) in %.2f s = %.0f spans/s' % ($SPANS, a, w, $SPANS/w))
print('CPU-s per million: tailscope nodes %.3f, NATS %.3f, all %.3f' % (($c1-$c0)/100/m, ($n1-$n0)/100/m, ($c1-$c0+$n1-$n0)/100/m))"
grep -h "throughput\|server CPU" $D/a.bench $D/b.bench
logged() { curl -s 127.0.0.1:19090/metrics 127.0.0.1:29090/metrics | awk -v m="$1" '$1 == m {s += $2} END {printf "%.0f", s}'; }
python3 -c "
sent, encoded = $(logged tailscope_log_bytes_total), $(logged tailscope_log_encoded_bytes_total)
print('log bytes per span: %.1f published, %.1f encoded (compression %s)' % (sent / $SPANS, encoded / $SPANS, '${TAILSCOPE_CLUSTER_LOG_COMPRESSION:-snappy}'))"
for q in "sum(increase(span_duration_seconds_count[3h]))"; do for port in 19090 29090; do curl -s --data-urlencode "query=$q" 127.0.0.1:$port/api/v1/query | python3 -c 'import sys,json; print("count on node", json.load(sys.stdin)["data"]["result"][0]["value"][1])'; done; done
for p in a b; do kill $(cat $D/$p.pid) 2>/dev/null; done
for p in a b; do while kill -0 $(cat $D/$p.pid) 2>/dev/null; do sleep 0.1; done; done
for p in n1 n2 n3; do kill $(cat $D/$p.pid) 2>/dev/null; done
sleep 1
