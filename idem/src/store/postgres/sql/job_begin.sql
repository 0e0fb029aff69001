-- job_begin (protocol §13): $1 key, $2 how long to keep the trace, in µs.
-- Counts a new run of the job under $1 and marks it running. One row:
-- attempts, the new run's number (1 for the first).
--
-- Sent only by the holder of the key's reservation, by Engine::once /
-- once_job; the HTTP path never runs it, and it never touches
-- idem_records.
--
-- Atomicity: ONE `INSERT … ON CONFLICT DO UPDATE`: the row is locked while
-- the count is read and written, so two runs can never get the same
-- number. A trace past its expiry (not yet cleaned up) counts from 1
-- again, by the database clock.
INSERT INTO {jobs} AS j (key, attempts, running, last_error, expires_at)
VALUES ($1, 1, true, NULL, statement_timestamp() + $2 * interval '1 microsecond')
ON CONFLICT (key) DO UPDATE SET
    attempts   = CASE WHEN j.expires_at > statement_timestamp() THEN j.attempts + 1 ELSE 1 END,
    last_error = CASE WHEN j.expires_at > statement_timestamp() THEN j.last_error END,
    running    = true,
    expires_at = EXCLUDED.expires_at
RETURNING attempts
