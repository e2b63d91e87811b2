#!/usr/bin/env bash
# Partitioned cluster (3 stores, replication factor 2) next to a single node: the 1 h query and
# a 1 h range query on the same data, answers compared over 3 h; then a 4th store joins and is timed until it holds
# its partitions caught up, and store c is told to stop and timed until it has drained.
# Needs nats-server and a release build (cargo build --release).
set -u
B=${B:-target/release}
D=${D:-/tmp/tailscope-partitioned}; rm -rf $D; mkdir -p $D
source "$(dirname "$0")/nats-cluster.sh"
nats_cluster $D
export TAILSCOPE_CLUSTER_PARTITIONS=8
# The answers compared select every series (100,000 with SERIES=100000), and the range query
# holds each series at its 241 steps.
export TAILSCOPE_QUERY_MAX_SERIES=1000000 TAILSCOPE_QUERY_MAX_SAMPLES=100000000
# One query's time in seconds; a refused or failed answer stops the script (a timed error is
# no measurement).
timed() { # url, then curl's data arguments
  local url=$1; shift
  local out; out=$(curl -s -o $D/answer.json -w '%{http_code} %{time_total}' "$@" "$url")
  if [ "${out%% *}" != 200 ] || ! grep -q '"status":"success"' $D/answer.json; then
    echo "FAILED: $url answered ${out%% *}: $(head -c 300 $D/answer.json)" >&2; exit 1
  fi
  echo "${out#* }"
}
start() { # id grpc http
  TAILSCOPE_CLUSTER_NODE_ID=$1 $B/tailscope-server --data-dir $D/$1 --grpc-addr 127.0.0.1:$2 --http-addr 127.0.0.1:$3 --otlp-http-addr 127.0.0.1:0 > $D/$1.log 2>&1 & echo $! > $D/$1.pid
  for i in $(seq 60); do curl -sf 127.0.0.1:$3/-/ready >/dev/null && break; sleep 0.5; done
}
start a 14317 19090; start b 24317 29090; start c 34317 39090
sleep 8
curl -s 127.0.0.1:19090/api/v1/status/cluster | python3 -c '
import sys,json; d=json.load(sys.stdin)["data"]
print("owners:", [p["owners"] for p in d["partitions"]])'
$B/tailscope-load bench --grpc 127.0.0.1:14317 --pid $(cat $D/a.pid) --spans ${SPANS:-2000000} --series ${SERIES:-1000} --start-spread 3600 2>&1 | tail -4
env -u TAILSCOPE_CLUSTER_NATS $B/tailscope-server --data-dir $D/single --grpc-addr 127.0.0.1:44317 --http-addr 127.0.0.1:49090 --otlp-http-addr 127.0.0.1:0 > $D/single.log 2>&1 & echo $! > $D/single.pid
for i in $(seq 60); do curl -sf 127.0.0.1:49090/-/ready >/dev/null && break; sleep 0.5; done
env -u TAILSCOPE_CLUSTER_NATS $B/tailscope-load bench --grpc 127.0.0.1:44317 --pid $(cat $D/single.pid) --spans ${SPANS:-2000000} --series ${SERIES:-1000} --start-spread 3600 2>&1 | tail -2
Q='histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[1h])))'
# Answers compared over 3 h: both data sets (loaded a minute apart) lie wholly inside.
A='histogram_quantile(0.99, sum by (le, service) (increase(span_duration_seconds_bucket[3h])))'
for port in 19090 29090 39090; do curl -s -H 'X-Read-Consistency: strong' "127.0.0.1:$port/api/v1/tail?start=0&end=4000000000" -o /dev/null -w "strong settle $port %{http_code}\n"; done
for port in 19090 29090 39090 49090; do
  curl -s --data-urlencode "query=$A" "127.0.0.1:$port/api/v1/query" | python3 -c 'import sys,json; d=json.load(sys.stdin); print(sorted((x["metric"]["service"], x["value"][1]) for x in d["data"]["result"]) if "data" in d else d, file=sys.stdout if "data" in d else sys.stderr)' | md5sum | sed "s/^/answer $port /"
done
# SETTLE seconds for the stores' compactions after loading before timing (none by default).
sleep ${SETTLE:-0}
for round in $(seq ${ROUNDS:-3}); do
  for port in 19090 49090 29090; do
    t=0; for i in $(seq 20); do s=$(timed "127.0.0.1:$port/api/v1/query" --data-urlencode "query=$Q") || exit 1; t=$(python3 -c "print($t+$s)"); done
    python3 -c "print('round $round port $port: %.1f ms per query' % ($t/20*1000))"
  done
