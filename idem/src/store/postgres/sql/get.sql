-- get: $1 key. Zero or one row: state, fingerprint, remaining_us,
-- started_at_us, completed_at_us, status, header_names, header_values, body.
--
-- Atomicity: ONE read of ONE row version; an expired row (not yet cleaned
-- up) reads as absent, by the database clock. A pending or running
-- operation (state 3, 4; expires_at 'infinity') reads as in flight, its
-- remaining time being the time until it is next claimable, at least 1 s.
SELECT
    state,
    fingerprint,
    CASE WHEN state IN (3, 4)
         THEN greatest(1000000, floor(extract(epoch FROM due_at - statement_timestamp()) * 1000000))
         ELSE greatest(0, floor(extract(epoch FROM expires_at - statement_timestamp()) * 1000000))
    END::bigint AS remaining_us,
    floor(extract(epoch FROM started_at) * 1000000)::bigint AS started_at_us,
    floor(extract(epoch FROM completed_at) * 1000000)::bigint AS completed_at_us,
    status,
    header_names,
    header_values,
    body
FROM {table}
WHERE key = $1 AND expires_at > statement_timestamp()
