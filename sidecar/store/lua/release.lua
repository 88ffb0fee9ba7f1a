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

local v = redis.call('HMGET', KEYS[1], 's', 'bd', 'b')
if v[1] ~= 'open' or v[2] ~= ARGV[1] then
  return 0
end
local b, current = cjson.decode(v[3]), true
local step = 7  -- flat: key, slot, ttl, measure, estimate, held, rolling (budget_lib.lua)
if type(b[1]) == 'table' then
  current = false  -- written before: a list of [key, slot, ttl, measure, estimate, held, ...]
end
for i = 1, #b, (current and step or 1) do
  local key, held = b[i], b[i + 5]
  if not current then
    key, held = b[i][1], b[i][6]
  end
  if held ~= 0 then
    if redis.call('HINCRBY', key, 'r', -held) < 0 then
      redis.call('HSET', key, 'r', '0')
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2], KEYS[1])
redis.call('ZREM', ARGV[3], KEYS[1])
return 1
