#!/usr/bin/env bash
# A fresh gateway per build on the memory store, filled by DURATION (default
# 15s) of fresh POSTs (a unique key each, every one stored): resident memory
# per stored record, CPU µs per request and minor page faults per 1 000
# requests of the gateway process (/proc/PID/stat and status around the wrk
# run). Builds alternate, ROUNDS (default 2) times, to compare allocators
# or record layouts while the store grows (redis-cpu.sh reuses one gateway
# across rounds, so its store has long stopped growing):
#   IDEM_BINS="/tmp/idem-a /tmp/idem-b" ROUNDS=2 benches/load/grow.sh
# Own ports (upstream 3290, gateway 8293) and files under /tmp/idem-grow.
# Needs: wrk, nginx, release builds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bins=${IDEM_BINS:-$root/target/release/idem}
rounds=${ROUNDS:-2}; dur=${DURATION:-15s}; conns=${CONNECTIONS:-64}; threads=${THREADS:-2}
tmp=/tmp/idem-grow; mkdir -p "$tmp"
hz=$(getconf CLK_TCK)
for p in 3290 8293; do
  if curl -s -o /dev/null -m 1 "http://127.0.0.1:$p/"; then echo "port $p is in use" >&2; exit 1; fi
done
sed -e "s|127.0.0.1:3000|127.0.0.1:3290|; s|/tmp/idem-bench/|$tmp/|g" "$here/upstream.conf" > "$tmp/upstream.conf"
nginx -c "$tmp/upstream.conf"
gw=
cleanup() { [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  nginx -c "$tmp/upstream.conf" -s stop 2>/dev/null || true; }
trap cleanup EXIT
printf 'listen = "127.0.0.1:8293"\nupstream = "http://127.0.0.1:3290"\nstore = "memory"\n[defaults]\nretention = "10m"\n' \
  > "$tmp/idem.toml"
stat_of() { awk '{print $14 + $15, $10}' "/proc/$1/stat"; }
rss_of() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
echo "# $(date -u +%FT%TZ) rounds=$rounds duration=$dur wrk -t$threads -c$conns; $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# round build records rss_kB_before rss_kB_after bytes_per_record cpu_us_per_req minflt_per_1000"
for r in $(seq 1 "$rounds"); do
  for b in $bins; do
    IDEM_LOG=warn "$b" serve --config "$tmp/idem.toml" 2>"$tmp/idem.log" &
    gw=$!
    for _ in $(seq 1 50); do curl -s -o /dev/null -m 1 http://127.0.0.1:8293/ && break; sleep 0.1; done
    rss0=$(rss_of "$gw"); read -r cpu0 flt0 < <(stat_of "$gw")
    n=$(wrk -t"$threads" -c"$conns" -d"$dur" -s "$here/post-unique.lua" http://127.0.0.1:8293/orders \
      | awk '/requests in/ {print $1}')
    read -r cpu1 flt1 < <(stat_of "$gw")
    sleep 2  # the last records settle
    rss1=$(rss_of "$gw")
    awk -v r="$r" -v b="$b" -v n="$n" -v r0="$rss0" -v r1="$rss1" -v c="$((cpu1 - cpu0))" -v f="$((flt1 - flt0))" -v hz="$hz" \
      'BEGIN { printf "%s %s %d %d %d %.0f %.1f %.1f\n", r, b, n, r0, r1, (r1 - r0) * 1024 / n, c * 1e6 / hz / n, f * 1000 / n }'
    kill "$gw"; wait "$gw" 2>/dev/null || true; gw=
  done
done
