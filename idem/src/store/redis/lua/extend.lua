-- extend: the heartbeat (protocol §3.8, §9.4): the caller's lease now ends
-- ARGV[2] milliseconds from now, fenced on the token.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
-- ARGV[2]  the new lease, in milliseconds (at least 1)
--
-- Returns 1 (held: extended), {op, lease_until} (held: the caller runs
-- async operation `op`, whose lease now ends at `lease_until`, ms since
-- the epoch on Redis's clock; the caller moves its queue entry there) or
-- 0 (lost: not in flight, nor running, under this token).
--
-- A synchronous lease is the key's TTL; an operation never expires, so
-- its lease is the `lease_until` field, which `claim` compares with
-- Redis's clock.
--
-- No notification: waiters wait for an answer, and a longer lease gives
-- them none.
--
-- Atomicity: the token check and the write run as one script, never
-- interleaved with another command, so a stale holder cannot prolong the
-- lease of the holder that took over; and a lease that already ran out is
-- an absent key (or a running operation under a new token), which stays so.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'token', 'op')
if rec[2] ~= ARGV[1] then
  return 0
end
if rec[1] == 'in_flight' then
  redis.call('PEXPIRE', k, ARGV[2])
  return 1
end
if rec[1] ~= 'running' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now + tonumber(ARGV[2])
redis.call('HSET', k, 'lease_until', lease_until)
return {rec[3], lease_until}
