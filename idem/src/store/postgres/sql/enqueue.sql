-- enqueue (async mode, protocol §9.1–9.2, §9.6): $1 key, $2 fingerprint,
-- $3 operation id (16 bytes), $4 request (request.rs), $5 max_pending.
-- Zero or one row, the record as it is after the statement:
--   accepted (bool: the row now carries $3), state, fingerprint, op_id,
--   attempts, remaining_us (time left: on a synchronous lease, on a
--   completed record's retention, or until a pending operation is due),
--   completed_at_us, status, header_names, header_values, body, last_error.
-- No row: max_pending operations are live and the key is free (Full):
-- nothing was written.
--
-- Atomicity: ONE statement. The key is decided exactly as reserve.sql
-- decides it: INSERT, or ON CONFLICT take the existing row's lock and
-- judge its LATEST committed version, never the snapshot's. An expired row
-- (a dead synchronous holder's lease, a record past retention) is taken
-- over and becomes the pending operation, due now, with every other column
-- reset; a live row is written back unchanged and RETURNING reports it
-- (a synchronous record in flight or completed, or the operation already
-- accepted under another id). Concurrent enqueues of one key queue on the
-- row lock, so exactly one of them finds op_id = $3: N identical POSTs make
-- one operation.
--
-- max_pending: the gate lets the row be proposed when the key holds a
-- live record (a repeat is answered even when the queue is full: ON
-- CONFLICT reports it), or else when fewer than $5 operations are live
-- (state 3 or 4), counted on the partial due index up to $5 entries. The
-- CASE runs the count only for a key that is not live, so repeats do not
-- pay for it. Both reads are of the statement's snapshot, so K enqueues of
-- fresh keys running at the same moment can all see $5 - 1 and all
-- insert (K - 1 too many), and a repeat whose live record is purged or
-- released while it runs inserts without counting: the bound can be
-- overshot by at most K, the enqueue statements in flight at once (at most
-- the pool sizes of all instances together). It bounds memory and
-- backlog; it is not an exact quota.
-- Making it exact would take a lock that every enqueue waits on, in a
-- statement of its own (an advisory lock taken inside this one comes after
-- its snapshot, and would serialize nothing). A closed gate proposes no
-- row and the statement returns none: Full, nothing written. (A row that a
-- concurrent enqueue of the same key committed after the snapshot reads as
-- absent to the gate: that repeat may be told Full, 503 and retry, when
-- the queue is full; never a second operation.)
WITH gate AS (
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM {table} WHERE key = $1 AND expires_at > statement_timestamp())
        THEN true
        ELSE (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE state IN (3, 4) LIMIT $5) AS live) < $5
    END AS open
), put AS (
    INSERT INTO {table} AS r (key, state, token, fingerprint, started_at, expires_at,
                              waiters, op_id, request, attempts, due_at)
    SELECT $1, 3, '\x'::bytea, $2, statement_timestamp(), 'infinity'::timestamptz,
           true, $3, $4, 0, statement_timestamp()
    FROM gate
    WHERE gate.open
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
        waiters       = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.waiters ELSE r.waiters END,
        op_id         = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.op_id ELSE r.op_id END,
        request       = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.request ELSE r.request END,
        attempts      = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.attempts ELSE r.attempts END,
        due_at        = CASE WHEN r.expires_at <= statement_timestamp() THEN excluded.due_at ELSE r.due_at END,
        last_error    = CASE WHEN r.expires_at <= statement_timestamp() THEN NULL ELSE r.last_error END
    RETURNING r.*
)
SELECT
    coalesce(op_id = $3, false) AS accepted,
    state,
    fingerprint,
    op_id,
    attempts,
    greatest(0, floor(extract(epoch FROM
        CASE WHEN state IN (3, 4) THEN due_at ELSE expires_at END - statement_timestamp()) * 1000000))::bigint AS remaining_us,
    floor(extract(epoch FROM completed_at) * 1000000)::bigint AS completed_at_us,
    status,
    header_names,
    header_values,
    body,
    last_error
FROM put
