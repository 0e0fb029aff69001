-- job_cleanup: $1 batch size. Rows affected: how many expired job traces
-- were deleted (run by the clean-up task after `cleanup.sql`).
--
-- Atomicity: as `cleanup.sql`: ONE statement per batch; the inner SELECT
-- locks up to $1 expired rows `FOR UPDATE SKIP LOCKED` (a trace that a
-- job_begin is renewing right now is skipped), and the expiry is checked
-- again in the outer DELETE. Expired traces already read as absent.
DELETE FROM {jobs}
WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM {jobs}
        WHERE expires_at <= statement_timestamp()
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
  AND expires_at <= statement_timestamp()
