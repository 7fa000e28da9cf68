"""Publish one attempt's events, coalescing chunks into as few Redis round trips as possible.

While one write is in flight, new events queue up and go together in the next one: a fast
stream costs a round trip per batch instead of per token, a slow one adds no latency.
"""

from __future__ import annotations

import asyncio
from typing import Any

from moonq.store import JobStore


class AttemptLost(Exception):
    """The job was cancelled, finished or taken over by a newer attempt: stop working on it."""


class EventPublisher:
    def __init__(self, store: JobStore, job_id: str, attempt: int) -> None:
        self._store = store
        self._job_id = job_id
        self._attempt = attempt
        self._pending: list[dict[str, Any]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.published = 0

    def emit(self, event: str, data: Any) -> None:
        """Queue an event; raises `AttemptLost` (or a Redis error) from an earlier write."""
        self._raise_failure()
        self._pending.append({"event": event, "attempt": self._attempt, "data": data})
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())

    async def drain(self) -> None:
        """Wait until everything emitted is written; re-raises a failed write."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)
        self._raise_failure()

    def close(self) -> None:
        """Abandon unwritten events (the attempt is over either way)."""
        task, self._flushing = self._flushing, None
        if task is None:
            return
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: it was already acted on, or is moot now
        else:
            task.cancel()

    def _raise_failure(self) -> None:
        if self._flushing is not None and self._flushing.done():
            error = None if self._flushing.cancelled() else self._flushing.exception()
            if error is not None:
                raise error

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            if await self._store.append(self._job_id, self._attempt, batch) < 0:
                raise AttemptLost(self._job_id)
            self.published += len(batch)
