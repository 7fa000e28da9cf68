"""Faults found by review (issue 6), each on real Redis: scripts that must not half-apply,
deterministic failures that must not be retried, the limiter's estimate given back, an
impossible request that must not wait, and paging that must not repeat a job."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from moonq.fake_moonshot import FakeServer, expected_content
from moonq.keys import Keys
from moonq.listing import JobLister
from moonq.models import JobCreate, Status
from moonq.store import InvalidUsage, JobStore, utc_day
from tests.conftest import Stack, chat, submit
from tests.serving import worker_running
from worker.jobs import Runner
from worker.main import ARQ_MAX_TRIES, create_worker

pytestmark = pytest.mark.redis


async def _job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
    return job


async def _assert_ended_cleanly(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """One terminal event, consecutive seqs, and the job and its log expire."""
    events = await stack.events(job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sum(e["event"] in ("done", "error", "cancelled") for e in events) == 1
    prefix = stack.settings.key_prefix
    assert await stack.redis.ttl(f"{prefix}:job:{job_id}") > 0
    assert await stack.redis.ttl(f"{prefix}:log:{job_id}") > 0
    return events


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 1, "completion_tokens": 10**20, "total_tokens": 10**20},
        {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": True},
        {"prompt_tokens": -5, "completion_tokens": 1, "total_tokens": 1},
        {"prompt_tokens": 1.5, "completion_tokens": 1, "total_tokens": 2},
    ],
)
async def test_an_absurd_usage_fails_the_job_once_and_counts_nothing(
    real_stack: Any, fake: FakeServer, usage: Any
) -> None:
    stack, client = await real_stack()
    job_id = await submit(client, chat("absurd", fake_moonshot={"usage": usage}))
    fine = await submit(client, chat("fine"))
    await stack.run_worker()
    job = await _job(client, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["type"] == "upstream_invalid_usage"
    assert fake.stats.requests == 2  # called once, never retried
    events = await _assert_ended_cleanly(stack, job_id)
    assert events[-1]["event"] == "error"
    # the tenant's usage holds the good job's alone
    total = (await client.get("/v1/usage")).json()["total"]
    fine_usage = (await _job(client, fine))["usage"]
    assert total["jobs"] == 1
    assert {name: total[name] for name in fine_usage} == fine_usage


def _store(redis: ArqRedis, prefix: str) -> JobStore:
    return JobStore(
        redis, Keys(prefix), queue_name=f"{prefix}:queue", result_ttl=3600, max_events=1000
    )


def _request(text: str = "hi", **extra: Any) -> JobCreate:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return JobCreate.model_validate({"body": body, **extra})


async def test_finish_refuses_bad_usage_before_writing_anything(
    real_redis: ArqRedis, prefix: str
) -> None:
    store = _store(real_redis, prefix)
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    before = await real_redis.hgetall(store.keys.job(job.id))
    with pytest.raises(InvalidUsage):
        await store.finish(
            job.id,
            Status.COMPLETED,
            {"event": "done", "data": {}},
            {"usage": {"prompt_tokens": 1, "total_tokens": 10**20}},
            attempt,
            tenant="t",
        )
    # A tenant's totals that one more job would overflow: Lua refuses before its first write.
    day = store.keys.usage("t", utc_day(store.clock()))
    await real_redis.hset(day, "m|total_tokens", str(2**63 - 10))
    with pytest.raises(Exception, match="usage total_tokens is not a countable amount"):
        await store.finish(
            job.id,
            Status.COMPLETED,
            {"event": "done", "data": {}},
            {"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 100}},
            attempt,
            tenant="t",
        )
    assert await real_redis.hgetall(store.keys.job(job.id)) == before  # still in progress
    assert await real_redis.xlen(store.keys.log(job.id)) == 0
    usage = await real_redis.hgetall(day)
    assert usage == {b"m|total_tokens": str(2**63 - 10).encode()}  # nothing half-added
    assert await real_redis.ttl(store.keys.job(job.id)) == -1


async def test_a_write_redis_refuses_fails_the_job_once(real_stack: Any, fake: FakeServer) -> None:
    """A script's error reply is deterministic: retrying the job would call (and pay) the
    upstream again for the same refusal. Here the tenant's totals are corrupt."""
    stack, client = await real_stack()
    today = utc_day(time.time())
    usage_key = f"{stack.settings.key_prefix}:usage:default:{today}"
    await stack.redis.hset(usage_key, "moonshot-v1-8k|jobs", "not a number")
    job_id = await submit(client, chat("refused"))
    await stack.run_worker()
    job = await _job(client, job_id)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "internal_error"
    assert fake.stats.requests == 1
    await _assert_ended_cleanly(stack, job_id)


