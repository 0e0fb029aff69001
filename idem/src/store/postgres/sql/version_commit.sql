-- version_commit: the holder's event completed: its version becomes the
-- entity's (never lowering it) and the entity is free (protocol §13).
--   $1 key   $2 token   $3 the event's version, encoded
-- Returns one row when held, none when lost.
--
-- Atomicity: ONE statement, fenced on the token under the row lock, so a
-- holder whose lease was taken over cannot store its version over the new
-- holder's.
UPDATE {schema}.idem_versions SET
    version = CASE WHEN version IS NULL OR left(version, 1) <> left($3, 1)
                        OR version < $3 COLLATE "C"
                   THEN $3 ELSE version END,
    token = NULL,
    lease_until = NULL,
    updated_at = statement_timestamp()
WHERE key = $1 AND token = $2
RETURNING true AS held
