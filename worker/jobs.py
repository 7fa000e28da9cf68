"""The job: stream one chat completion from the upstream into the job's events and record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from typing import Any

from arq import Retry
from redis.exceptions import RedisError

from moonq import errors
from moonq.assemble import Assembler
from moonq.limits import Permit, UpstreamLimiter, estimate_tokens
from moonq.models import Status
from moonq.settings import Settings
from moonq.store import JobStore
from worker.publisher import AttemptLost, EventPublisher
from worker.upstream import MoonshotClient

log = logging.getLogger("moonq.worker")

# Runs cut short by crashes or shutdowns are not the job's fault and do not spend its
# MOONQ_MAX_ATTEMPTS; past this many, the job is taken to be what kills its workers.
MAX_INTERRUPTIONS = 20
REDIS_RETRY_DELAY = 1.0


class Runner:
    """Runs jobs for one worker process; built once in the worker's `on_startup`."""

    def __init__(
        self,
        store: JobStore,
        client: MoonshotClient,
        limiter: UpstreamLimiter,
        settings: Settings,
    ) -> None:
        self.store = store
        self.client = client
        self.limiter = limiter
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    async def run(self, job_id: str) -> str:
        """Run one attempt of the job; returns the status it left the job in.

        A Redis failure hands the job back to arq for a later run rather than losing it.
        """
        try:
            return await self._run(job_id)
        except (RedisError, OSError) as exc:
            log.warning("job %s: Redis failed (%s); the job runs again", job_id, exc)
            raise Retry(defer=REDIS_RETRY_DELAY) from exc

    async def _run(self, job_id: str) -> str:
        record = await self.store.raw(job_id)
        if record is None:
            log.warning("job %s has no record (expired?); dropping it", job_id)
            return "missing"
        if Status(record["status"]).terminal:
            return record["status"]
        body: dict[str, Any] = json.loads(record["request"])
        priority = float(record["created_at"])
        async with self.limiter.permit(estimate_tokens(body), priority) as permit:
            attempt = await self.store.start_attempt(job_id, self.worker_id)
            if attempt < 0:
                return "skipped"
            return await self._guarded(job_id, attempt, record, body, permit)

    async def _guarded(
        self,
        job_id: str,
        attempt: int,
        record: dict[str, str],
        body: dict[str, Any],
        permit: Permit,
    ) -> str:
        tenant = record["tenant"]
        interruptions = attempt - 1 - int(record.get("failures", "0"))
        if interruptions > MAX_INTERRUPTIONS:
            error = errors.UpstreamError(
                f"the job was interrupted {interruptions} times (worker crashes or shutdowns)",
                type="worker_lost",
            )
            return await self._fail(job_id, attempt, tenant, error)
        publisher = EventPublisher(self.store, job_id, attempt)
        try:
            return await self._attempt(job_id, attempt, record, body, publisher, permit)
        except AttemptLost:
            log.info("job %s attempt %d lost the job (cancelled or superseded)", job_id, attempt)
            return "lost"
        except asyncio.CancelledError:
            # Shutdown (or an abort): hand the job back without spending its attempts.
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(
                    self.store.requeue(job_id, attempt, "the worker shut down mid-attempt")
                )
            raise
        finally:
            publisher.close()

    async def _attempt(
        self,
        job_id: str,
        attempt: int,
        record: dict[str, str],
        body: dict[str, Any],
        publisher: EventPublisher,
        permit: Permit,
    ) -> str:
        if int(record.get("seq", "0")) > 0:
            reason = record.get("last_error") or "the previous attempt did not finish"
            publisher.emit("retry", {"attempt": attempt, "reason": reason})
        assembler = Assembler()
        tenant = record["tenant"]
        try:
            async with asyncio.timeout(self.settings.job_timeout):
                await self._stream(body, assembler, publisher)
            await publisher.drain()
        except TimeoutError:
            error = errors.UpstreamTimeout(
                f"the job took longer than MOONQ_JOB_TIMEOUT={self.settings.job_timeout}s",
                type="job_timeout",
            )
            return await self._fail(job_id, attempt, tenant, error)
        except errors.UpstreamError as error:
            return await self._upstream_failed(job_id, attempt, tenant, error, publisher)
        result = assembler.result()
        usage = result.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            permit.used = usage["total_tokens"]
        fields = {"result": result, "usage": usage}
        event = _event("done", attempt, result)
        await self.store.finish(job_id, Status.COMPLETED, event, fields, attempt, tenant=tenant)
        return Status.COMPLETED.value

    async def _stream(
        self, body: dict[str, Any], assembler: Assembler, publisher: EventPublisher
    ) -> None:
        async with contextlib.aclosing(self.client.stream(body)) as chunks:
            async for chunk in chunks:
                assembler.add(chunk)
                publisher.emit("chunk", chunk)

    async def _upstream_failed(
        self,
        job_id: str,
        attempt: int,
        tenant: str,
        error: errors.UpstreamError,
        publisher: EventPublisher,
    ) -> str:
        await publisher.drain()  # chunks before the failure stay in the log, in order
        if error.retryable:
            reason = f"{error.type}: {error.message}"
            outcome = await self.store.requeue(job_id, attempt, reason, self.settings.max_attempts)
            if outcome < 0:
                return "lost"
            if outcome > 0:
                delay = errors.retry_delay(
                    error,
                    attempt,
                    base=self.settings.retry_base_delay,
                    cap=self.settings.retry_max_delay,
                )
                log.info("job %s attempt %d: %s; retry in %.2fs", job_id, attempt, reason, delay)
                raise Retry(defer=delay)
        return await self._fail(job_id, attempt, tenant, error)

    async def _fail(
        self, job_id: str, attempt: int, tenant: str, error: errors.UpstreamError
    ) -> str:
        log.info("job %s failed on attempt %d: %s", job_id, attempt, error.type)
        info = error.info()
        event = _event("error", attempt, info)
        await self.store.finish(
            job_id, Status.FAILED, event, {"error": info}, attempt, tenant=tenant
        )
        return Status.FAILED.value


def _event(kind: str, attempt: int, data: Any) -> dict[str, Any]:
    return {"event": kind, "attempt": attempt, "data": data}
