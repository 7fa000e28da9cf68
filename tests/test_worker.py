"""The worker over fakeredis and the fake upstream (a real socket): results, failures, retries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from moonq.fake_moonshot import expected_message, expected_usage
from tests.conftest import chat, make_settings, submit
from worker.upstream import MoonshotClient

FAST_RETRY = {"MOONQ_RETRY_BASE_DELAY": 0.01, "MOONQ_RETRY_MAX_DELAY": 0.05}


async def test_result_equals_the_non_streaming_answer(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    payloads = {
        "text": chat("summarise this"),
        "tools": chat(
            "weather?",
            tools=[
                {"type": "function", "function": {"name": "lookup", "parameters": {}}},
                {"type": "function", "function": {"name": "other", "parameters": {}}},
            ],
            fake_moonshot={"parallel_tools": True, "chunks": 5},
        ),
    }
    ids = {name: await submit(client, p) for name, p in payloads.items()}
    await stack.run_worker()
    for name, job_id in ids.items():
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        body = payloads[name]["body"]
        assert job["status"] == "completed", job
        assert job["result"]["object"] == "chat.completion"
        assert job["result"]["choices"][0]["message"] == expected_message(body)
        assert job["usage"] == expected_usage(body)


async def test_every_chunk_is_an_event_and_done_ends_the_log(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    job_id = await submit(client, chat("count", fake_moonshot={"chunks": 12}))
    await stack.run_worker()
    events = await stack.events(job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    chunks = [e for e in events if e["event"] == "chunk"]
    assert len(chunks) == 12 + 2  # the role chunk, 12 pieces, the finish chunk
    assert all(c["data"]["object"] == "chat.completion.chunk" for c in chunks)
    assert events[-1]["event"] == "done"
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert events[-1]["data"] == job["result"]


async def test_upstream_4xx_fails_the_job_with_its_error(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    cases = {
        "invalid_request_error": 400,
        "content_filter": 400,
        "invalid_authentication_error": 401,
        "exceeded_current_quota_error": 429,
    }
    ids = {kind: await submit(client, chat(fake_moonshot={"error": kind})) for kind in cases}
    await stack.run_worker()
    for kind, job_id in ids.items():
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "failed" and job["attempts"] == 1
        assert job["error"]["type"] == kind
        assert job["error"]["status_code"] == cases[kind]
        assert job["error"]["message"]
        assert job["result"] is None
        events = await stack.events(job_id)
        assert [e["event"] for e in events] == ["error"]
        assert events[0]["data"] == job["error"]


async def test_a_dropped_stream_is_retried_from_scratch(stack_factory: Any) -> None:
    stack, client = await stack_factory(**FAST_RETRY)
    steer = {"error": "drop", "drop_after": 3, "fail_times": 2, "key": "drop-twice"}
    payload = chat("retry me", fake_moonshot=steer)
    job_id = await submit(client, payload)
    await stack.run_worker()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "completed" and job["attempts"] == 3
    assert job["result"]["choices"][0]["message"] == expected_message(payload["body"])
    events = await stack.events(job_id)
    retries = [e for e in events if e["event"] == "retry"]
    assert [r["data"]["attempt"] for r in retries] == [2, 3]
    assert all("stream" in r["data"]["reason"] for r in retries)
    # the successful attempt's chunks alone rebuild the stored content
    last = [e for e in events if e["event"] == "chunk" and e["attempt"] == 3]
    text = "".join(
        c["data"]["choices"][0]["delta"].get("content") or ""
        for c in last
        if isinstance(c["data"]["choices"][0]["delta"], dict)
    )
    assert text == job["result"]["choices"][0]["message"]["content"]


async def test_rate_limits_are_retried_then_give_up(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_MAX_ATTEMPTS=3, **FAST_RETRY)
    flaky = await submit(
        client,
        chat("a", fake_moonshot={"error": "rate_limit_reached_error", "fail_times": 2, "key": "f"}),
    )
    hopeless = await submit(client, chat("b", fake_moonshot={"error": "engine_overloaded_error"}))
    await stack.run_worker()
    ok = (await client.get(f"/v1/jobs/{flaky}")).json()
    assert ok["status"] == "completed" and ok["attempts"] == 3
    assert [e["event"] for e in await stack.events(flaky)][-1] == "done"
    bad = (await client.get(f"/v1/jobs/{hopeless}")).json()
    assert bad["status"] == "failed" and bad["attempts"] == 3
    assert bad["error"]["type"] == "engine_overloaded_error"


async def test_job_timeout_fails_the_job(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_JOB_TIMEOUT=1)
    job_id = await submit(client, chat(fake_moonshot={"chunks": 50, "delay": 0.1}))
    await stack.run_worker()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "job_timeout"


async def test_the_upstream_key_never_reaches_redis(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_API_KEYS="client-secret=acme")
    headers = {"authorization": "Bearer client-secret"}
    ok = await client.post("/v1/jobs", json=chat("s"), headers=headers)
    bad = await client.post(
        "/v1/jobs",
        json=chat(fake_moonshot={"error": "invalid_authentication_error"}),
        headers=headers,
    )
    assert ok.status_code == bad.status_code == 202
    await stack.run_worker()
    dump = b""
    for key in await stack.redis.keys("*"):
        kind = await stack.redis.type(key)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in (await stack.redis.hgetall(key)).items())
        elif kind == b"stream":
            dump += b"".join(f[b"e"] for _, f in await stack.redis.xrange(key) if b"e" in f)
        elif kind == b"string":
            dump += await stack.redis.get(key) or b""
    assert dump and b"sk-test-upstream-key" not in dump and b"client-secret" not in dump


async def _all_redis_bytes(redis: Any) -> bytes:
    dump = b""
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in (await redis.hgetall(key)).items())
        elif kind == b"stream":
            dump += b"".join(f[b"e"] for _, f in await redis.xrange(key) if b"e" in f)
        elif kind == b"string":
            dump += await redis.get(key) or b""
    return dump


async def test_an_unexpected_failure_ends_the_job_without_leaking(stack_factory: Any) -> None:
    import httpx

    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError(f"boom with {request.headers['authorization']}")

    stack, client = await stack_factory()
    job_id = await submit(client, chat("x"))
    await stack.run_worker(transport=httpx.MockTransport(explode))
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "internal_error"
    assert "RuntimeError" in job["error"]["message"]
    assert [e["event"] for e in await stack.events(job_id)] == ["error"]
    assert b"sk-test-upstream-key" not in await _all_redis_bytes(stack.redis)


async def test_an_unreadable_upstream_answer_is_retried_then_fails(stack_factory: Any) -> None:
    import asyncio

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 twohundred\r\n\r\n")  # not a status line
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stack, client = await stack_factory(
            MOONSHOT_BASE_URL=f"http://127.0.0.1:{port}/v1", MOONQ_MAX_ATTEMPTS=2, **FAST_RETRY
        )
        job_id = await submit(client, chat("x"))
        await stack.run_worker()
    finally:
        server.close()
        await server.wait_closed()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempts"] == 2
    assert b"sk-test-upstream-key" not in await _all_redis_bytes(stack.redis)


async def test_waiting_for_a_permit_is_not_running(stack_factory: Any, fake: Any) -> None:
    """MOONQ_JOB_TIMEOUT bounds an attempt's stream, not the queueing before it."""
    stack, client = await stack_factory(
        MOONQ_JOB_TIMEOUT=1, MOONQ_UPSTREAM_CONCURRENCY=1, MOONQ_WORKER_CONCURRENCY=5
    )
    ids = [
        await submit(client, chat(str(i), fake_moonshot={"chunks": 8, "delay": 0.08}))
        for i in range(3)
    ]
    await stack.run_worker()
    jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in ids]
    assert [j["status"] for j in jobs] == ["completed"] * 3
    assert max(j["completed_at"] for j in jobs) - min(j["created_at"] for j in jobs) > 1.5
    assert fake.stats.peak_in_flight == 1


