-- migrate: creates (or checks, or upgrades in place) the schema, the records
-- table, its clean-up index and async mode's queue columns and indexes. Sent as ONE simple-query message, which PostgreSQL runs as
-- ONE implicit transaction; {schema} and {table} are replaced
-- by the validated, quoted schema name and "schema".idem_records.
-- Re-runnable: every statement is IF NOT EXISTS (or checks first), and a
-- table of an earlier layout is upgraded in place: CREATE TABLE below is
-- layout version 1, and each later change is a step after it, so new and
-- old tables go through the same statements.
--
-- Atomicity: `CREATE … IF NOT EXISTS` is not safe against itself (two
-- sessions can both see "absent" and one then fails on a catalog unique
-- index), so the transaction first takes a transaction-scoped advisory lock
-- keyed on the schema name: concurrent start-ups of many instances migrate
-- one after the other, and the later ones find everything in place.
SELECT pg_advisory_xact_lock(1768187245, hashtext('{schema}'));

CREATE SCHEMA IF NOT EXISTS {schema};

-- One row per scoped key (protocol §2).
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

-- Layout version 2: async mode's queue (protocol §9.7). An operation IS the
-- record of its key, in two more states:
--   state        3 = pending operation, 4 = running operation (a
--                dispatcher holds it under `token`). A pending one's token
--                is empty ('\x'): no 16-byte token matches it.
--   expires_at   'infinity' while pending or running: an operation never
--                expires (it leaves by complete, release or purge), so
--                reserve, get and the clean-up, which compare expires_at,
--                treat it as live with no special case. Done, it is the
--                retention's end, as for any completed record.
--   started_at   when the operation was accepted.
--   waiters      true for an operation: a status long-poll may wait on any
--                instance, so its complete always NOTIFYs.
--   op_id        the operation's id (16 bytes); kept once done, so the id
--                resolves until retention ends; NULL for synchronous records
--   request      what to send upstream, in the store's binary format
--                (request.rs); NULL once done
--   attempts     upstream calls made so far, the running one included
--   due_at       when the operation is next claimable: its due time while
--                pending, the end of its dispatcher's lease while running;
--                NULL once done. ONE column for both makes a claim one
--                range scan of one index, in due order.
--   last_error   why the last attempt failed (for operators)
-- Nullable, no default: adding them to a large table is a catalog change.
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS op_id      bytea,
    ADD COLUMN IF NOT EXISTS request    bytea,
    ADD COLUMN IF NOT EXISTS attempts   integer,
    ADD COLUMN IF NOT EXISTS due_at     timestamptz,
    ADD COLUMN IF NOT EXISTS last_error text;

-- States 3 and 4 need a wider check than layout 1's `state IN (1, 2)`.
-- Replaced once (the new one has a name of its own, so later runs skip
-- this); NOT VALID because the old check already held every row to a
-- subset, so a scan of a large table under this lock would prove nothing.
-- New rows are checked either way.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = '{table}'::regclass AND conname = 'idem_records_state') THEN
        ALTER TABLE {table} DROP CONSTRAINT IF EXISTS idem_records_state_check;
        ALTER TABLE {table} ADD CONSTRAINT idem_records_state
            CHECK (state BETWEEN 1 AND 4) NOT VALID;
    END IF;
END
$$;

-- The queue: claims walk this index, earliest due first. Partial, so it
-- holds only the live operations (at most about max_pending entries),
-- however many records the table keeps.
CREATE INDEX IF NOT EXISTS idem_records_due ON {table} (due_at) WHERE state IN (3, 4);

-- Operation ids → their record (status requests). Unique: ids are 128
-- random bits, and one id must never name two records.
CREATE UNIQUE INDEX IF NOT EXISTS idem_records_op_id ON {table} (op_id) WHERE op_id IS NOT NULL;

-- The batched clean-up walks this index, oldest first.
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON {table} (expires_at);

COMMENT ON TABLE {table} IS 'idem idempotency records, layout version 2';

-- Layout version 3: job traces (protocol §13), a table of their own so the
-- records table, and with it reserve and complete, is unchanged; a table
-- from an earlier version gains it here. One row per job key that
-- Engine::once / once_job has run:
--   attempts     runs of the job's closure so far, the running one included
--   running      a run has begun and not ended
--   last_error   the last ended run's failure text, if any (bounded, for
--                operators)
--   expires_at   the retention's end, renewed by every step; every
--                comparison is with the DATABASE clock
CREATE TABLE IF NOT EXISTS {jobs} (
    key         text COLLATE "C" PRIMARY KEY,
    attempts    integer     NOT NULL,
    running     boolean     NOT NULL,
    last_error  text,
    expires_at  timestamptz NOT NULL
);
