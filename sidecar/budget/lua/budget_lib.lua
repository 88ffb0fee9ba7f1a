-- budget_lib.lua: helpers shared by reserve.lua, commit.lua and settle.lua.
--
-- Not a script on its own. The store prepends this file to each of those three before
-- registering them, because Redis scripts cannot call one another, and settling an expired
-- reservation must behave identically whether reserve.lua or settle.lua does it.
--
-- Data layout (key names come from sidecar/store/redis_keys.py, never built here):
--   bucket hash      field "<slot start>" -> amount spent in that slot; field "r" -> amount
--                    reserved by open reservations. Spend = sum of slots >= since. The
--                    amount is in the bucket's measure: µUSD, tokens or requests.
--   slot index zset  member "<slot>|<bucket hash key>", score = the slot's expiry, so
--                    settle.lua can drop dead slot fields (a hash field has no TTL in 7.0).
--   open zset        member = reservation hash key, score = expires_at.
--   reservation hash s (open|committed|expired), e (estimate µUSD), h (held µUSD: e or 0),
--                    x (expires_at), c (created_at), b (JSON [[bucket key, slot, slot
--                    expiry, ttl seconds, measure, estimate in that measure, held of it],
--                    ...]; records from before measures have only the first four: µUSD
--                    buckets holding h of e), d (dims JSON), l (ledger key), hr (hour),
--                    bd (binding: what the reservation was made for), ti / to (estimated
--                    input / output tokens).
--   ledger hash      "c|<dims>" cost, "n|<dims>" requests, "i|<dims>" input tokens,
--                    "o|<dims>" output tokens, "e|<dims>" provider errors (only once there
--                    is one); one hash per hour.
--   hours zset       member = score = an hour holding ledger data.
--
-- Numbers: Lua numbers are doubles, so amounts are exact up to 2^53 µUSD (about $9 billion).
-- Every number handed back to Redis goes through int(): Redis may format a double with an
-- exponent, which HINCRBY and EXPIRE refuse.

local function int(n)
  return string.format('%d', n)
end

-- Extend a key's TTL to at least `secs` seconds; never shorten it, never delete the key.
local function keep(key, secs)
  if secs >= 1 and redis.call('TTL', key) < secs then
    redis.call('EXPIRE', key, int(secs))
  end
end

-- Spent (slots with start >= since) and reserved µUSD of one bucket hash.
local function bucket_state(key, since)
  local flat = redis.call('HGETALL', key)
  local spent, reserved = 0, 0
  for i = 1, #flat, 2 do
    local field, value = flat[i], tonumber(flat[i + 1])
    if field == 'r' then
      reserved = value
    elseif tonumber(field) >= since then
      spent = spent + value
    end
  end
  return spent, reserved
end

local function add_reserved(key, amount)
  if amount == 0 then
    return
  end
  -- Below zero only if the hash expired under open reservations; never let a negative
  -- reserve make room that was not there.
  if redis.call('HINCRBY', key, 'r', int(amount)) <= 0 then
    redis.call('HDEL', key, 'r')
  end
end

local function add_slot(ctx, key, slot, amount, expires, ttl)
  local field = int(slot)
  redis.call('HINCRBY', key, field, int(amount))
  -- GT keeps the latest expiry when several windows write the same slot.
  redis.call('ZADD', ctx.slots, 'GT', int(expires), field .. '|' .. key)
  keep(key, ttl)
end

local function add_ledger(ctx, rec, cost, requests, input, output, errors)
  local dims = rec.d
  redis.call('HINCRBY', rec.l, 'c|' .. dims, int(cost))
  redis.call('HINCRBY', rec.l, 'n|' .. dims, int(requests))
  redis.call('HINCRBY', rec.l, 'i|' .. dims, int(input))
  redis.call('HINCRBY', rec.l, 'o|' .. dims, int(output))
  if errors ~= nil and errors > 0 then
    redis.call('HINCRBY', rec.l, 'e|' .. dims, int(errors))
  end
  redis.call('ZADD', ctx.hours, rec.hr, rec.hr)
  keep(rec.l, ctx.ledger_ttl)
end

-- A reservation record as a table with numeric e and h, or nil when there is none.
local function load(rkey)
  local flat = redis.call('HGETALL', rkey)
  if #flat == 0 then
    return nil
  end
  local rec = {}
  for i = 1, #flat, 2 do
    rec[flat[i]] = flat[i + 1]
  end
  rec.e = tonumber(rec.e)
  rec.h = tonumber(rec.h)
  return rec
end

-- The amount of an exchange in one measure (sidecar.store.budget_types.measured).
local function measured(measure, micros, input, output)
  if measure == 'tokens' then
    return input + output
  elseif measure == 'input_tokens' then
    return input
  elseif measure == 'output_tokens' then
    return output
  elseif measure == 'requests' then
    return 1
  end
  return micros
end

-- A reservation's buckets as {key, slot, expiry, ttl, measure, estimate, held}.
local function entries(rec)
  local out = {}
  for i, b in ipairs(cjson.decode(rec.b)) do
    if b[5] == nil then
      out[i] = {b[1], b[2], b[3], b[4], 'usd', rec.e, rec.h}
    else
      out[i] = b
    end
  end
  return out
end

-- Replace a reservation by what the exchange amounted to: `actual` gives each bucket's
-- charge from its entry; `release` says whether holds are released; `delta_cost` goes to
-- the ledger. `errors` (optional): 1 when the provider answered with an error.
local function charge(ctx, rec, actual, release, delta_cost, requests, input, output, errors)
  for _, b in ipairs(entries(rec)) do
    if release then
      add_reserved(b[1], -b[7])
    end
    add_slot(ctx, b[1], b[2], actual(b), b[3], b[4])
  end
  add_ledger(ctx, rec, delta_cost, requests, input, output, errors)
end

-- Done reservations stay a while so late and duplicate completions are recognised.
local function finish(ctx, rkey, state)
  redis.call('HSET', rkey, 's', state)
  redis.call('ZREM', ctx.open, rkey)
  redis.call('EXPIRE', rkey, ctx.retention)
end

-- Charge up to `limit` reservations expired at `now` their estimate; returns how many.
local function settle(ctx, now, limit)
  local due = redis.call('ZRANGEBYSCORE', ctx.open, '-inf', now, 'LIMIT', 0, limit)
  local settled = 0
  for _, rkey in ipairs(due) do
    local rec = load(rkey)
    if rec ~= nil and rec.s == 'open' then
      -- Never completed: the request may well have cost money, so it pays its estimate.
      charge(ctx, rec, function(b) return b[6] end, true, rec.e, 1, 0, 0)
      finish(ctx, rkey, 'expired')
      settled = settled + 1
    else
      redis.call('ZREM', ctx.open, rkey)
    end
  end
  return settled
end
