"""Lua for batches: a finished line counted into its batch (part of every job's FINISH), a
validated batch made runnable, and the fair hand-out of batch lines to the workers.

Batch lines never wait in arq's queue: a line waits in its batch's `pending` list, and a
worker with free slots asks `DISPATCH` for lines, which picks the tenant that is furthest
behind in virtual time (tokens charged), so every tenant's batches progress at the same token
rate whatever their sizes, and a tenant that used more recently yields to one that used less.
Interactive jobs go straight into arq's queue and come first at the upstream permit.
"""

from __future__ import annotations

# Used inside FINISH (scripts.py), which passes: KEYS[5] the scheduler's in-flight set,
# KEYS[6] the tenants' virtual times, KEYS[7] the active tenants; ARGV[9] the batch key base
# (`{prefix}:batch:`), ARGV[10] the line's outcome for its batch ('' = the job's status;
# 'expired' for a line its batch's window ended before it ran).
# `batch_line(job, status)` reads and checks what the batch's update needs, before FINISH's
# first write: nil when the job is not a line of a live batch, a table otherwise, or an error
# reply (nothing written) when the batch record is malformed. `batch_line_done` then only
# writes: HINCRBY of checked integer fields, HSET, XADD with the next id of a log only this
# code writes (after the job's own XADD, the one write that could fail), PUBLISH, ZREM.
BATCH_HOOK = """
local function count_of(value) return string.match(value or '0', '^%d+$') and tonumber(value) end
local function batch_line(job, status)
  local f = redis.call('HMGET', job, 'batch_id', 'tenant', 'estimate', 'custom_id', 'id')
  if not f[1] then return nil end
  local key = ARGV[9] .. f[1]
  local b = redis.call('HMGET', key, 'status', 'total', 'done', 'seq', 'ending',
    'completed', 'failed', 'cancelled', 'expired')
  if not b[1] then return nil end
  for i = 2, 9 do
    if i ~= 5 and not count_of(b[i]) then
      return {err = 'ERR moonq: the batch record ' .. key .. ' is malformed'}
    end
  end
  local outcome = ARGV[10] ~= '' and ARGV[10] or status
  return {key = key, id = f[1], tenant = f[2], estimate = tonumber(f[3]) or 0,
    custom_id = f[4], job_id = f[5], outcome = outcome, status = b[1], total = tonumber(b[2]),
    done = tonumber(b[3]) + 1, seq = tonumber(b[4]) + 1, ending = b[5] or '',
    counts = {completed = tonumber(b[6]), failed = tonumber(b[7]),
      cancelled = tonumber(b[8]), expired = tonumber(b[9])}}
end
local function charge(tenant, delta)
  if delta == 0 then return end
  redis.call('HINCRBYFLOAT', KEYS[6], tenant, delta)
  if redis.call('ZSCORE', KEYS[7], tenant) then redis.call('ZINCRBY', KEYS[7], delta, tenant) end
end
local function batch_event(line, kind, data)
  local body = cjson.encode({event = kind, data = data})
  local event = '{"seq":' .. line.seq .. ',' .. string.sub(body, 2)
  redis.call('XADD', line.key .. ':log', '0-' .. line.seq, 'e', event)
  redis.call('HSET', line.key, 'seq', line.seq)
  redis.call('PUBLISH', ARGV[9] .. 'events:' .. line.id, event)
end
local function request_counts(line)
  local c = line.counts
  return {total = line.total, completed = c.completed, failed = c.failed,
    cancelled = c.cancelled, expired = c.expired}
end
local function batch_line_done(line, usage, now, ttl)
  redis.call('ZREM', KEYS[5], line.job_id)
  line.counts[line.outcome] = (line.counts[line.outcome] or 0) + 1
  redis.call('HINCRBY', line.key, line.outcome, 1)
  redis.call('HINCRBY', line.key, 'done', 1)
  for name, amount in pairs(usage) do redis.call('HINCRBY', line.key, name, amount) end
  local used = usage['total_tokens']
  if used then charge(line.tenant, used - line.estimate) end
  batch_event(line, 'line', {custom_id = line.custom_id, job_id = line.job_id,
    status = line.outcome, request_counts = request_counts(line)})
  if line.done < line.total or (line.status ~= 'in_progress' and line.status ~= 'cancelling') then
    return
  end
  local final = line.ending ~= '' and line.ending or 'completed'
  redis.call('HSET', line.key, 'status', final, final .. '_at', now)
  line.seq = line.seq + 1
  batch_event(line, 'done', {status = final, request_counts = request_counts(line)})
  for _, suffix in ipairs({'', ':log', ':lines', ':pending'}) do
    redis.call('EXPIRE', line.key .. suffix, ttl)
  end
  redis.call('ZREM', ARGV[9] .. 'expiring', line.id)
end
"""

# KEYS: 1 the batch, 2 the tenant's line of batches, 3 active tenants, 4 virtual times,
# 5 the virtual clock, 6 batches by expiry. ARGV: batch id, tenant, now (s), expires at (s).
# Makes a validated batch runnable: in progress, in its tenant's line, the tenant active (a
# tenant that was idle starts at the clock, never behind it: idle time earns no credit).
# Returns 1, or 0 when the batch is not `validating` (nothing written). Its writes (HSET,
# RPUSH, ZADD of a checked number) cannot fail on moonq's own keys.
ACTIVATE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'validating' then return 0 end
local clock = tonumber(redis.call('GET', KEYS[5])) or 0
local vt = tonumber(redis.call('HGET', KEYS[4], ARGV[2])) or 0
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[3])
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
# account-wide (0 = no cap), 7 now (ms), 8 arq's job payload with `JOBID` for the job id.
# Hands out up to ARGV[5] lines: each goes into arq's queue (due now) and the in-flight set,
# and its token estimate is charged to its tenant's virtual time. The tenant with the lowest
# virtual time goes first; within a tenant, batches in the order they were created. Lines of
# a batch no longer running (cancelled, expiring) and lines already over are dropped from
# the pending lists (cancel and expiry end them from the batch's full list). Returns the ids.
# Bounded: at most ARGV[5] + 64 pops. Writes: LPOP, SET, ZADD, HSET of numbers: cannot fail.
DISPATCH = """
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
        redis.call('SET', ARGV[4] .. job, (string.gsub(ARGV[8], 'JOBID', job)))
        redis.call('ZADD', KEYS[5], ARGV[7], job)
        redis.call('ZADD', KEYS[4], ARGV[7], job)
        local cost = tonumber(rec[2]) or 1
        if vt > clock then clock = vt end
        redis.call('ZADD', KEYS[1], vt + cost, tenant)
        redis.call('HSET', KEYS[2], tenant, vt + cost)
        out[#out + 1] = job
      end
    end
  end
end
redis.call('SET', KEYS[3], clock)
return out
"""
