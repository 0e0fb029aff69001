-- complete, for several keys at once (group commit, batch.rs): complete.sql
-- for each element of the arrays $1 keys (distinct), $2 tokens,
-- $3 statuses, $4 first header (1-based index into $8 and $9), $5 header
-- counts, $6 bodies, $7 retentions in µs; $8 all header names and $9 all
-- header values, each row's a slice of them; $10 the notification channel;
-- $11 how long to wait for a row lock, or NULL (see reserve_many.sql).
-- One statement: one round trip and one commit for the lot. The rows are
-- locked in the arrays' order (the caller sorts them by key).
-- Returns one row per key whose guard held (key); a key not returned was
-- not held. Atomicity and fencing per key are complete.sql's: the guarded
-- UPDATE re-checks `key` and `token` on the latest version under the row
-- lock, and pg_notify runs in the same statement for rows a reserve marked
-- `waiters`, so waiters hear of each change exactly when it commits.
WITH i AS (
    SELECT i.*
    FROM (SELECT set_config('lock_timeout', coalesce($11::text, current_setting('lock_timeout')), true)) AS wait,
         unnest($1::text[], $2::bytea[], $3::int[], $4::int[], $5::int[], $6::bytea[], $7::bigint[])
        AS i(key, token, status, first, count, body, retention)
), done AS (
    UPDATE {table} AS r SET
        state         = 2,
        status        = CASE WHEN r.state <> 2 THEN i.status ELSE r.status END,
        header_names  = CASE WHEN r.state <> 2
                             THEN ($8::text[])[i.first : i.first + i.count - 1]
                             ELSE r.header_names END,
        header_values = CASE WHEN r.state <> 2
                             THEN ($9::bytea[])[i.first : i.first + i.count - 1]
                             ELSE r.header_values END,
        body          = CASE WHEN r.state <> 2 THEN i.body ELSE r.body END,
        completed_at  = CASE WHEN r.state <> 2 THEN statement_timestamp() ELSE r.completed_at END,
        expires_at    = CASE WHEN r.state <> 2
                             THEN statement_timestamp() + i.retention * interval '1 microsecond'
                             ELSE r.expires_at END,
        request       = NULL,
        due_at        = NULL
    FROM i
    WHERE r.key = i.key AND r.token = i.token AND r.state IN (1, 2, 4)
    RETURNING r.key, r.waiters
)
SELECT key
FROM (SELECT key, CASE WHEN waiters THEN pg_notify($10, key) END FROM done) AS notified
