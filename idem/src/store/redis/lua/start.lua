-- start: the second step of claim (protocol §9.4), on the record of an entry
-- take.lua took: pending and due, or running with a lease that ran out →
-- running under the caller's new token, one attempt more.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the operation id (32 hex characters) of the entry
-- ARGV[2]  the claimer's new fencing token (32 hex characters)
-- ARGV[3]  the lease, ms
--
-- Returns one of:
--   {'claimed', fp, attempts, method, uri, headers, body}
--   {'later', claimable_at}   the operation is not claimable before then
--                             (a heartbeat or a retry the entry missed)
--   {'done', pttl}            it is done: its id lives for pttl ms more
--   {'gone'}                  the record is not this operation any more
--                             (purged, released, expired, not a record,
--                             or its enqueue found the key taken or
--                             never wrote it)
--
-- Atomicity: the look and the write run as one script on the record, the
-- one authority on the operation's state: whatever its queue entry said,
-- two claimers cannot both find it claimable. A running operation whose
-- lease has not run out on Redis's clock is never taken over. A record
-- running under the caller's own token means this same call applied and
-- its reply was lost: 'claimed' again, with no second attempt counted.
local k = KEYS[1]
if redis.call('TYPE', k)['ok'] ~= 'hash' then
  return {'gone'}
end
local rec = redis.call('HMGET', k, 'state', 'op', 'token', 'fp', 'attempts',
  'due', 'lease_until')
local state, op, token = rec[1], rec[2], rec[3]
if op ~= ARGV[1] then
  return {'gone'}
end
if state == 'completed' then
  return {'done', redis.call('PTTL', k)}
end
if state ~= 'pending' and state ~= 'running' then
  return {'gone'}
end
local attempts = tonumber(rec[5]) or 0
if not (state == 'running' and token == ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local at = tonumber(state == 'pending' and rec[6] or rec[7]) or 0
  if at > now then
    return {'later', at}
  end
  attempts = attempts + 1
  redis.call('HSET', k, 'state', 'running', 'token', ARGV[2],
    'lease_until', now + tonumber(ARGV[3]), 'attempts', attempts)
  redis.call('HDEL', k, 'due', 'retried_by')
end
local r = redis.call('HMGET', k, 'method', 'uri', 'req_headers', 'req_body')
return {'claimed', rec[4], attempts, r[1], r[2], r[3], r[4]}
