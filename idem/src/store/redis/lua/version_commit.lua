-- version_commit: the holder's event completed: its version becomes the
-- entity's (never lowering it) and the entity is free (protocol §13).
--
-- KEYS[1]  the entity, a hash at `{prefix}v:{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
-- ARGV[2]  the event's version, encoded (see version_begin.lua)
--
-- Returns 1 (held: stored) or 0 (lost: another event holds the entity, or
-- nobody does).
--
-- Atomicity: the token check and the write run as one script, so a holder
-- whose lease was taken over can never store its version over the new
-- holder's.
local k = KEYS[1]
local e = redis.call('HMGET', k, 'version', 'token')
if e[2] ~= ARGV[1] then
  return 0
end
local cur, v = e[1], ARGV[2]
local newer = not cur or string.sub(cur, 1, 1) ~= string.sub(v, 1, 1)
if not newer then
  for i = 2, #v do
    local a, b = string.byte(v, i), string.byte(cur, i)
    if a ~= b then
      newer = a > b
      break
    end
  end
end
if newer then
  redis.call('HSET', k, 'version', v)
end
redis.call('HDEL', k, 'token', 'until')
return 1
