"""Batches: OpenAI's batch object over moonq's jobs. Every line of the input file becomes an
ordinary job (with `batch_id` and `custom_id`); the batch counts its lines as they end (in the
jobs' own FINISH step) and ends with its last one, so there is no `finalizing` stall."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from moonq import batch_input, batch_output
from moonq.batch_input import Limits, LineError
from moonq.batch_lua import ACTIVATE
from moonq.keys import Keys
from moonq.models import Status
from moonq.serde import dumps
from moonq.store import AlreadyFinished, JobStore, digest, new_job_id

# Lines written to Redis per round trip while a batch is created.
WRITE_CHUNK = 500
MAX_WINDOW = 7 * 24 * 3600
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_COUNTS = ("total", "completed", "failed", "cancelled", "expired", "done")
_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
_TIMES = ("created_at", "in_progress_at", "expires_at", "completed_at", "failed_at")
_TIMES_TOO = ("cancelling_at", "cancelled_at", "expired_at", "finalizing_at")
BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}$")

# CANCEL: KEYS the batch. ARGV now (s). Marks a running (or validating) batch `cancelling`;
# returns its status before, or nil when it does not exist. Writes only HSET: cannot fail.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
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


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int
    cancelled: int = 0
    expired: int = 0


class Batch(BaseModel):
    """OpenAI's batch object, with moonq's `usage` (token totals of its completed lines)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: dict[str, int]


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BadWindow(ValueError):
    """A completion window that is not a duration up to 7 days."""


class NotCancellable(Exception):
    """The batch already ended."""


