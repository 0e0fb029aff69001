-- job_end: mark run ARGV[1] of the job under a key ended, with the
-- failure text ARGV[2] if any (protocol §13), fenced on the attempt.
--
-- KEYS[1]  the job's trace, a hash at `{prefix}{<store key>}:job`
-- ARGV[1]  the attempt that ended (decimal)
-- ARGV[2]  how long to keep the trace, milliseconds (the retention)
-- ARGV[3]  the failure text (bounded by the caller); absent: none
--
-- Returns 1 (held: recorded) or 0 (lost: the trace expired, or a later
-- run has begun and its trace is left alone).
--
-- Atomicity: the attempt check and the writes run as one script, so a
-- late end of run n can never mark run n + 1 as ended.
local k = KEYS[1]
if redis.call('HGET', k, 'attempts') ~= ARGV[1] then
  return 0
end
redis.call('HSET', k, 'running', '0')
if ARGV[3] then
  redis.call('HSET', k, 'last_error', ARGV[3])
else
  redis.call('HDEL', k, 'last_error')
end
redis.call('PEXPIRE', k, ARGV[2])
return 1
