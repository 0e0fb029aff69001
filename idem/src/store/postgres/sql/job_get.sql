-- job_get (protocol §13): $1 key. Zero or one row: attempts, running,
-- last_error.
--
-- Atomicity: ONE read of ONE row version; an expired trace (not yet
-- cleaned up) reads as absent, by the database clock.
SELECT attempts, running, last_error
FROM {jobs}
WHERE key = $1 AND expires_at > statement_timestamp()
