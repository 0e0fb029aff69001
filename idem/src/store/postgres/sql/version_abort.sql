-- version_abort: the holder's event failed: the entity is free, its
-- version unchanged (protocol §13).
--   $1 key   $2 token
-- Returns one row when held, none when lost.
--
-- Atomicity: ONE statement, fenced on the token under the row lock.
UPDATE {schema}.idem_versions SET token = NULL, lease_until = NULL, updated_at = statement_timestamp()
WHERE key = $1 AND token = $2
RETURNING true AS held
