"""Lua for the state changes that must be atomic: each checks the job's state and fences stale
attempts, so a worker that lost its job (or a cancelled one) can never write over the winner."""

from __future__ import annotations

from moonq.batch_lua import BATCH_HOOK
from moonq.redis_clock import FAIR_TOP, HELD, LINES, NOW_MS

TERMINAL_CHECK = """
local function terminal(s) return s == 'completed' or s == 'failed' or s == 'cancelled' end
"""

# A job's status moves between its tenant's status indexes (sorted sets scored by creation
# time, `Keys.tenant_status`): ARGV[1] of every script that uses them is `{prefix}:tenant:`.
# `status_index` reads and checks what the move needs before a script's first write (nil for a
# record without its tenant or creation time); the move itself, a ZADD with a checked score
# then a ZREM, cannot fail.
# `read_record(job, names)` reads a job record's fields in one HMGET and keeps them for the
# rest of the script: `fields(job, ...)` then answers from them as HMGET would (false for a
# field the record lacks), or reads the record itself for a field not read ahead. A script
# reads ahead only what it does not write before it reads it again.
RECORD = """
local UNPACKED = 1000  -- values passed from a list in one call (Lua unpacks ~8,000 at most)
local read_ahead = {}
local function read_record(job, names)
  local values = redis.call('HMGET', job, unpack(names))
  local known = {}
  for i, name in ipairs(names) do known[name] = values[i] end
  read_ahead[job] = known
  return values
end
local function fields(job, ...)
  local known, names, out = read_ahead[job], {...}, {}
  if not known then return redis.call('HMGET', job, ...) end
  for i, name in ipairs(names) do
    if known[name] == nil then return redis.call('HMGET', job, ...) end
    out[i] = known[name]
  end
  return out
end
"""

MOVE_STATUS = (
    RECORD
    + """
local function status_index(job)
  local t = fields(job, 'tenant', 'created_at')
  local score = tonumber(t[2])
  if not t[1] or not score or score ~= score then return nil end
  return {base = ARGV[1] .. t[1] .. ':status:', score = t[2], id = string.match(job, '[^:]+$')}
end
local function move_status(index, from, to)
  redis.call('ZADD', index.base .. to, index.score, index.id)
  if from ~= to then redis.call('ZREM', index.base .. from, index.id) end
  return index.base .. to
end
local function malformed(job)
  return redis.error_reply('ERR moonq: the record ' .. job .. ' is malformed')
end
"""
)


