#!/usr/bin/env bash
# Load run for BENCHMARKS.md, all in one run, interleaved rounds:
#   direct      POST straight to the upstream (nginx `return 201`)
#   nginx-get   GET through nginx, a plain reverse proxy
#   nginx       POST through nginx
#   idem-get    GET through `idem serve` (memory store): a pass-through
#   idem-memory POST with a unique Idempotency-Key (reserve, forward, complete)
#   idem-replay POST cycling over 64 keys per wrk thread: replays
#   idem-redis, idem-postgres   as idem-memory, on Redis / PostgreSQL
#   pgbench     the PostgreSQL store's own two statements (reserve.sql then
#               complete.sql, one transaction each, prepared) with pgbench
#               at the gateway pool's concurrency ($PG_CLIENTS, default 10)
# Per target: requests/s, p50, p99, CPU µs per request of the proxy process(es)
# (utime+stime from /proc/PID/stat around the wrk run / requests: for nginx
# its master and workers, for `direct` the upstream nginx's), and for Redis
# the commands Redis ran per request (INFO commandstats delta / requests).
# Then medians per target and ratios to nginx over the rounds.
# Needs: wrk, nginx, pgbench, redis-cli, a release build
# (cargo build --release -p idem-cli), Redis on 6379, PostgreSQL on 5432 (db test).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="${IDEM_BIN:-$root/target/release/idem}"
rounds=${ROUNDS:-3}; dur=${DURATION:-8s}; conns=${CONNECTIONS:-64}; threads=${THREADS:-2}
pg_clients=${PG_CLIENTS:-10}
targets=${TARGETS:-direct nginx-get nginx idem-get idem-memory idem-replay idem-redis idem-postgres pgbench}
tmp=/tmp/idem-bench; mkdir -p "$tmp"
hz=$(getconf CLK_TCK)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  nginx -c "$here/proxy.conf" -s stop 2>/dev/null || true
  nginx -c "$here/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
