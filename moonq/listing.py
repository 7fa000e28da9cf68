"""Listing a tenant's jobs: newest first, a page at a time after a stable cursor, read through
the indexes that the store's scripts keep (all jobs, by status, by custom_id, by batch)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from moonq.models import Job, Status
from moonq.store import JobStore, digest

# The most index entries read at a time while looking for matches.
_LIST_BATCH = 200


class UnknownCursor(Exception):
    """`after` names no job of the tenant's (any more)."""


class JobLister:
    """The jobs of a tenant's, as `GET /v1/jobs` lists them."""

    def __init__(self, store: JobStore) -> None:
        self.store, self.redis, self.keys = store, store.redis, store.keys

    async def page(
        self,
        tenant: str,
        *,
        limit: int,
        after: str | None = None,
        status: Status | None = None,
        custom_id: str | None = None,
        batch_id: str | None = None,
    ) -> tuple[list[Job], bool]:
        """The tenant's jobs, newest first, `limit` at a time after the job id `after`.

        Pages by a stable cursor (the `after` job's creation time, then its id), so jobs created
        meanwhile never shift a page. Filters read the narrowest index: a `custom_id` or batch
        index, else the status index, else all the tenant's jobs; jobs found expired leave it.
        """
        index = self._index(tenant, status, custom_id, batch_id)
        cursor = None
        if after is not None:
            score = await self.redis.zscore(self.keys.tenant_jobs(tenant), after)
            if score is None:
                raise UnknownCursor(after)
            cursor = (score, after)
        wanted = _Filter(status, custom_id, batch_id)
        jobs: list[Job] = []
        async for job in self._walk(index, cursor, wanted, batch=limit + 1):
            jobs.append(job)
            if len(jobs) > limit:
                break
        return jobs[:limit], len(jobs) > limit

    def _index(
        self, tenant: str, status: Status | None, custom_id: str | None, batch_id: str | None
    ) -> str:
        if batch_id is not None:  # batch lines are in no custom_id index
            return self.keys.tenant_batch(tenant, batch_id)
        if custom_id is not None:
            return self.keys.tenant_custom_id(tenant, digest(custom_id))
        if status is not None:
            return self.keys.tenant_status(tenant, status.value)
        return self.keys.tenant_jobs(tenant)

    async def _walk(
        self, index: str, cursor: tuple[float, str] | None, wanted: _Filter, batch: int
    ) -> AsyncIterator[Job]:
        """The index's jobs after the cursor, newest first (ties: greater id first)."""
        top: float | str = "+inf" if cursor is None else cursor[0]
        offset = 0  # rows already read at score `top`
        while True:
            rows = await self.redis.zrevrangebyscore(
                index, top, "-inf", start=offset, num=batch, withscores=True
            )
            page = [
                m.decode()
                for m, score in rows
                if cursor is None or score < cursor[0] or m.decode() < cursor[1]
            ]
            found = await self.store.read_many(page)
            gone = [job_id for job_id, job in zip(page, found, strict=True) if job is None]
            if gone:  # expired jobs leave the index as they are met
                await self.redis.zrem(index, *gone)
            for job in found:
                if job is not None and wanted.matches(job[0]):
                    yield job[0]
            if len(rows) < batch:
                return
            batch = min(batch * 2, _LIST_BATCH)  # a sparse match: read more at a time
            last = rows[-1][1]
            if last != top:
                top, offset = last, 0
            offset += sum(1 for m, score in rows if score == last and m.decode() not in gone)


class _Filter:
    """What a listed job must also match, beyond the index it was read from."""

    def __init__(self, status: Status | None, custom_id: str | None, batch_id: str | None):
        self.status, self.custom_id, self.batch_id = status, custom_id, batch_id

    def matches(self, job: Job) -> bool:
        return (
            (self.status is None or job.status == self.status)
            and (self.custom_id is None or job.custom_id == self.custom_id)
            and (self.batch_id is None or job.batch_id == self.batch_id)
        )
