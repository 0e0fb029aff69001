-- version_set: inside PostgresStore::transaction_if_newer, after the
-- caller's writes: the event's version becomes the entity's (protocol §13).
--   $1 key   $2 the event's version, encoded
--
-- Atomicity: the row is locked by version_lock.sql since the start of this
-- transaction, which checked that $2 is newer; this commits with the
-- caller's writes or not at all.
UPDATE {schema}.idem_versions SET version = $2, updated_at = statement_timestamp()
WHERE key = $1
