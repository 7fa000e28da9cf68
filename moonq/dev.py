"""`moonq dev`: API and worker in one process, with fallbacks so it runs on a bare laptop.

No reachable Redis → an embedded in-process Redis (fakeredis). No `MOONSHOT_API_KEY` → the
project's fake Moonshot server. Both are said loudly: neither is for production.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.config
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from pydantic import SecretStr

from api.app import create_app
from moonq import logs
from moonq import redis as moonq_redis
from moonq.cli import announce
from moonq.fake_moonshot import start_fake
from moonq.settings import Settings
from worker.main import create_worker

log = logging.getLogger("moonq.dev")

BANNER = "=" * 72


def _shout(*lines: str) -> None:
    print("\n".join([BANNER, *(f"  {line}" for line in lines), BANNER]), flush=True)


async def _redis_or_embedded(settings: Settings) -> moonq_redis.ArqRedis:
    client = moonq_redis.from_settings(settings)
    if await moonq_redis.ping(client):
        print(f"moonq dev: using Redis at {_safe_url(settings.redis_url)}", flush=True)
        return client
    await client.aclose()
    _shout(
        f"Redis at {_safe_url(settings.redis_url)} is not reachable:",
        "using an EMBEDDED in-process Redis (fakeredis). Jobs vanish when this process exits.",
    )
    return moonq_redis.embedded()


def _safe_url(url: str) -> str:
    """The Redis URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


class _Server(uvicorn.Server):
    """uvicorn that runs `cleanup` (once) as part of its own shutdown: it re-raises the signal
    that stopped it when `serve()` returns, which would end the process before any cleanup
    after that. It also remembers the signal, so the worker's log can name it."""

    def __init__(self, config: uvicorn.Config, cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.stop_signal: signal.Signals | None = None
        self._cleanup: Callable[[], Awaitable[None]] | None = cleanup

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signal = signal.Signals(sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            await cleanup()


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel until it ends: one cancellation can be swallowed by a Redis call in flight, and
    a worker left running would keep taking jobs in a process that no longer serves."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)


def _worker_ended(task: asyncio.Task[None], server: uvicorn.Server) -> None:
    """The API never outlives the worker: it would queue jobs that nothing runs."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the worker stopped", exc_info=task.exception())
    server.should_exit = True


async def serve(settings: Settings, sock: socket.socket) -> None:
    """Serve on `sock` (bound already, so a taken port never gets this far) until stopped."""
    redis = await _redis_or_embedded(settings)
    fake = None
    if settings.moonshot_api_key is None:
        fake = await start_fake()
        settings = settings.model_copy(
            update={"moonshot_base_url": fake.url, "moonshot_api_key": SecretStr("fake-key")}
        )
        _shout(
            "No MOONSHOT_API_KEY set: jobs go to the FAKE Moonshot server at",
            f"{fake.url} — answers are canned. Set MOONSHOT_API_KEY for real completions.",
        )
    app = create_app(settings, redis=redis)
    worker = create_worker(settings, redis=redis, handle_signals=False)
    worker_task = asyncio.create_task(worker.async_run())

    async def cleanup() -> None:
        if server.stop_signal is not None:
            worker.stop_reason = server.stop_signal.name
        await _stop(worker_task)
        await worker.close()
        if fake is not None:
            await fake.close()

    # moonq's logging (MOONQ_LOG_FORMAT), set up by `run`; access lines with MOONQ_ACCESS_LOG
    config = uvicorn.Config(
        app, log_level="info", log_config=None, access_log=settings.access_log, backlog=16_384
    )
    server = _Server(config, cleanup)
    worker_task.add_done_callback(lambda task: _worker_ended(task, server))
    try:
        announce(sock)
        await server.serve(sockets=[sock])
    finally:
        await server.cleanup()  # if startup failed, shutdown never ran


def run(settings: Settings, sock: socket.socket) -> None:
    logging.config.dictConfig(logs.config(settings))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: the cleanup ran already
        asyncio.run(serve(settings, sock))
