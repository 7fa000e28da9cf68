"""How many files, and bytes of them, a tenant may keep (MOONQ_TENANT_MAX_FILES and
MOONQ_TENANT_MAX_FILE_BYTES, Moonshot's own per-account limits): uploads live in Redis, so
one tenant must not fill it for everyone.

The truth is a per-tenant hash, file id -> bytes, written in the same script that publishes a
file and the same transaction that deletes one. Files that expire (MOONQ_FILE_TTL) leave it
when the next upload's script prunes every id older than the TTL from the index (scored by
creation time) and the hash, and when a listing finds them gone: it never drifts for long.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shared by both scripts. KEYS[1] the tenant's index (ids by creation time), KEYS[2] its sizes
# hash. ARGV[1] now, ARGV[2] the file TTL (0: none), ARGV[3] the new file's bytes,
# ARGV[4] max files, ARGV[5] max bytes in all. room() answers 0 (room), 1 (too many files)
# or 2 (too many bytes), having first forgotten the files that expired.
_ROOM = """
local function forget_expired(index, sizes, now, ttl)
  if ttl <= 0 then return end
  local gone = redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl, 'LIMIT', 0, 1000)
  for _, id in ipairs(gone) do
    redis.call('ZREM', index, id)
    redis.call('HDEL', sizes, id)
  end
end

local function room(index, sizes, now, ttl, size, max_files, max_bytes)
  forget_expired(index, sizes, now, ttl)
  if redis.call('HLEN', sizes) + 1 > max_files then return 1 end
  local total = size
  for _, bytes in ipairs(redis.call('HVALS', sizes)) do total = total + tonumber(bytes) end
  if total > max_bytes then return 2 end
  return 0
end
"""

# CHECK: is there room for a file of ARGV[3] bytes? (Before its bytes are stored.) Its only
# writes forget expired files, each on its own correct.
CHECK = (
    _ROOM
    + """
return room(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
            tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# PUBLISH: make a stored upload a file, if there is room. KEYS[1..2] as above, KEYS[3] the
# file's record, KEYS[4] its bytes. ARGV[1..5] as above, ARGV[6] the file id, ARGV[7] the
# tenant, ARGV[8] the file object (JSON). Returns room()'s answer; on 0 the file is visible.
# Nothing after the room check can fail (plain writes to keys of known types).
PUBLISH = (
    _ROOM
    + """
local now, ttl, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local answer = room(KEYS[1], KEYS[2], now, ttl, size, tonumber(ARGV[4]), tonumber(ARGV[5]))
if answer ~= 0 then return answer end
redis.call('HSET', KEYS[3], 'tenant', ARGV[7], 'object', ARGV[8])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[6])
redis.call('HSET', KEYS[2], ARGV[6], ARGV[3])
if ttl > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end  -- index and sizes: as the newest file
else
  redis.call('PERSIST', KEYS[4])
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
