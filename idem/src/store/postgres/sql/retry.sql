-- retry (async mode, protocol §9.4): $1 key, $2 token, $3 delay in µs,
-- $4 last error. Rows affected: 1 = held, 0 = lost.
--
-- Atomicity: ONE guarded UPDATE `WHERE key = $1 AND token = $2 AND state =
-- 4`, re-checked under the row lock: only the dispatcher holding the
-- running operation can put it back. It becomes pending, due after the
-- delay, with an empty token, so the spent attempt's token fences nothing
-- any more (its complete, extend, release and retry all miss). No
-- notification: a waiter waits for the final answer, not for an attempt.
UPDATE {table} SET
    state      = 3,
    token      = '\x'::bytea,
    due_at     = statement_timestamp() + $3 * interval '1 microsecond',
    last_error = $4
WHERE key = $1 AND token = $2 AND state = 4