async def test_an_upstream_error_gives_its_token_estimate_back(
    real_stack: Any, fake: FakeServer
) -> None:
    """A request the upstream refused before generating anything used no tokens: the next
    job must not wait a minute for its estimate to leave the TPM window."""
    stack, client = await real_stack(MOONQ_UPSTREAM_TPM=4000)
    big = "x" * 9000  # an estimate of ~3,000 tokens: two cannot share a minute
    refused = await submit(client, chat(big, fake_moonshot={"error": "invalid_request_error"}))
    await stack.run_worker()
    assert (await _job(client, refused))["status"] == "failed"
    after = await submit(client, chat(big))
    started = asyncio.get_running_loop().time()
    await stack.run_worker()
    assert (await _job(client, after))["status"] == "completed"
    assert asyncio.get_running_loop().time() - started < 10  # not the rest of the minute


async def test_a_queued_job_that_can_never_fit_fails_at_once(
    real_stack: Any, fake: FakeServer
) -> None:
    """A job queued before MOONQ_UPSTREAM_TPM was lowered below its estimate fails with a
    clear error instead of holding up every job behind it."""
    stack, client = await real_stack(MOONQ_UPSTREAM_TPM=0)
    huge = await submit(client, chat("y" * 30000))  # an estimate of ~10,000 tokens
    small = await submit(client, chat("small"))
    limited = Stack(stack.settings.model_copy(update={"upstream_tpm": 1000}), stack.redis)
    started = asyncio.get_running_loop().time()
    await limited.run_worker()
    job = await _job(client, huge)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "request_too_large"
    assert "MOONQ_UPSTREAM_TPM" in job["error"]["message"]
    assert (await _job(client, small))["status"] == "completed"
    assert asyncio.get_running_loop().time() - started < 10
    assert fake.stats.requests == 1  # the impossible one never reached the upstream


async def test_paging_never_repeats_a_job_while_jobs_are_created(
    real_redis: ArqRedis, prefix: str
) -> None:
    store = _store(real_redis, prefix)
    existing = [(await store.create("t", _request(f"old {i}")))[0].id for i in range(60)]
    stop = asyncio.Event()

    async def create_meanwhile() -> None:
        n = 0
        while not stop.is_set():
            await store.create("t", _request(f"new {n}"))
            n += 1
            await asyncio.sleep(0)

    creator = asyncio.create_task(create_meanwhile())
    seen: list[str] = []
    after = None
    try:
        while True:
            page, more = await JobLister(store).page("t", limit=7, after=after)
            seen += [job.id for job in page]
            await asyncio.sleep(0.005)
            if not more:
                break
            after = page[-1].id
    finally:
        stop.set()
        await creator
    assert len(seen) == len(set(seen))  # no job twice
    assert set(existing) <= set(seen)  # and none skipped


