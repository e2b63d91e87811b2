# Sourced by the cluster scripts: `nats_cluster DIR` starts three JetStream servers on loopback
# (client ports 15221-15223, routes 16221-16223, monitoring 18221-18223), their pids in
# DIR/n1.pid .. DIR/n3.pid, and points tailscope at them (TAILSCOPE_CLUSTER_NATS).
# With NATS_TLS=1 the client connections are TLS with client certificates verified
# (`verify: true`) and a user with a password, certificates made here with openssl, and
# tailscope is given the files (TAILSCOPE_CLUSTER_TLS_*, _USER, _PASSWORD_FILE); the routes
# between the NATS servers stay plain.
nats_tls() {
  local pki=$1/pki
  mkdir -p $pki
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=tailscope-bench-ca \
    -keyout $pki/ca-key.pem -out $pki/ca.pem 2>/dev/null
  local who
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=$who \
      -keyout $pki/$who-key.pem -out $pki/$who.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > $pki/$who.ext
    openssl x509 -req -in $pki/$who.csr -CA $pki/ca.pem -CAkey $pki/ca-key.pem -CAcreateserial \
      -days 2 -extfile $pki/$who.ext -out $pki/$who.pem 2>/dev/null
  done
  echo bench-password > $pki/password
  export TAILSCOPE_CLUSTER_TLS_CA_FILE=$pki/ca.pem TAILSCOPE_CLUSTER_TLS_CERT_FILE=$pki/client.pem \
    TAILSCOPE_CLUSTER_TLS_KEY_FILE=$pki/client-key.pem TAILSCOPE_CLUSTER_USER=tailscope \
    TAILSCOPE_CLUSTER_PASSWORD_FILE=$pki/password
  cat > $pki/nats.conf <<EOC
tls { cert_file: "$pki/server.pem", key_file: "$pki/server-key.pem", ca_file: "$pki/ca.pem", verify: true }
authorization { users: [ { user: tailscope, password: bench-password } ] }
EOC
}

nats_cluster() {
  local dir=$1 i more=""
  if [ "${NATS_TLS:-0}" = 1 ]; then nats_tls $dir; more=$(cat $dir/pki/nats.conf); fi
  for i in 1 2 3; do cat > $dir/n$i.conf <<EOC
server_name: n$i
listen: 127.0.0.1:1522$i
http: 127.0.0.1:1822$i
max_payload: 8MB
jetstream { store_dir: "$dir/n$i", max_file_store: 8GB }
cluster { name: frc, listen: 127.0.0.1:1622$i,
  routes: [nats-route://127.0.0.1:16221, nats-route://127.0.0.1:16222, nats-route://127.0.0.1:16223] }
$more
EOC
  nats-server -c $dir/n$i.conf -l $dir/n$i.log & echo $! > $dir/n$i.pid; done
  sleep 3
  export TAILSCOPE_CLUSTER_NATS=nats://127.0.0.1:15221,nats://127.0.0.1:15222,nats://127.0.0.1:15223
}
