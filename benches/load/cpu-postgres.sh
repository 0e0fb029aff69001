#!/usr/bin/env bash
# CPU per fresh POST of `idem serve` on PostgreSQL, split into user and
# system time, with the gateway's context switches per request
# (BENCHMARKS.md, "PostgreSQL store: CPU per request").
# Variants run interleaved, round by round, so that they share the
# machine's load; pgbench runs the store's two statements at the pool's
# concurrency in each round, as in run.sh.
#   VARIANTS="before=/path/to/idem after=target/release/idem" \
#   ROUNDS=3 DURATION=5s benches/load/cpu-postgres.sh
# A variant is NAME=BINARY or NAME=BINARY@QUERY, QUERY being appended to the
# store URL (e.g. `plain=target/release/idem@sslmode=disable`).
# Per round and variant: requests/s, CPU µs per request (user, system,
# total, from /proc/PID/stat), voluntary context switches per request (all
# threads, /proc/PID/task/*/status: how often a thread went to sleep), then medians
# and each round's ratio to the first variant and to pgbench.
# Needs: wrk, nginx, pgbench, PostgreSQL on 5432 (db test).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
variants=${VARIANTS:-"current=$root/target/release/idem"}
rounds=${ROUNDS:-3}; dur=${DURATION:-5s}; conns=${CONNECTIONS:-64}; threads=${THREADS:-2}
pg_clients=${PG_CLIENTS:-10}; port0=${PORT:-8184}
tmp=$(mktemp -d /tmp/idem-cpu-pg.XXXXXX)
hz=$(getconf CLK_TCK)
pids=(); started_upstream=
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "$started_upstream" ] && nginx -c "$here/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p /tmp/idem-bench
if ! curl -s -o /dev/null -m 1 http://127.0.0.1:3000/; then
  nginx -c "$here/upstream.conf"; started_upstream=1
fi

# pgbench on the store's own statements, as in run.sh (pgbench.sh).
# shellcheck source=benches/load/pgbench.sh
. "$here/pgbench.sh"
pgbench_tps() { pgbench_run | awk '/^tps/ {print $3; exit}'; }

# One gateway per variant, each on its own port.
declare -A gw port
names=(); i=0
for v in $variants; do
  name=${v%%=*}; spec=${v#*=}; bin=${spec%%@*}; query=; [[ $spec == *@* ]] && query=${spec#*@}
  p=$((port0 + i)); i=$((i + 1))
  cat > "$tmp/$name.toml" <<TOML
listen = "127.0.0.1:$p"
upstream = "http://127.0.0.1:3000"
store = "postgres://postgres@127.0.0.1:5432/test${query:+?$query}"
[defaults]
retention = "10m"
TOML
  IDEM_LOG=warn "$bin" serve --config "$tmp/$name.toml" 2>"$tmp/$name.log" &
  gw[$name]=$!; port[$name]=$p; pids+=($!); names+=("$name")
done
sleep 2
for n in "${names[@]}"; do kill -0 "${gw[$n]}" || { echo "$n did not start: $(cat "$tmp/$n.log")" >&2; exit 1; }; done

# utime stime (ticks), voluntary switches of all threads.
probe() { echo "$(awk '{print $14, $15}' "/proc/$1/stat")" \
    "$(cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}')"; }

results="$tmp/results.txt"; : > "$results"
echo "# $(date -u +%FT%TZ) rounds=$rounds duration=$dur wrk -t$threads -c$conns; pgbench -c$pg_clients; $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# round variant req/s user_us sys_us cpu_us vol_switches (per request) [errors]"
for r in $(seq 1 "$rounds"); do
  for n in "${names[@]}" pgbench; do
    if [ "$n" = pgbench ]; then echo "$r pgbench $(pgbench_tps) - - - -" | tee -a "$results"; continue; fi
    read -r u0 s0 v0 <<< "$(probe "${gw[$n]}")"
    out=$(timeout 120 wrk -t"$threads" -c"$conns" -d"$dur" -s "$here/post-unique.lua" "http://127.0.0.1:${port[$n]}/orders" 2>&1)
    read -r u1 s1 v1 <<< "$(probe "${gw[$n]}")"
    req=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    bad=$(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr -s ' \n' ' ' || true)
    awk -v n="$n" -v r="$r" -v rps="$rps" -v q="${req:-0}" -v h="$hz" -v bad="$bad" \
      -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v vs=$((v1 - v0)) 'BEGIN {
      if (q == 0) { print r, n, rps, "- - - -", bad; exit }
      printf "%s %s %s %.1f %.1f %.1f %.2f %s\n", r, n, rps, u/h*1e6/q, s/h*1e6/q, (u+s)/h*1e6/q, vs/q, bad }' \
      | tee -a "$results"
  done
done

echo "# medians: variant req/s user_us sys_us cpu_us vol_switches | median of per-round ratios: cpu ÷ first variant's, req/s ÷ pgbench's"
awk -v first="${names[0]}" '
function median(s,   a, n, t, i, j) { n = split(s, a, " "); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
{ r = $1; v = $2; if (!(v in seen)) { seen[v] = 1; order[++k] = v }; rounds[r] = 1
  rps[r, v] = $3; cpu[r, v] = $6; for (c = 3; c <= 7; c++) if ($c != "-") M[v, c] = M[v, c] " " $c }
END { for (i = 1; i <= k; i++) { v = order[i]; line = sprintf("%-10s", v)
    for (c = 3; c <= 7; c++) line = line sprintf(" %8s", M[v, c] == "" ? "-" : median(M[v, c]))
    cr = ""; pr = ""
    for (r in rounds) { if (cpu[r, first] > 0 && cpu[r, v] != "-") cr = cr " " cpu[r, v] / cpu[r, first]
      if (rps[r, "pgbench"] > 0) pr = pr " " rps[r, v] / rps[r, "pgbench"] }
    print line " | cpu " (cr == "" ? "-" : sprintf("%.2f", median(cr))) ", ÷pgbench " (pr == "" ? "-" : sprintf("%.2f", median(pr))) } }
' "$results"
rm -rf "$tmp"