async def test_status_filter_reads_only_matching_jobs(real_redis: ArqRedis, prefix: str) -> None:
    """`?status=failed&limit=1` among thousands of jobs reads a handful of records, not all,
    and never the stored requests."""
    store = _store(real_redis, prefix)
    jobs = [(await store.create("t", _request("z" * 20000)))[0].id for _ in range(300)]
    failed = jobs[100]
    attempt = await store.start_attempt(failed)
    error = {"type": "content_filter", "message": "no"}
    await store.finish(
        failed,
        Status.FAILED,
        {"event": "error", "data": error},
        {"error": error},
        attempt,
        tenant="t",
    )
    reads = _count_replies(real_redis)
    listed, more = await JobLister(store).page("t", limit=1, status=Status.FAILED)
    assert [j.id for j in listed] == [failed] and not more
    queued, more = await JobLister(store).page("t", limit=5, status=Status.QUEUED)
    assert len(queued) == 5 and more and failed not in [j.id for j in queued]
    job = await store.get(jobs[0], "t")
    assert job is not None and job.status == Status.QUEUED
    assert reads.bytes < 20_000  # the 20 kB requests are never read
    assert reads.commands < 20


class _Replies:
    def __init__(self) -> None:
        self.commands = 0
        self.bytes = 0


def _count_replies(redis: ArqRedis) -> _Replies:
    """Count the commands sent through `redis` and the size of their replies."""
    counts = _Replies()
    send = redis.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        counts.commands += 1
        reply = await send(*args, **options)
        counts.bytes += len(json.dumps(reply, default=repr))
        return reply

    redis.execute_command = counted  # type: ignore[method-assign]
    pipeline = redis.pipeline

    def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def run(*a: Any, **k: Any) -> Any:
            counts.commands += len(pipe.command_stack)
            replies = await execute(*a, **k)
            counts.bytes += len(json.dumps(replies, default=repr))
            return replies

        pipe.execute = run  # type: ignore[method-assign]
        return pipe

    redis.pipeline = counted_pipeline  # type: ignore[method-assign]
    return counts


async def test_listing_filters_by_custom_id(real_redis: ArqRedis, prefix: str) -> None:
    store = _store(real_redis, prefix)
    mine = [(await store.create("t", _request(custom_id="doc-7")))[0].id for _ in range(2)]
    await store.create("t", _request(custom_id="doc-8"))
    await store.create("other", _request(custom_id="doc-7"))
    listed, more = await JobLister(store).page("t", limit=10, custom_id="doc-7")
    assert [j.id for j in listed] == list(reversed(mine)) and not more
    assert await JobLister(store).page("t", limit=10, batch_id="batch_x") == ([], False)


