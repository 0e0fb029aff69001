#!/usr/bin/env bash
# CPU per fresh POST (GET=1: per GET) of `idem serve` on the Redis store, next to nginx as a
# plain proxy, in interleaved rounds of one run; compares builds:
#   IDEM_BINS="/tmp/idem-before /tmp/idem-after" ROUNDS=3 benches/load/redis-cpu.sh
# STORE="memory" (or a postgres:// URL) runs the same comparison on that
# store; the Redis columns then read Redis idle. EXTRA0, EXTRA1, … are
# TOML lines appended to the configuration of gateway 0, 1, … (the same
# binary twice compares settings: EXTRA1=$'[limits]\nlocal_cache_bytes = 0').
# Per round and target: req/s, p99, CPU µs per request of the proxy process
# split into user and system time (utime, stime from /proc/PID/stat around
# the wrk run), the Redis server's own CPU µs per request (its /proc stat:
# Redis shares the cores), and the commands Redis ran per request (INFO
# commandstats deltas). Then per target the medians, and the medians of the
# per-round ratios to nginx (req/s, and CPU per request).
# STRACE=1 adds one more wrk run per build under `strace -c -f` (slow: its
# figures are syscalls per request, not speed). GET=1 sends plain GETs
# (pass-through) instead of fresh POSTs; IDEM_LOG sets the gateways' log
# filter (default warn; `info` is the product's default).
# FLOOR=target/release/examples/floor_proxy adds a target "floor" (:8192):
# a bare hyper proxy on the gateway's runtime shape, nothing else
# (idem-cli/examples/floor_proxy.rs), the least a proxy on this stack costs.
# Own ports (upstream 3190, nginx 8191, gateways from 8193) and files under
# /tmp/idem-redis-cpu, so it runs beside run.sh. Needs: wrk, nginx,
# redis-cli, release builds, Redis on 6379 (strace for STRACE=1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bins=${IDEM_BINS:-$root/target/release/idem}
store=${STORE:-redis://127.0.0.1:6379}
rounds=${ROUNDS:-3}; dur=${DURATION:-5s}; conns=${CONNECTIONS:-64}; threads=${THREADS:-2}
tmp=/tmp/idem-redis-cpu; mkdir -p "$tmp"
hz=$(getconf CLK_TCK)
redis_pid=$(redis-cli -h 127.0.0.1 INFO server | tr -d '\r' | sed -n 's/^process_id://p')
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  nginx -c "$tmp/proxy.conf" -s stop 2>/dev/null || true
  nginx -c "$tmp/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
for p in 3190 8191 8192; do
  if curl -s -o /dev/null -m 1 "http://127.0.0.1:$p/"; then echo "port $p is in use" >&2; exit 1; fi
done
sed -e "s|127.0.0.1:3000|127.0.0.1:3190|; s|/tmp/idem-bench/|$tmp/|g" "$here/upstream.conf" > "$tmp/upstream.conf"
sed -e "s|127.0.0.1:3000|127.0.0.1:3190|; s|127.0.0.1:8081|127.0.0.1:8191|; s|/tmp/idem-bench/|$tmp/|g" \
  "$here/proxy.conf" > "$tmp/proxy.conf"
nginx -c "$tmp/upstream.conf"
nginx -c "$tmp/proxy.conf"

# user and system ticks of processes: "utime stime"
ticks() { local u=0 s=0 p a b; for p in "$@"; do
  read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
  u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }
nginx_pids() { local m; m=$(cat "$tmp/proxy.pid"); echo "$m $(ps --ppid "$m" -o pid= | tr '\n' ' ')"; }
redis_calls() { redis-cli -h 127.0.0.1 INFO commandstats | tr -d '\r' \
  | awk -F'[:=,]' '/^cmdstat_/ {sub("cmdstat_","",$1); printf "%s=%s ", $1, $3}'; }
redis_delta() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN{
    split(a, x, " "); for (i in x) { split(x[i], kv, "="); A[kv[1]] = kv[2] }
    split(b, y, " "); for (i in y) { split(y[i], kv, "="); d = kv[2] - A[kv[1]]
      if (d > 0 && kv[1] != "info") printf "%s=%.2f,", kv[1], d / n } }'; }

declare -a names gw
i=0
for b in $bins; do
  port=$((8193 + i))
  printf 'listen = "127.0.0.1:%s"\nupstream = "http://127.0.0.1:3190"\nstore = "%s"\n[defaults]\nretention = "10m"\n' \
    "$port" "$store" > "$tmp/idem-$i.toml"
  extra="EXTRA$i"; printf '%s\n' "${!extra:-}" >> "$tmp/idem-$i.toml"
  IDEM_LOG=${IDEM_LOG:-warn} "$b" serve --config "$tmp/idem-$i.toml" 2>"$tmp/idem-$i.log" &
  gw[i]=$!; pids+=($!); names[i]="idem$i"
  echo "# idem$i = $b (:$port)"
  i=$((i + 1))
done
floor=
if [ -n "${FLOOR:-}" ]; then
  "$FLOOR" 127.0.0.1:8192 127.0.0.1:3190 2>"$tmp/floor.log" &
  floor=$!; pids+=($!); echo "# floor = $FLOOR (:8192)"
fi
sleep 2
for j in "${!gw[@]}"; do kill -0 "${gw[j]}" || { echo "idem$j did not start: $tmp/idem-$j.log" >&2; exit 1; }; done
if [ -n "$floor" ]; then kill -0 "$floor" || { echo "the floor did not start: $tmp/floor.log" >&2; exit 1; }; fi

run() { # name url cpu-pids... -> one result line
  local name=$1 url=$2; shift 2
  local rc0 c0 r0 out c1 r1 n rps p99 u s ru rs
  rc0=$(redis_calls); c0=$(ticks "$@"); r0=$(ticks "$redis_pid")
  out=$(timeout 120 wrk -t"$threads" -c"$conns" -d"$dur" --latency ${script[@]+"${script[@]}"} "$url" 2>&1)
  c1=$(ticks "$@"); r1=$(ticks "$redis_pid")
  n=$(echo "$out" | awk '/requests in/ {print $1}'); n=${n:-0}
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  read -r u s <<<"$(awk -v a="$c0" -v b="$c1" -v h="$hz" -v n="$n" 'BEGIN{split(a,x," "); split(b,y," ");
    if (n > 0) printf "%.1f %.1f", (y[1]-x[1])/h*1e6/n, (y[2]-x[2])/h*1e6/n; else print "- -"}')"
  read -r ru rs <<<"$(awk -v a="$r0" -v b="$r1" -v h="$hz" -v n="$n" 'BEGIN{split(a,x," "); split(b,y," ");
    if (n > 0) printf "%.1f %.1f", (y[1]-x[1])/h*1e6/n, (y[2]-x[2])/h*1e6/n; else print "- -"}')"
  local bad; bad=$(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr -s ' \n' ' ' || true)
  echo "$r $name $rps $p99 $u $s $ru $rs $(redis_delta "$rc0" "$(redis_calls)" "$((n > 0 ? n : 1))")$bad"
}

