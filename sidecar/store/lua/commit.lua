-- commit.lua: replace one shard's part of a reservation by the actual amounts, exactly once.
--
-- Each bucket is charged in its measure (budget_lib.lua `measured`): the actual cost, the
-- budget tokens (ARGV[12], ARGV[13]) or the one request.
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
-- KEYS[1]   the group record (the store finds the home record's shard by the request id)
-- ARGV[1]   the shard's open zset (home records)
-- ARGV[2]   the shard's held zset (other groups' records)
-- ARGV[3]   the shard's ledger hours zset
-- ARGV[4]   the shard's slot index zset
--           (only KEYS[1] is declared, for routing: on a cluster the others are in other
--           hash slots of the same shard)
-- ARGV[5]   actual cost (µUSD integer)
-- ARGV[6]   input tokens (including cache reads and writes)
-- ARGV[7]   output tokens
-- ARGV[8]   ledger hash TTL (seconds)
-- ARGV[9]   retention of done records (seconds)
-- ARGV[10]  1 when the provider answered with an error (counted in the ledger's errors)
-- ARGV[11]  JSON list of parts booked under other ledger dimensions (an advisor model):
--           [[dims, cost, input, output], ...]; the reservation's own row keeps the rest
-- ARGV[12]  input tokens charged to token buckets
-- ARGV[13]  output tokens charged to token buckets
-- ARGV[14]  now (seconds, float)
-- ARGV[15]  for a home record past its expiry that no sweep settled yet while other shards
--           hold parts: "" to ask (reply "pending", nothing changed: the store commits
--           the other parts first), "1" to settle it first (another part was settled),
--           "0" to commit it as open
-- Returns   {status, estimate, other groups' node tags (comma-separated)}; estimate is 0
--           when unknown.
--
-- A function of budget_lib.lua's library (`commit_one` does the work; commit_many.lua
-- commits a batch of records the same way).

local ctx = {open = ARGV[1], held = ARGV[2], hours = ARGV[3], ledger_ttl = tonum(ARGV[8]),
             retention = ARGV[9], slots = ARGV[4]}
use_clock(ARGV[14])
local status, estimate, tags = commit_one(ctx, KEYS[1], tonum(ARGV[5]), ARGV[6], ARGV[7],
                                          tonum(ARGV[10]), ARGV[11], tonum(ARGV[12]),
                                          tonum(ARGV[13]), tonum(ARGV[14]), ARGV[15])
return {status, estimate, tags}
