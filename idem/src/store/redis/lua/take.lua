-- take: the first step of claim (protocol §9.4): take up to ARGV[1] due
-- entries of the queue, oldest first, and hide each from other claimers
-- for the lease.
--
-- KEYS[1]  the due set, `{prefix}{<prefix>queue}:due`
-- KEYS[2]  this take's ticket, `{prefix}{<prefix>queue}:take:<ARGV[3]>`
-- ARGV[1]  how many at most
-- ARGV[2]  the lease, ms
-- ARGV[3]  the take's token (32 hex characters), new for each take and
--          sent again if the call is retried
--
-- Returns {member, member, ...}: the entries taken, oldest due first. Each
-- now scores now + lease.
--
-- An entry is a hint that its record may be claimable; the record decides
-- (start.lua), under its own key. What this script guarantees is that two
-- claims never take one entry at once: the second finds it scored in the
-- future. A claimer that dies after this script delays those operations by
-- one lease, as a dispatcher dying mid-call would.
--
-- The members taken are kept on the ticket (a list that lives one lease),
-- so a repeat of this call after a lost reply answers the same entries
-- instead of taking others and leaving these hidden for a lease.
--
-- Atomicity: the look and the re-scoring run as one script, never
-- interleaved with another claim's.
local due, ticket = KEYS[1], KEYS[2]
local again = redis.call('LRANGE', ticket, 0, -1)
if #again > 0 then
  return again
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local taken = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0,
  tonumber(ARGV[1]))
local hidden_until = now + tonumber(ARGV[2])
for _, member in ipairs(taken) do
  redis.call('ZADD', due, hidden_until, member)
  redis.call('RPUSH', ticket, member)
end
if #taken > 0 then
  redis.call('PEXPIRE', ticket, ARGV[2])
end
return taken