# KEYS: job, tenant index, arq job, arq queue, idempotency key, the tenant's `queued` index,
# the tenant's custom_id index ('' key name when the job has none), the workers' wake-up
# channel (published last: idle workers poll at once, worker/wake.py), the queue's tenants'
# next turns, the latest turn started, the tenant's waiting set (`keys.queue_fair*`), the
# upstream limiter's line (`keys.limit_waiting`).
# ARGV: job id, created (s), job key prefix, arq payload, idempotency ttl (s) or '0', request
# fingerprint, index horizon (s), tenant, then the record's field/value pairs. The job's turn
# (see `redis_clock`) scores its queue entry and is kept in its record as `order`, its place
# at the upstream limiter too. A tenant's next turn is right after the latest of its
# interactive jobs that wait, or after the latest turn started if none waits: the turns of
# its last jobs cancelled before they started are given back, and a new job never goes
# before its tenant's older ones. Those that wait are in its waiting set (KEYS[11],
# `keys.queue_fair_waiting`: each job is added here and taken out by FINISH; one whose turn
# the clock passed has started). This script writes a tenant's next turn as 'N.0', the
# previous release's CREATE (beside this one in a rolling upgrade) as 'N': a tenant whose set
# is not in use yet (jobs queued before it existed), or whose next turn that CREATE wrote
# (jobs the set lacks), takes its next turns in order, none given back, until the clock
# passes its last turn from then (member '~').
# A tenant's next turn after a turn below the clock (the floor below) is past the clock: one
# job at most takes a turn from the limiter's line.
# Writes the record, its index entries and the queue entry together; neither expires until the
# job ends. With an idempotency key already taken by a job that still exists, writes nothing
# and returns "<job id> <fingerprint>" of that first job; else returns ''.
# Cannot fail after its first write: every argument is built by moonq, every key is of the
# type it expects (moonq's own names), and the turns are read first.
CREATE = """
local clock = tonumber(redis.call('GET', KEYS[10])) or 1
local raw_next = redis.call('HGET', KEYS[9], ARGV[8])
local next_turn = tonumber(raw_next) or 1
local known = redis.call('ZSCORE', KEYS[11], '')
local before = known and redis.call('ZSCORE', KEYS[11], '~')
-- this script writes the next turn as 'N.0', the previous release's CREATE as 'N'
local unseen = known and next_turn - 1 > clock and not string.find(raw_next, '%.0$')
if unseen then before = next_turn - 1 end
-- the tenant's latest turn still waiting (markers skipped), or the clock
local last = clock
local top = redis.call('ZREVRANGEBYSCORE', KEYS[11], '+inf',
  '(' .. string.format('%.0f', clock), 'WITHSCORES', 'LIMIT', 0, 2)
for i = 1, #top, 2 do
  if top[i] ~= '~' then last = math.max(last, tonumber(top[i + 1])) break end
end
-- the previous release's CREATE may have set the next turn below the set's latest
if last > clock and next_turn <= last then next_turn = last + 1 end
if not known or (before and tonumber(before) > clock) then
  last = math.max(last, next_turn - 1)  -- jobs the set lacks wait up to here: none given back
end
-- Jobs reach the limiter out of turn (a free permit goes to whichever asks first while
-- nobody waits), so the latest turn started may be ahead of turns still waiting there: a
-- newcomer goes no later than the first of those (a batch line's place is far above every
-- turn; a job queued before turns waits at 0), not behind them all.
local floor = clock
local lowest = tonumber(redis.call('ZRANGEBYSCORE', KEYS[12], 1, '+inf', 'WITHSCORES',
  'LIMIT', 0, 1)[2])
if lowest and lowest < floor then floor = lowest end
local turn = math.max(math.min(next_turn, last + 1), floor)
turn = string.format('%.0f', math.min(turn, $LINES - 1))
if ARGV[5] ~= '0' then
  local first = redis.call('GET', KEYS[5])
  if first and redis.call('EXISTS', ARGV[3] .. string.match(first, '^(%S+)')) == 1 then
    return first
  end
  redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. ARGV[6], 'EX', ARGV[5])
end
local fields = {'order', turn}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
if KEYS[7] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', ARGV[7])
  redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
end
redis.call('SET', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[9], ARGV[8], string.format('%.0f.0', math.max(tonumber(turn), clock) + 1))
if not known then redis.call('ZADD', KEYS[11], '-inf', '') end
if (not known or unseen) and next_turn - 1 > clock then
  redis.call('ZADD', KEYS[11], next_turn - 1, '~')
end
redis.call('ZREMRANGEBYSCORE', KEYS[11], '(-inf', string.format('%.0f', clock))
redis.call('ZADD', KEYS[11], turn, KEYS[1])
redis.call('ZADD', KEYS[4], turn, ARGV[1])
redis.call('PUBLISH', KEYS[8], '')
return ''
""".replace("$LINES", str(LINES))

# KEYS: job, arq's lock on it, the latest turn started (`keys.queue_fair_clock`), and, with a
# lease, the limiter's leases (`keys.limit_leases`). ARGV: status index base, now, worker id,
# lock token ('' = do not check the lock), lock ttl (ms), and optionally the lease of the
# upstream permit the attempt runs under ('' or absent = not checked). Returns {the new attempt
# number, and the record's seq, failures, pauses and last_error as of this start (nil where
# unset)}; or -1 if the job is already over, -2 if it does not exist, -3 if another run holds
# arq's lock (this run lost it in a stall: starting would cut off the holder), -4 if the lease
# is not held (the permit has not been granted: the worker sends this script in the same round
# trip as its ask for the permit, and starts the job again once it holds one). Takes the lock if
# nobody holds it. Moves the latest turn started up to the job's. Everything is read and checked
# first; the writes (SET, the index move, HSET, HSETNX, HINCRBY of a checked integer) cannot
# fail.
START = (
    TERMINAL_CHECK
    + MOVE_STATUS
    + """
-- With what earlier attempts left, as of this start (a run's own earlier read may be stale: a
-- stalled run may have written since); this script writes none of it.
local state = read_record(KEYS[1], {'status', 'attempts', 'order', 'tenant', 'created_at', 'seq',
  'failures', 'pauses', 'last_error'})
if not state[1] then return -2 end
if terminal(state[1]) then return -1 end
local held = ARGV[4] ~= '' and redis.call('GET', KEYS[2])
if held and held ~= ARGV[4] then return -3 end
if (ARGV[6] or '') ~= '' and not redis.call('ZSCORE', KEYS[4], ARGV[6]) then return -4 end
local index = status_index(KEYS[1])
if not index or not string.match(state[2] or '0', '^%d+$') then return malformed(KEYS[1]) end
local turn = tonumber(state[3])
if turn and turn <= (tonumber(redis.call('GET', KEYS[3])) or 0) then turn = nil end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5]) end
if turn then redis.call('SET', KEYS[3], string.format('%.0f', turn)) end
move_status(index, state[1], 'in_progress')
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
local number = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {number, state[6], state[7], state[8], state[9]}
"""
)

