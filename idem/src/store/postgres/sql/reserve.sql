-- reserve (protocol §3.6): $1 key, $2 new token, $3 fingerprint, $4 lease in µs.
-- Returns exactly ONE row, the record as it is after the statement:
--   acquired (bool: the row now carries $2), state, fingerprint,
--   remaining_us (time left before expires_at), completed_at_us,
--   status, header_names, header_values, body.
--
-- Atomicity: ONE statement, and it always writes, so it never has to read
-- the row in a second step. Either the INSERT creates the row (no record),
-- or ON CONFLICT takes the existing row's lock and evaluates every CASE
-- against its LATEST committed version, not the statement's snapshot: a row
-- committed by a concurrent reserve after our snapshot was taken is still
-- seen, locked and reported (a separate `SELECT`, even in a CTE, would miss
-- it and answer "nothing"). If that version has expired (a dead holder's
-- lease, or a completed record past retention) the CASEs take it over with
-- our token; otherwise they write the row back unchanged (a HOT update: no
-- indexed column changes) and RETURNING reports it. Concurrent reserves of
-- one key queue on the row lock and each sees its predecessor's result, so
-- exactly one of them can find `token = $2`. A reserve that finds the row
-- in flight marks `waiters`, under the same row lock, so the holder's
-- complete (which waits for that lock) knows to NOTIFY.
--
-- Async mode: a pending or running operation (state 3, 4) never expires
-- (expires_at is 'infinity'), so it is never taken over and reads as in
-- flight, its remaining time being the time until it is next claimable (at
-- least 1 s: it is never free to take, and waiters must not spin). Taking
-- over an expired row clears every operation column: a done operation's id
-- must not come to name the new record.
INSERT INTO {table} AS r (key, state, token, fingerprint, started_at, expires_at)
VALUES ($1, 1, $2, $3, statement_timestamp(),
        statement_timestamp() + $4 * interval '1 microsecond')
ON CONFLICT (key) DO UPDATE SET
    state         = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.state ELSE r.state END,
    token         = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.token ELSE r.token END,
    fingerprint   = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.fingerprint ELSE r.fingerprint END,
    started_at    = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.started_at ELSE r.started_at END,
    expires_at    = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.expires_at ELSE r.expires_at END,
    completed_at  = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.completed_at END,
    status        = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.status END,
    header_names  = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.header_names END,
    header_values = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.header_values END,
    body          = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.body END,
    waiters       = CASE WHEN r.expires_at <= statement_timestamp() THEN false
                         ELSE r.waiters OR r.state = 1 END,
    op_id         = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.op_id END,
    request       = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.request END,
    attempts      = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.attempts END,
    due_at        = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.due_at END,
    last_error    = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.last_error END
RETURNING
    r.token = $2 AS acquired,
    r.state,
    r.fingerprint,
    CASE WHEN r.state IN (3, 4)
         THEN greatest(1000000, floor(extract(epoch FROM r.due_at - statement_timestamp()) * 1000000))
         ELSE greatest(0, floor(extract(epoch FROM r.expires_at - statement_timestamp()) * 1000000))
    END::bigint AS remaining_us,
    floor(extract(epoch FROM r.completed_at) * 1000000)::bigint AS completed_at_us,
    r.status,
    r.header_names,
    r.header_values,
    r.body
