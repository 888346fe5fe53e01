-- Merges one request's changes into a live session record, entry by entry,
-- so concurrent requests writing different entries all survive. Never
-- recreates a missing record: a session destroyed or revoked while the
-- request ran stays dead.
-- KEYS[1]: the record, ns:session:{id_hash}
-- ARGV[1]: idle timeout (ms)
-- ARGV[2]: the diff, JSON {clear: bool, set: {key: json text},
--          remove: [key], bind: bool, user: string|null}
-- ARGV[3]: the generation the request loaded
-- Returns {status, generation}: status 0 the record is gone (nothing
-- written), 1 saved, 2 saved over a concurrent save (generation moved).
local raw = redis.call('GET', KEYS[1])
if not raw then
  return {0, 0}
end
local r = cjson.decode(raw)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[1])
if now >= r.expires_at or now - r.last_seen >= idle then
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
local d = cjson.decode(ARGV[2])
if d.clear then
  r.data = {}
end
for _, k in ipairs(d.remove) do
  r.data[k] = nil
end
for k, v in pairs(d.set) do
  r.data[k] = v
end
if d.bind then
  r.user = d.user
end
local status = 1
if r.generation ~= tonumber(ARGV[3]) then
  status = 2
end
r.generation = r.generation + 1
r.last_seen = now
redis.call('SET', KEYS[1], cjson.encode(r), 'PX', math.min(idle, r.expires_at - now))
return {status, r.generation}
