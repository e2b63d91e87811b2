# Sourced by the cluster scripts: `nats_cluster DIR` starts three JetStream servers on loopback
# (client ports 15221-15223, routes 16221-16223, monitoring 18221-18223), their pids in
# DIR/n1.pid .. DIR/n3.pid, and points tailscope at them (TAILSCOPE_CLUSTER_NATS).
nats_cluster() {
  local dir=$1 i
  for i in 1 2 3; do cat > $dir/n$i.conf <<EOC
server_name: n$i
listen: 127.0.0.1:1522$i
http: 127.0.0.1:1822$i
max_payload: 8MB
jetstream { store_dir: "$dir/n$i", max_file_store: 8GB }
cluster { name: frc, listen: 127.0.0.1:1622$i,
  routes: [nats-route://127.0.0.1:16221, nats-route://127.0.0.1:16222, nats-route://127.0.0.1:16223] }
EOC
  nats-server -c $dir/n$i.conf -l $dir/n$i.log & echo $! > $dir/n$i.pid; done
  sleep 3
  export TAILSCOPE_CLUSTER_NATS=nats://127.0.0.1:15221,nats://127.0.0.1:15222,nats://127.0.0.1:15223
}
