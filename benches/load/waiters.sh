#!/usr/bin/env bash
# 500 same-key clients in `wait` mode against a 200 ms upstream (waiters.py),
# on the memory store, ROUNDS bursts. Needs python3 and a release build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
idem="${IDEM_BIN:-$root/target/release/idem}"
tmp=/tmp/idem-waiters; mkdir -p "$tmp"
cat > "$tmp/idem.toml" <<TOML
listen = "127.0.0.1:8096"
upstream = "http://127.0.0.1:3300"
store = "${STORE:-memory}"
[defaults]
retention = "10m"
concurrent = "wait"
wait_timeout = "10s"
TOML
ulimit -n 65536 || true
IDEM_LOG=warn "$idem" serve --config "$tmp/idem.toml" 2>"$tmp/idem.log" &
gw=$!
trap 'kill $gw 2>/dev/null || true' EXIT
sleep 1
python3 "$here/waiters.py" --gateway 127.0.0.1:8096 --clients "${CLIENTS:-500}" --rounds "${ROUNDS:-5}"
