"""The job record in Redis: create (and enqueue) atomically, read, and move between states."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from moonq import scripts
from moonq.keys import Keys
from moonq.models import ErrorInfo, Job, JobCreate, Status
from moonq.serde import arq_serialize, dumps

JOB_FUNCTION = "run_completion"
_JSON_FIELDS = ("metadata", "result", "usage", "error")
_FLOAT_FIELDS = ("created_at", "started_at", "completed_at")


def new_job_id() -> str:
    """128 random bits: a job id is the only thing guarding another client's results."""
    return "job_" + secrets.token_hex(16)


class JobStore:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        queue_name: str,
        result_ttl: int,
        max_events: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_name = queue_name
        self.result_ttl = result_ttl
        self.max_events = max_events
        self.clock = clock
        self._start = redis.register_script(scripts.START)
        self._append = redis.register_script(scripts.APPEND)
        self._finish = redis.register_script(scripts.FINISH)
        self._requeue = redis.register_script(scripts.REQUEUE)

    async def create(self, tenant: str, request: JobCreate) -> Job:
        """Write the record and the arq queue entry in one MULTI, so a failure leaves neither.

        This is what `ArqRedis.enqueue_job` does, minus its uniqueness WATCH (ids are random),
        plus our record in the same transaction.
        """
        job_id, now = new_job_id(), self.clock()
        fields: dict[str, str] = {
            "id": job_id,
            "tenant": tenant,
            "status": Status.QUEUED.value,
            "created_at": repr(now),
            "attempts": "0",
            "seq": "0",
            "model": request.body.model,
            "request": dumps(request.body.upstream_body()),
        }
        if request.custom_id is not None:
            fields["custom_id"] = request.custom_id
        if request.metadata is not None:
            fields["metadata"] = dumps(request.metadata)
        now_ms = int(now * 1000)
        arq_job = serialize_job(JOB_FUNCTION, (job_id,), {}, None, now_ms, serializer=arq_serialize)
        key = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.result_ttl)
            pipe.zadd(self.keys.tenant_jobs(tenant), {job_id: now})
            pipe.psetex(job_key_prefix + job_id, self.result_ttl * 1000, arq_job)
            pipe.zadd(self.queue_name, {job_id: now_ms})
            await pipe.execute()
        return self._to_job(fields)

    async def raw(self, job_id: str) -> dict[str, str] | None:
        data = await self.redis.hgetall(self.keys.job(job_id))  # type: ignore[misc]
        if not data:
            return None
        return {k.decode(): v.decode() for k, v in data.items()}

    async def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        fields = await self.raw(job_id)
        if fields is None or (tenant is not None and fields.get("tenant") != tenant):
            return None
        return self._to_job(fields)

    async def list_jobs(
        self, tenant: str, *, limit: int, after: str | None = None, status: Status | None = None
    ) -> tuple[list[Job], bool]:
        """The tenant's jobs, newest first, `limit` at a time after the job id `after`."""
        index = self.keys.tenant_jobs(tenant)
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            start = 0 if rank is None else rank + 1
        jobs: list[Job] = []
        while len(jobs) <= limit:
            ids = await self.redis.zrevrange(index, start, start + limit * 2)
            if not ids:
                break
            start += len(ids)
            for job in await self._many([i.decode() for i in ids]):
                if job is not None and (status is None or job.status == status):
                    jobs.append(job)
        return jobs[:limit], len(jobs) > limit

    async def _many(self, job_ids: list[str]) -> list[Job | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
            rows = await pipe.execute()
        return [
            self._to_job({k.decode(): v.decode() for k, v in row.items()}) if row else None
            for row in rows
        ]

    async def start_attempt(self, job_id: str) -> int:
        """Mark the job in progress; the new attempt number, or -1 / -2 if it must not run."""
        result = await self._start(keys=[self.keys.job(job_id)], args=[repr(self.clock())])
        return int(result)

    async def append(self, job_id: str, attempt: int, events: list[dict[str, Any]]) -> int:
        """Append and publish events for a live attempt; -1 means the attempt lost the job."""
        bodies = [dumps(event) for event in events]
        result = await self._append(
            keys=self._event_keys(job_id),
            args=[str(attempt), self.max_events, self.result_ttl, *bodies],
        )
        return int(result)

    async def requeue(self, job_id: str, attempt: int, reason: str) -> bool:
        """Hand a live attempt's job back to the queue for a retry; False if it lost the job."""
        result = await self._requeue(keys=[self.keys.job(job_id)], args=[str(attempt), reason])
        return bool(result)

    async def finish(
        self,
        job_id: str,
        status: Status,
        event: dict[str, Any],
        fields: Mapping[str, Any],
        attempt: int | None = None,
    ) -> int:
        """Move a live job to a terminal status with its terminal event, atomically."""
        pairs: list[str] = ["completed_at", repr(self.clock())]
        for name, value in fields.items():
            pairs += [name, value if isinstance(value, str) else dumps(value)]
        args = ["" if attempt is None else str(attempt), status.value, self.result_ttl]
        args += [self.max_events, dumps(event), *pairs]
        return int(await self._finish(keys=self._event_keys(job_id), args=args))

    def _event_keys(self, job_id: str) -> list[str]:
        k = self.keys
        return [k.job(job_id), k.log(job_id), k.channel(job_id)]

    def _to_job(self, fields: Mapping[str, str]) -> Job:
        data: dict[str, Any] = {
            name: fields[name] for name in ("id", "status", "model", "custom_id") if name in fields
        }
        for name in _FLOAT_FIELDS:
            if name in fields:
                data[name] = float(fields[name])
        for name in _JSON_FIELDS:
            if name in fields:
                data[name] = json.loads(fields[name])
        data["attempts"] = int(fields.get("attempts", 0))
        data["batch_id"] = fields.get("batch_id")
        data["channel"] = self.keys.channel(fields["id"])
        return Job.model_validate(data)


def error_info(type_: str, message: str, status_code: int | None = None) -> dict[str, Any]:
    return ErrorInfo(type=type_, message=message, status_code=status_code).model_dump(
        exclude_none=True
    )
