"""Lua for batches: a finished line counted into its batch (part of every job's FINISH), a
validated batch made runnable, and the fair hand-out of batch lines to the workers.

Batch lines never wait in arq's queue: a line waits in its batch's `pending` list, and a
worker with free slots asks `DISPATCH` for lines, which picks the tenant that is furthest
behind in virtual time (tokens charged), so every tenant's batches progress at the same token
rate whatever their sizes, and a tenant that used more recently yields to one that used less.
Interactive jobs go straight into arq's queue and come first at the upstream permit.
"""

from __future__ import annotations

from moonq.redis_clock import LINES, NOW_MS

# The most a line can cost (and a finished job can charge) its tenant's virtual time, so that
# one absurd request (a `max_tokens` of 10^30 with TPM off) cannot push every tenant's virtual
# time past what a double can still tell apart.
MAX_COST = 10**7

# Shared by FINISH (through BATCH_HOOK) and SETTLE: ending a batch whose last line is over.
# `batch_end(b, now, ttl)` takes the batch as `batch_line` reads it; its writes (HSET, XADD with
# the next id of a log only this code writes, PUBLISH, EXPIRE, ZREM) cannot fail.
BATCH_END = """
local function keep_for(ttl, expires_at, now)
  return tonumber(ttl) + math.max(0, expires_at - now) + 3600
end
local function batch_event(b, kind, data)
  local body = cjson.encode({event = kind, data = data})
  local event = '{"seq":' .. b.seq .. ',' .. string.sub(body, 2)
  redis.call('XADD', b.key .. ':log', '0-' .. b.seq, 'e', event)
  redis.call('HSET', b.key, 'seq', b.seq)
  redis.call('PUBLISH', b.base .. 'events:' .. b.id, event)
end
local function request_counts(b)
  local c = b.counts
  return {total = b.total, completed = c.completed, failed = c.failed,
    cancelled = c.cancelled, expired = c.expired}
end
local function batch_end(b, now, ttl)
  local final = b.ending ~= '' and b.ending or 'completed'
  redis.call('HSET', b.key, 'status', final, final .. '_at', now, 'total', b.total)
  b.seq = b.seq + 1
  batch_event(b, 'done', {status = final, request_counts = request_counts(b)})
  local keep = keep_for(ttl, b.expires_at, now)
  for _, suffix in ipairs({'', ':log', ':lines', ':pending'}) do
    redis.call('EXPIRE', b.key .. suffix, keep)
  end
  redis.call('EXPIRE', b.index, keep)
  redis.call('ZREM', b.base .. 'expiring', b.id)
end
local function batch_of(key, base, index_base, tenant, id)
  local b = redis.call('HMGET', key, 'status', 'total', 'done', 'seq', 'ending',
    'completed', 'failed', 'cancelled', 'expired', 'expires_at')
  if not b[1] then return nil end
  for i = 2, 10 do
    if i ~= 5 and not string.match(b[i] or '0', '^%d+$') then
      return {err = 'ERR moonq: the batch record ' .. key .. ' is malformed'}
    end
  end
  return {key = key, base = base, id = id, status = b[1], total = tonumber(b[2]),
    done = tonumber(b[3] or '0'), seq = tonumber(b[4] or '0'), ending = b[5] or '',
    expires_at = tonumber(b[10] or '0'), index = index_base .. tenant .. ':batch:' .. id,
    counts = {completed = tonumber(b[6] or '0'), failed = tonumber(b[7] or '0'),
      cancelled = tonumber(b[8] or '0'), expired = tonumber(b[9] or '0')}}
end
"""

