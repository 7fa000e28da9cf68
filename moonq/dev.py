"""`moonq dev`: API and worker in one process, with fallbacks so it runs on a bare laptop.

No reachable Redis → an embedded in-process Redis (fakeredis). No `MOONSHOT_API_KEY` → the
project's fake Moonshot server. Both are said loudly: neither is for production.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from pydantic import SecretStr

from api.app import create_app
from moonq import redis as moonq_redis
from moonq.fake_moonshot import start_fake
from moonq.settings import Settings
from worker.main import create_worker

log = logging.getLogger("moonq.dev")

BANNER = "=" * 72


def _shout(*lines: str) -> None:
    print("\n".join([BANNER, *(f"  {line}" for line in lines), BANNER]), flush=True)


async def _redis_or_embedded(settings: Settings) -> moonq_redis.ArqRedis:
    client = moonq_redis.connect(settings.redis_url, settings.redis_max_connections)
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


async def serve(settings: Settings, host: str, port: int) -> None:
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
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    worker_task = asyncio.create_task(worker.async_run())
    try:
        await server.serve()
    finally:
        worker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task
        await worker.close()
        if fake is not None:
            await fake.close()


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(settings, host, port))
