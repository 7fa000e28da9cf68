"""Lua for the state changes that must be atomic: each checks the job's state and fences stale
attempts, so a worker that lost its job (or a cancelled one) can never write over the winner."""

from __future__ import annotations

TERMINAL_CHECK = """
local function terminal(s) return s == 'completed' or s == 'failed' or s == 'cancelled' end
"""

# KEYS: job, tenant index, arq job, arq queue, idempotency key.
# ARGV: job id, created (s), created (ms), job key prefix, arq payload, idempotency ttl (s) or
# '0', request fingerprint, index horizon (s), then the record's field/value pairs.
# Writes the record and the queue entry together; neither expires until the job ends. With
# an idempotency key already taken by a job that still exists, writes nothing and returns
# "<job id> <fingerprint>" of that first job; else returns ''.
CREATE = """
if ARGV[6] ~= '0' then
  local first = redis.call('GET', KEYS[5])
  if first and redis.call('EXISTS', ARGV[4] .. string.match(first, '^(%S+)')) == 1 then
    return first
  end
  redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. ARGV[7], 'EX', ARGV[6])
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return ''
"""

# KEYS: job. ARGV: now, worker id. Returns the new attempt number, -1 if the job is already
# over, -2 if it does not exist.
START = (
    TERMINAL_CHECK
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
if terminal(status) then return -1 end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[2])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""
)

# KEYS: job, log, channel. ARGV: attempt, maxlen, event bodies (JSON objects without seq).
# Appends and publishes each event with the next seq; returns the last seq, or -1 if this
# attempt is no longer the job's live one (superseded, cancelled, finished). Like the job,
# the log does not expire before the job ends.
APPEND = """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if state[1] ~= 'in_progress' or state[2] ~= ARGV[1] then return -1 end
local seq = 0
for i = 3, #ARGV do
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local event = '{"seq":' .. seq .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. seq, 'e', event)
  redis.call('PUBLISH', KEYS[3], event)
end
return seq
"""

# KEYS: job, log, channel, tenant usage. ARGV: attempt ('' = any), status, ttl, maxlen,
# event body, expected seq ('' = any), number of field pairs N, N field/value pairs, then
# usage name/amount pairs.
# Moves a live job to a terminal status with its terminal event, and adds its usage to the
# tenant's totals, in one step: a job ends once, so its usage counts once. The job and its
# log then expire after ttl. Returns the event's seq; -1 if the job is already over (or the
# attempt is stale), -2 if it is missing, -3 if its log moved past the expected seq.
FINISH = (
    TERMINAL_CHECK
    + """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'seq')
if not state[1] then return -2 end
if terminal(state[1]) then return -1 end
if ARGV[1] ~= '' and state[2] ~= ARGV[1] then return -1 end
if ARGV[6] ~= '' and state[3] ~= ARGV[6] then return -3 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
local last_field = 7 + 2 * tonumber(ARGV[7])
for i = 8, last_field, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = last_field + 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local event = '{"seq":' .. seq .. ',' .. string.sub(ARGV[5], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '0-' .. seq, 'e', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""
)

# KEYS: job. ARGV: attempt, reason, failure budget (0 = this is no failure of the job's).
# Hands a live attempt's job back to the queue. Returns 1, 0 when the failure budget is spent
# (the caller fails the job), or -1 if the attempt is no longer the job's live one.
REQUEUE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if state[1] ~= 'in_progress' or state[2] ~= ARGV[1] then return -1 end
if tonumber(ARGV[3]) > 0 then
  if redis.call('HINCRBY', KEYS[1], 'failures', 1) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'last_error', ARGV[2])
return 1
"""

# KEYS: arq's lock on the job, arq's queue, arq's job, the job. ARGV: lock ttl (ms), job id,
# queue score, arq payload. Renews a running job's lock. If the lock is gone but the job is
# not over (another, superseded run of it ended and arq cleaned up after it), takes the lock
# back and puts arq's job and queue entry back, so the job is never left without them.
# Returns 1 when renewed, 2 when restored, 0 when the job is over, -1 when another run holds it.
KEEP_LOCK = (
    TERMINAL_CHECK
    + """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 then return 1 end
local status = redis.call('HGET', KEYS[4], 'status')
if not status or terminal(status) then return 0 end
if not redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'NX') then return -1 end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[2])
redis.call('SET', KEYS[3], ARGV[4], 'NX')
return 2
"""
)
