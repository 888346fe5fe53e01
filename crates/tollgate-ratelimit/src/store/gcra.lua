-- tollgate rate limiting: decides a batch of requests, each against all of
-- its policies, ALL-OR-NOTHING per request, in one script call.
--
-- KEYS:    one key per (request, policy), flattened in request order. The
--          keys of one request share one hash tag (the caller's identity);
--          a batch only holds keys of one cluster slot.
-- ARGV[1]: now in microseconds, or 0 to use the server's clock
--          (`TIME`); only tests pass a synthetic clock.
-- ARGV[2]: D, the number of requests in the batch.
-- then per request: P (its number of policies), then 5 values per policy:
--          algorithm (1 GCRA, 2 sliding window, 3 fixed window),
--          a, b  (GCRA: T = emission interval µs, tau = (burst-1)*T µs;
--                 windows: limit, period µs),
--          cost  (0 = peek), shadow (1 = never deny, only report).
-- Returns: a flat array, 4 integers per (request, policy), in KEYS order:
--          status (0 denied, 1 allowed, 2 would deny but shadow,
--          3 cost exceeds capacity), remaining, reset µs, retry-after µs.
--
-- A request is written only if no enforced policy denies it: nothing is
-- consumed otherwise. Every key written is given an expiry (SET ... PX) at
-- the moment its state can no longer change a decision. The maths mirrors
-- `quota.rs` (GCRA as in the `governor` crate) line by line; every value
-- stays below 2^53 so Lua's doubles are exact.

local now = tonumber(ARGV[1])
local slack = 0
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  -- A synthetic clock may stand still while real time passes.
  slack = 600000
end

local function fmt(x)
  return string.format('%.0f', x)
end

local function gcra(v, t, tau, cost)
  local tat = tonumber(v) or now
  local cap = tau + t
  local reset = math.max(tat - now, 0)
  if cost == 0 then
    return 1, math.floor(math.min(math.max(now + tau + t - tat, 0), cap) / t), reset, 0
  end
  local extra = t * (cost - 1)
  if extra > tau then
    return 3, 0, reset, 0
  end
  local earliest = math.max(tat + extra - tau, 0)
  if now < earliest then
    return 0, 0, reset, earliest - now
  end
  local nxt = math.max(tat, now) + t * cost
  local rem = math.floor(math.min(math.max(now + tau + t - nxt, 0), cap) / t)
  return 1, rem, nxt - now, 0, fmt(nxt), nxt - now
end

local function win(v, sliding, limit, period, cost)
  local elapsed = math.fmod(now, period)
  local cur = (now - elapsed) / period
  local left = period - elapsed
  local c, p = 0, 0
  if v then
    local sw, sc, sp = string.match(v, '^(%d+) (%d+) (%d+)$')
    if sw then
      sw, sc, sp = tonumber(sw), tonumber(sc), tonumber(sp)
      if sw == cur then
        c, p = sc, sp
      elseif sw + 1 == cur then
        c, p = 0, sc
      end
    end
  end
  local weighted = 0
  if sliding then
    weighted = math.floor(p * left / period)
  else
    p = 0
  end
  local used = c + weighted
  local rem_now = math.max(limit - used, 0)
  if cost == 0 then
    return 1, rem_now, left, 0
  end
  if cost > limit then
    return 3, rem_now, left, 0
  end
  if used + cost > limit then
    local retry
    if not sliding then
      retry = left
    elseif c + cost <= limit then
      local room = limit - c - cost
      local e = math.ceil(period * (1 - room / p))
      retry = math.max(e - elapsed, 1)
    else
      local room = limit - cost
      local e = math.ceil(period * (1 - room / c))
      retry = left + math.min(math.max(e, 0), period)
    end
    return 0, 0, left, retry
  end
  local ttl = left
  if sliding then
    ttl = left + period
  end
  return 1, limit - used - cost, left, 0, fmt(cur) .. ' ' .. fmt(c + cost) .. ' ' .. fmt(p), ttl
end

local out = {}
local ki = 1
local ai = 3
for _ = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[ai])
  ai = ai + 1
  local writes = {}
  local denied = false
  for _ = 1, n do
    local algo = tonumber(ARGV[ai])
    local a = tonumber(ARGV[ai + 1])
    local b = tonumber(ARGV[ai + 2])
    local cost = tonumber(ARGV[ai + 3])
    local shadow = tonumber(ARGV[ai + 4])
    ai = ai + 5
    local key = KEYS[ki]
    ki = ki + 1
    local v = redis.call('GET', key)
    local st, rem, reset, retry, nv, ttl
    if algo == 1 then
      st, rem, reset, retry, nv, ttl = gcra(v, a, b, cost)
    else
      st, rem, reset, retry, nv, ttl = win(v, algo == 2, a, b, cost)
    end
    if st ~= 1 then
      if shadow == 1 then
        st = 2
      else
        denied = true
      end
    elseif nv then
      writes[#writes + 1] = { key, nv, ttl }
    end
    out[#out + 1] = st
    out[#out + 1] = rem
    out[#out + 1] = reset
    out[#out + 1] = retry
  end
  if not denied then
    for _, w in ipairs(writes) do
      redis.call('SET', w[1], w[2], 'PX', math.max(math.ceil(w[3] / 1000), 1) + slack)
    end
  end
end
return out
