-- commit.lua: replace a request's reservation by its actual amounts, exactly once.
--
-- Each bucket is charged in its measure (budget_lib.lua `measured`): the actual cost, the
-- budget tokens (ARGV[6], ARGV[7]) or the one request.
-- Open reservation: release the holds and charge the actual amounts ("committed").
-- Expired reservation (already charged its estimates): charge actual - estimate, so each
-- bucket ends up charged the actual amount ("late"); it counted as a request when it expired.
-- Committed reservation: change nothing ("duplicate"). No reservation: "unknown".
--
-- Why a script: the state check and the charge must be one atomic step, or two replicas
-- completing the same request (a retried response) would both charge it; and it keeps
-- the completion to one round trip.
--
-- KEYS[1]   the reservation hash
-- KEYS[2]   open-reservations zset
-- KEYS[3]   slot index zset
-- KEYS[4]   ledger hours zset
-- ARGV[1]   actual cost (µUSD integer)
-- ARGV[2]   input tokens (including cache reads and writes)
-- ARGV[3]   output tokens
-- ARGV[4]   ledger hash TTL (seconds)
-- ARGV[5]   retention of done reservations (seconds)
-- ARGV[6]   1 when the provider answered with an error (counted in the ledger's errors)
-- ARGV[7]   JSON list of parts booked under other ledger dimensions (an advisor model):
--           [[dims, cost, input, output], ...]; the reservation's own row keeps the rest
-- ARGV[8]   input tokens charged to token buckets
-- ARGV[9]   output tokens charged to token buckets
-- Returns   {status, estimate}; estimate is 0 when unknown.
--
-- The bucket and ledger keys it also writes are read from the reservation record; they
-- carry the same hash tag as KEYS, so the script stays within one cluster slot.
--
-- Prepended at load time: budget_lib.lua (int, keep, load, charge, finish, ...).

local ctx = {open = KEYS[2], slots = KEYS[3], hours = KEYS[4], ledger_ttl = tonumber(ARGV[4]),
             retention = ARGV[5]}
local rkey = KEYS[1]
local rec = load(rkey)
if rec == nil then
  return {'unknown', 0}
end
if rec.s == 'committed' then
  return {'duplicate', rec.e}
end

-- Move each part's cost from the reservation's ledger row to the part's own row.
local function book_parts()
  for _, part in ipairs(cjson.decode(ARGV[7] or '[]')) do
    redis.call('HINCRBY', rec.l, 'c|' .. rec.d, -int(part[2]))
    add_ledger(ctx, {d = part[1], l = rec.l, hr = rec.hr}, part[2], 0, part[3], part[4])
  end
end

local cost, input, output = tonumber(ARGV[1]), tonumber(ARGV[8]), tonumber(ARGV[9])
local errors = tonumber(ARGV[6] or '0')
local function actual(b)
  return measured(b[5], cost, input, output)
end
if rec.s == 'open' then
  charge(ctx, rec, actual, true, cost, 1, ARGV[2], ARGV[3], errors)
  book_parts()
  finish(ctx, rkey, 'committed')
  return {'committed', rec.e}
end
-- Expired: it already paid its estimates and counted as a request; charge the difference.
local function difference(b)
  return actual(b) - b[6]
end
charge(ctx, rec, difference, false, cost - rec.e, 0, ARGV[2], ARGV[3], errors)
book_parts()
finish(ctx, rkey, 'committed')
return {'late', rec.e}
