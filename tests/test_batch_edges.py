"""Batches at their edges: creations and sweeps cut short, lines ended before their batch
runs, usage long ago, absurd estimates, small accounts, cancelled lines already handed out,
and what a batch keeps and for how long. Each was a way to lose or wedge a batch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from moonq.batch_input import Limits
from moonq.batch_models import MAX_LISTED_ERRORS
from moonq.batches import BatchStore
from moonq.models import JobCreate, Status
from moonq.scheduler import Scheduler, batch_cap
from moonq.store import JobStore
from tests.conftest import make_settings
from tests.test_batches import batch_of, create, line, wait_for, worker_running

pytestmark = pytest.mark.redis

Lines = Callable[[], AsyncIterator[tuple[int, bytes]]]


def rows(n: int, **extra: Any) -> Lines:
    async def lines() -> AsyncIterator[tuple[int, bytes]]:
        for i in range(n):
            yield i + 1, json.dumps(line(f"l{i}", **extra)).encode()

    return lines


def limits(stack: Any, tpm: int = 0) -> Limits:
    return Limits(100_000, stack.settings.max_body_bytes, tpm)


async def services(real_stack: Any, **settings: Any) -> tuple[Any, JobStore, BatchStore]:
    stack, _ = await real_stack(**settings)
    store: JobStore = stack.app.state.services.store
    return stack, store, BatchStore(store)


async def statuses(stack: Any, store: JobStore, batch_id: str) -> set[str]:
    ids = await stack.redis.lrange(store.keys.batch_lines(batch_id), 0, -1)
    found = [await stack.redis.hget(store.keys.job(i.decode()), "status") for i in ids]
    return {s.decode() for s in found}


async def test_a_file_that_changes_between_the_two_passes_fails_the_batch(
    real_stack: Any,
) -> None:
    """The input file deleted while the lines are written: the second pass ends early."""
    stack, store, batches = await services(real_stack)
    passes = 0

    def shrinking() -> AsyncIterator[tuple[int, bytes]]:
        nonlocal passes
        passes += 1
        return rows(1200 if passes == 1 else 700)()

    batch = await batches.create(
        "t", "file-x", shrinking, window="24h", metadata=None, limits=limits(stack)
    )
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors["data"][0]["code"] == "input_file_changed"
    assert await statuses(stack, store, batch.id) == {"failed"}  # nothing left to run
    assert await stack.redis.zscore(store.keys.batches_expiring(), batch.id) is None


async def test_a_creation_cut_short_fails_the_batch_and_runs_nothing(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, store, batches = await services(real_stack)
    real, calls = BatchStore._write_chunk, 0

    async def flaky(self: BatchStore, *args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("Redis went away for a moment")
        await real(self, *args)

    monkeypatch.setattr(BatchStore, "_write_chunk", flaky)
    with pytest.raises(ConnectionError):
        await batches.create(
            "t", "file-x", rows(1200), window="24h", metadata=None, limits=limits(stack)
        )
    (found,) = (await batches.page("t", after=None, limit=10)).data
    assert found.status == "failed" and found.errors is not None
    assert found.errors["data"][0]["code"] == "batch_create_failed"
    assert await statuses(stack, store, found.id) == {"failed"}
    assert await stack.redis.zcard(store.keys.sched_active()) == 0


async def test_a_creation_whose_process_died_is_failed_by_the_sweep(real_stack: Any) -> None:
    """The API died between writing lines and making the batch run: validating, for good,
    but for the workers' sweep."""
    stack, store, batches = await services(real_stack)
    now = time.time()
    record = batches._record("batch_" + "a" * 24, "t", "file-x", "24h", None, now)
    await batches._write_record("batch_" + "a" * 24, "t", record | {"total": "600"}, now)
    from moonq import batch_input

    await batches._write_lines(
        "batch_" + "a" * 24, "t", batch_input.requests(rows(300)(), limits(stack)), now
    )
    assert await batches.sweep_due() == 0  # not before CREATE_DEADLINE
    await stack.redis.zadd(store.keys.batches_expiring(), {"batch_" + "a" * 24: 1})
    assert await batches.sweep_due() == 1
    found = await batches.get("batch_" + "a" * 24)
    assert found is not None and found.status == "failed"
    assert await statuses(stack, store, found.id) == {"failed"}


