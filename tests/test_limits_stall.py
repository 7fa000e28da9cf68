"""The limiter under stalls and load: a holder that stalled past its lease learns it lost the
permit when its place was given away or someone waits (and never gets it back), takes it back
when neither, and a limiter's Redis work per ask stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from typing import Any

import pytest
from arq.connections import ArqRedis

from moonq.keys import Keys
from moonq.limits import ACQUIRE, HEAD, UpstreamLimiter
from moonq.redis import connect
from tests.test_limits import Holder, _limiter


@pytest.fixture(params=["fake", "real"])
def redis(request: pytest.FixtureRequest) -> ArqRedis:
    client: ArqRedis = request.getfixturevalue(
        "fake_redis" if request.param == "fake" else "real_redis"
    )
    return client


async def _leases(redis: ArqRedis, prefix: str) -> list[str]:
    raw = await redis.zrange(Keys(prefix).limit_leases(), 0, -1)
    return [m.decode() if isinstance(m, bytes) else m for m in raw]


async def test_a_stalled_holder_learns_its_lease_was_given_away(
    redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 0.5
    stalled = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    other = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    resume = asyncio.Event()
    renew = stalled._renew

    async def stuck_renewal(**kwargs: Any) -> Any:  # the holder's renewer cannot run
        await resume.wait()
        return await renew(**kwargs)

    monkeypatch.setattr(stalled, "_renew", stuck_renewal)
    held = stalled.permit(10)
    permit = await held.__aenter__()
    taker = Holder(other, 10)
    try:
        await taker.wait_granted(3.0)  # the lapsed lease's place went to the only other asker
        assert not permit.lost.is_set()  # nothing has told the stalled holder yet
        resume.set()
        async with asyncio.timeout(2 * ttl):  # ... until its next renewal
            await permit.lost.wait()
        await asyncio.sleep(2 * ttl)  # several renewal periods: it must not come back
        leases = await _leases(redis, prefix)
        assert len(leases) == 1 and permit.lease not in leases  # only the taker holds one
    finally:
        await held.__aexit__(None, None, None)
        await taker.end()
        await stalled.close()
        await other.close()


async def test_a_stalled_process_loses_its_lease_to_another(
    real_redis: ArqRedis, real_redis_url: str, prefix: str
) -> None:
    """Two limiters, each with its own Redis client and event loop: the first one's whole loop
    stalls (as a paused or swapping process does) past the lease ttl while holding the only
    permit. The second takes the permit; the first learns it at once when it wakes."""
    ttl, stall = 0.5, 2.0
    acquired = threading.Event()
    seen: dict[str, Any] = {}

    async def process_a() -> None:
        client = connect(real_redis_url)
        limiter = _limiter(client, prefix, concurrency=1, lease_ttl=ttl)
        try:
            async with limiter.permit(10) as permit:
                seen["lease"] = permit.lease
                acquired.set()
                time.sleep(stall)  # noqa: ASYNC251 - the stall itself: no renewal can run
                seen["woke"] = time.monotonic()
                with contextlib.suppress(TimeoutError):  # not learnt: asserted below
                    async with asyncio.timeout(2 * ttl):
                        await permit.lost.wait()
                        seen["learnt"] = time.monotonic()
        finally:
            await limiter.close()
            await client.aclose()

    thread = threading.Thread(target=lambda: _run_recording(process_a(), seen))
    thread.start()
    limiter = _limiter(real_redis, prefix, concurrency=1, lease_ttl=ttl)
    try:
        assert await asyncio.to_thread(acquired.wait, 5.0)
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(stall):
                permit = await stack.enter_async_context(limiter.permit(10))
            granted = time.monotonic()
            await asyncio.to_thread(thread.join, 10.0)  # the first one woke, and let go
            leases = await _leases(real_redis, prefix)
    finally:
        await asyncio.to_thread(thread.join, 10.0)
        await limiter.close()
    assert "error" not in seen, seen.get("error")
    assert granted < seen["woke"]  # it took the permit while the first was stalled
    assert "learnt" in seen  # the first one learnt it at its next renewal
    assert leases == [permit.lease]  # and its lease was not revived


def _run_recording(coro: Any, seen: dict[str, Any]) -> None:
    try:
        asyncio.run(coro)
    except BaseException as exc:  # surfaced by the test's own assertion
        seen["error"] = repr(exc)


def _counting(script: str) -> str:
    """The script, also returning its work: each Redis call, plus each element it returned."""
    return (
        "local work = 0\n"
        "local function counted(...)\n"
        "  local r = redis.call(...)\n"
        "  work = work + 1 + (type(r) == 'table' and #r or 0)\n"
        "  return r\n"
        "end\n"
        "local function body()\n"
        + script.replace("redis.call(", "counted(")
        + "\nend\nreturn {body(), work}\n"
    )


async def test_an_ask_costs_the_same_however_long_the_line_and_window(
    real_redis: ArqRedis, prefix: str
) -> None:
    """3,000 requests in the TPM window and 300 waiters: what one ask makes Redis do stays
    bounded (it used to read the whole window and every waiter ahead, on every ask)."""
    limiter: UpstreamLimiter = _limiter(real_redis, prefix, tpm=30_000)
    keys = limiter._keys()
    for start in range(0, 3000, 500):  # limits off: all granted, 10 tokens each
        async with real_redis.pipeline(transaction=False) as pipe:
            for i in range(start, start + 500):
                await limiter._acquire(
                    keys=keys, args=[uuid.uuid4().hex, 10_000, 0, 0, 0, 10, i], client=pipe
                )
            assert set(await pipe.execute()) == {0}
    counted = real_redis.register_script(_counting(ACQUIRE))
    waiters = [uuid.uuid4().hex for _ in range(300)]
    work: dict[int, int] = {}
    for rank, lease in enumerate(waiters):  # the window is full: every one of them waits
        wait_ms, work[rank] = await counted(
            keys=keys, args=[lease, 10_000, 0, 0, 30_000, 10, 1e6 + rank]
        )
        assert wait_ms > 0
    for rank in (0, 99, 100, 299):  # and once more, each with the whole line in place
        wait_ms, work[rank] = await counted(
            keys=keys, args=[waiters[rank], 10_000, 0, 0, 30_000, 10, 1e6 + rank]
        )
        assert wait_ms > 0
    assert await real_redis.zcard(Keys(prefix).limit_waiting()) == 300
    assert max(work.values()) <= 800, sorted(work.items(), key=lambda kv: -kv[1])[:5]


def _stuck(limiter: UpstreamLimiter, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The limiter's renewals wait until the event is set (its holder is late, as a process
    whose loop is behind under load is); the returned event resumes them."""
    resume = asyncio.Event()
    renew = limiter._renew

    async def stuck_renewal(**kwargs: Any) -> Any:
        await resume.wait()
        return await renew(**kwargs)

    monkeypatch.setattr(limiter, "_renew", stuck_renewal)
    return resume


