-- version_abort: the holder's event failed: the entity is free, its
-- version unchanged (protocol §13). An entity with no completed version
-- is deleted (it holds nothing worth keeping).
--
-- KEYS[1]  the entity, a hash at `{prefix}v:{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
--
-- Returns 1 (held: freed) or 0 (lost).
--
-- Atomicity: the token check and the write run as one script, so a holder
-- whose lease was taken over can never free the new holder's entity.
local k = KEYS[1]
local e = redis.call('HMGET', k, 'version', 'token')
if e[2] ~= ARGV[1] then
  return 0
end
if e[1] then
  redis.call('HDEL', k, 'token', 'until')
else
  redis.call('DEL', k)
end
return 1
