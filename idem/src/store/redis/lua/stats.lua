-- stats: how many operations the queue holds, and the age of the oldest
-- (protocol §9.8 metrics).
--
-- KEYS[1]  the due set, `{prefix}{<prefix>queue}:due`
-- KEYS[2]  the age set, `{prefix}{<prefix>queue}:age`
--
-- Returns {count, oldest_age_ms}; the age is -1 when there is none.
--
-- Atomicity: read only; both sets are read at one instant, on Redis's
-- clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local oldest = -1
if first[2] then
  oldest = math.max(now - tonumber(first[2]), 0)
end
return {redis.call('ZCARD', KEYS[1]), oldest}
