-- enqueue: ONE atomic step of protocol §9.1 on the key's record: write the
-- pending operation, or say what holds the key.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the request's fingerprint (64 hex characters)
-- ARGV[2]  the operation id (32 hex characters), offered to the queue
--          just before (offer.lua)
-- ARGV[3]  the request's method
-- ARGV[4]  its path and query
-- ARGV[5]  its headers, in the binary layout of `encode_headers`
-- ARGV[6]  its body, raw bytes
-- ARGV[7]  '1' to write a fresh operation; '0' to only report (the queue
--          was full: a free key answers 'free' and nothing is written)
--
-- Returns one of:
--   {'accepted', claimable_at}   written now (or by this same call before:
--                                the record is operation ARGV[2]); ms since
--                                the epoch on Redis's clock
--   {'free'}                     (ARGV[7] = '0') nothing holds the key
--   {'existing', op, state, attempts, claimable_at, now}
--                                another operation, same fingerprint
--   {'in_flight', lease_remaining_ms}   a synchronous execution, same
--                                fingerprint
--   {'mismatch'}                 another fingerprint holds the key
--   {'completed', fp, status, headers, body, completed_at, expires_at}
--   {'corrupt', reason}
--
-- A pending operation never expires: no TTL until it completes. Its fields:
-- state 'pending', fp, op, accepted_at, attempts, due, method, uri,
-- req_headers, req_body (and, after a retry, last_error).
--
-- Atomicity: as reserve.lua — the look and the write run as one script, so
-- of two enqueues (or an enqueue and a reserve) of one key only the first
-- finds no record; an expired synchronous lease is an absent key. A record
-- that already is operation ARGV[2] means this same call applied and its
-- reply was lost: 'accepted' again, nothing rewritten. Ids are 128 random
-- bits, so no other caller offers it.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'fp', 'op', 'attempts', 'due',
  'lease_until', 'last_error')
local state, fp, op = rec[1], rec[2], rec[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if not state then
  if redis.call('EXISTS', k) == 1 then
    return {'corrupt', 'the record has no state field'}
  end
  if ARGV[7] ~= '1' then
    return {'free'}
  end
  redis.call('HSET', k, 'state', 'pending', 'fp', ARGV[1], 'op', ARGV[2],
    'accepted_at', now, 'attempts', 0, 'due', now, 'method', ARGV[3],
    'uri', ARGV[4], 'req_headers', ARGV[5], 'req_body', ARGV[6])
  return {'accepted', now}
end

local live = state == 'pending' or state == 'running'
local claimable_at = tonumber(state == 'pending' and rec[5] or rec[6]) or 0
if live and op == ARGV[2] and fp == ARGV[1] then
  return {'accepted', claimable_at}
end
if fp ~= ARGV[1] then
  return {'mismatch'}
end
if live then
  return {'existing', op, state, tonumber(rec[4]) or 0, claimable_at, now, rec[7]}
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
