#!/bin/bash
# usage: churn2-cg.sh TAG HUB_BIN   -> callgrind profile of the hub under churn -c 16, 20 s
set -e
TAG=$1; BIN=$2
D=/tmp/churn2-cg-$TAG; rm -rf $D; mkdir -p $D/data
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat > $D/hub.toml <<EOT
[server]
listen = "127.0.0.1:$PORT"
[auth]
jwt_secret = "loadtest-jwt-secret-0123456789abcdef"
api_key = "loadtest-api-key"
[store]
data_dir = "$D/data"
[presence]
disconnect_grace = "200ms"
EOT
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file=$D/callgrind.out $BIN serve --config $D/hub.toml > $D/hub.log 2>&1 &
P=$!
until curl -sf 127.0.0.1:$PORT/readyz >/dev/null; do sleep 0.5; done
./target/release/presence-loadtest churn --hub-url http://127.0.0.1:$PORT --pid $P --operators 200 --departments 20 -c 16 --duration 20s --settle 30s --json $D/churn.json > $D/loadtest.log 2>&1 || true
kill -TERM $P; wait $P || true
callgrind_annotate --inclusive=yes $D/callgrind.out > $D/inclusive.txt 2>/dev/null
callgrind_annotate $D/callgrind.out > $D/self.txt 2>/dev/null
echo done