# KEYS: job, log, channel of each job (any number of jobs: a worker writes all its running
# jobs' events in one call). ARGV: maxlen, then for each job its attempt, its number of events
# n, and n event bodies (JSON objects without seq). Appends and publishes each job's events with
# its next seqs. Returns one number per job: its last seq; -1 if the attempt is no longer the
# job's live one (superseded, cancelled, finished), nothing written; or, as text, the error
# Redis gave its record's read or an XADD (nothing more written for that job). Like the job,
# the log does not expire before the job ends. The arguments are all checked before the first
# write; a job's record is read and each XADD (the only write that could fail) tried under
# pcall before its PUBLISH, and the record's seq moves once, to the last event that went into
# the log: the two always agree, and one job's failure touches no other job.
APPEND = """
if #KEYS % 3 ~= 0 then return redis.error_reply('APPEND: KEYS come in threes') end
if not string.match(ARGV[1] or '', '^%d+$') then return redis.error_reply('APPEND: bad maxlen') end
local spans, at = {}, 2
for j = 1, #KEYS / 3 do
  local n = tonumber(ARGV[at + 1])
  if not n or n < 0 or n % 1 ~= 0 or at + 1 + n > #ARGV then
    return redis.error_reply('APPEND: malformed arguments')
  end
  for i = at + 2, at + 1 + n do  -- each body a JSON object with a first member
    if string.sub(ARGV[i], 1, 2) ~= '{"' then return redis.error_reply('APPEND: bad event') end
  end
  spans[j] = at
  at = at + 2 + n
end
if at ~= #ARGV + 1 then return redis.error_reply('APPEND: malformed arguments') end
local out = {}
for j = 1, #KEYS / 3 do
  local job, log, channel, a = KEYS[3 * j - 2], KEYS[3 * j - 1], KEYS[3 * j], spans[j]
  local state = redis.pcall('HMGET', job, 'status', 'attempts', 'seq')
  if state.err then  -- not a hash: that job's error alone, as for a refused XADD
    out[j] = state.err
  elseif state[1] ~= 'in_progress' or state[2] ~= ARGV[a] then
    out[j] = -1
  else
    local seq = tonumber(state[3]) or 0
    local first, refused = seq, nil
    for i = a + 2, a + 1 + tonumber(ARGV[a + 1]) do
      local event = '{"seq":' .. (seq + 1) .. ',' .. string.sub(ARGV[i], 2)
      local added = redis.pcall('XADD', log, 'MAXLEN', '~', ARGV[1], '0-' .. (seq + 1), 'e', event)
      if type(added) == 'table' and added.err then
        refused = added.err
        break
      end
      seq = seq + 1
      redis.call('PUBLISH', channel, event)
    end
    if seq > first then redis.call('HSET', job, 'seq', seq) end
    out[j] = refused or seq
  end
end
return out
"""

# The budget holds (`{base}{tenant}:hold:{day|month}`) a job's `hold` field ("tokens nanos day
# month") names that still exist and hold integers: FINISH gives them back. Reads only.
HELD_BACK = """
local function held_back(job, base)
  local found = {}
  local hold, tenant = unpack(fields(job, 'hold', 'tenant'))
  if not hold or not tenant or base == '' then return found end
  local tokens, nanos, day, month = string.match(hold, '^(%d+) (%d+) (%S+) (%S+)$')
  if not tokens or #tokens > 15 or #nanos > 15 then return found end
  found.tokens, found.nanos = tokens, nanos
  for _, period in ipairs({day, month}) do
    local key = base .. tenant .. ':hold:' .. period
    local v = redis.call('HMGET', key, 'tokens', 'nanos')
    if v[1] and string.match(v[1], '^%-?%d+$') and string.match(v[2] or '0', '^%-?%d+$') then
      found[#found + 1] = key
    end
  end
  return found
end
"""

