"""The upstream account: paused for every worker at once when it runs out of balance.

A 429 `exceeded_current_quota_error` means the account is out of balance: every request would
get the same answer until it is topped up. Instead of failing thousands of jobs, the first
worker to see it pauses the account (a hash in Redis); while paused, no worker takes an
upstream permit (the limiter asks `Account.opening`, one HMGET per ask) and jobs stay queued.
One worker at a time (a SET NX PX lock) checks the balance with exponential backoff and
resumes the account when it is positive; an upstream without the balance endpoint is probed
instead, by letting one request through. A refusal while the balance reads positive fails only
its job: an account-wide pause on a balance that reads positive could stop every tenant for
minutes on one request's refusal (seen in the fault suite).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from moonq.keys import Keys
from moonq.limits import Opening
from moonq.settings import Settings

log = logging.getLogger("moonq.account")

OUT_OF_BALANCE = "exceeded_current_quota_error: the upstream account is out of balance"
WAITING_REASON = "the upstream account is out of balance; moonq resumes when it is topped up"
OPEN = Opening()
MAX_NAP = 1.0  # a waiter re-reads the pause at least this often, so a resume is seen at once
CHECK_NAP = 0.2  # a waiter that lost the check to another worker reads again this soon
CHECK_LOCK_MS = 30_000  # longer than a balance request may take
BALANCE_TTL = 2.0  # a worker's refusals this close together share one balance read

# KEYS: 1 the account hash. ARGV: reason, paused since (Unix s), first check (Unix s).
# Returns 1 when this call paused the account, 0 when it already was paused (its backoff is
# kept: concurrent refusals must not reset it). One write, after every read: cannot fail
# halfway.
PAUSE = """
if redis.call('HEXISTS', KEYS[1], 'paused') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'paused', ARGV[1], 'paused_since', ARGV[2], 'next_check', ARGV[3],
  'checks', 0)
return 1
"""

# KEYS: 1 the account hash. ARGV: now (Unix s), shortest and longest delay (s), all numbers.
# Schedules the next balance check after one that found no balance: min·2^checks, capped.
# Returns the delay as a string (Lua numbers reach Redis as integers), or '-1' when the account
# is no longer paused (then it writes nothing). An error, before any write, on a bad ARGV.
RESCHEDULE = """
local now, low, high = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not now or not low or not high then return redis.error_reply('ERR bad ARGV') end
if redis.call('HEXISTS', KEYS[1], 'paused') == 0 then return '-1' end
local checks = redis.call('HINCRBY', KEYS[1], 'checks', 1)
local delay = math.min(high, low * 2 ^ math.min(checks, 30))
redis.call('HSET', KEYS[1], 'next_check', tostring(now + delay))
return tostring(delay)
"""

BalanceCheck = Callable[[], Awaitable[float | None]]


@dataclass(frozen=True)
class Pause:
    """Why and since when the account is paused, and when its balance is checked next."""

    reason: str
    since: float | None
    next_check: float | None
    checks: int


async def read_pause(redis: Redis, keys: Keys) -> Pause | None:
    """The account's pause, or None while it is not paused (one HGETALL)."""
    raw = await redis.hgetall(keys.account())  # type: ignore[misc]
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    if "paused" not in fields:
        return None
    return Pause(
        fields["paused"],
        _number(fields.get("paused_since")),
        _number(fields.get("next_check")),
        int(_number(fields.get("checks")) or 0),
    )


async def paused_reason(redis: Redis, keys: Keys) -> str | None:
    """Why the account is paused, or None (one HGET: cheap enough for every job read)."""
    reason = await redis.hget(keys.account(), "paused")  # type: ignore[misc]
    return None if reason is None else bytes(reason).decode()


@dataclass(frozen=True)
class InUse:
    """What of the account's limits the workers use now, from the limiter's own keys."""

    permits: int
    requests_last_minute: int
    tokens_last_minute: int


