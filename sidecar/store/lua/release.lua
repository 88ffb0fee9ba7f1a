-- release.lua: undo one shard's hold of a request that another shard refused.
--
-- Only a record this very attempt wrote is released (still open, same binding): it is
-- deleted with its holds, as if the request had never been reserved here, and charges
-- nothing (the request never reached a provider).
--
-- Why a script: the holds and the record must go together, or a crash in between would
-- leave holds nobody releases (or a record whose expiry charges a refused request).
--
-- KEYS[1]   the group record
-- ARGV[1]   binding of the attempt
-- ARGV[2]   the shard's open zset
-- ARGV[3]   the shard's held zset
-- Returns   1 when released, 0 when there was nothing of this attempt's to release.
--
-- A function of budget_lib.lua's library (it uses load, read_groups, put, flush, ...).

local rec = load(KEYS[1])
if rec == nil or rec.old or rec.s ~= 'open' or rec.bd ~= ARGV[1] then
  -- Records of the earlier layout were written by another attempt: never this one's.
  return 0
end
local b = rec.b
read_groups(b, 1, 11)
for i = 1, #b, 11 do
  local held = b[i + 8]
  if held ~= 0 then
    local e, hk = (i - 1) / 11 + 1, b[i + 2]
    local s, h, window, alive = bucket_counters(e, hk, hk ~= '', b[i + 4], b[i + 6])
    -- Gone (expired under the hold): nothing left to release.
    if s ~= nil then
      put(e, s, mmax(h - held, 0), window, alive)
    end
  end
end
flush()
rcall('DEL', KEYS[1])
rcall('ZREM', ARGV[2], KEYS[1])
rcall('ZREM', ARGV[3], KEYS[1])
return 1