# KEYS: job, log, channel, the tenant's usage of the day, then the scheduler's in-flight set,
# virtual times and active tenants (see batch_lua.BATCH_HOOK), then the metrics hash (every
# ending counted by status, whoever ends the job: a worker, a cancel, a batch's end), then the
# tenant's fair waiting set ('' or none for a batch line: `keys.queue_fair_waiting`).
# ARGV: 1 status index base, 2 attempt ('' = any), 3 status, 4 ttl, 5 maxlen, 6 event body,
# 7 expected seq ('' = any), 8 index horizon (s), 9 batch key base, 10 the line's outcome for
# its batch ('' = the status), 11 number of field pairs N, 12 the usage hash's ttl (s), 13 the
# model the usage is counted under ('' = the record's), 14 the budget holds' base (the job's
# `hold`, moonq/budgets.py, is given back: its real usage now counts instead), N field/value
# pairs, then usage name/amount pairs.
# Moves a live job to a terminal status with its terminal event, and adds its usage to the
# tenant's day (as `model|name`), in one step: a job ends once, so its usage counts once. A
# batch line is counted into its batch in the same step (and the batch ends with its last line).
# The job and its log then expire after ttl. Returns the event's seq; -1 if the job is already over
# (or the attempt is stale), -2 if it is missing, -3 if its log moved past the expected seq.
# Redis does not undo a script's writes when a later command fails, so everything that could
# fail is checked first: ARGV holds the N field pairs it says, every usage amount is a
# non-negative integer and no total can overflow, the record has its tenant and creation
# time, its batch record is well formed (else an error reply, nothing written); and the XADD,
# the one write that could still fail (an id out of order), comes before all the others. Lists
# go to a command at most UNPACKED values at a time (past ~8,000, Lua's `unpack` fails).
# FINISH's body is one function over KEYS and ARGV made locals (its helpers' upvalues too), so
# that END_LINES can run it for many jobs in one call by pointing them at each job's.
_FINISH_FUNCTION = (
    "local KEYS, ARGV = KEYS, ARGV\n"
    + TERMINAL_CHECK
    + MOVE_STATUS
    + HELD_BACK
    + BATCH_HOOK
    + """
local function finish()
local state = read_record(KEYS[1], {'status', 'attempts', 'seq', 'model', 'tenant',
  'created_at', 'hold', 'batch_id', 'estimate', 'custom_id', 'id'})
if not state[1] then return -2 end
if terminal(state[1]) then return -1 end
if ARGV[2] ~= '' and state[2] ~= ARGV[2] then return -1 end
if ARGV[7] ~= '' and state[3] ~= ARGV[7] then return -3 end
local pairs_given = tonumber(ARGV[11])
if not pairs_given or pairs_given < 0 or pairs_given % 1 ~= 0 or 14 + 2 * pairs_given > #ARGV then
  return redis.error_reply('ERR moonq: bad number of field pairs')
end
local last_field = 14 + 2 * pairs_given
local model = ARGV[13] ~= '' and ARGV[13] or state[4] or '?'
local counted = {}
for i = last_field + 1, #ARGV, 2 do counted[#counted + 1] = model .. '|' .. ARGV[i] end
local totals = {}
for first = 1, #counted, UNPACKED do
  local last = math.min(#counted, first + UNPACKED - 1)
  for _, total in ipairs(redis.call('HMGET', KEYS[4], unpack(counted, first, last))) do
    totals[#totals + 1] = total
  end
end
local usage = {}
for i = last_field + 1, #ARGV, 2 do
  local amount = string.match(ARGV[i + 1], '^%d+$') and #ARGV[i + 1] <= 16 and ARGV[i + 1]
  local total = string.match(totals[(i - last_field + 1) / 2] or '0', '^%d+$')
  if not amount or not total or #total > 18 or tonumber(total) + tonumber(amount) >= 9e18 then
    return redis.error_reply('ERR moonq: usage ' .. ARGV[i] .. ' is not a countable amount')
  end
  if ARGV[i] ~= 'jobs' then usage[ARGV[i]] = tonumber(amount) end
end
if not tonumber(ARGV[12]) then return redis.error_reply('ERR moonq: bad usage ttl') end
local holds = held_back(KEYS[1], ARGV[14])
local ended = '["moonq_jobs_finished_total",{"status":"' .. ARGV[3] .. '"}]'
local countable = string.match(redis.call('HGET', KEYS[8], ended) or '0', '^%d+$')
local index = status_index(KEYS[1])
if not index then return malformed(KEYS[1]) end
local line = batch_line(KEYS[1], ARGV[3])
if line and line.err then return redis.error_reply(line.err) end
for name, amount in pairs(line and usage or {}) do  -- the batch's totals cannot overflow either
  local total = string.match(redis.call('HGET', line.key, name) or '0', '^%d+$')
  if not total or #total > 18 or tonumber(total) + amount >= 9e18 then
    return redis.error_reply('ERR moonq: the batch usage ' .. name .. ' is not a countable amount')
  end
end
local seq = (tonumber(state[3]) or 0) + 1
local event = '{"seq":' .. seq .. ',' .. string.sub(ARGV[6], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '0-' .. seq, 'e', event)
local upto = math.min(last_field, 14 + UNPACKED)
redis.call('HSET', KEYS[1], 'seq', seq, 'status', ARGV[3], unpack(ARGV, 15, upto))
for first = upto + 1, last_field, UNPACKED do
  redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(last_field, first + UNPACKED - 1)))
end
for _, key in ipairs(holds) do
  redis.call('HINCRBY', key, 'tokens', -holds.tokens)
  redis.call('HINCRBY', key, 'nanos', -holds.nanos)
end
for i = last_field + 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[4], model .. '|' .. ARGV[i], ARGV[i + 1])
end
if last_field < #ARGV then redis.call('EXPIRE', KEYS[4], ARGV[12]) end
redis.call('ZREMRANGEBYSCORE', move_status(index, state[1], ARGV[3]), '-inf', ARGV[8])
redis.call('PUBLISH', KEYS[3], event)
if countable then redis.call('HINCRBY', KEYS[8], ended, 1) end  -- checked: cannot fail
if KEYS[9] and KEYS[9] ~= '' then redis.call('ZREM', KEYS[9], KEYS[1]) end
local now = tonumber(redis.call('TIME')[1])
local keep = ARGV[4]
if line then
  keep = batch_line_done(line, usage, now, ARGV[4])  -- a line is kept as long as its batch
elseif usage['total_tokens'] then
  local tenant = state[5]  -- as the record now says (a field pair may have set it)
  for i = 15, last_field, 2 do if ARGV[i] == 'tenant' then tenant = ARGV[i + 1] end end
  charge(tenant, usage['total_tokens'], now)
end
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
return seq
end
"""
)
FINISH = _FINISH_FUNCTION + "return finish()\n"

