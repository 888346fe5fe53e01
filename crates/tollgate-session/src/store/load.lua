-- Loads a live session record, refreshing it when the last refresh is old.
-- KEYS[1]: the record, ns:session:{id_hash}
-- ARGV[1]: idle timeout (ms)
-- ARGV[2]: touch_after (ms): refresh last_seen and the expiry only when
--          the last refresh is at least this old (a read inside the window
--          writes nothing)
-- Returns the record's JSON, or nil when it is missing or expired (an
-- expired record is deleted).
local raw = redis.call('GET', KEYS[1])
if not raw then
  return false
end
local r = cjson.decode(raw)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[1])
if now >= r.expires_at or now - r.last_seen >= idle then
  redis.call('DEL', KEYS[1])
  return false
end
if now - r.last_seen >= tonumber(ARGV[2]) then
  r.last_seen = now
  raw = cjson.encode(r)
  redis.call('SET', KEYS[1], raw, 'PX', math.min(idle, r.expires_at - now))
end
return raw
