"""One upstream limiter for the whole account, kept in Redis and shared by every worker.

Moonshot's limits are per account (e.g. 50 concurrent requests, 200 RPM at the first paid
tier); only a limiter shared across workers keeps a large batch out of a 429 storm. Concurrency
is a set of leases that expire unless their holder renews them, so a crashed worker's permits
come back on their own; a holder that stalled past its lease takes its permit back at its next
renewal if the limit has room and nobody waits, else learns that the permit is gone
(`Permit.lost`) and must stop. RPM and TPM are a sliding 60 s window of the
requests made, with the window's token total kept beside it so no ask has to sum it.

The limiter's keys outlive any lease (an hour, renewed on use): entries expire by their
scores, never with the key, so limiters with different lease lengths cannot drop each other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq.keys import Keys

log = logging.getLogger("moonq.limits")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Bounds that keep every ACQUIRE's cost independent of the queue's and the window's size.
# Only the first HEAD waiters in line can be granted in one pass (those further back learn
# it from one ZRANK and wait); a TPM wait hint looks at the oldest SCAN window entries.
HEAD = 100
SCAN = 100

# KEYS: 1 leases (zset lease -> expiry ms), 2 window (zset "lease:tokens" -> start ms),
# 3 waiting (zset lease -> priority), 4 seen (zset lease -> last ask ms),
# 5 asks (hash lease -> tokens), 6 total (string: the tokens of every entry in the window),
# 7 the gate: the account hash, whose `paused` field closes it ('' = no gate).
# ARGV: lease, lease ttl ms, concurrency, rpm, tpm, tokens, priority, and '1' for a probe (it
# passes a closed gate). Limits of 0 are off.
# Returns 0 when the permit is granted, -1 when the gate is closed (nothing written: the
# caller asks the gate how long to wait), else the milliseconds worth waiting before asking
# again; an error reply, before any write, when an ARGV is malformed. Reading the gate here
# spares every ask a round trip of its own, and a pause can no longer slip in between the two.
# Nobody waiting is the common case: a permit that fits is then granted at once, without
# joining the line (the same answer the line would give its only member, for half the work).
# Waiters are served strictly in priority order (the job's age): one is granted only if it
# and every waiter ahead of it fit the free permits, the minute's requests and its tokens. So
# a job set back by a crash is not overtaken by newer ones, and no job of a large batch
# starves, a large one under TPM included. A waiter that stops asking for 3 s is forgotten.
# Cost per call: O(log n) plus what expired since the last call, HEAD and SCAN. `total` is
# kept in step with the window by this script and RELEASE, rebuilt from the window if missing.
# Cannot fail after its first write: ARGV is checked first, and every later command gets keys
# of the types only these scripts write and arguments already checked.
ACQUIRE = (
    (
        _NOW
        + """
local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end
local lease = ARGV[1]
for i = 2, 6 do
  if not string.match(ARGV[i], '^%d+$') then return redis.error_reply('ERR bad ARGV ' .. i) end
end
local priority = tonumber(ARGV[7])
if lease == '' or priority == nil or priority ~= priority then
  return redis.error_reply('ERR bad lease or priority')
end
local ttl, concurrency, rpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tpm, tokens = tonumber(ARGV[5]), tonumber(ARGV[6])
local head, scan = $HEAD, $SCAN
if KEYS[7] ~= '' and ARGV[8] ~= '1' and redis.call('HEXISTS', KEYS[7], 'paused') == 1 then
  return -1
end
local function grant(total)
  redis.call('ZADD', KEYS[1], now + ttl, lease)
  if redis.call('ZADD', KEYS[2], now, lease .. ':' .. ARGV[6]) == 1 then total = total + tokens end
  redis.call('SET', KEYS[6], total, 'PX', 61000)
  redis.call('PEXPIRE', KEYS[1], 3600000)
  redis.call('PEXPIRE', KEYS[2], 61000)
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stored = tonumber(redis.call('GET', KEYS[6]))
local total = stored
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000) end
local count = redis.call('ZCARD', KEYS[2])
if count == 0 then
  total = 0
elseif total == nil or total < 0 then
  total = 0
  for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do total = total + tokens_of(w) end
else
  for _, w in ipairs(expired) do total = total - tokens_of(w) end
