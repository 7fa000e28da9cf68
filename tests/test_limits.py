"""The account-wide upstream limiter: concurrency leases, RPM and TPM windows, on both Redises."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from arq.connections import ArqRedis

from moonq.keys import Keys
from moonq.limits import Opening, PermitImpossible, UpstreamLimiter, estimate_tokens


@pytest.fixture(params=["fake", "real"])
def redis(request: pytest.FixtureRequest) -> ArqRedis:
    client: ArqRedis = request.getfixturevalue(
        "fake_redis" if request.param == "fake" else "real_redis"
    )
    return client


def _limiter(
    redis: ArqRedis,
    prefix: str,
    *,
    concurrency: int = 0,
    rpm: int = 0,
    tpm: int = 0,
    lease_ttl: float = 10.0,
) -> UpstreamLimiter:
    return UpstreamLimiter(
        redis, Keys(prefix), concurrency=concurrency, rpm=rpm, tpm=tpm, lease_ttl=lease_ttl
    )


class Holder:
    """A task that takes a permit, notes when (monotonic) it got it, and holds it until `stop`."""

    def __init__(self, limiter: UpstreamLimiter, tokens: int) -> None:
        self.granted: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(limiter, tokens))

    async def _run(self, limiter: UpstreamLimiter, tokens: int) -> None:
        async with limiter.permit(tokens):
            self.granted.set_result(time.monotonic())
            await self.stop.wait()

    async def wait_granted(self, timeout: float) -> float:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self.granted)

    async def end(self) -> None:
        self.stop.set()
        if not self.granted.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_concurrency_holds_across_limiters(redis: ArqRedis, prefix: str) -> None:
    limiters = [_limiter(redis, prefix, concurrency=3) for _ in range(3)]
    live = peak = finished = 0

    async def one(limiter: UpstreamLimiter) -> None:
        nonlocal live, peak, finished
        async with limiter.permit(10):
            live += 1
            peak = max(peak, live)
            await asyncio.sleep(0.03)
            live -= 1
        finished += 1

    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(one(limiters[i % 3]) for i in range(18)))
    finally:
        for limiter in limiters:
            await limiter.close()
    assert finished == 18
    assert peak == 3  # never more than the limit, and not serialised either
    assert await redis.zcard(Keys(prefix).limit_leases()) == 0  # every lease handed back


async def test_a_crashed_holders_permit_comes_back(redis: ArqRedis, prefix: str) -> None:
    ttl = 1.0
    crashed = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    other = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    held = crashed.permit(10)
    await held.__aenter__()
    taken = time.monotonic()
    await crashed.close()  # the holder dies: nobody renews or releases its lease
    waiter = Holder(other, 10)
    try:
        await asyncio.sleep(0.5 * ttl)
        assert not waiter.granted.done()
        granted = await waiter.wait_granted(2 * ttl)
    finally:
        await waiter.end()
        await other.close()
        await held.__aexit__(None, None, None)
    assert 0.8 * ttl <= granted - taken <= 2 * ttl


async def test_a_live_holder_keeps_its_permit(redis: ArqRedis, prefix: str) -> None:
    ttl = 0.3
    holder = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    other = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    try:
        async with holder.permit(10) as permit:
            waiter = Holder(other, 10)
            await asyncio.sleep(5 * ttl)  # the holder's renewer outlives several lease periods
            assert not waiter.granted.done()
            assert not permit.lost.is_set()
            released = time.monotonic()
        granted = await waiter.wait_granted(1.0)
        assert granted >= released  # only after the holder let go
    finally:
        await waiter.end()
        await holder.close()
        await other.close()


async def test_a_shorter_lease_elsewhere_keeps_live_leases(redis: ArqRedis, prefix: str) -> None:
    holder = _limiter(redis, prefix, concurrency=2, lease_ttl=3.0)
    brief = _limiter(redis, prefix, concurrency=2, lease_ttl=0.3)
    try:
        async with holder.permit(10):
            async with brief.permit(10):
                pass
            await asyncio.sleep(0.8)  # past brief's 2*ttl, before holder's first renewal (1 s)
            late = [Holder(brief, 10) for _ in range(2)]
            await asyncio.sleep(0.3)
            granted = sum(h.granted.done() for h in late)
            for h in late:
                await h.end()
            assert granted == 1  # the holder still has one of the two permits
    finally:
        await holder.close()
        await brief.close()


async def test_rpm_counts_requests_started_in_the_window(redis: ArqRedis, prefix: str) -> None:
    limiter = _limiter(redis, prefix, rpm=5)
    try:
        async with asyncio.timeout(0.5):
            for _ in range(5):
                async with limiter.permit(1):
                    pass  # released at once: RPM is about starts, not concurrency
        sixth = Holder(limiter, 1)
        await asyncio.sleep(0.5)
        assert not sixth.granted.done()
        await sixth.end()
    finally:
        await limiter.close()


async def test_tpm_is_corrected_to_real_usage(redis: ArqRedis, prefix: str) -> None:
    limiter = _limiter(redis, prefix, tpm=100)
    try:
        async with limiter.permit(60) as first:
            second = Holder(limiter, 60)
            await asyncio.sleep(0.6)
            assert not second.granted.done()  # 60 + 60 reserved would exceed 100
            first.used = 10  # the request really cost 10 tokens
            released = time.monotonic()
        # granted within the limiter's own retry interval (at most 1.5 s between asks)
        granted = await second.wait_granted(1.8)
        assert granted >= released
    finally:
        await second.end()
        await limiter.close()


async def test_a_request_larger_than_tpm_is_refused_at_once(redis: ArqRedis, prefix: str) -> None:
    """It could never fit: it must not wait at the head of the line, holding up everyone."""
    limiter = _limiter(redis, prefix, tpm=100)
    try:
        async with asyncio.timeout(0.5):
            with pytest.raises(PermitImpossible) as refused:
                async with limiter.permit(101):
                    pytest.fail("a request over the TPM limit was let through")
            async with limiter.permit(100):  # the whole minute's tokens: allowed, at once
                pass
    finally:
        await limiter.close()
    message = str(refused.value)
    assert "MOONQ_UPSTREAM_TPM=100" in message and "101" in message
    assert await redis.zcard(Keys(prefix).limit_waiting()) == 0  # it never joined the line


async def test_an_attempt_without_usage_gives_its_tokens_back(redis: ArqRedis, prefix: str) -> None:
    limiter = _limiter(redis, prefix, rpm=3, tpm=100)
    try:
        async with asyncio.timeout(0.5):
            for _ in range(2):
                async with limiter.permit(100) as permit:
                    permit.used = 0  # the upstream answered an error before any chunk
        third = Holder(limiter, 1)  # TPM has room, but it is the minute's third request...
        await third.wait_granted(0.5)
        fourth = Holder(limiter, 1)  # ...and a fourth is one too many for RPM
        await asyncio.sleep(0.5)
        assert not fourth.granted.done()
        await third.end()
        await fourth.end()
    finally:
        await limiter.close()


async def test_no_limits_means_no_redis(redis: ArqRedis, prefix: str) -> None:
    limiter = _limiter(redis, prefix)
    assert not limiter.enabled
    try:
        async with asyncio.timeout(0.1):
            for _ in range(50):
                async with limiter.permit(10**9):
                    pass
    finally:
        await limiter.close()
    assert await redis.keys(f"{prefix}:*") == []


def test_enabled_by_any_single_limit(fake_redis: ArqRedis) -> None:
    assert not _limiter(fake_redis, "p").enabled
    for limits in ({"concurrency": 1}, {"rpm": 1}, {"tpm": 1}):
        assert _limiter(fake_redis, "p", **limits).enabled


def test_estimate_grows_with_the_prompt_and_adds_max_tokens() -> None:
    def body(text: str, **extra: int) -> dict[str, object]:
        return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}

    short, long = estimate_tokens(body("hi")), estimate_tokens(body("hi " * 300))
    assert 0 < short < long
    assert long >= 900 // 4  # at least the usual ~4 characters a token
    assert estimate_tokens(body("hi", max_tokens=500)) == short + 500
    assert estimate_tokens(body("hi", max_completion_tokens=70)) == short + 70


async def test_waiters_are_served_oldest_first_under_tpm(redis: ArqRedis, prefix: str) -> None:
    """A large old request is not starved by a stream of small new ones."""
    limiter = _limiter(redis, prefix, concurrency=10, tpm=1000)
    granted: list[str] = []
    two_granted = asyncio.Event()

    async def ask(name: str, tokens: int, priority: float) -> None:
        async with limiter.permit(tokens, priority):
            granted.append(name)
            if len(granted) == 2:
                two_granted.set()

    tasks: list[asyncio.Task[None]] = []
    try:
        async with limiter.permit(500) as first:  # half the minute's tokens in use
            tasks.append(asyncio.create_task(ask("old-600", 600, priority=1.0)))
            await asyncio.sleep(0.3)
            for i in range(3):
                tasks.append(asyncio.create_task(ask(f"new-{i}", 300, priority=2.0 + i)))
            await asyncio.sleep(1.0)
            # 500 + 300 would fit, but the head (600) does not: nobody behind it goes either
            assert granted == []
            assert await redis.zcard(Keys(prefix).limit_waiting()) == 4  # all four asking
            first.used = 0  # it cost nothing after all: the whole minute is free again
        await asyncio.wait_for(two_granted.wait(), 3)
        await asyncio.sleep(1.5)  # give the others every chance to (wrongly) go too
        # the old large one goes, with the one small one that fits beside it (600 + 300);
        # the small ones alone (3 x 300) would have fitted and starved it
        assert sorted(granted) == ["new-0", "old-600"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await limiter.close()


async def test_waiters_are_served_oldest_first_for_concurrency(
    redis: ArqRedis, prefix: str
) -> None:
    limiter = _limiter(redis, prefix, concurrency=1)
    order: list[float] = []

    async def ask(priority: float) -> None:
        async with limiter.permit(1, priority):
            order.append(priority)
            await asyncio.sleep(0.05)

    async with limiter.permit(1, 0.0):
        tasks = []
        for priority in (5.0, 3.0, 4.0, 1.0, 2.0):  # arriving in no particular order
            tasks.append(asyncio.create_task(ask(priority)))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == [1.0, 2.0, 3.0, 4.0, 5.0]
    await limiter.close()


class PausedGate:
    """An account gate over the real hash: closed while `paused` is set; `opening()` counts
    its calls and lets a probe through when `probe` is set."""

    def __init__(self, redis: ArqRedis, prefix: str, probe: bool = False) -> None:
        self.redis, self.key, self.probe, self.asked = redis, Keys(prefix).account(), probe, 0

    async def opening(self) -> Opening:
        self.asked += 1
        if await self.redis.hexists(self.key, "paused"):
            return Opening(probe=True) if self.probe else Opening(wait=0.05)
        return Opening()


async def _line(redis: ArqRedis, prefix: str) -> dict[str, int]:
    keys = Keys(prefix)
    return {
        "leases": await redis.zcard(keys.limit_leases()),
        "waiting": await redis.zcard(keys.limit_waiting()),
        "seen": await redis.zcard(keys.limit_seen()),
        "asks": await redis.hlen(keys.limit_asks()),
    }


async def test_a_paused_account_closes_the_gate_in_the_same_step(
    redis: ArqRedis, prefix: str
) -> None:
    """ACQUIRE reads the account's pause itself: an open gate costs no round trip of its own
    (the gate is never asked), a closed one grants nothing and writes nothing, and the
    permit comes as soon as the pause is lifted."""
    limiter = _limiter(redis, prefix, concurrency=2)
    limiter.gate = gate = PausedGate(redis, prefix)
    async with limiter.permit(10):
        pass
    assert gate.asked == 0
    await redis.hset(Keys(prefix).account(), "paused", "out of balance")
    holder = Holder(limiter, 10)
    try:
        await asyncio.sleep(0.3)
        assert not holder.granted.done()
        assert gate.asked >= 2  # it waits on the gate's word, asking again
        assert await _line(redis, prefix) == {"leases": 0, "waiting": 0, "seen": 0, "asks": 0}
        await redis.hdel(Keys(prefix).account(), "paused")
        await holder.wait_granted(2.0)
        assert (await _line(redis, prefix))["leases"] == 1
    finally:
        await holder.end()
        await limiter.close()


async def test_a_probe_passes_a_closed_gate(redis: ArqRedis, prefix: str) -> None:
    limiter = _limiter(redis, prefix, concurrency=2)
    limiter.gate = PausedGate(redis, prefix, probe=True)
    await redis.hset(Keys(prefix).account(), "paused", "out of balance")
    try:
        async with asyncio.timeout(2.0), limiter.permit(10) as permit:
            assert permit.probe
            assert (await _line(redis, prefix))["leases"] == 1
    finally:
        await limiter.close()


async def test_with_nobody_waiting_a_permit_skips_the_line(redis: ArqRedis, prefix: str) -> None:
    """The fast path: a permit that fits while nobody waits is granted without joining the
    line; one that does not fit joins it, and is granted in its turn when a place frees."""
    limiter = _limiter(redis, prefix, concurrency=1, rpm=100, tpm=1000)
    first, second = Holder(limiter, 10), None
    try:
        await first.wait_granted(2.0)
        second = Holder(limiter, 10)  # only now: started together, either could come first
        await asyncio.sleep(0.2)
        assert not second.granted.done()
        line = await _line(redis, prefix)
        assert line["leases"] == 1 and line["waiting"] == 1  # only the one that waits
        await first.end()
        await second.wait_granted(2.0)
        line = await _line(redis, prefix)
        assert line == {"leases": 1, "waiting": 0, "seen": 0, "asks": 0}
    finally:
        await first.end()
        if second is not None:
            await second.end()
        await limiter.close()


@pytest.mark.redis
async def test_what_goes_along_shares_the_asks_round_trip_and_counts_once_granted(
    real_redis_url: str, prefix: str
) -> None:
    """The worker sends its job's START with its first ask for a permit: one round trip, the
    ask first (START checks that the lease is held, as the ZSCORE here does). A permit not
    granted at that ask (another worker holds the only one) gets no `along`: START went for
    nothing (it wrote nothing, and the job starts once the permit comes); and while this
    process's asks wait, nothing goes along."""
    from moonq.redis import connect

    client = connect(real_redis_url)
    batches: list[list[bytes | str]] = []
    send_on = client._send_on  # type: ignore[attr-defined]

    async def spy(conn: Any, batch: list[Any]) -> None:
        batches.append([args[0] for args, _, _ in batch])
        await send_on(conn, batch)

    client._send_on = spy  # type: ignore[attr-defined]
    limiter = _limiter(client, prefix, concurrency=1)
    other = _limiter(client, prefix, concurrency=1)  # another worker's
    sent: list[str] = []

    async def along(lease: str) -> Any:
        sent.append(lease)
        return await client.zscore(Keys(prefix).limit_leases(), lease)

    try:
        async with limiter.permit(10):  # ACQUIRE loaded (a first EVALSHA told NOSCRIPT would
            pass  # be sent again, after what went along: that START would just go again)
        async with limiter.permit(10, along=along) as first:
            assert sent == [first.lease] and first.along is not None  # held when it ran
            assert ["EVALSHA", "ZSCORE"] in batches
        holder = Holder(other, 10)
        await holder.wait_granted(2.0)
        waiting = asyncio.create_task(_enter(limiter.permit(10, along=along)))
        while len(sent) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        later = asyncio.create_task(_enter(limiter.permit(10, along=along)))
        await asyncio.sleep(0.2)  # its first ask has waited too: it sent nothing along
        assert len(sent) == 2 and not waiting.done() and not later.done()
        await holder.end()
        second, third = await asyncio.wait_for(asyncio.gather(waiting, later), 10)
        assert second.along is None  # it ran, but before the permit was granted
        assert third.along is None and len(sent) == 2
        async with limiter.permit(10, along=along) as fourth:  # the last ask did not wait
            assert sent[-1] == fourth.lease and fourth.along is not None
    finally:
        await limiter.close()
        await other.close()
        await client.aclose()


