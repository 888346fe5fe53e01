-- Takes a tag index: returns its live members and deletes it, atomically,
-- so an entry tagged while the tag is being invalidated is either deleted
-- with it or listed in a fresh index.
--
-- KEYS[1]: the tag's sorted set (member = logical entry key, score = the
--          entry's expiry in Unix milliseconds).
-- ARGV[1]: now, Unix milliseconds; members that expired before are skipped.
-- Returns: the array of live members.
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
redis.call('DEL', KEYS[1])
return members
