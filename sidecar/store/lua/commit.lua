-- commit.lua: replace one shard's part of a reservation by the actual amounts, exactly once.
--
-- Each bucket is charged in its measure (budget_lib.lua `measured`): the actual cost, the
-- budget tokens (in ARGV[1]) or the one request.
-- Open record: release the holds and charge the actual amounts ("committed").
-- Expired record (already charged its estimates): charge actual - estimate, so each bucket
-- ends up charged the actual amount ("late"); it counted as a request when it expired.
-- Committed record: change nothing ("duplicate"). No record: "unknown".
-- The home group also books the ledger; its reply names the other groups' shards, which the
-- store then commits the same way (each once, whatever order or however often it is asked).
--
-- Why a script: the state check and the charge must be one atomic step, or two replicas
-- completing the same request (a retried response) would both charge it.
--
-- KEYS[1]   the group record (the store finds the home record's shard by the request id);
--           the shard's indexes are named after its node tag (budget_lib.lua `shard`)
-- ARGV[1]   packed ">i8i8i8i8i8i1": actual cost (µUSD), input tokens (including cache
--           reads and writes) and output tokens for the ledger, input and output tokens
--           charged to token buckets, 1 when the provider answered with an error (counted
--           in the ledger's errors)
-- ARGV[2]   now (seconds, float)
-- ARGV[3]   JSON list of parts booked under other ledger dimensions (an advisor model):
--           [[dims, cost, input, output], ...]; the reservation's own row keeps the rest
-- ARGV[4]   for a home record past its expiry that no sweep settled yet while other shards
--           hold parts: "" to ask (reply "pending", nothing changed: the store commits
--           the other parts first), "1" to settle it first (another part was settled),
--           "0" to commit it as open
--           (retention of done records and the ledger's TTL are the library's constants)
-- Returns   {status, estimate, other groups' node tags (comma-separated)}; estimate is 0
--           when unknown.
--
-- A function of budget_lib.lua's library (it uses int, load_known, charge, add_row, finish, ...).

local rkey = KEYS[1]
local ctx = shard(rkey)
use_clock(ARGV[2])
local rec = load_known(rkey)
if rec == nil then
  return {'unknown', 0, ''}
end
if rec.s == 'committed' then
  return {'duplicate', rec.e, rec.g}
end
if rec.s == 'open' and rec.hm and rec.g ~= '' and rec.x <= tonum(ARGV[2]) then
  -- Past its expiry, and a sweep on another shard may have settled a part of it: the whole
  -- reservation is then expired, as it would be on one Redis where one sweep does all.
  if ARGV[4] == '' then
    return {'pending', rec.e, rec.g}
  elseif ARGV[4] == '1' then
    expire(ctx, rkey, rec)
  end
end

-- Move each part's cost from the reservation's ledger row to the part's own row (its key:
-- the hour's index key, "|", its dims; redis_keys.py `ledger_row`).
local function book_parts()
  if not rec.hm or ARGV[3] == '[]' then
    return
  end
  for _, part in ipairs(jdecode(ARGV[3])) do
    if rec.old then
      rcall('HINCRBY', rec.l, 'c|' .. rec.d, -int(part[2]))
      add_ledger_hash(ctx, {d = part[1], l = rec.l, hr = rec.hr}, part[2], 0, part[3], part[4])
    else
      move_row_cost(rec.li .. '|' .. rec.d, part[2])
      add_row(ctx, rec.li, rec.hr, part[1], part[2], 0, part[3], part[4])
    end
  end
end

local cost, ledger_in, ledger_out, input, output, errors = sunpack('>i8i8i8i8i8i1', ARGV[1])
local actual = measured(cost, input, output)
if rec.s == 'open' then
  charge(ctx, rec, actual, true, cost, 1, ledger_in, ledger_out, errors)
  book_parts()
  finish(ctx, rkey, rec, 'c')
  return {'committed', rec.e, rec.g}
end
-- Expired: it already paid its estimates and counted as a request; charge the difference.
charge(ctx, rec, actual, false, cost - rec.e, 0, ledger_in, ledger_out, errors)
book_parts()
finish(ctx, rkey, rec, 'c')
return {'late', rec.e, rec.g}