ticks() { local t=0 p; for p in "$@"; do
  t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
nginx_pids() { local m; m=$(cat "$tmp/$1.pid"); echo "$m $(ps --ppid "$m" -o pid= | tr '\n' ' ')"; }
redis_calls() { redis-cli -h 127.0.0.1 INFO commandstats | tr -d '\r' \
  | awk -F'[:=,]' '/^cmdstat_/ {sub("cmdstat_","",$1); printf "%s=%s ", $1, $3}'; }
redis_delta() { # before after requests -> "evalsha=2.00 publish=... " per request (top-level and in scripts)
  awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN{
    split(a, x, " "); for (i in x) { split(x[i], kv, "="); A[kv[1]] = kv[2] }
    split(b, y, " "); for (i in y) { split(y[i], kv, "="); d = kv[2] - A[kv[1]]
      if (d > 0 && kv[1] != "info") printf "%s=%.2f ", kv[1], d / n } }'; }

# pgbench on the store's own statements (pgbench.sh).
# shellcheck source=benches/load/pgbench.sh
. "$here/pgbench.sh"

for p in 3000 8081 8080 8083 8084; do
  if curl -s -o /dev/null -m 1 "http://127.0.0.1:$p/"; then echo "port $p is in use: stop what listens there" >&2; exit 1; fi
done
nginx -c "$here/upstream.conf"
nginx -c "$here/proxy.conf"
declare -A port=([memory]=8080 [redis]=8083 [postgres]=8084) gw
for s in memory redis postgres; do
  IDEM_LOG=warn "$idem" serve --config "$here/idem-$s.toml" 2>"$tmp/idem-$s.log" &
  gw[$s]=$!; pids+=($!)
done
sleep 2
for s in memory redis postgres; do kill -0 "${gw[$s]}" || { echo "idem $s did not start: $tmp/idem-$s.log" >&2; exit 1; }; done

results="$tmp/results.txt"; : > "$results"
echo "# $(date -u +%FT%TZ) rounds=$rounds duration=$dur wrk -t$threads -c$conns; pgbench -c$pg_clients; $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# round target req/s p50 p99 cpu_us/req [redis commands/req] [errors]"
for r in $(seq 1 "$rounds"); do
  for t in $targets; do
    extra=""
    case $t in
      direct) url=http://127.0.0.1:3000/orders; script=post-unique.lua; cpu=$(nginx_pids upstream);;
      nginx-get) url=http://127.0.0.1:8081/orders; script=; cpu=$(nginx_pids proxy);;
      nginx) url=http://127.0.0.1:8081/orders; script=post-unique.lua; cpu=$(nginx_pids proxy);;
      idem-get) url=http://127.0.0.1:8080/orders; script=; cpu=${gw[memory]};;
      idem-memory) url=http://127.0.0.1:8080/orders; script=post-unique.lua; cpu=${gw[memory]};;
      idem-replay) url=http://127.0.0.1:8080/orders; script=post-replay.lua; cpu=${gw[memory]};;
      idem-redis) url=http://127.0.0.1:8083/orders; script=post-unique.lua; cpu=${gw[redis]};;
      idem-postgres) url=http://127.0.0.1:8084/orders; script=post-unique.lua; cpu=${gw[postgres]};;
      pgbench)
        out=$(pgbench_run)
        tps=$(echo "$out" | awk '/^tps/ {print $3; exit}')
        lat=$(echo "$out" | awk '/latency average/ {print $4 "ms"}')
        fail=$(echo "$out" | awk '/failed transactions/ {print "failed=" $5}')
        echo "$r pgbench ${tps:-0} avg=${lat:-?} - - $fail" | tee -a "$results"
        continue;;
    esac
    [ "$t" = idem-redis ] && rc0=$(redis_calls)
    c0=$(ticks $cpu)
    out=$(timeout 120 wrk -t"$threads" -c"$conns" -d"$dur" --latency ${script:+-s "$here/$script"} "$url" 2>&1)
    c1=$(ticks $cpu)
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    us=$(awk -v c=$((c1-c0)) -v h="$hz" -v n="${n:-0}" 'BEGIN{ if (n > 0) printf "%.1f", c/h*1e6/n; else print "-" }')
    [ "$t" = idem-redis ] && extra="$(redis_delta "$rc0" "$(redis_calls)" "${n:-1}")"
    bad=$(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr -s ' \n' ' ' || true)
    echo "$r $t $rps $p50 $p99 $us $extra$bad" | tee -a "$results"
  done
done

# Medians over the rounds, and each round's ratio to that round's nginx (then their median).
echo "# medians: target req/s p99 cpu_us/req | median of (req/s ÷ nginx POST req/s of the same round)"
awk '
function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v + 0 }
function median(s,   a, n, t, i, j) { n = split(s, a, " "); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
{ r = $1; t = $2; rps[r, t] = $3; if (!(t in seen)) { seen[t] = 1; order[++k] = t }
  R[t] = R[t] " " $3; if ($5 != "-") P[t] = P[t] " " ms($5); if ($6 != "-") C[t] = C[t] " " $6; rounds[r] = 1 }
END { for (r in rounds) for (i = 1; i <= k; i++) { t = order[i]
        if (rps[r, "nginx"] > 0) X[t] = X[t] " " rps[r, t] / rps[r, "nginx"] }
  for (i = 1; i <= k; i++) { t = order[i]; printf "%-14s %9.0f %8s %7s | %5.2f\n", t, median(R[t]), P[t] == "" ? "-" : sprintf("%.1fms", median(P[t])), C[t] == "" ? "-" : median(C[t]), X[t] == "" ? 0 : median(X[t]) } }
' "$results"
# CPU ratios per round (target ÷ nginx of the same round; GETs ÷ nginx-get)
awk '{ c[$1, $2] = $6; if (!($2 in s)) { s[$2] = 1; o[++k] = $2 } ; rs[$1] = 1 }
  END { for (i = 1; i <= k; i++) { t = o[i]; base = (t ~ /get$/) ? "nginx-get" : "nginx"; line = ""
          for (r in rs) if (c[r, t] != "-" && c[r, t] != "" && c[r, base] > 0) line = line sprintf(" %.2f", c[r, t] / c[r, base])
          if (line != "") printf "cpu ratio %-14s per round:%s\n", t, line } }' "$results"
