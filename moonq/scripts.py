"""Lua for the state changes that must be atomic: each checks the job's state and fences stale
attempts, so a worker that lost its job (or a cancelled one) can never write over the winner."""

from __future__ import annotations

TERMINAL_CHECK = """
local function terminal(s) return s == 'completed' or s == 'failed' or s == 'cancelled' end
"""

# KEYS: job. ARGV: now. Returns the new attempt number, -1 if the job is already over,
# -2 if it does not exist.
START = (
    TERMINAL_CHECK
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
if terminal(status) then return -1 end
redis.call('HSET', KEYS[1], 'status', 'in_progress')
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""
)

# KEYS: job, log, channel. ARGV: attempt, maxlen, ttl, event bodies (JSON objects without seq).
# Appends and publishes each event with the next seq; returns the last seq, or -1 if this
# attempt is no longer the job's live one (superseded, cancelled, finished).
APPEND = """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if state[1] ~= 'in_progress' or state[2] ~= ARGV[1] then return -1 end
local seq = 0
for i = 4, #ARGV do
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local event = '{"seq":' .. seq .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. seq, 'e', event)
  redis.call('PUBLISH', KEYS[3], event)
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""

# KEYS: job, log, channel. ARGV: attempt ('' = any), status, ttl, maxlen, event body,
# then field/value pairs to set. Moves a live job to a terminal status and appends its
# terminal event in one step; returns the event's seq, -1 if the job is already over (or the
# attempt is stale), -2 if it does not exist.
FINISH = (
    TERMINAL_CHECK
    + """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if not state[1] then return -2 end
if terminal(state[1]) then return -1 end
if ARGV[1] ~= '' and state[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local event = '{"seq":' .. seq .. ',' .. string.sub(ARGV[5], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '0-' .. seq, 'e', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""
)

# KEYS: job. ARGV: attempt, reason. Puts a live attempt's job back to `queued` for a retry;
# returns 1, or 0 if the attempt is no longer the job's live one.
REQUEUE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if state[1] ~= 'in_progress' or state[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'last_error', ARGV[2])
return 1
"""
