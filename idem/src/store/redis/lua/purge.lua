-- purge: delete whatever is under a key (admin), and wake its waiters.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the change channel, `{prefix}changed`
-- ARGV[2]  the store key, published on the channel
--
-- Returns 1 if a record was there, else 0.
--
-- Atomicity: DEL is atomic by itself; the script only makes the
-- notification conditional on there having been something to delete.
local n = redis.call('DEL', KEYS[1])
if n == 1 then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return n
