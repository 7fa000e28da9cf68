"""Fair scheduling: interactive jobs are not stuck behind batches, tenants' batches progress at
the same rate whatever their sizes, and a tenant that used more recently yields."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from moonq.batch_input import Limits
from moonq.batches import BatchStore
from moonq.fake_moonshot import FakeServer
from moonq.keys import Keys
from moonq.models import JobCreate, Status
from moonq.scheduler import Scheduler
from tests.test_batches import batch_of, create, line, slow, wait_for, worker_running

pytestmark = pytest.mark.redis


async def _first_chunk_after(client: httpx.AsyncClient, text: str) -> float:
    """Seconds from submitting an interactive job to its first streamed chunk."""
    began = time.monotonic()
    response = await client.post("/v1/jobs", json={"body": line("i", text)["body"]})
    assert response.status_code == 202
    job_id = response.json()["id"]
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        async for row in events.aiter_lines():
            if row.startswith("data:") and json.loads(row[5:])["event"] == "chunk":
                return time.monotonic() - began
    raise AssertionError("the job ended without a chunk")


@pytest.mark.parametrize("lines", [500, pytest.param(5_000, marks=pytest.mark.slow, id="5000")])
async def test_an_interactive_job_streams_within_a_second_behind_a_batch(
    real_stack: Any, fake: FakeServer, lines: int
) -> None:
    stack, client = await real_stack(
        MOONQ_UPSTREAM_CONCURRENCY=10, MOONQ_UPSTREAM_RPM=0, MOONQ_UPSTREAM_TPM=0
    )
    batch = await create(client, [slow(f"b{i}", 3.0) for i in range(lines)])
    async with worker_running(stack):

        async def busy() -> bool:
            return fake.stats.in_flight >= 9  # the batch holds all it may (10 less a tenth)

        await wait_for(busy, 10)
        waits = [await _first_chunk_after(client, f"q{i}") for i in range(20)]
        assert (await batch_of(client, batch["id"]))["request_counts"]["completed"] < lines
        await client.post(f"/v1/batches/{batch['id']}/cancel")
    waits.sort()
    print(
        f"first chunk behind {lines} batch lines: p50 {statistics.median(waits):.3f} s, "
        f"max {waits[-1]:.3f} s"
    )
    assert waits[-1] < 1.0  # p99 of 20 tries: the worst one
    assert fake.stats.peak_in_flight <= 10


async def test_two_tenants_progress_at_the_same_rate(real_stack: Any, fake: FakeServer) -> None:
    stack, alice = await real_stack(
        MOONQ_API_KEYS="ka=alice,kb=bob", MOONQ_UPSTREAM_CONCURRENCY=4, MOONQ_UPSTREAM_RPM=0
    )
    alice.headers["Authorization"] = "Bearer ka"
    bob = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stack.app),
        base_url="http://moonq",
        headers={"Authorization": "Bearer kb"},
    )
    big = await create(alice, [slow(f"a{i}", 0.1) for i in range(120)])
    small = await create(bob, [slow(f"b{i}", 0.1) for i in range(30)])
    async with worker_running(stack):

        async def bob_done() -> bool:
            return (await batch_of(bob, small["id"]))["status"] == "completed"

        await wait_for(bob_done, 20)
        done_a = (await batch_of(alice, big["id"]))["request_counts"]["completed"]
        await alice.post(f"/v1/batches/{big['id']}/cancel")
    await bob.aclose()
    print(f"when bob's 30 lines were done, alice had {done_a} of 120")
    assert abs(done_a - 30) <= 0.2 * 30


def _as(client: httpx.AsyncClient, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=client._transport,
        base_url="http://moonq",
        headers={"Authorization": f"Bearer {key}"},
    )


@pytest.mark.parametrize(
    ("where", "slots", "seconds", "most_done"),
    [("in the queue", 2, 0.25, 6), ("at the limiter", 11, 1.0, 4)],
)
async def test_one_tenants_job_does_not_wait_behind_anothers_many(
    real_stack: Any, fake: FakeServer, where: str, slots: int, seconds: float, most_done: int
) -> None:
    """Alice queues her jobs, then Bob one; the upstream allows 2 requests at once. In the
    queue (2 worker slots, 60 of hers), his runs once a slot frees, not after all of hers
    (it did: first in, first out across tenants). At the limiter (11 slots, 10 of hers: 8
    wait for a permit), his waits behind none of them, not behind every older job."""
    stack, client = await real_stack(
        MOONQ_API_KEYS="ka=alice,kb=bob",
        MOONQ_UPSTREAM_CONCURRENCY=2,
        MOONQ_UPSTREAM_RPM=0,
        MOONQ_WORKER_CONCURRENCY=slots,
    )
    alice, bob = _as(client, "ka"), _as(client, "kb")
    queued = 60 if slots == 2 else 10
    for i in range(queued):
        response = await alice.post("/v1/jobs", json={"body": slow(f"a{i}", seconds)["body"]})
        assert response.status_code == 202
    async with worker_running(stack):
        await wait_for(lambda: _true(fake.stats.in_flight >= 2), 10)
        line = Keys(stack.settings.key_prefix).limit_waiting()
        await wait_for(lambda: _waiting(stack.redis, line, min(8, slots - 2)), 10)
        created = await bob.post("/v1/jobs", json={"body": slow("b", seconds)["body"]})
        # what the line held and Bob's turn, to show should he come late
        record = Keys(stack.settings.key_prefix).job(created.json()["id"])
        seen = await stack.redis.zrange(line, 0, -1, withscores=True)
        turn = await stack.redis.hget(record, "order")
        job = (await bob.get(f"/v1/jobs/{created.json()['id']}", params={"wait": 30})).json()
        done = await alice.get("/v1/jobs", params={"status": "completed", "limit": 100})
    await alice.aclose()
    await bob.aclose()
    assert job["status"] == "completed", job
    print(f"{where}: alice's jobs done when bob's was: {len(done.json()['data'])} of {queued}")
    assert len(done.json()["data"]) <= most_done, (turn, seen)


async def _waiting(redis: Any, line: str, count: int) -> bool:
    return int(await redis.zcard(line)) >= count


async def _true(value: bool) -> bool:
    return value


async def test_tenants_interactive_jobs_alternate_and_an_idle_one_goes_next(
    real_stack: Any,
) -> None:
    """Workers take interactive jobs in fair order: each tenant's in the order it queued
    them, tenants' alternating, whoever queued first; a tenant idle until now takes its turn
    beside the next one waiting, with no credit for its idle time; a retry that falls due
    goes before them all."""
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases

    stack, _client = await real_stack()
    store, queue = stack.app.state.services.store, stack.settings.queue_name
    request = JobCreate.model_validate({"body": line("x")["body"]})
    alice = [(await store.create("alice", request))[0].id for _ in range(30)]
    bob = [(await store.create("bob", request))[0].id for _ in range(10)]
    seconds, _ = await stack.redis.time()
    await stack.redis.zadd(queue, {"retry": seconds * 1000 - 1000})
    take = stack.redis.register_script(scripts.TAKE_DUE)
    keys = [queue, queue_leases(queue)]

    async def poll(slots: int) -> list[str]:
        found, _ = await take(keys=keys, args=[lock_base, 5000, "test", 100, slots])
        return [x.decode() for x in found[::2]]

    order = [job_id for _ in range(21) for job_id in await poll(1)]
    for job_id in order[1:]:  # their attempts start
        assert await store.start_attempt(job_id) == 1
    carol, _ = await store.create("carol", request)
    after = await poll(2)
    await stack.redis.delete(*(lock_base + j for j in [*order, *after]))
    assert order[0] == "retry"
    assert [j for j in order if j in alice] == alice[:10]
    assert [j for j in order if j in bob] == bob
    pairs = [sorted(j in bob for j in order[i : i + 2]) for i in range(1, 21, 2)]
    assert pairs == [[False, True]] * 10  # one of each, turn by turn
    assert sorted(after) == sorted([carol.id, alice[10]])


@pytest.mark.parametrize("batch", [False, True], ids=["", "with a batch of hers queued"])
async def test_fair_order_holds_whoever_runs_the_jobs_and_whatever_was_cancelled(
    real_stack: Any, batch: bool
) -> None:
    """Alice's 100 jobs ran (by any runner, arq's own included) and 300 more were cancelled;
    Bob now has 100 waiting. Alice's next job goes right after Bob's first, not behind all of
    his (the cancelled jobs' turns were given back, whatever else of hers waits: a batch's
    lines have no turns); and a batch line handed back waits for both."""
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases
    from moonq.redis_clock import LINES

    stack, client = await real_stack(MOONQ_API_KEYS="ka=alice,kb=bob")
    store, queue = stack.app.state.services.store, stack.settings.queue_name
    request = JobCreate.model_validate({"body": line("x")["body"]})
    if batch:  # its 200 lines wait, queued (no worker hands them out here)
        client.headers["Authorization"] = "Bearer ka"
        await create(client, [line(f"l{i}") for i in range(200)])
        queued = store.keys.tenant_status("alice", Status.QUEUED.value)
        assert await stack.redis.zcard(queued) == 200
    ran = [(await store.create("alice", request))[0].id for _ in range(100)]
    for job_id in ran:  # run by whichever runner: started, then out of the queue
        assert await store.start_attempt(job_id) == 1
    await stack.redis.zrem(queue, *ran)
    for _ in range(300):
        job, _ = await store.create("alice", request)
        assert (await store.cancel(job.id, "alice")) is not None
    bob = [(await store.create("bob", request))[0].id for _ in range(100)]
    await stack.redis.zadd(queue, {"line": LINES})  # a batch line handed back
    late, _ = await store.create("alice", request)
    take = stack.redis.register_script(scripts.TAKE_DUE)
    found, _ = await take(keys=[queue, queue_leases(queue)], args=[lock_base, 5000, "t", 100, 3])
    first = [x.decode() for x in found[::2]]
    await stack.redis.delete(*(lock_base + j for j in first))
    assert first[0] == bob[0] and sorted(first[1:]) == sorted([bob[1], late.id])


async def test_a_tenant_queued_before_the_waiting_count_keeps_its_order(real_stack: Any) -> None:
    """Jobs queued by an earlier moonq, which kept no set of a tenant's waiting jobs: the
    tenant's new jobs still take turns after them, counted by its queued index, until the
    clock passes its last turn of then; from there its cancelled jobs' turns are given
    back."""
    from moonq.keys import queue_fair_waiting

    stack, _client = await real_stack()
    store, queue = stack.app.state.services.store, stack.settings.queue_name
    request = JobCreate.model_validate({"body": line("x")["body"]})

    async def turn(job_id: str) -> int:
        return int(await stack.redis.hget(store.keys.job(job_id), "order"))

    before = [(await store.create("alice", request))[0].id for _ in range(10)]
    await stack.redis.delete(queue_fair_waiting(queue, "alice"))  # as an earlier moonq left it
    new = [(await store.create("alice", request))[0].id for _ in range(2)]
    assert [await turn(j) for j in before + new] == list(range(1, 13))
    for job_id in before:
        assert await store.start_attempt(job_id) == 1
    for job_id in new:
        assert (await store.cancel(job_id, "alice")) is not None
    late, _ = await store.create("alice", request)
    assert await turn(late.id) == 11  # right after the latest started: 11 and 12 given back


async def test_jobs_put_back_keep_their_turns_and_newcomers_start_at_the_latest(
    real_stack: Any,
) -> None:
    """Alice's and Bob's 20 jobs each; 30 were taken and started, and a worker that stopped
    put 10 of them back (their turns 1-5). Erin queues 15 now: the jobs put back go first,
    then Erin's alternate with Alice's and Bob's from the latest turn started; hers do not
    jump ahead of theirs."""
    from arq.constants import in_progress_key_prefix as lock_base

    from moonq import scripts
    from moonq.keys import queue_leases

    stack, _client = await real_stack()
    store, queue = stack.app.state.services.store, stack.settings.queue_name
    request = JobCreate.model_validate({"body": line("x")["body"]})
    for _ in range(20):
        await store.create("alice", request)
        await store.create("bob", request)
    keys = [queue, queue_leases(queue)]
    take = stack.redis.register_script(scripts.TAKE_DUE)
    end = stack.redis.register_script(scripts.FINISH_RUN)

    async def poll(slots: int, token: str) -> list[str]:
        found, _ = await take(keys=keys, args=[lock_base, 60_000, token, 100, slots])
        return [x.decode() for x in found[::2]]

    first, later = await poll(10, "w1"), await poll(20, "w2")
    for job_id in first + later:
        assert await store.start_attempt(job_id) == 1
    for job_id in first:  # w1 stops: they go back, in their places
        await stack.redis.hset(store.keys.job(job_id), "status", "queued")
        run_keys = [lock_base + job_id, f"arq:job:{job_id}", f"arq:retry:{job_id}", "arq:abort"]
        await end(
            keys=[*run_keys, queue, store.keys.job(job_id), keys[1]], args=["w1", "0", "", job_id]
        )
    erin = [(await store.create("erin", request))[0].id for _ in range(15)]
    order = await poll(100, "w3")
    await stack.redis.delete(*(lock_base + j for j in first + later + order))
    assert sorted(order[:10]) == sorted(first)
    owners = [(await stack.redis.hget(store.keys.job(j), "tenant")).decode() for j in order[10:19]]
    assert owners.count("erin") <= 4, owners  # a turn each, not all of hers first
    assert set(erin) <= set(order)


async def test_a_tenant_that_used_more_recently_yields(real_stack: Any) -> None:
    """Alice's interactive jobs used 5,000 tokens just now; Bob used none. Their batches of
    equal lines arrive together: Bob's lines go first until he has used as much."""
    stack, _client = await real_stack()
    store = stack.app.state.services.store
    job, _ = await store.create("alice", JobCreate.model_validate({"body": line("x")["body"]}))
    assert await store.start_attempt(job.id) == 1
    usage = {"prompt_tokens": 4000, "completion_tokens": 1000, "total_tokens": 5000}
    event = {"event": "done", "attempt": 1, "data": {}}
    await store.finish(job.id, Status.COMPLETED, event, {"usage": usage}, 1, tenant="alice")
    batches = BatchStore(store)
    limits = Limits(100, stack.settings.max_body_bytes, 0)
    rows = [json.dumps(line(f"l{i}")).encode() for i in range(40)]

    async def lines() -> Any:
        for number, raw in enumerate(rows, 1):
            yield number, raw

    a = await batches.create("alice", "file-a", lines, window="24h", metadata=None, limits=limits)
    b = await batches.create("bob", "file-b", lines, window="24h", metadata=None, limits=limits)
    scheduler = Scheduler(stack.redis, store.keys, stack.settings.queue_name, cap=0)
    order = []
    for _ in range(60):
        for job_id in await scheduler.dispatch(1):
            order.append((await stack.redis.hget(store.keys.job(job_id), "batch_id")).decode())
    first_alice = order.index(a.id)
    print(f"bob's lines before alice's first: {first_alice}")
    # each line is estimated at ~20 tokens: 5,000 tokens buy bob well over 40 lines
    assert order[:40] == [b.id] * 40
    assert order[40:60] == [a.id] * 20


