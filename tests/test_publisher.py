"""A worker's events: every running attempt's written together, each fenced on its own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from arq.connections import ArqRedis

from moonq.keys import Keys
from moonq.models import JobCreate
from moonq.store import JobStore
from worker.publisher import AttemptLost, EventWriter, NotStorable


class CountingStore(JobStore):
    calls: list[int]

    async def append_many(self, writes: list[tuple[str, int, list[bytes]]]) -> list[Any]:
        self.calls.append(len(writes))
        return await super().append_many(writes)


@pytest.fixture
async def store(fake_redis: ArqRedis, prefix: str) -> CountingStore:
    store = CountingStore(
        fake_redis, Keys(prefix), queue_name=f"{prefix}:queue", result_ttl=60, max_events=1000
    )
    store.calls = []
    return store


async def _running(store: JobStore) -> tuple[str, int]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    job, _ = await store.create("t", JobCreate.model_validate({"body": body}))
    return job.id, await store.start_attempt(job.id)


async def _log(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _, f in await store.redis.xrange(store.keys.log(job_id))]


async def test_many_attempts_events_go_in_one_call_and_each_keeps_its_order(
    store: CountingStore,
) -> None:
    writer = EventWriter(store)
    (a, a_n), (b, b_n) = await _running(store), await _running(store)
    first, second = writer.publisher(a, a_n), writer.publisher(b, b_n)
    for i in range(3):
        first.emit("chunk", {"i": i})
        second.emit("chunk", {"i": i})
    await first.drain()
    await second.drain()
    assert store.calls == [2]  # one script call carried both jobs' six events
    for job_id in (a, b):
        events = await _log(store, job_id)
        assert [(e["seq"], e["data"]["i"]) for e in events] == [(1, 0), (2, 1), (3, 2)]
    # later events of both go together again, each job's after its earlier ones
    first.emit("chunk", {"i": 3})
    second.emit("chunk", {"i": 3})
    first.emit("chunk", {"i": 4})
    await first.drain()
    await second.drain()
    assert store.calls == [2, 2]
    assert [e["data"]["i"] for e in await _log(store, a)] == [0, 1, 2, 3, 4]


async def test_an_attempt_that_lost_its_job_fails_alone(store: CountingStore) -> None:
    writer = EventWriter(store)
    (live, live_n), (taken, taken_n) = await _running(store), await _running(store)
    assert await store.start_attempt(taken) == taken_n + 1  # a newer attempt has it
    ok, lost = writer.publisher(live, live_n), writer.publisher(taken, taken_n)
    ok.emit("chunk", {"i": 0})
    lost.emit("chunk", {"i": 0})
    with pytest.raises(AttemptLost):
        await lost.drain()
    await ok.drain()
    with pytest.raises(AttemptLost):  # and every later emit says so, writing nothing
        lost.emit("chunk", {"i": 1})
    ok.emit("chunk", {"i": 1})
    await ok.drain()
    assert [e["seq"] for e in await _log(store, live)] == [1, 2]
    assert await _log(store, taken) == []


async def test_a_closed_attempts_unwritten_events_are_dropped(store: CountingStore) -> None:
    writer = EventWriter(store)
    (a, a_n), (b, b_n) = await _running(store), await _running(store)
    closing, other = writer.publisher(a, a_n), writer.publisher(b, b_n)
    other.emit("chunk", {"i": 0})
    closing.emit("chunk", {"i": 0})
    closing.close()
    await other.drain()
    assert await _log(store, a) == []
    assert len(await _log(store, b)) == 1


async def test_closing_the_writer_tells_every_attempt_with_unwritten_events(
    store: CountingStore,
) -> None:
    writer = EventWriter(store)
    (a, a_n), (b, b_n) = await _running(store), await _running(store)
    first, second = writer.publisher(a, a_n), writer.publisher(b, b_n)
    first.emit("chunk", {"i": 0})
    second.emit("chunk", {"i": 0})
    await writer.close()  # the worker shuts down before they are written
    for publisher in (first, second):
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(1):
                await publisher.drain()


async def test_an_event_that_cannot_be_written_fails_at_its_own_emit(store: CountingStore) -> None:
    writer = EventWriter(store)
    (a, a_n), (b, b_n) = await _running(store), await _running(store)
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    bad, good = writer.publisher(a, a_n), writer.publisher(b, b_n)
    good.emit("chunk", {"i": 0})
    with pytest.raises(NotStorable):
        bad.emit("chunk", deep)
    await good.drain()
    await bad.drain()  # nothing of it was queued
    assert len(await _log(store, b)) == 1 and await _log(store, a) == []
