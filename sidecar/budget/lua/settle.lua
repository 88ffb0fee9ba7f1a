-- settle.lua: charge expired reservations their estimate, and drop dead budget data.
--
-- Settles up to ARGV[2] reservations whose expiry is <= now (oldest first), then removes up
-- to ARGV[4] slot fields whose expiry is before int(now) (a hash field has no TTL of its
-- own in Redis 7.0, so the slot index zset remembers when each one dies), and forgets
-- ledger hours older than the ledger retention (their hashes expire on their own).
--
-- Why a script: settling releases a hold and charges a slot and the ledger; done piecewise,
-- a crash or a concurrent commit in between would charge a request twice or not at all.
--
-- KEYS[1]   open-reservations zset
-- KEYS[2]   slot index zset
-- KEYS[3]   ledger hours zset
-- ARGV[1]   now (seconds, float)
-- ARGV[2]   how many expired reservations to settle at most
-- ARGV[3]   int(now): slots with expiry < this are dead
-- ARGV[4]   how many dead slot fields to drop at most
-- ARGV[5]   ledger hash TTL (seconds)
-- ARGV[6]   retention of done reservations (seconds)
-- ARGV[7]   the oldest ledger hour to keep in the hours index
-- Returns   {reservations settled, slot fields dropped}; a bucket hash left with no slot
--           and no hold is deleted.
--
-- Prepended at load time: budget_lib.lua (settle, ...).

local ctx = {open = KEYS[1], slots = KEYS[2], hours = KEYS[3], ledger_ttl = tonumber(ARGV[5]),
             retention = ARGV[6]}
local settled = settle(ctx, ARGV[1], tonumber(ARGV[2]))

local dead = redis.call('ZRANGEBYSCORE', ctx.slots, '-inf', '(' .. ARGV[3], 'LIMIT', 0,
                        tonumber(ARGV[4]))
local touched = {}
for _, member in ipairs(dead) do
  local bar = string.find(member, '|', 1, true)
  local key = string.sub(member, bar + 1)
  redis.call('HDEL', key, string.sub(member, 1, bar - 1))
  redis.call('ZREM', ctx.slots, member)
  touched[key] = true
end
-- A bucket left with bookkeeping only (no slot, no hold) is gone, not kept until its TTL.
for key in pairs(touched) do
  if redis.call('HLEN', key) <= 4 then
    local live = false
    local flat = redis.call('HGETALL', key)
    for i = 1, #flat, 2 do
      local field = flat[i]
      if tonumber(field) ~= nil or (field == 'r' and tonumber(flat[i + 1]) > 0) then
        live = true
      end
    end
    if not live then
      redis.call('DEL', key)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', ctx.hours, '-inf', '(' .. ARGV[7])
return {settled, #dead}
