-- list_docs.lua: every live document of one collection.
--
-- Reads the collection's index set and the documents it names, and drops index members
-- whose document Redis has collected (its TTL ran out) or that vanished. Documents are
-- returned as stored: the caller skips those whose stored expiry its `now` has reached
-- (see swap_doc.lua for the format).
--
-- Why a script: pruning must see the same state as the read; done from the client, a
-- document written between the read and the prune would lose its index entry.
--
-- KEYS[1]   the collection's index set (members are document keys, all with the same
--           hash tag as KEYS[1], so the script stays within one cluster slot)
-- ARGV      none
-- Returns   a flat list {doc key, value, doc key, value, ...}, unordered.

local members = redis.call('SMEMBERS', KEYS[1])
local out = {}
for _, key in ipairs(members) do
  local doc = redis.call('GET', key)
  if doc == false then
    redis.call('SREM', KEYS[1], key)
  else
    out[#out + 1] = key
    out[#out + 1] = doc
  end
end
return out
