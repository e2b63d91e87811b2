#!/usr/bin/env bash
# A store killed and restarted under a loaded cluster: how long it takes to read the last
# minutes of its log again into the open windows' exemplar sets and to catch up, and whether
# its exemplars then equal its peer's. Three NATS servers (R3), stores a and b (both hold
# every partition), SPANS spans through a; b SIGKILLed after them and started again on its
# store; after the windows closed, every exemplar of both nodes compared. Needs nats-server
# and a release build.
set -u
B=${B:-target/release}; SPANS=${SPANS:-4000000}; SERIES=${SERIES:-1000}
D=${D:-/tmp/tailscope-restart}; rm -rf $D; mkdir -p $D
source "$(dirname "$0")/nats-cluster.sh"
nats_cluster $D
export TAILSCOPE_CLUSTER_PARTITIONS=8
start() { # id grpc http
  TAILSCOPE_CLUSTER_NODE_ID=$1 $B/tailscope-server --data-dir $D/$1 --grpc-addr 127.0.0.1:$2 --http-addr 127.0.0.1:$3 --otlp-http-addr 127.0.0.1:0 >> $D/$1.log 2>&1 & echo $! > $D/$1.pid
  for i in $(seq 60); do curl -sf 127.0.0.1:$3/-/ready >/dev/null && break; sleep 0.5; done
}
caught_up() { curl -s 127.0.0.1:$1/api/v1/status/cluster | python3 -c '
import sys,json; d=json.load(sys.stdin)["data"]
ps=[p for p in d["partitions"] if sys.argv[1] in p["owners"]]
print(1 if ps and all(p.get("caught_up") for p in ps) else 0)' $2 2>/dev/null || echo 0; }
start a 14317 19090; start b 24317 29090
until [ "$(caught_up 19090 a)$(caught_up 29090 b)" = 11 ]; do sleep 0.5; done
t0=$(date +%s)
$B/tailscope-load bench --grpc 127.0.0.1:14317 --pid $(cat $D/a.pid) --spans $SPANS --series $SERIES --connections 2 > $D/a.bench 2>&1
grep -h "throughput" $D/a.bench
bench=$(( $(date +%s) - t0 ))
curl -s -o /dev/null -H 'X-Read-Consistency: strong' "127.0.0.1:29090/api/v1/tail?start=0&end=4000000000"
kill -9 $(cat $D/b.pid); wait $(cat $D/b.pid) 2>/dev/null
s=$(date +%s.%N)
start b 24317 29090
until [ "$(caught_up 29090 b)" = 1 ]; do sleep 0.1; done
e=$(date +%s.%N)
python3 - "$D/b.log" "$s" "$e" <<'PY'
import re, sys
records = seconds = 0.0; parts = 0
for line in open(sys.argv[1]):
    if "rebuilt the exemplar sets" in line:
        parts += 1
        records += int(re.search(r"records=(\d+)", line).group(1))
        seconds = max(seconds, float(re.search(r"seconds=([\d.]+)", line).group(1)))
print("b restarted: %d partitions rebuilt their open windows' exemplar sets from %d log records (slowest %.2f s); caught up %.2f s after its start"
      % (parts, records, seconds, float(sys.argv[3]) - float(sys.argv[2])))
PY
# Exemplars of a window are written 30 s after it ends: wait until the last one's are.
while [ $(( $(date +%s) - t0 )) -lt $(( bench + 45 )) ]; do sleep 1; done
ex() { curl -s "127.0.0.1:$1/api/v1/query_exemplars?query=span_duration_seconds_bucket&start=$((t0-600))&end=$(( $(date +%s)+60 ))" | python3 -c '
import sys,json; d=json.load(sys.stdin)["data"]
print("\n".join(sorted("%s %s %s" % (s["seriesLabels"], e["labels"], e["value"]) for s in d for e in s["exemplars"])))'; }
ex 19090 > $D/a.exemplars; ex 29090 > $D/b.exemplars
echo "exemplars: a $(wc -l < $D/a.exemplars), b $(wc -l < $D/b.exemplars), lines that differ: $(diff $D/a.exemplars $D/b.exemplars | grep -c '^[<>]')"
for p in a b; do kill $(cat $D/$p.pid) 2>/dev/null; done
for p in a b; do while kill -0 $(cat $D/$p.pid) 2>/dev/null; do sleep 0.1; done; done
for p in n1 n2 n3; do kill $(cat $D/$p.pid) 2>/dev/null; done
sleep 1
