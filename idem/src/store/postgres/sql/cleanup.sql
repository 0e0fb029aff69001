-- cleanup: $1 batch size. Rows affected: how many expired rows were deleted.
--
-- Atomicity: ONE statement per batch. The inner SELECT walks the
-- expires_at index, oldest first, and locks up to $1 expired rows
-- `FOR UPDATE SKIP LOCKED`: rows that a reserve is taking over right now
-- (or another instance's clean-up is deleting) are skipped, not waited
-- for. The locks pin the row versions, so their ctids stay valid until the
-- outer DELETE (a TID scan) removes them; the expiry is checked again there.
-- Expired rows are absent to every other statement already, so deleting
-- them changes no answer and notifies nobody.
DELETE FROM {table}
WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM {table}
        WHERE expires_at <= statement_timestamp()
        ORDER BY expires_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
  AND expires_at <= statement_timestamp()
