-- forget: take an operation out of the queue — it is done, gone, or
-- was never accepted — and end its id with the record's retention (or at
-- once).
--
-- KEYS[1]  the due set, `{prefix}{<prefix>queue}:due`
-- KEYS[2]  the age set, `{prefix}{<prefix>queue}:age`
-- KEYS[3]  the id's index entry, `{prefix}{<prefix>queue}:op:<id>`
-- ARGV[1]  the queue member, `<id><store key>`
-- ARGV[2]  how long the id stays resolvable, ms (its done record's
--          retention); 0 deletes it now
--
-- Returns the number of queue entries removed (0 or 1).
--
-- Atomicity: the three keys share the queue's hash tag and change in one
-- script, so the queue never counts an operation whose index is gone. It
-- is idempotent: a repeat finds nothing more to remove.
local n = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[3], ttl)
else
  redis.call('DEL', KEYS[3])
end
return n