async def test_a_batch_that_fills_the_minute_leaves_room_for_interactive_jobs(
    real_stack: Any, fake: FakeServer
) -> None:
    """RPM is the limit: the batch takes what it may of the minute's window at once, and an
    interactive job still starts at once, from the tenth kept back, not a minute later."""
    stack, client = await real_stack(
        MOONQ_UPSTREAM_CONCURRENCY=10, MOONQ_UPSTREAM_RPM=20, MOONQ_UPSTREAM_TPM=0
    )
    batch = await create(client, [line(f"b{i}") for i in range(60)])
    async with worker_running(stack):

        async def window_full() -> bool:
            counts = (await batch_of(client, batch["id"]))["request_counts"]
            return counts["completed"] >= 18  # kept_back(20): the batch's share of the minute

        await wait_for(window_full, 10)
        await asyncio.sleep(0.3)
        assert (await batch_of(client, batch["id"]))["request_counts"]["completed"] == 18
        waits = [await _first_chunk_after(client, f"q{i}") for i in range(2)]
        await client.post(f"/v1/batches/{batch['id']}/cancel")
    print(f"first chunks with the minute's window full of batch lines: {waits}")
    assert max(waits) < 1.0


def test_a_jobs_place_at_the_limiter_is_its_turn() -> None:
    """At the upstream limiter, interactive jobs wait by turn, a job queued before turns
    existed (an upgrade) ahead of them all, as it is older: behind them it could starve under
    load. Batch lines wait after every interactive job, oldest first."""
    from worker.jobs import permit_priority

    created = "1795767183.5"
    before = permit_priority({"created_at": created, "tenant": "a"})
    turns = [permit_priority({"created_at": created, "order": str(n)}) for n in (1, 2, 10**9)]
    lines = [permit_priority({"created_at": str(t), "batch_id": "b"}) for t in (1.0e9, 2.0e9)]
    assert before < turns[0] < turns[1] < turns[2] < lines[0] < lines[1]


