"""The job: stream one chat completion from the upstream into the job's events and record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from arq import Retry

from moonq import errors
from moonq.assemble import Assembler
from moonq.models import Status
from moonq.settings import Settings
from moonq.store import JobStore
from worker.publisher import AttemptLost, EventPublisher
from worker.upstream import MoonshotClient

log = logging.getLogger("moonq.worker")


class Runner:
    """Runs jobs for one worker process; built once in the worker's `on_startup`."""

    def __init__(self, store: JobStore, client: MoonshotClient, settings: Settings) -> None:
        self.store = store
        self.client = client
        self.settings = settings

    async def run(self, job_id: str) -> str:
        """Run one attempt of the job; returns the status it left the job in."""
        record = await self.store.raw(job_id)
        if record is None:
            log.warning("job %s has no record (expired?); dropping it", job_id)
            return "missing"
        if Status(record["status"]).terminal:
            return record["status"]
        attempt = await self.store.start_attempt(job_id)
        if attempt < 0:
            return "skipped"
        publisher = EventPublisher(self.store, job_id, attempt)
        try:
            return await self._attempt(job_id, attempt, record, publisher)
        except AttemptLost:
            log.info("job %s attempt %d lost the job (cancelled or superseded)", job_id, attempt)
            return "lost"
        finally:
            publisher.close()

    async def _attempt(
        self, job_id: str, attempt: int, record: dict[str, str], publisher: EventPublisher
    ) -> str:
        if int(record.get("seq", "0")) > 0:
            reason = record.get("last_error") or "the previous attempt did not finish"
            publisher.emit("retry", {"attempt": attempt, "reason": reason})
        body: dict[str, Any] = json.loads(record["request"])
        assembler = Assembler()
        try:
            async with asyncio.timeout(self.settings.job_timeout):
                await self._stream(body, assembler, publisher)
            await publisher.drain()
        except TimeoutError:
            error = errors.UpstreamTimeout(
                f"the job took longer than MOONQ_JOB_TIMEOUT={self.settings.job_timeout}s",
                type="job_timeout",
            )
            return await self._fail(job_id, attempt, error)
        except errors.UpstreamError as error:
            return await self._upstream_failed(job_id, attempt, error, publisher)
        result = assembler.result()
        fields = {"result": result, "usage": result.get("usage")}
        await self.store.finish(
            job_id, Status.COMPLETED, _event("done", attempt, result), fields, attempt
        )
        return Status.COMPLETED.value

    async def _stream(
        self, body: dict[str, Any], assembler: Assembler, publisher: EventPublisher
    ) -> None:
        async with contextlib.aclosing(self.client.stream(body)) as chunks:
            async for chunk in chunks:
                assembler.add(chunk)
                publisher.emit("chunk", chunk)

    async def _upstream_failed(
        self, job_id: str, attempt: int, error: errors.UpstreamError, publisher: EventPublisher
    ) -> str:
        await publisher.drain()  # chunks before the failure stay in the log, in order
        if error.retryable and attempt < self.settings.max_attempts:
            delay = errors.retry_delay(
                error,
                attempt,
                base=self.settings.retry_base_delay,
                cap=self.settings.retry_max_delay,
            )
            if await self.store.requeue(job_id, attempt, f"{error.type}: {error.message}"):
                log.info("job %s attempt %d: %s; retrying in %.1fs", job_id, attempt, error, delay)
                raise Retry(defer=delay)
            return "lost"
        return await self._fail(job_id, attempt, error)

    async def _fail(self, job_id: str, attempt: int, error: errors.UpstreamError) -> str:
        log.info("job %s failed on attempt %d: %s %s", job_id, attempt, error.type, error)
        info = error.info()
        await self.store.finish(
            job_id, Status.FAILED, _event("error", attempt, info), {"error": info}, attempt
        )
        return Status.FAILED.value


def _event(kind: str, attempt: int, data: Any) -> dict[str, Any]:
    return {"event": kind, "attempt": attempt, "data": data}
