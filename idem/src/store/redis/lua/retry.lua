-- retry: another attempt later (protocol §9.5), fenced on the token: the
-- caller's running operation goes back to pending, due ARGV[2] ms from now.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
-- ARGV[2]  the delay, ms
-- ARGV[3]  the last error, kept for inspection
--
-- Returns {op, due} (held: due is ms since the epoch on Redis's clock; the
-- caller moves the queue entry there) or 0 (lost: not running under this
-- token — another claimer took it over, it is gone, or it is the token of
-- a synchronous execution).
--
-- The token is spent: `token` is deleted, so the caller's later extend or
-- complete is lost. It is kept as `retried_by` only so that a repeat of
-- this same call (after a lost reply) answers held again, unchanged.
--
-- Atomicity: the token check and the write run as one script, never
-- interleaved with another command: a dispatcher whose lease was taken
-- over cannot reschedule the new holder's attempt.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'token', 'op', 'retried_by', 'due')
if rec[1] == 'pending' and rec[4] == ARGV[1] then
  return {rec[3], tonumber(rec[5])}
end
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = now + tonumber(ARGV[2])
redis.call('HSET', k, 'state', 'pending', 'due', due, 'last_error', ARGV[3],
  'retried_by', ARGV[1])
redis.call('HDEL', k, 'token', 'lease_until')
return {rec[3], due}
