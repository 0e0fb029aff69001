-- job_end (protocol §13): $1 key, $2 the attempt that ended, $3 the
-- failure text (NULL: none), $4 how long to keep the trace, in µs.
-- Rows affected: 1 (held: recorded) or 0 (lost: the trace expired, or a
-- later run has begun and is left alone).
--
-- Atomicity: ONE `UPDATE … WHERE attempts = $2`, fenced on the attempt
-- under the row lock, so a late end of run n never marks run n + 1 ended.
UPDATE {jobs}
SET running = false,
    last_error = $3,
    expires_at = statement_timestamp() + $4 * interval '1 microsecond'
WHERE key = $1
  AND attempts = $2
  AND expires_at > statement_timestamp()
