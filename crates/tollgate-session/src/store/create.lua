-- Creates a session record unless its key exists (SET NX semantics).
-- KEYS[1]: the record, ns:session:{id_hash}
-- ARGV[1]: idle timeout (ms)
-- ARGV[2]: absolute timeout (ms)
-- ARGV[3]: JSON {data, user, user_agent, ip} of the new record
-- ARGV[4]: created_at to keep (ms, id rotation) or ""
-- ARGV[5]: expires_at to keep (ms, id rotation) or ""
-- Returns 1 created, 0 the key exists (id collision), -1 the kept absolute
-- expiry has already passed (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[1])
local r = cjson.decode(ARGV[3])
r.v = 1
r.generation = 1
r.created_at = tonumber(ARGV[4]) or now
r.expires_at = tonumber(ARGV[5]) or (now + tonumber(ARGV[2]))
r.last_seen = now
local ttl = math.min(idle, r.expires_at - now)
if ttl <= 0 then
  return -1
end
redis.call('SET', KEYS[1], cjson.encode(r), 'PX', ttl)
return 1
