-- release (protocol §3.9): $1 key, $2 token, $3 notification channel.
-- Returns one row: held (bool).
--
-- Atomicity: ONE guarded DELETE `WHERE key = $1 AND token = $2 AND state IN
-- (1, 4)`: only the current holder of an in-flight reservation, or of a
-- running operation (its id goes with the row), can remove it; a
-- fenced-out holder, or anyone once the record completed, deletes nothing.
-- pg_notify runs in the same statement and is delivered on commit, only
-- when a reserve marked the row `waiters` (see migrate.sql).
WITH gone AS (
    DELETE FROM {table}
    WHERE key = $1 AND token = $2 AND state IN (1, 4)
    RETURNING key, waiters
)
SELECT count(*) > 0 AS held
FROM (SELECT CASE WHEN waiters THEN pg_notify($3, key) END FROM gone) AS notified
