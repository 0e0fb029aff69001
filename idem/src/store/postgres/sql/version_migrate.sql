-- version_migrate: the stale-event guard's table (protocol §13), run at the
-- end of migrate.sql, in the same implicit transaction and under the same
-- advisory lock. Re-runnable (IF NOT EXISTS); it adds a table and touches
-- nothing of an existing deployment's.
--
-- One row per scoped entity:
--   key          the StoreKey, hex(scope):entity
--   version      the highest completed version, encoded (`n` or `t` then
--                20 digits: byte order is version order within a kind);
--                NULL before the first event completed
--   token        the fencing token of the event in flight (16 bytes), NULL
--                when none is
--   lease_until  the end of that event's lease (DATABASE clock)
--   updated_at   when the row last changed (for operators)
-- Rows are never expired: forgetting a version would let an old event in.
--
-- Atomicity: see migrate.sql (the advisory lock serializes start-ups).
CREATE TABLE IF NOT EXISTS {schema}.idem_versions (
    key          text COLLATE "C" PRIMARY KEY,
    version      text COLLATE "C",
    token        bytea,
    lease_until  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT statement_timestamp()
);
