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
-- Prepended at load time: budget_lib.lua (load, ...).

local rec = load(KEYS[1])
if rec == nil or rec.old or rec.s ~= 'open' or rec.bd ~= ARGV[1] then
  -- Records of the earlier layout were written by another attempt: never this one's.
  return 0
end
local b = rec.b
for i = 14, #b, 7 do
  local held = b[i + 5]
  if held ~= 0 then
    local ck = b[i]
    local v = redis.call('BITFIELD', ck, 'INCRBY', 'i64', '#1', int(-held), 'GET', 'i64', '#3')
    if v[2] == 0 then
      redis.call('DEL', ck)  -- lost under the hold: this call made it afresh
    elseif v[1] < 0 then
      redis.call('BITFIELD', ck, 'SET', 'i64', '#1', '0')
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2], KEYS[1])
redis.call('ZREM', ARGV[3], KEYS[1])
return 1