# ARGV: 1 job key base, 2 log base, 3 channel base, 4 the tenant's usage, 5 the scheduler's
# in-flight set, 6 virtual times, 7 active tenants, 8 the metrics hash, 9 a batch's list of
# lines, 10 the first line (0-based), 11 how many, 12 '1' to leave running the lines handed to
# a worker, 13 the number T of FINISH's ARGV, 14..13+T FINISH's ARGV (one set for every job).
# Ends a slice of a batch's lines that have not started, each by FINISH's own step (a
# cancelled or expired batch's lines); returns {lines read, ids of those ended that a worker
# had been handed, ids running (none with ARGV[12])}: the caller takes the first out of arq
# and cancels the others. Each FINISH checks before it writes; an error reply stops the loop
# before the next job's writes.
END_LINES = (
    _FINISH_FUNCTION
    + """
local batch, template = ARGV, {}
for i = 14, 13 + tonumber(batch[13]) do template[#template + 1] = batch[i] end
local first = tonumber(batch[10])
local ids = redis.call('LRANGE', batch[9], first, first + tonumber(batch[11]) - 1)
local keep, handed, running = batch[12] == '1', {}, {}
for _, id in ipairs(ids) do
  local status = redis.call('HGET', batch[1] .. id, 'status')
  if status == 'queued' then
    local out = redis.call('ZSCORE', batch[5], id)
    if not (keep and out) then
      KEYS = {batch[1] .. id, batch[2] .. id, batch[3] .. id, batch[4], batch[5], batch[6],
        batch[7], batch[8]}
      ARGV = template
      local answer = finish()
      if type(answer) == 'table' then return answer end
      if out then handed[#handed + 1] = id end
    end
  elseif status == 'in_progress' and not keep then
    running[#running + 1] = id
  end
end
return {#ids, handed, running}
"""
)

# KEYS: job. ARGV: status index base, attempt, reason, failure budget, the record's counter of
# this hand-back: 'failures' (a failure of the job's, spent against the budget, which must be
# > 0), 'pauses' (the account was paused: neither the job's failure nor an interruption), or
# '' (an interruption: counted by `attempts` alone). Hands a live attempt's job back to the
# queue. Returns 1, 0 when the failure budget is spent (the caller fails the job), or -1 if the
# attempt is no longer the job's live one; an error reply, before any write, on a bad ARGV or a
# counter that is not an integer. Checked first, its writes (HINCRBY of an integer field, HSET,
# the index move) cannot fail.
REQUEUE = (
    MOVE_STATUS
    + """
local budget, counter = tonumber(ARGV[4]), ARGV[5]
local known = counter == '' or counter == 'pauses' or counter == 'failures'
if not budget or not known or (counter == 'failures' and budget <= 0) then
  return redis.error_reply('ERR moonq: bad REQUEUE ARGV')
end
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'failures', 'pauses')
if state[1] ~= 'in_progress' or state[2] ~= ARGV[2] then return -1 end
local index = status_index(KEYS[1])
local count = (counter == 'pauses' and state[4]) or state[3]
if not index or not string.match(count or '0', '^%d+$') then return malformed(KEYS[1]) end
if counter ~= '' then
  local n = redis.call('HINCRBY', KEYS[1], counter, 1)
  if counter == 'failures' and n >= budget then return 0 end
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'last_error', ARGV[3])
move_status(index, 'in_progress', 'queued')
return 1
"""
)

