-- budget_lib.lua: helpers shared by reserve.lua, commit.lua, release.lua, settle.lua and
-- add_spend.lua.
--
-- Not a script on its own. The store prepends this file to each of those before
-- registering them, because Redis scripts cannot call one another, and settling an expired
-- reservation must behave identically whether reserve.lua or settle.lua does it.
--
-- Budget state is sharded: every bucket hash carries its own hash tag, so buckets spread
-- over a Redis Cluster's shards. A request's buckets are grouped by the shard they live on
-- and each group is reserved by one script on its shard. What a group needs besides its
-- buckets lives under the shard's node tag {T} (a hash tag the client picked because that
-- shard owns its slot): the group's record, the shard's open index and its ledger. On a
-- cluster the scripts are registered with `allow-cross-slot-keys`, so one script may touch
-- every key of its shard; KEYS only name the {T} keys (one slot, for routing) and bucket
-- keys come in ARGV. On one Redis there is one group, with tag {n0}.
--
-- Data layout (key names come from sidecar/store/redis_keys.py, never built here):
--   bucket hash      field "<slot start>" -> amount spent in that slot; "r" -> amount
--                    reserved by open reservations; "k" -> the Unix second until which the
--                    hash is kept alive (so the TTL is only touched when it must grow).
--                    Rolling windows keep a running total: "t" -> the sum of slots >= "f",
--                    the window start it was summed from; summed afresh (one HGETALL) only
--                    when the window start moves, once per slot. A fixed window is one
--                    slot read directly. The
--                    amounts are in the bucket's measure: µUSD, tokens or requests.
--   group record     hash, one per request and shard: s (open|committed|expired), x
--                    (expires_at), e (estimate µUSD), bd (binding), b (a flat JSON list,
--                    seven values per bucket on this shard: bucket key, slot, ttl seconds,
--                    measure, estimate in that measure, held of it, 1 rolling | 0 fixed). The home group (the
--                    shard of the request's first bucket) also has hm "1", d (dims JSON), l
--                    (its ledger hash key), hr (hour), ti / to (estimated tokens), g (the
--                    node tags of the other groups, comma-separated) and c (created_at).
--   open zset        home records scored by expires_at; held zset: the other groups' records.
--   slots zset       member "<slot>|<bucket hash key>", score = the slot's expiry, so
--                    settle.lua can drop dead slot fields of this shard's buckets (a hash
--                    field has no TTL in 7.0).
--   ledger hash      "c|<dims>" cost, "n|<dims>" requests, "i|<dims>" input tokens,
--                    "o|<dims>" output tokens, "e|<dims>" provider errors; one hash per shard
--                    and hour (the home group's shard books the request).
--   hours zset       member = score = an hour holding ledger data on this shard.
--
-- Cost: each bucket costs one read (HMGET) and one write (HINCRBY) in reserve.lua and, in
-- commit.lua, two increments (a held fixed window committed in time) or one read and one
-- write (HMGET, HSET); TTLs and indexes are only written when a
-- lifetime, a slot or a ledger row is new.
--
-- Numbers: Lua numbers are doubles, so amounts are exact up to 2^53 µUSD (about $9 billion).
-- Every number handed back to Redis goes through int(): Redis may format a double with an
-- exponent, which HINCRBY and EXPIRE refuse.

local function int(n)
  return string.format('%d', n)
end

-- The clock in whole seconds for bucket lifetimes ("k"): the request's own time when the
-- script was given one (use_clock), else the server's, read once per script. A client
-- clock a little off only moves when a TTL is next extended; the TTL itself is relative.
local script_now = nil
local function use_clock(now)
  script_now = math.floor(tonumber(now))
end
local function clock()
  if script_now == nil then
    script_now = tonumber(redis.call('TIME')[1])
  end
  return script_now
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
    want = ttl
  end
  writes[#writes + 1] = 'k'
  writes[#writes + 1] = int(now + want)
  return want
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
    redis.call('ZADD', ctx.hours, rec.hr, rec.hr)
    keep(rec.l, ctx.ledger_ttl)
  end
end

-- A group record with numeric e, or nil when there is none.
local function load(rkey)
  local v = redis.call('HMGET', rkey, 's', 'e', 'b', 'hm', 'd', 'l', 'hr', 'g', 'x', 'id')
  if not v[1] then
    return nil
  end
  return {s = v[1], e = tonumber(v[2]), b = v[3], hm = v[4] == '1', d = v[5], l = v[6],
          hr = v[7], g = v[8] or '', x = tonumber(v[9]), id = v[10]}
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

-- A group's buckets as one flat list, seven values per bucket: key, slot, ttl seconds,
-- measure, estimate in that measure, held of it, 1 for a rolling window (0: fixed). One
-- flat JSON array decodes in about half the time of a list of lists. Records written
-- before held the nested form [[key, slot, ttl, measure, estimate, held, slot expiry],
-- ...]: read as the same seven values, with `nil` for the window kind (never the fast path).
local function entries(b)
  local list = cjson.decode(b)
  if type(list[1]) ~= 'table' then
    return list, true
  end
  local flat = {}
  for _, e in ipairs(list) do
    for j = 1, 6 do
      flat[#flat + 1] = e[j]
    end
    flat[#flat + 1] = -1
  end
  return flat, false
end

-- Charge a fixed-window bucket `amount` and release `held` of its hold, for an open
-- reservation committed within its lifetime: two increments, no read. reserve.lua made the
-- hash live until at least expiry + TTL + an hour, so no TTL needs extending; a hold that
-- comes back negative means the hash was lost meanwhile (HINCRBY made a new one): then the
-- hold is zeroed and the lifetime set as add_bucket would.
local function add_fixed(ctx, key, slot, amount, ttl, held)
  local field = int(slot)
  local value = redis.call('HINCRBY', key, field, int(amount))
  if value == amount then
    -- A new slot: index it so settle.lua drops it once dead. GT keeps the latest expiry.
    redis.call('ZADD', ctx.slots, 'GT', int(slot + ttl), field .. '|' .. key)
  end
  if redis.call('HINCRBY', key, 'r', int(-held)) < 0 then
    local writes = {'r', '0'}
    local want = extend_bucket(key, redis.call('HGET', key, 'k'), ttl, writes)
    redis.call('HSET', key, unpack(writes))
    if want ~= nil then
      redis.call('EXPIRE', key, int(want))
    end
  end
end

-- Replace a group's holds by what the exchange amounted to: `actual(measure, estimate)`
-- gives each bucket's charge; `release` says whether holds are released; `fast`: an open
-- reservation committed before its expiry (fixed windows take add_fixed). The home group
-- also books `delta_cost` in the ledger. `errors` (optional): 1 when the provider answered
-- with an error.
local function charge(ctx, rec, actual, release, delta_cost, requests, input, output, errors,
                      fast)
  local b, current = entries(rec.b)
  fast = fast and current
  for i = 1, #b, 7 do
    local held = 0
    if release then
      held = b[i + 5]
    end
    local amount = actual(b[i + 3], b[i + 4])
    if fast and held ~= 0 and b[i + 6] == 0 then
      add_fixed(ctx, b[i], b[i + 1], amount, b[i + 2], held)
    else
      add_bucket(ctx, b[i], b[i + 1], amount, b[i + 1] + b[i + 2], b[i + 2], held)
    end
  end
  if rec.hm then
    add_ledger(ctx, rec, delta_cost, requests, input, output, errors)
  end
end

-- Done records stay a while so late and duplicate completions are recognised.
local function finish(ctx, rkey, rec, state)
  redis.call('HSET', rkey, 's', state)
  if rec.hm then
    redis.call('ZREM', ctx.open, rkey)
  else
    redis.call('ZREM', ctx.held, rkey)
  end
  redis.call('EXPIRE', rkey, ctx.retention)
end

-- Charge an open record that was never completed its estimate: the request may well
-- have cost money.
local function expire(ctx, rkey, rec)
  charge(ctx, rec, function(_, estimate) return estimate end, true, rec.e, 1, 0, 0)
  finish(ctx, rkey, rec, 'expired')
  rec.s = 'expired'
end

-- Charge up to `limit` records of `index` expired at `now` their estimate; returns how
-- many home records (reservations) were settled, and {request id, other parts' node tags}
-- of those with parts on other shards.
local function settle_index(ctx, index, now, limit)
  local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
  local settled, parts = 0, {}
  for _, rkey in ipairs(due) do
    local rec = load(rkey)
    if rec ~= nil and rec.s == 'open' then
      expire(ctx, rkey, rec)
      if rec.hm then
        settled = settled + 1
        if rec.g ~= '' then
          parts[#parts + 1] = rec.id
          parts[#parts + 1] = rec.g
        end
      end
    else
      redis.call('ZREM', index, rkey)
    end
  end
  return settled, parts
end

-- Settle what expired on this shard before a decision reads its buckets; returns
-- {request id, node tags, ...} of other shards' parts of the home records settled, which
-- the store settles next (settle_part.lua).
local function settle(ctx, now, limit)
  local _, parts = settle_index(ctx, ctx.open, now, limit)
  if ctx.held ~= '' then
    -- One Redis has no held index: every group is a home group there.
    settle_index(ctx, ctx.held, now, limit)
  end
  return parts
end
