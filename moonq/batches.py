"""Batches: OpenAI's batch object over moonq's jobs. Every line of the input file becomes an
ordinary job (with `batch_id` and `custom_id`); the batch counts its lines as they end (in the
jobs' own FINISH step) and ends with its last one, so there is no `finalizing` stall."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from moonq import batch_input, batch_output
from moonq.batch_input import Limits
from moonq.batch_lua import ACTIVATE, SETTLE
from moonq.batch_models import (
    BATCH_ID,
    COUNTS,
    USAGE,
    Batch,
    BatchList,
    NotCancellable,
    listed_errors,
    new_batch_id,
    to_batch,
    window_seconds,
)
from moonq.keys import Keys
from moonq.models import Status
from moonq.serde import dumps
from moonq.store import AlreadyFinished, JobStore, new_job_id, new_record

# Lines written to Redis per round trip while a batch is created.
WRITE_CHUNK = 500
# Seconds between the creation times of a batch's consecutive lines (50,000 lines: 0.5 s).
LINE_STEP = 1e-5
# A batch whose creation has not finished after this long (its API process died) is failed.
CREATE_DEADLINE = 300
# Tokens per minute a tenant's lead decays at, at least (see ACTIVATE): the rate with TPM off.
DECAY_FLOOR = 100_000
TERMINAL_BATCH = ("completed", "failed", "cancelled", "expired")
# Seconds between two looks at a batch that is ending while some of its lines still run.
RECHECK_EVERY = 30
_CANCELLED = {"type": "batch_cancelled", "message": "the batch was cancelled"}
_EXPIRED = {
    "type": "batch_expired",
    "message": "the batch's completion window ended before this request ran",
}
_INTERRUPTED = {
    "type": "batch_create_failed",
    "message": "the batch could not be created in full (the service failed meanwhile); "
    "nothing more of it runs: submit it again",
}
_CHANGED = {
    "type": "input_file_changed",
    "message": "the input file was deleted or changed while the batch was being created",
}
# CANCEL: KEYS the batch. ARGV now (s). Marks a running (or validating) batch `cancelling`;
# returns its status before (`expiring` for one whose window already ended it), or nil when it
# does not exist. Writes only HSET: cannot fail.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'in_progress' and redis.call('HGET', KEYS[1], 'ending') then return 'expiring' end
if status == 'in_progress' or status == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'ending', 'cancelled')
  redis.call('HSET', KEYS[1], 'cancelling_at', ARGV[1])
end
return status
"""

