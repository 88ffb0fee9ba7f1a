-- budget_lib.lua: helpers shared by reserve.lua, commit.lua, release.lua, settle.lua,
-- settle_part.lua and add_spend.lua.
--
-- Not a script on its own. The store prepends this file to each of those before
-- registering them, because Redis scripts cannot call one another, and settling an expired
-- reservation must behave identically whether reserve.lua or settle.lua does it.
--
-- Budget state is sharded: every bucket's keys carry the bucket owner's hash tag, so
-- buckets spread over a Redis Cluster's shards. A request's buckets are grouped by the
-- shard they live on and each group is reserved by one script on its shard. What a group
-- needs besides its buckets lives under the shard's node tag {T} (a hash tag the client
-- picked because that shard owns its slot): the group's record, the shard's indexes and its
-- ledger. On a cluster the scripts are registered with `allow-cross-slot-keys`, so one
-- script may touch every key of its shard; KEYS only name the {T} keys (one slot, for
-- routing) and bucket keys come in ARGV. On one Redis there is one group, with tag {n0}.
--
-- What a script costs is mostly the commands it calls (0.4-1.5 µs each, more for more
-- fields) and the text it moves into Lua (every string is hashed whole), so the layout
-- gives each step one command:
--
-- Data layout (key names come from sidecar/store/redis_keys.py; Lua derives two: a ledger
-- row's from its hour's index key, and, for the earlier layout's data only, a bucket's
-- counters key from its hash key and back, `rename` below):
--   bucket counters  string of four signed 64-bit fields, read and written with BITFIELD:
--                    #0 spent: a fixed window's spend in slot #2; a rolling window's
--                    running total of its slots >= #2 (its window start);
--                    #1 held: amount reserved by open reservations;
--                    #2 the slot (fixed) or window start (rolling) #0 is about (-1: a
--                    rolling total not summed yet; 0: the key is new);
--                    #3 the Unix second until which the key is kept alive (its TTL is only
--                    touched when that must grow).
--                    A reserve is one BITFIELD per bucket (read spent, take the hold, read
--                    #2 and #3); a commit one (charge #0, release #1, read #2). A fixed
--                    window that moves to its next slot restarts #0; a rolling window's
--                    total is summed afresh from its slot hash (one HGETALL) only when its
--                    start moves.
--   bucket hash      rolling windows only: field "<slot start>" -> amount spent in that
--                    slot, each indexed in the slots zset so settle.lua drops it once dead.
--                    The amounts are in the bucket's measure: µUSD, tokens or requests.
--   group record     string: a JSON array written by the store: state ("o" open, "c"
--                    committed, "x" expired: the one byte a finish rewrites, at offset 2),
--                    estimate, expires_at, binding, 1 for the home group (0 otherwise); for
--                    the home group dims JSON and ledger index key ("" otherwise); hour,
--                    estimated input and output tokens, node tags of the other groups
--                    (comma-separated), request id, created_at; then seven values per
--                    bucket on this shard: counters key, slot, ttl seconds, measure,
--                    estimate in that measure, held of it, and the slot hash key of a
--                    rolling window (0 for a fixed one). Written with SET NX GET: the write
--                    is the look-up of a repeated request id.
--   open zset        home records scored by expires_at; held zset: the other groups' records.
--   slots zset       member "<slot>|<bucket hash key>", score = the slot's expiry (a hash
--                    field has no TTL in 7.0).
--   ledger row       string of five signed 64-bit fields (BITFIELD): cost, requests, input
--                    tokens, output tokens, provider errors, per shard, hour and dims; its
--                    key is the hour's ledger index key, "|", the dims JSON. The index (a
--                    set of dims) and the hours zset are only written when a row is new.
--   hours zset       member = score = an hour holding ledger data on this shard.
--
-- The layout before this one kept a bucket in one hash (slot fields, "r" held, "t"/"f" a
-- running total, "k" alive until), records as hashes and ledger hours as one hash of
-- "<measure>|<dims>" fields. A bucket's counters are made from its hash the first time
-- they are touched (`adopt`), old records are read and settled as they are, and old
-- ledger hashes are still read: an upgrade keeps every window's spend and every hold.
--
-- Numbers: Lua numbers are doubles, so amounts are exact up to 2^53 µUSD (about $9 billion).
-- Every number handed back to Redis goes through int(): Redis may format a double with an
-- exponent, which BITFIELD and EXPIRE refuse.

local function int(n)
  return string.format('%d', n)
end

-- The clock in whole seconds for key lifetimes: the request's own time when the script
-- was given one (use_clock), else the server's, read once per script. A client clock a
-- little off only moves when a TTL is next extended; the TTL itself is relative.
local script_now = nil
local function use_clock(now)
  script_now = math.floor(tonumber(now))