done
# The range query: the last hour at 15 s steps, 10 times per node, three interleaved rounds.
R='histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[5m])))'
END=$(date +%s); START=$((END-3600))
for port in 19090 29090 39090; do
  curl -s --data-urlencode "query=$R" --data-urlencode "start=$START" --data-urlencode "end=$END" --data-urlencode step=15 "127.0.0.1:$port/api/v1/query_range" | python3 -c 'import sys,json; d=json.load(sys.stdin); print(sorted((x["metric"]["service"], x["values"]) for x in d["data"]["result"]) if d.get("status")=="success" else d, file=sys.stdout if d.get("status")=="success" else sys.stderr)' | md5sum | sed "s/^/range answer $port /"
done
for round in $(seq ${ROUNDS:-3}); do
  for port in 19090 49090 29090; do
    t=0; for i in $(seq 10); do s=$(timed "127.0.0.1:$port/api/v1/query_range" --data-urlencode "query=$R" --data-urlencode "start=$START" --data-urlencode "end=$END" --data-urlencode step=15) || exit 1; t=$(python3 -c "print($t+$s)"); done
    python3 -c "print('round $round port $port: %.1f ms per range query' % ($t/10*1000))"
  done
done
curl -s 127.0.0.1:18221/jsz?streams=true | python3 -c '
import sys,json; d=json.load(sys.stdin)
tot=0
for a in d.get("account_details",[]):
  for s in a.get("stream_detail",[]):
    if s["name"].startswith("tailscope_p"): print(s["name"], s["state"]["bytes"]); tot+=s["state"]["bytes"]
print("log bytes (one replica)", tot)'
# A fourth store joins: time until it holds every partition it owns caught up.
t0=$(date +%s.%N)
start d 54317 59090
while true; do
  ok=$(curl -s 127.0.0.1:59090/api/v1/status/cluster | python3 -c '
import sys,json; d=json.load(sys.stdin)["data"]; ps=d["partitions"]
own=[p for p in ps if "d" in p["owners"]]
print(len(own), all(p.get("caught_up") for p in own) and len(own)>0)')
  case "$ok" in *True) break;; esac; sleep 0.1; done
t1=$(date +%s.%N)
echo "join: d owns $ok; caught up $(python3 -c "print('%.2f' % ($t1-$t0))") s after its start"
curl -s 127.0.0.1:59090/api/v1/status/cluster | python3 -c '
import sys,json; d=json.load(sys.stdin)["data"]
print("owners after join:", [p["owners"] for p in d["partitions"]])'
for port in 19090 59090; do
  curl -s --data-urlencode "query=$A" "127.0.0.1:$port/api/v1/query" | python3 -c 'import sys,json; d=json.load(sys.stdin); print(sorted((x["metric"]["service"], x["value"][1]) for x in d["data"]["result"]) if "data" in d else d, file=sys.stdout if "data" in d else sys.stderr)' | md5sum | sed "s/^/answer after join $port /"
done
grep -h "caught up with" $D/d.log | head -3
# What d took from copies of the other owners' stores (one at a time), and the store's size.
grep -h "took a copy of a partition" $D/d.log | python3 -c '
import sys,re
rows=[]
for l in sys.stdin:
  f=dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", l))
  rows.append({"partition": int(f["partition"]), "peer": f["peer"].strip("\""), "records": int(f["records"]), "bytes": int(f["bytes"]), "seconds": float(f["seconds"])})
b=sum(r["bytes"] for r in rows); s=sum(r["seconds"] for r in rows)
for r in rows: print("copy: partition %d from %s, %d records, %d bytes, %.2f s" % (r["partition"], r["peer"], r["records"], r["bytes"], r["seconds"]))
print("copies: %d, %d bytes, %.2f s together, %.1f s per GiB" % (len(rows), b, s, s/(b/2**30) if b else 0))'
curl -s 127.0.0.1:59090/metrics | grep -E "^tailscope_partition_cop"
du -sb $D/a $D/d | sed "s/^/store bytes /"
# Store c is told to stop: it drains (keeps answering for its copies until every new owner has
# caught up), then exits; the answer on a after it left.
t0=$(date +%s.%N); kill -TERM $(cat $D/c.pid)
while kill -0 $(cat $D/c.pid) 2>/dev/null; do sleep 0.05; done
t1=$(date +%s.%N)
echo "drain: c exited $(python3 -c "print('%.2f' % ($t1-$t0))") s after SIGTERM"
grep -h "drain" $D/c.log | cut -c1-240
curl -s --data-urlencode "query=$A" "127.0.0.1:19090/api/v1/query" | python3 -c 'import sys,json; d=json.load(sys.stdin); print(sorted((x["metric"]["service"], x["value"][1]) for x in d["data"]["result"]) if "data" in d else d, file=sys.stdout if "data" in d else sys.stderr)' | md5sum | sed "s/^/answer after c left 19090 /"
for p in a b d single; do kill $(cat $D/$p.pid) 2>/dev/null; done
# All stopping at once, each store drains until it sees no store left to hand on to.
for p in a b d single; do while kill -0 $(cat $D/$p.pid) 2>/dev/null; do sleep 0.1; done; done
for p in n1 n2 n3; do kill $(cat $D/$p.pid) 2>/dev/null; done