def window_seconds(window: str) -> int:
    """`24h`, `90m`, `7d`, `3600s`: a duration of at most 7 days."""
    match = _WINDOW.match(window)
    if not match:
        raise BadWindow("completion_window must be a duration like '24h', '90m' or '7d'")
    seconds = int(match[1]) * _UNIT[match[2]]
    if seconds > MAX_WINDOW:
        raise BadWindow("completion_window can be at most 7 days ('7d')")
    return seconds


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output (`output`) or error (`errors`) file."""
    return f"file-{batch_id}-{kind}"


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class BatchStore:
    def __init__(self, store: JobStore, *, clock: Callable[[], float] = time.time) -> None:
        self.jobs = store
        self.redis: Redis = store.redis
        self.keys: Keys = store.keys
        self.clock = clock
        self._activate = self.redis.register_script(ACTIVATE)
        self._cancel = self.redis.register_script(CANCEL)
        self._expire = self.redis.register_script(EXPIRE)

    async def create(
        self,
        tenant: str,
        input_file_id: str,
        lines: Callable[[], AsyncIterator[tuple[int, bytes]]],
        *,
        window: str,
        metadata: dict[str, str] | None,
        limits: Limits,
    ) -> Batch:
        """Validate every line, then write each as a job and make the batch runnable.

        A file with any bad line makes a `failed` batch listing every bad line, and nothing
        is enqueued. Raises `BadWindow`, `batch_input.TooManyLines`.
        """
        seconds = window_seconds(window)
        now = self.clock()
        batch_id = new_batch_id()
        report = await batch_input.check(lines(), limits)
        record = self._record(batch_id, tenant, input_file_id, window, metadata, now)
        record["expires_at"] = str(int(now) + seconds)
        record["total"] = str(report.lines)
        if report.errors:
            record |= {"status": "failed", "failed_at": str(int(now))}
            record["errors"] = dumps(_errors(report.errors))
            await self._write_record(batch_id, tenant, record, now, ttl=self.jobs.result_ttl)
            return await self._must_get(batch_id)
        await self._write_record(batch_id, tenant, record, now)
        await self._write_lines(batch_id, tenant, batch_input.requests(lines(), limits), now)
        k = self.keys
        activated = await self._activate(
            keys=[
                k.batch(batch_id),
                k.sched_tenant(tenant),
                k.sched_active(),
                k.sched_vtime(),
                k.sched_clock(),
                k.batches_expiring(),
            ],
            args=[batch_id, tenant, int(self.clock()), int(now) + seconds],
        )
        if not activated:  # cancelled while its lines were being written
            error = {"type": "batch_cancelled", "message": "the batch was cancelled"}
            await self.end_lines(batch_id, tenant, Status.CANCELLED, error, "cancelled")
        return await self._must_get(batch_id)

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
            **{name: "0" for name in (*_COUNTS, *_USAGE) if name != "total"},
        }
        if metadata is not None:
            record["metadata"] = dumps(metadata)
        return record

    async def _write_record(
        self, batch_id: str, tenant: str, record: dict[str, str], now: float, ttl: int = 0
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(batch_id), mapping=record)
            if ttl:
                pipe.expire(self.keys.batch(batch_id), ttl)
            pipe.zadd(self.keys.tenant_batches(tenant), {batch_id: now})
            await pipe.execute()

    async def _write_lines(
        self, batch_id: str, tenant: str, requests: AsyncIterator[batch_input.Line], now: float
    ) -> None:
        chunk: list[batch_input.Line] = []
        async for line in requests:
            chunk.append(line)
            if len(chunk) == WRITE_CHUNK:
                await self._write_chunk(batch_id, tenant, chunk, now)
                chunk = []
        if chunk:
            await self._write_chunk(batch_id, tenant, chunk, now)

    async def _write_chunk(
        self, batch_id: str, tenant: str, lines: list[batch_input.Line], now: float
    ) -> None:
        """Each line's job record and index entries (not arq's queue: the scheduler feeds it)."""
        k = self.keys
        ids = [new_job_id() for _ in lines]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, line in zip(ids, lines, strict=True):
                pipe.hset(k.job(job_id), mapping=_line_record(job_id, tenant, batch_id, line, now))
                pipe.zadd(k.tenant_custom_id(tenant, digest(line.custom_id)), {job_id: now})
            for index in (
                k.tenant_jobs(tenant),
                k.tenant_status(tenant, Status.QUEUED.value),
                k.tenant_batch(tenant, batch_id),
            ):
                pipe.zadd(index, dict.fromkeys(ids, now))
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
        return _to_batch(fields)

    async def tenant_of(self, batch_id: str) -> str | None:
        raw = await self.redis.hget(self.keys.batch(batch_id), "tenant")  # type: ignore[misc]
        return None if raw is None else raw.decode()

    async def page(self, tenant: str, *, after: str | None, limit: int) -> BatchList:
        """The tenant's batches, newest first, as OpenAI pages them (`after` a batch id)."""
        index = self.keys.tenant_batches(tenant)
        top = "+inf"
        if after is not None:
            score = await self.redis.zscore(index, after)
            if score is None:
                raise LookupError(after)
            top = f"({score}"
        rows = await self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1)
        ids = [row.decode() for row in rows]
        found = [await self.get(batch_id, tenant) for batch_id in ids[:limit]]
        data = [batch for batch in found if batch is not None]
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=len(ids) > limit,
        )

    async def cancel(self, batch_id: str, tenant: str) -> Batch | None:
        """Stop the batch: lines not started never run, running ones are cancelled; the batch
        ends `cancelled` with its last line. Raises `NotCancellable` when it already ended."""
        if await self.get(batch_id, tenant) is None:
            return None
        before = await self._cancel(keys=[self.keys.batch(batch_id)], args=[int(self.clock())])
        if before is None:
            return None
        if before.decode() not in ("in_progress", "validating", "cancelling"):
            raise NotCancellable(batch_id)
        error = {"type": "batch_cancelled", "message": "the batch was cancelled"}
        await self.end_lines(batch_id, tenant, Status.CANCELLED, error, "cancelled")
        return await self.get(batch_id, tenant)

    async def expire(self, batch_id: str) -> None:
        """The completion window ended: lines not handed to a worker yet fail as `expired`;
        lines already running finish, and are kept."""
        tenant = await self.tenant_of(batch_id)
        if tenant is None or not await self._expire(keys=[self.keys.batch(batch_id)]):
            await self.redis.zrem(self.keys.batches_expiring(), batch_id)
            return
        error = {
            "type": "batch_expired",
            "message": "the batch's completion window ended before this request ran",
        }
        await self.end_lines(batch_id, tenant, Status.FAILED, error, "expired", keep_running=True)

    async def expire_due(self, limit: int = 10) -> int:
        """Expire the batches whose window has ended; how many there were."""
        due = await self.redis.zrangebyscore(
            self.keys.batches_expiring(), "-inf", int(self.clock()), start=0, num=limit
        )
        for raw in due:
            await self.expire(raw.decode())
        return len(due)

    async def end_lines(
        self,
        batch_id: str,
        tenant: str,
        status: Status,
        error: dict[str, Any],
        outcome: str,
        keep_running: bool = False,
    ) -> None:
        """End every line that is not over: queued ones in bulk (FINISH each), running ones
        through the job's own cancel (a worker holding one is told at once)."""
        start = 0
        while True:
            ids = await self._line_ids(batch_id, start)
            if not ids:
                return
            start += len(ids)
            queued, running = await self._open_lines(ids, keep_running)
            if queued:
                await self.jobs.finish_many([(i, tenant) for i in queued], status, error, outcome)
            if running and not keep_running:
                await asyncio.gather(*(self._cancel_running(i, tenant) for i in running))

    async def _line_ids(self, batch_id: str, start: int) -> list[str]:
        return await batch_output.line_ids(self.redis, self.keys, batch_id, start)

    async def _open_lines(self, ids: list[str], keep_running: bool) -> tuple[list[str], list[str]]:
        """The lines not started (not handed to a worker, when `keep_running`), and the others
        not over."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.keys.job(job_id), "status")
                pipe.zscore(self.keys.sched_inflight(), job_id)
            rows = await pipe.execute()
        queued, running = [], []
        for job_id, status, inflight in zip(ids, rows[::2], rows[1::2], strict=True):
            state = None if status is None else status.decode()
            if state == "queued" and not (keep_running and inflight is not None):
                queued.append(job_id)
            elif state in ("queued", "in_progress"):
                running.append(job_id)
        return queued, running

    async def _cancel_running(self, job_id: str, tenant: str) -> None:
        with contextlib.suppress(AlreadyFinished):
            await self.jobs.cancel(job_id, tenant)

    def results(self, batch_id: str, kind: str) -> AsyncIterator[bytes]:
        """The output (`output`) or error (`errors`) file, as far as the batch has got."""
        return batch_output.results(self.redis, self.keys, batch_id, kind)


def _line_record(
    job_id: str, tenant: str, batch_id: str, line: batch_input.Line, now: float
) -> dict[str, str]:
    return {
        "id": job_id,
        "tenant": tenant,
        "status": Status.QUEUED.value,
        "created_at": repr(now),
        "attempts": "0",
        "seq": "0",
        "model": line.model,
        "request": dumps(line.body),
        "custom_id": line.custom_id,
        "batch_id": batch_id,
        "estimate": str(line.estimate),
        "line": str(line.number),
    }


def _errors(errors: list[LineError]) -> dict[str, Any]:
    return {"object": "list", "data": [error.as_json() for error in errors]}


def _to_batch(fields: dict[str, str]) -> Batch:
    counts = {name: int(fields.get(name, "0")) for name in _COUNTS if name != "done"}
    data: dict[str, Any] = {
        name: fields[name]
        for name in ("id", "endpoint", "input_file_id", "completion_window", "status")
    }
    for name in (*_TIMES, *_TIMES_TOO):
        if fields.get(name):
            data[name] = int(float(fields[name]))
    for name in ("metadata", "errors"):
        if name in fields:
            data[name] = json.loads(fields[name])
    if data["status"] != "failed":
        data["output_file_id"] = output_file_id(fields["id"], "output")
        data["error_file_id"] = output_file_id(fields["id"], "errors")
    data["request_counts"] = counts
    data["usage"] = {name: int(fields.get(name, "0")) for name in _USAGE}
    return Batch.model_validate(data)
