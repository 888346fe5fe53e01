-- Checks and consumes hard quotas, atomically, for a batch of requests whose
-- keys share one cluster slot. Each operation is applied at most once.
--
-- KEYS[2i-1]: operation marker (present = already applied)
-- KEYS[2i]:   the tenant's usage hash for the period
-- ARGV[1]: marker TTL in seconds
-- ARGV[2 + 4(i-1)]: metric
-- ARGV[3 + 4(i-1)]: increment
-- ARGV[4 + 4(i-1)]: limit (-1: no limit, used to replay an operation whose
--                   first answer was lost to a timeout)
-- ARGV[5 + 4(i-1)]: absolute expiry of the hash (Unix seconds)
--
-- Returns {allowed1, total1, allowed2, total2, ...}: allowed is 1 when the
-- increment was applied now or before, 0 when it would pass the limit; total
-- is the metric's value after the decision.
local out = {}
local ttl = ARGV[1]
local n = #KEYS / 2
for i = 1, n do
  local marker, hash = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 2 + 4 * (i - 1)
  local metric, inc, limit, expire_at = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3]
  local current = tonumber(redis.call('HGET', hash, metric) or '0')
  if redis.call('EXISTS', marker) == 1 then
    out[#out + 1] = 1
    out[#out + 1] = current
  elseif limit >= 0 and current + inc > limit then
    out[#out + 1] = 0
    out[#out + 1] = current
  else
    redis.call('SET', marker, '1', 'EX', ttl)
    local total = redis.call('HINCRBY', hash, metric, inc)
    redis.call('EXPIREAT', hash, expire_at)
    out[#out + 1] = 1
    out[#out + 1] = total
  end
end
return out
