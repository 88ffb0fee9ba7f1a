-- settle.lua: charge one shard's expired records their estimate, and drop its dead budget
-- data.
--
-- Settles up to ARGV[2] home records whose expiry is <= now (oldest first), and names the
-- other shards' parts of those for the store to settle (settle_part.lua); settles other
-- groups' records of this shard that a sweep of their home should have settled long ago
-- (expiry <= ARGV[8]: their home is gone), then removes up to ARGV[6] slot fields of this shard's buckets
-- whose expiry is before int(now) (a hash field has no TTL of its own in Redis 7.0, so the
-- slot index remembers when each one dies), and forgets ledger hours older than the ledger
-- retention (their hashes expire on their own).
--
-- Why a script: settling releases a hold and charges a slot and the ledger; done piecewise,
-- a crash or a concurrent commit in between would charge a request twice or not at all.
--
-- KEYS[1]   the shard's open zset
-- KEYS[2]   the shard's held zset
-- KEYS[3]   the shard's ledger hours zset
-- KEYS[4]   the shard's slot index zset
-- ARGV[1]   now (seconds, float)
-- ARGV[2]   how many expired home records (reservations) to settle at most
-- ARGV[3]   ledger hash TTL (seconds)
-- ARGV[4]   retention of done records (seconds)
-- ARGV[5]   the oldest ledger hour to keep in the hours index
-- ARGV[6]   how many dead slot fields to drop at most
-- ARGV[7]   int(now): slots with expiry < this are dead
-- ARGV[8]   other groups' records expired by then are settled on their own
-- Returns   {reservations (home records) settled, slot fields dropped, {request id, node
--           tags of its other parts (comma-separated), ...}}; a bucket hash left with no
--           slot and no hold is deleted.
--
-- A function of budget_lib.lua's library (it uses settle, ...).

local ctx = {open = KEYS[1], held = KEYS[2], hours = KEYS[3], slots = KEYS[4],
             ledger_ttl = tonum(ARGV[3]), retention = ARGV[4]}
use_clock(ARGV[1])
local settled, parts = settle_index(ctx, ctx.open, ARGV[1], tonum(ARGV[2]), true)
settle_index(ctx, ctx.held, ARGV[8], tonum(ARGV[2]), true)

local dead = rcall('ZRANGEBYSCORE', ctx.slots, '-inf', '(' .. ARGV[7], 'LIMIT', 0,
                        tonum(ARGV[6]))
local touched = {}
for _, member in ipairs(dead) do
  local bar = sfind(member, '|', 1, true)
  local key = ssub(member, bar + 1)
  rcall('HDEL', key, ssub(member, 1, bar - 1))
  rcall('ZREM', ctx.slots, member)
  touched[key] = true
end
-- A bucket left with bookkeeping only (no slot, no hold) is gone, not kept until its TTL.
for key in pairs(touched) do
  if rcall('HLEN', key) <= 4 then
    local live = false
    local flat = rcall('HGETALL', key)
    for i = 1, #flat, 2 do
      local field = flat[i]
      if tonum(field) ~= nil or (field == 'r' and tonum(flat[i + 1]) > 0) then
        live = true
      end
    end
    if not live then
      rcall('DEL', key)
    end
  end
end
rcall('ZREMRANGEBYSCORE', ctx.hours, '-inf', '(' .. ARGV[5])
return {settled, #dead, parts}
