-- offer: the first step of enqueue (protocol §9.7): put a new operation's
-- entry in the queue, not yet claimable, if `max_pending` allows.
--
-- KEYS[1]  the due set, `{prefix}{<prefix>queue}:due`
-- KEYS[2]  the age set, `{prefix}{<prefix>queue}:age`
-- KEYS[3]  the id's index entry, `{prefix}{<prefix>queue}:op:<id>`
-- ARGV[1]  the queue member, `<id><store key>`
-- ARGV[2]  the store key (the index entry's value)
-- ARGV[3]  max_pending (decimal)
-- ARGV[4]  grace, ms: the entry is claimable only after it, unless the
--          record is written and the entry scheduled first (queue.rs)
--
-- Returns 'offered', or 'full' (nothing was written).
--
-- The count is the members of the due set: pending and running
-- operations, plus offers on their way in or out (an offer whose key was
-- taken leaves at once; one whose caller died, when a claim meets it after
-- the grace). Entries are hints; the record decides (queue.rs).
--
-- Atomicity: the count and the writes run as one script on the queue's one
-- slot, so two offers cannot both take the last place. A repeat of this
-- call (same id, after a lost reply) finds its own member and answers
-- 'offered' again without counting itself.
local due, age, index, member = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
if redis.call('ZSCORE', due, member) then
  return 'offered'
end
if redis.call('ZCARD', due) >= tonumber(ARGV[3]) then
  return 'full'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', due, now + tonumber(ARGV[4]), member)
redis.call('ZADD', age, now, member)
redis.call('SET', index, ARGV[2])
return 'offered'
