-- version_get: the entity's highest completed version (protocol §13).
--   $1 key
--
-- Atomicity: one read of one row.
SELECT version FROM {schema}.idem_versions WHERE key = $1
