-- Replaces session records with the application's own merge when nobody
-- saved since the request loaded them (the common case): no JSON work in
-- Redis. Never recreates a missing record: a session destroyed or revoked
-- while the request ran stays dead. Several records (several requests,
-- coalesced) may be written by one call; on a cluster they share a slot.
-- KEYS[i]: a record, ns:session:{id_hash}
-- ARGV[3i-2]: the generation the request loaded
-- ARGV[3i-1]: the new record (JSON written by the application)
-- ARGV[3i]: its time to live (ms): min(idle, absolute expiry - now)
-- Returns one code per key: 1 written, 0 the record is gone (nothing
-- written), 2 another save came first (nothing written: the caller merges
-- instead).
--
-- The top-level "generation" is the first `"generation":<digits>` in the
-- record: entry values are JSON strings (quoted, their quotes escaped), so
-- no entry can produce that sequence, whatever the key order.
local out = {}
for i, key in ipairs(KEYS) do
  local raw = redis.call('GET', key)
  if not raw then
    out[i] = 0
  elseif string.match(raw, '"generation":(%d+)') ~= ARGV[3 * i - 2] then
    out[i] = 2
  else
    redis.call('SET', key, ARGV[3 * i - 1], 'PX', ARGV[3 * i])
    out[i] = 1
  end
end
return out
