-- operation: the state of async operation ARGV[1], read from its record
-- (protocol §9.3); the id's index entry named the key.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the operation id (32 hex characters)
--
-- Returns one of:
--   {'none'}                         the record is not this operation
--   {'pending', attempts, due_in_ms, last_error or nil}
--   {'running', attempts, last_error or nil}
--   {'completed', fp, status, headers, body, completed_at, expires_at}
--
-- Atomicity: one script reads one version of the record, and answers
-- only if that version is the operation asked about (an index entry may
-- outlive its operation, or name a key since taken by another).
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'op', 'attempts', 'due', 'fp',
  'last_error')
if rec[2] ~= ARGV[1] then
  return {'none'}
end
local state = rec[1]
if state == 'pending' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return {'pending', tonumber(rec[3]) or 0, math.max((tonumber(rec[4]) or 0) - now, 0),
    rec[6]}
end
if state == 'running' then
  return {'running', tonumber(rec[3]) or 0, rec[6]}
end
if state == 'completed' then
  local c = redis.call('HMGET', k, 'status', 'headers', 'body', 'completed_at',
    'expires_at')
  return {'completed', rec[5], c[1], c[2], c[3], c[4], c[5]}
end
return {'none'}
