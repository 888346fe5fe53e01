-- Withdraws one hard-quota operation whose answer was lost, for a request
-- that was refused: undoes its increment if it was applied, and keeps it
-- from applying if it is still on its way (quota.lua treats any marker as
-- "already applied"). Running it again changes nothing.
--
-- KEYS[1]: the operation marker ('1' = applied, 'x' = withdrawn)
-- KEYS[2]: the tenant's usage hash for the period
-- ARGV[1]: marker TTL in seconds
-- ARGV[2]: the operation's metric
-- ARGV[3]: the operation's increment
--
-- Returns 1 when an applied increment was undone, 0 otherwise.
local state = redis.call('GET', KEYS[1])
if state == 'x' then
  return 0
end
redis.call('SET', KEYS[1], 'x', 'EX', ARGV[1])
if state and redis.call('EXISTS', KEYS[2]) == 1 then
  -- The hash keeps its absolute expiry: HINCRBY does not touch it.
  redis.call('HINCRBY', KEYS[2], ARGV[2], -tonumber(ARGV[3]))
  return 1
end
return 0
