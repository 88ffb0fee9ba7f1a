-- reserve.lua: admit one request against its buckets on one shard, all or nothing.
--
-- Settles up to SETTLE_ON_RESERVE expired records of this shard first (so their estimates count as
-- spent), then, unless the request id was seen on this shard before, writes the group
-- record, holds in every bucket its estimate in that bucket's measure (µUSD, tokens or one
-- request) and checks every enforced bucket; when one has no room, the holds and the record
-- are undone. A request id seen before is a duplicate (admitted, nothing changed) only while
-- its record is open, unexpired and bound to the same request (ARGV[3]); otherwise it is a
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
-- KEYS[1]      this request's record on this shard (the home record on the home group's);
--              the shard's indexes are named after its node tag (budget_lib.lua `shard`):
--              on a cluster they are in other hash slots of the same shard
-- ARGV[1]      now (seconds, float)
-- ARGV[2]      expires_at (seconds, float), the record's score in the open or held zset
-- ARGV[3]      the record (see budget_lib.lua), state "o": besides what it keeps for the
--              commit, it names every bucket with its window, limit and estimate, so a
--              bucket travels once (one struct.unpack reads them all, no tonumber)
-- ARGV[4]      packed ">i8i1i1": seconds a held bucket's counters must outlive its TTL
--              (the hold's lifetime); 1 for the optimistic mode (0: reserve); 1 when the
--              record names one bucket more than once
-- ARGV[5]      the plan id of the record's buckets (redis_record.py `plan_id`): a reserve
--              with the plan of one before decodes only the record's head
--              (budget_lib.lua `decode_planned`)
--              (retention of done records, the ledger's TTL and how many expired records
--              to settle are the library's constants: RETENTION, LEDGER_TTL,
--              SETTLE_ON_RESERVE)
-- Returns      {status, number of failed, failed 0-based indices..., spent and reserved
--              of each bucket..., request id, node tags, ...}, one flat list (a nested one
--              costs Redis more to reply); status is "new" (held now), "dup" (already held
--              for this request), "conflict" or "refused"; spent/reserved are after the
--              hold when held now, as seen otherwise; the last names other shards' parts of
--              reservations settled here, for the store to settle.
--
-- A function of budget_lib.lua's library (it uses int, decode, adopt, window_spent, settle, ...).

local rkey = KEYS[1]
local ctx = shard(rkey)
if not CLUSTER then
  ctx.held = ''
end
local now = tonum(ARGV[1])
use_clock(now)
local parts = settle(ctx, ARGV[1], SETTLE_ON_RESERVE)

local hold_for, optimistic, repeats = sunpack('>i8i1i1', ARGV[4])
local rec, nonce = decode_planned(ARGV[3], ARGV[5], optimistic == 0, repeats == 1)
local b = rec.b
local n = #b / 10
-- Every bucket's counters by one MGET when the plan lists them (else one GET each).
local raws = nil
if rec.cks then
  raws = rcall('MGET', tunpack(rec.cks))
end
-- The reply, made at its size (a table grown one entry at a time is reallocated and
-- rehashed at every power of two): status, 0 failed, then the spent and reserved of each
-- entry (`report`); `reply` completes it.
local out = blank(2 + 2 * n)
local function report(j, spent, reserved)
  out[2 * j + 1], out[2 * j + 2] = spent, reserved
end
local function reply(status, failed)
  out[1] = status
  if failed then
    -- Refused: the failed indices go before the rest.
    local head = {status, #failed}
    for f = 1, #failed do
      head[#head + 1] = failed[f]
    end
    for v = 3, 2 + 2 * n do
      head[#head + 1] = out[v]
    end
    out = head
  end
  for p = 1, #parts do
    out[#out + 1] = parts[p]
  end
  return out
end

-- The record goes in first: writing it is the look-up of a repeated request id.
local seen = rpcall('SET', rkey, ARGV[3], 'NX', 'GET')
if seen then
  if type(seen) == 'table' then
    if not sfind(seen.err, 'WRONGTYPE', 1, true) then
      error(seen)
    end
    seen = load(rkey)  -- a record of the earlier layout
  else
    seen = parse(seen)
  end
  for j = 1, n do
    local i = j * 10 - 9
    local s, h, window
    if raws then
      s, h, window = unpack_counters(raws[j])
    else
      s, h, window = read_counters(b[i])
    end
    if s == nil then
      s, h, window = 0, 0, 0
    end
    report(j, window_spent(b[i + 1], b[i + 3], b[i + 4], s, window), h)
  end
  if seen.s == 'open' and seen.x > now and seen.bd == rec.bd then
    return reply('dup')
  end
  return reply('conflict')
end

-- Every bucket is read and judged first; only an admitted request writes (its holds, and
-- counters moved to this window or given a longer life), so a refusal undoes nothing. A
-- bucket named twice is read once: its second hold counts the first (entries naming one
-- bucket share its state, `same`).
local failed = {}
local ks = blank(n)
local same = repeats == 1 and same_keys(b, n)
-- What a bucket's state holds, by position (array slots, not hashed fields): counters
-- key, held, spent in the window, window its counters follow, the window they follow from
-- now on, alive-until, life it needs, made by this call, held by this request.
local CK, HELD, TOTAL, WINDOW, FOLLOWS, ALIVE, LIFE, FRESH, MINE = 1, 2, 3, 4, 5, 6, 7, 8, 9
for j = 1, n do
  local i = j * 10 - 9
  local slot, since = b[i + 3], b[i + 4]
  local hold = b[i + 7]
  local life = b[i + 5] + hold_for
  local first = same and same[j] or j
  local k
  if first == j then
    local ck, hk = b[i], b[i + 1]
    local raw
    if raws then
      raw = raws[j]
    else
      raw = rcall('GET', ck)
    end
    local s, h, window, alive
    local fresh = not raw
    if fresh then
      s, h, window, alive = adopt(ck, hk, slot ~= since, slot, 0, 0, life)
    else
      if #raw < 32 then
        raw = fields(raw, 32)
      end
      s, h, window, alive = sunpack(COUNTERS, raw)
    end
    local total, follows = s, window
    if window ~= since then
      -- Counters about another window than this one (budget_lib.lua `window_spent`).
      total, follows = window_spent(hk, slot, since, s, window)
    end
    k = {ck, h, total, window, follows, alive, life, fresh, 0}
  else
    k = ks[first]
    if life > k[LIFE] then
      k[LIFE] = life
    end
  end
  ks[j] = k
  local h = k[HELD] + k[MINE]
  k[MINE] = k[MINE] + hold
  report(j, k[TOTAL], h + hold)
  if b[i + 8] == 1 then
    local full
    if optimistic == 1 then
      full = k[TOTAL] >= b[i + 9]
    else
      -- Inclusive boundary: exactly reaching the limit is allowed.
      full = k[TOTAL] + h + hold > b[i + 9]
    end
    if full then
      failed[#failed + 1] = j - 1
    end
  end
end

if #failed > 0 then
  -- Reported as seen before this request's holds. A bucket this refusal made from nothing
  -- goes, and so does the record.
  for j = 1, n do
    out[2 * j + 2] = out[2 * j + 2] - b[j * 10 - 2]
    local k = ks[j]
    if (not same or same[j] == j) and k[FRESH] and k[HELD] == 0 and k[TOTAL] == 0 then
      rcall('DEL', k[CK])
    end
  end
  rcall('DEL', rkey)
  return reply('refused', failed)
end

for j = 1, n do
  if not same or same[j] == j then
    local k = ks[j]
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
end

if rec.hm then
  rcall('ZADD', ctx.open, ARGV[2], rkey)
else
  rcall('ZADD', ctx.held, ARGV[2], rkey)
end
if nonce then
  -- Its commit reads it from here (budget_lib.lua `load_known`).
  remember(rkey, rec, nonce)
end
return reply('new')
