-- Applies one flush batch's increments to a metric's top-consumers sorted
-- set for one period, once.
--
-- KEYS[1]: the batch marker (same hash tag as KEYS[2])
-- KEYS[2]: the sorted set (member = tenant, score = usage)
-- ARGV[1]: marker TTL in seconds
-- ARGV[2]: absolute expiry of the set (Unix seconds)
-- ARGV[3], ARGV[4], ...: tenant, increment pairs
--
-- Returns 1 when applied, 0 when the batch had been applied before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[2], ARGV[i + 1], ARGV[i])
end
redis.call('EXPIREAT', KEYS[2], ARGV[2])
return 1