async def test_a_newcomer_goes_no_later_than_the_first_turn_waiting_at_the_limiter(
    real_stack: Any,
) -> None:
    """Alice's 10 jobs were taken at once; her 7th and 10th asked for the limiter's permits
    first (its line was empty) and started, the others wait there by turn. Bob's job queued
    now waits behind none of hers: not behind every turn below the latest started."""
    stack, _client = await real_stack()
    store = stack.app.state.services.store
    request = JobCreate.model_validate({"body": line("x")["body"]})
    alice = [(await store.create("alice", request))[0].id for _ in range(10)]
    for job_id in (alice[6], alice[9]):
        assert await store.start_attempt(job_id) == 1
    waiting = {f"lease-{n}": n + 1 for n in range(10) if n not in (6, 9)}
    await stack.redis.zadd(store.keys.limit_waiting(), waiting)
    bob, _ = await store.create("bob", request)
    turn = int(await stack.redis.hget(store.keys.job(bob.id), "order"))
    assert turn <= min(waiting.values()), turn


async def _turn(stack: Any, job_id: str) -> int:
    store = stack.app.state.services.store
    return int(await stack.redis.hget(store.keys.job(job_id), "order"))


@pytest.mark.parametrize("source", ["a retry", "another queue"])
async def test_a_low_turn_at_the_limiter_lets_one_newcomer_job_ahead_not_all(
    real_stack: Any, source: str
) -> None:
    """Alice has 100 jobs queued, 50 started (clock 50); an old turn waits at the limiter
    (her 3rd job back from a retry's delay, or a job of another queue sharing the account's
    limiter). Bob queues 40: his first takes that turn, the rest alternate with Alice's 51+
    (found by a review: all 40 went ahead of hers)."""
    from moonq.store import JobStore

    stack, _client = await real_stack()
    store = stack.app.state.services.store
    request = JobCreate.model_validate({"body": line("x")["body"]})
    alice = [(await store.create("alice", request))[0].id for _ in range(100)]
    for job_id in alice[:50]:
        assert await store.start_attempt(job_id) == 1
    if source == "a retry":
        low = await _turn(stack, alice[2])
    else:
        other = JobStore(
            stack.redis,
            store.keys,
            queue_name=f"{store.queue_name}-b",
            result_ttl=60,
            max_events=100,
        )
        job, _ = await other.create("carol", request)
        low = int(await stack.redis.hget(store.keys.job(job.id), "order"))
    await stack.redis.zadd(store.keys.limit_waiting(), {"lease-low": low})
    bob = [(await store.create("bob", request))[0].id for _ in range(40)]
    turns = [await _turn(stack, j) for j in bob]
    assert sum(1 for t in turns if t < 51) <= 2, (low, turns)