async def test_a_lapsed_lease_is_taken_back_while_the_limit_has_room(
    redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its expiry, a lease nobody took and nobody waits for is taken back at the late
    renewal: its request goes on (it used to be stopped and run again: with a worker's loop
    late under load, thousands of streams were restarted), and the limit still holds."""
    ttl = 0.3
    limiter = _limiter(redis, prefix, concurrency=2, lease_ttl=ttl)
    other = _limiter(redis, prefix, concurrency=2, lease_ttl=ttl)
    resume = _stuck(limiter, monkeypatch)
    try:
        async with limiter.permit(10) as permit:
            await asyncio.sleep(3 * ttl)
            assert await _leases(redis, prefix) == [permit.lease]  # lapsed, not yet dropped
            async with other.permit(10) as second:  # an ACQUIRE drops the lapsed lease...
                assert await _leases(redis, prefix) == [second.lease]
                resume.set()
                await asyncio.sleep(4 * ttl)  # several renewals: taken back, then renewed
                assert not permit.lost.is_set()
                assert sorted(await _leases(redis, prefix)) == sorted([permit.lease, second.lease])
                with pytest.raises(TimeoutError):  # ... and the limit of 2 still holds
                    async with asyncio.timeout(3 * ttl), other.permit(10):
                        pass
    finally:
        await limiter.close()
        await other.close()


async def test_a_lapsed_lease_is_lost_when_the_limit_is_full(
    redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking a lapsed lease back never goes past the limit: with its place given away
    meanwhile, its holder must stop."""
    ttl = 0.3
    limiter = _limiter(redis, prefix, concurrency=2, lease_ttl=ttl)
    others = [_limiter(redis, prefix, concurrency=2, lease_ttl=ttl) for _ in range(2)]
    resume = _stuck(limiter, monkeypatch)
    holders: list[Holder] = []
    try:
        async with limiter.permit(10) as permit:
            holders = [Holder(other, 10) for other in others]
            for holder in holders:  # one at once, one once the stalled lease lapsed
                await holder.wait_granted(3.0)
            resume.set()
            await asyncio.wait_for(permit.lost.wait(), 2 * ttl)
            assert permit.lease not in await _leases(redis, prefix)
    finally:
        for holder in holders:
            await holder.end()
        await limiter.close()
        for other in others:
            await other.close()


async def test_a_lapsed_lease_is_lost_when_someone_waits(
    redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nor does it pass over a job waiting in line, even with a permit free: the holder stops
    (here the waiter waits for the minute's requests, not for a permit)."""
    ttl = 0.3
    limiter = _limiter(redis, prefix, concurrency=2, rpm=1, lease_ttl=ttl)
    other = _limiter(redis, prefix, concurrency=2, rpm=1, lease_ttl=ttl)
    resume = _stuck(limiter, monkeypatch)
    waiter: Holder | None = None
    try:
        async with limiter.permit(10) as permit:
            waiter = Holder(other, 10)
            await asyncio.sleep(3 * ttl)  # the lease lapsed; the waiter is in line
            assert await redis.zcard(Keys(prefix).limit_waiting()) == 1
            resume.set()
            await asyncio.wait_for(permit.lost.wait(), 2 * ttl)
            assert permit.lease not in await _leases(redis, prefix)
    finally:
        if waiter is not None:
            await waiter.end()
        await limiter.close()
        await other.close()


async def test_a_permit_released_while_its_renewal_is_on_its_way_stays_released(
    redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permit ends while a renewal naming its lease is on its way: its release waits for
    that renewal's answer, since a release that overtook it (different tasks' commands are
    not ordered) would leave RENEW to find the lease gone and take it back, held by nobody,
    filling a place for a whole ttl (a review's finding)."""
    ttl = 1.5
    limiter = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    other = _limiter(redis, prefix, concurrency=1, lease_ttl=ttl)
    resume = _stuck(limiter, monkeypatch)
    try:
        held = limiter.permit(10)
        permit = await held.__aenter__()
        await asyncio.sleep(ttl / 3 + 0.1)  # the first renewal is on its way (held up)
        ending = asyncio.create_task(held.__aexit__(None, None, None))
        await asyncio.sleep(0.2)
        assert not ending.done() and await _leases(redis, prefix) == [permit.lease]
        resume.set()  # the renewal answers first, then the release goes
        await asyncio.wait_for(ending, 2.0)
        assert await _leases(redis, prefix) == []
        async with asyncio.timeout(0.5), other.permit(10):  # the place is free at once
            pass
    finally:
        await limiter.close()
        await other.close()


async def test_tpm_forgets_requests_older_than_a_minute(redis: ArqRedis, prefix: str) -> None:
    """The window's token total follows entries leaving the window."""
    keys = Keys(prefix)
    now_ms = int((await redis.time())[0]) * 1000
    await redis.zadd(keys.limit_window(), {"old:100": now_ms - 61_000, "recent:10": now_ms})
    await redis.set(keys.limit_window_tokens(), 110)  # as the ACQUIREs that added them left it
    limiter = _limiter(redis, prefix, tpm=100)
    try:
        async with asyncio.timeout(0.5), limiter.permit(90):  # all the rest of the minute
            pass
    finally:
        await limiter.close()


async def test_tpm_counts_a_window_written_before_its_total(redis: ArqRedis, prefix: str) -> None:
    """A window without its total (written by an older moonq) is summed once, not ignored."""
    keys = Keys(prefix)
    now_ms = int((await redis.time())[0]) * 1000
    await redis.zadd(keys.limit_window(), {"recent:60": now_ms})
    limiter = _limiter(redis, prefix, tpm=100)
    waiter = Holder(limiter, 60)
    try:
        await asyncio.sleep(0.5)
        assert not waiter.granted.done()  # 60 + 60 > 100
    finally:
        await waiter.end()
        await limiter.close()


async def test_a_line_longer_than_the_head_is_served_in_full(
    real_redis: ArqRedis, prefix: str
) -> None:
    """Only the first HEAD waiters are considered per ask; those behind still get through."""
    limiter = _limiter(real_redis, prefix, concurrency=500, tpm=10_000)
    line: list[Holder] = []
    try:
        async with limiter.permit(10_000) as first:  # the whole minute's tokens in use
            line += [Holder(limiter, 10) for _ in range(HEAD + 50)]
            await asyncio.sleep(1.0)
            assert not any(h.granted.done() for h in line)
            first.used = 0
        async with asyncio.timeout(8):
            await asyncio.gather(*(h.wait_granted(8) for h in line))
    finally:
        for h in line:
            await h.end()
        await limiter.close()