# A job a worker holds is moved out of the due range of arq's queue, down by HELD (score -
# HELD: below every band, where its place is kept), and its lease (when its lock lapses at the
# earliest) kept in the queue's lease set (`keys.queue_leases`). A poll then reads only the
# jobs that wait, however many run; and it first puts back in their place the held jobs whose
# lock lapsed (their worker died or stalled), so that one takes them over. A held job always
# has a lease (whatever takes the lease away puts the job back first); a lease may outlive its
# job's place in the band (a superseded run rescored it), which a poll then drops. A poll of an
# earlier moonq, or arq's own runner, reads held jobs as due (as all running jobs were) and
# takes one only once its lock is gone: a rollback strands nothing.
_HOLD = (
    NOW_MS
    + """
local held_band = $HELD
local function hold(queue, leases, id, score, ttl)
  redis.call('ZADD', queue, string.format('%.0f', tonumber(score) - held_band), id)
  redis.call('ZADD', leases, now + tonumber(ttl), id)
end
local function unhold(queue, leases, id)
  local score = tonumber(redis.call('ZSCORE', queue, id))
  if score and score < 0 then
    redis.call('ZADD', queue, string.format('%.0f', score + held_band), id)
  end
  redis.call('ZREM', leases, id)
end
""".replace("$HELD", str(HELD))
)

# KEYS: arq's queue, its lease set. ARGV: arq's lock key prefix, lock ttl (ms), the worker's
# lock token, then job ids. Takes arq's lock on each due job (by Redis's clock) that nobody
# holds, nor held before (below 0: its lock may have lapsed, the poll puts it back), with SET
# PX naming the worker, and holds it (above), in one round trip for all: arq takes them one
# at a time, a WATCH transaction each. Returns {id, score, id, score, ...} of the jobs
# locked, with their scores in the queue. Reads before each write; SET and ZADD of a number
# cannot fail.
LOCK_DUE = (
    _HOLD
    + """
local taken = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) >= 0 and tonumber(score) <= now
    and redis.call('EXISTS', ARGV[1] .. id) == 0 then
    redis.call('SET', ARGV[1] .. id, ARGV[3], 'PX', ARGV[2])
    hold(KEYS[1], KEYS[2], id, score, ARGV[2])
    taken[#taken + 1] = id
    taken[#taken + 1] = score
  end
end
return taken
"""
)

