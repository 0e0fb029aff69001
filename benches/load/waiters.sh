#!/usr/bin/env bash
# 500 same-key clients in `wait` mode against a 200 ms upstream, on the
# memory store (STORE=redis etc. for another), ROUNDS rounds.
#
# Client: `idem race` (one connection per request, all opened before the
# start, released by one barrier; latency from send to the last body byte).
# Upstream: the `waiters_upstream` example (hyper; `POST` answers 201 after
# DELAY ms, `GET /count` says how many POSTs it got).
#
# Each round sends the same burst twice, in alternating order:
#   direct   straight to the upstream (no idem: N executions; the floor of
#            what this client and upstream can measure on this machine);
#   gateway  through `idem serve`, `concurrent = "wait"`, one fresh key.
# and prints both, the gateway's CPU time over its burst, its p99 minus
# the upstream delay, and its p99 minus the direct p99 (what the gateway
# adds, measured in the same round). Round 0 warms a fresh gateway up and
# is left out of the medians, which come last. IDEM_BIN is the gateway,
# RACE_BIN the client (default the same binary).
#
#   cargo build --release -p idem-cli --bin idem --example waiters_upstream
#   ROUNDS=5 benches/load/waiters.sh
# Needs jq. (waiters.py is the older all-Python client and upstream.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="${IDEM_BIN:-$root/target/release/idem}"
race_bin="${RACE_BIN:-$idem}"   # the client (another build, to compare clients)
upstream_bin="${UPSTREAM_BIN:-$root/target/release/examples/waiters_upstream}"
clients="${CLIENTS:-500}"
rounds="${ROUNDS:-5}"
delay="${DELAY:-200}"
up_port="${UPSTREAM_PORT:-3300}"
gw_port="${GATEWAY_PORT:-8096}"
for bin in "$idem" "$race_bin" "$upstream_bin"; do
  [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p idem-cli --bin idem --example waiters_upstream" >&2; exit 2; }
done
tmp=/tmp/idem-waiters; mkdir -p "$tmp"
cat > "$tmp/idem.toml" <<TOML
listen = "127.0.0.1:$gw_port"
upstream = "http://127.0.0.1:$up_port"
store = "${STORE:-memory}"
[defaults]
retention = "10m"
concurrent = "wait"
wait_timeout = "10s"
TOML
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"$upstream_bin" "127.0.0.1:$up_port" "$delay" 2>"$tmp/upstream.log" &
up=$!
IDEM_LOG=warn "$idem" serve --config "$tmp/idem.toml" 2>"$tmp/idem.log" &
gw=$!
trap 'kill $gw $up 2>/dev/null || true' EXIT
sleep 1

# race URL -> one JSON report on stdout (exit 1 = duplicates, expected direct).
race() {
  "$race_bin" race "$1" -n "$clients" -d '{"sku":"tea","qty":1}' \
    -H 'content-type: application/json' \
    --count-url "http://127.0.0.1:$up_port/count" --json || [ $? -eq 1 ]
}

# CPU time of the gateway so far, in ns: every thread's time on a CPU
# (/proc/PID/task/*/schedstat, first field).
gw_cpu() { cat /proc/"$gw"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%d", s}'; }
# One gateway burst: its report, plus "cpu_ms" (the gateway's CPU time over it).
gateway_burst() {
  local before after report
  before=$(gw_cpu)
  report=$(race "http://127.0.0.1:$gw_port/orders")
  after=$(gw_cpu)
  jq -c --argjson ns "$((after - before))" '. + {cpu_ms: ($ns / 1e6)}' <<<"$report"
}

echo "# $clients clients at once, one fresh key per gateway burst, upstream delay $delay ms, store ${STORE:-memory}"
echo "# round 0 is a warm-up (a fresh gateway's first burst), not in the medians"
echo "# round | direct: executions errors p50 p99 max | gateway: executions errors replayed p50 p99 max cpu_ms | gw_p99-delay gw_p99-direct_p99 (ms)"
results="$tmp/results"; : > "$results"
for r in $(seq 0 "$rounds"); do
  # Alternate which goes first.
  if [ $((r % 2)) -eq 1 ]; then
    d=$(race "http://127.0.0.1:$up_port/orders"); sleep 1
    g=$(gateway_burst)
  else
    g=$(gateway_burst); sleep 1
    d=$(race "http://127.0.0.1:$up_port/orders")
  fi
  line=$(jq -rn --argjson d "$d" --argjson g "$g" --argjson delay "$delay" --arg r "$r" '
    def f: . * 10 | round / 10;
    [$r,
     $d.executions, $d.errors, ($d.latency_ms.p50|f), ($d.latency_ms.p99|f), ($d.latency_ms.max|f),
     $g.executions, $g.errors, $g.replayed, ($g.latency_ms.p50|f), ($g.latency_ms.p99|f), ($g.latency_ms.max|f),
     ($g.cpu_ms|f), (($g.latency_ms.p99 - $delay)|f), (($g.latency_ms.p99 - $d.latency_ms.p99)|f)]
    | map(tostring) | join(" ")')
  echo "$line"
  [ "$r" -eq 0 ] || echo "$line" >> "$results"
  sleep 1
done
# Medians of the columns that matter.
awk '{dp[NR]=$5; gp[NR]=$11; c[NR]=$13; a[NR]=$14; b[NR]=$15}
  function med(v, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2 }
  END { printf "# medians over %d rounds: direct p99 %.1f, gateway p99 %.1f, gateway CPU/burst %.1f ms, gateway p99 - delay %.1f, gateway p99 - direct p99 %.1f ms\n",
        NR, med(dp, NR), med(gp, NR), med(c, NR), med(a, NR), med(b, NR) }' "$results"