async def test_a_sweep_cut_short_is_taken_up_again(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, _store, batches = await services(real_stack)
    batch = await batches.create(
        "t", "file-x", rows(1500), window="1s", metadata=None, limits=limits(stack)
    )
    await asyncio.sleep(1.1)
    real, calls = JobStore.end_lines, 0

    async def dies_once(self: JobStore, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("the worker died here")
        return await real(self, *args)

    monkeypatch.setattr(JobStore, "end_lines", dies_once)
    with pytest.raises(ConnectionError):
        await batches.sweep_due()
    half = await batches.get(batch.id)
    assert half is not None and half.status == "in_progress"
    assert half.request_counts.expired == 500
    await batches.sweep_due()  # the next sweep (any worker's) takes it up again
    done = await batches.get(batch.id)
    assert done is not None and done.status == "expired"
    assert done.request_counts.expired == 1500


async def test_a_batch_whose_lines_ended_before_it_ran_ends_at_once(
    real_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, store, batches = await services(real_stack)
    real = BatchStore._write_lines

    async def then_cancelled(self: BatchStore, batch_id: str, tenant: str, *a: Any) -> int:
        written = await real(self, batch_id, tenant, *a)
        for raw in await stack.redis.lrange(store.keys.batch_lines(batch_id), 0, -1):
            await store.cancel(raw.decode(), tenant)  # the user cancels each line
        return written

    monkeypatch.setattr(BatchStore, "_write_lines", then_cancelled)
    batch = await batches.create(
        "t", "file-x", rows(3), window="24h", metadata=None, limits=limits(stack)
    )
    assert batch.status == "completed" and batch.request_counts.cancelled == 3


async def _finish_interactive(store: JobStore, tenant: str, tokens: int) -> None:
    job, _ = await store.create(tenant, JobCreate.model_validate({"body": line("x")["body"]}))
    assert await store.start_attempt(job.id) == 1
    usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
    event = {"event": "done", "attempt": 1, "data": {}}
    await store.finish(job.id, Status.COMPLETED, event, {"usage": usage}, 1, tenant=tenant)


async def _order(stack: Any, store: JobStore, n: int) -> list[str]:
    scheduler = Scheduler(stack.redis, store.keys, stack.settings.queue_name, cap=0)
    order = []
    for _ in range(n):
        for job_id in await scheduler.dispatch(1):
            owner = await stack.redis.hget(store.keys.job(job_id), "tenant")
            order.append(owner.decode())
    return order


async def test_usage_long_ago_is_forgiven(real_stack: Any) -> None:
    """Alice used 200,000 tokens ten minutes ago: by now she competes on equal terms."""
    stack, store, batches = await services(real_stack)
    await _finish_interactive(store, "alice", 200_000)
    await stack.redis.hset(store.keys.sched_vtime() + ":at", "alice", int(time.time()) - 600)
    await batches.create("alice", "f", rows(20), window="24h", metadata=None, limits=limits(stack))
    await batches.create("bob", "f", rows(20), window="24h", metadata=None, limits=limits(stack))
    order = await _order(stack, store, 10)
    assert order.count("alice") == 5 and order.count("bob") == 5


async def test_one_absurd_estimate_cannot_break_fairness(real_stack: Any) -> None:
    stack, store, batches = await services(real_stack)
    await batches.create(
        "zed", "f", rows(1, max_tokens=10**30), window="24h", metadata=None, limits=limits(stack)
    )
    assert await _order(stack, store, 1) == ["zed"]
    for tenant in ("alice", "bob"):
        await batches.create(
            tenant, "f", rows(50), window="24h", metadata=None, limits=limits(stack)
        )
    order = await _order(stack, store, 60)
    assert order.count("alice") == order.count("bob") == 30


@pytest.mark.parametrize(
    ("concurrency", "cap"), [(0, 0), (1, 1), (2, 1), (4, 3), (10, 9), (50, 45)]
)
def test_interactive_jobs_keep_a_permit_on_small_accounts(concurrency: int, cap: int) -> None:
    settings = make_settings("redis://x", "p", "http://x", MOONQ_UPSTREAM_CONCURRENCY=concurrency)
    assert batch_cap(settings) == cap


async def test_cancelled_lines_already_handed_out_let_go_at_once(
    real_stack: Any, fake: Any
) -> None:
    """Lines a worker took but that still wait for a permit (RPM spent) are let go when the
    batch is cancelled: no job slot or place in the limiter's line stays taken."""
    stack, client = await real_stack(
        MOONQ_UPSTREAM_CONCURRENCY=20, MOONQ_UPSTREAM_RPM=5, MOONQ_UPSTREAM_TPM=0
    )
    batch = await create(client, [line(f"z{i}") for i in range(40)])
    keys = stack.app.state.services.keys
    async with worker_running(stack) as worker:

        async def waiting() -> bool:
            spent = fake.stats.requests >= 4  # kept_back(5): the batch's share of the minute
            return spent and await stack.redis.zcard(keys.limit_waiting()) >= 5

        await wait_for(waiting, 10)
        assert (await client.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 200

        async def let_go() -> bool:
            return worker.job_counter == 0 and not await stack.redis.zcard(keys.limit_waiting())

        await wait_for(let_go, 2)
    final = await batch_of(client, batch["id"])
    assert final["status"] == "cancelled" and fake.stats.requests == 4
    assert final["request_counts"]["cancelled"] == 36


async def test_lines_are_kept_as_long_as_their_batch(real_stack: Any) -> None:
    stack, store, batches = await services(real_stack, MOONQ_RESULT_TTL=3600)
    batch = await batches.create(
        "t", "f", rows(2), window="2h", metadata=None, limits=limits(stack)
    )
    first = (await stack.redis.lindex(store.keys.batch_lines(batch.id), 0)).decode()
    await store.cancel(first, "t")  # ends long before its batch
    kept = await stack.redis.ttl(store.keys.job(first))
    assert kept >= 2 * 3600 + 3600  # the window still to run, then the results' time
    await batches.cancel(batch.id, "t")
    assert await stack.redis.ttl(store.keys.batch(batch.id)) >= kept - 5
    assert await stack.redis.ttl(store.keys.tenant_batch("t", batch.id)) > 0


async def test_expired_batches_leave_the_list_and_pages_stay_full(real_stack: Any) -> None:
    stack, store, batches = await services(real_stack)
    made = [
        await batches.create("t", "f", rows(1), window="24h", metadata=None, limits=limits(stack))
        for _ in range(5)
    ]
    for gone in made[2:4]:
        await stack.redis.delete(store.keys.batch(gone.id))  # expired
    page = await batches.page("t", after=None, limit=2)
    assert [b.id for b in page.data] == [made[4].id, made[1].id] and page.has_more
    rest = await batches.page("t", after=page.last_id, limit=2)
    assert [b.id for b in rest.data] == [made[0].id] and not rest.has_more
    assert await stack.redis.zcard(store.keys.tenant_batches("t")) == 3


async def test_a_file_of_bad_lines_lists_the_first_thousand(real_stack: Any) -> None:
    stack, _store, batches = await services(real_stack)

    async def bad() -> AsyncIterator[tuple[int, bytes]]:
        for i in range(MAX_LISTED_ERRORS + 250):
            yield i + 1, b"{not json"

    batch = await batches.create("t", "f", bad, window="24h", metadata=None, limits=limits(stack))
    assert batch.errors is not None
    data = batch.errors["data"]
    assert len(data) == MAX_LISTED_ERRORS + 1 and data[-2]["line"] == MAX_LISTED_ERRORS
    assert data[-1]["code"] == "too_many_errors" and "250 more" in data[-1]["message"]


async def test_an_expiring_batch_cannot_be_cancelled(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=1)
    batch = await create(
        client,
        [line(f"e{i}", fake_moonshot={"chunks": 5, "delay": 0.3}) for i in range(5)],
        completion_window="1s",
    )
    async with worker_running(stack):

        async def expiring() -> bool:
            found = await stack.redis.hget(
                stack.app.state.services.keys.batch(batch["id"]), "ending"
            )
            return found == b"expired"

        await wait_for(expiring, 6)
        answer = await client.post(f"/v1/batches/{batch['id']}/cancel")
        assert answer.status_code == 409

        async def ended() -> bool:
            return (await batch_of(client, batch["id"]))["status"] == "expired"

        await wait_for(ended, 6)


async def test_a_batch_total_that_would_overflow_fails_the_line_not_the_batch(
    real_stack: Any,
) -> None:
    """FINISH checks the batch's totals before its first write: a usage that would overflow
    them fails the line (once, as internal_error) and the batch still ends."""
    stack, client = await real_stack()
    batch = await create(client, [line("a")])
    key = f"{stack.settings.key_prefix}:batch:{batch['id']}"
    await stack.redis.hset(key, "total_tokens", str(2**63 - 10))
    await stack.run_worker()
    ended = (await client.get(f"/v1/batches/{batch['id']}")).json()
    assert ended["status"] == "completed", ended
    assert ended["request_counts"]["failed"] == 1
    job = (await client.get("/v1/jobs", params={"batch_id": batch["id"]})).json()["data"][0]
    assert job["status"] == "failed" and job["error"]["type"] == "internal_error"
    assert await stack.redis.ttl(f"{stack.settings.key_prefix}:job:{job['id']}") > 0
