-- budget_lib.lua: helpers shared by reserve.lua, commit.lua and settle.lua.
--
-- Not a script on its own. The store prepends this file to each of those three before
-- registering them, because Redis scripts cannot call one another, and settling an expired
-- reservation must behave identically whether reserve.lua or settle.lua does it.
--
-- Data layout (key names come from sidecar/store/redis_keys.py, never built here):
--   bucket hash      field "<slot start>" -> amount spent in that slot; "r" -> amount
--                    reserved by open reservations; "k" -> the Unix second until which the
--                    hash is kept alive (so the TTL is only touched when it must grow).
--                    Rolling windows also keep a running total: "t" -> the sum of slots
--                    >= "f", the window start it was summed from; it is summed afresh (one
--                    HGETALL) only when the window start moves, once per slot. A fixed
--                    window is one slot and reads it directly. The amounts are in the
--                    bucket's measure: µUSD, tokens or requests.
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
-- Cost: each bucket a request touches costs two commands in reserve.lua (HMGET, HSET) and
-- two in commit.lua (HMGET, HSET); the slot index, the TTL and the ledger index are only
-- written when a slot, a row or a lifetime is new.
--
-- Numbers: Lua numbers are doubles, so amounts are exact up to 2^53 µUSD (about $9 billion).
-- Every number handed back to Redis goes through int(): Redis may format a double with an
-- exponent, which HINCRBY and EXPIRE refuse.

local function int(n)
  return string.format('%d', n)
end

-- The server's clock in whole seconds, read once per script: lifetimes are Redis's own.
local server_now = nil
local function clock()
  if server_now == nil then
    server_now = tonumber(redis.call('TIME')[1])
  end
  return server_now
end

-- Extend a key's TTL to at least `secs` seconds; never shorten it, never delete the key.
local function keep(key, secs)
  if secs >= 1 and redis.call('TTL', key) < secs then
    redis.call('EXPIRE', key, int(secs))
  end
end

-- How long a bucket hash must be made to live so it lasts `secs` more seconds, given its
-- "k" field (alive until); nil when it already does. Adds the new "k" to `writes` (fields
-- for the HSET that must come before the EXPIRE: a new hash only exists after it). The
-- TTL is set an eighth longer than needed, so a busy bucket extends it once in a while,
-- not on every request.
local function extend_bucket(key, k, secs, writes)
  local now = clock()
  if secs < 1 or (k and tonumber(k) >= now + secs) then
    return nil
  end
  local ttl = redis.call('TTL', key)
  local want = secs + math.floor(secs / 8)
  if ttl > want then
    want = ttl  -- a hash from before "k" existed may live longer already
  end
  writes[#writes + 1] = 'k'
  writes[#writes + 1] = int(now + want)
  return want
end

-- One bucket as reserve.lua reads it: {spent, reserved, k, writes}; `writes` holds fields
-- for the HSET that will follow (a refreshed running total).
local function read_bucket(key, slot, since)
  if since == slot then
    local v = redis.call('HMGET', key, int(slot), 'r', 'k')
    return {tonumber(v[1] or 0), tonumber(v[2] or 0), v[3], {}}
  end
  local v = redis.call('HMGET', key, 't', 'f', 'r', 'k')
  if v[2] and tonumber(v[2]) == since then
    return {tonumber(v[1] or 0), tonumber(v[3] or 0), v[4], {}}
  end
  -- The window start moved (or the total is new): sum the slots still in the window.
  local flat = redis.call('HGETALL', key)
  local spent = 0
  for i = 1, #flat, 2 do
    local start = tonumber(flat[i])
    if start ~= nil and start >= since then
      spent = spent + tonumber(flat[i + 1])
    end
  end
  local writes = {}
  if #flat > 0 then
    -- Only into a hash that exists (and so has its TTL): never create one without.
    writes = {'t', int(spent), 'f', int(since)}
  end
  return {spent, tonumber(v[3] or 0), v[4], writes}
end

-- Release `release` of a bucket's hold and add `amount` to its slot (and to the running
-- total when the slot is in it); `ttl`: how long the hash must live from now on.
local function add_bucket(ctx, key, slot, amount, expires, ttl, release)
  local field = int(slot)
  local v = redis.call('HMGET', key, field, 'r', 't', 'f', 'k')
  local writes = {field, int(tonumber(v[1] or 0) + amount)}
  if release ~= 0 then
    -- Below zero only if the hash expired under open reservations; never let a negative
    -- reserve make room that was not there.
    local reserved = tonumber(v[2] or 0) - release
    if reserved < 0 then
      reserved = 0
    end
    writes[#writes + 1] = 'r'
    writes[#writes + 1] = int(reserved)
  end
  if v[4] and slot >= tonumber(v[4]) then
    writes[#writes + 1] = 't'
    writes[#writes + 1] = int(tonumber(v[3] or 0) + amount)
  end
  local want = extend_bucket(key, v[5], ttl, writes)
  redis.call('HSET', key, unpack(writes))
  if want ~= nil then
    redis.call('EXPIRE', key, int(want))
  end
  if v[1] == false then
    -- A new slot: index it so settle.lua drops it once dead. GT keeps the latest expiry.
    redis.call('ZADD', ctx.slots, 'GT', int(expires), field .. '|' .. key)
  end
end

local function add_slot(ctx, key, slot, amount, expires, ttl)
  add_bucket(ctx, key, slot, amount, expires, ttl, 0)
end

local function add_ledger(ctx, rec, cost, requests, input, output, errors)
  local dims = rec.d
  redis.call('HINCRBY', rec.l, 'c|' .. dims, int(cost))
  local n = redis.call('HINCRBY', rec.l, 'n|' .. dims, int(requests))
  redis.call('HINCRBY', rec.l, 'i|' .. dims, int(input))
  redis.call('HINCRBY', rec.l, 'o|' .. dims, int(output))
  if errors ~= nil and errors > 0 then
    redis.call('HINCRBY', rec.l, 'e|' .. dims, int(errors))
  end
  if n == tonumber(requests) then
    -- A new row (or one that only ever held parts): index the hour and extend its hash.
    -- Rows that already existed did both when they first appeared.
    redis.call('ZADD', ctx.hours, rec.hr, rec.hr)
    keep(rec.l, ctx.ledger_ttl)
  end
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
    local held = 0
    if release then
      held = b[7]
    end
    add_bucket(ctx, b[1], b[2], actual(b), b[3], b[4], held)
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
