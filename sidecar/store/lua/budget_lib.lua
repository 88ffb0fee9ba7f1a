-- budget_lib.lua: helpers shared by reserve.lua, commit.lua, commit_many.lua, release.lua,
-- settle.lua, settle_part.lua and add_spend.lua.
--
-- Not a script on its own. Redis scripts cannot call one another, and settling an expired
-- reservation must behave identically whether reserve.lua or settle.lua does it, so the
-- store loads this file and those scripts as one Redis Functions library, each script a
-- function (sidecar/store/redis_functions.py): the helpers are defined once, when the
-- library loads, not again on every call as a prepended script would.
--
-- Budget state is sharded: every bucket's keys carry the bucket owner's hash tag, so
-- buckets spread over a Redis Cluster's shards. A request's buckets are grouped by the
-- shard they live on and each group is reserved by one script on its shard. What a group
-- needs besides its buckets lives under the shard's node tag {T} (a hash tag the client
-- picked because that shard owns its slot): the group's record, the shard's indexes and its
-- ledger. On a cluster the functions are registered with `allow-cross-slot-keys`, so one
-- call may touch every key of its shard; KEYS only name the {T} keys (one slot, for
-- routing) and bucket keys come in the record. On one Redis there is one group, tag {n0}.
--
-- What a script costs is mostly the commands it calls (0.4-1.5 µs each, more for more
-- fields), the strings it makes (Lua interns each one) and the text it parses, so the
-- layout gives each step few, cheap commands and no text to parse:
--
-- Data layout (key names come from sidecar/store/redis_keys.py; Lua derives two: a ledger
-- row's from its hour's index key, and, for the earlier layout's data only, a bucket's
-- counters key from its hash key and back, `rename` below):
--   bucket counters  string of four signed 64-bit fields, big-endian (BITFIELD's i64 #0 to
--                    #3, which the store reads), read with one GET and struct.unpack and
--                    written with one SETRANGE and struct.pack (`read_counters`):
--                    #0 spent: a fixed window's spend in slot #2; a rolling window's
--                    running total of its slots >= #2 (its window start);
--                    #1 held: amount reserved by open reservations;
--                    #2 the slot (fixed) or window start (rolling) #0 is about (-1: a
--                    rolling total not summed yet);
--                    #3 the Unix second until which the key is kept alive (its TTL is only
--                    touched when that must grow).
--                    A reserve reads every bucket, judges, and only when admitted writes
--                    each one once (the hold, and a moved window or a longer life); a
--                    commit reads and writes each once (charge #0, release #1). A fixed
--                    window that moves to its next slot restarts #0; a rolling window's
--                    total is summed afresh from its slot hash (one HGETALL) only when its
--                    start moves.
--   bucket hash      rolling windows only: field "<slot start>" -> amount spent in that
--                    slot, each indexed in the slots zset so settle.lua drops it once dead.
--                    The amounts are in the bucket's measure: µUSD, tokens or requests.
--   group record     bytes packed by the store (redis_record.py) in struct formats (HEAD,
--                    ENTRY below), so one struct.unpack reads it without parsing text: the
--                    state letter ("o" open, "c" committed, "x" expired: the one byte a
--                    finish rewrites), estimate, expires_at, 1 for the home group (0
--                    otherwise), hour, estimated input and output tokens, created_at; the
--                    binding, for the home group dims JSON and ledger index key ("" for the
--                    others), node tags of the other groups (comma-separated), request id;
--                    the number of buckets, then ten fields per bucket on this shard:
--                    counters key, slot hash key of a rolling window ("" for a fixed one),
--                    measure, slot, window start, ttl seconds, estimate in the measure,
--                    held of it, 1 when enforced, limit. Written with SET NX GET: the write
--                    is the look-up of a repeated request id.
--   open zset        home records scored by expires_at rounded up to the second (an
--                    integer score stays an integer in a listpack); held zset: the other
--                    groups' records.
--   slots zset       member "<slot>|<bucket hash key>", score = the slot's expiry (a hash
--                    field has no TTL in 7.0).
--   ledger row       string of five signed 64-bit fields, read and written as counters
--                    are: cost, requests, input tokens, output tokens, provider errors, per
--                    shard, hour and dims; its key is the hour's ledger index key, "|", the
--                    dims JSON. The index (a set of dims) and the hours zset are only
--                    written when a row is new.
--   hours zset       member = score = an hour holding ledger data on this shard.
--
-- Earlier layouts are still read. The one before wrote the same counters and rows (with
-- BITFIELD, which may leave a string shorter than its fields: the rest read as 0) and
-- records as JSON arrays (state, estimate, expires_at, binding, home, dims, ledger index,
-- hour, tokens in and out, other groups, request id, created_at, then seven values per
-- bucket: counters key, slot, ttl, measure, estimate, held, slot hash key or 0): `parse`
-- reads them, `finish` rewrites their state at offset 2. The one before that kept a bucket
-- in one hash (slot fields, "r" held, "t"/"f" a running total, "k" alive until), records as
-- hashes and ledger hours as one hash of "<measure>|<dims>" fields. A bucket's counters are
-- made from its hash the first time they are touched (`adopt`), old records are read and
-- settled as they are, and old ledger hashes are still read: an upgrade keeps every
-- window's spend and every hold.
--
-- Numbers: Lua numbers are doubles, so amounts are exact up to 2^53 µUSD (about $9 billion);
-- struct converts them to and from 64-bit integers exactly. Every number handed to a Redis
-- command goes in as a string (int(), or literal): Redis would format a double itself, with
-- printf (slow), and with an exponent from 1e17, which EXPIRE refuses.

