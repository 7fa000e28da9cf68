"""Publish the events of every attempt a worker runs, in as few Redis round trips as possible.

One `EventWriter` per worker process writes the events of all its running attempts together:
while one write is in flight, new events (of any job) queue up and go together in the next
one, a single script call. A fast stream, or many streams at once, cost a round trip per batch
instead of per token; writes start at most every `MIN_GAP` (2 ms), so under load events gather
a little longer, and the first event after a quiet spell goes at once. Each attempt's events
stay in order, and one attempt losing its job (a cancel, a newer attempt) fails only that
attempt's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from moonq.serde import dump_bytes
from moonq.store import JobStore

# Events per script call: bounds the time one call holds Redis (about a microsecond each).
MAX_BATCH = 2000
# The least time between the starts of two writes. The first event after a quiet spell goes at
# once; under load, events of many jobs gather for up to this long and share one round trip
# (a round trip costs the worker far more CPU than an event in it), for at most this much
# latency on a chunk: little next to the tens of ms between an LLM's tokens.
MIN_GAP = 0.002


class AttemptLost(Exception):
    """The job was cancelled, finished or taken over by a newer attempt: stop working on it."""


class NotStorable(ValueError):
    """An event that cannot be written as JSON (nested too deeply): the attempt's alone."""


class EventWriter:
    """The process-wide writer behind every `EventPublisher`."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._dirty: dict[EventPublisher, None] = {}  # publishers with events, in order
        self._flushing: asyncio.Task[None] | None = None
        self._last = -MIN_GAP  # loop time when the last write started

    def publisher(self, job_id: str, attempt: int) -> EventPublisher:
        return EventPublisher(self, job_id, attempt)

    def _wake(self, publisher: EventPublisher) -> None:
        self._dirty[publisher] = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="moonq-events")

    def _forget(self, publisher: EventPublisher) -> None:
        self._dirty.pop(publisher, None)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            wait = self._last + MIN_GAP - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last = loop.time()
            batch = self._take()
            if not batch:  # the publishers that were waiting closed meanwhile
                continue
            writes = [(p.job_id, p.attempt, events) for p, events in batch]
            try:
                results: list[Any] = await self._store.append_many(writes)
            except asyncio.CancelledError:  # the worker is closing: the attempts are handed back
                for publisher, _ in batch:
                    publisher.written(ConnectionError("the worker shut down"), 0)
                raise
            except Exception as exc:  # Redis failed: every attempt in the batch hears of it
                results = [exc] * len(batch)
            for (publisher, events), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    publisher.written(result, 0)
                elif result < 0:
                    publisher.written(AttemptLost(publisher.job_id), 0)
                else:
                    publisher.written(None, len(events))

    def _take(self) -> list[tuple[EventPublisher, list[bytes]]]:
        """The pending events of as many publishers as fit in one call, oldest first."""
        batch: list[tuple[EventPublisher, list[bytes]]] = []
        size = 0
        for publisher in list(self._dirty):
            if size and size + len(publisher.pending) > MAX_BATCH:
                break
            del self._dirty[publisher]
            batch.append((publisher, publisher.take()))
            size += len(batch[-1][1])
        return batch

    async def close(self) -> None:
        """Stop writing: every attempt with events still unwritten hears that it cannot be."""
        task, self._flushing = self._flushing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for publisher in list(self._dirty):
            publisher.written(ConnectionError("the worker shut down"), 0)
        self._dirty.clear()


class EventPublisher:
    """One attempt's events, written in order by the process's `EventWriter`."""

    def __init__(self, writer: EventWriter, job_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.pending: list[bytes] = []  # events encoded, not yet written
        self._writer = writer
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._closed = False

    def emit(self, event: str, data: Any) -> None:
        """Queue an event; raises `AttemptLost` (or a Redis error) from an earlier write, and
        `NotStorable` for data that cannot be written. Encoded here, in the attempt's own
        task, so that a bad event fails its attempt alone."""
        self._raise_failure()
        try:
            body = dump_bytes({"event": event, "attempt": self.attempt, "data": data})
        except ValueError as exc:
            raise NotStorable(str(exc)) from exc
        self.pending.append(body)
        self._idle.clear()
        self._writer._wake(self)

    async def drain(self) -> None:
        """Wait until everything emitted is written; re-raises a failed write."""
        while not self._idle.is_set():
            await self._idle.wait()
        self._raise_failure()

    def close(self) -> None:
        """Abandon unwritten events (the attempt is over either way)."""
        self._closed = True
        self.pending = []
        self._writer._forget(self)

    def take(self) -> list[bytes]:
        events, self.pending = self.pending, []
        self._in_flight += len(events)
        return events

    def written(self, failure: BaseException | None, count: int) -> None:
        self._in_flight = 0 if failure is not None else self._in_flight - count
        if failure is not None and self._failure is None and not self._closed:
            self._failure = failure
            self.pending = []  # what follows a failed write must not be written
            self._writer._forget(self)
        if not self.pending and self._in_flight == 0:
            self._idle.set()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
