"""The job record: atomic creation, state changes fenced by attempt, TTLs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from arq.connections import ArqRedis

from moonq.keys import Keys
from moonq.models import JobCreate, Status
from moonq.store import JobStore

TTL = 3600


def _store(redis: ArqRedis, prefix: str) -> JobStore:
    return JobStore(
        redis, Keys(prefix), queue_name=f"{prefix}:queue", result_ttl=TTL, max_events=1000
    )


def _request(**extra: Any) -> JobCreate:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return JobCreate.model_validate({"body": body, **extra})


@pytest.fixture(params=["fake", "real"])
def store(request: pytest.FixtureRequest, prefix: str) -> JobStore:
    redis = request.getfixturevalue("fake_redis" if request.param == "fake" else "real_redis")
    return _store(redis, prefix)


async def test_create_writes_record_and_queue_entry_together(store: JobStore) -> None:
    job = await store.create("acme", _request(custom_id="c1"))
    redis, keys = store.redis, store.keys
    assert await redis.zscore(store.queue_name, job.id) is not None
    arq_job = json.loads(await redis.get(f"arq:job:{job.id}"))
    assert arq_job["f"] == "run_completion" and arq_job["a"] == [job.id]  # JSON, not pickle
    assert 0 < await redis.ttl(keys.job(job.id)) <= TTL
    assert await store.get(job.id, "acme") == job
    assert await store.get(job.id, "other") is None


async def test_start_append_finish(store: JobStore) -> None:
    job = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    assert attempt == 1
    assert await store.append(job.id, attempt, [{"event": "chunk", "data": {"n": 1}}]) == 1
    assert (
        await store.append(job.id, attempt, [{"event": "chunk", "data": {"n": i}} for i in (2, 3)])
        == 3
    )
    seq = await store.finish(
        job.id, Status.COMPLETED, {"event": "done", "data": {}}, {"result": {"ok": True}}, attempt
    )
    assert seq == 4
    done = await store.get(job.id)
    assert done is not None and done.status == Status.COMPLETED and done.result == {"ok": True}
    rows = await store.redis.xrange(store.keys.log(job.id))
    events = [json.loads(f[b"e"]) for _, f in rows]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e.get("data", {}).get("n") for e in events[:3]] == [1, 2, 3]
    assert 0 < await store.redis.ttl(store.keys.log(job.id)) <= TTL


async def test_a_superseded_attempt_cannot_write(store: JobStore) -> None:
    job = await store.create("t", _request())
    old = await store.start_attempt(job.id)
    new = await store.start_attempt(job.id)  # e.g. the old worker was presumed dead
    assert new == old + 1
    assert await store.append(job.id, old, [{"event": "chunk", "data": {}}]) == -1
    assert await store.finish(job.id, Status.COMPLETED, {"event": "done"}, {}, old) == -1
    assert not await store.requeue(job.id, old, "late")
    assert await store.append(job.id, new, [{"event": "chunk", "data": {}}]) == 1


async def test_a_finished_job_stays_finished(store: JobStore) -> None:
    job = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    await store.finish(
        job.id, Status.FAILED, {"event": "error"}, {"error": {"type": "x", "message": "m"}}, attempt
    )
    assert await store.start_attempt(job.id) == -1
    assert await store.finish(job.id, Status.COMPLETED, {"event": "done"}, {}, attempt) == -1
    assert await store.append(job.id, attempt, [{"event": "chunk"}]) == -1
    final = await store.get(job.id)
    assert final is not None and final.status == Status.FAILED and final.attempts == 1


async def test_requeue_returns_the_job_to_the_queue_state(store: JobStore) -> None:
    job = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    assert await store.requeue(job.id, attempt, "rate_limit_reached_error: slow down")
    again = await store.get(job.id)
    assert again is not None and again.status == Status.QUEUED and again.attempts == 1
    assert await store.start_attempt(job.id) == 2


async def test_missing_jobs(store: JobStore) -> None:
    assert await store.get("job_" + "0" * 32) is None
    assert await store.start_attempt("job_" + "0" * 32) == -2
