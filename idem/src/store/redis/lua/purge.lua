-- purge: delete whatever is under a key (admin), and wake its waiters.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- KEYS[2]  the job's trace, `{prefix}{<store key>}:job` (same slot)
-- ARGV[1]  the change channel, `{prefix}changed`
-- ARGV[2]  the store key, published on the channel
--
-- Returns 0 if nothing was there, 1 if a record (or only a job trace) was, or {op} if it was
-- (pending, running or done) async operation `op`: the caller then takes
-- it out of the queue and forgets its id.
--
-- Atomicity: the read of the operation id and the DEL run as one script,
-- so the id answered is the one of the record deleted; the script only
-- makes the notification conditional on there having been something to
-- delete. Anything is deleted, a value of the wrong type included.
local k = KEYS[1]
local op = false
if redis.call('TYPE', k)['ok'] == 'hash' then
  op = redis.call('HGET', k, 'op')
end
local n = redis.call('DEL', KEYS[1])
local traced = redis.call('DEL', KEYS[2])
if n == 1 then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  if op then
    return {op}
  end
end
if n == 0 and traced == 1 then
  return 1
end
return n
