-- get: the record under a key, for waiters and admin inspection.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
--
-- Returns one of:
--   {'none'}
--   {'in_flight', fp, started_at, lease_remaining_ms}
--   {'completed', fp, status, headers, body, completed_at, expires_at}
--   {'corrupt', reason}
--
-- An async operation (state `pending` or `running`, see queue.rs) reads as
-- in flight since it was accepted, for the time until it is next claimable
-- but at least a second (it never expires: it is never free to take).
--
-- Atomicity: the fields and the PTTL are read in one script, so they
-- describe one version of the record (a plain HGETALL then PTTL could
-- pair a completed record with the lease of the reservation before it).
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'fp', 'started_at', 'accepted_at',
  'due', 'lease_until')
local state = rec[1]
if not state then
  if redis.call('EXISTS', k) == 1 then
    return {'corrupt', 'the record has no state field'}
  end
  return {'none'}
end
if state == 'in_flight' then
  return {'in_flight', rec[2], rec[3], redis.call('PTTL', k)}
end
if state == 'pending' or state == 'running' then
  local at = tonumber(state == 'pending' and rec[5] or rec[6]) or 0
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return {'in_flight', rec[2], rec[4], math.max(at - now, 1000)}
end
if state == 'completed' then
  local c = redis.call('HMGET', k, 'status', 'headers', 'body', 'completed_at',
    'expires_at')
  return {'completed', rec[2], c[1], c[2], c[3], c[4], c[5]}
end
return {'corrupt', 'unknown state'}