end
if redis.call('EXISTS', KEYS[3]) == 0 then  -- nobody waits: no line to keep
  local fits = concurrency == 0 or redis.call('ZCARD', KEYS[1]) < concurrency
  fits = fits and (rpm == 0 or count < rpm)
  fits = fits and (tpm == 0 or total == 0 or total + tokens <= tpm)
  if fits then return grant(total) end
end
if total ~= stored then redis.call('SET', KEYS[6], total, 'PX', 61000) end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - 3000)) do
  redis.call('ZREM', KEYS[3], gone)
  redis.call('HDEL', KEYS[5], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 3000)
redis.call('ZADD', KEYS[3], 'NX', priority, lease)
redis.call('ZADD', KEYS[4], now, lease)
redis.call('HSET', KEYS[5], lease, tokens)
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], 60000) end
local free = 1e12
if concurrency > 0 then free = concurrency - redis.call('ZCARD', KEYS[1]) end
local rank = redis.call('ZRANK', KEYS[3], lease)
if rank >= free then return math.min(1000, 50 + 10 * (rank - math.max(free, 0))) end
if rank >= head then return math.min(1000, 50 + 10 * (rank - head)) end
if rpm > 0 then
  local over = count + rank + 1 - rpm
  if over > count then return 1000 end
  if over > 0 then
    local oldest = redis.call('ZRANGE', KEYS[2], over - 1, over - 1, 'WITHSCORES')
    return math.max(1, tonumber(oldest[2]) + 60000 - now)
  end
end
if tpm > 0 then
  local ahead = 0
  local line = redis.call('ZRANGE', KEYS[3], 0, rank)
  for _, asked in ipairs(redis.call('HMGET', KEYS[5], unpack(line))) do
    ahead = ahead + (tonumber(asked) or 0)
  end
  if total + ahead > tpm and not (total == 0 and rank == 0) then
    if total == 0 then return 100 end
    local freed = 0
    local oldest = redis.call('ZRANGE', KEYS[2], 0, scan - 1, 'WITHSCORES')
    for i = 1, #oldest, 2 do
      freed = freed + tokens_of(oldest[i])
      if total - freed + ahead <= tpm or freed == total then
        return math.max(1, tonumber(oldest[i + 1]) + 60000 - now)
      end
    end
    return math.max(1, tonumber(oldest[#oldest]) + 60000 - now)
  end
end
redis.call('ZREM', KEYS[3], lease)
redis.call('ZREM', KEYS[4], lease)
redis.call('HDEL', KEYS[5], lease)
return grant(total)
"""
    )
    .replace("$HEAD", str(HEAD))
    .replace("$SCAN", str(SCAN))
)

# KEYS: 1 leases, 2 window, 3 total (as in ACQUIRE). ARGV: lease, tokens reserved, tokens
# used ('' = keep the estimate; 0 = the attempt cost nothing, e.g. an error before any chunk).
# The window entry keeps its start, so it still counts for RPM; `total` follows its tokens.
# Returns 1; an error reply, before any write, when an ARGV is malformed. Cannot fail after
# its first write: ARGV is checked first, and the keys have the types only these scripts write.
RELEASE = """
if not string.match(ARGV[2], '^%d+$') or not string.match(ARGV[3], '^%d*$') then
  return redis.error_reply('ERR bad tokens')
end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] ~= '' and ARGV[3] ~= ARGV[2] then
  local old = ARGV[1] .. ':' .. ARGV[2]
  local score = redis.call('ZSCORE', KEYS[2], old)
  if score then
    redis.call('ZREM', KEYS[2], old)
    redis.call('ZADD', KEYS[2], score, ARGV[1] .. ':' .. tonumber(ARGV[3]))
    if redis.call('EXISTS', KEYS[3]) == 1 then
      redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]) - tonumber(ARGV[2]))
    end
  end
end
return 1
"""

# KEYS: 1 leases, 2 waiting (as in ACQUIRE). ARGV: ttl ms, concurrency (0 = off), leases...
# Renews the leases still held. A lease that lapsed (past its expiry, or already dropped by an
# ACQUIRE that may have given its place away) is taken back when the limit has room for it now
# and nobody waits in line: the cap holds and nobody is passed over, and its request, already
# under way upstream and counted in the window, goes on rather than being cut off and run again
# (which, with a loop late under load, restarted thousands of streams). Otherwise it is lost:
# its holder must stop. Returns {the lost leases, how many were taken back}. An error reply,
# before any write, when an ARGV is malformed; no command after that can fail.
RENEW = (
    _NOW
    + """
