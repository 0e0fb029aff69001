-- version_extend: the holder's heartbeat (protocol §13): its lease now
-- ends ARGV[2] milliseconds from now.
--
-- KEYS[1]  the entity, a hash at `{prefix}v:{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
-- ARGV[2]  the new lease, in milliseconds (at least 1)
--
-- Returns 1 (held: extended) or 0 (lost).
--
-- Atomicity: the token check and the write run as one script, so a holder
-- whose lease was taken over can never prolong the new holder's.
local k = KEYS[1]
if redis.call('HGET', k, 'token') ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', k, 'until', now + tonumber(ARGV[2]))
return 1
