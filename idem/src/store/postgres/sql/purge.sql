-- purge: $1 key, $2 notification channel. Returns one row: purged (bool:
-- a record or a job trace was there).
--
-- Atomicity: ONE statement deletes the key's record, whatever its state
-- (admin action), and its job trace (protocol §13); pg_notify in the same
-- statement wakes waiters on commit.
WITH gone AS (
    DELETE FROM {table} WHERE key = $1 RETURNING key
), traced AS (
    DELETE FROM {jobs} WHERE key = $1 RETURNING key
)
SELECT count(*) > 0 OR EXISTS (SELECT 1 FROM traced) AS purged
FROM (SELECT pg_notify($2, key) FROM gone) AS notified
