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
for _, b in ipairs(cjson.decode(v[3])) do
  if b[6] ~= 0 then
    if redis.call('HINCRBY', b[1], 'r', -b[6]) < 0 then
      redis.call('HSET', b[1], 'r', '0')
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2], KEYS[1])
redis.call('ZREM', ARGV[3], KEYS[1])
return 1
