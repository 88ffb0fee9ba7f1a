-- commit_many.lua: commit a batch of home records of one shard, each exactly once, as
-- commit.lua would one after another.
--
-- An access log batch brings the charges of many requests at once, and most of their
-- buckets are shared (a team's, a model's, the organisation's): one call reads each bucket's
-- counters once and writes them once at the end (budget_lib.lua `cached_counters`), where a
-- commit per record reads and writes each shared bucket again for every record. Records,
-- slot hashes and ledger rows are written as commit.lua writes them.
--
-- Should a command fail part-way (a record key of a foreign type, memory refused), what the
-- records before it changed is written before the error is raised, so each record of the
-- batch is either wholly committed, or changed no more than a failing commit.lua would
-- change it; the store repeats the batch, and a committed record is then a duplicate.
--
-- On a cluster, the records of one shard: home records, whose other parts the store then
-- commits with commit.lua, as it does after commit.lua commits a home record.
--
-- KEYS       the records
-- ARGV[1]    the open zset
-- ARGV[2]    the held zset ("" on one Redis)
-- ARGV[3]    the ledger hours zset
-- ARGV[4]    the slot index zset
-- ARGV[5]    ledger TTL (seconds)
-- ARGV[6]    retention of done records (seconds)
-- ARGV[7]    now (seconds, float)
-- ARGV[8]    commit.lua's ARGV[15] for every record ("0" on one Redis; "" on a cluster: a
--            home record past its expiry with parts elsewhere is answered "pending")
-- then, per record, two values:
--            its numbers, packed as big-endian signed integers (struct '>i8i8i8i1i8i8': one
--            argument is cheaper to receive than six, and a number read by struct costs a
--            third of one parsed by tonumber): the actual cost, ledger input and output
--            tokens, 1 when the provider answered with an error, budget input and output
--            tokens (commit.lua's ARGV[5] to ARGV[7], ARGV[10], ARGV[12] and ARGV[13]);
--            the parts booked under other dimensions (commit.lua's ARGV[11])
-- Returns    {status, estimate, node tags, ...}: commit.lua's reply for each record, in order
--
-- A function of budget_lib.lua's library (`commit_one`, `write_counters`).

local ctx = {open = ARGV[1], held = ARGV[2], hours = ARGV[3], slots = ARGV[4],
             ledger_ttl = tonum(ARGV[5]), retention = ARGV[6], cache = {}, dirty = {}}
use_clock(ARGV[7])
local now = tonum(ARGV[7])
local NUMBERS = '>i8i8i8i1i8i8'
local out = {}
for k = 1, #KEYS do
  local a = 7 + k * 2
  local cost, input, output, errors, budget_in, budget_out = sunpack(NUMBERS, ARGV[a])
  local ok, status, estimate, tags = pcall(commit_one, ctx, KEYS[k], cost, input, output,
                                           errors, ARGV[a + 1], budget_in, budget_out, now, ARGV[8])
  if not ok then
    write_counters(ctx)
    error(status)
  end
  out[#out + 1] = status
  out[#out + 1] = estimate
  out[#out + 1] = tags
end
write_counters(ctx)
return out
