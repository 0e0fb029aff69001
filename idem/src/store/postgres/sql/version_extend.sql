-- version_extend: the holder's heartbeat (protocol §13).
--   $1 key   $2 token   $3 lease in microseconds
-- Returns one row when held, none when lost.
--
-- Atomicity: ONE statement, fenced on the token under the row lock.
UPDATE {schema}.idem_versions
SET lease_until = statement_timestamp() + $3 * interval '1 microsecond'
WHERE key = $1 AND token = $2
RETURNING true AS held
