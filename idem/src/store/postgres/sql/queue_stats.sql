-- queue_stats (async mode, protocol §9.8). One row: pending (bigint, the
-- operations pending or running), oldest_us (µs since the oldest of them
-- was accepted, by the database clock; NULL when there is none).
--
-- Atomicity: ONE read of the statement's snapshot, on the partial due
-- index: the live operations, however many records the table keeps. A
-- gauge for metrics, so a snapshot is all it promises.
SELECT
    count(*) AS pending,
    floor(extract(epoch FROM statement_timestamp() - min(started_at)) * 1000000)::bigint AS oldest_us
FROM {table}
WHERE state IN (3, 4)
