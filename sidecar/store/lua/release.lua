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
-- A function of budget_lib.lua's library (it uses load, ...).

local rec = load(KEYS[1])
if rec == nil or rec.old or rec.s ~= 'open' or rec.bd ~= ARGV[1] then
  -- Records of the earlier layout were written by another attempt: never this one's.
  return 0
end
local b = rec.b
for i = 1, #b, 10 do
  local held = b[i + 7]
  if held ~= 0 then
    local ck = b[i]
    local _, h = read_counters(ck)
    -- Gone (expired under the hold): nothing left to release.
    if h ~= nil then
      rcall('SETRANGE', ck, '8', spack('>i8', mmax(h - held, 0)))
    end
  end
end
rcall('DEL', KEYS[1])
rcall('ZREM', ARGV[2], KEYS[1])
rcall('ZREM', ARGV[3], KEYS[1])
return 1
