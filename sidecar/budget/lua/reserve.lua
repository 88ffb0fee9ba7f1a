-- reserve.lua: admit one request against all its budget buckets, all or nothing.
--
-- Settles up to ARGV[2] expired reservations first (so their estimates count as spent),
-- then, unless the request id was seen before, checks every enforced bucket and, when all
-- have room, records the reservation and holds in every bucket its estimate in that
-- bucket's measure (µUSD, tokens or one request). A request id
-- seen before is a duplicate (admitted, nothing changed) only while its reservation is
-- open, unexpired and bound to the same request (ARGV[13]); otherwise it is a conflict
-- (refused, nothing changed) and the caller decides afresh under a new id.
--
-- Why a script: the read (spent + reserved of every bucket) and the write (the hold) must
-- be one atomic step, or concurrent replicas would each see room and overshoot the limit;
-- and it keeps a budget decision to one round trip.
--
-- KEYS[1]      open-reservations zset
-- KEYS[2]      slot index zset
-- KEYS[3]      ledger hours zset
-- KEYS[4]      this request's reservation hash
-- KEYS[5..]    one bucket hash per bucket, in the request's order (a key may repeat)
-- ARGV[1]      now (seconds, float)
-- ARGV[2]      how many expired reservations to settle first
-- ARGV[3]      estimate (µUSD integer)
-- ARGV[4]      mode: "reserve" or "optimistic"
-- ARGV[5]      expires_at (seconds, float)
-- ARGV[6]      ledger hour of the request (creation time, floored to the hour)
-- ARGV[7]      ledger hash key for that hour
-- ARGV[8]      ledger dims JSON
-- ARGV[9]      buckets record JSON: [[bucket hash key, slot, slot expiry, ttl, measure,
--              estimate in that measure, held of it], ...]
-- ARGV[10]     ledger hash TTL (seconds)
-- ARGV[11]     retention of done reservations (seconds)
-- ARGV[12]     per bucket, as JSON: [[since, limit, enforce 1|0, seconds the hash must
--              live, estimate in the bucket's measure, slot], ...] (one argument, not six per
--              bucket: encoding a command's arguments is most of what a reservation costs
--              the client)
-- ARGV[13]     binding: what the reservation is for (caller, model, provider, amount)
-- ARGV[14]     estimated input tokens
-- ARGV[15]     estimated output tokens
-- Returns      {admitted 1|0, duplicate 1|0, {failed 0-based indices}, {spent}, {reserved},
--              conflict 1|0}
--              spent/reserved are after the hold when admitted, as seen otherwise.
--
-- Prepended at load time: budget_lib.lua (int, read_bucket, extend_bucket, settle, ...).

local ctx = {open = KEYS[1], slots = KEYS[2], hours = KEYS[3], ledger_ttl = tonumber(ARGV[10]),
             retention = ARGV[11]}
settle(ctx, ARGV[1], tonumber(ARGV[2]))

local rkey = KEYS[4]
local n = #KEYS - 4
local per = cjson.decode(ARGV[12])
local spent, reserved, seen_k, writes = {}, {}, {}, {}
for i = 1, n do
  local b = read_bucket(KEYS[4 + i], per[i][6], per[i][1])
  spent[i], reserved[i], seen_k[i], writes[i] = b[1], b[2], b[3], b[4]
end
-- A refreshed running total is kept whatever the decision: the next one reads it.
local function save(i)
  if #writes[i] > 0 then
    redis.call('HSET', KEYS[4 + i], unpack(writes[i]))
  end
end

local seen = redis.call('HMGET', rkey, 's', 'x', 'bd')
if seen[1] then
  for i = 1, n do
    save(i)
  end
  if seen[1] == 'open' and tonumber(seen[2]) > tonumber(ARGV[1]) and seen[3] == ARGV[13] then
    return {1, 1, {}, spent, reserved, 0}
  end
  return {0, 0, {}, spent, reserved, 1}
end

local optimistic = ARGV[4] == 'optimistic'
local failed = {}
for i = 1, n do
  local limit, enforce = per[i][2], per[i][3] == 1
  if enforce then
    local full
    if optimistic then
      full = spent[i] >= limit
    else
      -- Inclusive boundary: exactly reaching the limit is allowed.
      full = spent[i] + reserved[i] + per[i][5] > limit
    end
    if full then
      failed[#failed + 1] = i - 1
    end
  end
end
if #failed > 0 then
  for i = 1, n do
    save(i)
  end
  return {0, 0, failed, spent, reserved, 0}
end

-- Optimistic admission holds nothing back: actuals are charged at commit.
local held = '0'
if not optimistic then
  held = ARGV[3]
end
redis.call('HSET', rkey, 's', 'open', 'e', ARGV[3], 'h', held, 'x', ARGV[5],
           'c', ARGV[1], 'hr', ARGV[6], 'l', ARGV[7], 'd', ARGV[8], 'b', ARGV[9],
           'bd', ARGV[13], 'ti', ARGV[14], 'to', ARGV[15])
redis.call('ZADD', ctx.open, ARGV[5], rkey)
local after = {}
for i = 1, n do
  local hold = 0
  if not optimistic then
    hold = per[i][5]
  end
  local key = KEYS[4 + i]
  local want = nil
  if hold ~= 0 then
    -- HINCRBY, not a write of what was read: a key may repeat within one request.
    redis.call('HINCRBY', key, 'r', int(hold))
    -- The hold must outlive the reservation, or its release would find nothing.
    want = extend_bucket(key, seen_k[i], per[i][4], writes[i])
  end
  save(i)
  if want ~= nil then
    redis.call('EXPIRE', key, int(want))
  end
  after[i] = reserved[i] + hold
end
return {1, 0, {}, spent, after, 0}
