#!/usr/bin/env bash
# What an IDLE async-mode gateway costs PostgreSQL (BENCHMARKS.md, async
# section): one `idem serve` with one `mode = "async"` route and the default
# 64 dispatcher workers, no traffic at all, on a fresh database of its own.
# Prints the database's transactions per second (xact_commit + xact_rollback
# in pg_stat_database) and the gateway's CPU over WINDOW seconds (default 10),
# after WARMUP seconds (default 12: idle backends flush their statistics at
# least every 10 s).
#   bash benches/load/idle-postgres.sh [path/to/idem]   (default target/release/idem)
# Needs psql and PostgreSQL on 127.0.0.1:5432 (user postgres, trust). The
# upstream is never called. It stops its own gateway (by pid) and drops its
# database on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem=${1:-$root/target/release/idem}
window=${WINDOW:-10}; warmup=${WARMUP:-12}
db=idem_idle_$$_$RANDOM
psql="psql -h 127.0.0.1 -U postgres -d postgres -qAt"
tmp=$(mktemp -d /tmp/idem-idle.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  $psql -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
$psql -c "CREATE DATABASE $db" >/dev/null
cat > "$tmp/idem.toml" <<TOML
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
store = "postgres://postgres@127.0.0.1:5432/$db"

[[route]]
match = "POST /jobs/*"
mode = "async"
TOML
IDEM_LOG=warn "$idem" serve --config "$tmp/idem.toml" 2>"$tmp/serve.log" &
pid=$!
sleep "$warmup"
kill -0 "$pid" 2>/dev/null || { echo "idem serve exited:"; cat "$tmp/serve.log"; exit 1; } >&2
tx() { $psql -c "SELECT pg_stat_clear_snapshot()" \
  -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$db'" | tail -1; }
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
x0=$(tx); c0=$(ticks); sleep "$window"; x1=$(tx); c1=$(ticks)
hz=$(getconf CLK_TCK)
awk -v x=$((x1 - x0)) -v c=$((c1 - c0)) -v w="$window" -v hz="$hz" 'BEGIN {
  printf "idle async gateway: %.1f tx/s in PostgreSQL (%d in %d s), gateway CPU %.1f ms/s\n",
    x / w, x, w, c * 1000 / hz / w }'
