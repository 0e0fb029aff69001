#!/usr/bin/env bash
# Load run for BENCHMARKS.md: fresh POSTs to `idem serve` (memory store)
# over HTTP/1.1, h2c, HTTP/1.1 in TLS and HTTP/2 in TLS (ALPN), and HTTP/2
# with 16 streams per connection; interleaved rounds, all in one run, one
# client tool (h2load), so only the protocol differs.
#
# h2load sends the same headers on every request and each of its clients
# walks the URI list from the top, so: the key is derived from the request
# (`key = "derived"`: method, path and body), every URI is unique, and each
# connection is its own h2load process with its own URI list (`-c 1`).
# requests/s = all requests / wall time of the round; mean = the mean of
# the processes' mean request times.
#
# Needs: h2load (nghttp2-client), nginx, openssl (the CLI, for a throwaway
# certificate only), a release build (cargo build --release -p idem-cli).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem=${IDEM_BIN:-"$root/target/release/idem"}
rounds=${ROUNDS:-3}; per=${REQUESTS_PER_CONNECTION:-2000}; conns=${CONNECTIONS:-16}
work=/tmp/idem-bench/h2
mkdir -p "$work"
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
# name, base URL, connections, streams per connection, extra h2load flag
targets=("http1 http://127.0.0.1:8085 $conns 1 --h1" "h2c http://127.0.0.1:8085 $conns 1"
  "tls-http1 https://127.0.0.1:8086 $conns 1 --h1" "tls-h2 https://127.0.0.1:8086 $conns 1"
  "tls-h2-x16 https://127.0.0.1:8086 $((conns / 4)) 16")
echo "round target connections streams requests/s mean-ms 2xx non-2xx"
for r in $(seq 1 "$rounds"); do
  for t in "${targets[@]}"; do
    set -- $t
    name=$1 base=$2 c=$3 m=$4 flag=${5:-}
    n=$((per * conns / c))
    for i in $(seq 1 "$c"); do
      seq 1 "$n" | sed "s|^|$base/orders/$r-$name-$i-$RANDOM$RANDOM-|" > "$work/uris-$i"
    done
    start=$(date +%s.%N)
    for i in $(seq 1 "$c"); do
      h2load -n "$n" -c 1 -m "$m" $flag -d "$here/order.json" \
        -H 'content-type: application/json' -i "$work/uris-$i" > "$work/out-$i" 2>&1 &
    done
    wait $(jobs -p | grep -v -F -x -f <(printf '%s\n' "${pids[@]}")) 2>/dev/null || true
    end=$(date +%s.%N)
    cat "$work"/out-* | awk -v total=$((n * c)) -v secs="$(echo "$end - $start" | bc)" \
      -v label="$r $name $c $m" '
      /^time for request:/ { v = $6; if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else { sub(/s$/, "", v); v *= 1000 }; sum += v; k++ }
      /^status codes:/ { ok += $3; bad += $5 + $7 + $9 }
      END { printf "%s %.0f %.2f %d %d\n", label, total / secs, sum / k, ok, bad }'
    rm -f "$work"/out-*
  done
done
