-- reserve.lua: admit one request against its buckets on one shard, all or nothing.
--
-- Settles up to ARGV[6] expired records of this shard first (so their estimates count as
-- spent), then, unless the request id was seen on this shard before, checks every enforced
-- bucket and, when all have room, writes the group record and holds in every bucket its
-- estimate in that bucket's measure (µUSD, tokens or one request). A request id seen before
-- is a duplicate (admitted, nothing changed) only while its record is open, unexpired and
-- bound to the same request (ARGV[10]); otherwise it is a conflict (refused, nothing changed).
--
-- The store runs one of these per shard its buckets live on and admits the request only
-- when every shard admitted it; a shard that refused leaves nothing behind, and the groups
-- the others held are released (release.lua). Every hold is taken atomically on its shard,
-- so spend never passes a limit; a refused request may briefly hold room elsewhere.
--
-- Why a script: the read (spent + reserved of every bucket) and the write (the hold) must
-- be one atomic step, or concurrent replicas would each see room and overshoot the limit.
--
-- KEYS[1]      this request's record on this shard (the home record on the home group's)
-- ARGV[1]      the shard's open zset (home records)
-- ARGV[2]      the shard's held zset (other groups' records); "" on one Redis
-- ARGV[3]      the shard's ledger hours zset
-- ARGV[4]      the shard's slot index zset
--              (only KEYS[1] is declared, for routing: on a cluster the others are in other
--              hash slots of the same shard)
-- ARGV[5]      now (seconds, float)
-- ARGV[6]      how many expired records to settle first
-- ARGV[7]      estimate (µUSD integer)
-- ARGV[8]      mode: "reserve" or "optimistic"
-- ARGV[9]      expires_at (seconds, float)
-- ARGV[10]     binding: what the reservation is for (caller, model, provider, amount)
-- ARGV[11]     the group's buckets, flat JSON (field b, see budget_lib.lua)
-- ARGV[12]     retention of done records (seconds)
-- ARGV[13]     ledger hash TTL (seconds)
-- ARGV[14]     "1" for the home group, "0" otherwise; for the home group:
-- ARGV[15]     ledger dims JSON
-- ARGV[16]     ledger hash key of the request's hour on this shard
-- ARGV[17]     that hour
-- ARGV[18]     estimated input tokens
-- ARGV[19]     estimated output tokens
-- ARGV[20]     node tags of the other groups, comma-separated
-- ARGV[21]     the request id
-- ARGV[22..]   seven per bucket: hash key, slot, since, limit, enforce 1|0, seconds the hash
--              must live, estimate in the bucket's measure
-- Returns      {status, {failed 0-based indices}, {spent}, {reserved}, {request id, node
--              tags, ...}}; status is "new" (held now), "dup" (already held for this
--              request), "conflict" or "refused"; spent/reserved are after the hold when held
--              now, as seen otherwise; the last names other shards' parts of reservations
--              settled here, for the store to settle.
--
-- Prepended at load time: budget_lib.lua (int, extend_bucket, settle, ...).

local ctx = {open = ARGV[1], held = ARGV[2], hours = ARGV[3], ledger_ttl = tonumber(ARGV[13]),
             retention = ARGV[12], slots = ARGV[4]}
use_clock(ARGV[5])
local parts = settle(ctx, ARGV[5], tonumber(ARGV[6]))

local rkey = KEYS[1]
local n = (#ARGV - 21) / 7
local keys, spent, reserved, seen_k, writes = {}, {}, {}, {}, {}
for i = 1, n do
  local a = 21 + (i - 1) * 7
  local key, slot, since = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  keys[i] = key
  if slot == since then
    local v = redis.call('HMGET', key, slot, 'r', 'k')
    spent[i], reserved[i], seen_k[i] = tonumber(v[1] or 0), tonumber(v[2] or 0), v[3]
  else
    local v = redis.call('HMGET', key, 't', 'f', 'r', 'k')
    reserved[i], seen_k[i] = tonumber(v[3] or 0), v[4]
    if v[2] == since then
      spent[i] = tonumber(v[1] or 0)
    else
      -- The window start moved (or the total is new): sum the slots still in the window.
      local flat = redis.call('HGETALL', key)
      local total, start = 0, tonumber(since)
      for j = 1, #flat, 2 do
        local s = tonumber(flat[j])
        if s ~= nil and s >= start then
          total = total + tonumber(flat[j + 1])
        end
      end
      spent[i] = total
      if #flat > 0 then
        -- Only into a hash that exists (and so has its TTL): never create one without.
        writes[i] = {'t', int(total), 'f', since}
      end
    end
  end
end
-- A refreshed running total is kept whatever the decision: the next one reads it.
local function save_all()
  for i = 1, n do
    if writes[i] then
      redis.call('HSET', keys[i], unpack(writes[i]))
    end
  end
end

local seen = redis.call('HMGET', rkey, 's', 'x', 'bd')
if seen[1] then
  save_all()
  if seen[1] == 'open' and tonumber(seen[2]) > tonumber(ARGV[5]) and seen[3] == ARGV[10] then
    return {'dup', {}, spent, reserved, parts}
  end
  return {'conflict', {}, spent, reserved, parts}
end

local optimistic = ARGV[8] == 'optimistic'
local failed = {}
for i = 1, n do
  local a = 21 + (i - 1) * 7
  if ARGV[a + 5] == '1' then
    local limit, full = tonumber(ARGV[a + 4]), false
    if optimistic then
      full = spent[i] >= limit
    else
      -- Inclusive boundary: exactly reaching the limit is allowed.
      full = spent[i] + reserved[i] + tonumber(ARGV[a + 7]) > limit
    end
    if full then
      failed[#failed + 1] = i - 1
    end
  end
end
if #failed > 0 then
  save_all()
  return {'refused', failed, spent, reserved, parts}
end

if ARGV[14] == '1' then
  redis.call('HSET', rkey, 's', 'open', 'e', ARGV[7], 'x', ARGV[9], 'bd', ARGV[10],
             'b', ARGV[11], 'hm', '1', 'c', ARGV[5], 'd', ARGV[15], 'l', ARGV[16],
             'hr', ARGV[17], 'ti', ARGV[18], 'to', ARGV[19], 'g', ARGV[20], 'id', ARGV[21])
  redis.call('ZADD', ctx.open, ARGV[9], rkey)
else
  redis.call('HSET', rkey, 's', 'open', 'e', ARGV[7], 'x', ARGV[9], 'bd', ARGV[10],
             'b', ARGV[11])
  redis.call('ZADD', ctx.held, ARGV[9], rkey)
end
local after = {}
for i = 1, n do
  local a = 21 + (i - 1) * 7
  local hold = 0
  if not optimistic then
    hold = tonumber(ARGV[a + 7])
  end
  local want = nil
  if hold ~= 0 then
    -- HINCRBY, not a write of what was read: a key may repeat within one request.
    redis.call('HINCRBY', keys[i], 'r', ARGV[a + 7])
    -- The hold must outlive the reservation, or its release would find nothing.
    if writes[i] == nil then
      writes[i] = {}
    end
    want = extend_bucket(keys[i], seen_k[i], tonumber(ARGV[a + 6]), writes[i])
  end
  if writes[i] and #writes[i] > 0 then
    redis.call('HSET', keys[i], unpack(writes[i]))
    writes[i] = nil
  end
  if want ~= nil then
    redis.call('EXPIRE', keys[i], int(want))
  end
  after[i] = reserved[i] + hold
end
return {'new', {}, spent, after, parts}
