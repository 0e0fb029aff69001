-- version_begin: the stale-event guard's one decision (protocol §13): is
-- this event newer than the entity's highest completed version, and is
-- the entity free? If both, the caller holds it.
--
-- KEYS[1]  the entity, a hash at `{prefix}v:{<store key>}`
-- ARGV[1]  the event's version, encoded: `n` or `t` then 20 digits
-- ARGV[2]  the caller's new fencing token (32 hex characters)
-- ARGV[3]  the lease, in milliseconds (at least 1)
--
-- Fields: `version` (the highest completed, encoded), `token` and `until`
-- (the holder and the end of its lease, ms since the epoch on Redis's
-- clock). No TTL: a version is kept for as long as Redis keeps its data.
--
-- Returns {'mixed', current}, {'stale', current}, {'busy', ms_left} or
-- {'acquired'}, checked in that order.
--
-- Atomicity: the reads, the comparisons and the write run as one script,
-- never interleaved with another command, so two events can never both
-- see the entity free, and an event can never run after a newer one
-- completed. Versions are compared byte by byte (equal lengths), never
-- with tonumber (a double loses integers past 2^53) nor with `<` on
-- strings (locale collation).
local k = KEYS[1]
local e = redis.call('HMGET', k, 'version', 'token', 'until')
local cur, v = e[1], ARGV[1]
if cur then
  if string.sub(cur, 1, 1) ~= string.sub(v, 1, 1) then
    return {'mixed', cur}
  end
  local newer = false
  for i = 2, #v do
    local a, b = string.byte(v, i), string.byte(cur, i)
    if a ~= b then
      newer = a > b
      break
    end
  end
  if not newer then
    return {'stale', cur}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if e[2] and tonumber(e[3]) > now then
  return {'busy', tostring(tonumber(e[3]) - now)}
end
redis.call('HSET', k, 'token', ARGV[2], 'until', now + tonumber(ARGV[3]))
return {'acquired'}