# Used inside FINISH (scripts.py), which passes: KEYS[5] the scheduler's in-flight set,
# KEYS[6] the tenants' virtual times, KEYS[7] the active tenants; ARGV[1] the tenant index base,
# ARGV[9] the batch key base (`{prefix}:batch:`), ARGV[10] the line's outcome for its batch
# ('' = the job's status; 'expired' for a line its batch's window ended before it ran).
# `batch_line(job, status)` reads (the job's fields through scripts.RECORD's `fields`: FINISH
# reads them ahead) and checks what the batch's update needs, before FINISH's first write: nil
# when the job is not a line of a live batch, a table otherwise, or a table with `err` (FINISH
# then answers an error reply, nothing written) when the batch record is malformed.
# `batch_line_done` then only writes: HINCRBY of checked integer fields, HINCRBYFLOAT of a
# number, HSET, ZADD, ZREM, EXPIRE, XADD with the next id of a log only this code writes
# (after the job's own XADD, the one write that could fail), PUBLISH.
# A tenant's virtual time is charged a line's (capped) estimate when the line is handed out
# (DISPATCH); here it is corrected to the real usage, or refunded for a line that ran and
# produced none; an interactive job's usage is charged when it completes.
BATCH_HOOK = (
    BATCH_END
    + """
local function charge(tenant, delta, now)
  delta = math.max(-$MAX_COST, math.min($MAX_COST, delta))
  if delta == 0 then return end
  redis.call('HINCRBYFLOAT', KEYS[6], tenant, delta)
  redis.call('HSET', KEYS[6] .. ':at', tenant, now)
  if redis.call('ZSCORE', KEYS[7], tenant) then redis.call('ZINCRBY', KEYS[7], delta, tenant) end
end
local function batch_line(job, status)
  local f = fields(job, 'batch_id', 'tenant', 'estimate', 'custom_id', 'id')
  if not f[1] then return nil end
  local b = batch_of(ARGV[9] .. f[1], ARGV[9], ARGV[1], f[2], f[1])
  if not b or b.err then return b end
  b.tenant, b.estimate, b.custom_id, b.job_id = f[2], tonumber(f[3]) or 0, f[4], f[5]
  b.outcome = ARGV[10] ~= '' and ARGV[10] or status
  b.done = b.done + 1
  b.seq = b.seq + 1
  return b
end
local function batch_line_done(b, usage, now, ttl)
  local was_out = redis.call('ZREM', KEYS[5], b.job_id) == 1
  local cost = math.min(b.estimate, $MAX_COST)
  b.counts[b.outcome] = (b.counts[b.outcome] or 0) + 1
  redis.call('HINCRBY', b.key, b.outcome, 1)
  redis.call('HINCRBY', b.key, 'done', 1)
  for name, amount in pairs(usage) do redis.call('HINCRBY', b.key, name, amount) end
  local used = usage['total_tokens']
  if used then
    charge(b.tenant, used - cost, now)
  elseif was_out then  -- it ran and used nothing: its estimate is refunded
    charge(b.tenant, -cost, now)
  end
  local keep = keep_for(ttl, b.expires_at, now)
  batch_event(b, 'line', {custom_id = b.custom_id, job_id = b.job_id,
    status = b.outcome, request_counts = request_counts(b)})
  if b.done >= b.total and (b.status == 'in_progress' or b.status == 'cancelling') then
    batch_end(b, now, ttl)
  end
  return keep
end
"""
).replace("$MAX_COST", str(MAX_COST))

# KEYS: 1 the batch. ARGV: 1 batch id, 2 batch key base, 3 tenant index base, 4 tenant,
# 5 now (s), 6 result ttl. Ends a running or cancelling batch whose lines are all over (the
# last one ended before the batch was running, or a cancel of a batch whose creation died
# counts only the lines written). Returns 1 when it ended the batch, else 0. Checked first;
# then only `batch_end`'s writes.
SETTLE = (
    BATCH_END
    + """
local b = batch_of(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[1])
if not b then return 0 end
if b.err then return redis.error_reply(b.err) end
if b.status == 'cancelling' then
  b.total = math.min(b.total, redis.call('LLEN', KEYS[1] .. ':lines'))
end
if b.done < b.total or (b.status ~= 'in_progress' and b.status ~= 'cancelling') then return 0 end
batch_end(b, ARGV[5], ARGV[6])
return 1
"""
)

