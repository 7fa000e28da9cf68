"""How many files, and bytes of them, a tenant may keep (MOONQ_TENANT_MAX_FILES and
MOONQ_TENANT_MAX_FILE_BYTES, Moonshot's own per-account limits): uploads live in Redis, so
one tenant must not fill it for everyone.

The truth is a per-tenant hash, file id -> bytes, written in the same script that publishes a
file and the same transaction that deletes one. A file that expired (MOONQ_FILE_TTL) leaves it,
and the tenant's index, when a script looks at its record and finds it gone, or a listing
does: never by its age, since MOONQ_FILE_TTL may have changed since it was uploaded (a file
kept forever must stay listed and counted after a TTL is switched on). Each script looks at
`SWEEP` files at most, where the last one stopped; the index and hash live as long as their
longest-lived file (forever if one has no TTL), so nothing listed or counted outlives them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Files one script looks at, at most, for expired ones: bounds the cost of each upload.
SWEEP = 1000
# How long where the last look stopped is remembered (losing it only starts the next look over).
SWEEP_CURSOR_TTL = 24 * 3600

# Shared by both scripts. KEYS[1] the tenant's index (ids by creation time), KEYS[2] its sizes
# hash, KEYS[3] where the last look stopped (a rank). ARGV[1] now, ARGV[2] the file TTL (0:
# none), ARGV[3] the new file's bytes, ARGV[4] max files, ARGV[5] max bytes in all, ARGV[6] what
# a file's record key is named from (+ id), ARGV[7] files to look at (SWEEP).
# room() answers 0 (room), 1 (too many files), 2 (too many bytes) or an error reply (a size
# that is not a number), having forgotten the expired files it found. It reads all that can
# fail (the keys' types, the sizes) before its first write; its writes (HDEL, ZREM, PEXPIRE,
# PERSIST, SET, DEL on keys of known types) cannot fail, and each is correct on its own.
_ROOM = (
    """
local q = {index = KEYS[1], sizes = KEYS[2], cursor = KEYS[3], base = ARGV[6]}

local function tally()
  local count, total = 0, 0
  for _, bytes in ipairs(redis.call('HVALS', q.sizes)) do
    local n = tonumber(bytes)
    if not n then return nil end
    count, total = count + 1, total + n
  end
  return count, total
end

-- life: ms the longest-lived file has left, -1 when one has no TTL (0: none left)
local function fit(life)
  for _, key in ipairs({q.index, q.sizes}) do
    if life == -1 then redis.call('PERSIST', key)
    elseif life > 0 then redis.call('PEXPIRE', key, life) end
  end
end

-- Forget the files among `ids` (ranks `start`... of `total`) whose record is gone; returns how
-- many it took out of the quota and their bytes. Having seen every file, fit the keys' life.
local function sweep(ids, start, total)
  local forgot, freed, gone, life = 0, 0, 0, 0
  for _, id in ipairs(ids) do
    local left = redis.call('PTTL', q.base .. id)
    if left == -2 then
      freed = freed + (tonumber(redis.call('HGET', q.sizes, id)) or 0)
      forgot = forgot + redis.call('HDEL', q.sizes, id)
      gone = gone + redis.call('ZREM', q.index, id)
    elseif left == -1 or life == -1 then life = -1
    elseif left > life then life = left end
  end
  if #ids == total then
    fit(life)
    redis.call('DEL', q.cursor)
  else
    redis.call('SET', q.cursor, start + #ids - gone, 'EX', $CURSOR_TTL)
  end
  return forgot, freed
end

local function room(size, max_files, max_bytes)
  local count, total = tally()
  if not count then
    return redis.error_reply('ERR moonq: a size in ' .. q.sizes .. ' is not a number')
  end
  local files = redis.call('ZCARD', q.index)
  local start = tonumber(redis.call('GET', q.cursor)) or 0
  if start >= files then start = 0 end
  local ids = redis.call('ZRANGE', q.index, start, start + tonumber(ARGV[7]) - 1)
  local forgot, freed = sweep(ids, start, files)  -- the first write
  if count - forgot + 1 > max_files then return 1 end
  if total - freed + size > max_bytes then return 2 end
  return 0
end
"""
).replace("$CURSOR_TTL", str(SWEEP_CURSOR_TTL))

# CHECK: is there room for a file of ARGV[3] bytes? (Before its bytes are stored.) Its only
# writes forget expired files, each on its own correct.
CHECK = (
    _ROOM
    + """
return room(tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# PUBLISH: make a stored upload a file, if there is room. KEYS[1..3] as above, KEYS[4] the
# file's record, KEYS[5] its bytes. ARGV[1..7] as above, ARGV[8] the file id, ARGV[9] the
# tenant, ARGV[10] the file object (JSON). Returns room()'s answer; on 0 the file is visible.
# Nothing after the room check can fail (plain writes to keys of known types: the record is
# new, its id random). The index and sizes then live at least as long as the new file: one
# without a TTL makes them permanent; with one, they are made to outlive it, unless they are
# permanent already (a file kept forever may be in them).
PUBLISH = (
    _ROOM
    + """
local ttl, size = tonumber(ARGV[2]), tonumber(ARGV[3])
local answer = room(size, tonumber(ARGV[4]), tonumber(ARGV[5]))
if answer ~= 0 then return answer end
local lives = {redis.call('PTTL', q.index), redis.call('PTTL', q.sizes)}
redis.call('HSET', KEYS[4], 'tenant', ARGV[9], 'object', ARGV[10])
redis.call('ZADD', q.index, ARGV[1], ARGV[8])
redis.call('HSET', q.sizes, ARGV[8], ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[4], ttl)
  redis.call('EXPIRE', KEYS[5], ttl)
  for i, key in ipairs({q.index, q.sizes}) do
    if lives[i] == -2 or (lives[i] >= 0 and lives[i] < ttl * 1000) then
      redis.call('EXPIRE', key, ttl)
    end
  end
else
  redis.call('PERSIST', KEYS[5])
  fit(-1)
end
return 0
"""
)


@dataclass(frozen=True)
class Quota:
    """A tenant's limits."""

    max_files: int
    max_bytes: int


class OverQuota(Exception):
    """The tenant keeps as many files, or bytes of them, as its quota allows."""

    def __init__(self, setting: str, limit: int) -> None:
        super().__init__(f"over {setting} ({limit})")
        self.setting, self.limit = setting, limit


def over(answer: int, quota: Quota) -> OverQuota | None:
    """The scripts' answer as an exception (None: there is room)."""
    if answer == 1:
        return OverQuota("MOONQ_TENANT_MAX_FILES", quota.max_files)
    if answer == 2:
        return OverQuota("MOONQ_TENANT_MAX_FILE_BYTES", quota.max_bytes)
    return None
