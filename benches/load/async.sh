#!/usr/bin/env bash
# Async-mode load run for BENCHMARKS.md: per store, sync mode next to async
# mode, interleaved rounds, all in one run.
#   sync:  wrk POST with a unique Idempotency-Key -> req/s, p99, CPU/request
#   async: the same wrk -> 202s/s, p99 of the 202, CPU/202 (dispatchers on,
#          async_workers default); then wait until the queue is empty:
#          end-to-end completed operations/s = completed / (wrk start .. queue empty)
#   idle:  CPU of the gateway with no traffic (sync vs async: dispatcher polling)
# Needs: wrk, nginx, curl, a release build (cargo build --release -p idem-cli),
# Redis on 6379 (db $REDIS_DB must be empty; it is flushed at the end) and
# PostgreSQL on 5432 (database $PG_DB is dropped and created, then dropped).
# Ports: upstream :3100, nginx proxy :8181, gateway :8190, admin :9190
# (none clash with run.sh). Every phase is bounded in time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="${IDEM_BIN:-$root/target/release/idem}"
rounds=${ROUNDS:-3}; dur=${DURATION:-6s}; conns=${CONNECTIONS:-64}
idle=${IDLE_SECONDS:-3}; max_drain=${MAX_DRAIN_SECONDS:-40}
stores=${STORES:-memory redis postgres}
redis_db=${REDIS_DB:-9}; pg_db=${PG_DB:-idem_async_bench}
pg_admin="psql -h 127.0.0.1 -U postgres -d postgres -qAt"
export IDEM_ADMIN_TOKEN=${IDEM_ADMIN_TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
tmp=/tmp/idem-bench-async; mkdir -p "$tmp"
hz=$(getconf CLK_TCK)
gw=""
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  nginx -c "$here/proxy-async.conf" -s stop 2>/dev/null || true
  nginx -c "$here/upstream-async.conf" -s stop 2>/dev/null || true
  case " $stores " in *" redis "*) redis-cli -h 127.0.0.1 -n "$redis_db" flushdb >/dev/null || true;; esac
  case " $stores " in *" postgres "*) sleep 0.5; $pg_admin -c "DROP DATABASE IF EXISTS $pg_db" || true;; esac
}
# CPU ticks (utime+stime) of a list of pids
ticks() { local t=0 p; for p in "$@"; do
  t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
metric() { { curl -s -m 2 -H "Authorization: Bearer $IDEM_ADMIN_TOKEN" http://127.0.0.1:9190/metrics || true; } \
  | awk -v m="$1" '$1==m && !v {v=$2} END {print v}'; }
now() { date +%s.%N; }
# commits/s in the bench database while the gateway idles (what idle dispatchers cost PostgreSQL)
pg_xact() { [ "$1" = postgres ] && $pg_admin -c "SELECT pg_stat_clear_snapshot()" \
  -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$pg_db'" | tail -1 || echo 0; }
wrk_run() { # port -> "rps p50 p99 errors"
  local out; out=$(timeout 60 wrk -t2 -c"$conns" -d"$dur" --latency -s "$here/post-unique.lua" "http://127.0.0.1:$1/orders" 2>&1)
  echo "$(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '$1=="50%" {print $2}') \
$(echo "$out" | awk '$1=="99%" {print $2}') $(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr -s ' \n' ' ' || true)"
}
total_requests() { echo "$1" | awk '{print $1}'; }
start_gw() { # store mode
  IDEM_LOG=warn "$idem" serve --config "$here/idem-$1-$2.toml" 2>>"$tmp/idem-$1-$2.log" &
  gw=$!
  for _ in $(seq 1 100); do curl -s -m 1 http://127.0.0.1:9190/healthz >/dev/null && return 0; sleep 0.1; done
  echo "gateway $1 $2 did not start, see $tmp/idem-$1-$2.log" >&2; exit 1
}
stop_gw() { kill -TERM "$gw"; for _ in $(seq 1 50); do kill -0 "$gw" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$gw" 2>/dev/null || true; wait "$gw" 2>/dev/null || true; gw=""; }

trap cleanup EXIT
if case " $stores " in *" redis "*) true;; *) false;; esac; then
  n=$(redis-cli -h 127.0.0.1 -n "$redis_db" dbsize)
  [ "$n" = 0 ] || { echo "Redis db $redis_db is not empty ($n keys): set REDIS_DB" >&2; stores=${stores//redis/}; trap - EXIT; exit 1; }
fi
case " $stores " in *" postgres "*) $pg_admin -c "DROP DATABASE IF EXISTS $pg_db" -c "CREATE DATABASE $pg_db";; esac
nginx -c "$here/upstream-async.conf"
nginx -c "$here/proxy-async.conf"
sleep 1
proxy_pids() { local m; m=$(cat "$tmp/proxy.pid"); echo "$m $(ps --ppid "$m" -o pid= | tr '\n' ' ')"; }

echo "# $(date -u +%FT%TZ) rounds=$rounds duration=$dur connections=$conns idle=${idle}s workers=64(default)"
echo "# columns: round target rps p50 p99 cpu_us_per_req idle_cpu_ms_per_s[/pg_tx_per_s] | async: accepted completed_at_wrk_end pending_at_wrk_end drain_s e2e_ops_s cpu_us_per_op_e2e | errors"
for r in $(seq 1 "$rounds"); do
  out=$(wrk_run 3100); echo "$r direct $out"
  pp=$(proxy_pids); c0=$(ticks $pp); out=$(wrk_run 8181); c1=$(ticks $pp)
  set -- $out; echo "$r nginx $1 $2 $3 $(awk -v c=$((c1-c0)) -v h="$hz" -v r="$1" -v d="${dur%s}" 'BEGIN{printf "%.0f", c/h*1e6/(r*d)}') - ${*:4}"
  for s in $stores; do
    for m in sync async; do
      start_gw "$s" "$m"; sleep 1
      x0=$(pg_xact "$s"); i0=$(ticks "$gw"); sleep "$idle"; i1=$(ticks "$gw"); x1=$(pg_xact "$s")
      idle_ms=$(awk -v c=$((i1-i0)) -v h="$hz" -v s="$idle" 'BEGIN{printf "%.1f", c/h*1000/s}')
      [ "$s" = postgres ] && idle_ms="$idle_ms/$(( (x1-x0) / idle ))tx/s"
      t0=$(now); c0=$(ticks "$gw"); out=$(wrk_run 8190); c1=$(ticks "$gw"); t1=$(now)
      set -- $out
      cpu=$(awk -v c=$((c1-c0)) -v h="$hz" -v r="$1" -v d="${dur%s}" 'BEGIN{printf "%.0f", c/h*1e6/(r*d)}')
      if [ "$m" = sync ]; then
        echo "$r $s-sync $1 $2 $3 $cpu $idle_ms | ${*:4}"
      else
        acc=$(metric 'idem_async_accepts_total{result="accepted"}'); done1=$(metric idem_async_completed_total)
        pend1=$(metric idem_async_pending)
        deadline=$(awk -v t="$t1" -v m="$max_drain" 'BEGIN{print t+m}')
        while :; do
          p=$(metric idem_async_pending); f=$(metric idem_async_in_flight)
          [ "${p:-1}" = 0 ] && [ "${f:-1}" = 0 ] && break
          awk -v a="$(now)" -v d="$deadline" 'BEGIN{exit !(a>d)}' && { echo "# drain cap ${max_drain}s hit: pending=$p"; break; }
          sleep 0.05
        done
        t2=$(now); c2=$(ticks "$gw"); done2=$(metric idem_async_completed_total)
        awk -v r="$r" -v s="$s" -v rps="$1" -v p50="$2" -v p99="$3" -v cpu="$cpu" -v idle="$idle_ms" \
            -v acc="$acc" -v d1="$done1" -v p1="$pend1" -v d2="$done2" -v t0="$t0" -v t1="$t1" -v t2="$t2" \
            -v c="$((c2-c0))" -v h="$hz" -v err="${*:4}" \
            'BEGIN{printf "%s %s-async %s %s %s %s %s | %s %s %s %.1f %.0f %.0f | %s\n", r, s, rps, p50, p99, cpu, idle,
                   acc, d1, p1, t2-t1, d2/(t2-t0), c/h*1e6/d2, err}'
      fi
      stop_gw
    done
  done
done