# KEYS: 1 the batch, 2 the tenant's line of batches, 3 active tenants, 4 virtual times,
# 5 the virtual clock, 6 batches to watch (by when). ARGV: batch id, tenant, now (s), expires
# at (s), lines written, tokens per second a tenant's lead decays at.
# Makes a validated batch runnable: in progress, in its tenant's line, the tenant active. A
# tenant that was idle re-enters at the clock, never behind it (idling earns no credit), and
# ahead of it only by what it used lately: its lead over the clock decays with time.
# Returns 1, or 0 when the batch is not `validating` (nothing written). Its writes (HSET,
# RPUSH, ZADD of checked numbers) cannot fail on moonq's own keys.
ACTIVATE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'validating' then return 0 end
local now = tonumber(ARGV[3])
local clock = tonumber(redis.call('GET', KEYS[5])) or 0
local vt = tonumber(redis.call('HGET', KEYS[4], ARGV[2])) or 0
local at = tonumber(redis.call('HGET', KEYS[4] .. ':at', ARGV[2])) or now
vt = vt - tonumber(ARGV[6]) * math.max(0, now - at)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[3], 'total', ARGV[5])
redis.call('RPUSH', KEYS[2], ARGV[1])
if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  redis.call('ZADD', KEYS[3], math.max(vt, clock), ARGV[2])
end
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
return 1
"""

# KEYS: 1 active tenants, 2 virtual times, 3 the virtual clock, 4 in-flight lines, 5 arq's
# queue. ARGV: 1 tenant line base (`Keys.sched_base`), 2 batch key base, 3 job key base,
# 4 arq job key base, 5 how many lines the caller can take, 6 the most lines in flight
# account-wide (0 = no cap), 7 arq's job payload with `JOBID` for the job id.
# Hands out up to ARGV[5] lines: each goes into arq's queue (scored LINES: one handed back
# goes after every interactive job, see `redis_clock`) and
# the in-flight set, and its token estimate is charged to its tenant's virtual time. The
# tenant with the lowest virtual time goes first; within a tenant, batches in the order they
# were created. Lines of a batch no longer running (cancelled, expiring) and lines already
# over are dropped from the pending lists (cancel and expiry end them from the batch's full
# list). Returns the ids.
# Bounded: at most ARGV[5] + 64 pops. Writes: LPOP, SET, ZADD, HSET of numbers: cannot fail.
DISPATCH = (
    NOW_MS
    + """
local out = {}
local inflight = redis.call('ZCARD', KEYS[4])
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, 1)) do
  local s = redis.call('HGET', ARGV[3] .. id, 'status')
  if s ~= 'queued' and s ~= 'in_progress' then
    redis.call('ZREM', KEYS[4], id)
    inflight = inflight - 1
  end
end
local want = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])
if cap > 0 then want = math.min(want, cap - inflight) end
local clock = tonumber(redis.call('GET', KEYS[3])) or 0
local steps = 0
while #out < want and steps < want + 64 do
  steps = steps + 1
  local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #top == 0 then break end
  local tenant, vt = top[1], tonumber(top[2])
  local line = ARGV[1] .. tenant
  local batch = redis.call('LINDEX', line, 0)
  if not batch then
    redis.call('ZREM', KEYS[1], tenant)
  else
    local job = redis.call('LPOP', ARGV[2] .. batch .. ':pending')
    if not job then
      redis.call('LPOP', line)
    elseif redis.call('HGET', ARGV[2] .. batch, 'status') ~= 'in_progress'
      or redis.call('HGET', ARGV[2] .. batch, 'ending') then
      redis.call('DEL', ARGV[2] .. batch .. ':pending')
    else
      local rec = redis.call('HMGET', ARGV[3] .. job, 'status', 'estimate')
      if rec[1] == 'queued' then
        redis.call('SET', ARGV[4] .. job, (string.gsub(ARGV[7], 'JOBID', job)))
        redis.call('ZADD', KEYS[5], $LINES, job)
        redis.call('ZADD', KEYS[4], now, job)
        local cost = math.min(tonumber(rec[2]) or 1, $MAX_COST)
        if vt > clock then clock = vt end
        redis.call('ZADD', KEYS[1], vt + cost, tenant)
        redis.call('HSET', KEYS[2], tenant, vt + cost)
        out[#out + 1] = job
      end
    end
  end
end
if #out > 0 then redis.call('SET', KEYS[3], clock) end  -- an idle worker's ask writes nothing
return out
""".replace("$MAX_COST", str(MAX_COST)).replace("$LINES", str(LINES))
)
