#!/usr/bin/env bash
# Load run for BENCHMARKS.md: the cost of tracing. Fresh POSTs (a unique
# Idempotency-Key each, a client `traceparent` on each) through `idem serve`
# on the memory store, with OTLP export off and on (to a local sink that
# answers 200 to every POST /v1/traces), interleaved rounds. Besides wrk's
# requests/s and p99, the gateway's CPU time per request, from
# /proc/PID/stat (utime + stime) before and after each wrk run.
# Needs: wrk, nginx, python3, a release build (cargo build --release -p idem-cli).
# BASELINE=/path/to/idem adds a third gateway (e.g. a build without tracing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem=${IDEM:-"$root/target/release/idem"}
rounds=${ROUNDS:-3}; dur=${DURATION:-6s}; conns=${CONNECTIONS:-64}
up=${UPSTREAM_PORT:-3100}; sink=${SINK_PORT:-4399}
dir=/tmp/idem-otel-bench; mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  nginx -c "$dir/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
cat >"$dir/upstream.conf" <<CONF
worker_processes 1;
daemon on;
pid $dir/upstream.pid;
error_log $dir/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$up reuseport backlog=4096;
    location / { default_type application/json; return 201 '{"order":"created"}'; }
  }
}
CONF
nginx -c "$dir/upstream.conf"
python3 - "$sink" >"$dir/sink.log" 2>&1 <<'PY' &
import sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)
cat >"$dir/post-traced.lua" <<'LUA'
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
  thread:set("nonce", tostring(os.time()) .. tostring(math.random(1, 1000000)))
end
wrk.method = "POST"
wrk.body = '{"sku":"tea","qty":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = "k-" .. nonce .. "-" .. tid .. "-" .. counter
  return wrk.format()
end
LUA
declare -A gw
start() { # name port binary [env...]
  local name=$1 port=$2 bin=$3; shift 3
  env IDEM_LOG=warn "$@" "$bin" serve --store memory --listen "127.0.0.1:$port" \
    --upstream "http://127.0.0.1:$up" 2>"$dir/$name.log" &
  pids+=($!); gw[$name]="$! $port"
}
start off 8190 "$idem"
start on 8191 "$idem" OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink" OTEL_SERVICE_NAME=idem-bench
names=(off on)
if [[ -n "${BASELINE:-}" ]]; then start baseline 8192 "$BASELINE"; names=(baseline off on); fi
sleep 2
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "round gateway requests/s p99 cpu_us_per_request"
for r in $(seq 1 "$rounds"); do
  for name in "${names[@]}"; do
    set -- ${gw[$name]}
    before=$(cpu "$1")
    out=$(wrk -t2 -c"$conns" -d"$dur" --latency -s "$dir/post-traced.lua" "http://127.0.0.1:$2/orders" 2>&1)
    after=$(cpu "$1")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    bad=$(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr '\n' ' ' || true)
    us=$(awk -v t="$((after - before))" -v hz="$ticks" -v n="$reqs" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    echo "$r $name $rps $p99 $us $bad"
  done
done
