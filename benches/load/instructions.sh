#!/usr/bin/env bash
# Instruction counts per request of `idem serve`, repeatable on a busy
# machine (wall-clock figures are not): the gateway runs under
# `valgrind --tool=callgrind`, instrumentation is switched on after a
# warm-up, then exactly N requests go through one kept-alive connection
# (one curl, --next between requests). The runtime gets $WORKERS (default 1)
# worker threads: valgrind runs one thread at a time anyway. Prints Ir per request per case and
# keeps the callgrind files (callgrind_annotate them for the top functions).
#   CASES="get fresh replay" STORE=memory N=500 benches/load/instructions.sh
# (LIMITS='max_header_bytes = "8KiB"' adds a line to the gateway's [limits];
# IDEM_LOG=info measures with the default log filter: the request span and
# the one `info` line per guarded request; the default here is warn;
# FLOOR=target/release/examples/floor_proxy adds the same requests through
# the bare hyper proxy, the least this stack costs.)
# Needs: valgrind, curl, nginx, a release build; Redis / PostgreSQL for those stores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="${IDEM_BIN:-$root/target/release/idem}"
n=${N:-2000}; store=${STORE:-memory}; cases=${CASES:-get fresh replay}
tmp=${OUT:-/tmp/idem-instr}; mkdir -p "$tmp"
case $store in
  memory) url=memory;; redis) url=redis://127.0.0.1:6379;;
  postgres) url=postgres://postgres@127.0.0.1:5432/test;;
esac
started_upstream=; mkdir -p /tmp/idem-bench
if ! curl -s -o /dev/null -m 1 http://127.0.0.1:3000/; then
  nginx -c "$here/upstream.conf"; started_upstream=1
fi
gw=
cleanup() { [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  [ -n "$started_upstream" ] && nginx -c "$here/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
cat > "$tmp/idem.toml" <<TOML
listen = "127.0.0.1:8095"
upstream = "http://127.0.0.1:3000"
store = "$url"
[defaults]
retention = "10m"
[limits]
${LIMITS:-}
TOML
# A curl config of N requests on one kept-alive connection (curl --next).
reqs() { local i key
  for i in $(seq 1 "$2"); do
    case $1 in
      get) echo 'url = "http://127.0.0.1:8095/orders"';;&
      fresh|replay)
        [ "$1" = fresh ] && key="$3-$$-$i" || key="replay-$$-$((i % 16))"
        printf 'url = "http://127.0.0.1:8095/orders"\nheader = "Content-Type: application/json"\nheader = "Idempotency-Key: %s"\ndata = "{\\"sku\\":\\"tea\\",\\"qty\\":1}"\n' "$key";;&
      *) printf 'output = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n';;
    esac
    if [ "$i" -lt "$2" ]; then echo next; fi
  done; }
# measure LABEL CASE COMMAND...: runs COMMAND (listening on :8095) under
# callgrind, warms it up, counts N requests of CASE, prints Ir per request.
measure() { local label=$1 c=$2 out total; shift 2
  out="$tmp/callgrind.$label.$c.out"
  IDEM_LOG=${IDEM_LOG:-warn} TOKIO_WORKER_THREADS=${WORKERS:-1} valgrind --tool=callgrind --fair-sched=yes --instr-atstart=no --callgrind-out-file="$out" \
    "$@" 2>"$tmp/valgrind.$label.$c.log" &
  gw=$!
  for _ in $(seq 1 300); do curl -s -o /dev/null -m 1 http://127.0.0.1:8095/ && break; sleep 0.2; done
  reqs "$c" 100 warm > "$tmp/curl.warm"
  curl -s --config "$tmp/curl.warm" > /dev/null
  callgrind_control -i on "$gw" >/dev/null 2>&1
  reqs "$c" "$n" run > "$tmp/curl.run"
  curl -s --config "$tmp/curl.run" | sort | uniq -c > "$tmp/status.$c.txt"
  callgrind_control -i off "$gw" >/dev/null 2>&1
  kill -TERM "$gw"; wait "$gw" || true; gw=
  total=$(awk '/^totals:/ {print $2; exit}' "$out")
  echo "$label $c Ir/request=$((total / n)) (N=$n, statuses: $(tr -s ' \n' ' ' < "$tmp/status.$c.txt"); $out)"
}
for c in $cases; do
  measure "$store" "$c" "$idem" serve --config "$tmp/idem.toml"
done
# FLOOR=target/release/examples/floor_proxy: the same requests through the
# bare hyper proxy (idem-cli/examples/floor_proxy.rs), which stores nothing
# (a replay is a fresh request to it, so that case is left out).
if [ -n "${FLOOR:-}" ]; then
  for c in $cases; do
    [ "$c" = replay ] || measure floor "$c" "$FLOOR" 127.0.0.1:8095 127.0.0.1:3000
  done
fi
