-- job_begin: count a new run of the job under a key and mark it running
-- (protocol §13). Sent only by the holder of the key's reservation, by
-- Engine::once / once_job; the HTTP path never runs it.
--
-- KEYS[1]  the job's trace, a hash at `{prefix}{<store key>}:job` (the
--          record's hash tag, so it lives in the record's Cluster slot)
-- ARGV[1]  how long to keep the trace, milliseconds (the retention)
--
-- Fields: `attempts` (decimal), `running` (`1` or `0`), `last_error`
-- (the last ended run's failure text, if any).
--
-- Returns the new attempt number (1 for the first run).
--
-- Atomicity: the increment, the flag and the expiry run as one script, so
-- two runs can never read the same count, and an expired trace (absent to
-- Redis) starts again from 1.
local k = KEYS[1]
local n = redis.call('HINCRBY', k, 'attempts', 1)
redis.call('HSET', k, 'running', '1')
redis.call('PEXPIRE', k, ARGV[1])
return n
