-- purge: $1 key, $2 notification channel. Returns one row: purged (bool).
--
-- Atomicity: ONE DELETE of the key, whatever its state (admin action);
-- pg_notify in the same statement wakes waiters on commit.
WITH gone AS (
    DELETE FROM {table} WHERE key = $1 RETURNING key
)
SELECT count(*) > 0 AS purged FROM (SELECT pg_notify($2, key) FROM gone) AS notified
