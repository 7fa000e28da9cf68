"""The job: stream one chat completion from the upstream into the job's events and record."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from arq import Retry
from redis.exceptions import RedisError

from moonq import errors, logs, metrics, serde
from moonq.account import Account
from moonq.assemble import Assembler
from moonq.limits import (
    Permit,
    PermitAbandoned,
    PermitImpossible,
    UpstreamLimiter,
    estimate_tokens,
)
from moonq.models import Status
from moonq.redis import transient
from moonq.scheduler import BATCH_PRIORITY_OFFSET
from moonq.settings import Settings
from moonq.store import NOT_GRANTED, InvalidUsage, JobStore, usage_counts
from worker.publisher import AttemptLost, EventPublisher, EventWriter, NotStorable
from worker.upstream import MoonshotClient

log = logging.getLogger("moonq.worker")

# Runs cut short by crashes or shutdowns are not the job's fault and do not spend its
# MOONQ_MAX_ATTEMPTS; past this many, the job is taken to be what kills its workers.
MAX_INTERRUPTIONS = 20
REDIS_RETRY_DELAY = 1.0
BROKEN_RETRY_DELAY = 60.0
# What `Runner.run` returns for a run whose job was taken over, cancelled or finished by another.
LOST = "lost"


class PermitLost(Exception):
    """The attempt's upstream permit lapsed (its worker stalled past the lease)."""


@dataclass
class Attempt:
    """One run of a job, from its permit to its last write."""

    job_id: str
    number: int
    record: dict[str, str]
    body: dict[str, Any]
    permit: Permit
    publisher: EventPublisher
    sent_at: float | None = None  # monotonic: when the upstream request went out
    first_at: float | None = None  # and when its first chunk came

    @property
    def tenant(self) -> str:
        return self.record["tenant"]

    @property
    def model(self) -> str:
        return self.record.get("model", "")

    @property
    def ttft(self) -> float | None:
        """Seconds from the upstream request to its first chunk, once both happened."""
        if self.sent_at is None or self.first_at is None:
            return None
        return self.first_at - self.sent_at

    def event(self, kind: str, data: Any) -> dict[str, Any]:
        return {"event": kind, "attempt": self.number, "data": data}


def permit_priority(record: dict[str, str]) -> float:
    """A job's place in the upstream limiter's line: an interactive job's turn, in fair order
    across tenants (one queued before turns existed first: it is older than any with one),
    batch lines (oldest first) after every interactive job."""
    if record.get("batch_id"):
        return float(record["created_at"]) + BATCH_PRIORITY_OFFSET
    return float(record.get("order") or 0)


