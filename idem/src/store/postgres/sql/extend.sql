-- extend (heartbeat, protocol §3.8): $1 key, $2 token, $3 lease in µs.
-- Rows affected: 1 = held, 0 = lost.
--
-- Atomicity: ONE guarded UPDATE `WHERE key = $1 AND token = $2 AND state IN
-- (1, 4)` (the apalis pattern): it moves the lease's end only while the
-- caller still holds the reservation or the running operation; the guard is
-- re-checked under the row lock. A running operation's lease end is its
-- due_at (when it becomes claimable again); its expires_at stays 'infinity'.
-- No notification: a longer lease is nothing a waiter waits for, and
-- NOTIFY serializes committing transactions on one queue lock, which the
-- heartbeat path should not pay for.
UPDATE {table} SET
    expires_at = CASE WHEN state = 1
                      THEN statement_timestamp() + $3 * interval '1 microsecond'
                      ELSE expires_at END,
    due_at     = CASE WHEN state = 4
                      THEN statement_timestamp() + $3 * interval '1 microsecond'
                      ELSE due_at END
WHERE key = $1 AND token = $2 AND state IN (1, 4)
