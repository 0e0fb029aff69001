-- POST with a unique Idempotency-Key per request: thread id + counter + run nonce.
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
  wrk.headers["Idempotency-Key"] = "k-" .. nonce .. "-" .. tid .. "-" .. counter
  return wrk.format()
end
