-- POST replaying: each thread cycles over 64 keys of this run, so after the
-- first 64 requests of a thread every request is a replay of a stored answer.
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
  thread:set("nonce", tostring(os.time()) .. tostring(math.random(1, 1000000)))
end
wrk.method = "POST"
wrk.body = '{"sku":"tea","qty":1}'
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = "r-" .. nonce .. "-" .. tid .. "-" .. (counter % 64)
  return wrk.format()
end