# A worker's whole poll in one round trip: the held jobs whose lock lapsed put back in their
# place (at most LAPSED_PAGE a poll), arq's read of the due jobs (those due at a time first,
# then those in fair order: see CREATE), the locks on those nobody holds (in that order, up to
# the free slots), held as above, and when the next job not due yet falls due (a deferred
# retry: how long the worker may idle).
# KEYS: arq's queue, its lease set. ARGV: arq's lock key prefix, lock ttl (ms), the worker's
# lock token, how many due jobs (by Redis's clock) to pass over at most, how many to take (the
# worker's free slots), then the jobs this worker runs whose lock may have lapsed (their keeper
# is late): those are passed over, not locked, so that a run that no longer renews can be
# taken over elsewhere (most polls pass none). Returns {{id, score, ...}, ms until the next
# falls due or ''}.
# Held jobs are out of the due range, so the look is spent on jobs that wait; one locked but
# not held (taken back by its stalled run, or by arq's own runner) is passed over by its lock,
# read a page at a time in one MGET. Its numbers are checked before the first write (putting a
# lapsed job back); after that, SET, ZADD and ZREM cannot fail.
TAKE_DUE = (
    _HOLD
    + """
local page, limit, want = 50, tonumber(ARGV[4]), tonumber(ARGV[5])
if not (tonumber(ARGV[2]) and limit and want) then
  return redis.error_reply('ERR moonq: bad TAKE_DUE ARGV')
end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, $LAPSED_PAGE)
for _, id in ipairs(lapsed) do
  local ttl = redis.call('PTTL', ARGV[1] .. id)
  if ttl == -2 then
    unhold(KEYS[1], KEYS[2], id)
  else  -- locked again since (its run took it back): held until that lock lapses
    redis.call('ZADD', KEYS[2], now + math.max(ttl, 0) + 1, id)
  end
end
local taken, passed, mine = {}, 0, {}
for i = 6, #ARGV do mine[ARGV[i]] = true end
local function take(low, high)
  local offset = 0
  while #taken < 2 * want and passed < limit do
    local asked = math.min(page, limit - passed)
    local due = redis.call('ZRANGEBYSCORE', KEYS[1], low, high, 'WITHSCORES',
      'LIMIT', offset, asked)
    if #due == 0 then return end
    local locks = {}
    for i = 1, #due, 2 do locks[#locks + 1] = ARGV[1] .. due[i] end
    local locked = redis.call('MGET', unpack(locks))
    local skipped = 0
    for i = 1, #due, 2 do
      if #taken >= 2 * want then break end
      if not locked[(i + 1) / 2] and not mine[due[i]] then
        redis.call('SET', ARGV[1] .. due[i], ARGV[3], 'PX', ARGV[2])
        hold(KEYS[1], KEYS[2], due[i], due[i + 1], ARGV[2])
        taken[#taken + 1] = due[i]
        taken[#taken + 1] = due[i + 1]
      else
        skipped = skipped + 1
      end
    end
    offset, passed = offset + skipped, passed + skipped  -- those taken left the due range
    if #due / 2 < asked then return end
  end
end
take($FAIR_TOP, now)
take(0, '($FAIR_TOP')
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {taken, later[2] and (tonumber(later[2]) - now) or ''}
""".replace("$LAPSED_PAGE", "100").replace("$FAIR_TOP", str(FAIR_TOP))
)

# KEYS: arq's lock on the job, arq's queue, arq's job, the job, the queue's lease set. ARGV:
# lock ttl (ms), job id, queue score, arq payload, this run's lock token, this run's attempt
# ('' before it starts one).
# Renews the lock (and the job's lease) while this run holds it, and holds the job again if
# a poll put it back meanwhile (its lock lapsed in a stall and this run's START took the free
# lock: the job would otherwise take up each poll's look until it ends). If the lock lapsed
# (a stall) and nobody took it since, takes it back, but only while the job is still this
# run's: queued and not started by it yet (it waits for a permit), or in progress under its
# attempt, and holds it again (a poll may have put it back in its place), so a job that is
# not over is never left without arq's entries.
# Returns 1 when renewed, 2 when taken back, 0 when the job is over, -1 when another run
# holds the lock or has the job (this run is fenced at its next write).
_KEEP_FUNCTION = (
    "local KEYS, ARGV = KEYS, ARGV\n"
    + TERMINAL_CHECK
    + _HOLD
    + """
local function keep()
  -- arq's own runner (its lock "1" names no run) never holds a job: arq's own end of a held
  -- job, deferred, would leave it below 0, due at once, and nothing of arq's drops a lease
  local holds = ARGV[5] ~= '1'
  local held = redis.call('GET', KEYS[1])
  if held == ARGV[5] then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
    local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
    if holds and score and score >= 0 then  -- put back while its lock was free, then taken
      hold(KEYS[2], KEYS[5], ARGV[2], score, ARGV[1])  -- at its start
    else
      redis.call('ZADD', KEYS[5], 'XX', now + tonumber(ARGV[1]), ARGV[2])
    end
    return 1
  end
  if held then return -1 end
  local state = redis.call('HMGET', KEYS[4], 'status', 'attempts')
  if not state[1] or terminal(state[1]) then return 0 end
  local ours = (ARGV[6] == '' and state[1] == 'queued')
    or (state[1] == 'in_progress' and state[2] == ARGV[6])
  if not ours then return -1 end
  local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[1])
  if not holds then
    if not score then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2]) end  -- back in its place
  elseif score and score < 0 then
    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[1]), ARGV[2])
  else  -- put back in its place since, or gone: held again
    hold(KEYS[2], KEYS[5], ARGV[2], score or ARGV[3], ARGV[1])
  end
  redis.call('SET', KEYS[3], ARGV[4], 'NX')
  return 2
end
"""
)
KEEP_LOCK = _KEEP_FUNCTION + "return keep()\n"

