-- Lists a tag's live members with their scores, changing nothing: the
-- index stays until its entries are deleted, so an invalidation cut off
-- at any step can be run again and finds the same members.
--
-- KEYS[1]: the tag's sorted set (member = logical entry key, score = the
--          entry's expiry in Unix milliseconds).
-- ARGV[1]: now, Unix milliseconds; members that expired before are skipped.
-- Returns: a flat array member1, score1, member2, score2, ... (scores as
--          Redis prints them, handed back unchanged to tag_prune.lua).
return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES')
