-- swap_doc.lua: compare-and-set one JSON document.
--
-- Replaces the document by ARGV[3] (or deletes it) only when its current value equals
-- ARGV[1]. Documents are stored as canonical JSON (sorted keys, compact separators), so
-- equal documents are equal strings; note 1 and 1.0 are then different values. A document
-- with a TTL is stored as "x<expires at>\n<JSON>": it is absent once the caller's `now`
-- (ARGV[5]) has reached that time, whatever Redis's own clock says. Values without the
-- prefix (no TTL, or written before expiries were stored) never expire logically.
--
-- Why a script: the comparison and the write must be atomic (a device code may be
-- redeemed once), and the collection index must change together with the document.
--
-- KEYS[1]   the document key
-- KEYS[2]   the collection's index set (members are document keys)
-- ARGV[1]   the expected document, canonical JSON; "" means "must be absent"
-- ARGV[2]   "1" if a new document is given, "0" to delete
-- ARGV[3]   the new value as stored (with its expiry prefix when it has a TTL)
-- ARGV[4]   TTL in seconds for the new document, for Redis to collect it; "" for none
-- ARGV[5]   now, Unix seconds
-- Returns   1 if swapped, 0 if the current value did not match.

local current = redis.call('GET', KEYS[1])
if current == false then
  current = ''
elseif string.sub(current, 1, 1) == 'x' then
  local newline = string.find(current, '\n', 1, true)
  local expires = tonumber(string.sub(current, 2, newline - 1))
  if expires <= tonumber(ARGV[5]) then
    current = ''
  else
    current = string.sub(current, newline + 1)
  end
end
if current ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], KEYS[1])
elseif ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('SADD', KEYS[2], KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  redis.call('SADD', KEYS[2], KEYS[1])
end
return 1
