-- Adds a session to its user's index (a sorted set scored by expiry) and
-- trims expired members, so the index never grows without bound.
-- KEYS[1]: the index, ns:session:{user_hash}:user
-- ARGV[1]: the member (the session's id hash)
-- ARGV[2]: its score: an upper bound of the session's expiry (ms)
-- Returns the number of live members.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(last[2])))
return redis.call('ZCARD', KEYS[1])
