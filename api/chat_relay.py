"""A job's events, answered as OpenAI answers a chat completion: a `chat.completion`, or SSE
`data: <chunk>` lines ending with `data: [DONE]`, with its errors in OpenAI's shape (the shapes
themselves: api/chat_shapes.py).

Usage is counted once: Moonshot puts it in `choices[0].usage` of its last chunk, OpenAI-style
upstreams in a final top-level chunk. Both are stripped from the relayed chunks, and a client
that asked `stream_options.include_usage` gets one usage chunk (`choices: []`) at the end, as
OpenAI sends it. A failure before the first chunk is an HTTP error with the status the OpenAI
SDK maps to its exception classes; once chunks have gone out it is an SSE `{"error": ...}`
(the SDK raises `APIError`), and so is a retry of the job after chunks went out: what was sent
cannot be taken back, so the stream says the job restarted and where to fetch its result.
A log trimmed of part of the answer (`MOONQ_MAX_EVENTS` keeps the latest events) shows as a gap
in the events' `seq`: the answer then comes from the job's record, or says where to fetch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from api.chat_shapes import (
    CANCELLED,
    completion,
    error_answer,
    job_error,
    openai_chunk,
    restarted,
    result_chunks,
    trimmed,
    usage_chunk,
)
from api.errors import APIError, error_response
from api.services import Services
from api.sse import EventStream
from moonq.models import Job, Status
from moonq.stream import RawEvent, follow

log = logging.getLogger("moonq.api")

# A stream's headers wait this long for its first chunk (so that an early failure is an HTTP
# error); past it, the stream starts and keeps the connection alive with SSE comments while the
# job waits, so no client times out and retries into a duplicate job.
HEADERS_PATIENCE = 30.0
PING_EVERY = 15.0
_BUFFER = 256  # events read ahead of a slow client
_EXPIRED = {"type": "job_expired", "message": "The job's record expired before it ended."}
_GONE: dict[str, Any] = {"event": "error", "attempt": 0, "data": _EXPIRED}
_tasks: set[asyncio.Task[None]] = set()


def dumps(value: Any) -> str:
    """Strict JSON for the client: a `NaN` or `Infinity` (which no JSON parser need accept)
    raises rather than goes out."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# Reading the job's events