async def read_in_use(redis: Redis, keys: Keys) -> InUse:
    """Counted by score, as the limiter does (its keys keep expired entries until its next
    ask), at Redis's clock; reads only."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.limit_leases(), f"({now_ms}", "+inf")
        pipe.zrangebyscore(keys.limit_window(), f"({now_ms - 60_000}", "+inf")
        permits, window = await pipe.execute()
    tokens = sum(int(entry.rsplit(b":", 1)[1] or 0) for entry in window if b":" in entry)
    return InUse(int(permits), len(window), tokens)


def _number(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class Account:
    """A worker's view of the account: pauses it, resumes it, and gates the limiter."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        balance: BalanceCheck,
        *,
        check_min: float = 5.0,
        check_max: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis, self.keys, self.balance = redis, keys, balance
        self.check_min, self.check_max = check_min, max(check_min, check_max)
        self.clock = clock
        self._balance_lock = asyncio.Lock()
        self._balance_read: tuple[float, float | None] | None = None  # (when, balance)
        self._pause = redis.register_script(PAUSE)
        self._reschedule = redis.register_script(RESCHEDULE)
        self._token = uuid.uuid4().hex

    @property
    def key(self) -> str:
        """The hash whose `paused` field closes the limiter's gate."""
        return self.keys.account()

    @classmethod
    def from_settings(
        cls, redis: Redis, keys: Keys, settings: Settings, balance: BalanceCheck
    ) -> Account:
        return cls(
            redis,
            keys,
            balance,
            check_min=settings.balance_check_min,
            check_max=settings.balance_check_max,
        )

    async def refused_for_quota(self) -> bool:
        """A request was refused as out of balance: True when the account is (now) paused.
        False when its balance is plainly positive: the refusal is the request's own."""
        if await paused_reason(self.redis, self.keys) is not None:
            return True
        balance = await self._recent_balance()
        if balance is None or balance <= 0:
            await self.pause(OUT_OF_BALANCE)
            return True
        log.warning("a request was refused for quota, yet the balance is %g", balance)
        return False

    async def _recent_balance(self) -> float | None:
        """The balance, read at most once per BALANCE_TTL: a burst of refusals of this
        worker's jobs shares one request."""
        async with self._balance_lock:
            read = self._balance_read
            if read is None or self.clock() - read[0] >= BALANCE_TTL:
                return await self._read_balance()
            return read[1]

    async def _read_balance(self) -> float | None:
        """The balance now, kept for `_recent_balance` (a check's read is the newest)."""
        balance = await self.balance()
        self._balance_read = (self.clock(), balance)
        return balance

    async def pause(self, reason: str) -> None:
        """Pause every worker; the first balance check comes after `check_min`."""
        now = self.clock()
        args = [reason, repr(now), repr(now + self.check_min)]
        if int(await self._pause(keys=[self.keys.account()], args=args)):
            log.warning("upstream account paused (%s); jobs wait until it is topped up", reason)

    async def resume(self, why: str, *, probed: bool = False) -> None:
        """Resume every worker (`probed`: because a probe request got through)."""
        if await self.redis.delete(self.keys.account()):
            log.warning("upstream account resumed (%s); jobs run again", why)

    async def opening(self) -> Opening:
        """The limiter's gate: open unless paused; when a check is due, the waiter that takes
        the check lock checks the balance (or goes as the probe)."""
        key = self.keys.account()
        fields = ["paused", "next_check"]
        paused, due = await self.redis.hmget(key, fields)  # type: ignore[misc]
        if paused is None:
            return OPEN
        wait = (_number(due.decode()) if due else None) or 0.0
        wait -= self.clock()
        if wait > 0:
            return Opening(min(wait, MAX_NAP))
        lock = self.keys.account_check()
        if not await self.redis.set(lock, self._token, nx=True, px=CHECK_LOCK_MS):
            return Opening(CHECK_NAP)
        try:
            return await self._check()
        finally:
            await self.redis.delete(lock)

    async def _check(self) -> Opening:
        """A due check: resume on a positive balance; else back off, letting one request go
        as a probe where the balance cannot tell."""
        balance = await self._read_balance()
        if balance is not None and balance > 0:
            await self.resume(f"available balance {balance:g}")
            return OPEN
        args = [repr(self.clock()), repr(self.check_min), repr(self.check_max)]
        delay = float(await self._reschedule(keys=[self.keys.account()], args=args))
        if delay < 0:  # resumed meanwhile
            return OPEN
        if balance is None:
            log.info("the upstream's balance cannot tell; one request goes as a probe")
            return Opening(probe=True)
        log.info("upstream balance %g; next check in %.1fs", balance, delay)
        return Opening(min(delay, MAX_NAP))
