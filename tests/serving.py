"""Real sockets for the client and CLI tests: the in-process app served by uvicorn on the test's
own event loop, a worker running beside it, and a TCP proxy that cuts connections mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from worker.main import create_worker

_LAST_EVENT_ID = re.compile(rb"\r\nlast-event-id: *([^\r]*)\r\n", re.IGNORECASE)


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """`app` (its lifespan already entered, as the stack factories do) on a free port; its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # Ctrl-C stays pytest's
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, not an event
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@contextlib.asynccontextmanager
async def worker_running(stack: Any, **injected: Any) -> AsyncIterator[Any]:
    """A worker taking jobs for as long as the block runs (`injected`: e.g. `transport=`)."""
    worker = create_worker(stack.settings, redis=stack.redis, handle_signals=False, **injected)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        await worker.close()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


class CuttingProxy:
    """Forwards TCP connections to `port`, closing each one's client side after `cut_after`
    bytes towards the client (None: never). It remembers each request's `Last-Event-ID`."""

    def __init__(self, port: int, cut_after: int | None) -> None:
        self.port = port
        self.cut_after = cut_after
        self.last_event_ids: list[str | None] = []
        self.cuts = 0
        self.refuse = False  # close new connections at once, as a server that went away
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        upward = asyncio.create_task(self._upward(reader, up_writer))
        try:
            await self._downward(up_reader, writer)
        finally:
            upward.cancel()
            await asyncio.gather(upward, return_exceptions=True)
            writer.close()
            up_writer.close()

    async def _upward(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        first = True
        while data := await reader.read(65536):
            if first:
                found = _LAST_EVENT_ID.search(data)
                self.last_event_ids.append(found[1].decode() if found else None)
                first = False
            up.write(data)
            await up.drain()

    async def _downward(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while data := await up.read(65536):
            if self.cut_after is not None and sent + len(data) >= self.cut_after:
                writer.write(data[: max(self.cut_after - sent, 0)])
                await writer.drain()
                self.cuts += 1
                return
            writer.write(data)
            await writer.drain()
            sent += len(data)
