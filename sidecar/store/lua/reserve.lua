-- reserve.lua: admit one request against its buckets on one shard, all or nothing.
--
-- Settles up to ARGV[6] expired records of this shard first (so their estimates count as
-- spent; it looks only when one may be due: budget_lib.lua `earliest`), then, unless the
-- request id was seen on this shard before, writes the group
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
-- ARGV[5]      expires_at rounded up to the second: the record's score in the open or
--              held zset
-- ARGV[6]      the record (see budget_lib.lua), state "o": besides what it keeps for the
--              commit, it names every bucket with its window, limit and estimate, so a
--              bucket travels once (one struct.unpack reads them all, no tonumber)
-- ARGV[7]      the numbers, packed as struct '>ddi4i1i8i8i8' (one argument is cheaper to
--              receive than seven, and a number read by struct costs a third of one parsed
--              by tonumber): now (seconds), expires_at again, how many expired records to
--              settle first, 1 for an optimistic admission (0: reserve), retention of done
--              records (seconds), ledger TTL (seconds), seconds a held bucket's counters must
--              outlive its TTL (the hold's lifetime)
-- Returns      {status, {failed 0-based indices}, {spent}, {reserved}, {request id, node
--              tags, ...}}; status is "new" (held now), "dup" (already held for this
--              request), "conflict" or "refused"; spent/reserved are after the hold when held
--              now, as seen otherwise; the last names other shards' parts of reservations
--              settled here, for the store to settle.
--
-- A function of budget_lib.lua's library (it uses int, decode, adopt, window_spent, settle, ...).

local now, expires_at, settle_limit, optimistic, retention, ledger_ttl, hold_for =
  sunpack('>ddi4i1i8i8i8', ARGV[7])
local ctx = {open = ARGV[1], held = ARGV[2], hours = ARGV[3], slots = ARGV[4],
             retention = retention, ledger_ttl = ledger_ttl}
use_clock(now)
local parts = settle(ctx, now, settle_limit)

local rkey = KEYS[1]
local rec = decode(ARGV[6])
local b = rec.b
-- Sized by their constructors for 16 buckets (a table grown one element at a time is
-- rehashed at every power of two).
local spent = {nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}
local reserved = {nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}

-- The record goes in first: writing it is the look-up of a repeated request id.
local seen = rpcall('SET', rkey, ARGV[6], 'NX', 'GET')
if seen then
  if type(seen) == 'table' then
    if not sfind(seen.err, 'WRONGTYPE', 1, true) then
      error(seen)
    end
    seen = load(rkey)  -- a record of the earlier layout
  else
    seen = parse(seen)
  end
  for i = 1, #b, 10 do
    local s, h, window = read_counters(b[i])
    if s == nil then
      s, h, window = 0, 0, 0
    end
    spent[#spent + 1] = window_spent(b[i + 1], b[i + 3], b[i + 4], s, window)
    reserved[#reserved + 1] = h
  end
  if seen.s == 'open' and seen.x > now and seen.bd == rec.bd then
    return {'dup', {}, spent, reserved, parts}
  end
  return {'conflict', {}, spent, reserved, parts}
end

optimistic = optimistic == 1
-- Every bucket is read and judged first; only an admitted request writes (its holds, and
-- counters moved to this window or given a longer life), so a refusal undoes nothing. A
-- bucket named twice is read once: its second hold counts the first.
local failed, buckets = {}, {}
local order = {nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}
-- What a bucket's entry in `buckets` holds, by position (array slots, not hashed fields):
-- counters key, held, spent in the window, window its counters follow, the window they
-- follow from now on, alive-until, life it needs, made by this call, held by this request.
local CK, HELD, TOTAL, WINDOW, FOLLOWS, ALIVE, LIFE, FRESH, MINE = 1, 2, 3, 4, 5, 6, 7, 8, 9
for i = 1, #b, 10 do
  local ck, slot, since = b[i], b[i + 3], b[i + 4]
  local hold = b[i + 7]
  local life = b[i + 5] + hold_for
  local k = buckets[ck]
  if k == nil then
    local hk = b[i + 1]
    local s, h, window, alive = read_counters(ck)
    local fresh = s == nil
    if fresh then
      s, h, window, alive = adopt(ck, hk, slot ~= since, slot, 0, 0, life)
    end
    local total, follows = window_spent(hk, slot, since, s, window)
    k = {ck, h, total, window, follows, alive, life, fresh, 0}
    buckets[ck] = k
    order[#order + 1] = k
  elseif life > k[LIFE] then
    k[LIFE] = life
  end
  local h = k[HELD] + k[MINE]
  k[MINE] = k[MINE] + hold
  spent[#spent + 1], reserved[#reserved + 1] = k[TOTAL], h + hold
  if b[i + 8] == 1 then
    local full
    if optimistic then
      full = k[TOTAL] >= b[i + 9]
    else
      -- Inclusive boundary: exactly reaching the limit is allowed.
      full = k[TOTAL] + h + hold > b[i + 9]
    end
    if full then
      failed[#failed + 1] = (i - 1) / 10
    end
  end
end

if #failed > 0 then
  -- Reported as seen before this request's holds. A bucket this refusal made from nothing
  -- goes, and so does the record.
  for j = 1, #reserved do
    reserved[j] = reserved[j] - b[(j - 1) * 10 + 8]
  end
  for o = 1, #order do
    local k = order[o]
    if k[FRESH] and k[HELD] == 0 and k[TOTAL] == 0 then
      rcall('DEL', k[CK])
    end
  end
  rcall('DEL', rkey)
  return {'refused', failed, spent, reserved, parts}
end

for o = 1, #order do
  local k = order[o]
  -- The hold must outlive the reservation, or its release would find nothing; a bucket
  -- read without holding (optimistic) must outlive its window too.
  local until_, want = lifetime(k[ALIVE], k[LIFE])
  if k[FOLLOWS] ~= k[WINDOW] or until_ then
    -- Counters that followed an earlier window follow this one from now on (the next
    -- decision reads them).
    rcall('SETRANGE', k[CK], '0',
          spack(COUNTERS, k[TOTAL], k[HELD] + k[MINE], k[FOLLOWS], until_ or k[ALIVE]))
    if want then
      rcall('EXPIRE', k[CK], int(want))
    end
  elseif k[MINE] ~= 0 then
    rcall('SETRANGE', k[CK], '8', spack('>i8', k[HELD] + k[MINE]))
  end
end

local index = rec.hm and ctx.open or ctx.held
rcall('ZADD', index, ARGV[5], rkey)
note_due(index, expires_at)
remember(rkey, ARGV[6], rec)
return {'new', {}, spent, reserved, parts}
