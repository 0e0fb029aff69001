-- version_begin: the stale-event guard's one decision (protocol §13).
--   $1 key   $2 the event's version, encoded   $3 new token (16 bytes)
--   $4 lease in microseconds
-- The caller holds the entity when the returned token is its own; else
-- the returned version (stale, or of another kind) or lease tells why.
--
-- Atomicity: ONE statement. INSERT … ON CONFLICT takes the row lock of an
-- existing entity and evaluates the CASEs on the row as it is under that
-- lock, so two events can never both take the entity, and an event can
-- never be taken after a newer one committed its version. The update
-- always happens (writing back unchanged values when the event does not
-- win) so RETURNING always answers with the row as it is after the
-- statement: no second read, no read-then-write window.
INSERT INTO {schema}.idem_versions AS v (key, version, token, lease_until, updated_at)
VALUES ($1, NULL, $3, statement_timestamp() + $4 * interval '1 microsecond', statement_timestamp())
ON CONFLICT (key) DO UPDATE SET
    token = CASE WHEN (v.version IS NULL
                       OR (left(v.version, 1) = left($2, 1) AND v.version < $2 COLLATE "C"))
                  AND (v.token IS NULL OR v.lease_until <= statement_timestamp())
                 THEN EXCLUDED.token ELSE v.token END,
    lease_until = CASE WHEN (v.version IS NULL
                             OR (left(v.version, 1) = left($2, 1) AND v.version < $2 COLLATE "C"))
                        AND (v.token IS NULL OR v.lease_until <= statement_timestamp())
                       THEN EXCLUDED.lease_until ELSE v.lease_until END
RETURNING v.version,
          v.token IS NOT DISTINCT FROM $3 AS acquired,
          greatest(0, (extract(epoch FROM (v.lease_until - statement_timestamp())) * 1000)::bigint)
              AS remaining_ms
