-- status: $1 schema name. Returns one row: has_schema, has_table,
-- has_waiters (the column added after layout version 1), has_index (the
-- clean-up index), has_jobs (the job traces table, layout version 3),
-- has_versions (the stale-event guard's table): what migrate.sql would
-- create, and what is there.
-- Creates nothing, and reads only the catalogs (no privilege needed on the
-- schema or the table).
--
-- Atomicity: ONE read of the catalogs, on one snapshot: a migration running
-- meanwhile is seen as before it or as after it, never half applied.
SELECT
    n.oid IS NOT NULL AS has_schema,
    c.oid IS NOT NULL AS has_table,
    EXISTS (SELECT 1 FROM pg_attribute AS a
            WHERE a.attrelid = c.oid AND a.attname = 'waiters' AND NOT a.attisdropped) AS has_waiters,
    EXISTS (SELECT 1 FROM pg_class AS i
            WHERE i.relnamespace = n.oid AND i.relname = 'idem_records_expires_at'
              AND i.relkind = 'i') AS has_index,
    EXISTS (SELECT 1 FROM pg_class AS j
            WHERE j.relnamespace = n.oid AND j.relname = 'idem_jobs'
              AND j.relkind IN ('r', 'p')) AS has_jobs,
    EXISTS (SELECT 1 FROM pg_class AS v
            WHERE v.relnamespace = n.oid AND v.relname = 'idem_versions'
              AND v.relkind IN ('r', 'p')) AS has_versions
FROM (VALUES (1)) AS one (x)
LEFT JOIN pg_namespace AS n ON n.nspname = $1
LEFT JOIN pg_class AS c
       ON c.relnamespace = n.oid AND c.relname = 'idem_records' AND c.relkind IN ('r', 'p')
