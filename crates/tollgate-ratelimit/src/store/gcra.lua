-- tollgate rate limiting: decides a batch of requests, each against all of
-- its policies, ALL-OR-NOTHING per request, in one script call.
--
-- KEYS:    the distinct keys of the batch (a key several requests share,
--          one busy client, is passed once). The keys of one request share
--          one hash tag (the caller's identity); a batch only holds keys of
--          one cluster slot.
-- ARGV[1]: now in microseconds, or 0 to use the server's clock
--          (`TIME`); only tests pass a synthetic clock.
-- ARGV[2]: G, the number of request groups in the batch.
-- ARGV[3]: Q, the number of distinct policy parameter sets, then Q x 4:
--          algorithm (1 GCRA, 2 sliding window, 3 fixed window),
--          a, b  (GCRA: T = emission interval us, tau = (burst-1)*T us;
--                 windows: limit, period us),
--          shadow (1 = never deny, only report).
-- then per group: P (the number of policies of its requests), R (how many
--          identical requests in a row it stands for, in order), then 3
--          values per policy: key index (into KEYS), parameter set index,
--          cost (0 = peek).
-- Returns: a flat array, 4 integers per (request, policy), in argument
--          order: status (0 denied, 1 allowed, 2 would deny but shadow,
--          3 cost exceeds capacity), remaining, reset us, retry-after us.
--
-- A request is written only if no enforced policy denies it: nothing is
-- consumed otherwise. Every key written is given an expiry (SET ... PX) at
-- the moment its state can no longer change a decision. Each key is read
-- once and written once per call, with the state and expiry the last
-- admitted request left: the outcome is that of deciding the requests one
-- after the other. The maths mirrors `quota.rs` (GCRA as in the `governor`
-- crate) line by line; every value stays below 2^53 so Lua's doubles are
-- exact. Redis's Lua costs about 0.3 us per operation, so the loop below
-- does as little per request as it can.

local now = tonumber(ARGV[1])
local slack = 0
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  -- A synthetic clock may stand still while real time passes.
  slack = 600000
end

local max, min, floor, ceil, fmod = math.max, math.min, math.floor, math.ceil, math.fmod

local function fmt(x)
  return string.format('%.0f', x)
end

-- Written with comparisons rather than math.max/min: each C call costs.
-- Tokens left when the theoretical arrival time is `at`.
local function left(at, t, cap)
  local r = now + cap - at
  if r < 0 then
    return 0
  elseif r > cap then
    r = cap
  end
  return floor(r / t)
end

local function gcra(v, t, tau, cost)
  local tat = tonumber(v) or now
  local cap = tau + t
  local reset = tat - now
  if reset < 0 then
    reset = 0
  end
  if cost == 0 then
    return 1, left(tat, t, cap), reset, 0
  end
  local extra = t * (cost - 1)
  if extra > tau then
    return 3, 0, reset, 0
  end
  local earliest = tat + extra - tau
  if now < earliest then
    return 0, 0, reset, earliest - now
  end
  local nxt = tat
  if now > nxt then
    nxt = now
  end
  nxt = nxt + t * cost
  return 1, left(nxt, t, cap), nxt - now, 0, nxt, nxt - now
end

local function win(v, sliding, limit, period, cost)
  local elapsed = fmod(now, period)
  local cur = (now - elapsed) / period
  local c, p = 0, 0
  if v then
    local sw, sc, sp = string.match(v, '^(%d+) (%d+) (%d+)$')
    if sw then
      sw, sc, sp = tonumber(sw), tonumber(sc), tonumber(sp)
      if sw == cur then
        c, p = sc, sp
      elseif sw + 1 == cur then
        c, p = 0, sc
      elseif sw > cur then
        -- The clock went back behind the stored window (a failover to a
        -- node whose clock is behind): go on counting in that window, as
        -- at its start, rather than start the count again.
        cur, elapsed = sw, 0
        c, p = sc, sp
      end
    end
  end
  local left = period - elapsed
  local weighted = 0
  if sliding then
    weighted = floor(p * left / period)
  else
    p = 0
  end
  local used = c + weighted
  local rem_now = max(limit - used, 0)
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
      local e = ceil(period * (1 - room / p))
      retry = max(e - elapsed, 1)
    else
      local room = limit - cost
      local e = ceil(period * (1 - room / c))
      retry = left + min(max(e, 0), period)
    end
    return 0, 0, left, retry
  end
  local ttl = left
  if sliding then
    ttl = left + period
  end
  return 1, limit - used - cost, left, 0, fmt(cur) .. ' ' .. fmt(c + cost) .. ' ' .. fmt(p), ttl
end

local argv = ARGV
local nkeys = #KEYS
local d = tonumber(argv[2])
local algo, pa, pb, shadow = {}, {}, {}, {}
local ai = 4
for i = 1, tonumber(argv[3]) do
  algo[i] = tonumber(argv[ai])
  pa[i] = tonumber(argv[ai + 1])
  pb[i] = tonumber(argv[ai + 2])
  shadow[i] = argv[ai + 3] == '1'
  ai = ai + 4
end

-- state[k]: key k as the requests decided so far left it (false: none;
-- nil: not read yet); ttl[k]: expiry of its last write, if written.
local state, ttl = {}, {}
local out, oi = {}, 0
-- the current group's checks, and the current request's writes (applied
-- only if it is admitted)
local gk, gp, gc = {}, {}, {}
local wk, wv, wt = {}, {}, {}
for _ = 1, d do
  local n = tonumber(argv[ai])
  local reps = tonumber(argv[ai + 1])
  ai = ai + 2
  for j = 1, n do
    gk[j] = tonumber(argv[ai])
    gp[j] = tonumber(argv[ai + 1])
    gc[j] = tonumber(argv[ai + 2])
    ai = ai + 3
  end
  for _ = 1, reps do
    local nw = 0
    local denied = false
    for j = 1, n do
      local k, p, cost = gk[j], gp[j], gc[j]
      local v = state[k]
      if v == nil then
        v = redis.call('GET', KEYS[k])
        state[k] = v
      end
      if v == false then
        v = nil
      end
      local st, rem, reset, retry, nv, nt
      if algo[p] == 1 then
        st, rem, reset, retry, nv, nt = gcra(v, pa[p], pb[p], cost)
      else
        st, rem, reset, retry, nv, nt = win(v, algo[p] == 2, pa[p], pb[p], cost)
      end
      if st ~= 1 then
        if shadow[p] then
          st = 2
        else
          denied = true
        end
      elseif nv then
        nw = nw + 1
        wk[nw], wv[nw], wt[nw] = k, nv, nt
      end
      out[oi + 1], out[oi + 2], out[oi + 3], out[oi + 4] = st, rem, reset, retry
      oi = oi + 4
    end
    if not denied then
      for i = 1, nw do
        state[wk[i]] = wv[i]
        ttl[wk[i]] = wt[i]
      end
    end
  end
end
for k = 1, nkeys do
  local t = ttl[k]
  if t then
    local v = state[k]
    if type(v) == 'number' then
      v = fmt(v)
    end
    redis.call('SET', KEYS[k], v, 'PX', max(ceil(t / 1000), 1) + slack)
  end
end
return out
