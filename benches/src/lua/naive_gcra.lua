-- Naive per-request GCRA for the load harness's `naive-evalsha` variant:
-- one script call per request, no coalescing, no local cache. It stands for
-- what a hand-rolled Redis rate limiter does, to compare the tollgate
-- layers against.
--
-- KEYS[1]  the identity's key; holds its theoretical arrival time (TAT) in
--          microseconds since the epoch, Redis clock
-- ARGV[1]  emission interval in microseconds (period / limit)
-- ARGV[2]  burst tolerance in microseconds (emission interval * (burst - 1))
--
-- Returns {allowed, retry_after_us}: {1, 0} when the request conforms
-- (the TAT is advanced), {0, microseconds until it would} otherwise
-- (nothing is written).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])

local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, allow_at - now}
end
local new_tat = tat + interval
-- '%.0f': Lua would print a large number in exponent form and lose digits.
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {1, 0}
