-- incr.lua: add to a counter that lasts a fixed window from its first increment.
--
-- The counter is a hash: "v" the count, "e" when its window ends (Unix seconds, from the
-- caller's `now` at the first increment). Once `now` reaches "e" the counter starts over.
-- Redis's TTL (the same length) only collects counters nobody increments any more.
--
-- Why a script: reading the window end, resetting and adding must be one step, or two
-- replicas starting a window together would lose each other's increments.
--
-- KEYS[1]   the counter
-- ARGV[1]   the amount to add (an integer)
-- ARGV[2]   the window in seconds (> 0)
-- ARGV[3]   now, Unix seconds
-- ARGV[4]   when a window started now ends (now + ARGV[2], exact: Lua prints numbers
--           with 14 digits)
-- Returns   the count after adding.

local now = tonumber(ARGV[3])
local ends = tonumber(redis.call('HGET', KEYS[1], 'e'))
if ends == nil or ends <= now then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'e', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[1])
end
return redis.call('HINCRBY', KEYS[1], 'v', ARGV[1])
