"""sse-starlette's response, without its per-event and per-stream costs where they buy nothing.

sse-starlette serves every response as an anyio task group of four tasks (the stream, its
pings, a watch for the server's exit, a watch for the client's disconnect) and guards its last
send with an anyio lock. In a microbenchmark (300 streams at once, 21 events each, uvloop) that
costs ~0.4 ms of CPU a stream, where a bare loop of sends costs ~0.05 ms: in `make bench`, a
sixth of the API's CPU per job at 300 concurrent streams. `EventStream` serves the same response
with one helper task (~0.12 ms): the stream runs in the request's own task, the helper waits
for the client's disconnect and sends a ping each interval meanwhile, and the server's exit
reaches the stream through sse-starlette's own shutdown watcher. What the client sees is
unchanged: the same headers, events, pings and end; a disconnect or the server's exit ends the
stream as sse-starlette ends it (cancelled: its generator's cleanup runs). Whatever this path
does not cover (HEAD, a send timeout, the shutdown event and grace period, a close handler, a
data sender, an sse-starlette without the shutdown watcher) takes sse-starlette's own path.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette import sse as _sse
from sse_starlette.event import ensure_bytes
from starlette.types import Message, Receive, Scope, Send

_shutdown_state = getattr(_sse, "_get_shutdown_state", None)
_start_watcher = getattr(_sse, "_ensure_watcher_started_on_this_loop", None)
LEAN = _shutdown_state is not None and _start_watcher is not None


class _Stop:
    """Ends one stream early, once: set by the client's disconnect, by a failed ping, or by
    sse-starlette's shutdown watcher (which calls `set()` on each stream it holds). Its cancel
    is sent again every `AGAIN` seconds until the stream has taken it, as sse-starlette's
    cancel scope cancels again at each await: a cancel can be lost on the way (on Python 3.11
    `asyncio.wait_for`, which redis-py's `send_packed_command` awaits under a socket timeout,
    returns the result of a wait that completes as the cancel lands)."""

    AGAIN = 0.1
    __slots__ = ("again", "armed", "fired", "sent", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task, self.armed, self.fired, self.sent = task, True, False, 0
        self.again: asyncio.TimerHandle | None = None

    def set(self) -> None:
        if self.armed and not self.fired:
            self.fired = True
            self._cancel()

    def _cancel(self) -> None:
        if self.armed:
            self.sent += 1
            self.task.cancel()
            self.again = self.task.get_loop().call_later(self.AGAIN, self._cancel)

    def disarm(self) -> None:
        self.armed = False
        if self.again is not None:
            self.again.cancel()

    def settle(self) -> int:
        """Takes back each cancel sent; the task's cancels left (from outside)."""
        left = self.task.cancelling()
        for _ in range(self.sent):
            left = self.task.uncancel()
        self.sent = 0
        return left


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class EventStream(EventSourceResponse):
    """An `EventSourceResponse` served by one helper task rather than a task group of four,
    and that, without a `send_timeout`, sends each event as is (sse-starlette wraps every send
    in an anyio cancel scope, a timeout of none included: ~5% of the API's CPU in a streaming
    profile)."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)

    def _lean(self, scope: Scope) -> bool:
        return (
            LEAN
            and scope["type"] == "http"
            and scope["method"].upper() != "HEAD"
            and self.send_timeout is None
            and self.data_sender_callable is None
            and self.client_close_handler_callable is None
            and getattr(self, "_shutdown_event", None) is None
            and not getattr(self, "_shutdown_grace_period", 0)
            and not _sse.AppStatus.should_exit
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if task is None or not self._lean(scope):
            await super().__call__(scope, receive, send)
            return
        assert _shutdown_state is not None and _start_watcher is not None
        cancels = task.cancelling()  # any before this response are not its own to take
        stop = _Stop(task)
        _start_watcher()
        waiting = _shutdown_state().events
        waiting.add(stop)
        helper = asyncio.get_running_loop().create_task(self._listen(receive, send, stop))
        try:
            await self._stream(send, stop)
        except asyncio.CancelledError:
            stop.disarm()
            if not stop.fired or stop.settle() > cancels:
                raise  # cancelled from outside, not (only) ended by the client or the server
        finally:
            stop.disarm()
            stop.settle()  # a cancel lost on the way, the stream having ended meanwhile
            waiting.discard(stop)
            helper.cancel()
            helper.add_done_callback(_retrieved)  # a failed ping's error, when one is raising
        if not helper.cancelled() and helper.done() and helper.exception() is not None:
            raise helper.exception()  # type: ignore[misc]  # a ping that could not be sent
        if self.background is not None:
            await self.background()

    async def _stream(self, send: Send, stop: _Stop) -> None:
        """sse-starlette's `_stream_response`, its last send serialised with the pings by
        `active` rather than by a lock: neither awaits between its check and its send."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        iterator = self.body_iterator
        try:
            async for data in iterator:
                chunk = ensure_bytes(data, self.sep)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except BaseException:
            stop.disarm()  # its cleanup is not cancelled again (sse-starlette shields it)
            # Suspended at its yield while a send failed or was cancelled: close it so that
            # its cleanup runs now (a stream that raised itself is closed already).
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with anyio.move_on_after(getattr(self, "_cleanup_timeout", 30), shield=True):
                    try:
                        await aclose()
                    except Exception:
                        _sse.logger.exception("Error closing body iterator after a send failure")
            raise
        self.active = False
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _listen(self, receive: Receive, send: Send, stop: _Stop) -> None:
        """Until the client disconnects: a ping every `ping_interval` seconds (none at 0)."""
        loop = asyncio.get_running_loop()
        every = self.ping_interval
        due = loop.time() + every if every > 0 else None
        try:
            while self.active:
                try:
                    async with asyncio.timeout_at(due):
                        message = await receive()
                except TimeoutError:
                    assert due is not None
                    due = loop.time() + every
                    await self._ping(send)
                    continue
                if message["type"] == "http.disconnect":
                    self.active = False
                    return
        finally:
            stop.set()  # a no-op once the stream has ended

    async def _ping(self, send: Send) -> None:
        """A ping, as sse-starlette sends one; none once the stream has sent its end."""
        ping = (
            self.ping_message_factory()
            if self.ping_message_factory
            else ServerSentEvent(comment=f"ping - {datetime.now(UTC)}", sep=self.sep)
        )
        if self.active:
            body = ensure_bytes(ping, self.sep)
            await send({"type": "http.response.body", "body": body, "more_body": True})