if not string.match(ARGV[1], '^%d+$') or not string.match(ARGV[2], '^%d+$') then
  return redis.error_reply('ERR bad ttl or concurrency')
end
local expiry_at, limit = now + tonumber(ARGV[1]), tonumber(ARGV[2])
local room = nil  -- read once, when a lapsed lease first needs it
local lost, taken = {}, 0
for i = 3, #ARGV do
  local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if expiry and expiry > now then
    redis.call('ZADD', KEYS[1], 'XX', expiry_at, ARGV[i])
  else
    if room == nil then
      if redis.call('EXISTS', KEYS[2]) == 1 then room = 0
      elseif limit == 0 then room = #ARGV
      else room = limit - redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') end
    end
    if room > 0 then
      redis.call('ZADD', KEYS[1], expiry_at, ARGV[i])
      room, taken = room - 1, taken + 1
    else
      if expiry then redis.call('ZREM', KEYS[1], ARGV[i]) end
      lost[#lost + 1] = ARGV[i]
    end
  end
end
redis.call('PEXPIRE', KEYS[1], 3600000)
return {lost, taken}
"""
)


def estimate_tokens(body: dict[str, Any], prompt_tokens: int | None = None) -> int:
    """What a request will count against TPM before its usage is known: its prompt tokens
    (the upstream's exact count when given, else `local_prompt_tokens`) plus the completion
    budget it asks for. The API's door check, batches, the CLI and the worker all use it."""
    prompt = local_prompt_tokens(body) if prompt_tokens is None else max(0, prompt_tokens)
    return prompt + completion_budget(body)


def local_prompt_tokens(body: dict[str, Any]) -> int:
    """A cautious guess without the upstream's tokenizer: a token per 3 characters of the
    messages as JSON (real tokenizers count fewer)."""
    return len(json.dumps(body.get("messages", []), ensure_ascii=False)) // 3 + 1


def completion_budget(body: dict[str, Any]) -> int:
    """The most tokens the request lets the answer take (`max_tokens`), 0 when unbounded."""
    budget = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return budget if isinstance(budget, int) and budget > 0 else 0


@dataclass(frozen=True)
class Opening:
    """A gate's answer to a waiter: wait `wait` seconds before asking again, or go (0); a
    `probe` goes alone to learn whether a paused account works again."""

    wait: float = 0.0
    probe: bool = False


class Gate(Protocol):
    """Something that can close the upstream to every worker at once (`moonq.account`): it
    is closed while the hash `key` has a `paused` field (ACQUIRE reads it in the same step),
    and `opening()` says how long a waiter should stay out then."""

    @property
    def key(self) -> str: ...

    async def opening(self) -> Opening: ...


def kept_back(limit: int) -> int:
    """What batch lines may use of a limit: all but a tenth (at least one), kept for
    interactive jobs; all of a limit of 1 (or 0, no limit), else batches could never run."""
    return limit if limit <= 1 else limit - max(1, limit // 10)


class PermitAbandoned(Exception):
    """The caller stopped waiting for a permit (the worker is shutting down)."""


class PermitImpossible(Exception):
    """The request's token estimate exceeds the whole TPM limit: no wait would ever fit it."""


@dataclass
class Permit:
    """One upstream request's permit. `lost` is set when a renewal finds the lease lapsed (its
    holder stalled past the lease's ttl) with no room to take it back, or someone waiting in
    line: the place may be someone else's, so stop at once."""

    lease: str
    tokens: int
    used: int | None = None
    priority: float = 0.0
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    probe: bool = False  # let through a closed gate, to learn whether the account works
    # What `permit(along=...)` answered, sent beside the ask that granted this permit; None
    # when the permit was not granted at its first ask (or nothing was sent along).
    along: Any = None


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
        gate: Gate | None = None,
    ) -> None:
        self.redis = redis
        self.gate = gate
        self.keys = keys
        self.concurrency, self.rpm, self.tpm = concurrency, rpm, tpm
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)
        self._renew = redis.register_script(RENEW)
        self._held: dict[str, Permit] = {}
        # The leases of the renewal on its way to Redis, and its answer.
        self._renewing: tuple[set[str], asyncio.Future[None]] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._waited = False  # this process's last ask for a permit was told to wait
        self._asking = 0  # asks in flight with something sent along

    @property
    def enabled(self) -> bool:
        return bool(self.concurrency or self.rpm or self.tpm)

    @contextlib.asynccontextmanager
    async def permit(
        self,
        tokens: int,
        priority: float = 0.0,
        give_up: Callable[[], bool] = lambda: False,
        *,
        batch: bool = False,
        along: Callable[[str], Awaitable[Any]] | None = None,
    ) -> AsyncIterator[Permit]:
        """Hold one upstream request's permit; set `permit.used` to the real token count
        (0 when the attempt ended without usage: its estimate leaves the TPM window).

        `along(lease)` is sent in the same round trip as the first ask for the permit, after
        it (moonq's START, which checks the lease itself): when that ask grants the permit,
        `permit.along` is its answer (or the exception it raised), and the job starts a round
        trip sooner. Not sent while this process's last ask had to wait, or while the permits
        it holds and asks for fill the concurrency limit: it would most likely be wasted.

        Waiters are served lowest `priority` first (moonq passes the job's creation time),
        and only while the `gate` (the account's pause) is open, limits on or off.
        Raises `PermitImpossible` at once when `tokens` exceeds the TPM limit, and
        `PermitAbandoned` when `give_up()` turns true while waiting. While held, watch
        `permit.lost`: it is set if the lease lapsed and could not be taken back. A `batch`
        request leaves a tenth of RPM and TPM (`kept_back`) to the others: a batch that filled the
        minute's window would otherwise hold an interactive job back until the window moved.
        """
        if self.tpm and tokens > self.tpm:
            raise PermitImpossible(
                f"the request needs about {tokens} tokens, more than "
                f"MOONQ_UPSTREAM_TPM={self.tpm} allows in a minute"
            )
        permit = Permit(uuid.uuid4().hex, tokens, priority=priority)
        try:
            await self._wait_for(permit, give_up, batch, along)
        except BaseException:
            if self.enabled:
                # Give up the place in line, and the permit if an ask in flight as this wait
                # ended (a cancel: a shutdown, an abort) granted it: it would hold a place
                # until its lease lapsed. Nothing was sent under it: its tokens go back.
                with contextlib.suppress(RedisError, OSError):
                    release = self._release(
                        keys=self._release_keys(), args=[permit.lease, tokens, 0]
                    )
                    await asyncio.shield(asyncio.gather(self._leave_line(permit.lease), release))
            raise
        if not self.enabled:
            yield permit
            return
        try:
            yield permit
        finally:
            self._held.pop(permit.lease, None)
            renewing = self._renewing
            if renewing is not None and permit.lease in renewing[0]:
                # A renewal naming this lease is on its way: the release must not overtake it
                # (RENEW would find the lease gone and take it back, for nobody to hold).
                await asyncio.shield(renewing[1])
            used = "" if permit.used is None else str(max(0, permit.used))
            try:
                await asyncio.shield(
                    self._release(keys=self._release_keys(), args=[permit.lease, tokens, used])
                )
            except (RedisError, OSError):
                log.warning("could not release an upstream permit; it expires on its own")

    async def _wait_for(
        self,
        permit: Permit,
        give_up: Callable[[], bool],
        batch: bool,
        along: Callable[[str], Awaitable[Any]] | None,
    ) -> None:
        limits = [self.concurrency, self.rpm, self.tpm]
        if batch:
            limits[1:] = [kept_back(self.rpm), kept_back(self.tpm)]
        args: list[str | int | float] = [
            permit.lease,
            self.lease_ttl_ms,
            *limits,
            permit.tokens,
            permit.priority,
        ]
        # With limits on, ACQUIRE reads the gate itself; the gate is asked only when closed.
        closed = not self.enabled
        while True:
            if give_up():
                raise PermitAbandoned(permit.lease)
            wait_ms = await self._closed_ms(permit) if closed else 0
            if wait_ms == 0:
                if not self.enabled:
                    return
                wait_ms = await self._ask(permit, args, along)
                along = None
                closed = wait_ms == -1
                if closed:
                    continue
            if wait_ms == 0:
                self._held[permit.lease] = permit
                self._ensure_renewer()
                return
            # jitter keeps waiting workers from asking in lockstep; never past the 3 s after
            # which a silent waiter loses its place
            await asyncio.sleep(min(wait_ms, 1000) / 1000 * random.uniform(0.5, 1.5))

    async def _ask(
        self,
        permit: Permit,
        args: list[str | int | float],
        along: Callable[[str], Awaitable[Any]] | None,
    ) -> int:
        """ACQUIRE's answer for `permit` (0: granted; else wait this many ms, -1: the gate is
        closed), with `along` sent after it, in the same round trip on moonq's client."""
        ask = self._acquire(keys=self._keys(), args=[*args, "1" if permit.probe else "0"])
        # Nothing goes along when the permit would most likely have to wait: this process's
        # last ask waited (or met a closed gate), or the permits it holds and is asking for
        # already fill the concurrency limit (a burst of starts).
        full = self.concurrency and len(self._held) + self._asking >= self.concurrency
        if along is None or self._waited or full:
            wait_ms = int(await ask)
        else:
            # `along` starts on the loop's next turn, the ask in this one: its command is
            # queued after the ask's (and after those of other asks made in this turn), and
            # the client sends what was queued by then as one round trip.
            later = asyncio.ensure_future(along(permit.lease))
            self._asking += 1
            try:
                wait_ms = int(await ask)
            except BaseException:
                _drop(later)  # not sent if it has not gone yet; its answer unread if it has
                raise
            finally:
                self._asking -= 1
            if wait_ms != 0:
                _drop(later)  # it found no permit: it wrote nothing
            else:
                try:
                    permit.along = await later
                except Exception as exc:  # the caller's, to raise while it holds the permit
                    permit.along = exc
        self._waited = wait_ms != 0
        return wait_ms

    async def _closed_ms(self, permit: Permit) -> int:
        """How long the gate keeps this waiter out (one cheap read per ask); 0 when open. A
        probe, once let through, is not stopped again while it waits for its permit."""
        if self.gate is None or permit.probe:
            return 0
        opening = await self.gate.opening()
        permit.probe = opening.probe
        return 0 if opening.probe or opening.wait <= 0 else max(1, int(opening.wait * 1000))

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
            k.limit_window_tokens(),
            "" if self.gate is None else self.gate.key,
        ]

    def _release_keys(self) -> list[str]:
        return [self.keys.limit_leases(), self.keys.limit_window(), self.keys.limit_window_tokens()]

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            # A fresh context: the renewer serves every job, not the one that started it.
            self._renewer = asyncio.create_task(
                self._renew_forever(), name="moonq-lease-renewer", context=contextvars.Context()
            )

    async def _renew_forever(self) -> None:
        """Renew every lease_ttl/3, counted from the start of the last renewal, so a slow
        round trip does not stretch the beat; a stall past the ttl is caught by `_renew_held`."""
        loop = asyncio.get_running_loop()
        period = self.lease_ttl_ms / 3000
        due = loop.time() + period
        while self._held:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = loop.time() + period
            await self._renew_held()

    async def _renew_held(self) -> None:
        """Renew the leases held; set `lost` on each permit whose lease was no longer held."""
        held = list(self._held)
        if not held:
            return
        keys = [self.keys.limit_leases(), self.keys.limit_waiting()]
        answered = asyncio.get_running_loop().create_future()
        self._renewing = (set(held), answered)
        try:
            lost, taken = await self._renew(
                keys=keys, args=[self.lease_ttl_ms, self.concurrency, *held]
            )
        except (RedisError, OSError) as exc:  # keep renewing through a Redis blip
            log.warning("could not renew upstream permits: %s", type(exc).__name__)
            return
        finally:
            self._renewing = None
            answered.set_result(None)
        if taken:
            log.warning(
                "%d upstream permits had lapsed before they were renewed (this process was "
                "late); taken back, the limit having room",
                taken,
            )
        for raw in lost:
            permit = self._held.pop(raw.decode() if isinstance(raw, bytes) else str(raw), None)
            if permit is not None:
                log.warning(
                    "an upstream permit lapsed before it was renewed; its request must stop"
                )
                permit.lost.set()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer


def _drop(task: asyncio.Future[Any]) -> None:
    """Stop waiting for `task`; an error it ended with is not reported as never retrieved."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
