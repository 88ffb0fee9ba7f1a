-- settle_part.lua: charge one shard's part of an expired reservation its estimate, once.
--
-- settle.lua settles a home record and names its parts on other shards; the store then
-- runs this on each of them. A part already settled (by a decision on its shard) or
-- committed is left alone.
--
-- Why a script: releasing the hold and charging the slots must be one step, and must not
-- happen twice.
--
-- KEYS[1]   the part's record
-- ARGV[1]   the shard's open zset
-- ARGV[2]   the shard's held zset
-- ARGV[3]   the shard's ledger hours zset
-- ARGV[4]   the shard's slot index zset
-- ARGV[5]   now (seconds, float)
-- ARGV[6]   retention of done records (seconds)
-- Returns   1 when settled now, 0 otherwise.
--
-- A function of budget_lib.lua's library (it uses load, expire, ...).

local ctx = {open = ARGV[1], held = ARGV[2], hours = ARGV[3], slots = ARGV[4],
             ledger_ttl = 0, retention = ARGV[6]}
use_clock(ARGV[5])
local rec = load(KEYS[1])
if rec == nil or rec.s ~= 'open' or rec.hm or rec.x > tonum(ARGV[5]) then
  return 0
end
expire(ctx, KEYS[1], rec)
return 1
