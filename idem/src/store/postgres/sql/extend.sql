-- extend (heartbeat, SPEC §3.8): $1 key, $2 token, $3 lease in µs.
-- Rows affected: 1 = held, 0 = lost.
--
-- Atomicity: ONE guarded UPDATE `WHERE key = $1 AND token = $2 AND state = 1`
-- (the apalis pattern): it moves the lease's end only while the caller
-- still holds the reservation; the guard is re-checked under the row lock.
-- No notification: a longer lease is nothing a waiter waits for, and
-- NOTIFY serializes committing transactions on one queue lock, which the
-- heartbeat path should not pay for.
UPDATE {table}
SET expires_at = statement_timestamp() + $3 * interval '1 microsecond'
WHERE key = $1 AND token = $2 AND state = 1
