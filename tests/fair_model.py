"""A model of fair turns (CREATE, START, FINISH, cancels, retries, the limiter's line and the
previous release's CREATE beside today's) driven on real Redis by random sequences of
operations, with the invariants a user relies on checked after each step (written by a
review, tests/test_fair_model.py runs it).

Operations are abstract (jobs picked by rank among the candidates), so any part of a failing
sequence is a valid sequence: a failure is shrunk by deleting operations.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from arq.constants import job_key_prefix

import moonq.store as ms
from moonq.keys import Keys, queue_fair, queue_fair_clock, queue_fair_waiting
from moonq.models import JobCreate, Status
from moonq.redis_clock import LINES
from moonq.store import JobStore, arq_payload, new_record
from tests.conftest import _test_redis_url, cleanup_prefix

OLD_LUA = (Path(__file__).with_name("data") / "create_15d3244.lua").read_text()
REQUEST = JobCreate.model_validate(
    {"body": {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "x"}]}}
)
TENANTS = ["a", "b", "c", "d"]


@dataclass
class J:
    id: str
    tenant: str
    turn: int
    seq: int
    old: bool
    state: str = "queued"  # queued | limiter | running | ended
    started: bool = False
    attempt: int = 0


@dataclass
class World:
    store: JobStore
    redis: Any
    prefix: str
    old: Any
    jobs: list[J] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def fresh_store(redis: Any) -> tuple[JobStore, str]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    store = JobStore(
        redis, Keys(prefix), queue_name=f"{prefix}:queue", result_ttl=60, max_events=100
    )
    return store, prefix


async def turn_of(w: World, job_id: str) -> int:
    return int(await w.redis.hget(w.store.keys.job(job_id), "order"))


async def clock(w: World) -> int:
    v = await w.redis.get(queue_fair_clock(w.store.queue_name))
    return int(v) if v else 1


async def old_create(w: World, tenant: str) -> str:
    k, store = w.store.keys, w.store
    job_id, now = ms.new_job_id(), time.time()
    record = new_record(job_id, tenant, "moonshot-v1-8k", {}, now)
    keys = [k.job(job_id), k.tenant_jobs(tenant), job_key_prefix + job_id, store.queue_name]
    keys += [k.idempotency(tenant, "x"), k.tenant_status(tenant, Status.QUEUED.value)]
    keys += ["", k.wake(), queue_fair(store.queue_name), queue_fair_clock(store.queue_name)]
    args: list[Any] = [job_id, repr(now), k.job(""), arq_payload(job_id, 0), 0, "f", "0"]
    args += [tenant, *(x for pair in record.items() for x in pair)]
    assert await w.old(keys=keys, args=args) == b""
    return job_id


def waiting(w: World, tenant: str | None = None) -> list[J]:
    """Never started, not ended."""
    return [
        j
        for j in w.jobs
        if not j.started
        and j.state in ("queued", "limiter")
        and (tenant is None or j.tenant == tenant)
    ]


async def _create(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    kind, tenant = op
    c_before = await clock(w)
    lim = w.store.keys.limit_waiting()
    lowest = await w.redis.zrangebyscore(lim, 1, "+inf", start=0, num=1, withscores=True)
    prior_unfinished = [j for j in w.jobs if j.tenant == tenant and j.state != "ended"]
    ever = any(j.tenant == tenant for j in w.jobs)
    if kind == "create":
        job, _ = await w.store.create(tenant, REQUEST)
        jid = job.id
    else:
        jid = await old_create(w, tenant)
    t = await turn_of(w, jid)
    w.log.append(f"{op} -> turn {t} (clock {c_before}, lim {lowest})")
    if t > LINES - 1:
        w.violations.append(f"inv4 turn {t} > LINES-1")
    if kind == "create":
        _check_create(w, tenant, t, c_before, realistic, not prior_unfinished, ever)
    w.jobs.append(J(jid, tenant, t, len(w.jobs), kind == "old_create"))


def _check_create(
    w: World, tenant: str, t: int, c_before: int, realistic: bool, fresh: bool, ever: bool
) -> None:
    # inv1: never below (or tied with) an earlier waiting job of the tenant
    for e in waiting(w, tenant):
        if t <= e.turn:
            relation = "lower" if t < e.turn else "tie"
            w.violations.append(
                f"inv1 {relation}: new {t} vs earlier waiting {e.turn} (old={e.old})"
            )
    # inv2: a tenant with nothing waiting goes behind at most two of each other's
    for other in TENANTS if realistic and fresh else []:
        ahead = [e for e in waiting(w, other) if e.turn < t and other != tenant]
        if len(ahead) > 2:
            w.violations.append(
                f"inv2 newcomer {tenant} (ever={ever}) turn {t} behind "
                f"{len(ahead)} of {other}'s: {sorted(e.turn for e in ahead)}"
            )
    # inv5: give-back: at most one past the tenant's latest waiting turn or the clock
    # (not for a tenant the previous release's CREATE queued for: none is given back
    # until the clock passes what it queued)
    mine = [e.turn for e in waiting(w, tenant)]
    bound = max([c_before, *mine]) + 1
    if t > bound and not any(e.old for e in w.jobs if e.tenant == tenant):
        w.violations.append(
            f"inv5 gap: turn {t} > {bound} (clock {c_before}, tenant's waiting {sorted(mine)})"
        )


def _by_turn(w: World, state: str) -> list[J]:
    return sorted((j for j in w.jobs if j.state == state), key=lambda j: (j.turn, j.id))


async def _take(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    """A worker takes the k lowest due jobs into the limiter's line."""
    for j in _by_turn(w, "queued")[: op[1]]:
        w.log[-1] += f" [{j.tenant}@{j.turn}]"
        j.state = "limiter"
        await w.redis.zadd(w.store.keys.limit_waiting(), {f"lease-{j.id}": j.turn})