end
local function clock()
  if script_now == nil then
    script_now = tonumber(redis.call('TIME')[1])
  end
  return script_now
end

-- A bucket's counters key from its hash key, "<prefix>b:{o:...}:..." -> "<prefix>c:{o:...}:...",
-- and back (redis_keys.py `counters_key`; the prefix holds no brace, so the first one is the
-- tag's). Only for what the store did not name: records of the earlier layout, and a fixed
-- window's hash when its counters are made.
local function rename(key, kind)
  local brace = string.find(key, '{', 1, true)
  return string.sub(key, 1, brace - 3) .. kind .. string.sub(key, brace)
end
local function counters(hk)
  return rename(hk, 'c:')
end

-- Extend a key's TTL to at least `secs` seconds; never shorten it, never delete the key.
local function keep(key, secs)
  if secs >= 1 and redis.call('TTL', key) < secs then
    redis.call('EXPIRE', key, int(secs))
  end
end

-- Make a counters key live `secs` more seconds unless its alive-until already says so. The
-- TTL is set an eighth longer than needed, so a busy bucket extends it once in a while, not
-- on every request.
local function extend(ck, alive, secs)
  local now = clock()
  if secs < 1 or alive >= now + secs then
    return
  end
  local want = secs + math.floor(secs / 8)
  redis.call('BITFIELD', ck, 'SET', 'i64', '#3', int(now + want))
  redis.call('EXPIRE', ck, int(want))
end

-- Counters a BITFIELD just created (alive-until 0), holding only what that call added
-- (`spent`, `held`): add what the earlier layout kept in the bucket's hash (its hold, and a
-- fixed window's spend in `slot`), drop that from the hash so it never counts twice, and
-- give the key its lifetime. Returns spent, held and the window (#2) as they now are; a
-- rolling window gets window -1, so its total is summed from the slots on the next read.
local function adopt(ck, hk, rolling, slot, spent, held, secs)
  if not rolling then
    hk = rename(ck, 'b:')
  end
  local field = int(slot)
  local old = redis.call('HMGET', hk, 'r', field)
  held = held + tonumber(old[1] or 0)
  if held < 0 then
    -- More released than held: the key was lost under open holds. Never let a negative
    -- hold make room that was not there.
    held = 0
  end
  local window = -1
  if not rolling then
    spent = spent + tonumber(old[2] or 0)
    window = slot
    if old[1] or old[2] then
      redis.call('DEL', hk)
    end
  elseif old[1] then
    redis.call('HDEL', hk, 'r', 't', 'f', 'k')
  end
  local want = secs + math.floor(secs / 8)
  redis.call('BITFIELD', ck, 'SET', 'i64', '#0', int(spent), 'SET', 'i64', '#1', int(held),
             'SET', 'i64', '#2', int(window), 'SET', 'i64', '#3', int(clock() + want))
  redis.call('EXPIRE', ck, int(want))
  return spent, held, window
end

-- Charge a bucket `amount` in `slot` and release `held` of its hold; `ttl`: how long the
-- bucket's data must live from now on. `hk`: a rolling window's slot hash (false for a
-- fixed window).
local function add_bucket(ctx, ck, hk, slot, amount, ttl, held)
  local rolling = hk and true or false
  if rolling and amount ~= 0 then
    local field = int(slot)
    if redis.call('HINCRBY', hk, field, int(amount)) == amount then
      -- A new slot: index it so settle.lua drops it once dead, and let the hash outlive it
      -- (the newest slot dies last). GT keeps the latest expiry.
      redis.call('ZADD', ctx.slots, 'GT', int(slot + ttl), field .. '|' .. hk)
      redis.call('EXPIRE', hk, int(ttl))
    end
  end
  -- Charged and released in one command. Its window (#2) is never 0 once made (a fixed
  -- window's slot; a rolling window's start, or -1 until first summed): 0 is a key this
  -- command just made. Reads and holds made it live past the slot's TTL and the hold's end,
  -- so a charge never has to extend it, except into a new slot.
  local v = redis.call('BITFIELD', ck, 'INCRBY', 'i64', '#0', int(amount),
                       'INCRBY', 'i64', '#1', int(-held), 'GET', 'i64', '#2')
  local window = v[3]
  if window == 0 then
    adopt(ck, hk, rolling, slot, amount, v[2], ttl)
    return
  end
  if slot ~= window and (window > slot or not rolling) then
    if window > slot then
      -- The counters already follow a later slot (fixed) or a later window start
      -- (rolling): this slot is no longer in what #0 sums.
      redis.call('BITFIELD', ck, 'INCRBY', 'i64', '#0', int(-amount))
    else
      -- A fixed window's first spend in a new slot: #0 restarts with it.
      local alive = redis.call('BITFIELD', ck, 'SET', 'i64', '#0', int(amount),
                               'SET', 'i64', '#2', int(slot), 'GET', 'i64', '#3')[3]
      extend(ck, alive, ttl)
    end
  end
  if v[2] < 0 then
    redis.call('BITFIELD', ck, 'SET', 'i64', '#1', '0')
  end
end

-- What a bucket has spent in the window (slot, since), from its counters' #0 and #2 just
-- read; with `move`, moves the counters to this window when they follow an earlier one
-- (kept whatever the decision: the next one reads it).
local function window_spent(ck, hk, slot, since, spent, window, move)
  if slot == since then
    if window < slot then
      if move then
        redis.call('BITFIELD', ck, 'SET', 'i64', '#0', '0', 'SET', 'i64', '#2', int(slot))
      end
      return 0
    end
    return spent
  end
  if window == since then
    return spent
  end
  -- The window start moved (or the total is new): sum the slots still in the window.
  local flat = redis.call('HGETALL', hk)
  local total = 0
  for j = 1, #flat, 2 do
    local s = tonumber(flat[j])
    if s ~= nil and s >= since then
      total = total + tonumber(flat[j + 1])
    end
  end
  if move then
    redis.call('BITFIELD', ck, 'SET', 'i64', '#0', int(total), 'SET', 'i64', '#2', int(since))
  end
  return total
end

-- The ledger as the earlier layout kept it: one hash per hour of "<measure>|<dims>" fields
-- (records written before still book there).
local function add_ledger_hash(ctx, rec, cost, requests, input, output, errors)
  local dims = rec.d
  redis.call('HINCRBY', rec.l, 'c|' .. dims, int(cost))
  local n = redis.call('HINCRBY', rec.l, 'n|' .. dims, int(requests))
  redis.call('HINCRBY', rec.l, 'i|' .. dims, int(input))
  redis.call('HINCRBY', rec.l, 'o|' .. dims, int(output))
  if errors ~= nil and errors > 0 then
    redis.call('HINCRBY', rec.l, 'e|' .. dims, int(errors))
  end
  if n == tonumber(requests) then
    redis.call('ZADD', ctx.hours, rec.hr, rec.hr)
    keep(rec.l, ctx.ledger_ttl)
  end
end

-- Book one exchange (or a correction) in the ledger row of `dims` under `index` (its key:
-- the index key, "|", the dims; redis_keys.py `ledger_row`).
local function add_row(ctx, index, hr, dims, cost, requests, input, output, errors)
  local row = index .. '|' .. dims
  local n
  if errors ~= nil and errors > 0 then
    n = redis.call('BITFIELD', row, 'INCRBY', 'i64', '#0', int(cost), 'INCRBY', 'i64', '#1',
                   int(requests), 'INCRBY', 'i64', '#2', int(input), 'INCRBY', 'i64', '#3',
                   int(output), 'INCRBY', 'i64', '#4', int(errors))[2]
  else
    n = redis.call('BITFIELD', row, 'INCRBY', 'i64', '#0', int(cost), 'INCRBY', 'i64', '#1',
                   int(requests), 'INCRBY', 'i64', '#2', int(input), 'INCRBY', 'i64', '#3',
                   int(output))[2]
  end
  if n == tonumber(requests) then
    -- A new row (or one that only ever held parts): index it, its hour, and give both
    -- their lifetime.
    redis.call('SADD', index, dims)
    redis.call('EXPIRE', index, ctx.ledger_ttl)
    redis.call('EXPIRE', row, ctx.ledger_ttl)
    redis.call('ZADD', ctx.hours, hr, hr)
  end
end

local function add_ledger(ctx, rec, cost, requests, input, output, errors)
  if rec.old then
    add_ledger_hash(ctx, rec, cost, requests, input, output, errors)
  else
    add_row(ctx, rec.li, rec.hr, rec.d, cost, requests, input, output, errors)
  end
end

-- A record of the earlier layout (a hash), as `load` returns records: its bucket entries
-- were [hash key, slot, ttl, measure, estimate, held, 1 rolling | 0 fixed], flat, or older
-- still nested with the window kind unknown (then a bucket whose counters follow that very
-- slot is a fixed window).
local function load_hash(rkey)
  local v = redis.call('HMGET', rkey, 's', 'e', 'b', 'hm', 'd', 'l', 'hr', 'g', 'x', 'id', 'bd')
  if not v[1] then
    return nil
  end
  local list = cjson.decode(v[3])
  local flat = list
  if type(list[1]) == 'table' then
    flat = {}
    for _, e in ipairs(list) do
      for j = 1, 6 do
        flat[#flat + 1] = e[j]
      end
      flat[#flat + 1] = -1
    end
  end
  local b = {'', '', '', '', '', '', '', '', '', '', '', '', ''}
  for i = 1, #flat, 7 do
    local hk, kind = flat[i], flat[i + 6]
    local ck = counters(hk)
    if kind == -1 then
      kind = redis.call('BITFIELD_RO', ck, 'GET', 'i64', '#2')[1] == flat[i + 1] and 0 or 1
    end
    b[#b + 1] = ck
    for j = 1, 5 do
      b[#b + 1] = flat[i + j]
    end
    b[#b + 1] = kind == 1 and hk or 0
  end
  return {s = v[1], e = tonumber(v[2]), b = b, hm = v[4] == '1', d = v[5], l = v[6],
          hr = v[7], g = v[8] or '', x = tonumber(v[9]), id = v[10], bd = v[11], old = true}
end

local STATES = {o = 'open', c = 'committed', x = 'expired'}

-- A group record (see the layout above), or nil when there is none.
local function load(rkey)
  local raw = redis.pcall('GET', rkey)
  if not raw then
    return nil
  end
  if type(raw) == 'table' then
    if string.find(raw.err, 'WRONGTYPE', 1, true) then
      return load_hash(rkey)
    end
    error(raw)
  end
  local t = cjson.decode(raw)
  return {s = STATES[t[1]], e = t[2], x = t[3], bd = t[4], hm = t[5] == 1, d = t[6], li = t[7],
          hr = t[8], g = t[11], id = t[12], b = t}
end

-- The amount of an exchange in one measure (sidecar.store.budget_types.measured).
local function measured(measure, micros, input, output)
  if measure == 'tokens' then
    return input + output
  elseif measure == 'input_tokens' then
    return input
  elseif measure == 'output_tokens' then
    return output
  elseif measure == 'requests' then
    return 1
  end
  return micros
end

-- Replace a group's holds by what the exchange amounted to: `actual(measure, estimate)`
-- gives each bucket's charge; `release` says whether holds are released. The home group
-- also books `delta_cost` in the ledger. `errors` (optional): 1 when the provider answered
-- with an error.
local function charge(ctx, rec, actual, release, delta_cost, requests, input, output, errors)
  local b = rec.b
  for i = 14, #b, 7 do
    local held = 0
    if release then
      held = b[i + 5]
    end
    add_bucket(ctx, b[i], b[i + 6] ~= 0 and b[i + 6], b[i + 1], actual(b[i + 3], b[i + 4]),
               b[i + 2], held)
  end
  if rec.hm then
    add_ledger(ctx, rec, delta_cost, requests, input, output, errors)
  end
end

-- Done records stay a while so late and duplicate completions are recognised.
local function finish(ctx, rkey, rec, state)
  if rec.old then
    redis.call('HSET', rkey, 's', STATES[state])
  else
    redis.call('SETRANGE', rkey, 2, state)  -- the state letter: '["o",...'
  end
  redis.call('EXPIRE', rkey, ctx.retention)
  if rec.hm then
    redis.call('ZREM', ctx.open, rkey)
  else
    redis.call('ZREM', ctx.held, rkey)
  end
end

-- Charge an open record that was never completed its estimate: the request may well
-- have cost money.
local function expire(ctx, rkey, rec)
  charge(ctx, rec, function(_, estimate) return estimate end, true, rec.e, 1, 0, 0)
  finish(ctx, rkey, rec, 'x')
  rec.s = 'expired'
end

-- Charge up to `limit` records of `index` expired at `now` their estimate; returns how
-- many home records (reservations) were settled, and {request id, other parts' node tags}
-- of those with parts on other shards.
local function settle_index(ctx, index, now, limit)
  local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
  local settled, parts = 0, {}
  for _, rkey in ipairs(due) do
    local rec = load(rkey)
    if rec ~= nil and rec.s == 'open' then
      expire(ctx, rkey, rec)
      if rec.hm then
        settled = settled + 1
        if rec.g ~= '' then
          parts[#parts + 1] = rec.id
          parts[#parts + 1] = rec.g
        end
      end
    else
      redis.call('ZREM', index, rkey)
    end
  end
  return settled, parts
end

-- Settle what expired on this shard before a decision reads its buckets; returns
-- {request id, node tags, ...} of other shards' parts of the home records settled, which
-- the store settles next (settle_part.lua).
local function settle(ctx, now, limit)
  local _, parts = settle_index(ctx, ctx.open, now, limit)
  if ctx.held ~= '' then
    -- One Redis has no held index: every group is a home group there.
    settle_index(ctx, ctx.held, now, limit)
  end
  return parts
end
