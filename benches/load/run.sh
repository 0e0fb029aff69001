#!/usr/bin/env bash
# Load run for BENCHMARKS.md: POST with a unique Idempotency-Key per request,
# direct to the upstream, through nginx (a plain reverse proxy), and through
# `idem serve` on each store; interleaved rounds, all in one run.
# Needs: wrk, nginx, a release build (cargo build --release -p idem-cli),
# Redis on 6379 and PostgreSQL on 5432 for those stores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="$root/target/release/idem"
rounds=${ROUNDS:-3}; dur=${DURATION:-8s}; conns=${CONNECTIONS:-64}
mkdir -p /tmp/idem-bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  nginx -c "$here/proxy.conf" -s stop 2>/dev/null || true
  nginx -c "$here/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
nginx -c "$here/upstream.conf"
nginx -c "$here/proxy.conf"
for s in memory redis postgres; do
  IDEM_LOG=warn "$idem" serve --config "$here/idem-$s.toml" 2>"/tmp/idem-bench/idem-$s.log" &
  pids+=($!)
done
sleep 2
targets=("direct 3000" "nginx 8081" "idem-memory 8080" "idem-redis 8083" "idem-postgres 8084")
echo "round target requests/s p50 p99"
for r in $(seq 1 "$rounds"); do
  for t in "${targets[@]}"; do
    set -- $t
    out=$(wrk -t2 -c"$conns" -d"$dur" --latency -s "$here/post-unique.lua" "http://127.0.0.1:$2/orders" 2>&1)
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    bad=$(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr '\n' ' ' || true)
    echo "$r $1 $rps $p50 $p99 $bad"
  done
done
