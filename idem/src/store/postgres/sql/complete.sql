-- complete (protocol §3.9): $1 key, $2 token, $3 status, $4 header names,
-- $5 header values, $6 body, $7 retention in µs, $8 notification channel.
-- Returns one row: held (bool).
--
-- Atomicity: ONE guarded UPDATE `WHERE key = $1 AND token = $2`. The token
-- is the fence: a holder whose lease was taken over no longer matches, and
-- changes nothing. Matching rows are either still in flight, or running
-- operations (they become completed), or already completed with this same
-- token, by this holder's earlier call whose answer was lost: the CASEs then
-- write the first response back unchanged, so a retry is acknowledged
-- without replacing it.
-- The UPDATE waits for the row lock and re-checks the guard on the latest
-- version, so two completes of one holder cannot both apply. pg_notify runs
-- in the same statement, so waiters hear of the change exactly when it
-- commits, never before; and only when a reserve marked the row `waiters`
-- (see migrate.sql: a NOTIFY serializes commits).
--
-- Async mode: a running operation (state 4) completes like an in-flight
-- record, its token being the claim's: it leaves the queue (due_at NULL,
-- its index entry gone), drops its request, and keeps op_id and attempts,
-- so the id resolves to this answer until retention ends. Its `waiters` is
-- always set, so it always NOTIFYs (status long-polls may wait anywhere).
-- A pending operation (state 3) is held by nobody: its token is empty and
-- the guard names the states a holder can complete.
WITH done AS (
    UPDATE {table} AS r SET
        state         = 2,
        status        = CASE WHEN r.state <> 2 THEN $3 ELSE r.status END,
        header_names  = CASE WHEN r.state <> 2 THEN $4 ELSE r.header_names END,
        header_values = CASE WHEN r.state <> 2 THEN $5 ELSE r.header_values END,
        body          = CASE WHEN r.state <> 2 THEN $6 ELSE r.body END,
        completed_at  = CASE WHEN r.state <> 2 THEN statement_timestamp() ELSE r.completed_at END,
        expires_at    = CASE WHEN r.state <> 2
                             THEN statement_timestamp() + $7 * interval '1 microsecond'
                             ELSE r.expires_at END,
        request       = NULL,
        due_at        = NULL
    WHERE r.key = $1 AND r.token = $2 AND r.state IN (1, 2, 4)
    RETURNING r.key, r.waiters
)
SELECT count(*) > 0 AS held
FROM (SELECT CASE WHEN waiters THEN pg_notify($8, key) END FROM done) AS notified
