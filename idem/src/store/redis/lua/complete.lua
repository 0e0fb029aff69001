-- complete: replace the caller's in-flight reservation, or the operation
-- it runs, with its answer (protocol §3.9, §9.4), fenced on the token.
--
-- KEYS[1]   the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]   the caller's fencing token (32 hex characters)
-- ARGV[2]   retention, in milliseconds (at least 1)
-- ARGV[3]   fingerprint of the stored answer (64 hex characters)
-- ARGV[4]   HTTP status (decimal)
-- ARGV[5]   headers, in the binary layout of redis.rs (`encode_headers`)
-- ARGV[6]   body, raw bytes
-- ARGV[7]   completed_at, milliseconds since the Unix epoch
-- ARGV[8]   expires_at, milliseconds since the Unix epoch
-- ARGV[9]   the change channel, `{prefix}changed`
-- ARGV[10]  the store key, published on the channel
--
-- Returns 1 (held: stored now, or already stored by this same token — a
-- retry after a lost reply keeps the first answer), {op} (held, and the
-- record was async operation `op`, which stays resolvable by its id: the
-- caller then takes it out of the queue) or 0 (lost: another holder
-- took over, or the record is gone).
--
-- Atomicity: the token check, the rewrite and the new TTL run as one
-- script, which Redis never interleaves with another command, so a holder
-- whose lease was taken over between its check and its write cannot
-- exist: either the record still carries its token and it writes, or it
-- does not and nothing changes. PUBLISH goes out after the write, so a
-- woken waiter reads the completed record.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'token', 'op', 'waiters')
if rec[2] ~= ARGV[1] then
  return 0
end
local op = rec[3]
if rec[1] == 'completed' then
  return op and {op} or 1
end
if rec[1] ~= 'in_flight' and rec[1] ~= 'running' then
  return 0
end

redis.call('DEL', k)
redis.call('HSET', k, 'state', 'completed', 'token', ARGV[1], 'fp', ARGV[3],
  'status', ARGV[4], 'headers', ARGV[5], 'body', ARGV[6],
  'completed_at', ARGV[7], 'expires_at', ARGV[8])
if op then
  redis.call('HSET', k, 'op', op)
end
redis.call('PEXPIRE', k, ARGV[2])
-- Only when a reserve found the record in flight (`waiters`), or for an
-- operation (its status may be long-polled anywhere): a PUBLISH per
-- request would cost every subscribed instance a message.
if rec[4] or rec[1] == 'running' then
  redis.call('PUBLISH', ARGV[9], ARGV[10])
end
return op and {op} or 1
