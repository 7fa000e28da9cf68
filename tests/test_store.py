"""The job record: atomic creation, state changes fenced by attempt, TTLs."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from arq.connections import ArqRedis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import DataError, ReadOnlyError, ResponseError

from moonq.keys import Keys
from moonq.listing import JobLister, UnknownCursor
from moonq.models import JobCreate, Status
from moonq.redis import connect, transient
from moonq.store import AlreadyFinished, IdempotencyConflict, JobStore, utc_day
from tests.procs import free_port

TTL = 3600
# `XADD ... MAXLEN ~ n` trims whole stream nodes only (stream-node-max-entries, 100 by
# default): a log may hold up to that many events more than the cap, never more.
TRIM_SLACK = 100


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
    job, replayed = await store.create("acme", _request(custom_id="c1"))
    assert not replayed
    redis, keys = store.redis, store.keys
    assert await redis.zscore(store.queue_name, job.id) is not None
    arq_job = json.loads(await redis.get(f"arq:job:{job.id}"))
    assert arq_job["f"] == "run_completion" and arq_job["a"] == [job.id]  # JSON, not pickle
    # nothing expires while the job waits or runs; it is kept MOONQ_RESULT_TTL once it ends
    assert await redis.ttl(keys.job(job.id)) == -1
    assert await redis.ttl(f"arq:job:{job.id}") == -1
    assert await store.get(job.id, "acme") == job
    assert await store.get(job.id, "other") is None


async def test_start_append_finish(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    assert attempt == 1
    assert await store.append(job.id, attempt, [{"event": "chunk", "data": {"n": 1}}]) == 1
    assert (
        await store.append(job.id, attempt, [{"event": "chunk", "data": {"n": i}} for i in (2, 3)])
        == 3
    )
    seq = await store.finish(
        job.id,
        Status.COMPLETED,
        {"event": "done", "data": {}},
        {"result": {"ok": True}},
        attempt,
        tenant="t",
    )
    assert seq == 4
    done = await store.get(job.id)
    assert done is not None and done.status == Status.COMPLETED and done.result == {"ok": True}
    rows = await store.redis.xrange(store.keys.log(job.id))
    events = [json.loads(f[b"e"]) for _, f in rows]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e.get("data", {}).get("n") for e in events[:3]] == [1, 2, 3]
    assert 0 < await store.redis.ttl(store.keys.log(job.id)) <= TTL
    assert 0 < await store.redis.ttl(store.keys.job(job.id)) <= TTL


async def test_finish_writes_any_number_of_fields_and_checks_their_count_first(
    store: JobStore,
) -> None:
    """FINISH writes its record's fields in as few commands as Lua can pass them (it unpacks
    ~8,000 values at most: a review found 3,999 pairs failing after the terminal event was
    logged, the job then never able to end); a count of field pairs that ARGV does not hold
    is refused before any write."""
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    many = {f"f{i}": str(i) for i in range(5000)}
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    fields = {"result": {"ok": True}, "usage": usage, **many}
    done = {"event": "done", "data": {}}
    seq = await store.finish(job.id, Status.COMPLETED, done, fields, attempt, tenant="t")
    assert seq == 1
    record = await store.raw(job.id)
    assert record is not None and record["status"] == "completed"
    assert all(record[name] == value for name, value in many.items())
    assert (await store.get(job.id)).usage == usage  # type: ignore[union-attr]

    other, _ = await store.create("t", _request())
    attempt = await store.start_attempt(other.id)
    keys, args = store._finish_call(other.id, Status.COMPLETED, done, {}, attempt, "t", None, "")
    args[10] = int(args[10]) + 2  # more pairs than ARGV holds
    with pytest.raises(ResponseError, match="bad number of field pairs"):
        await store._finish(keys=keys, args=args)
    assert await store.redis.xlen(store.keys.log(other.id)) == 0
    assert (await store.raw(other.id) or {}).get("status") == "in_progress"


async def test_finish_charges_the_tenant_its_record_names_once_written(store: JobStore) -> None:
    """FINISH reads its record once, before its writes; a field it writes is not read from
    that read afterwards: the virtual time charged goes to the tenant the record now names
    (a review saw the one read ahead charged instead)."""
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    usage = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    fields = {"result": {}, "usage": usage, "tenant": "u"}
    await store.finish(job.id, Status.COMPLETED, {"event": "done"}, fields, attempt, tenant="t")
    vtimes = await store.redis.hgetall(store.keys.sched_vtime())  # type: ignore[misc]
    assert {k.decode(): float(v) for k, v in vtimes.items()} == {"u": 10.0}


async def test_a_start_under_a_permit_not_granted_writes_nothing(store: JobStore) -> None:
    """START sent beside the ask for an upstream permit (one round trip) starts the job only
    if the limiter holds that permit's lease: else -4, and the job is as it was, queued,
    listed as queued, its lock and attempts untouched; once the lease is held, it starts."""
    from arq.constants import in_progress_key_prefix

    from moonq.store import NOT_GRANTED

    job, _ = await store.create("t", _request())
    redis, keys = store.redis, store.keys
    record = await redis.hgetall(keys.job(job.id))
    queued = await redis.zrange(keys.tenant_status("t", Status.QUEUED.value), 0, -1)
    number, past = await store.start(job.id, "w1", "token-1", 5.0, lease="lease-1")
    assert (number, past) == (NOT_GRANTED, {})
    assert await redis.hgetall(keys.job(job.id)) == record
    assert await redis.zrange(keys.tenant_status("t", Status.QUEUED.value), 0, -1) == queued
    assert await redis.get(in_progress_key_prefix + job.id) is None
    await redis.zadd(keys.limit_leases(), {"lease-2": 1.0})  # another permit's lease
    assert (await store.start(job.id, "w1", "token-1", 5.0, lease="lease-1"))[0] == NOT_GRANTED
    await redis.zadd(keys.limit_leases(), {"lease-1": 1.0})
    assert (await store.start(job.id, "w1", "token-1", 5.0, lease="lease-1"))[0] == 1
    assert (await store.get(job.id, "t")).status is Status.IN_PROGRESS  # type: ignore[union-attr]
    assert await redis.get(in_progress_key_prefix + job.id) == b"token-1"


async def test_a_superseded_attempt_cannot_write(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    old = await store.start_attempt(job.id)
    new = await store.start_attempt(job.id)  # e.g. the old worker was presumed dead
    assert new == old + 1
    assert await store.append(job.id, old, [{"event": "chunk", "data": {}}]) == -1
    assert (
        await store.finish(job.id, Status.COMPLETED, {"event": "done"}, {}, old, tenant="t") == -1
    )
    assert await store.requeue(job.id, old, "late") == -1
    assert await store.append(job.id, new, [{"event": "chunk", "data": {}}]) == 1


async def test_one_call_writes_many_jobs_events_and_fences_each_on_its_own(
    store: JobStore,
) -> None:
    """A worker writes all its attempts' events in one script call: a stale attempt among them
    writes nothing, one whose log Redis refuses is reported alone, the others are written."""
    live, stale, broken = [(await store.create("t", _request()))[0] for _ in range(3)]
    live_attempt = await store.start_attempt(live.id)
    stale_attempt = await store.start_attempt(stale.id)
    await store.start_attempt(stale.id)  # a newer attempt took it over
    broken_attempt = await store.start_attempt(broken.id)
    # the log is ahead of the record (as no moonq write leaves it): its XADD is refused
    await store.redis.xadd(store.keys.log(broken.id), {"e": "{}"}, id="0-5")
    chunk = b'{"event":"chunk","data":{"n":1}}'
    results = await store.append_many(
        [
            (stale.id, stale_attempt, [chunk]),
            (broken.id, broken_attempt, [chunk]),
            (live.id, live_attempt, [chunk, chunk]),
        ]
    )
    assert results[0] == -1 and results[2] == 2
    assert type(results[1]) is ResponseError and "smaller" in str(results[1])
    assert await store.redis.xlen(store.keys.log(stale.id)) == 0
    assert await store.redis.hget(store.keys.job(broken.id), "seq") == b"0"  # unmoved
    events = [json.loads(f[b"e"]) for _, f in await store.redis.xrange(store.keys.log(live.id))]
    assert [e["seq"] for e in events] == [1, 2]
    assert await store.redis.hget(store.keys.job(live.id), "seq") == b"2"
    with pytest.raises(ResponseError):
        await store.append(broken.id, broken_attempt, [{"event": "chunk"}])
    await store.redis.set(store.keys.job(stale.id), "not a hash")  # a damaged record
    results = await store.append_many([(stale.id, 1, [chunk]), (live.id, live_attempt, [chunk])])
    assert type(results[0]) is ResponseError and "WRONGTYPE" in str(results[0])
    assert results[1] == 3  # the job after it is written all the same
    for bad in ([b"{}"], [b"[1]"], [b""]):  # not an event: refused before any write
        with pytest.raises(ResponseError, match="bad event"):
            await store.append_many([(live.id, live_attempt, bad)])
    assert await store.redis.xlen(store.keys.log(live.id)) == 3


async def test_a_finished_job_stays_finished(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    await store.finish(
        job.id,
        Status.FAILED,
        {"event": "error"},
        {"error": {"type": "x", "message": "m"}},
        attempt,
        tenant="t",
    )
    assert await store.start_attempt(job.id) == -1
    assert (
        await store.finish(job.id, Status.COMPLETED, {"event": "done"}, {}, attempt, tenant="t")
        == -1
    )
    assert await store.append(job.id, attempt, [{"event": "chunk"}]) == -1
    final = await store.get(job.id)
    assert final is not None and final.status == Status.FAILED and final.attempts == 1


async def test_requeue_returns_the_job_to_the_queue_state(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    assert await store.requeue(job.id, attempt, "rate_limit_reached_error: slow down") == 1
    again = await store.get(job.id)
    assert again is not None and again.status == Status.QUEUED and again.attempts == 1
    assert await store.start_attempt(job.id) == 2


async def test_missing_jobs(store: JobStore) -> None:
    assert await store.get("job_" + "0" * 32) is None
    assert await store.start_attempt("job_" + "0" * 32) == -2


async def test_requeue_spends_the_failure_budget(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    outcomes = []
    for _ in range(3):
        attempt = await store.start_attempt(job.id)
        outcomes.append(await store.requeue(job.id, attempt, "429", budget=3))
    assert outcomes == [1, 1, 0]  # the third failure spends a budget of three
    # a shutdown's hand-back is no failure of the job's
    job2, _ = await store.create("t", _request())
    for _ in range(5):
        assert await store.requeue(job2.id, await store.start_attempt(job2.id), "bye") == 1


async def test_usage_counts_once_per_job(store: JobStore) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    for _ in range(2):
        job, _ = await store.create("acme", _request())
        attempt = await store.start_attempt(job.id)
        fields = {"result": {}, "usage": usage}
        for _ in range(2):  # a second finish of the same job is refused
            await store.finish(
                job.id, Status.COMPLETED, {"event": "done"}, fields, attempt, tenant="acme"
            )
    day = store.keys.usage("acme", utc_day(store.clock()))
    counts = await store.redis.hgetall(day)  # type: ignore[misc]
    model = _request().body.model
    assert {k.decode(): int(v) for k, v in counts.items()} == {
        f"{model}|jobs": 2,
        f"{model}|prompt_tokens": 6,
        f"{model}|completion_tokens": 10,
        f"{model}|total_tokens": 16,
    }
    assert 0 < await store.redis.ttl(day) <= store.usage_ttl  # kept, but not for ever
    assert await store.redis.hgetall(store.keys.usage("other", utc_day(store.clock()))) == {}  # type: ignore[misc]


async def test_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first, replayed = await store.create("acme", _request(), "key-1")
    again, replayed_again = await store.create("acme", _request(), "key-1")
    assert not replayed and replayed_again and again.id == first.id
    assert await store.redis.zcard(store.queue_name) == 1  # enqueued once
    other, other_replayed = await store.create("globex", _request(), "key-1")
    assert other.id != first.id and not other_replayed  # keys are per tenant
    with pytest.raises(IdempotencyConflict):
        await store.create("acme", _request(custom_id="different"), "key-1")
    assert 0 < await store.redis.ttl(store.keys.idempotency("acme", _sha("key-1"))) <= 86400
    # once the first job has expired (MOONQ_RESULT_TTL may be under 24 h), the key is free
    await store.redis.delete(store.keys.job(first.id))
    fresh, fresh_replayed = await store.create("acme", _request(), "key-1")
    assert fresh.id != first.id and not fresh_replayed


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


async def test_cancel_a_queued_job(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    cancelled = await store.cancel(job.id, "t")
    assert cancelled is not None and cancelled.status == Status.CANCELLED
    assert await store.redis.zscore(store.queue_name, job.id) is None
    assert not await store.redis.exists(f"arq:job:{job.id}")  # nothing left for arq to run
    assert await store.redis.zscore("arq:abort", job.id) is None  # no worker to tell
    assert await store.start_attempt(job.id) == -1  # a worker that had it will not run it
    with pytest.raises(AlreadyFinished):
        await store.cancel(job.id, "t")
    assert await store.cancel(job.id, "someone-else") is None


async def test_cancel_keeps_the_partial_content(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": piece}}]}
        for piece in ("Hel", "lo")
    ]
    await store.append(
        job.id, attempt, [{"event": "chunk", "attempt": attempt, "data": c} for c in chunks]
    )
    await store.redis.psetex(f"arq:in-progress:{job.id}", 5000, b"1")  # a worker holds it
    cancelled = await store.cancel(job.id, "t")
    assert cancelled is not None and cancelled.result is not None
    assert cancelled.result["choices"][0]["message"]["content"] == "Hello"
    assert await store.append(job.id, attempt, [{"event": "chunk"}]) == -1
    assert await store.redis.zscore("arq:abort", job.id) is not None  # the worker is told
    await store.redis.zrem("arq:abort", job.id)
    await store.redis.delete(f"arq:in-progress:{job.id}")
    events = [json.loads(f[b"e"]) for _, f in await store.redis.xrange(store.keys.log(job.id))]
    assert [e["event"] for e in events] == ["chunk", "chunk", "cancelled"]


async def test_expired_jobs_leave_the_tenant_index(store: JobStore) -> None:
    jobs = [(await store.create("t", _request()))[0] for _ in range(4)]
    await store.redis.delete(store.keys.job(jobs[1].id))  # as if it had expired
    listed, more = await JobLister(store).page("t", limit=10)
    assert [j.id for j in listed] == [j.id for j in reversed(jobs) if j.id != jobs[1].id]
    assert not more
    assert await store.redis.zscore(store.keys.tenant_jobs("t"), jobs[1].id) is None


async def test_cancel_catches_a_fast_stream(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    for _ in range(30):  # a log of some length already
        await store.append(
            job.id, attempt, [{"event": "chunk", "attempt": attempt, "data": chunk}] * 100
        )

    async def stream() -> None:
        event = {"event": "chunk", "attempt": attempt, "data": chunk}
        while await store.append(job.id, attempt, [event]) > 0:  # noqa: ASYNC110
            await asyncio.sleep(0)

    writer = asyncio.create_task(stream())
    await asyncio.sleep(0.05)
    cancelled = await store.cancel(job.id, "t")
    await asyncio.wait_for(writer, 5)  # the stream is fenced off
    assert cancelled is not None and cancelled.status == Status.CANCELLED
    assert cancelled.result is not None
    content = cancelled.result["choices"][0]["message"]["content"]
    log = await store.redis.xrange(store.keys.log(job.id))
    kept = sum(json.loads(f[b"e"])["event"] == "chunk" for _, f in log)  # capped at max_events
    assert len(content) >= kept >= 900 and set(content) == {"x"}
    assert len(log) <= store.max_events + TRIM_SLACK  # 3000+ events written, ~1000 kept


async def test_cancel_of_a_job_held_by_a_dead_worker_leaves_nothing(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    await store.start_attempt(job.id)
    await store.redis.psetex(f"arq:in-progress:{job.id}", 200, b"1")  # its worker just died
    await store.cancel(job.id, "t")
    assert not await store.redis.exists(f"arq:job:{job.id}")
    assert await store.redis.zscore(store.queue_name, job.id) is None
    await store.redis.zrem("arq:abort", job.id)


async def test_a_cursor_that_is_gone_is_an_error_not_a_restart(store: JobStore) -> None:
    jobs = [(await store.create("t", _request()))[0] for _ in range(3)]
    await store.redis.delete(store.keys.job(jobs[1].id))
    listed, _ = await JobLister(store).page("t", limit=10)
    assert jobs[1].id not in [j.id for j in listed]
    with pytest.raises(UnknownCursor):
        await JobLister(store).page("t", limit=10, after=jobs[1].id)
    older, _ = await JobLister(store).page("t", limit=10, after=jobs[2].id)
    assert [j.id for j in older] == [jobs[0].id]


async def test_the_event_log_is_capped_at_max_events(store: JobStore) -> None:
    job, _ = await store.create("t", _request())
    attempt = await store.start_attempt(job.id)
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    event = {"event": "chunk", "attempt": attempt, "data": chunk}
    for _ in range(35):  # 3,500 events, in batches as the publisher writes them
        assert await store.append(job.id, attempt, [event] * 100) > 0
    log = await store.redis.xrange(store.keys.log(job.id))
    seqs = [json.loads(f[b"e"])["seq"] for _, f in log]
    assert store.max_events <= len(log) <= store.max_events + TRIM_SLACK
    assert seqs == list(range(3501 - len(log), 3501))  # the oldest dropped, the rest in order


async def test_a_failovers_readonly_reply_to_an_event_is_transient(own_redis: Any) -> None:
    """An XADD refused inside APPEND (the node just became a replica) comes back as redis-py's
    ReadOnlyError, which the worker rides out, not as a plain error that fails the job."""
    redis = connect(own_redis.url)
    try:
        store = JobStore(redis, Keys("r"), queue_name="r:queue", result_ttl=60, max_events=1000)
        job, _ = await store.create("t", _request())
        attempt = await store.start_attempt(job.id)
        await redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # demoted
        (result,) = await store.append_many([(job.id, attempt, [b'{"event":"chunk"}'])])
        assert isinstance(result, ReadOnlyError) and transient(result)
    finally:
        await redis.aclose()


@pytest.mark.redis
async def test_commands_are_packed_by_hiredis_as_redis_py_packs_them(real_redis: Any) -> None:
    """moonq's pools pack commands with hiredis (redis-py's asyncio client packs in Python):
    the same bytes for every type it takes, the same refusal for what it does not, and
    commands that work on Redis, through scripts and pipelines alike."""
    pool = real_redis.connection_pool
    connection = pool.make_connection()
    python = Connection()
    assert type(connection).pack_command is not Connection.pack_command
    values: list[Any] = ["abc", "é✓ \r\n", b"\x00\xff", 0, -5, 2**70, 1.5, 0.1, 1e20, -0.0]
    values += [memoryview(b"view"), b"x" * 10_000]
    for value in values:
        packed = b"".join(connection.pack_command("HSET", "k", "f", value))
        assert packed == b"".join(python.pack_command("HSET", "k", "f", value)), value
    for name in ("CONFIG GET", b"CONFIG GET"):  # a name of two words goes as two
        assert b"".join(connection.pack_command(name, "x")) == b"".join(
            python.pack_command(name, "x")
        )
    for bad in (True, None, bytearray(b"x"), object()):
        with pytest.raises(DataError):
            connection.pack_command("SET", "k", bad)
    key = f"packing:{uuid.uuid4().hex}"
    try:
        await real_redis.hset(key, mapping={"text": "é✓", "n": 2**70, "f": 0.1})
        assert await real_redis.hgetall(key) == {
            b"text": "é✓".encode(),
            b"n": b"%d" % 2**70,
            b"f": b"0.1",
        }
        async with real_redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "m", 3).hget(key, "m")
            assert await pipe.execute() == [3, b"3"]
        echo = real_redis.register_script("return ARGV")
        assert await echo(keys=[key], args=["a b", b"\xff", 7]) == [b"a b", b"\xff", b"7"]
    finally:
        await real_redis.delete(key)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", Connection),
        ("rediss://127.0.0.1:6379/0", SSLConnection),
        ("unix:///tmp/redis.sock?db=0", UnixDomainSocketConnection),
    ],
)
async def test_every_kind_of_connection_packs_by_hiredis(
    url: str, kind: type[AbstractConnection]
) -> None:
    redis = connect(url)
    try:
        cls = redis.connection_pool.connection_class
        assert issubclass(cls, kind) and cls.pack_command is not kind.pack_command
    finally:
        await redis.aclose()
