-- operation (async mode, protocol §9.3): $1 operation id (16 bytes).
-- Zero or one row: key, state, fingerprint, attempts, remaining_us (until
-- a pending operation is due; a done one's retention left),
-- completed_at_us, status, header_names, header_values, body, last_error.
--
-- Atomicity: ONE read of ONE row version, found through the unique partial
-- index on op_id. A done operation past its retention (not yet cleaned up)
-- reads as absent, as in get.sql; a pending or running one never expires.
SELECT
    key,
    state,
    fingerprint,
    attempts,
    greatest(0, floor(extract(epoch FROM
        CASE WHEN state IN (3, 4) THEN due_at ELSE expires_at END - statement_timestamp()) * 1000000))::bigint AS remaining_us,
    floor(extract(epoch FROM completed_at) * 1000000)::bigint AS completed_at_us,
    status,
    header_names,
    header_values,
    body,
    last_error
FROM {table}
WHERE op_id = $1 AND expires_at > statement_timestamp()