# EXPIRE: KEYS the batch. Marks a running batch as ending `expired` when its lines are over;
# returns 1 when it did, 0 otherwise. Writes only HSET: cannot fail.
EXPIRE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'ending') then return 0 end
redis.call('HSET', KEYS[1], 'ending', 'expired')
return 1
"""


# What a batch line's record holds against its tenant's budgets (moonq/budgets.py).
LineHold = Callable[[batch_input.Line], str]


class BatchStore:
    def __init__(self, store: JobStore, *, clock: Callable[[], float] = time.time) -> None:
        self.jobs = store
        self.redis: Redis = store.redis
        self.keys: Keys = store.keys
        self.clock = clock
        self._activate = self.redis.register_script(ACTIVATE)
        self._settle = self.redis.register_script(SETTLE)
        self._cancel = self.redis.register_script(CANCEL)
        self._expire = self.redis.register_script(EXPIRE)

    async def create(
        self,
        tenant: str,
        input_file_id: str,
        lines: Callable[[], batch_input.RawLines],
        *,
        window: str,
        metadata: dict[str, str] | None,
        limits: Limits,
        admit: Callable[[batch_input.Report], Awaitable[LineHold | None]] | None = None,
    ) -> Batch:
        """Validate every line, then write each as a job and make the batch runnable.

        A file with any bad line makes a `failed` batch listing its bad lines, and nothing
        is enqueued. Raises `BadWindow`, `batch_input.TooManyLines`. A creation that fails
        part-way fails the batch and ends the lines written; one whose process dies is
        failed by the workers' sweep after CREATE_DEADLINE.
        """
        seconds = window_seconds(window)
        now = self.clock()
        batch_id = new_batch_id()
        report = await batch_input.check(lines(), limits)
        hold = None
        if admit is not None and not report.errors:
            hold = await admit(report)  # raises (a budget) before anything is written
        record = self._record(batch_id, tenant, input_file_id, window, metadata, now)
        record["expires_at"] = str(int(now) + seconds)
        record["total"] = str(report.lines)
        if report.errors:
            record |= {"status": "failed", "failed_at": str(int(now))}
            record["errors"] = dumps(listed_errors(report.errors))
            await self._write_record(batch_id, tenant, record, now, ttl=self.jobs.result_ttl)
            return await self._must_get(batch_id)
        await self._write_record(batch_id, tenant, record, now)
        try:
            written = await self._write_lines(
                batch_id, tenant, batch_input.requests(lines(), limits), now, hold
            )
        except BaseException:
            await asyncio.shield(self._fail(batch_id, tenant, _INTERRUPTED))
            raise
        if written != report.lines:  # the file changed (was deleted) between the two passes
            await self._fail(batch_id, tenant, _CHANGED)
            return await self._must_get(batch_id)
        await self._activate_batch(batch_id, tenant, int(now) + seconds, written, limits.tpm)
        await self.settle(batch_id, tenant)  # its lines may all have been cancelled meanwhile
        return await self._must_get(batch_id)

    async def _activate_batch(
        self, batch_id: str, tenant: str, expires_at: int, written: int, tpm: int
    ) -> None:
        k = self.keys
        keys = [k.batch(batch_id), k.sched_tenant(tenant), k.sched_active(), k.sched_vtime()]
        keys += [k.sched_clock(), k.batches_expiring()]
        # tokens per second: a tenth of the account's TPM per minute (DECAY_FLOOR with TPM off)
        decay = max(tpm / 10, DECAY_FLOOR) / 60
        args: list[str | int | float] = [batch_id, tenant, int(self.clock()), expires_at]
        args += [written, decay]
        if not await self._activate(keys=keys, args=args):  # cancelled while being written
            await self.end_lines(batch_id, tenant, Status.CANCELLED, _CANCELLED, "cancelled")

    async def _fail(self, batch_id: str, tenant: str, why: dict[str, str]) -> None:
        """A batch whose creation did not finish: failed, and its written lines ended."""
        errors = {"object": "list", "data": [{"code": why["type"], "message": why["message"]}]}
        fields = {"status": "failed", "failed_at": str(int(self.clock())), "errors": dumps(errors)}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(batch_id), mapping=fields)
            pipe.expire(self.keys.batch(batch_id), self.jobs.result_ttl)
            pipe.zrem(self.keys.batches_expiring(), batch_id)
            await pipe.execute()
        await self.end_lines(batch_id, tenant, Status.FAILED, why, "failed")

    async def settle(self, batch_id: str, tenant: str) -> bool:
        """End the batch if its lines are all over (FINISH does this as its last line ends;
        this covers a batch whose lines ended before it ran, or whose creation died)."""
        k = self.keys
        args: list[str | int] = [batch_id, k.batch_base(), k.tenant_status_base(), tenant]
        args += [int(self.clock()), self.jobs.result_ttl]
        return bool(await self._settle(keys=[k.batch(batch_id)], args=args))

    def _record(
        self,
        batch_id: str,
        tenant: str,
        input_file_id: str,
        window: str,
        metadata: dict[str, str] | None,
        now: float,
    ) -> dict[str, str]:
        record = {
            "id": batch_id,
            "tenant": tenant,
            "status": "validating",
            "endpoint": batch_input.ENDPOINT,
            "input_file_id": input_file_id,
            "completion_window": window,
            "created_at": str(int(now)),
            "seq": "0",
            **{name: "0" for name in (*COUNTS, *USAGE) if name != "total"},
        }
        if metadata is not None:
            record["metadata"] = dumps(metadata)
        return record

    async def _write_record(
        self, batch_id: str, tenant: str, record: dict[str, str], now: float, ttl: int = 0
    ) -> None:
        """The record, in the tenant's list, and (unless it already failed) watched by the
        workers' sweep: should its creation die, the sweep fails it after CREATE_DEADLINE."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(batch_id), mapping=record)
            if ttl:
                pipe.expire(self.keys.batch(batch_id), ttl)
            else:
                pipe.zadd(self.keys.batches_expiring(), {batch_id: int(now) + CREATE_DEADLINE})
            pipe.zadd(self.keys.tenant_batches(tenant), {batch_id: now})
            await pipe.execute()

    async def _write_lines(
        self,
        batch_id: str,
        tenant: str,
        requests: AsyncIterator[batch_input.Line],
        now: float,
        hold: LineHold | None = None,
    ) -> int:
        """Write the lines, a chunk per round trip; how many there were."""
        chunk: list[batch_input.Line] = []
        written = 0
        async for line in requests:
            chunk.append(line)
            if len(chunk) == WRITE_CHUNK:
                await self._write_chunk(batch_id, tenant, chunk, now + written * LINE_STEP, hold)
                written, chunk = written + len(chunk), []
        if chunk:
            await self._write_chunk(batch_id, tenant, chunk, now + written * LINE_STEP, hold)
        return written + len(chunk)

    async def _write_chunk(
        self,
        batch_id: str,
        tenant: str,
        lines: list[batch_input.Line],
        now: float,
        hold: LineHold | None,
    ) -> None:
        """Each line's job record and index entries (not arq's queue: the scheduler feeds it).

        Lines are created LINE_STEP apart, so that each has a creation time of its own: listed
        and given permits in the file's order, paged without ties. They are in no `custom_id`
        index (one sorted set per line would cost more than the line): they are found by
        `batch_id`, within which `custom_id` filters."""
        k = self.keys
        ids = [new_job_id() for _ in lines]
        created = {job_id: now + i * LINE_STEP for i, job_id in enumerate(ids)}
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, line in zip(ids, lines, strict=True):
                record = _line_record(job_id, tenant, batch_id, line, created[job_id])
                if hold is not None:  # given back as the line ends (FINISH)
                    record["hold"] = hold(line)
                pipe.hset(k.job(job_id), mapping=record)
            for index in (
                k.tenant_jobs(tenant),
                k.tenant_status(tenant, Status.QUEUED.value),
                k.tenant_batch(tenant, batch_id),
            ):
                pipe.zadd(index, created)
            pipe.rpush(k.batch_lines(batch_id), *ids)
            pipe.rpush(k.batch_pending(batch_id), *ids)
            await pipe.execute()
        await asyncio.sleep(0)  # a large batch must not hold the event loop for seconds

    async def _must_get(self, batch_id: str) -> Batch:
        batch = await self.get(batch_id)
        if batch is None:
            raise LookupError(batch_id)  # just written: only a Redis wipe gets here
        return batch

    async def get(self, batch_id: str, tenant: str | None = None) -> Batch | None:
        """The batch, or None when it does not exist or is another tenant's."""
        if not BATCH_ID.match(batch_id):
            return None
        raw = await self.redis.hgetall(self.keys.batch(batch_id))  # type: ignore[misc]
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if not fields or (tenant is not None and fields.get("tenant") != tenant):
            return None
        return to_batch(fields)

    async def tenant_of(self, batch_id: str) -> str | None:
        raw = await self.redis.hget(self.keys.batch(batch_id), "tenant")  # type: ignore[misc]
        return None if raw is None else raw.decode()

    async def page(self, tenant: str, *, after: str | None, limit: int) -> BatchList:
        """The tenant's batches, newest first, as OpenAI pages them (`after` a batch id).
        Batches found expired leave the tenant's index as they are met."""
        index = self.keys.tenant_batches(tenant)
        top = "+inf"
        if after is not None:
            score = await self.redis.zscore(index, after)
            if score is None:
                raise LookupError(after)
            top = f"({score}"
        data: list[Batch] = []
        more = False
        while not more:
            rows = await self.redis.zrevrangebyscore(
                index, top, "-inf", start=0, num=limit + 1, withscores=True
            )
            for raw, _score in rows:
                batch = await self.get(raw.decode(), tenant)
                if batch is None:
                    await self.redis.zrem(index, raw)
                elif len(data) == limit:
                    more = True
                    break
                else:
                    data.append(batch)
            if len(rows) < limit + 1:
                break
            top = f"({rows[-1][1]}"
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    async def cancel(self, batch_id: str, tenant: str) -> Batch | None:
        """Stop the batch: lines not started never run, running ones are cancelled; the batch
        ends `cancelled` with its last line. Raises `NotCancellable` when it already ended
        (or is ending as `expired`). Cancelling a `cancelling` batch finishes the job."""
        if await self.get(batch_id, tenant) is None:
            return None
        before = await self._cancel(keys=[self.keys.batch(batch_id)], args=[int(self.clock())])
        if before is None:
            return None
        if before.decode() not in ("in_progress", "validating", "cancelling"):
            raise NotCancellable(batch_id)
        await self.end_lines(batch_id, tenant, Status.CANCELLED, _CANCELLED, "cancelled")
        await self.settle(batch_id, tenant)
        return await self.get(batch_id, tenant)

    async def sweep_due(self, limit: int = 10) -> int:
        """Look after the batches whose time has come (workers call this now and then): end
        what a completion window left, fail a batch whose creation died, finish a cancel that
        was cut short. Each step can run again after a crash; a batch stays watched until it
        has ended. How many batches it looked at."""
        due = await self.redis.zrangebyscore(
            self.keys.batches_expiring(), "-inf", int(self.clock()), start=0, num=limit
        )
        for raw in due:
            await self._sweep(raw.decode())
        return len(due)

    async def _sweep(self, batch_id: str) -> None:
        fields = await self.redis.hmget(  # type: ignore[misc]
            self.keys.batch(batch_id), ["status", "tenant", "expires_at"]
        )
        status, tenant, expires = (v.decode() if v is not None else "" for v in fields)
        if status in ("", *TERMINAL_BATCH):
            await self.redis.zrem(self.keys.batches_expiring(), batch_id)
        elif status == "validating":  # its creation did not finish within CREATE_DEADLINE
            await self._fail(batch_id, tenant, _INTERRUPTED)
        elif status == "in_progress" and self.clock() < int(expires):
            await self._watch(batch_id, int(expires))
        else:
            if status == "in_progress":
                await self._expire(keys=[self.keys.batch(batch_id)])
                error, outcome, ending = _EXPIRED, "expired", Status.FAILED
            else:  # cancelling
                error, outcome, ending = _CANCELLED, "cancelled", Status.CANCELLED
            keep = outcome == "expired"
            await self.end_lines(batch_id, tenant, ending, error, outcome, keep_running=keep)
            if not await self.settle(batch_id, tenant):  # lines still running: look again
                await self._watch(batch_id, int(self.clock()) + RECHECK_EVERY)

    async def _watch(self, batch_id: str, when: int) -> None:
        """Look at the batch again at `when`, unless it has ended (and left the set)."""
        await self.redis.zadd(self.keys.batches_expiring(), {batch_id: when}, xx=True)

    async def end_lines(
        self,
        batch_id: str,
        tenant: str,
        status: Status,
        error: dict[str, Any],
        outcome: str,
        keep_running: bool = False,
    ) -> None:
        """End every line that is not over: queued ones in bulk (FINISH each) and taken out
        of arq if a worker was handed them, running ones through the job's own cancel (a
        worker holding one is told at once); with `keep_running`, lines handed to a worker
        are left to run."""
        start, lines = 0, self.keys.batch_lines(batch_id)
        while True:
            read, handed, running = await self.jobs.end_lines(
                lines, tenant, start, WRITE_CHUNK, (status, error, outcome), keep_running
            )
            for job_id in handed:
                await self.jobs.withdraw(job_id)
            if running:
                await asyncio.gather(*(self._cancel_running(i, tenant) for i in running))
            if read < WRITE_CHUNK:
                return
            start += read

    async def _cancel_running(self, job_id: str, tenant: str) -> None:
        with contextlib.suppress(AlreadyFinished):
            await self.jobs.cancel(job_id, tenant)

    def results(self, batch_id: str, kind: str) -> AsyncIterator[bytes]:
        """The output (`output`) or error (`errors`) file, as far as the batch has got."""
        return batch_output.results(self.redis, self.keys, batch_id, kind)


def _line_record(
    job_id: str, tenant: str, batch_id: str, line: batch_input.Line, now: float
) -> dict[str, str]:
    record = new_record(job_id, tenant, line.model, line.body, now)
    record |= {"custom_id": line.custom_id, "batch_id": batch_id}
    return record | {"estimate": str(line.estimate), "line": str(line.number)}