if [ -n "${GET:-}" ]; then script=(); else script=(-s "$here/post-unique.lua"); fi
results="$tmp/results.txt"; : > "$results"
echo "# $(date -u +%FT%TZ) rounds=$rounds duration=$dur wrk -t$threads -c$conns; $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# round target req/s p99 user_us/req sys_us/req redis_user_us/req redis_sys_us/req commands/req"
for r in $(seq 1 "$rounds"); do
  # shellcheck disable=SC2046
  run nginx http://127.0.0.1:8191/orders $(nginx_pids) | tee -a "$results"
  if [ -n "$floor" ]; then run floor http://127.0.0.1:8192/orders "$floor" | tee -a "$results"; fi
  for j in "${!gw[@]}"; do
    run "idem$j" "http://127.0.0.1:$((8193 + j))/orders" "${gw[j]}" | tee -a "$results"
  done
done

echo "# medians: target req/s cpu_us/req (user+sys) user sys redis_us/req | median ratio to nginx of the round: req/s, cpu/req"
awk '
function median(s,   a, n, t, i, j) { n = split(s, a, " "); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
{ r = $1; t = $2; if (!(t in seen)) { seen[t] = 1; order[++k] = t }
  rps[r, t] = $3; cpu[r, t] = $5 + $6; rounds[r] = 1
  R[t] = R[t] " " $3; C[t] = C[t] " " ($5 + $6); U[t] = U[t] " " $5; S[t] = S[t] " " $6; D[t] = D[t] " " ($7 + $8) }
END { for (r in rounds) for (i = 1; i <= k; i++) { t = order[i]
        if (rps[r, "nginx"] > 0) X[t] = X[t] " " rps[r, t] / rps[r, "nginx"]
        if (cpu[r, "nginx"] > 0) Y[t] = Y[t] " " cpu[r, t] / cpu[r, "nginx"] }
  for (i = 1; i <= k; i++) { t = order[i]
    printf "%-8s %8.0f %7.1f %7.1f %7.1f %7.1f | %5.2f %5.2f\n", t, median(R[t]), median(C[t]), median(U[t]), median(S[t]), median(D[t]), median(X[t]), median(Y[t]) } }
' "$results"

if [ -n "${GET:-}" ]; then
  echo "# resident memory after the rounds (GETs: nothing stored)"
else
  echo "# resident memory after the rounds (every fresh request stored a record)"
fi
for j in "${!gw[@]}"; do echo "idem$j $(awk '/^VmRSS/ {print $2, $3}' "/proc/${gw[j]}/status")"; done

if [ -n "${STRACE:-}" ]; then
  echo "# syscalls per request (strace -c -f, one ${dur} wrk run each; slowed down by strace)"
  # traced NAME PID PORT: one wrk run against PORT with PID under strace.
  traced() {
    strace -c -f -p "$2" -o "$tmp/strace-$1.txt" & st=$!
    sleep 1
    out=$(timeout 120 wrk -t"$threads" -c"$conns" -d"$dur" ${script[@]+"${script[@]}"} "http://127.0.0.1:$3/orders" 2>&1)
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    echo "$1: $n requests; calls per request:"
    awk -v n="${n:-1}" '$1 ~ /^[0-9.]+$/ && NF >= 5 { c = $4; name = $NF; if (c / n >= 0.01) printf "  %-14s %6.2f\n", name, c / n }' "$tmp/strace-$1.txt"
  }
  if [ -n "$floor" ]; then traced floor "$floor" 8192; fi
  for j in "${!gw[@]}"; do traced "idem$j" "${gw[j]}" $((8193 + j)); done
fi