class Feed:
    """The job's events (parsed), read ahead by a task of its own into a bounded queue, so that
    a wait for the next one can time out without ending the reading."""

    def __init__(self, svc: Services, job_id: str) -> None:
        self._queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue(_BUFFER)
        self._task = asyncio.create_task(self._pump(svc, job_id))
        _tasks.add(self._task)
        self._task.add_done_callback(_tasks.discard)

    async def _pump(self, svc: Services, job_id: str) -> None:
        try:
            async for event in follow(svc.redis, svc.hub, svc.keys, job_id):
                await self._queue.put(json.loads(event.raw))
        except Exception as exc:  # whatever it is, the reader hears of it rather than waits
            await self._queue.put(exc)
            return
        await self._queue.put(None)

    async def next(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event; a synthetic `error` if the job vanished (expired) before its end.
        Raises TimeoutError after `timeout` seconds, the reading going on."""
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return _GONE if item is None else item

    def close(self) -> None:
        """Stop reading (the job itself runs on)."""
        self._task.cancel()


Ended = Callable[[], Awaitable[Job | None]]  # the job once it has ended (None: expired)


class Relay:
    """Turns one job's events into what one client sees, from the attempt it joined at."""

    def __init__(self, job: Job, include_usage: bool) -> None:
        self.job_id = job.id
        self.include_usage = include_usage
        # Chunks of earlier attempts are superseded; a job handed back to the queue will run
        # as its next attempt, so all it has sent so far is.
        self.attempt = job.attempts + (job.status == Status.QUEUED and job.attempts > 0)
        self.relayed = False  # whether chunks have gone out: a retry can no longer be hidden
        self.seq = 0  # the last event's: the log keeps the latest MOONQ_MAX_EVENTS only
        self.torn = False  # whether events of this client's answer were trimmed from the log

    async def next(self, feed: Feed, timeout: float | None = None) -> dict[str, Any]:
        """The feed's next event, noting a gap before it that this client's answer falls in."""
        event = await feed.next(timeout)
        seq = event.get("seq")
        if type(seq) is int:
            self.torn = self.torn or (seq > self.seq + 1 and self._needs_before(event))
            self.seq = seq
        return event

    def _needs_before(self, event: dict[str, Any]) -> bool:
        """Whether the events before this one may be this client's: the chunks of its attempt
        (or the result they made); those of an earlier attempt, or a failure, are not needed."""
        kind = event["event"]
        return kind == "done" or (kind == "chunk" and _attempt(event) >= self.attempt)

    async def opening(self, feed: Feed, patience: float) -> dict[str, Any] | None:
        """The first event the client is to see: a chunk or the job's end; None when none came
        within `patience`. Retries before it, and earlier attempts' chunks, stay invisible."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            try:
                event = await self.next(feed, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return None
            if self.torn or event["event"] in ("done", "error", "cancelled"):
                return event
            if self._chunk(event) is not None:
                return event
            if event["event"] == "retry":
                self.attempt = max(self.attempt, _attempt(event["data"]))

    def _chunk(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if event["event"] != "chunk" or _attempt(event) < self.attempt:
            return None
        return openai_chunk(event["data"])

    def lines(self, event: dict[str, Any]) -> tuple[list[str], bool]:
        """The SSE `data:` lines for one event, and whether the stream ends with them."""
        kind = event["event"]
        if kind == "chunk":
            chunk = self._chunk(event)
            self.relayed = self.relayed or chunk is not None
            return ([dumps(chunk)] if chunk is not None else []), False
        if kind == "retry" and not self.relayed:
            self.attempt = max(self.attempt, _attempt(event["data"]))
            return [], False
        if kind == "retry":
            return [self._error(restarted(self.job_id))], True
        if kind == "done":
            result = event["data"] if isinstance(event["data"], dict) else {}
            return [*self._usage(result), "[DONE]"], True
        if kind in ("error", "cancelled"):
            error = event["data"] if kind == "error" else CANCELLED
            return [self._error(error)], True
        return [], False

    def _usage(self, result: dict[str, Any]) -> list[str]:
        return [dumps(usage_chunk(result))] if self.include_usage else []

    def _error(self, error: Mapping[str, Any]) -> str:
        return dumps({"error": job_error(error, self.job_id)})

    async def events(
        self, feed: Feed, first: dict[str, Any] | None, ended: Ended
    ) -> AsyncIterator[str]:
        """The SSE stream: `first` (if any), then what follows, until the end; from the job's
        record instead once the log turns out to lack part of it."""
        try:
            async for text in self._relayed(feed, first):
                yield text
            if self.torn:
                feed.close()
                for text in await self._rebuilt(ended):
                    yield text
        except (RedisError, OSError):
            # The response has started: the failure is an event, never an exception.
            unavailable = {
                "type": "service_unavailable",
                "message": f"The job store became unavailable; fetch GET /v1/jobs/{self.job_id}.",
            }
            yield self._error(unavailable)
        except Exception:
            log.exception("the stream of job %s failed", self.job_id)
            failed = {"type": "api_error", "message": internal_error(self.job_id)}
            yield self._error(failed)

    async def _relayed(self, feed: Feed, first: dict[str, Any] | None) -> AsyncIterator[str]:
        """The lines of the events as they come, until the end or a gap in them."""
        event = first or await self.next(feed)
        while not self.torn:
            texts, end = self.lines(event)
            for text in texts:
                yield text
            if end:
                return
            event = await self.next(feed)

    async def _rebuilt(self, ended: Ended) -> list[str]:
        """The rest of the answer from the job's record: all of it when nothing went out yet
        (waiting for the job's end), else an error that says where to fetch it."""
        if self.relayed:
            return [self._error(trimmed(self.job_id))]
        job = await ended()
        if job is not None and job.status == Status.COMPLETED and job.result is not None:
            chunks = [dumps(chunk) for chunk in result_chunks(job.result)]
            return [*chunks, *self._usage(job.result), "[DONE]"]
        return [self._error(end_error(job))]


class _FeedStream(EventStream):
    """An SSE response that stops its feed however it ends: a client gone before the first
    line leaves a generator that never started, whose own `finally` would never run."""

    def __init__(self, feed: Feed, content: AsyncIterator[str], headers: Mapping[str, str]):
        super().__init__(content, headers=dict(headers), ping=PING_EVERY, sep="\n")
        self._feed = feed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._feed.close()


def _attempt(document: Any) -> int:
    value = document.get("attempt") if isinstance(document, dict) else None
    return value if type(value) is int else 0


def internal_error(job_id: str) -> str:
    return f"Internal error; the job runs on: fetch GET /v1/jobs/{job_id} (?wait= long-polls)."


def failed_answer(exc: Exception, job_id: str, headers: Mapping[str, str]) -> JSONResponse:
    """The answer to a request whose job exists but whose answer failed: the job's id and
    `x-should-retry: false` (in `headers`) as on every answer, since an SDK retry would be a
    new job while this one runs on."""
    if isinstance(exc, APIError):
        merged = {**(exc.headers or {}), **headers}
        return error_response(exc.status_code, str(exc.detail), exc.type, merged, **exc.extra)
    if isinstance(exc, RedisError | OSError):
        log.warning("job store unavailable answering %s: %s", job_id, type(exc).__name__)
        message = (
            "The job store became unavailable; the job runs on: fetch "
            f"GET /v1/jobs/{job_id} (?wait= long-polls) once it is back."
        )
        return error_response(503, message, "service_unavailable", headers, job_id=job_id)
    log.error("answering for job %s failed", job_id, exc_info=exc)
    return error_response(500, internal_error(job_id), "api_error", headers, job_id=job_id)


# The two answers

REREAD_EVERY = 1.0  # the record is read again this often, in case pub/sub missed the end
REDIS_PATIENCE = 5.0  # a failed read of the record is tried again for this long (a failover)
Gone = Callable[[], Awaitable[bool]]  # whether the client has gone away


class ClientGone(Exception):
    """The client of a request waiting for its job went away."""


async def stream_answer(
    svc: Services, job: Job, tenant: str, include_usage: bool, headers: Mapping[str, str]
) -> JSONResponse | EventSourceResponse:
    """SSE once the first chunk is there (or HEADERS_PATIENCE has passed); a job that ends
    before any chunk is answered as the non-streaming call would be."""
    relay, feed = Relay(job, include_usage), Feed(svc, job.id)
    try:
        first = await relay.opening(feed, HEADERS_PATIENCE)
    except BaseException:
        feed.close()
        raise
    if first is not None and first["event"] in ("error", "cancelled"):
        feed.close()
        error = first["data"] if first["event"] == "error" else CANCELLED
        return error_answer(error, job.id, headers)

    async def ended() -> Job | None:
        return await until_end(svc, job, tenant)

    return _FeedStream(feed, relay.events(feed, first, ended), headers)


async def completion_answer(
    svc: Services, job: Job, tenant: str, headers: Mapping[str, str], gone: Gone | None = None
) -> JSONResponse:
    """The `chat.completion` once the job has ended, or its error."""
    try:
        ended = await until_end(svc, job, tenant, gone)
    except ClientGone:
        # Nobody reads this; the job runs on, and the request stops waiting for it.
        return error_response(499, "The client went away.", "client_gone", headers)
    if ended is not None and ended.status == Status.COMPLETED and ended.result is not None:
        return JSONResponse(completion(ended.result), headers=dict(headers))
    return error_answer(end_error(ended), job.id, headers)


def end_error(job: Job | None) -> Mapping[str, Any]:
    """The error of a job that ended without a result (None: its record expired)."""
    if job is None:
        return _EXPIRED
    if job.status == Status.CANCELLED:
        return CANCELLED
    return job.error.model_dump(exclude_none=True) if job.error else {}


async def until_end(svc: Services, job: Job, tenant: str, gone: Gone | None = None) -> Job | None:
    """The job once it has ended (None if it expired meanwhile): woken by its terminal event,
    reading the record again every REREAD_EVERY seconds in case that event was missed.
    Raises ClientGone once `gone()` says so: a waiter for nobody must not wait on."""
    async with svc.hub.listen(job.channel) as queue:
        while True:
            current = await _record(svc, job, tenant)
            if current is None or current.status.terminal:
                return current
            if gone is not None and await gone():
                raise ClientGone(job.id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REREAD_EVERY):
                    while not RawEvent.parse(await queue.get()).terminal:
                        pass


async def _record(svc: Services, job: Job, tenant: str) -> Job | None:
    """The job's record, read again through a brief Redis failure (a failover, a dropped
    connection) rather than failing a request whose job runs on regardless."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REDIS_PATIENCE
    while True:
        try:
            return await svc.store.get(job.id, tenant)
        except (RedisError, OSError):
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(min(0.25, REDIS_PATIENCE))