-- Redis's and Lua's library functions, bound as each call begins (`begin`): a library's
-- code cannot reach them while it loads, and a global is looked up by name on every use
-- (a few times what a local costs; there are hundreds of uses in a decision).
local rcall, rpcall, spack, sunpack, tonum, sformat, srep, ssub, sfind, sbyte, floor, mmax
local jdecode
local script_now

-- What every function of the library runs first.
local function begin()
  rcall, rpcall = redis.call, redis.pcall
  spack, sunpack, jdecode = struct.pack, struct.unpack, cjson.decode
  tonum, floor, mmax = tonumber, math.floor, math.max
  sformat, srep, ssub, sfind, sbyte = string.format, string.rep, string.sub, string.find,
                                      string.byte
  -- No clock yet: each call has its own (`use_clock`).
  script_now = nil
end

local function int(n)
  return sformat('%d', n)
end

-- The clock in whole seconds for key lifetimes: the request's own time when the script
-- was given one (use_clock), else the server's, read once per script. A client clock a
-- little off only moves when a TTL is next extended; the TTL itself is relative.
local function use_clock(now)
  script_now = floor(tonum(now))
end
local function clock()
  if script_now == nil then
    script_now = tonum(rcall('TIME')[1])
  end
  return script_now
end

-- A bucket's counters key from its hash key, "<prefix>b:{o:...}:..." -> "<prefix>c:{o:...}:...",
-- and back (redis_keys.py `counters_key`; the prefix holds no brace, so the first one is the
-- tag's). Only for what the store did not name: records of the earlier layout, and a fixed
-- window's hash when its counters are made.
local function rename(key, kind)
  local brace = sfind(key, '{', 1, true)
  return ssub(key, 1, brace - 3) .. kind .. ssub(key, brace)
end
local function counters(hk)
  return rename(hk, 'c:')
end

-- Extend a key's TTL to at least `secs` seconds; never shorten it, never delete the key.
local function keep(key, secs)
  if secs >= 1 and rcall('TTL', key) < secs then
    rcall('EXPIRE', key, int(secs))
  end
end

-- Counters and ledger rows are BITFIELD i64 fields: 8 bytes each, big-endian two's
-- complement. Scripts read them whole with GET and struct.unpack and write them with
-- SETRANGE and struct.pack: a BITFIELD walks each of its fields bit by bit, and costs three
-- times a GET (0.7 against 2.2 µs for a bucket's four fields). struct keeps them exact: it
-- converts between the bytes and a double through a 64-bit integer.
local COUNTERS = '>i8i8i8i8'
local function fields(raw, width)
  if #raw < width then
    -- A BITFIELD ends the string at the last field it wrote; the rest read as 0.
    raw = raw .. srep('\0', width - #raw)
  end
  return raw
end

-- A bucket's counters: spent, held, window, alive-until (nil when the key does not exist).
local function read_counters(ck)
  local raw = rcall('GET', ck)
  if not raw then
    return nil
  end
  local spent, held, window, alive = sunpack(COUNTERS, fields(raw, 32))
  return spent, held, window, alive
end

-- The alive-until that keeps a counters key `secs` more seconds, and the TTL to give it
-- (nil when its alive-until already says so). The TTL is an eighth longer than needed, so
-- a busy bucket extends it once in a while, not on every request.
local function lifetime(alive, secs)
  local now = clock()
  if secs < 1 or alive >= now + secs then
    return nil, nil
  end
  local want = secs + floor(secs / 8)
  return now + want, want
end

-- New counters holding only `spent` and `held` (what the caller adds): add what the
-- earlier layout kept in the bucket's hash (its hold, and a fixed window's spend in
-- `slot`), drop that from the hash so it never counts twice, and write them with their
-- lifetime. Returns spent, held, the window (#2) and alive-until as written; a rolling
-- window gets window -1, so its total is summed from the slots on the next read.
local function adopt(ck, hk, rolling, slot, spent, held, secs)
  if not rolling then
    hk = rename(ck, 'b:')
  end
  local field = int(slot)
  local old = rcall('HMGET', hk, 'r', field)
  held = held + tonum(old[1] or 0)
  if held < 0 then
    -- More released than held: the key was lost under open holds. Never let a negative
    -- hold make room that was not there.
    held = 0
  end
  local window = -1
  if not rolling then
    spent = spent + tonum(old[2] or 0)
    window = slot
    if old[1] or old[2] then
      rcall('DEL', hk)
    end
  elseif old[1] then
    rcall('HDEL', hk, 'r', 't', 'f', 'k')
  end
  local want = mmax(secs + floor(secs / 8), 1)
  local alive = clock() + want
  rcall('SET', ck, spack(COUNTERS, spent, held, window, alive), 'EX', int(want))
  return spent, held, window, alive
end

-- A call that charges many records (commit_many.lua) reads each bucket's counters once and
-- writes them once, when it ends (`write_counters`): ctx.cache maps a counters key to
-- {spent, held, window, alive-until} as the call left them, ctx.dirty lists the keys
-- changed, in the order first changed. Charges the records share (a team's, a model's, the
-- organisation's bucket) then cost one read and one write per call instead of per record.
-- Without ctx.cache (one commit), each read and write goes to Redis at once.
local function cached_counters(cache, ck)
  local c = cache[ck]
  if c == nil then
    local spent, held, window, alive = read_counters(ck)
    if spent == nil then
      return nil
    end
    c = {spent, held, window, alive}
    cache[ck] = c
  end
  return c
end

-- Cached counters `c` of `ck` now hold spent and held (and, when `window` is given, that
-- window and alive-until).
local function cache_put(ctx, ck, c, spent, held, window, alive)
  if not c.dirty then
    c.dirty = true
    ctx.dirty[#ctx.dirty + 1] = ck
  end
  c[1], c[2] = spent, held
  if window ~= nil then
    c[3], c[4] = window, alive
  end
end

-- Write what the cache changed (each key's four fields, in one SETRANGE).
local function write_counters(ctx)
  local cache = ctx.cache
  for _, ck in ipairs(ctx.dirty) do
    local c = cache[ck]
    rcall('SETRANGE', ck, '0', spack(COUNTERS, c[1], c[2], c[3], c[4]))
  end
  ctx.dirty = {}
end

-- Charge a bucket `amount` in `slot` and release `held` of its hold; `ttl`: how long the
-- bucket's data must live from now on. `hk`: a rolling window's slot hash (false for a
-- fixed window).
local function add_bucket(ctx, ck, hk, slot, amount, ttl, held)
  local rolling = hk and true or false
  if rolling and amount ~= 0 then
    local field = int(slot)
    if rcall('HINCRBY', hk, field, int(amount)) == amount then
      -- A new slot: index it so settle.lua drops it once dead, and let the hash outlive it
      -- (the newest slot dies last). GT keeps the latest expiry.
      rcall('ZADD', ctx.slots, 'GT', int(slot + ttl), field .. '|' .. hk)
      rcall('EXPIRE', hk, int(ttl))
    end
  end
  local cache, c = ctx.cache, nil
  local spent, h, window, alive
  if cache == nil then
    spent, h, window, alive = read_counters(ck)
  else
    c = cached_counters(cache, ck)
    if c ~= nil then
      spent, h, window, alive = c[1], c[2], c[3], c[4]
    end
  end
  if spent == nil then
    spent, h, window, alive = adopt(ck, hk, rolling, slot, amount, -held, ttl)
    if cache ~= nil then
      cache[ck] = {spent, h, window, alive}
    end
    return
  end
  h = h - held
  if h < 0 then
    h = 0  -- see adopt
  end
  -- Reads and holds made the counters live past the slot's TTL and the hold's end, so a
  -- charge never has to extend them, except into a new slot.
  if window > slot then
    -- The counters already follow a later slot (fixed) or a later window start
    -- (rolling): this slot is no longer in what #0 sums.
    if held == 0 then
      return
    elseif c ~= nil then
      cache_put(ctx, ck, c, spent, h)
    else
      rcall('SETRANGE', ck, '8', spack('>i8', h))
    end
  elseif window < slot and not rolling then
    -- A fixed window's first spend in a new slot: #0 restarts with it.
    local until_, want = lifetime(alive, ttl)
    if c ~= nil then
      cache_put(ctx, ck, c, amount, h, slot, until_ or alive)
    else
      rcall('SETRANGE', ck, '0', spack(COUNTERS, amount, h, slot, until_ or alive))
    end
    if want then
      rcall('EXPIRE', ck, int(want))
    end
  elseif amount ~= 0 or held ~= 0 then
    -- Charged and released in one write (a rolling window's -1, "not summed yet", takes
    -- the charge too: it is summed afresh anyway).
    if c ~= nil then
      cache_put(ctx, ck, c, spent + amount, h)
    else
      rcall('SETRANGE', ck, '0', spack('>i8i8', spent + amount, h))
    end
  end
end

-- What a bucket has spent in the window (slot, since), from its counters' #0 and #2 just
-- read; and the window (#2) its counters follow from now on: this one when they followed
-- an earlier one (with #0 the amount returned; the caller writes them back).
local function window_spent(hk, slot, since, spent, window)
  if slot == since then
    if window < slot then
      return 0, slot
    end
    return spent, window
  end
  if window == since then
    return spent, window
  end
  -- The window start moved (or the total is new): sum the slots still in the window.
  local flat = rcall('HGETALL', hk)
  local total = 0
  for j = 1, #flat, 2 do
    local s = tonum(flat[j])
    if s ~= nil and s >= since then
      total = total + tonum(flat[j + 1])
    end
  end
  return total, since
end

-- The ledger as the earlier layout kept it: one hash per hour of "<measure>|<dims>" fields
-- (records written before still book there).
local function add_ledger_hash(ctx, rec, cost, requests, input, output, errors)
  local dims = rec.d
  rcall('HINCRBY', rec.l, 'c|' .. dims, int(cost))
  local n = rcall('HINCRBY', rec.l, 'n|' .. dims, int(requests))
  rcall('HINCRBY', rec.l, 'i|' .. dims, int(input))
  rcall('HINCRBY', rec.l, 'o|' .. dims, int(output))
  if errors ~= nil and errors > 0 then
    rcall('HINCRBY', rec.l, 'e|' .. dims, int(errors))
  end
  if n == tonum(requests) then
    rcall('ZADD', ctx.hours, rec.hr, rec.hr)
    keep(rec.l, ctx.ledger_ttl)
  end
end

-- A ledger row's five fields: cost, requests, input and output tokens, errors (nil when
-- there is no row).
local ROW = '>i8i8i8i8i8'
local function read_row(row)
  local raw = rcall('GET', row)
  if not raw then
    return nil
  end
  local cost, requests, input, output, errors = sunpack(ROW, fields(raw, 40))
  return cost, requests, input, output, errors
end

-- Take `cost` off a ledger row (its part booked under other dims).
local function move_row_cost(row, cost)
  local c = read_row(row)
  rcall('SETRANGE', row, '0', spack('>i8', (c or 0) - cost))
end

-- Book one exchange (or a correction) in the ledger row of `dims` under `index` (its key:
-- the index key, "|", the dims; redis_keys.py `ledger_row`).
local function add_row(ctx, index, hr, dims, cost, requests, input, output, errors)
  local row = index .. '|' .. dims
  requests = tonum(requests)
  local c, n, i, o, e = read_row(row)
  local value = spack(ROW, (c or 0) + cost, (n or 0) + requests, (i or 0) + input,
                            (o or 0) + output, (e or 0) + (errors or 0))
  if c then
    rcall('SETRANGE', row, '0', value)
  else
    rcall('SET', row, value)
  end
  if (n or 0) == 0 then
    -- A new row (or one that only ever held parts): index it, its hour, and give both
    -- their lifetime.
    rcall('SADD', index, dims)
    rcall('EXPIRE', index, ctx.ledger_ttl)
    rcall('EXPIRE', row, ctx.ledger_ttl)
    rcall('ZADD', ctx.hours, hr, hr)
  end
end

local function add_ledger(ctx, rec, cost, requests, input, output, errors)
  if rec.old then
    add_ledger_hash(ctx, rec, cost, requests, input, output, errors)
  else
    add_row(ctx, rec.li, rec.hr, rec.d, cost, requests, input, output, errors)
  end
end

-- The bucket entries of a record of an earlier layout (from index 14 of its JSON array:
-- counters key, slot, ttl, measure, estimate, held, slot hash key or 0), as this layout's
-- ten fields; the window start and the limit only matter to the reserve that wrote it.
local function from_json(t)
  local b = {}
  for i = 14, #t, 7 do
    local hk = t[i + 6]
    for _, v in ipairs({t[i], hk ~= 0 and hk or '', t[i + 3], t[i + 1], t[i + 1], t[i + 2],
                        t[i + 4], t[i + 5], 0, 0}) do
      b[#b + 1] = v
    end
  end
  return b
end

-- A record of the earlier layout (a hash), as `load` returns records: its bucket entries
-- were [hash key, slot, ttl, measure, estimate, held, 1 rolling | 0 fixed], flat, or older
-- still nested with the window kind unknown (then a bucket whose counters follow that very
-- slot is a fixed window).
local function load_hash(rkey)
  local v = rcall('HMGET', rkey, 's', 'e', 'b', 'hm', 'd', 'l', 'hr', 'g', 'x', 'id', 'bd')
  if not v[1] then
    return nil
  end
  local list = jdecode(v[3])
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
      kind = rcall('BITFIELD_RO', ck, 'GET', 'i64', '#2')[1] == flat[i + 1] and 0 or 1
    end
    b[#b + 1] = ck
    for j = 1, 5 do
      b[#b + 1] = flat[i + j]
    end
    b[#b + 1] = kind == 1 and hk or 0
  end
  return {s = v[1], e = tonum(v[2]), b = from_json(b), hm = v[4] == '1', d = v[5],
          l = v[6], hr = v[7], g = v[8] or '', x = tonum(v[9]), id = v[10], bd = v[11],
          old = true}
end

local STATES = {o = 'open', c = 'committed', x = 'expired'}

-- The record (see the layout above): its fixed head, then ten fields per bucket. The
-- store writes it with the same formats (redis_store.py `_RECORD_HEAD`, `_RECORD_BUCKET`).
local HEAD = '>c1i8di1i8i8i8di4c0i4c0i4c0i4c0i4c0i2'
local ENTRY = 'i4c0i4c0i4c0i8i8i8i8i8i1i8'
-- The format of n entries, made once per n (a record names at most 32,767 buckets).
local ENTRIES = {}

-- A record of this layout, from its bytes, as `load` returns records.
local function decode(raw)
  local s, e, x, hm, hr, _, _, _, bd, d, li, g, id, n, pos = sunpack(HEAD, raw)
  local b = {}
  if #raw >= pos then
    local format = ENTRIES[n]
    if format == nil then
      format = '>' .. srep(ENTRY, n)
      ENTRIES[n] = format
    end
    b = {sunpack(format, raw, pos)}
    b[#b] = nil  -- the position after the last field
  end
  -- A committed record is its head alone (`finish`): no buckets. raw and hl (the head's
  -- length, its bucket count included) let a reserve remember the record by its head
  -- (`remember`) and a commit write the head back alone.
  return {s = STATES[s], e = e, x = x, bd = bd, hm = hm == 1, d = d, li = li, hr = hr, g = g,
          id = id, b = b, fmt = 'bin', raw = raw, hl = pos - 1}
end

-- A stored record's string: this layout's, or the earlier JSON array (which begins "[").
local function parse(raw)
  if sbyte(raw, 1) ~= 91 then
    return decode(raw)
  end
  local t = jdecode(raw)
  return {s = STATES[t[1]], e = t[2], x = t[3], bd = t[4], hm = t[5] == 1, d = t[6], li = t[7],
          hr = t[8], g = t[11], id = t[12], b = from_json(t), fmt = 'json'}
end

-- A group record (see the layout above), or nil when there is none.
local function load(rkey)
  local raw = rpcall('GET', rkey)
  if not raw then
    return nil
  end
  if type(raw) == 'table' then
    if sfind(raw.err, 'WRONGTYPE', 1, true) then
      return load_hash(rkey)
    end
    error(raw)
  end
  return parse(raw)
end

-- Records this server's reserves wrote lately, decoded, so that their commit need not
-- decode them again (the record is nearly a tenth of a decision's work in Redis): record
-- key -> the record as `decode` made it, with its head as written (rec.head). A commit
-- uses the record only when GETRANGE answers exactly that head (an equal Lua string: interned, so one
-- comparison). The head holds the state letter, estimate, expiry and creation time (to the
-- microsecond), the binding, dims, ledger index, other groups and request id: a record
-- changed since (expired, committed, deleted), or another database's record of the same
-- key name with another head, is decoded from what is stored, as ever. The head alone is
-- read because Lua hashes every byte of a string it receives: the whole record (1-2 KB
-- for a request of 7 buckets) cost more to receive than to decode. At most REMEMBERED
-- records (~3 KB each), then forgotten all at once; a record is forgotten when its commit
-- reads it. A restarted or promoted server, or a library loaded again, starts with none.
local REMEMBERED = 1024
local remembered, remembered_count = {}, 0

local function remember(rkey, raw, rec)
  if remembered_count >= REMEMBERED then
    remembered, remembered_count = {}, 0
  end
  if remembered[rkey] == nil then
    remembered_count = remembered_count + 1
  end
  rec.head = ssub(raw, 1, rec.hl)
  remembered[rkey] = rec
end

-- `load`, from the record remembered when its stored head is still the one written.
local function load_remembered(rkey)
  local rec = remembered[rkey]
  if rec == nil then
    return load(rkey)
  end
  remembered[rkey] = nil
  remembered_count = remembered_count - 1
  if rpcall('GETRANGE', rkey, '0', int(rec.hl - 1)) == rec.head then
    return rec
  end
  return load(rkey)
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

-- What `charge` charges each bucket: its estimate (an expiry), the exchange's amount in
-- the bucket's measure (`measured`), or that amount less the estimate already charged (a
-- late commit).
local ESTIMATE, ACTUAL, DIFFERENCE = 0, 1, 2

-- Replace a group's holds by what the exchange amounted to: per bucket, as `kind` says,
-- from `micros` and the budget tokens `tin`, `tout`; `release` says whether holds are
-- released. The home group also books `delta_cost` in the ledger. `errors` (optional): 1
-- when the provider answered with an error.
local function charge(ctx, rec, kind, micros, tin, tout, release, delta_cost, requests, input,
                      output, errors)
  local b = rec.b
  for i = 1, #b, 10 do
    local held = 0
    if release then
      held = b[i + 7]
    end
    local amount = b[i + 6]
    if kind ~= ESTIMATE then
      local estimate = amount
      amount = measured(b[i + 2], micros, tin, tout)
      if kind == DIFFERENCE then
        amount = amount - estimate
      end
    end
    local hk = b[i + 1]
    add_bucket(ctx, b[i], hk ~= '' and hk, b[i + 3], amount, b[i + 5], held)
  end
  if rec.hm then
    add_ledger(ctx, rec, delta_cost, requests, input, output, errors)
  end
end

-- Done records stay a while (a week) so late and duplicate completions are recognised. A
-- committed record of this layout keeps its head alone: what a repeated commit or request
-- id is answered from (state, estimate, expiry, binding, other groups), a fifth of a
-- 7-bucket record's bytes; its buckets are never read again. It is written as the head
-- with its lifetime (SET EX, the head remembered or cut from the bytes read), then the
-- state letter: as many commands as the state letter and EXPIRE, and no longer string made
-- in Lua. An expired record keeps its buckets: a late commit charges them the difference.
local function finish(ctx, rkey, rec, state)
  if rec.old then
    rcall('HSET', rkey, 's', STATES[state])
  elseif rec.fmt == 'json' then
    rcall('SETRANGE', rkey, '2', state)  -- the state letter: '["o",...'
  else
    if state == 'c' then
      rcall('SET', rkey, rec.head or ssub(rec.raw, 1, rec.hl), 'EX', ctx.retention)
    end
    rcall('SETRANGE', rkey, '0', state)
  end
  if state ~= 'c' or rec.fmt ~= 'bin' then  -- a committed head was SET with its lifetime
    rcall('EXPIRE', rkey, ctx.retention)
  end
  if rec.hm then
    rcall('ZREM', ctx.open, rkey)
  else
    rcall('ZREM', ctx.held, rkey)
  end
end

-- Charge an open record that was never completed its estimate: the request may well
-- have cost money.
local function expire(ctx, rkey, rec)
  charge(ctx, rec, ESTIMATE, 0, 0, 0, true, rec.e, 1, 0, 0)
  finish(ctx, rkey, rec, 'x')
  rec.s = 'expired'
end

-- The earliest expiry each index may hold, as this server's functions last saw it: the
-- smallest score once every record due was settled, lowered by each record indexed since
-- (`note_due`). Nothing is known (nil) until an index was looked at on this server (a new
-- or restarted server, a library reloaded, a promoted replica, whose functions never ran:
-- only their writes were replicated); records only ever leave an index, which never makes
-- the value wrong, only early. It lets a reserve skip the look-up for expired records,
-- which nearly every time finds nothing (on a cluster: two look-ups per shard). Per key
-- name, and only what this library wrote: a Redis holding the same prefix in two
-- databases, or an older version of the library still writing beside this one, may see a
-- reserve skip a record due, which the expiry sweep (settle.lua, which always looks) then
-- settles; its hold counts against its buckets until then, so the delay never lets spend
-- through.
local earliest = {}

local function note_due(index, score)
  local known = earliest[index]
  if known ~= nil and score < known then
    earliest[index] = score
  end
end

-- Charge up to `limit` records of `index` expired at `now` their estimate; returns how
-- many home records (reservations) were settled, and {request id, other parts' node tags}
-- of those with parts on other shards. `look`: look even when nothing is known to be due.
local function settle_index(ctx, index, now, limit, look)
  local known = earliest[index]
  if not look and known ~= nil and known > tonum(now) then
    return 0, {}
  end
  local due = rcall('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
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
      rcall('ZREM', index, rkey)
    end
  end
  if #due < limit then
    -- Every record due is settled: what is left is due later, from its first.
    local first = rcall('ZRANGE', index, 0, 0, 'WITHSCORES')
    earliest[index] = first[2] and tonum(first[2]) or math.huge
  else
    earliest[index] = nil
  end
  return settled, parts
end

-- Settle what expired on this shard before a decision reads its buckets; returns
-- {request id, node tags, ...} of other shards' parts of the home records settled, which
-- the store settles next (settle_part.lua).
local function settle(ctx, now, limit)
  local _, parts = settle_index(ctx, ctx.open, now, limit, false)
  if ctx.held ~= '' then
    -- One Redis has no held index: every group is a home group there.
    settle_index(ctx, ctx.held, now, limit, false)
  end
  return parts
end

-- Commit one record `rkey` (commit.lua says how, and what each argument is: `cost` ARGV[5],
-- ledger tokens `input`, `output` ARGV[6], ARGV[7], `errors` ARGV[10], `booked` ARGV[11],
-- budget tokens `budget_in`, `budget_out` ARGV[12], ARGV[13], `now` ARGV[14], `pending`
-- ARGV[15]); returns the status, the estimate and the other groups' node tags.
local function commit_one(ctx, rkey, cost, input, output, errors, booked, budget_in, budget_out,
                          now, pending)
  local rec = load_remembered(rkey)
  if rec == nil then
    return 'unknown', 0, ''
  end
  if rec.s == 'committed' then
    return 'duplicate', rec.e, rec.g
  end
  if rec.s == 'open' and rec.hm and rec.g ~= '' and rec.x <= now then
    -- Past its expiry, and a sweep on another shard may have settled a part of it: the
    -- whole reservation is then expired, as it would be on one Redis where one sweep does
    -- all.
    if pending == '' then
      return 'pending', rec.e, rec.g
    elseif pending == '1' then
      expire(ctx, rkey, rec)
    end
  end
  local state = 'committed'
  if rec.s == 'open' then
    charge(ctx, rec, ACTUAL, cost, budget_in, budget_out, true, cost, 1, input, output, errors)
  else
    -- Expired: it already paid its estimates and counted as a request; charge the
    -- difference.
    charge(ctx, rec, DIFFERENCE, cost, budget_in, budget_out, false, cost - rec.e, 0, input,
           output, errors)
    state = 'late'
  end
  -- Move each part's cost from the reservation's ledger row to the part's own row (its
  -- key: the hour's index key, "|", its dims; redis_keys.py `ledger_row`).
  if rec.hm and booked ~= '[]' then
    for _, part in ipairs(jdecode(booked)) do
      if rec.old then
        rcall('HINCRBY', rec.l, 'c|' .. rec.d, -int(part[2]))
        add_ledger_hash(ctx, {d = part[1], l = rec.l, hr = rec.hr}, part[2], 0, part[3], part[4])
      else
        move_row_cost(rec.li .. '|' .. rec.d, part[2])
        add_row(ctx, rec.li, rec.hr, part[1], part[2], 0, part[3], part[4])
      end
    end
  end
  finish(ctx, rkey, rec, 'c')
  return state, rec.e, rec.g
end
