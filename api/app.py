"""The thin HTTP face: builds the FastAPI app around injected settings and Redis. No upstream
calls happen here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from api import account, batches, chat, dashboard, errors, files, openapi, routes, usage
from api.files import MULTIPART_OVERHEAD
from api.limits import BodyLimit
from api.metrics import router as metrics_router
from api.services import Services
from moonq.budgets import Budgets
from moonq.file_quota import Quota
from moonq.files import FileStore
from moonq.redis import from_settings, ping
from moonq.settings import Settings
from moonq.store import JobStore
from moonq.stream import EventHub
from moonq.usage import UsageLedger

log = logging.getLogger("moonq.api")


def create_app(settings: Settings, redis: Redis | None = None) -> FastAPI:
    """The API. `redis` is injected by dev mode (embedded Redis) and tests."""
    tenants = settings.tenants_by_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis or from_settings(settings)
        store = JobStore.from_settings(client, settings)
        file_store = FileStore(
            client,
            store.keys,
            max_bytes=settings.max_file_bytes,
            ttl=settings.file_ttl,
            quota=Quota(settings.tenant_max_files, settings.tenant_max_file_bytes),
        )
        hub = EventHub(client)
        ledger = UsageLedger(client, store.keys, settings.prices, settings.price_currency)
        budgets = Budgets(client, store.keys, settings.budgets, ledger)
        app.state.services = Services(
            settings, client, store, hub, tenants, file_store, ledger, budgets
        )
        if not tenants:
            log.warning("MOONQ_API_KEYS is empty: the API is open to anyone who can reach it")
        if not await ping(client):
            log.warning("Redis is not reachable yet; requests get 503 until it is")
        try:
            yield
        finally:
            await app.state.services.hub.close()
            if redis is None:
                await client.aclose()

    app = FastAPI(
        title="moonq",
        summary="A Redis job queue for Moonshot and OpenAI-compatible chat completions",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    openapi.install(app)  # every route's error answers, in their real shape
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, paths=_upload_limits(settings))
    app.include_router(routes.router)
    app.include_router(chat.router)
    app.include_router(files.router)
    app.include_router(batches.create_router)
    app.include_router(batches.router)
    app.include_router(account.router)
    app.include_router(metrics_router)
    app.include_router(usage.router)
    dashboard.install(app)
    return app


def _upload_limits(settings: Settings) -> dict[str, tuple[int, str]]:
    """File uploads may be larger than other bodies: up to MOONQ_MAX_FILE_BYTES."""
    message = f"The file is larger than {settings.max_file_bytes} bytes (MOONQ_MAX_FILE_BYTES)."
    return {"/v1/files": (settings.max_file_bytes + MULTIPART_OVERHEAD, message)}


def app_from_env() -> FastAPI:
    """For `uvicorn --factory api.app:app_from_env` (each process of `moonq api --workers N`).
    It also sets the calling process's garbage collector for a server (`moonq.collector`):
    a process that imports this factory for anything but serving should call `create_app`."""
    from moonq import collector
    from moonq.settings import get_settings

    app = create_app(get_settings())
    collector.tune()
    return app