async def test_sigterm_sends_permit_waiters_back_at_once(stack_factory: Any, fake: Any) -> None:
    import asyncio
    import signal

    from worker.main import create_worker

    stack, client = await stack_factory(
        MOONQ_UPSTREAM_CONCURRENCY=1, MOONQ_SHUTDOWN_GRACE=5, MOONQ_WORKER_CONCURRENCY=5
    )
    running = await submit(client, chat("a", fake_moonshot={"chunks": 10, "delay": 0.05}))
    waiting = await submit(client, chat("b"))
    worker = create_worker(stack.settings, redis=stack.redis, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        while len(worker.tasks) < 2 or fake.stats.in_flight < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    finally:
        await worker.close()
    assert (await client.get(f"/v1/jobs/{running}")).json()["status"] == "completed"
    back = (await client.get(f"/v1/jobs/{waiting}")).json()
    assert back["status"] == "queued" and back["attempts"] == 0
    assert await stack.redis.zscore(stack.settings.queue_name, waiting) is not None
    assert fake.stats.requests == 1  # the waiter never reached the upstream


async def test_a_redis_error_while_starting_a_job_keeps_the_slot(stack_factory: Any) -> None:
    import asyncio

    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker.main import create_worker

    stack, client = await stack_factory(MOONQ_WORKER_CONCURRENCY=2)
    worker = create_worker(stack.settings, redis=stack.redis, handle_signals=False)
    worker._pool = stack.redis
    real_pipeline, real_evalsha = stack.redis.pipeline, stack.redis.evalsha

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("gone")

    # Redis goes away however a start talks to it: a transaction or a script
    stack.redis.pipeline = broken  # type: ignore[method-assign]
    stack.redis.evalsha = broken  # type: ignore[method-assign]
    try:
        for _ in range(3):
            with pytest.raises(RedisConnectionError):
                await worker.start_jobs([b"job_x"])
    finally:
        stack.redis.pipeline = real_pipeline  # type: ignore[method-assign]
        stack.redis.evalsha = real_evalsha  # type: ignore[method-assign]
    assert worker.job_counter == 0
    # the same worker still has both its slots
    worker.ctx["redis"] = stack.redis
    assert worker.on_startup is not None
    await worker.on_startup(worker.ctx)
    ids = [await submit(client, chat(f"after the blip {i}")) for i in range(2)]
    await worker.start_jobs([i.encode() for i in ids])
    assert set(worker.tasks) == set(ids)
    await asyncio.gather(*worker.tasks.values())
    for job_id in ids:
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"
    await worker.close()


@pytest.mark.parametrize("ask", [True, False])
async def test_openai_style_upstreams_report_usage_when_asked(
    stack_factory: Any, ask: bool
) -> None:
    from moonq.fake_moonshot import FakeConfig, start_fake

    openai_like = await start_fake(config=FakeConfig(usage_style="openai"))
    try:
        stack, client = await stack_factory(
            MOONSHOT_BASE_URL=openai_like.url, MOONQ_STREAM_USAGE=ask
        )
        payload = chat("count me")
        job_id = await submit(client, payload)
        # a client cannot opt its job out of the usage its budgets are counted by
        opted_out = await submit(client, chat("me too", stream_options={"include_usage": False}))
        await stack.run_worker()
    finally:
        await openai_like.close()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "completed"
    assert job["result"]["choices"][0]["message"] == expected_message(payload["body"])
    assert job["usage"] == (expected_usage(payload["body"]) if ask else None)
    other = (await client.get(f"/v1/jobs/{opted_out}")).json()
    assert other["status"] == "completed" and (other["usage"] is not None) == ask


async def test_cancelling_a_job_that_waits_for_a_permit_frees_its_slot(
    stack_factory: Any, fake: Any
) -> None:
    import asyncio

    from worker.main import create_worker

    stack, client = await stack_factory(MOONQ_UPSTREAM_CONCURRENCY=1, MOONQ_WORKER_CONCURRENCY=5)
    running = await submit(client, chat("a", fake_moonshot={"chunks": 20, "delay": 0.05}))
    waiting = await submit(client, chat("b"))
    worker = create_worker(stack.settings, redis=stack.redis, handle_signals=False, burst=True)
    task = asyncio.create_task(worker.async_run())
    try:
        while len(worker.tasks) < 2 or fake.stats.in_flight < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert (await client.post(f"/v1/jobs/{waiting}/cancel")).status_code == 200
        async with asyncio.timeout(1):
            while (held := worker.tasks.get(waiting)) is not None and not held.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert fake.stats.in_flight == 1  # the running job was left alone
        await asyncio.wait_for(task, 10)
    finally:
        await worker.close()
    assert (await client.get(f"/v1/jobs/{running}")).json()["status"] == "completed"
    assert (await client.get(f"/v1/jobs/{waiting}")).json()["status"] == "cancelled"
    assert fake.stats.requests == 1  # the cancelled job never reached the upstream
    window = await stack.redis.zcard(f"{stack.settings.key_prefix}:limit:window")
    assert window == 1  # nor took a slot of the account's request window


async def test_a_job_that_cannot_even_start_fails_instead_of_hanging(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    job_id = await submit(client, chat("x"))
    await stack.redis.hset(f"{stack.settings.key_prefix}:job:{job_id}", "request", "{broken")
    await stack.run_worker()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "internal_error"
    assert [e["event"] for e in await stack.events(job_id)] == ["error"]


async def test_a_worker_renews_all_its_jobs_locks_in_one_call_a_beat(
    stack_factory: Any, fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 jobs stream for about 2 s under a 1 s lock: their locks are renewed together, a
    call a beat for all of them (one a job each beat was the busiest Redis traffic of a worker
    with thousands of long streams), and none lapses: each job runs once."""
    from tests.serving import worker_running
    from worker.main import LockRenewer

    calls: list[int] = []
    renew = LockRenewer._renew

    async def counted(self: LockRenewer, keepers: list[Any]) -> None:
        calls.append(len(keepers))
        await renew(self, keepers)

    monkeypatch.setattr(LockRenewer, "_renew", counted)
    stack, client = await stack_factory(MOONQ_LOCK_TIMEOUT=1, MOONQ_UPSTREAM_CONCURRENCY=40)
    payload = chat("long", fake_moonshot={"chunks": 20, "delay": 0.1})
    jobs = [await submit(client, payload) for _ in range(40)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with worker_running(stack, max_jobs=40):
        for job_id in jobs:
            job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 20})).json()
            assert (job["status"], job["attempts"]) == ("completed", 1), job
    assert sum(calls) >= 40 * 4  # every job renewed every ttl/4 to 3/8 of a ttl...
    assert len(calls) <= (loop.time() - began) / (1 / 8) + 1  # ...at most a call a beat
    assert sum(calls) / len(calls) >= 10, calls  # for all those due, not one a job


async def _until(predicate: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_one_bad_renewal_reply_stops_no_lock_renewal(stack_factory: Any, fake: Any) -> None:
    """A renewal whose reply is not what was asked (one outcome short) is logged and the
    next beat renews again: the renewer goes on, the job's lock never lapses, it runs once,
    and the worker closes cleanly (a review found the renewer gone for good, every lock
    lapsing, and the worker's shutdown raising)."""
    from tests.serving import worker_running

    stack, client = await stack_factory(MOONQ_LOCK_TIMEOUT=1, MOONQ_POLL_DELAY=0.1)
    job_id = await submit(client, chat("long", fake_moonshot={"chunks": 30, "delay": 0.1}))
    async with worker_running(stack) as worker:
        await _until(lambda: fake.stats.in_flight >= 1, 10)
        renewer = worker.ctx["moonq_locks"]
        real_keep, bad = renewer._keep, []

        async def keep(**kwargs: Any) -> Any:
            outcomes = await real_keep(**kwargs)
            if not bad:  # one bad reply, once
                bad.append(outcomes)
                return outcomes[:-1]
            return outcomes

        renewer._keep = keep
        job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 20})).json()
        assert bad and not renewer._task.done()
    assert (job["status"], job["attempts"], fake.stats.requests) == ("completed", 1, 1), job


async def test_lapsed_locks_taken_back_are_one_warning_not_one_a_job(
    stack_factory: Any, fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Locks that lapsed while the worker was late (here: deleted under three running jobs)
    are taken back by the next renewal, every job running on once, and the worker says so in
    one warning with their count: a loop seconds behind lets thousands lapse at once, and a
    line a job was 12,000 warnings for 10,000 slow streams."""
    from arq.constants import in_progress_key_prefix as lock_base

    from tests.serving import worker_running

    stack, client = await stack_factory(MOONQ_LOCK_TIMEOUT=1, MOONQ_POLL_DELAY=0.1)
    payload = chat("long", fake_moonshot={"chunks": 20, "delay": 0.1})
    jobs = [await submit(client, payload) for _ in range(3)]
    async with worker_running(stack, max_jobs=3) as worker:
        await _until(lambda: fake.stats.in_flight >= 3, 10)
        renewer = worker.ctx["moonq_locks"]
        await _until(lambda: all(k.attempt for k in renewer.keepers), 10)
        caplog.clear()
        await stack.redis.delete(*(lock_base + job_id for job_id in jobs))
        await _until(lambda: "had lapsed" in caplog.text, 10)
        for job_id in jobs:
            job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 20})).json()
            assert (job["status"], job["attempts"]) == ("completed", 1), job
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert not [line for line in warned if any(job_id in line for job_id in jobs)], warned
    summary = re.compile(
        r"the locks of (\d+) jobs had lapsed before they were renewed \(this process was "
        r"late\); taken back, nobody else having them"
    )
    counts = [int(found[1]) for line in warned if (found := summary.fullmatch(line))]
    assert sum(counts) == 3 and len(counts) <= 2, warned  # one call renews them all, or two
    assert fake.stats.requests == 3  # none run again


async def test_a_keeper_whose_run_ended_is_not_renewed_in_a_later_batch(
    stack_factory: Any, fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A beat renews its due keepers a batch at a time (BATCH, here 1: as with more than
    1,000 jobs); one whose run ended meanwhile (a job waiting for a permit, handed back at
    SIGTERM) is not sent in a later batch: its job is left unlocked, in its place, for the
    next worker (a review saw it taken back by the worker leaving, held out of every poll)."""
    from tests.serving import worker_running
    from worker.main import LockRenewer

    monkeypatch.setattr(LockRenewer, "BATCH", 1)
    stack, client = await stack_factory(
        MOONQ_LOCK_TIMEOUT=3, MOONQ_UPSTREAM_CONCURRENCY=1, MOONQ_SHUTDOWN_GRACE=10
    )
    slow = {"chunks": 30, "delay": 0.1}
    jobs = [await submit(client, chat(name, fake_moonshot=slow)) for name in "rw"]
    async with worker_running(stack) as worker:
        await _until(lambda: len(worker.tasks) == 2 and fake.stats.in_flight == 1, 10)
        await asyncio.sleep(0.05)
        attempts = [(await client.get(f"/v1/jobs/{j}")).json()["attempts"] for j in jobs]
        running, waiting = jobs if attempts == [1, 0] else jobs[::-1]
        renewer = worker.ctx["moonq_locks"]
        await _until(lambda: len(renewer.keepers) == 2, 5)
        real_keep, slow_first, sent = renewer._keep, asyncio.Event(), []

        async def keep(**kwargs: Any) -> Any:
            ids = kwargs["args"][6::5]
            sent.extend(ids)
            if running in ids and not slow_first.is_set():  # a slow first batch
                slow_first.set()
                await asyncio.sleep(0.5)
            return await real_keep(**kwargs)

        renewer._keep = keep
        mine = next(k for k in renewer.keepers if k.job_id == waiting)
        del renewer.keepers[mine]  # both due at the same beat, `running`'s first
        renewer.keepers[mine] = None
        await asyncio.wait_for(slow_first.wait(), 5)
        task = worker.tasks[waiting]
        worker.handle_sig_wait_for_completion(signal.SIGTERM)  # the waiter goes back now
        await _until(task.done, 2)
        await asyncio.sleep(0.6)  # the slow batch answered; the next would have gone
        lock = f"arq:in-progress:{waiting}"
        assert sent.count(waiting) == 0 and await stack.redis.get(lock) is None
        assert await stack.redis.zscore(stack.settings.queue_name, waiting) >= 0


async def test_a_run_whose_start_redis_failed_runs_again_without_a_traceback(
    stack_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """arq's reads before a run fail (a pool kept busy past its timeout, seen with 6,000
    streams at once on 2 cores): the job runs again once its lock lapses, and the worker logs
    a line, not an asyncio "Task exception was never retrieved" traceback for each."""
    from arq import Worker
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tests.serving import worker_running

    failed = []
    arq_run_job = Worker.run_job

    async def first_fails(self: Worker, job_id: str, score: int) -> None:
        if not failed:
            failed.append(job_id)
            raise RedisConnectionError("No connection available.")
        await arq_run_job(self, job_id, score)

    monkeypatch.setattr(Worker, "run_job", first_fails)
    stack, client = await stack_factory(MOONQ_LOCK_TIMEOUT=1, MOONQ_POLL_DELAY=0.1)
    job_id = await submit(client, chat("again"))
    async with worker_running(stack):
        job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
    assert failed == [job_id] and job["status"] == "completed", job
    assert "never retrieved" not in caplog.text
    assert f"job {job_id}: Redis failed before its run" in caplog.text


async def test_a_superseded_run_never_strands_the_job(stack_factory: Any, fake: Any) -> None:
    """Worker A's lock lapses mid-stream (its lock keeper is starved), B takes the job over;
    when A's run ends, arq must not forget the job: its entries and B's lock stay, so the job
    still finishes and, had B died, would still be picked up again."""
    import asyncio

    from worker.main import create_worker

    stack, client = await stack_factory(MOONQ_LOCK_TIMEOUT=1)
    payload = chat("twice", fake_moonshot={"chunks": 40, "delay": 0.05})
    job_id = await submit(client, payload)
    lock = f"arq:in-progress:{job_id}"
    a = create_worker(stack.settings, redis=stack.redis, handle_signals=False)
    b = create_worker(stack.settings, redis=stack.redis, handle_signals=False, burst=True)
    run_a = asyncio.create_task(a.async_run())
    try:
        while fake.stats.in_flight < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        # A's lock keeper stops renewing (starved, as behind a busy pool) and the lock lapses
        await next(k for k in a.ctx["moonq_locks"].keepers if k.job_id == job_id).stop()
        run_b = asyncio.create_task(b.async_run())
        async with asyncio.timeout(5):
            while (await client.get(f"/v1/jobs/{job_id}")).json()["attempts"] < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            # ...until B starts attempt 2; A's next write is refused
            while job_id in a.tasks:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        async with asyncio.timeout(1.5):  # arq's entries and B's lock are there
            while not (  # noqa: ASYNC110
                await stack.redis.exists(f"arq:job:{job_id}", lock) == 2
                and await stack.redis.zscore(stack.settings.queue_name, job_id) is not None
            ):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(run_b, 10)
    finally:
        await a.close()  # stops A's poll loop, even if the cancel of its main task is lost
        await asyncio.wait({run_a}, timeout=10)
        await b.close()
    done = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert done["status"] == "completed" and done["attempts"] == 2
    assert done["result"]["choices"][0]["message"] == expected_message(payload["body"])
    assert not await stack.redis.exists(f"arq:job:{job_id}")  # and then cleaned up for good


LEAKY_KEY = "sk-echoed-back-7c1e9a"


async def _echo_the_key(request: web.Request) -> web.StreamResponse:
    """An upstream that quotes the caller's Authorization header in its errors."""
    auth = request.headers.get("Authorization", "")
    body = await request.json()
    mode = body["messages"][-1]["content"]
    if mode in ("400", "500"):
        kind = "invalid_request_error" if mode == "400" else "server_error"
        error = {"error": {"type": kind, "message": f"rejected {auth} for {LEAKY_KEY}"}}
        return web.json_response(error, status=int(mode))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    if mode == "stall":
        await asyncio.Event().wait()  # mid-stream, until the client gives up
    error = {"error": {"type": "invalid_request_error", "message": f"key {auth} refused"}}
    await resp.write(f"data: {json.dumps(error)}\n\n".encode())
    return resp


@contextlib.asynccontextmanager
async def _echo_server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _echo_the_key)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_the_key_an_upstream_echoes_is_redacted_over_aiohttp(stack_factory: Any) -> None:
    """The worker's real client (httpx over its aiohttp transport) on a real socket."""
    async with _echo_server() as url:
        stack, client = await stack_factory(
            MOONSHOT_BASE_URL=url,
            MOONSHOT_API_KEY=LEAKY_KEY,
            MOONQ_MAX_ATTEMPTS=2,
            MOONQ_RETRY_BASE_DELAY=0,
        )
        ids = [await submit(client, chat(mode)) for mode in ("400", "500", "stream")]
        await asyncio.wait_for(stack.run_worker(), 20)
    for job_id in ids:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "failed", job
        assert "***" in job["error"]["message"], job  # the message kept, the key masked
    dump = await _all_redis_bytes(stack.redis)
    assert dump and LEAKY_KEY.encode() not in dump


async def test_read_timeout_from_settings_ends_a_stalled_stream(stack_factory: Any) -> None:
    async with _echo_server() as url:
        stack, client = await stack_factory(
            MOONSHOT_BASE_URL=url, MOONQ_READ_TIMEOUT=0.5, MOONQ_MAX_ATTEMPTS=1
        )
        job_id = await submit(client, chat("stall"))
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(stack.run_worker(), 20)
        took = asyncio.get_running_loop().time() - started
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "timeout", job
    assert 0.5 <= took < 5, took  # MOONQ_READ_TIMEOUT, not the 120 s default
    kinds = [e["event"] for e in await stack.events(job_id)]
    assert kinds[0] == "chunk" and kinds[-1] == "error"  # it stalled mid-stream


def test_connect_and_read_timeouts_reach_the_upstream_client() -> None:
    settings = make_settings(
        "redis://unused",
        "p",
        "http://upstream.test/v1",
        MOONQ_CONNECT_TIMEOUT=1.5,
        MOONQ_READ_TIMEOUT=7.0,
    )
    upstream = MoonshotClient.from_settings(settings)
    assert upstream._http.timeout == httpx.Timeout(7.0, connect=1.5)


@pytest.mark.parametrize(("interrupted", "status"), [(20, "completed"), (21, "failed")])
async def test_a_job_interrupted_too_often_fails_as_worker_lost(
    stack_factory: Any, fake: Any, interrupted: int, status: str
) -> None:
    """Runs cut short by crashes count in `attempts` but not in `failures`; past 20 of them
    the next run fails the job instead of calling the upstream again."""
    stack, client = await stack_factory()
    job_id = await submit(client, chat("crashes its workers"))
    await stack.redis.hset(
        f"{stack.settings.key_prefix}:job:{job_id}", mapping={"attempts": interrupted}
    )
    await asyncio.wait_for(stack.run_worker(), 10)
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == status and job["attempts"] == interrupted + 1, job
    if status == "failed":
        assert job["error"]["type"] == "worker_lost" and fake.stats.requests == 0
    else:
        assert fake.stats.requests == 1


async def test_an_idle_worker_starts_a_queued_job_without_waiting_for_its_poll(
    real_stack: Any,
) -> None:
    """CREATE wakes the workers (worker/wake.py): with polls 3 s apart, a job submitted to an
    idle worker still starts at once; and one that waits for a slot starts as it frees."""
    from tests.serving import worker_running

    stack, client = await real_stack(MOONQ_POLL_DELAY=3, MOONQ_WORKER_CONCURRENCY=1)
    async with worker_running(stack):
        await asyncio.sleep(0.5)  # the worker is idle, in its first wait
        steer = {"chunks": 2, "delay": 0.2}
        first = await submit(client, chat("wake up", fake_moonshot=steer))
        second = await submit(client, chat("next", fake_moonshot=steer))  # waits for the slot
        for job_id in (first, second):
            job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
            assert job["status"] == "completed", job
        jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in (first, second)]
        waited = [job["started_at"] - job["created_at"] for job in jobs]
    # neither waited for the 3 s poll: the first started at once, the second as the first
    # ended (it runs ~0.4 s); a loaded machine adds to both, never seconds
    assert waited[0] < 1.0 and waited[1] < 2.0, waited


async def test_with_a_long_poll_a_retry_starts_when_due_and_a_cancel_stops_a_job_at_once(
    real_stack: Any, fake: Any
) -> None:
    """Polls 3 s apart are only the fallback: a worker waits no longer than a deferred retry
    needs, and a cancel wakes the worker holding the job, which aborts it (here while the
    upstream has not answered yet, so no write of its own would find out)."""
    from tests.serving import worker_running

    stack, client = await real_stack(MOONQ_POLL_DELAY=3, MOONQ_RETRY_BASE_DELAY=0)

    async def in_flight_becomes(n: int, within: float) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while fake.stats.in_flight != n:
            assert loop.time() - started < within, f"in flight: {fake.stats.in_flight}"
            await asyncio.sleep(0.02)
        return loop.time() - started

    async with worker_running(stack):
        once = {"error": "engine_overloaded_error", "fail_times": 1, "retry_after": 1}
        retried = await submit(client, chat("retry", fake_moonshot={**once, "key": "r1"}))
        job = (await client.get(f"/v1/jobs/{retried}", params={"wait": 10})).json()
        assert job["status"] == "completed" and job["attempts"] == 2, job
        # the retry was due 1 s after the failure; the next poll would have been 3 s after it
        assert job["completed_at"] - job["created_at"] < 2.5, job

        slow = await submit(client, chat("slow", fake_moonshot={"first_byte_delay": 10}))
        await in_flight_becomes(1, 5)
        await asyncio.sleep(0.5)  # the worker is back in its idle wait
        cancelled = await client.post(f"/v1/jobs/{slow}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        took = await in_flight_becomes(0, 2.5)
    assert took < 1.5, took


async def test_a_chunk_too_deep_to_store_fails_its_own_job_alone(stack_factory: Any) -> None:
    """A worker writes its jobs' events together: a chunk that cannot be written as JSON (it
    parses, but is nested too deeply to write) fails its own job as a malformed upstream
    answer, and the job streaming beside it completes."""
    from tests.serving import worker_running

    depth = 990

    def sse(data: bytes) -> bytes:
        return b"data: " + data + b"\n\n"

    def chunk(text: str, finish: str | None = None) -> bytes:
        delta = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        body: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "choices": [delta]}
        if finish:
            body["usage"] = {"prompt_tokens": 1, "completion_tokens": 40, "total_tokens": 41}
        return sse(json.dumps(body).encode())

    async def answer(bad: bool) -> AsyncIterator[bytes]:
        for i in range(40):
            await asyncio.sleep(0.003)
            yield chunk(f"t{i} ")
            if bad and i == 20:
                yield sse(b'{"choices":[],"x":' + b"[" * depth + b"]" * depth + b"}")
        yield chunk("", finish="stop")
        yield b"data: [DONE]\n\n"

    async def upstream(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/chat/completions"):
            return httpx.Response(404)
        bad = json.loads(request.content)["messages"][0]["content"] == "bad"
        sse_type = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=sse_type, content=answer(bad))

    stack, client = await stack_factory(MOONQ_MAX_ATTEMPTS=1)
    good, bad = await submit(client, chat("good")), await submit(client, chat("bad"))
    async with worker_running(stack, transport=httpx.MockTransport(upstream)):
        jobs = [
            (await client.get(f"/v1/jobs/{job_id}", params={"wait": 20})).json()
            for job_id in (good, bad)
        ]
    assert jobs[0]["status"] == "completed", jobs[0]
    assert jobs[1]["status"] == "failed", jobs[1]
    assert "cannot be stored" in jobs[1]["error"]["message"], jobs[1]["error"]


@pytest.fixture
async def own_stack(own_redis: Any, fake: Any, prefix: str) -> AsyncIterator[tuple[Any, Any]]:
    """`real_stack` on a Redis of the test's own (MONITOR sees only the test's commands):
    a client of that Redis, and the factory of `(stack, client)` pairs."""
    from arq.connections import ArqRedis

    from tests.conftest import _stacks

    redis = ArqRedis.from_url(own_redis.url)
    try:
        async for build in _stacks(redis, own_redis.url, fake.url, prefix):
            yield redis, build
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def _monitoring(redis: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """Every command Redis runs while the block runs, as MONITOR reports it."""
    seen: list[dict[str, Any]] = []

    async def watch() -> None:
        async with redis.monitor() as monitor:
            async for command in monitor.listen():
                seen.append(command)

    watching = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_an_idle_workers_poll_is_one_round_trip_and_reads_no_aborts(
    own_stack: Any, prefix: str
) -> None:
    """An idle worker's poll is one round trip (`scripts.TAKE_DUE`: arq's read of the queue,
    the locks and the look at the next deferred job), where it was six commands. And arq reads
    its abort requests on every poll; moonq's worker only while it runs a job (on a cancel's
    wake-up, and once per poll delay): an idle worker polling 20 times a second reads them
    never. Seen by MONITOR on a Redis of the test's own."""
    from tests.serving import worker_running

    redis, build = own_stack
    stack, client = await build(MOONQ_POLL_DELAY=0.05)
    async with worker_running(stack):
        job_id = await submit(client, chat("one job first"))
        job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
        assert job["status"] == "completed"
        await asyncio.sleep(0.2)
        async with _monitoring(redis) as commands:
            await asyncio.sleep(1.0)
    seen = [c["command"] for c in commands]
    sent = [c["command"] for c in commands if c["client_type"] != "lua"]  # not by a script
    assert not [c for c in seen if "arq:abort" in c]
    # the queue is read only by scripts: a poll is one EVALSHA (it was two ZRANGEBYSCOREs,
    # and a MULTI reading arq:abort); the ask for batch lines is another, 4 times a second
    readers = [c.split()[0] for c in sent if f"{prefix}:queue" in c]
    assert len(readers) >= 20 and set(readers) == {"EVALSHA"}, readers


@pytest.fixture(params=["fake_redis", "real_redis"])
def either_redis(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


async def test_a_poll_finds_a_queued_job_behind_many_locked_ones(
    either_redis: Any, prefix: str
) -> None:
    """A job locked but left in the due range (by arq's own runner, or taken back by its
    stalled run) sits ahead of those that wait: a worker with a free slot must find a queued
    job behind 120 such (past a page of the scan), take it in queue order, never one another
    worker holds, and learn when the next deferred job falls due, all in the one round trip
    of its poll (`scripts.TAKE_DUE`)."""
    from arq.constants import in_progress_key_prefix

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue = f"{prefix}:queue"
    ids = [f"{prefix}-{i:03d}" for i in range(125)]
    seconds, micros = await redis.time()  # the queue's clock is Redis's
    now = seconds * 1000 + micros // 1000
    since = now - 60_000
    await redis.zadd(queue, {job_id: since + i for i, job_id in enumerate(ids)})
    await redis.zadd(queue, {f"{prefix}-later": now + 60_000})
    locks = [in_progress_key_prefix + job_id for job_id in ids]
    try:
        for lock in locks[:120]:  # running on another worker
            await redis.set(lock, "other", px=60_000)
        take = redis.register_script(scripts.TAKE_DUE)
        keys, args = [queue, queue_leases(queue)], [in_progress_key_prefix, 5000, "me", 1500]
        found, due_in = await take(keys=keys, args=[*args, 2])
        assert [x.decode() for x in found[::2]] == ids[120:122]  # the two oldest free ones
        assert [int(s) for s in found[1::2]] == [since + 120, since + 121]
        assert 55_000 < int(due_in) <= 60_000  # when the next one falls due, from now
        assert await redis.get(locks[120]) == b"me" and await redis.get(locks[0]) == b"other"
        found, _ = await take(keys=keys, args=[*args, 10])  # more slots than jobs
        assert [x.decode() for x in found[::2]] == ids[122:]
        await redis.zadd(queue, {f"{prefix}-later": now})  # it falls due
        found, due_in = await take(keys=keys, args=[*args, 1])
        assert [x.decode() for x in found[::2]] == [f"{prefix}-later"] and due_in == b""
        # the worker's own runs whose lock lapsed are passed over: not locked, not counted
        await redis.delete(*locks[118:120])
        found, _ = await take(keys=keys, args=[*args, 1, ids[118]])
        assert [x.decode() for x in found[::2]] == [ids[119]]
        assert await redis.get(locks[118]) is None
    finally:
        await redis.delete(*keys, *locks, in_progress_key_prefix + f"{prefix}-later")


def _ids(found: list[bytes]) -> list[str]:
    return [x.decode() for x in found[::2]]


async def test_running_jobs_leave_the_look_and_a_lapsed_one_returns_to_its_place(
    either_redis: Any, prefix: str
) -> None:
    """A poll looks at a few hundred due jobs (5 × the worker's slots, at least 100): the jobs
    running across all workers must not fill that look, or a free slot idles while jobs wait
    behind them. With 3,000 running, a poll that looks at 100 still takes the one waiting. And
    the jobs of a worker that died go back to their own places once their locks lapse, ahead
    of a job queued after them (`scripts.TAKE_DUE`)."""
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue = f"{prefix}:queue"
    keys = [queue, queue_leases(queue)]
    seconds, micros = await redis.time()
    now = seconds * 1000 + micros // 1000
    dead = [f"{prefix}-dead-{i}" for i in range(2)]
    running = [f"{prefix}-run-{i:04d}" for i in range(3000)]
    later = [f"{prefix}-waiting", f"{prefix}-fresh"]
    await redis.zadd(queue, {j: now - 60_000 + i for i, j in enumerate(dead + running)})
    take = redis.register_script(scripts.TAKE_DUE)
    try:
        found, _ = await take(keys=keys, args=[lock_base, 60_000, "dead", 100, 2])
        assert _ids(found) == dead
        found, _ = await take(keys=keys, args=[lock_base, 60_000, "other", 100, 5000])
        assert _ids(found) == running
        await redis.zadd(queue, {later[0]: now})
        found, _ = await take(keys=keys, args=[lock_base, 60_000, "me", 100, 1])
        assert _ids(found) == later[:1]
        await redis.zadd(queue, {later[1]: now})
        await redis.delete(*(lock_base + j for j in dead))  # the dead worker's locks lapse
        await redis.zadd(keys[1], {j: now for j in dead})
        found, _ = await take(keys=keys, args=[lock_base, 60_000, "me", 100, 2])
        assert _ids(found) == dead  # in their places, ahead of the fresh one
        assert [int(float(s)) for s in found[1::2]] == [now - 60_000, now - 59_999]
        found, _ = await take(keys=keys, args=[lock_base, 60_000, "me", 100, 5])
        assert _ids(found) == later[1:]
        assert await redis.get(lock_base + running[0]) == b"other"
    finally:
        await redis.delete(*keys, *(lock_base + j for j in dead + running + later))


async def test_a_held_job_goes_back_to_its_place_only_when_no_run_holds_it(
    either_redis: Any, prefix: str
) -> None:
    """A held job whose lease falls due while its lock is there again (its stalled run took
    it back before any poll) stays held; a superseded run's end, deferred or not, leaves the
    holder's hold; the holder's end puts the job back in its place (to run again) or forgets
    it (over)."""
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue, job = f"{prefix}:queue", f"{prefix}-job"
    leases, lock, record = queue_leases(queue), lock_base + job, f"{prefix}:job:{job}"
    seconds, _ = await redis.time()
    score = seconds * 1000 - 1000
    await redis.zadd(queue, {job: score})
    await redis.hset(record, "status", "queued")
    take = redis.register_script(scripts.TAKE_DUE)
    keep = redis.register_script(scripts.KEEP_LOCK)
    end = redis.register_script(scripts.FINISH_RUN)
    end_keys = [lock, f"arq:job:{job}", f"arq:retry:{job}", f"{prefix}:abort", queue, record]
    end_keys.append(leases)
    try:
        assert _ids((await take(keys=[queue, leases], args=[lock_base, 100, "a", 100, 1]))[0])
        await asyncio.sleep(0.15)  # a's lock lapses: a stall
        keep_keys = [lock, queue, f"arq:job:{job}", record, leases]
        assert await keep(keys=keep_keys, args=[5000, job, score, b"{}", "a", ""]) == 2
        await redis.zadd(leases, {job: 0})  # its lease due, whatever the clock
        assert (await take(keys=[queue, leases], args=[lock_base, 5000, "b", 100, 1]))[0] == []
        assert await redis.zscore(queue, job) < 0  # still held: out of every poll's look
        await end(keys=end_keys, args=["superseded", "0", "", job])
        await end(keys=end_keys, args=["superseded", "0", "60000", job])  # nor deferred
        assert (await take(keys=[queue, leases], args=[lock_base, 5000, "b", 100, 1]))[0] == []
        assert await redis.zscore(queue, job) < 0 and await redis.zscore(leases, job)
        await end(keys=end_keys, args=["a", "0", "", job])  # a hands it back
        found, _ = await take(keys=[queue, leases], args=[lock_base, 5000, "b", 100, 1])
        assert _ids(found) == [job] and int(float(found[1])) == score  # its place
        await redis.delete(lock)  # b stalls: its lock lapses, a poll puts the job back...
        await redis.zadd(leases, {job: 0})
        assert (await take(keys=[queue, leases], args=[lock_base, 5000, "c", 100, 0]))[0] == []
        assert await redis.zscore(queue, job) == score
        assert await keep(keys=keep_keys, args=[5000, job, score, b"{}", "b", ""]) == 2
        assert await redis.zscore(queue, job) < 0  # ...and b, awake, holds it again
        assert await redis.zscore(leases, job)
        lock_due = redis.register_script(scripts.LOCK_DUE)  # nor can a batch hand-out take it
        await redis.delete(lock)
        assert await lock_due(keys=[queue, leases], args=[lock_base, 5000, "d", job]) == []
        await redis.set(lock, "b")
        await redis.hset(record, "status", "completed")
        await end(keys=end_keys, args=["b", "1", "", job])
        assert await redis.zscore(queue, job) is None and await redis.zscore(leases, job) is None
    finally:
        await redis.delete(queue, leases, lock, record, f"arq:job:{job}")


async def test_a_run_that_took_its_lock_back_at_its_start_holds_its_job_again(
    either_redis: Any, prefix: str
) -> None:
    """A run stalls past its lock, a poll puts its job back in its place, and the run, awake,
    takes the free lock again as its attempt starts (not by renewing): its next renewal holds
    the job again, out of every poll's look, rather than leaving it among the jobs that wait
    until it ends."""
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue, job = f"{prefix}:queue", f"{prefix}-job"
    leases, lock, record = queue_leases(queue), lock_base + job, f"{prefix}:job:{job}"
    seconds, _ = await redis.time()
    score = seconds * 1000 - 1000
    await redis.zadd(queue, {job: score})
    await redis.hset(record, mapping={"status": "in_progress", "attempts": "1"})
    take = redis.register_script(scripts.TAKE_DUE)
    keep = redis.register_script(scripts.KEEP_LOCK)
    try:
        assert _ids((await take(keys=[queue, leases], args=[lock_base, 5000, "a", 100, 1]))[0])
        await redis.delete(lock)  # a stalls: its lock lapses, a poll puts the job back
        await redis.zadd(leases, {job: 0})
        assert (await take(keys=[queue, leases], args=[lock_base, 5000, "c", 100, 0]))[0] == []
        assert await redis.zscore(queue, job) == score
        await redis.set(lock, "a", px=5000)  # a's attempt starts: START takes the free lock
        keep_keys = [lock, queue, f"arq:job:{job}", record, leases]
        assert await keep(keys=keep_keys, args=[5000, job, score, b"{}", "a", "1"]) == 1
        assert await redis.zscore(queue, job) < 0  # held again, its place kept
        assert await redis.zscore(leases, job)
        assert (await take(keys=[queue, leases], args=[lock_base, 5000, "c", 100, 1]))[0] == []
    finally:
        await redis.delete(queue, leases, lock, record, f"arq:job:{job}")


@pytest.mark.parametrize("lapsed", [False, True], ids=["renewed", "taken back"])
async def test_arqs_own_runner_keeps_a_retrys_delay_and_leaves_no_lease(
    either_redis: Any, prefix: str, lapsed: bool
) -> None:
    """Under arq's own runner (`arq worker.main.WorkerSettings`: its lock is "1", which the
    lock keeper renews) a job is never held: arq's own end of a held job deferred by a Retry
    would leave it below 0, due at once, its delay lost; and nothing of arq's drops a lease
    (found by a review)."""
    from arq import Worker
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue, job = f"{prefix}:queue", f"{prefix}-job"
    leases, lock, record = queue_leases(queue), lock_base + job, f"{prefix}:job:{job}"
    seconds, _ = await redis.time()
    score = seconds * 1000 - 1000
    await redis.zadd(queue, {job: score})
    await redis.hset(record, mapping={"status": "in_progress", "attempts": "1"})
    if not lapsed:
        await redis.set(lock, b"1", px=60_000)  # arq's start_jobs: psetex(..., b'1')
    keep = redis.register_script(scripts.KEEP_LOCK)

    async def noop(ctx: Any) -> None:
        return None

    plain = Worker(functions=[noop], redis_pool=redis, queue_name=queue, handle_signals=False)
    try:
        keep_keys = [lock, queue, f"arq:job:{job}", record, leases]
        renewed = await keep(keys=keep_keys, args=[5000, job, score, b"{}", "1", "1"])
        assert renewed == (2 if lapsed else 1)
        assert await redis.zscore(queue, job) == score and await redis.zcard(leases) == 0
        seconds, _ = await redis.time()
        delay = 30_000  # Retry(defer=30): arq moves the score by the delay + (now - score)
        await plain.finish_job(job, False, None, None, False, delay + seconds * 1000 - score, None)
        seconds, _ = await redis.time()
        assert await redis.zrangebyscore(queue, "-inf", seconds * 1000) == []  # not due yet
    finally:
        await plain.close()
        await redis.delete(queue, leases, lock, record, f"arq:job:{job}")


async def test_one_jobs_broken_keys_stop_no_other_jobs_renewal(
    either_redis: Any, prefix: str
) -> None:
    """A worker renews all its jobs' locks in one call: a job whose record is not a hash (an
    error at its read) fails its own renewal alone, and is named; the others are renewed."""
    from arq.constants import in_progress_key_prefix as lock_base
    from arq.constants import job_key_prefix

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue, leases, base = f"{prefix}:queue", queue_leases(f"{prefix}:queue"), f"{prefix}:job:"
    broken, fine = f"{prefix}-broken", f"{prefix}-fine"
    await redis.set(base + broken, "not a hash")
    await redis.hset(base + fine, mapping={"status": "in_progress", "attempts": "1"})
    keep = redis.register_script(scripts.KEEP_LOCKS)
    args: list[Any] = [5000, lock_base, job_key_prefix, base, queue, leases]
    for job in (broken, fine):  # both locks lapsed: each is taken back
        args += [job, 1000, b"{}", "w", "1"]
    try:
        outcomes = await keep(args=args)
        assert outcomes[1] == 2 and await redis.get(lock_base + fine) == b"w"
        assert isinstance(outcomes[0], bytes) and b"WRONGTYPE" in outcomes[0], outcomes
        assert await redis.get(lock_base + broken) is None
    finally:
        await redis.delete(queue, leases, base + broken, base + fine, lock_base + fine)
        await redis.delete(job_key_prefix + fine, job_key_prefix + broken)


async def test_a_poll_refuses_bad_numbers_before_putting_anything_back(
    either_redis: Any, prefix: str
) -> None:
    """TAKE_DUE checks its numbers before its first write (Redis keeps a script's earlier
    writes when a later command fails): a lapsed job stays held, its lease kept."""
    from redis.exceptions import ResponseError

    from moonq import scripts
    from moonq.keys import queue_leases

    redis = either_redis
    queue, job = f"{prefix}:queue", f"{prefix}-job"
    await redis.zadd(queue, {job: 5 - 10**13})  # held, its lock gone, its lease due
    await redis.zadd(queue_leases(queue), {job: 0})
    take = redis.register_script(scripts.TAKE_DUE)
    try:
        for bad in (["soon", 100, 1], [5000, "many", 1], [5000, 100, ""]):
            with pytest.raises(ResponseError, match="bad TAKE_DUE"):
                await take(
                    keys=[queue, queue_leases(queue)],
                    args=["arq:in-progress:", *bad[:1], "me", *bad[1:]],
                )
            assert await redis.zscore(queue, job) == 5 - 10**13
            assert await redis.zscore(queue_leases(queue), job) == 0
    finally:
        await redis.delete(queue, queue_leases(queue))


async def test_a_job_held_by_a_worker_that_died_is_run_by_arqs_own_runner(
    real_stack: Any,
) -> None:
    """A rollback to an earlier moonq, or arq's own runner left alone, must not strand the
    jobs a worker of this one held when it died: they read a held job as due, as they read
    running jobs, and take it once its lock is gone."""
    import inspect

    from arq import Worker
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases
    from worker.main import worker_kwargs

    stack, client = await real_stack()
    job_id = await submit(client, chat("held when its worker died"))
    queue = stack.settings.queue_name
    take = stack.redis.register_script(scripts.TAKE_DUE)
    found, _ = await take(keys=[queue, queue_leases(queue)], args=[lock_base, 60_000, "d", 100, 1])
    assert found[::2] == [job_id.encode()] and await stack.redis.zscore(queue, job_id) < 0
    await stack.redis.delete(lock_base + job_id)  # the worker died: its lock lapsed
    known = inspect.signature(Worker).parameters  # what arq's own runner is given
    kwargs = {
        k: v for k, v in worker_kwargs(stack.settings, redis=stack.redis).items() if k in known
    }
    plain = Worker(**kwargs, burst=True, handle_signals=False)
    try:
        await asyncio.wait_for(plain.main(), 30)
    finally:
        await plain.close()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "completed" and job["attempts"] == 1, job


async def test_a_job_queued_behind_more_running_jobs_than_a_poll_looks_at_starts(
    real_stack: Any, fake: Any
) -> None:
    """Worker A runs 120 slow jobs, all its slots; worker B, with slots free, looks at 100
    due jobs a poll. A job queued after A's 120 must start on B at once (it waited until
    enough of A's jobs ended: arq leaves a running job at its place in the queue)."""
    from tests.serving import worker_running

    stack, client = await real_stack(
        MOONQ_UPSTREAM_CONCURRENCY=0, MOONQ_WORKER_CONCURRENCY=120, MOONQ_POLL_DELAY=0.1
    )
    slow = [chat(f"slow {i}", fake_moonshot={"first_byte_delay": 30}) for i in range(120)]
    for payload in slow:
        await submit(client, payload)
    async with worker_running(stack):
        async with asyncio.timeout(20):
            while fake.stats.in_flight < 120:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        job_id = await submit(client, chat("behind them"))
        async with worker_running(stack, max_jobs=2, queue_read_limit=100):
            job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
    assert job["status"] == "completed", job


async def test_a_run_that_stopped_renewing_is_never_relocked_by_its_own_worker(
    own_stack: Any, fake: Any
) -> None:
    """A run whose lock keeper stopped renewing (starved) must leave its job's lock lapsed,
    free for another worker to take over: its own worker's polls, 20 a second, pass the job
    over instead of locking it (they used to lock it and let go of it a round trip later,
    which could also drop a lock its keeper had just renewed). Seen by MONITOR; the run
    itself still completes the job, which nobody took over."""
    from tests.serving import worker_running

    redis, build = own_stack
    stack, client = await build(MOONQ_POLL_DELAY=0.05, MOONQ_LOCK_TIMEOUT=3)
    async with worker_running(stack) as worker:
        payload = chat("starved", fake_moonshot={"chunks": 120, "delay": 0.05})
        job_id = await submit(client, payload)
        lock = f"arq:in-progress:{job_id}"
        while fake.stats.in_flight < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await next(k for k in worker.ctx["moonq_locks"].keepers if k.job_id == job_id).stop()
        async with asyncio.timeout(5):
            while await redis.exists(lock):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with _monitoring(redis) as commands:
            await asyncio.sleep(0.8)
        job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
    sets = [
        c["command"] for c in commands if c["command"].startswith("SET") and lock in c["command"]
    ]
    assert sets == []
    assert job["status"] == "completed" and job["attempts"] == 1, job


async def test_a_worker_reads_abort_requests_once_per_poll_delay_whatever_wakes_it(
    own_stack: Any, fake: Any
) -> None:
    """A cancel's own wake-up can be lost (pub/sub is at-most-once); then the worker running
    the job must still read arq's abort requests within one poll delay. A wake-up for
    something else just before the read falls due must not push it a whole poll delay further
    (it did: reads 2 s apart became 3.7 s). Seen by MONITOR on a Redis of the test's own."""
    from moonq.keys import Keys
    from tests.serving import worker_running

    def abort_reads(commands: list[dict[str, Any]]) -> list[float]:
        """When the worker read arq's abort requests (Redis's clock)."""
        return [c["time"] for c in commands if c["command"].startswith("ZRANGE arq:abort")]

    redis, build = own_stack
    # two slots, one kept for interactive jobs: no batch line to ask for meanwhile
    stack, client = await build(MOONQ_POLL_DELAY=2, MOONQ_WORKER_CONCURRENCY=2)
    async with worker_running(stack), _monitoring(redis) as commands:
        await submit(client, chat("slow", fake_moonshot={"first_byte_delay": 10}))
        while fake.stats.in_flight < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        commands.clear()  # from here on
        async with asyncio.timeout(8):
            while not abort_reads(commands):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            # 1.7 s after that read, something else wakes the worker
            first = abort_reads(commands)[0]
            seconds, micros = await redis.time()
            await asyncio.sleep(first + 1.7 - (seconds + micros / 1e6))
            await redis.publish(Keys(stack.settings.key_prefix).wake(), "queued")
            seconds, micros = await redis.time()
            woken = seconds + micros / 1e6
            while len(abort_reads(commands)) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    reads = abort_reads(commands)
    assert woken < reads[0] + 2, "the wake-up came too late to test anything"
    assert reads[1] - reads[0] < 2.5, reads


async def test_an_upgrade_moves_the_jobs_a_prefixed_deployment_queued_in_the_old_queue(
    either_redis: Any, prefix: str
) -> None:
    """MOONQ_QUEUE_NAME was `moonq:queue` whatever the prefix; it is now `{prefix}:queue`. A
    worker of a deployment with its own prefix moves the jobs it queued there to its queue as
    it starts (another deployment's jobs stay), so an upgrade strands none."""
    from moonq.keys import Keys
    from tests.conftest import make_settings
    from worker.main import move_legacy_queue

    redis = either_redis
    legacy = f"{prefix}-legacy:queue"  # `moonq:queue` itself is every test's to share
    settings = make_settings("redis://unused", prefix, "http://127.0.0.1:1", MOONQ_QUEUE_NAME="")
    assert settings.queue_name == f"{prefix}:queue"
    ours = [f"job_{prefix}_{i:04d}" for i in range(1200)]  # past a page of 500
    theirs = [f"job_other_{prefix}_{i}" for i in range(700)]
    entries = {job_id: 1000 + i for i, job_id in enumerate(ours + theirs)}
    mixed = sorted(entries, key=lambda j: hash(j) % 997)  # interleaved in the old queue
    await redis.zadd(legacy, {j: entries[j] for j in mixed})
    for job_id in ours:
        await redis.hset(f"{prefix}:job:{job_id}", "status", "queued")
    try:
        moved = await move_legacy_queue(redis, Keys(prefix), settings.queue_name, legacy)
        assert moved == len(ours)
        queued = await redis.zrange(settings.queue_name, 0, -1, withscores=True)
        assert {(k.decode(), int(v)) for k, v in queued} == {(j, entries[j]) for j in ours}
        left = {k.decode() for k in await redis.zrange(legacy, 0, -1)}
        assert set(theirs) <= left and not (set(ours) & left)
    finally:
        await redis.delete(legacy)
        await redis.delete(settings.queue_name, *(f"{prefix}:job:{j}" for j in ours))


async def test_the_end_of_a_run_refuses_a_bad_delay_before_writing(
    either_redis: Any, prefix: str
) -> None:
    """FINISH_RUN checks its delay before its first write (Redis keeps a script's earlier
    writes when a later command fails): the lock is still held, the queue untouched."""
    from redis.exceptions import ResponseError

    from moonq import scripts

    redis = either_redis
    job_id, queue = f"{prefix}-job", f"{prefix}:queue"
    lock = f"arq:in-progress:{job_id}"
    await redis.set(lock, "me", px=5000)
    await redis.zadd(queue, {job_id: 1000})
    end = redis.register_script(scripts.FINISH_RUN)
    keys = [lock, f"arq:job:{job_id}", f"arq:retry:{job_id}", "arq:abort", queue, f"{prefix}:j"]
    try:
        with pytest.raises(ResponseError, match="bad delay"):
            await end(keys=keys, args=["me", "0", "soon", job_id])
        assert await redis.get(lock) == b"me" and await redis.zscore(queue, job_id) == 1000
    finally:
        await redis.delete(lock, queue)
