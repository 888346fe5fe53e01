-- Trims expired members of a user's index and returns the others.
-- KEYS[1]: the index, ns:session:{user_hash}:user
-- Returns the members (id hashes), oldest expiry first.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
