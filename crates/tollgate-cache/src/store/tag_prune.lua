-- Removes invalidated members from a tag's index, once their entries have
-- been deleted. A member whose score changed since it was listed was
-- stored again in between (its new entry is live): it stays listed, so the
-- next invalidation of the tag still finds it.
--
-- KEYS[1]: the tag's sorted set.
-- ARGV:    pairs member, score, as tag_members.lua returned them.
-- Returns: the number of members removed.
local removed = 0
for i = 1, #ARGV - 1, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
