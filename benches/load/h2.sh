#!/usr/bin/env bash
# Load run for BENCHMARKS.md: fresh POSTs (a unique URI each, the key derived
# from it) to `idem serve` on the memory store over HTTP/1.1, h2c, HTTP/1.1
# in TLS and HTTP/2 in TLS (ALPN), interleaved rounds, all in one run and
# with one client (h2load), so only the protocol differs.
# Needs: h2load (nghttp2-client), nginx, openssl (the CLI, for a throwaway
# certificate only), a release build (cargo build --release -p idem-cli).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="$root/target/release/idem"
rounds=${ROUNDS:-3}; n=${REQUESTS:-40000}; conns=${CONNECTIONS:-64}
mkdir -p /tmp/idem-bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  nginx -c "$here/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
  -keyout /tmp/idem-bench/tls-key.pem -out /tmp/idem-bench/tls-cert.pem 2>/dev/null
nginx -c "$here/upstream.conf"
IDEM_LOG=warn "$idem" serve --config "$here/idem-memory-h2.toml" 2>/tmp/idem-bench/idem-h2.log &
pids+=($!)
IDEM_LOG=warn "$idem" serve --config "$here/idem-memory-tls.toml" 2>/tmp/idem-bench/idem-tls.log &
pids+=($!)
sleep 2
# name, base URL, extra h2load flags
targets=("http1 http://127.0.0.1:8085 --h1" "h2c http://127.0.0.1:8085 "
  "tls-http1 https://127.0.0.1:8086 --h1" "tls-h2 https://127.0.0.1:8086 ")
echo "round target requests/s mean-ms max-ms failed"
for r in $(seq 1 "$rounds"); do
  for t in "${targets[@]}"; do
    set -- $t
    uris=/tmp/idem-bench/uris.txt
    nonce="$r-$1-$RANDOM$RANDOM"
    seq 1 "$n" | sed "s|^|$2/orders/$nonce-|" > "$uris"
    out=$(h2load -n "$n" -c "$conns" -m 1 -t 2 ${3:-} -d "$here/order.json" \
      -H 'content-type: application/json' -i "$uris" 2>&1)
    rps=$(echo "$out" | awk '/^finished in/ {print $4}')
    mean=$(echo "$out" | awk '/^time for request:/ {print $6}')
    max=$(echo "$out" | awk '/^time for request:/ {print $5}')
    failed=$(echo "$out" | awk '/^requests:/ {print $8, $10}')
    codes=$(echo "$out" | awk '/^status codes:/ {print $3, $5, $7, $9}')
    echo "$r $1 $rps $mean $max failed/errored=$failed 2xx,3xx,4xx,5xx=$codes"
  done
done
