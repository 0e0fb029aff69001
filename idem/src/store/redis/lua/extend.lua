-- extend: the heartbeat (SPEC §3.8): the caller's lease now ends ARGV[2]
-- milliseconds from now, fenced on the token.
--
-- KEYS[1]  the record, a hash at `{prefix}{<store key>}`
-- ARGV[1]  the caller's fencing token (32 hex characters)
-- ARGV[2]  the new lease, in milliseconds (at least 1)
--
-- Returns 1 (held: extended) or 0 (lost: not in flight under this token).
--
-- No notification: waiters wait for an answer, and a longer lease gives
-- them none.
--
-- Atomicity: the token check and the PEXPIRE run as one script, never
-- interleaved with another command, so a stale holder cannot prolong the
-- lease of the holder that took over; and a lease that already ran out is
-- an absent key, which stays absent.
local k = KEYS[1]
local rec = redis.call('HMGET', k, 'state', 'token')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', k, ARGV[2])
return 1