async def _lapse_mid_stream(stack: Any, job_id: str, handed_on: bool) -> None:
    """As if the job's permit lapsed during a stall once 4 events were out: its lease is
    gone, and with `handed_on` its place is another holder's for the next 1.5 s."""
    leases = f"{stack.settings.key_prefix}:limit:leases"
    for _ in range(500):
        if len(await stack.events(job_id)) >= 4:
            break
        await asyncio.sleep(0.02)
    seconds, micros = await stack.redis.time()
    async with stack.redis.pipeline(transaction=True) as pipe:
        pipe.delete(leases)
        if handed_on:
            pipe.zadd(leases, {"another-holder": seconds * 1000 + micros // 1000 + 1500})
        await pipe.execute()


async def _through_a_lapse(real_stack: Any, handed_on: bool) -> tuple[Any, Any, list[Any]]:
    """A 20-chunk job run by a worker whose permit lapses mid-stream (`_lapse_mid_stream`),
    to its end: (the stack, the job as the API shows it, its events). Its answer is whole."""
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=1, MOONQ_LOCK_TIMEOUT=1)
    payload = chat(f"permit handed on: {handed_on}", fake_moonshot={"chunks": 20, "delay": 0.1})
    job_id = await submit(client, payload)
    lapsing = asyncio.create_task(_lapse_mid_stream(stack, job_id, handed_on=handed_on))
    await stack.run_worker()
    await lapsing
    job = await _job(client, job_id)
    assert job["result"]["choices"][0]["message"]["content"] == expected_content(payload["body"])
    return stack, job, await stack.events(job_id)


async def test_a_run_whose_permit_lapsed_stops_and_the_job_runs_again(real_stack: Any) -> None:
    """A worker that stalled past its upstream permit's lease, its place handed on, learns it
    at its next renewal, stops its stream and hands the job back: the concurrency limit is
    never exceeded."""
    _, job, events = await _through_a_lapse(real_stack, handed_on=True)
    assert job["status"] == "completed" and job["attempts"] == 2
    first = [e for e in events if e["attempt"] == 1 and e["event"] == "chunk"]
    assert 4 <= len(first) < 22  # the first attempt stopped mid-stream
    assert [e["event"] for e in events].count("retry") == 1


async def test_a_run_whose_permit_lapsed_unclaimed_goes_on(real_stack: Any) -> None:
    """The same stall with nobody taking the place or waiting for it: the renewal takes the
    permit back and the stream goes on, one attempt, nothing sent upstream twice."""
    stack, job, events = await _through_a_lapse(real_stack, handed_on=False)
    assert job["status"] == "completed" and job["attempts"] == 1
    assert {e["attempt"] for e in events} == {1}  # no retry: one stream, read once
    assert [e["event"] for e in events].count("chunk") >= 20
    leases = f"{stack.settings.key_prefix}:limit:leases"
    assert await stack.redis.zcard(leases) == 0  # taken back, then released at the end


async def test_a_run_fenced_at_its_last_write_leaves_the_job_to_its_new_holder(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A stalls just before it records the result; B takes the job over meanwhile. A's
    final write is fenced, and A's end must not make arq forget the job B now holds: when B
    hands it back, the job still runs and completes."""
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=0)
    job_id = await submit(client, chat("fenced at the end"))
    redis = stack.redis
    lock = f"arq:in-progress:{job_id}"
    store = JobStore.from_settings(redis, stack.settings)
    finish = JobStore.finish
    taken: dict[str, int] = {}

    async def stalled_finish(self: JobStore, job: str, status: Status, *a: Any, **k: Any) -> int:
        if not taken:  # A's lock lapses; B locks the job and starts attempt 2
            await redis.set(lock, "worker-b", px=5000)
            taken["b"] = await store.start_attempt(job, "B", "worker-b", 5)
        return await finish(self, job, status, *a, **k)

    monkeypatch.setattr(JobStore, "finish", stalled_finish)
    worker = create_worker(stack.settings, redis=redis, handle_signals=False)
    running = asyncio.create_task(worker.main())
    try:
        for _ in range(200):  # until A's run has ended
            if worker.jobs_retried or worker.jobs_complete:
                break
            await asyncio.sleep(0.05)
        assert taken["b"] == 2 and worker.jobs_retried == 1
        assert await redis.zscore(stack.settings.queue_name, job_id) is not None  # arq kept it
        assert await redis.exists(f"arq:job:{job_id}")
        assert await redis.get(lock) == b"worker-b"  # and B's lock
        monkeypatch.setattr(JobStore, "finish", finish)
        assert await store.requeue(job_id, 2, "B shut down") == 1  # B hands it back...
        await redis.delete(lock)  # ... and releases its lock
        for _ in range(200):
            if (await _job(client, job_id))["status"] == "completed":
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.close()  # stops its poll loop, even if the cancel of its main task is lost
        await asyncio.wait({running}, timeout=10)
    job = await _job(client, job_id)
    assert job["status"] == "completed" and job["attempts"] == 3
    await _assert_ended_cleanly(stack, job_id)


async def test_start_refuses_a_run_that_lost_arqs_lock(real_redis: ArqRedis, prefix: str) -> None:
    """A run that stalled past its lock must not start the job under the run holding it."""
    store = _store(real_redis, prefix)
    job, _ = await store.create("t", _request())
    lock = f"arq:in-progress:{job.id}"
    await real_redis.set(lock, "other-worker", px=5000)
    try:
        assert await store.start_attempt(job.id, "w", "this-worker", 5) == -3
        assert (await store.get(job.id, "t")).status == Status.QUEUED  # type: ignore[union-attr]
        await real_redis.delete(lock)
        assert await store.start_attempt(job.id, "w", "this-worker", 5) == 1  # free: taken
        assert await real_redis.get(lock) == b"this-worker"
        assert 0 < await real_redis.pttl(lock) <= 5000
    finally:
        await real_redis.delete(lock)


@pytest.mark.parametrize("damage", [("tenant", None), ("created_at", "not a time")])
async def test_scripts_refuse_a_malformed_record_before_writing(
    real_redis: ArqRedis, prefix: str, damage: tuple[str, str | None]
) -> None:
    store = _store(real_redis, prefix)
    job, _ = await store.create("t", _request())
    key = store.keys.job(job.id)
    attempt = await store.start_attempt(job.id)
    field, value = damage
    if value is None:
        await real_redis.hdel(key, field)
    else:
        await real_redis.hset(key, field, value)
    before = await real_redis.hgetall(key)
    done = {"event": "done", "data": {}}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    with pytest.raises(Exception, match="malformed"):
        await store.finish(job.id, Status.COMPLETED, done, {"usage": usage}, attempt, tenant="t")
    with pytest.raises(Exception, match="malformed"):
        await store.requeue(job.id, attempt, "again")
    assert await real_redis.hgetall(key) == before
    assert await real_redis.ttl(key) == -1 and await real_redis.xlen(store.keys.log(job.id)) == 0
    assert await real_redis.hgetall(store.keys.usage("t", utc_day(store.clock()))) == {}
    in_progress = store.keys.tenant_status("t", "in_progress")
    assert await real_redis.zscore(in_progress, job.id) is not None  # indexes untouched


async def test_a_job_arq_gives_up_on_fails_instead_of_vanishing(real_stack: Any) -> None:
    """arq drops a job without running it when its entry is gone (or it was tried too often);
    moonq fails the job first, so it ends with an error and a TTL instead of staying queued
    for ever with nothing left to run it."""
    stack, client = await real_stack()
    job_id = await submit(client, chat("its arq entry is lost"))
    await stack.redis.delete(f"arq:job:{job_id}")
    await stack.run_worker()
    job = await _job(client, job_id)
    assert job["status"] == "failed" and job["error"]["type"] == "worker_lost"
    await _assert_ended_cleanly(stack, job_id)
    assert await stack.redis.zscore(stack.settings.queue_name, job_id) is None


async def test_a_corrupt_metrics_counter_cannot_break_a_jobs_end(real_stack: Any) -> None:
    """FINISH counts every ending in the metrics hash; a field there that is no integer is
    read before the first write and skipped, never an error after it."""
    stack, client = await real_stack()
    field = '["moonq_jobs_finished_total",{"status":"completed"}]'
    await stack.redis.hset(f"{stack.settings.key_prefix}:metrics", field, "not a number")
    job_id = await submit(client, chat("counted or not"))
    await stack.run_worker()
    job = await _job(client, job_id)
    assert job["status"] == "completed", job
    await _assert_ended_cleanly(stack, job_id)


def _before_start(monkeypatch: pytest.MonkeyPatch, once: Any) -> None:
    """Run `once()` in the first run between its read of the job's record and its START:
    where a run waits for the upstream's token count and for a permit."""
    original = Runner._tokens
    pending = [once]

    async def tokens(self: Runner, body: dict[str, Any]) -> int:
        if pending:
            await pending.pop()()
        return await original(self, body)

    monkeypatch.setattr(Runner, "_tokens", tokens)


async def test_a_run_starts_from_the_record_as_of_its_start_not_its_first_read(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled run whose lock lapsed may still write chunks after the run that took the
    job over read its record, and before that run starts: the new attempt still begins with
    a `retry` event, so a reader drops the first attempt's text (`moonq watch` into a file
    would otherwise hold two answers run together)."""
    stack, client = await real_stack()
    store = JobStore.from_settings(stack.redis, stack.settings)
    job_id = await submit(client, chat("taken over"))
    assert await store.start_attempt(job_id, "stalled", "stalled-lock", 5) == 1
    await stack.redis.delete(f"arq:in-progress:{job_id}")  # its lock lapsed

    async def the_stalled_run_wakes() -> None:
        chunk = {"event": "chunk", "attempt": 1, "data": {"choices": []}}
        assert await store.append(job_id, 1, [chunk, chunk]) == 2

    _before_start(monkeypatch, the_stalled_run_wakes)
    await stack.run_worker()
    events = await stack.events(job_id)
    assert [(e["attempt"], e["event"]) for e in events[:3]] == [
        (1, "chunk"),
        (1, "chunk"),
        (2, "retry"),
    ]
    assert events[-1]["event"] == "done" and (await _job(client, job_id))["attempts"] == 2


async def test_a_run_that_lost_its_lock_before_starting_gives_its_permit_back(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that got its permit but finds at START that another run holds the job sends no
    request: its token estimate must not stay in the account's TPM window for a minute."""
    stack, client = await real_stack(MOONQ_UPSTREAM_TPM=4000)
    big = "x" * 9000  # an estimate of ~3,000 tokens: two cannot share a minute
    job_id = await submit(client, chat(big))

    async def another_run_takes_the_lock() -> None:  # for a moment: then this worker may
        await stack.redis.set(f"arq:in-progress:{job_id}", "another-run", px=300)

    _before_start(monkeypatch, another_run_takes_the_lock)
    started = asyncio.get_running_loop().time()
    await stack.run_worker()
    job = await _job(client, job_id)
    assert job["status"] == "completed" and job["attempts"] == 1
    assert asyncio.get_running_loop().time() - started < 10  # not the rest of the minute


def _refusing_finish(monkeypatch: pytest.MonkeyPatch) -> list[Status]:
    """FINISH refused for the job's live attempt (as Redis refuses a write it would refuse
    again), after its fence, as the script checks: a stale attempt is still told -1."""
    original = JobStore.finish
    refused: list[Status] = []

    async def finish(self: JobStore, job_id: str, status: Status, *args: Any, **kw: Any) -> int:
        attempt = args[2] if len(args) > 2 else kw.get("attempt")
        live = await self.redis.hget(self.keys.job(job_id), "attempts")  # type: ignore[misc]
        if attempt is None or str(attempt).encode() == live:
            refused.append(status)
            raise ResponseError("ERR moonq: the record is malformed")
        return await original(self, job_id, status, *args, **kw)

    monkeypatch.setattr(JobStore, "finish", finish)
    return refused


async def test_a_job_whose_end_redis_refuses_waits_instead_of_calling_the_upstream_again(
    real_stack: Any, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even failing the job is refused, it stays queued and is tried again only after
    a while: never a loop that calls (and pays) the upstream again at once."""
    stack, client = await real_stack()
    refused = _refusing_finish(monkeypatch)
    job_id = await submit(client, chat("refused"))
    async with worker_running(stack):
        await asyncio.sleep(2)
    assert fake.stats.requests == 1
    assert refused == [Status.COMPLETED, Status.FAILED, Status.FAILED]  # answer, fail, fail
    score = await stack.redis.zscore(stack.settings.queue_name, job_id)
    assert score is not None and score > (time.time() + 50) * 1000  # deferred a minute
    assert (await _job(client, job_id))["status"] == "in_progress"


async def test_a_job_arq_gives_up_on_that_cannot_be_failed_is_kept_for_later(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """arq gives up on a job tried too often; if failing it is refused too, it is not
    forgotten (it would stay `queued` for ever with nothing to run it): it stays in arq's
    queue, deferred, and fails once that works."""
    stack, client = await real_stack()
    job_id = await submit(client, chat("given up"))
    await stack.redis.set(f"arq:retry:{job_id}", ARQ_MAX_TRIES)  # its last try was spent
    refused = _refusing_finish(monkeypatch)
    async with worker_running(stack):
        for _ in range(100):
            if refused:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    assert refused == [Status.FAILED]
    queue = stack.settings.queue_name
    score = await stack.redis.zscore(queue, job_id)
    assert score is not None and score > (time.time() + 50) * 1000  # deferred a minute
    assert await stack.redis.exists(f"arq:job:{job_id}")
    assert (await _job(client, job_id))["status"] == "queued"
    monkeypatch.undo()  # the store takes writes again; the job falls due
    await stack.redis.zadd(queue, {job_id: time.time() * 1000})
    await stack.run_worker()
    job = await _job(client, job_id)
    assert job["status"] == "failed" and job["error"]["type"] == "worker_lost"
    assert await stack.redis.zscore(queue, job_id) is None


@pytest.mark.parametrize("skew", ["api ahead", "worker behind"])
async def test_the_queue_keeps_redis_time_whatever_the_hosts_clocks_say(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch, skew: str
) -> None:
    """The API and the workers may run on hosts whose clocks disagree (here by 20 s): a new
    job still starts at once (its queue entry is not in the future of the worker that reads
    it), and a retry still waits as long as the upstream's Retry-After asks, not 20 s less
    (the upstream's rate limit would answer 429 again) or more."""
    stack, client = await real_stack()
    store = JobStore.from_settings(stack.redis, stack.settings)
    if skew == "api ahead":
        store.clock = lambda: time.time() + 20
    else:
        behind = lambda: int(time.time() * 1000) - 20_000  # noqa: E731
        monkeypatch.setattr("arq.worker.timestamp_ms", behind)
        monkeypatch.setattr("worker.main.timestamp_ms", behind)
    limited = {"error": "rate_limit_reached_error", "fail_times": 1, "retry_after": 1.5}
    limited["key"] = f"skew-{skew}-{stack.settings.key_prefix}"
    job, _ = await store.create("default", JobCreate.model_validate(chat(fake_moonshot=limited)))
    started = time.monotonic()
    async with worker_running(stack):
        ended = (await client.get(f"/v1/jobs/{job.id}", params={"wait": 15})).json()
    took = time.monotonic() - started
    assert ended["status"] == "completed" and ended["attempts"] == 2
    assert 1.5 <= took < 5  # the retry waited its Retry-After, and no more


async def test_a_cancel_from_a_host_whose_clock_is_behind_is_not_dropped_unread(
    real_stack: Any,
) -> None:
    """Workers drop abort requests over a minute old; a cancel from an API host whose clock
    is an hour behind is stamped with Redis's clock, so no worker drops it before the holder
    of the job reads it."""
    stack, client = await real_stack()
    store = JobStore.from_settings(stack.redis, stack.settings)
    store.clock = lambda: time.time() - 3600
    job_id = await submit(client, chat("held elsewhere"))
    lock = f"arq:in-progress:{job_id}"
    await stack.redis.set(lock, "a-worker", px=5000)  # a worker holds it
    worker = create_worker(stack.settings, redis=stack.redis, handle_signals=False)
    try:
        await store.withdraw(job_id)
        score = await stack.redis.zscore("arq:abort", job_id)
        assert score is not None and abs(score - time.time() * 1000) < 5000
        worker._trim_aborts = True  # another worker's periodic trim
        await worker._cancel_aborted_jobs()
        assert await stack.redis.zscore("arq:abort", job_id) is not None
    finally:
        await worker.close()
        await stack.redis.zrem("arq:abort", job_id)
        await stack.redis.delete(lock)
