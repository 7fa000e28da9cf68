"""One upstream limiter for the whole account, kept in Redis and shared by every worker.

Moonshot's limits are per account (e.g. 50 concurrent requests, 200 RPM at the first paid
tier); only a limiter shared across workers keeps a large batch out of a 429 storm. Concurrency
is a set of leases that expire unless their holder renews them, so a crashed worker's permits
come back on their own. RPM and TPM are a sliding 60 s window of the requests made.

The limiter's keys outlive any lease (an hour, renewed on use): entries expire by their
scores, never with the key, so limiters with different lease lengths cannot drop each other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq.keys import Keys

log = logging.getLogger("moonq.limits")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: leases (zset lease -> expiry ms), window (zset "lease:tokens" -> start ms),
# waiting (zset lease -> priority), seen (zset lease -> last ask ms), asks (hash lease -> tokens).
# ARGV: lease, lease ttl ms, concurrency, rpm, tpm, tokens, priority. Limits of 0 are off.
# Waiters are served strictly in priority order (the job's age): one is granted only if it
# and every waiter ahead of it fit the free permits, the minute's requests and its tokens. So
# a job set back by a crash is not overtaken by newer ones, and no job of a large batch
# starves, a large one under TPM included. A waiter that stops asking for 3 s is forgotten.
# Returns 0 when the permit is granted, else the milliseconds worth waiting before asking again.
ACQUIRE = (
    _NOW
    + """
local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end
local lease = ARGV[1]
local concurrency, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - 3000)) do
  redis.call('ZREM', KEYS[3], gone)
  redis.call('HDEL', KEYS[5], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 3000)
redis.call('ZADD', KEYS[3], 'NX', ARGV[7], lease)
redis.call('ZADD', KEYS[4], now, lease)
redis.call('HSET', KEYS[5], lease, ARGV[6])
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], 60000) end
local free = 1e12
if concurrency > 0 then free = concurrency - redis.call('ZCARD', KEYS[1]) end
local rank = redis.call('ZRANK', KEYS[3], lease)
if rank >= free then return math.min(1000, 50 + 10 * (rank - math.max(free, 0))) end
local window = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
if rpm > 0 then
  local over = #window / 2 + rank + 1 - rpm
  if over > #window / 2 then return 1000 end
  if over > 0 then return math.max(1, tonumber(window[2 * over]) + 60000 - now) end
end
if tpm > 0 then
  local ahead = 0
  for _, w in ipairs(redis.call('ZRANGE', KEYS[3], 0, rank)) do
    ahead = ahead + (tonumber(redis.call('HGET', KEYS[5], w)) or 0)
  end
  local used = 0
  for i = 1, #window, 2 do used = used + tokens_of(window[i]) end
  if used + ahead > tpm and not (used == 0 and rank == 0) then
    if used == 0 then return 100 end
    for i = 1, #window, 2 do
      used = used - tokens_of(window[i])
      if used + ahead <= tpm or used == 0 then
        return math.max(1, tonumber(window[i + 1]) + 60000 - now)
      end
    end
  end
end
redis.call('ZREM', KEYS[3], lease)
redis.call('ZREM', KEYS[4], lease)
redis.call('HDEL', KEYS[5], lease)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), lease)
redis.call('ZADD', KEYS[2], now, lease .. ':' .. ARGV[6])
redis.call('PEXPIRE', KEYS[1], 3600000)
redis.call('PEXPIRE', KEYS[2], 61000)
return 0
"""
)

# KEYS: leases, window. ARGV: lease, tokens reserved, tokens used ('' = keep).
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  local old = ARGV[1] .. ':' .. ARGV[2]
  local score = redis.call('ZSCORE', KEYS[2], old)
  if score then
    redis.call('ZREM', KEYS[2], old)
    redis.call('ZADD', KEYS[2], score, ARGV[1] .. ':' .. ARGV[3])
  end
end
return 1
"""

# KEYS: leases. ARGV: ttl ms, leases... Renews the leases still held (XX: never revives one).
RENEW = (
    _NOW
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 3600000)
return 1
"""
)


def estimate_tokens(body: dict[str, Any]) -> int:
    """A cautious guess of what a request will count against TPM before its usage is known:
    about a token per 3 characters of prompt, plus the completion budget it asks for."""
    prompt = len(json.dumps(body.get("messages", []), ensure_ascii=False)) // 3 + 1
    budget = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return prompt + (budget if isinstance(budget, int) and budget > 0 else 0)


class PermitAbandoned(Exception):
    """The caller stopped waiting for a permit (the worker is shutting down)."""


@dataclass
class Permit:
    lease: str
    tokens: int
    used: int | None = None
    priority: float = 0.0


class UpstreamLimiter:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        concurrency: int,
        rpm: int,
        tpm: int,
        lease_ttl: float = 5.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.concurrency, self.rpm, self.tpm = concurrency, rpm, tpm
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)
        self._renew = redis.register_script(RENEW)
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.concurrency or self.rpm or self.tpm)

    @contextlib.asynccontextmanager
    async def permit(
        self, tokens: int, priority: float = 0.0, give_up: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Permit]:
        """Hold one upstream request's permit; set `permit.used` to the real token count.

        Waiters are served lowest `priority` first (moonq passes the job's creation time).
        Raises `PermitAbandoned` when `give_up()` turns true while waiting.
        """
        permit = Permit(uuid.uuid4().hex, tokens, priority=priority)
        if not self.enabled:
            yield permit
            return
        try:
            await self._wait_for(permit, give_up)
        except BaseException:
            with contextlib.suppress(RedisError, OSError):  # give up the place in line
                await asyncio.shield(self._leave_line(permit.lease))
            raise
        try:
            yield permit
        finally:
            self._held.discard(permit.lease)
            used = "" if permit.used is None else str(permit.used)
            try:
                await asyncio.shield(
                    self._release(keys=self._keys(), args=[permit.lease, permit.tokens, used])
                )
            except (RedisError, OSError):
                log.warning("could not release an upstream permit; it expires on its own")

    async def _wait_for(self, permit: Permit, give_up: Callable[[], bool]) -> None:
        limits = [self.concurrency, self.rpm, self.tpm]
        args: list[str | int | float] = [
            permit.lease,
            self.lease_ttl_ms,
            *limits,
            permit.tokens,
            permit.priority,
        ]
        while True:
            if give_up():
                raise PermitAbandoned(permit.lease)
            wait_ms = int(await self._acquire(keys=self._keys(), args=args))
            if wait_ms == 0:
                self._held.add(permit.lease)
                self._ensure_renewer()
                return
            # jitter keeps waiting workers from asking in lockstep; never past the 3 s after
            # which a silent waiter loses its place
            await asyncio.sleep(min(wait_ms, 1000) / 1000 * random.uniform(0.5, 1.5))

    async def _leave_line(self, lease: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.limit_waiting(), lease)
            pipe.zrem(self.keys.limit_seen(), lease)
            pipe.hdel(self.keys.limit_asks(), lease)
            await pipe.execute()

    def _keys(self) -> list[str]:
        k = self.keys
        return [
            k.limit_leases(),
            k.limit_window(),
            k.limit_waiting(),
            k.limit_seen(),
            k.limit_asks(),
        ]

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever(), name="moonq-lease-renewer")

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ttl_ms / 3000)
            held = list(self._held)
            if not held:
                return
            try:
                await self._renew(keys=[self.keys.limit_leases()], args=[self.lease_ttl_ms, *held])
            except (RedisError, OSError) as exc:  # keep renewing through a Redis blip
                log.warning("could not renew upstream permits: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
