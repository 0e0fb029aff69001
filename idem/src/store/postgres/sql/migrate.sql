-- migrate: creates (or checks) the schema, the records table and its
-- clean-up index. Sent as ONE simple-query message, which PostgreSQL runs as
-- ONE implicit transaction; {schema} and {table} are replaced
-- by the validated, quoted schema name and "schema".idem_records.
-- Re-runnable: every statement is IF NOT EXISTS.
--
-- Atomicity: `CREATE … IF NOT EXISTS` is not safe against itself (two
-- sessions can both see "absent" and one then fails on a catalog unique
-- index), so the transaction first takes a transaction-scoped advisory lock
-- keyed on the schema name: concurrent start-ups of many instances migrate
-- one after the other, and the later ones find everything in place.
SELECT pg_advisory_xact_lock(1768187245, hashtext('{schema}'));

CREATE SCHEMA IF NOT EXISTS {schema};

-- One row per scoped key (SPEC §2).
--   state        1 = in flight, 2 = completed
--   token        the holder's fencing token, 16 bytes big endian
--   fingerprint  32 bytes (BLAKE3)
--   started_at   when the reservation was taken
--   expires_at   when the row stops counting: the end of the lease while in
--                flight, the end of retention once completed. Every
--                comparison is with the DATABASE clock (statement_timestamp()).
--   completed_at, status, header_names, header_values, body
--                the stored response, NULL while in flight
--   waiters      a reserve found this reservation in flight: somebody may
--                be waiting, so complete/release must NOTIFY. NOTIFY makes
--                a writing transaction take a global lock through its
--                commit, which serializes commits (measured here: 1897 →
--                310 commits/s), so it is sent only when someone can hear it.
CREATE TABLE IF NOT EXISTS {table} (
    key           text COLLATE "C" PRIMARY KEY,
    state         smallint    NOT NULL CHECK (state IN (1, 2)),
    token         bytea       NOT NULL,
    fingerprint   bytea       NOT NULL,
    started_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    completed_at  timestamptz,
    status        integer,
    header_names  text[],
    header_values bytea[],
    body          bytea
) WITH (fillfactor = 90);

-- Added after layout version 1 (re-runnable).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;

-- The batched clean-up walks this index, oldest first.
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON {table} (expires_at);

COMMENT ON TABLE {table} IS 'idem idempotency records, layout version 1';
