-- add_spend.lua: add spend made before a rule existed (backfilled from the ledger) to the
-- slots of that rule's buckets on one shard, once per bucket.
--
-- Why a script: a bucket's once-only marker and its slot increments must land together, or
-- a crash or a second replica doing the same backfill would count the spend twice.
--
-- KEYS[1]   the shard's slot index zset (the other keys, in ARGV, are on the same shard)
-- ARGV      seven per entry: marker key (string, set once, never expires), the bucket's
--           group key and field, slot hash key ("" for a fixed window), slot start, amount,
--           TTL seconds; entries of one bucket share its marker
-- Returns   how many buckets got spend added (0: every marker was already set).
--
-- A function of budget_lib.lua's library (it uses int, read_groups, add_bucket, flush, ...).

local ctx = {slots = KEYS[1]}
read_groups(ARGV, 2, 7)
local applied, count = {}, 0
for a = 1, #ARGV, 7 do
  local marker, hk = ARGV[a], ARGV[a + 3]
  if applied[marker] == nil then
    applied[marker] = rcall('SET', marker, '1', 'NX') ~= false
    if applied[marker] then
      count = count + 1
    end
  end
  if applied[marker] then
    add_bucket(ctx, (a - 1) / 7 + 1, hk ~= '' and hk, tonum(ARGV[a + 4]), tonum(ARGV[a + 5]),
               tonum(ARGV[a + 6]), 0)
  end
end
flush()
return count
