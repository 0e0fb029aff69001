-- reserve, for several keys at once (group commit, batch.rs): reserve.sql
-- for each element of the arrays $1 keys (distinct), $2 new tokens,
-- $3 fingerprints, $4 leases in µs, in one statement: one round trip and
-- one commit for the lot. $5: how long to wait for a row lock (the
-- statement's own lock_timeout, e.g. '100ms': a key locked by an open
-- transaction must not hold up the batch's other keys), or NULL to wait as
-- any statement of the session does. It is set (`set_config`, local to the
-- statement's transaction) before the first row is written: the join
-- reads `wait` before it yields a row. Rows are taken in the arrays' order (the caller
-- sorts them by key, so two batches lock shared keys in the same order).
-- Returns ONE row per key, the record as it is after the statement: key,
-- token (the caller acquired it when this is its own), then as reserve.sql:
-- state, fingerprint, remaining_us, completed_at_us, status, header_names,
-- header_values, body. Atomicity per key is reserve.sql's (ON CONFLICT
-- takes each existing row's lock and evaluates the CASEs against its
-- latest committed version); all keys commit together. One difference:
-- a reserve sent again with its own token (its first batch was dropped
-- after it committed, batch.rs) does not mark its own row `waiters`.
INSERT INTO {table} AS r (key, state, token, fingerprint, started_at, expires_at)
SELECT i.key, 1, i.token, i.fingerprint, statement_timestamp(),
       statement_timestamp() + i.lease * interval '1 microsecond'
FROM (SELECT set_config('lock_timeout', coalesce($5::text, current_setting('lock_timeout')), true)) AS wait,
     unnest($1::text[], $2::bytea[], $3::bytea[], $4::bigint[]) AS i(key, token, fingerprint, lease)
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
                         ELSE r.waiters OR (r.state = 1 AND r.token <> excluded.token) END,
    op_id         = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.op_id END,
    request       = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.request END,
    attempts      = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.attempts END,
    due_at        = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.due_at END,
    last_error    = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.last_error END
RETURNING
    r.key,
    r.token,
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
