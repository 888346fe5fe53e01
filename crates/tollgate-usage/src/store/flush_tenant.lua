-- Applies one flush batch's increments for one tenant and period, once.
--
-- KEYS[1]: the batch marker ({tenant} tag): present = already applied
-- KEYS[2]: the tenant's usage hash for the period ({tenant} tag)
-- ARGV[1]: marker TTL in seconds (longer than any retry)
-- ARGV[2]: absolute expiry of the hash (Unix seconds: period end + retention)
-- ARGV[3], ARGV[4], ...: metric, increment pairs
--
-- Returns {applied, metric1, total1, metric2, total2, ...}: applied is 1 when
-- this call wrote the increments, 0 when the batch had been applied before
-- (a retry after a timeout); the totals are the hash's values either way.
local applied = 0
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  applied = 1
end
local out = {applied}
for i = 3, #ARGV, 2 do
  local total
  if applied == 1 then
    total = redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  else
    total = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  end
  out[#out + 1] = ARGV[i]
  out[#out + 1] = total
end
if applied == 1 then
  -- Absolute: the same value on every write, so never pushed forward.
  redis.call('EXPIREAT', KEYS[2], ARGV[2])
end
return out
