# Sourced by run.sh and cpu-postgres.sh: `pgbench` running the PostgreSQL
# store's own reserve.sql then complete.sql (comments stripped, {table} and
# $N replaced by pgbench variables, a random key per transaction), each
# statement its own transaction as in the store, prepared.
# Needs: $root (the repository), $tmp, $pg_clients, $dur (as "5s").
pg_script="$tmp/pgbench.sql"
sqlfile() { grep -v '^ *--' "$root/idem/src/store/postgres/sql/$1" | sed 's/{table}/idem.idem_records/g'; }
{
  echo '\set key random(1, 1000000000000000)'
  sqlfile reserve.sql | sed -e 's/\$1/:key/g; s/\$2/:tok/g; s/\$3/:fp/g; s/\$4/:lease/g'; echo ';'
  sqlfile complete.sql | sed -e 's/\$1/:key/g; s/\$2/:tok/g; s/\$3/:status/g; s/\$4/:hn/g; s/\$5/:hv/g; s/\$6/:body/g; s/\$7/:ret/g; s/\$8/:chan/g'; echo ';'
} > "$pg_script"
# pgbench's whole output.
pgbench_run() {
  pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$pg_clients" -j 2 -T "${dur%s}" \
    -D tok='\x000102030405060708090a0b0c0d0e0f' \
    -D fp='\x0001020304050607080900010203040506070809000102030405060708090001' \
    -D lease=30000000 -D status=201 -D hn='{content-type,content-length}' \
    -D hv='{"\\x6170706c69636174696f6e2f6a736f6e","\\x3139"}' -D body='\x7b226f72646572223a2263726561746564227d' \
    -D ret=600000000 -D chan=idem_idem_changed -f "$pg_script" test 2>&1
}