class Runner:
    """Runs jobs for one worker process; built once in the worker's `on_startup`."""

    def __init__(
        self,
        store: JobStore,
        client: MoonshotClient,
        limiter: UpstreamLimiter,
        settings: Settings,
        account: Account | None = None,
        recorder: metrics.Recorder | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.limiter = limiter
        self.settings = settings
        self.account = account or Account.from_settings(
            store.redis, store.keys, settings, client.available_balance
        )
        limiter.gate = self.account  # no permit goes out while the account is paused
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = recorder or metrics.Recorder(store.redis, store.keys)
        self.events = EventWriter(store)  # every attempt's events, written together
        self.draining = False  # set on SIGTERM: take no new upstream permits
        # Runs of batch lines that ended: each may have freed a place under the batch's cap,
        # so the worker asks for lines again at once (MoonqWorker._feed_batches).
        self.batch_lines_ended = 0
        # Records read ahead, as arq starts a run (`prefetch`), for the run to take.
        self._records: dict[str, asyncio.Task[dict[str, str] | None]] = {}

    def prefetch(self, job_id: str) -> None:
        """Start reading the job's record now, for its run to take (`_run`)."""
        self.forget(job_id)
        self._records[job_id] = asyncio.create_task(self.store.raw(job_id))

    def forget(self, job_id: str) -> None:
        """Drop a read-ahead record nobody took (arq did not run the job)."""
        task = self._records.pop(job_id, None)
        if task is not None:  # left to finish: a cancel mid-command costs redis-py the connection
            task.add_done_callback(_retrieve)

    async def run(
        self, job_id: str, lock_token: str = "", started: Callable[[int], None] = lambda n: None
    ) -> str:
        """Run one attempt of the job; returns the status it left the job in.

        Returns only when the job is over (or gone): arq forgets a job whose run returns. A
        run that ends any other way raises `Retry`, so the job keeps its place in arq's
        queue: a transient Redis failure, a shutdown, and a run that lost its job to another
        run (the job is not over: that run, or the next, will end it).
        """
        self.metrics.in_flight += 1
        try:
            with logs.job_context(job_id):
                return await self._run_once(job_id, lock_token, started)
        finally:
            self.metrics.in_flight -= 1

    async def _run_once(self, job_id: str, lock_token: str, started: Callable[[int], None]) -> str:
        try:
            outcome = await self._run(job_id, lock_token, started)
            if outcome == LOST and not await self._is_over(job_id):
                raise Retry(defer=0)
            return outcome
        except Retry:
            raise
        except PermitAbandoned:
            log.info("job %s goes back to the queue: the worker is shutting down", job_id)
            raise Retry(defer=0) from None
        except (RedisError, OSError) as exc:
            if not transient(exc):
                # Even failing the job was refused: the record is beyond what moonq can mend.
                # It stays queued, tried again now and then (without calling the upstream
                # once it has been interrupted too often), until arq gives up on it.
                log.exception("job %s: the store refused to record its end", job_id)
                raise Retry(defer=BROKEN_RETRY_DELAY) from exc
            log.warning("job %s: Redis failed (%s); the job runs again", job_id, exc)
            raise Retry(defer=REDIS_RETRY_DELAY) from exc

    async def abandon(self, job_id: str) -> None:
        """Fail a job arq has given up on, unless it is already over."""
        error = errors.UpstreamError(
            "the job could not be run (arq gave up on it: its queue entry expired, or it was "
            "tried too often)",
            type="worker_lost",
        )
        event = {"event": "error", "attempt": 0, "data": error.info()}
        state = await self.store.state(job_id)
        if state is None or state[0].terminal:
            return
        fields = {"error": error.info()}
        if await self.store.finish(job_id, Status.FAILED, event, fields, tenant=state[1]) > 0:
            self.metrics.job_ended(Status.FAILED.value, await self._created_at(job_id), state[1])

    async def _created_at(self, job_id: str) -> float:
        created = await self.store.redis.hget(self.store.keys.job(job_id), "created_at")  # type: ignore[misc]
        return float(created) if created else time.time()

    async def _is_over(self, job_id: str) -> bool:
        state = await self.store.state(job_id)
        return state is None or state[0].terminal

    def _is_draining(self) -> bool:
        return self.draining

    async def _run(self, job_id: str, lock_token: str, started: Callable[[int], None]) -> str:
        ahead = self._records.pop(job_id, None)
        record = await (ahead if ahead is not None else self.store.raw(job_id))
        try:
            return await self._run_record(job_id, record, lock_token, started)
        finally:
            if record is not None and record.get("batch_id"):
                self.batch_lines_ended += 1

    async def _run_record(
        self,
        job_id: str,
        record: dict[str, str] | None,
        lock_token: str,
        started: Callable[[int], None],
    ) -> str:
        if record is None:
            log.warning("job %s has no record (expired?); dropping it", job_id)
            return "missing"
        if Status(record["status"]).terminal:
            return record["status"]
        logs.bind(tenant=record.get("tenant"))
        try:
            return await self._permitted(job_id, record, lock_token, started)
        except (Retry, PermitAbandoned):
            raise
        except PermitImpossible as exc:
            error: errors.UpstreamError = errors.UpstreamRejected(
                str(exc), type="request_too_large"
            )
        except Exception as exc:  # before an attempt started: see `_guarded`
            if isinstance(exc, RedisError | OSError) and transient(exc):
                raise
            log.exception("job %s could not start", job_id)
            error = _unforeseen(exc)
        event = {"event": "error", "attempt": 0, "data": error.info()}
        seen = int(record.get("attempts", "0"))  # not if another run has started since
        fields = {"error": error.info()}
        ended = await self.store.finish(
            job_id, Status.FAILED, event, fields, seen, tenant=record["tenant"]
        )
        if ended <= 0:
            return LOST
        self.metrics.job_ended(Status.FAILED.value, float(record["created_at"]), record["tenant"])
        return Status.FAILED.value

    async def _permitted(
        self,
        job_id: str,
        record: dict[str, str],
        lock_token: str,
        started: Callable[[int], None],
    ) -> str:
        """Wait for an upstream permit, then run an attempt under it."""
        body: dict[str, Any] = serde.loads(record["request"])
        batch = bool(record.get("batch_id"))
        priority = permit_priority(record)
        tokens = await self._tokens(body)
        start = functools.partial(
            self.store.start, job_id, self.worker_id, lock_token, self.settings.lock_timeout
        )
        # START goes in the same round trip as the ask for a permit (after it), and starts the
        # job only if that ask granted the permit: the job starts a round trip sooner.
        async with self.limiter.permit(
            tokens, priority, self._is_draining, batch=batch, along=lambda lease: start(lease=lease)
        ) as permit:
            early = permit.along
            if isinstance(early, BaseException):
                raise early
            if early is None or early[0] == NOT_GRANTED:
                early = await start()  # asked alone, or sent before the ask was granted
            number, past = early
            if number < 0:  # no request is sent: the permit goes back unused
                permit.used = 0
                # -3: this run lost arq's lock (a stall), another run has the job; else it
                # is over (a cancel) or gone.
                return LOST if number == -3 else "skipped"
            record.update(past, attempts=str(number))  # the record as of this start
            started(number)
            logs.bind(attempt=number)
            publisher = self.events.publisher(job_id, number)
            try:
                return await self._guarded(Attempt(job_id, number, record, body, permit, publisher))
            finally:
                publisher.close()

    async def _tokens(self, body: dict[str, Any]) -> int:
        """The request's TPM cost: its exact prompt tokens when the upstream counts them (asked
        only when TPM is limited), else moonq's own estimate; plus its completion budget."""
        prompt = await self.client.estimate_prompt_tokens(body) if self.limiter.tpm else None
        return estimate_tokens(body, prompt)

    async def _guarded(self, attempt: Attempt) -> str:
        # Hand-backs while the account was paused are neither failures nor interruptions.
        record = attempt.record
        handed_back = int(record.get("failures", "0")) + int(record.get("pauses", "0"))
        interruptions = attempt.number - 1 - handed_back
        if interruptions > MAX_INTERRUPTIONS:
            error = errors.UpstreamError(
                f"the job was interrupted {interruptions} times (worker crashes or shutdowns)",
                type="worker_lost",
            )
            return await self._fail(attempt, error)
        try:
            return await self._attempt(attempt)
        except AttemptLost:
            log.info(
                "job %s attempt %d lost the job (cancelled or superseded)",
                attempt.job_id,
                attempt.number,
            )
            return LOST
        except PermitLost:
            # This worker stalled past its permit's lease, which may be someone else's now:
            # stop, and let the job wait for a permit again. Not the job's fault.
            reason = "the upstream permit lapsed while the worker was stalled"
            if await self.store.requeue(attempt.job_id, attempt.number, reason) < 0:
                return LOST
            raise Retry(defer=0) from None
        except asyncio.CancelledError:
            # Shutdown (or an abort): hand the job back without spending its attempts.
            reason = "the worker shut down mid-attempt"
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(self.store.requeue(attempt.job_id, attempt.number, reason))
            raise
        except Retry:
            raise
        except Exception as exc:
            if isinstance(exc, RedisError | OSError) and transient(exc):
                raise
            # A bug, an answer nothing foresaw, or a write Redis refuses (it would refuse it
            # again): the job fails once rather than running again.
            log.exception("job %s attempt %d failed unexpectedly", attempt.job_id, attempt.number)
            return await self._fail(attempt, _unforeseen(exc))

    async def _attempt(self, attempt: Attempt) -> str:
        if int(attempt.record.get("seq", "0")) > 0:
            reason = attempt.record.get("last_error") or "the previous attempt did not finish"
            attempt.publisher.emit("retry", {"attempt": attempt.number, "reason": reason})
        assembler = Assembler()
        try:
            async with asyncio.timeout(self.settings.job_timeout):
                await self._while_permitted(attempt.permit, self._stream(attempt, assembler))
            await attempt.publisher.drain()
        except TimeoutError:
            error = errors.UpstreamTimeout(
                f"the job took longer than MOONQ_JOB_TIMEOUT={self.settings.job_timeout}s",
                type="job_timeout",
            )
            self._called(attempt, error)
            return await self._fail(attempt, error)
        except errors.UpstreamError as error:
            if not assembler.chunks:  # nothing generated: its token estimate is given back
                attempt.permit.used = 0
            self._called(attempt, error)
            return await self._upstream_failed(attempt, error)
        self._called(attempt, None)
        if attempt.permit.probe:  # the account's probe got through: it works again
            try:
                await self.account.resume("a probe request succeeded", probed=True)
            except (RedisError, OSError) as exc:  # the answer is paid for: it is kept
                log.warning("the account could not be resumed (%s); its next check will", exc)
        return await self._complete(attempt, assembler.result())

    @staticmethod
    async def _while_permitted(permit: Permit, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` while the permit holds; raises `PermitLost` (and stops it) if it lapses."""
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(permit.lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            raise PermitLost
        task.result()

    async def _stream(self, attempt: Attempt, assembler: Assembler) -> None:
        attempt.sent_at = time.monotonic()
        async with contextlib.aclosing(self.client.stream(attempt.body)) as chunks:
            async for chunk in chunks:
                if attempt.first_at is None:
                    attempt.first_at = time.monotonic()
                assembler.add(chunk)
                try:
                    attempt.publisher.emit("chunk", chunk)
                except NotStorable as exc:
                    raise errors.UpstreamProtocolError(
                        f"the upstream sent a chunk that cannot be stored: {exc}"
                    ) from None

    async def _complete(self, attempt: Attempt, result: dict[str, Any]) -> str:
        usage = result.get("usage")
        try:
            counts = usage_counts(usage)
        except InvalidUsage as exc:
            error = errors.UpstreamInvalidAnswer(
                f"the upstream reported a usage that is not token counts: {exc}",
                type="upstream_invalid_usage",
            )
            self.metrics.upstream_error(error.type, error.retryable)
            return await self._fail(attempt, error)
        if "total_tokens" in counts:
            attempt.permit.used = counts["total_tokens"]
        ended = await self.store.finish(
            attempt.job_id,
            Status.COMPLETED,
            attempt.event("done", result),
            {"result": result, "usage": usage},
            attempt.number,
            tenant=attempt.tenant,
        )
        if ended <= 0:
            return LOST  # fenced: another run has it
        created = float(attempt.record["created_at"])
        self.metrics.job_ended(Status.COMPLETED.value, created, attempt.tenant)
        self.metrics.completed(attempt.model, attempt.ttft, counts, attempt.tenant)
        return Status.COMPLETED.value

    async def _upstream_failed(self, attempt: Attempt, error: errors.UpstreamError) -> str:
        await attempt.publisher.drain()  # chunks before the failure stay in the log, in order
        quota = isinstance(error, errors.UpstreamQuotaExceeded)
        if quota and await self.account.refused_for_quota():  # out of balance: wait for it
            return await self._hand_back_paused(attempt)
        if error.retryable:
            reason = f"{error.type}: {error.message}"
            outcome = await self.store.requeue(
                attempt.job_id, attempt.number, reason, self.settings.max_attempts
            )
            if outcome < 0:
                return LOST
            if outcome > 0:
                delay = errors.retry_delay(
                    error,
                    attempt.number,
                    base=self.settings.retry_base_delay,
                    cap=self.settings.retry_max_delay,
                )
                log.info(
                    "job %s attempt %d: %s; retry in %.2fs",
                    attempt.job_id,
                    attempt.number,
                    reason,
                    delay,
                )
                raise Retry(defer=delay)
        return await self._fail(attempt, error)

    async def _hand_back_paused(self, attempt: Attempt) -> str:
        """The account is out of balance (and now paused): the job goes back to the queue,
        counted in its `pauses` (neither a failure nor an interruption), and waits there until
        the account is topped up."""
        reason = "the upstream account is out of balance"
        if await self.store.requeue(attempt.job_id, attempt.number, reason, paused=True) < 0:
            return LOST
        raise Retry(defer=self.settings.balance_check_min)

    async def _fail(self, attempt: Attempt, error: errors.UpstreamError) -> str:
        log.info("job %s failed on attempt %d: %s", attempt.job_id, attempt.number, error.type)
        info = error.info()
        ended = await self.store.finish(
            attempt.job_id,
            Status.FAILED,
            attempt.event("error", info),
            {"error": info},
            attempt.number,
            tenant=attempt.tenant,
        )
        if ended <= 0:
            return LOST
        created = float(attempt.record["created_at"])
        self.metrics.job_ended(Status.FAILED.value, created, attempt.tenant)
        return Status.FAILED.value

    def _called(self, attempt: Attempt, error: errors.UpstreamError | None) -> None:
        """An upstream call ended (metrics: its duration, and its error if it failed)."""
        if attempt.sent_at is not None:
            took = time.monotonic() - attempt.sent_at
            self.metrics.call_ended(attempt.model, took, None if error is None else error.type)
        if error is not None:
            self.metrics.upstream_error(error.type, error.retryable)


def _unforeseen(exc: Exception) -> errors.UpstreamError:
    """A bug, or an upstream answer nothing foresaw: the job ends rather than staying in
    progress forever. Only the exception's type is kept: its text may hold secrets."""
    return errors.UpstreamError(
        f"moonq could not process this job ({type(exc).__name__})", type="internal_error"
    )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a dropped task's outcome as seen (asyncio would log an unretrieved error)."""
    if not task.cancelled():
        task.exception()
