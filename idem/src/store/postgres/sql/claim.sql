-- claim (async mode, protocol §9.4–9.5): $1 most operations to claim, $2 lease
-- in µs, $3 one fresh token per operation (bytea[], at least $1 of them).
-- One row per claimed operation: n (its place, earliest due first: it holds
-- token $3[n]), key, op_id, fingerprint, attempts (this attempt's number),
-- request.
--
-- Atomicity: ONE statement (River / Oban / Que). `picked` walks the partial
-- due index (idem_records_due) earliest first over operations whose due_at
-- has come — pending ones past their due time and running ones past their
-- lease's end (a dead dispatcher's: claim_expired is this same statement) —
-- and locks them `FOR UPDATE SKIP LOCKED`: a row another claimer locked is
-- skipped, not waited for, so concurrent claimers take disjoint sets. A row
-- a claimer updated and committed after this statement's snapshot was
-- taken is re-read at its latest version when locked (READ COMMITTED), and
-- dropped if it is no longer due, so it is never claimed twice. The UPDATE
-- changes only rows this statement holds locked: each becomes running under
-- its fresh token, claimable again when the lease ends (due_at), one
-- attempt more. The lock is held to commit, so a concurrent enqueue,
-- extend or complete of the row waits for the claim and sees its result.
WITH picked AS (
    SELECT key, due_at
    FROM {table}
    WHERE state IN (3, 4) AND due_at <= statement_timestamp()
    ORDER BY due_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT key, (row_number() OVER (ORDER BY due_at, key))::integer AS n
    FROM picked
)
UPDATE {table} AS r SET
    state    = 4,
    token    = $3[numbered.n],
    due_at   = statement_timestamp() + $2 * interval '1 microsecond',
    attempts = r.attempts + 1
FROM numbered
WHERE r.key = numbered.key
RETURNING numbered.n, r.key, r.op_id, r.fingerprint, r.attempts, r.request