async def _start_from_limiter(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    """A permit: to the lowest (fair), or any (out of turn: the line was empty)."""
    cands = _by_turn(w, "limiter")
    if cands:
        j = cands[0] if op[1] == 0 else cands[op[1] % len(cands)]
        w.log[-1] += f" [{j.tenant}@{j.turn}]"
        await w.redis.zrem(w.store.keys.limit_waiting(), f"lease-{j.id}")
        await start(w, j)


async def _start_from_queue(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    cands = _by_turn(w, "queued")
    if cands:
        j = cands[0] if realistic else cands[op[1] % len(cands)]
        w.log[-1] += f" [{j.tenant}@{j.turn}]"
        await start(w, j)


async def _finish(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    cands = [j for j in w.jobs if j.state == "running"]
    if cands:
        j = cands[op[1] % len(cands)]
        w.log[-1] += f" [{j.tenant}@{j.turn}]"
        ev = {"event": "done", "attempt": j.attempt, "data": {}}
        r = await w.store.finish(j.id, Status.COMPLETED, ev, {}, j.attempt, tenant=j.tenant)
        assert r > 0, r
        j.state = "ended"


async def _cancel(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    states = ("queued", "limiter", "running") if op[2] == "any" else ("queued", "limiter")
    cands = [j for j in w.jobs if j.state in states]
    if cands:
        j = cands[op[1] % len(cands)]
        w.log[-1] += f" [{j.tenant}@{j.turn} {j.state}]"
        got = await w.store.cancel(j.id, j.tenant)
        assert got is not None and got.status == Status.CANCELLED
        if j.state == "limiter":
            await w.redis.zrem(w.store.keys.limit_waiting(), f"lease-{j.id}")
        j.state = "ended"


async def _retry(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    """Back to queued, keeping its turn, back in its place."""
    cands = [j for j in w.jobs if j.state == "running"]
    if cands:
        j = cands[op[1] % len(cands)]
        w.log[-1] += f" [{j.tenant}@{j.turn}]"
        assert await w.store.requeue(j.id, j.attempt, "retry") == 1
        await w.redis.zadd(w.store.queue_name, {j.id: j.turn})
        j.state = "queued"


_OPS = {
    "create": _create,
    "old_create": _create,
    "take": _take,
    "start_lim": _start_from_limiter,
    "start_q": _start_from_queue,
    "finish": _finish,
    "cancel": _cancel,
    "retry": _retry,
}


async def apply(w: World, op: tuple[Any, ...], realistic: bool) -> None:
    if op[0] not in ("create", "old_create"):
        w.log.append(f"{op}")
    await _OPS[op[0]](w, op, realistic)


async def start(w: World, j: J) -> None:
    n = await w.store.start_attempt(j.id)
    assert n >= 1, n
    j.attempt, j.state, j.started = n, "running", True
    await w.redis.zrem(w.store.queue_name, j.id)


async def check_sets(w: World) -> None:
    for tenant in TENANTS:
        key = queue_fair_waiting(w.store.queue_name, tenant)
        members = [m.decode() for m in await w.redis.zrange(key, 0, -1)]
        unfinished = {
            w.store.keys.job(j.id) for j in w.jobs if j.tenant == tenant and j.state != "ended"
        }
        if len(members) > len(unfinished) + 3:
            w.violations.append(f"inv3 {tenant} set {len(members)} > {len(unfinished)}+3")
        stray = [m for m in members if m not in ("", "~", "^") and m not in unfinished]
        if stray:
            w.violations.append(f"inv3 {tenant} ended jobs in set: {len(stray)}")


def gen_ops(rng: random.Random, steps: int, old_rate: float, realistic: bool) -> list[tuple]:
    ops: list[tuple] = []
    tenants = TENANTS[: rng.randint(2, 4)]
    for _ in range(steps):
        r = rng.random()
        t = rng.choice(tenants)
        if r < 0.35:
            ops.append(("old_create", t) if rng.random() < old_rate else ("create", t))
        elif r < 0.45:
            ops.append(("take", rng.randint(1, 4)))
        elif r < 0.60:
            ops.append(("start_lim", 0 if rng.random() < 0.5 else rng.randint(1, 50)))
        elif r < 0.70:
            ops.append(("start_q", rng.randint(0, 50)))
        elif r < 0.80:
            ops.append(("finish", rng.randint(0, 50)))
        elif r < 0.92:
            ops.append(("cancel", rng.randint(0, 50), "any" if rng.random() < 0.2 else "q"))
        else:
            ops.append(("retry", rng.randint(0, 50)))
    return ops


async def run(redis: Any, ops: list[tuple], realistic: bool, stop_first: bool = True) -> World:
    counter = itertools.count(1)
    ids = pytest.MonkeyPatch()
    ids.setattr(ms, "new_job_id", lambda: f"job_{next(counter):032x}")  # replays are exact
    store, prefix = fresh_store(redis)
    w = World(store, redis, prefix, redis.register_script(OLD_LUA))
    try:
        for op in ops:
            await apply(w, op, realistic)
            await check_sets(w)
            if w.violations and stop_first:
                break
    finally:
        ids.undo()
        cleanup_prefix(_test_redis_url(), prefix)
    return w


def kinds(w: World) -> set[str]:
    return {v.split(":")[0].split(" ")[0] + " " + v.split(" ")[1] for v in w.violations}


async def shrink(redis: Any, ops: list[tuple], realistic: bool, target: str) -> list[tuple]:
    """Delete ops while a violation starting with `target` still shows."""

    async def fails(candidate: list[tuple]) -> bool:
        w = await run(redis, candidate, realistic, stop_first=False)
        return any(v.startswith(target) for v in w.violations)

    chunk = max(1, len(ops) // 2)
    while chunk >= 1:
        i = 0
        while i < len(ops):
            cand = ops[:i] + ops[i + chunk :]
            if await fails(cand):
                ops = cand
            else:
                i += chunk
        chunk //= 2
    return ops