async def test_a_new_job_never_goes_before_its_tenants_older_waiting_jobs(
    real_stack: Any,
) -> None:
    """Alice queues 10 and cancels her 2nd-4th: her next job goes after her 10th, not
    among her older ones (a review found it tied with her 8th); cancelling her last ones
    gives their turns back."""
    stack, _client = await real_stack()
    store = stack.app.state.services.store
    request = JobCreate.model_validate({"body": line("x")["body"]})
    alice = [(await store.create("alice", request))[0].id for _ in range(10)]
    for job_id in alice[1:4]:
        assert await store.cancel(job_id, "alice") is not None
    late, _ = await store.create("alice", request)
    assert await _turn(stack, late.id) == 11
    for job_id in [*alice[7:], late.id]:
        assert await store.cancel(job_id, "alice") is not None
    again, _ = await store.create("alice", request)
    assert await _turn(stack, again.id) == 8  # right after her 7th, the latest that waits


async def test_jobs_queued_by_the_previous_create_beside_the_new_keep_their_order(
    real_stack: Any,
) -> None:
    """A rolling upgrade (or a rollback, then the upgrade again): once Alice's waiting set is
    in use, an API process of the previous release queues 10 of hers, which the set lacks;
    her next job from the new release still goes after them."""
    from arq.constants import job_key_prefix

    from moonq.keys import queue_fair, queue_fair_clock
    from moonq.store import arq_payload, new_job_id, new_record

    stack, _client = await real_stack()
    store, k = stack.app.state.services.store, stack.app.state.services.store.keys
    request = JobCreate.model_validate({"body": line("x")["body"]})
    previous = Path(__file__).with_name("data") / "create_15d3244.lua"
    old = stack.redis.register_script(previous.read_text())
    first, _ = await store.create("alice", request)
    by_old = []
    for _ in range(10):
        job_id, now = new_job_id(), time.time()
        record = new_record(job_id, "alice", "moonshot-v1-8k", {}, now)
        keys = [k.job(job_id), k.tenant_jobs("alice"), job_key_prefix + job_id, store.queue_name]
        keys += [k.idempotency("alice", "x"), k.tenant_status("alice", Status.QUEUED.value)]
        keys += ["", k.wake(), queue_fair(store.queue_name), queue_fair_clock(store.queue_name)]
        args: list[Any] = [job_id, repr(now), k.job(""), arq_payload(job_id, 0), 0, "f", "0"]
        args += ["alice", *(x for pair in record.items() for x in pair)]
        assert await old(keys=keys, args=args) == b""
        by_old.append(job_id)
    late, _ = await store.create("alice", request)
    older = [await _turn(stack, j) for j in by_old]
    assert await _turn(stack, first.id) < min(older)
    assert await _turn(stack, late.id) > max(older), older


async def test_a_job_queued_before_turns_at_the_limiter_hides_no_turn_there(
    real_stack: Any,
) -> None:
    """The limiter's line holds a job queued before turns (its place: 0) beside Alice's
    turn 3, while her 10th started (clock 10): Bob's job goes no later than 3."""
    stack, _client = await real_stack()
    store = stack.app.state.services.store
    request = JobCreate.model_validate({"body": line("x")["body"]})
    alice = [(await store.create("alice", request))[0].id for _ in range(10)]
    assert await store.start_attempt(alice[9]) == 1
    await stack.redis.zadd(store.keys.limit_waiting(), {"legacy": 0, "lease-3": 3})
    bob, _ = await store.create("bob", request)
    assert await _turn(stack, bob.id) <= 3
