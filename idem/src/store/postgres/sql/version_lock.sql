-- version_lock: inside PostgresStore::transaction_if_newer, lock the
-- entity's row for the rest of the caller's transaction (creating it if
-- new) and read it (protocol §13).
--   $1 key
--
-- Atomicity: ONE statement; ON CONFLICT DO UPDATE takes the row lock of an
-- existing entity (a new one is locked by its own insert) and returns the
-- row as it is under that lock. The lock is held until the transaction
-- ends, so the version check, the caller's writes and the new version
-- commit together, and a second transaction on the entity waits (or times
-- out on lock_timeout) until then.
INSERT INTO {schema}.idem_versions AS v (key, version, updated_at)
VALUES ($1, NULL, statement_timestamp())
ON CONFLICT (key) DO UPDATE SET updated_at = v.updated_at
RETURNING v.version,
          (v.token IS NOT NULL AND v.lease_until > statement_timestamp()) AS held,
          greatest(0, (extract(epoch FROM (v.lease_until - statement_timestamp())) * 1000)::bigint)
              AS remaining_ms
