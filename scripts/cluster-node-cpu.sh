#!/usr/bin/env bash
# One cluster node alone: one nats-server (R1), the node BIN (default target/release), 4,000,000
# spans over 1,000 series through it by `tailscope-load bench`; its CPU (and NATS') from /proc
# up to a strong read that saw every span. For A/B pairs of two builds: run it with each.
set -u
BIN=${1:-target/release/tailscope-server}; L=${L:-target/release/tailscope-load}; D=${D:-/tmp/tailscope-node-cpu}; rm -rf $D; mkdir -p $D
cpu() { set -- $(cut -d' ' -f14,15 /proc/$1/stat); echo $(( $1 + $2 )); }
cat > $D/n.conf <<EOC
listen: 127.0.0.1:15298
max_payload: 8MB
jetstream { store_dir: "$D/n", max_file_store: 8GB }
EOC
nats-server -c $D/n.conf -l $D/n.log & N=$!
sleep 1
export TAILSCOPE_CLUSTER_NATS=nats://127.0.0.1:15298 TAILSCOPE_CLUSTER_NODE_ID=a TAILSCOPE_CLUSTER_PARTITIONS=8 TAILSCOPE_CLUSTER_STREAM_REPLICAS=1
$BIN --data-dir $D/a --grpc-addr 127.0.0.1:14398 --http-addr 127.0.0.1:19398 --otlp-http-addr 127.0.0.1:0 > $D/a.log 2>&1 & A=$!
for i in $(seq 60); do curl -sf 127.0.0.1:19398/-/ready >/dev/null && break; sleep 0.5; done
sleep 3
c0=$(cpu $A); n0=$(cpu $N)
$L bench --grpc 127.0.0.1:14398 --pid $A --spans 4000000 --series 1000 --connections 2 > $D/bench 2>&1
curl -s -H 'X-Read-Consistency: strong' "127.0.0.1:19398/api/v1/tail?start=0&end=4000000000" -o /dev/null
c1=$(cpu $A); n1=$(cpu $N)
echo "$(grep throughput $D/bench | awk '{print $2}') spans/s; node $(python3 -c "print('%.3f' % (($c1-$c0)/100/4))") CPU-s/M, NATS $(python3 -c "print('%.3f' % (($n1-$n0)/100/4))")"
kill $A; wait $A; kill $N; wait $N
