-- release: delete the caller's in-flight reservation (or the operation it
-- runs) so the next request executes (protocol §3.9), fenced on the token.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
-- ARGV[2]  the change channel, `{prefix}changed`
-- ARGV[3]  the store key, published on the channel
--
-- Returns 1 (held: released), {op} (held: it was async operation `op`,
-- which the caller then takes out of the queue with its id) or 0
-- (lost: not in flight under this token).
--
-- Atomicity: the token check and the DEL run as one script, never
-- interleaved with another command, so a stale holder can never delete
-- the reservation of the holder that took its lease over.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'token', 'op', 'waiters')
if (rec[1] ~= 'in_flight' and rec[1] ~= 'running') or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('DEL', k)
-- As in complete.lua: only if somebody may be waiting.
if rec[4] or rec[1] == 'running' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return rec[3] and {rec[3]} or 1