async def test_a_wait_cancelled_as_its_ask_granted_the_permit_gives_it_back(
    redis: ArqRedis, prefix: str
) -> None:
    """A worker's shutdown (or an abort) cancels a job while its ask for a permit is on its
    way: if the ask granted it, the permit goes back at once, not when its lease lapses (it
    would hold a place of the account's concurrency meanwhile)."""
    limiter = _limiter(redis, prefix, concurrency=2, lease_ttl=30.0)
    asked = asyncio.Event()

    async def along(lease: str) -> None:  # the rest of the round trip, slow to answer
        asked.set()
        await asyncio.sleep(30)

    try:
        waiting = asyncio.create_task(_enter(limiter.permit(10, along=along)))
        await asyncio.wait_for(asked.wait(), 5)
        await asyncio.sleep(0.1)  # ACQUIRE has answered: granted
        assert await redis.zcard(Keys(prefix).limit_leases()) == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert await redis.zcard(Keys(prefix).limit_leases()) == 0
    finally:
        await limiter.close()


async def test_a_burst_of_asks_sends_along_only_what_the_limit_can_grant(
    redis: ArqRedis, prefix: str
) -> None:
    """Twenty jobs asking at once where two permits are free: only two send their START
    along (the others would be told to wait, their START wasted); every one gets its permit."""
    limiter = _limiter(redis, prefix, concurrency=2)
    sent: list[str] = []

    async def along(lease: str) -> str:
        sent.append(lease)
        return lease

    try:
        held = await asyncio.wait_for(
            asyncio.gather(*(_enter(limiter.permit(10, along=along)) for _ in range(20))), 30
        )
        assert len(held) == 20 and len(sent) == 2
        assert [p.along for p in held if p.along is not None] == sent
    finally:
        await limiter.close()


async def _enter(permit: Any) -> Any:
    """Take a permit and give it back at once; the permit."""
    async with permit as held:
        return held


async def test_an_uncontended_permit_costs_redis_half_the_work(own_redis: Any) -> None:
    """What the fast path saves, counted by a Redis of the test's own (INFO commandstats,
    the script's inner commands included): a permit while nobody waits runs 13 commands or
    fewer for its ACQUIRE, where joining and leaving the line took 22."""
    client = ArqRedis.from_url(own_redis.url)
    limiter = _limiter(client, "cost", concurrency=5, rpm=100, tpm=10_000)
    limiter.gate = PausedGate(client, "cost")
    try:
        async with limiter.permit(10):  # loads the script, fills the window's keys
            pass
        await client.config_resetstat()
        async with limiter.permit(10):
            stats = await client.info("commandstats")
    finally:
        await limiter.close()
        await client.aclose()
    calls = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
    calls.pop("config|resetstat", None)
    calls.pop("config", None)
    assert calls.pop("evalsha") == 1  # one round trip: the gate is read in it
    assert 8 <= sum(calls.values()) <= 13, calls
    assert "zrank" not in calls and "hset" not in calls  # it never joined the line
