-- reserve (SPEC §3.6): $1 key, $2 new token, $3 fingerprint, $4 lease in µs.
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
                         ELSE r.waiters OR r.state = 1 END
RETURNING
    r.token = $2 AS acquired,
    r.state,
    r.fingerprint,
    greatest(0, floor(extract(epoch FROM r.expires_at - statement_timestamp()) * 1000000))::bigint AS remaining_us,
    floor(extract(epoch FROM r.completed_at) * 1000000)::bigint AS completed_at_us,
    r.status,
    r.header_names,
    r.header_values,
    r.body
