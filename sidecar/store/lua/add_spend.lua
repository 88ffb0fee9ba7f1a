-- add_spend.lua: add spend made before a rule existed (backfilled from the ledger) to the
-- slots of that rule's buckets on one shard, once per bucket.
--
-- Why a script: a bucket's once-only marker and its slot increments must land together, or
-- a crash or a second replica doing the same backfill would count the spend twice.
--
-- KEYS[1]   the shard's slot index zset (the other keys, in ARGV, are on the same shard)
-- ARGV      six per entry: marker key (string, set once, never expires), bucket counters
--           key, slot hash key ("" for a fixed window), slot start, amount, TTL seconds;
--           entries of one bucket share its marker
-- Returns   how many buckets got spend added (0: every marker was already set).
--
-- A function of budget_lib.lua's library (it uses int, add_bucket, ...).

local ctx = {slots = KEYS[1]}
local applied, count = {}, 0
for a = 1, #ARGV, 6 do
  local marker, key, hk = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if applied[key] == nil then
    applied[key] = rcall('SET', marker, '1', 'NX') ~= false
    if applied[key] then
      count = count + 1
    end
  end
  if applied[key] then
    add_bucket(ctx, key, hk ~= '' and hk, tonum(ARGV[a + 3]), tonum(ARGV[a + 4]),
               tonum(ARGV[a + 5]), 0)
  end
end
return count
