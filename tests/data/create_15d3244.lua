-- moonq's CREATE as of 15d3244 (before the tenants' waiting sets): tests/test_fairness.py
-- runs it beside today's, as API processes of both releases run during a rolling upgrade.

local clock = tonumber(redis.call('GET', KEYS[10])) or 1
local next_turn = tonumber(redis.call('HGET', KEYS[9], ARGV[8])) or 1
local waiting = redis.call('ZCARD', KEYS[6])
local turn = math.max(math.min(next_turn, clock + waiting + 1), clock)
turn = string.format('%.0f', math.min(turn, 999999999999 - 1))
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
redis.call('HSET', KEYS[9], ARGV[8], turn + 1)
redis.call('ZADD', KEYS[4], turn, ARGV[1])
redis.call('PUBLISH', KEYS[8], '')
return ''
