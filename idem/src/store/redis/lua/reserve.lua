-- reserve: ONE atomic step of SPEC §3.6 — take the key, or say what holds it.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the request's fingerprint (64 hex characters)
-- ARGV[2]  a fresh fencing token (32 hex characters)
-- ARGV[3]  the lease, in milliseconds (at least 1)
-- ARGV[4]  started_at, milliseconds since the Unix epoch
--
-- Returns one of:
--   {'acquired'}                            the caller holds the key
--   {'in_flight', lease_remaining_ms}       same fingerprint, lease alive
--   {'mismatch'}                            another fingerprint holds the key
--   {'completed', fp, status, headers, body, completed_at, expires_at}
--   {'corrupt', reason}
--
-- Atomicity: Redis runs a script to its end before it serves any other
-- command, so nothing can write between the HMGET and the HSET: two
-- reserves of one key are ordered, and only the first finds no record. A
-- lease that ran out is an expired key, which Redis treats as absent on
-- access, so "no record" and "lease ran out" are one case and both take
-- the key. One key per record: in a Cluster the script runs on the one
-- node that owns its slot.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'fp')
local state, fp = rec[1], rec[2]

if not state then
  if redis.call('EXISTS', k) == 1 then
    return {'corrupt', 'the record has no state field'}
  end
  redis.call('HSET', k, 'state', 'in_flight', 'token', ARGV[2], 'fp', ARGV[1],
    'started_at', ARGV[4])
  redis.call('PEXPIRE', k, ARGV[3])
  return {'acquired'}
end

if fp ~= ARGV[1] then
  return {'mismatch'}
end
if state == 'in_flight' then
  return {'in_flight', redis.call('PTTL', k)}
end
if state == 'completed' then
  local c = redis.call('HMGET', k, 'status', 'headers', 'body', 'completed_at',
    'expires_at')
  return {'completed', fp, c[1], c[2], c[3], c[4], c[5]}
end
return {'corrupt', 'unknown state'}
