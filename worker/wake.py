"""Waking a worker when a job is queued, instead of waiting for its next poll.

arq polls its queue every `poll_delay` (a 50 ms poll added ~25 ms to a job's start on average);
its maintainer declined wake-on-enqueue upstream. moonq's CREATE script publishes on a channel
as it queues a job, a cancel as it aborts one, and each worker listens: a wake-up ends the
worker's idle wait at once. The poll (MOONQ_POLL_DELAY, 0.5 s) stays as the fallback, so a lost
message (pub/sub is at-most-once) costs one poll delay, never a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("moonq.worker")

# How long one listen waits for a message before it looks at whether it should stop: a cancel
# that redis-py loses inside a read cannot keep a closing worker waiting longer than this.
LISTEN_STEP = 1.0


class Wakeup:
    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis, self.channel = redis, channel
        self._event = asyncio.Event()
        # A cancel's wake-up ("abort") since the worker last looked at arq's abort requests.
        self.aborts = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def set(self) -> None:
        """Something may be ready (a job was queued, a slot freed): stop idling."""
        self._event.set()

    async def idle(self, timeout: float) -> None:
        """Wait until woken, or `timeout` seconds; a wake-up since the last idle counts."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="moonq-wakeup")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        self._event.clear()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_STEP * 3):
                    await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self) -> None:
        while not self._closing:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    while not self._closing:
                        message = await pubsub.get_message(timeout=LISTEN_STEP)
                        if message is not None:
                            self.aborts = self.aborts or message.get("data") == b"abort"
                            self._event.set()
            except (RedisError, OSError) as exc:
                log.debug("wake-up channel lost (%s); polling meanwhile", type(exc).__name__)
                await asyncio.sleep(1.0)