# ARGV: lock ttl (ms), arq's lock key prefix, arq's job key prefix, the job key base, arq's
# queue, the queue's lease set, then for each job: its id, queue score, arq payload, the run's
# lock token and attempt ('' before it starts one). KEEP_LOCK for each job in turn, in one
# call for all the running jobs of a worker (`worker.main.LockRenewer`; one call per job each
# beat was a worker's busiest Redis traffic with thousands of long streams). Returns one
# outcome per job, as KEEP_LOCK's, or the error ('ERR ...') that stopped its renewal alone (a
# key of another type: KEEP_LOCK's reads come before its writes). Checks its arguments
# before the first write.
KEEP_LOCKS = (
    _KEEP_FUNCTION
    + """
local batch, out = ARGV, {}
if not tonumber(batch[1]) or (#batch - 6) % 5 ~= 0 then
  return redis.error_reply('ERR moonq: bad KEEP_LOCKS ARGV')
end
for i = 7, #batch, 5 do
  local id = batch[i]
  KEYS = {batch[2] .. id, batch[5], batch[3] .. id, batch[4] .. id, batch[6]}
  ARGV = {batch[1], id, batch[i + 1], batch[i + 2], batch[i + 3], batch[i + 4]}
  local ok, outcome = pcall(keep)  -- a key of another type fails its job's renewal alone
  if not ok and type(outcome) == 'table' then outcome = outcome.err end
  out[#out + 1] = ok and outcome or ('ERR ' .. tostring(outcome))
end
return out
"""
)

# KEYS: arq's lock on the job, arq's job, arq's try counter, arq's abort set, arq's queue, the
# job, the queue's lease set. ARGV: this run's lock token, what arq makes of the run ('1':
# done with the job, '0': run it again, 'force': arq gives up on it), how long (ms, from now
# by Redis's clock) until a job run again falls due ('' = its place in the queue), job id.
# arq's own end of a run, with two rules: the lock is released, and the job put back in its
# place or deferred, only by the run that holds it (deferred also when nobody does): a
# superseded run that ends must not unlock or move the job under the run that took it over;
# and arq forgets a job only once it is over (a run that ends any other way, for whatever
# reason, leaves the job in the queue), unless arq gives up on it, which moonq first records
# as a failure of the job. Its writes cannot fail on arq's own keys.
FINISH_RUN = (
    TERMINAL_CHECK
    + _HOLD
    + """
local delay = tonumber(ARGV[3])
if ARGV[3] ~= '' and not delay then return redis.error_reply('FINISH_RUN: bad delay') end
local holder = redis.call('GET', KEYS[1])
local ours = holder == ARGV[1]
if ours then redis.call('DEL', KEYS[1]) end
local status = redis.call('HGET', KEYS[6], 'status')
if ARGV[2] == 'force' or (ARGV[2] == '1' and (not status or terminal(status))) then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[4])
  redis.call('ZREM', KEYS[5], ARGV[4])
  redis.call('ZREM', KEYS[7], ARGV[4])
elseif delay and (ours or not holder) then  -- never under the run that took the job over
  redis.call('ZADD', KEYS[5], now + delay, ARGV[4])
  redis.call('ZREM', KEYS[7], ARGV[4])
elseif ours then
  unhold(KEYS[5], KEYS[7], ARGV[4])
end
return 1
"""
)

# KEYS: arq's abort set, the workers' wake-up channel. ARGV: job id. Asks the worker holding
# the job to abort it, stamped with Redis's clock (workers drop requests over a minute old by
# it: a host whose clock is behind must not have its cancels dropped unread), and wakes the
# workers to read it at once.
ABORT = (
    NOW_MS
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PUBLISH', KEYS[2], 'abort')
return 1
"""
)

# KEYS: arq's abort set. ARGV: the most age (ms) of a request kept. Drops older ones, by
# Redis's clock: those whose job no worker holds any more would stay for ever.
TRIM_ABORTS = (
    NOW_MS
    + """
return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
"""
)

# KEYS: the queue jobs were put in before the queue was named after MOONQ_KEY_PREFIX
# (`moonq:queue`), this deployment's queue. ARGV: this deployment's job key base, the first
# entry to look at (by rank), how many. Moves this deployment's jobs (those whose record is
# under its prefix) to its queue with their scores; another deployment's stay. Returns {moved,
# looked at}. ZADD and ZREM cannot fail on a sorted set.
MOVE_QUEUED = """
local rows = redis.call('ZRANGE', KEYS[1], ARGV[2], tonumber(ARGV[2]) + tonumber(ARGV[3]) - 1,
  'WITHSCORES')
local moved = 0
for i = 1, #rows, 2 do
  if redis.call('EXISTS', ARGV[1] .. rows[i]) == 1 then
    redis.call('ZADD', KEYS[2], rows[i + 1], rows[i])
    redis.call('ZREM', KEYS[1], rows[i])
    moved = moved + 1
  end
end
return {moved, #rows / 2}
"""
