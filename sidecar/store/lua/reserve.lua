-- reserve.lua: admit one request against its buckets on one shard, all or nothing.
--
-- Settles up to ARGV[6] expired records of this shard first (so their estimates count as
-- spent), then, unless the request id was seen on this shard before, writes the group
-- record, holds in every bucket its estimate in that bucket's measure (µUSD, tokens or one
-- request) and checks every enforced bucket; when one has no room, the holds and the record
-- are undone. A request id seen before is a duplicate (admitted, nothing changed) only while
-- its record is open, unexpired and bound to the same request (ARGV[9]); otherwise it is a
-- conflict (refused, nothing changed).
--
-- The store runs one of these per shard its buckets live on and admits the request only
-- when every shard admitted it; a shard that refused leaves nothing behind, and the groups
-- the others held are released (release.lua). Every hold is taken atomically on its shard,
-- so spend never passes a limit; a refused request may briefly hold room elsewhere.
--
-- Why a script: the read (spent + reserved of every bucket) and the write (the hold) must
-- be one atomic step, or concurrent replicas would each see room and overshoot the limit.
-- Taking the hold first and undoing it on a refusal is the same step: nothing runs between.
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
-- ARGV[7]      mode: "reserve" or "optimistic"
-- ARGV[8]      expires_at (seconds, float)
-- ARGV[9]      binding: what the reservation is for (caller, model, provider, amount)
-- ARGV[10]     the record's JSON (see budget_lib.lua), state "o"
-- ARGV[11]     retention of done records (seconds)
-- ARGV[12]     ledger TTL (seconds)
-- ARGV[13]     "1" for the home group, "0" otherwise
-- ARGV[14..]   seven per bucket: counters key, slot hash key ("" for a fixed window), slot,
--              since, limit ("" for a bucket that is not enforced), estimate in the
--              bucket's measure, seconds its counters must live (its TTL + the hold's
--              lifetime)
-- Returns      {status, {failed 0-based indices}, {spent}, {reserved}, {request id, node
--              tags, ...}}; status is "new" (held now), "dup" (already held for this
--              request), "conflict" or "refused"; spent/reserved are after the hold when held
--              now, as seen otherwise; the last names other shards' parts of reservations
--              settled here, for the store to settle.
--
-- Prepended at load time: budget_lib.lua (int, adopt, window_spent, settle, ...).

local ctx = {open = ARGV[1], held = ARGV[2], hours = ARGV[3], slots = ARGV[4],
             retention = ARGV[11], ledger_ttl = tonumber(ARGV[12])}
use_clock(ARGV[5])
local parts = settle(ctx, ARGV[5], tonumber(ARGV[6]))

local rkey = KEYS[1]
local n = (#ARGV - 13) / 7
local spent, reserved = {}, {}

-- The record goes in first: writing it is the look-up of a repeated request id.
local seen = redis.pcall('SET', rkey, ARGV[10], 'NX', 'GET')
if seen then
  local open, expires, bound
  if type(seen) == 'table' then
    if not string.find(seen.err, 'WRONGTYPE', 1, true) then
      error(seen)
    end
    local rec = load(rkey)  -- a record of the earlier layout
    open, expires, bound = rec.s == 'open', rec.x, rec.bd
  else
    local rec = cjson.decode(seen)
    open, expires, bound = rec[1] == 'o', rec[3], rec[4]
  end
  for i = 1, n do
    local a = 13 + (i - 1) * 7
    local ck, hk, slot, since = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]),
                                tonumber(ARGV[a + 4])
    local v = redis.call('BITFIELD_RO', ck, 'GET', 'i64', '#0', 'GET', 'i64', '#1',
                         'GET', 'i64', '#2')
    spent[i], reserved[i] = window_spent(ck, hk, slot, since, v[1], v[3], false), v[2]
  end
  if open and expires > tonumber(ARGV[5]) and bound == ARGV[9] then
    return {'dup', {}, spent, reserved, parts}
  end
  return {'conflict', {}, spent, reserved, parts}
end

local optimistic = ARGV[7] == 'optimistic'
local failed, holds, fresh = {}, {}, {}
for i = 1, n do
  local a = 13 + (i - 1) * 7
  local ck, hk, slot, since = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]),
                              tonumber(ARGV[a + 4])
  local hold = '0'
  if not optimistic then
    hold = ARGV[a + 6]
  end
  -- One command: spent, the hold taken (held after it), the window #0 follows, alive-until.
  local v = redis.call('BITFIELD', ck, 'GET', 'i64', '#0', 'INCRBY', 'i64', '#1', hold,
                       'GET', 'i64', '#2', 'GET', 'i64', '#3')
  local s, h, window = v[1], v[2], v[3]
  local life = tonumber(ARGV[a + 7])
  if v[4] == 0 then
    fresh[i] = true
    s, h, window = adopt(ck, hk, slot ~= since, slot, s, h, life)
  else
    -- The hold must outlive the reservation, or its release would find nothing; a bucket
    -- read without holding (optimistic) must outlive its window too.
    extend(ck, v[4], life)
  end
  s = window_spent(ck, hk, slot, since, s, window, true)
  hold = tonumber(hold)
  holds[i] = hold
  spent[i], reserved[i] = s, h
  local limit = ARGV[a + 5]
  if limit ~= '' then
    limit = tonumber(limit)
    local full
    if optimistic then
      full = s >= limit
    else
      -- Inclusive boundary: exactly reaching the limit is allowed.
      full = s + h > limit
    end
    if full then
      failed[#failed + 1] = i - 1
    end
  end
end

if #failed > 0 then
  -- Undo: the holds and the record go, reported as seen before this request's holds. A
  -- bucket this refusal made from nothing goes too.
  for i = n, 1, -1 do
    reserved[i] = reserved[i] - holds[i]
    if holds[i] ~= 0 then
      local ck = ARGV[13 + (i - 1) * 7 + 1]
      local v = redis.call('BITFIELD', ck, 'INCRBY', 'i64', '#1', int(-holds[i]),
                           'GET', 'i64', '#0')
      if fresh[i] and v[1] == 0 and v[2] == 0 then
        redis.call('DEL', ck)
      end
    end
  end
  redis.call('DEL', rkey)
  return {'refused', failed, spent, reserved, parts}
end

if ARGV[13] == '1' then
  redis.call('ZADD', ctx.open, ARGV[8], rkey)
else
  redis.call('ZADD', ctx.held, ARGV[8], rkey)
end
return {'new', {}, spent, reserved, parts}
