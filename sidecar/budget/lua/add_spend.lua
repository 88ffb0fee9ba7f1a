-- add_spend.lua: add spend made before a rule existed (backfilled from the ledger) to the
-- slots of that rule's buckets, once.
--
-- Why a script: the once-only marker and every slot increment must land together, or a
-- crash or a second replica doing the same backfill would count the spend twice.
--
-- KEYS[1]   the backfill marker (string; set once, never expires)
-- KEYS[2]   slot index zset
-- KEYS[3..] bucket hashes, one per entry
-- ARGV      four per entry, in KEYS order: slot start, amount (µUSD), slot expiry, TTL
-- Returns   1 when the spend was added, 0 when the marker was already set.
--
-- Prepended at load time: budget_lib.lua (int, keep, add_slot, ...).

if not redis.call('SET', KEYS[1], '1', 'NX') then
  return 0
end
local ctx = {slots = KEYS[2]}
for i = 3, #KEYS do
  local base = (i - 3) * 4
  add_slot(ctx, KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
           tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]))
end
return 1
