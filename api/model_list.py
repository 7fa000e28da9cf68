"""`GET /v1/models[/{id}]`: the upstream's models in OpenAI's format, as `client.models.list()`
and `client.models.retrieve()` of the OpenAI SDK read them.

The list comes from `{MOONSHOT_BASE_URL}/models` with the server's key and is cached in Redis,
so N API processes ask the upstream once per `FRESH_FOR` between them (one holds a refresh
lock while the others serve what is cached). A stale list is served while the upstream is
unreachable, or answers an empty or invalid list; only an upstream never reached is a 503, or
a 502 when it refused the server's key.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request

from api.auth import Tenant
from api.errors import APIError, shown
from api.openapi import errors
from api.services import Services, services
from moonq.settings import Settings

log = logging.getLogger("moonq.api")

FRESH_FOR = 300.0  # seconds a fetched list is served without asking the upstream again
KEEP_FOR = 7 * 24 * 3600  # how long a stale list stands in while the upstream is unreachable
REFRESH_LOCK_MS = 10_000  # one refresh attempt per this long, across every API process
FETCH_TIMEOUT = 5.0

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(request: Request, tenant: Tenant) -> dict[str, Any]:
    """The upstream's models: `{"object": "list", "data": [{"id", "object", "created",
    "owned_by"}]}`."""
    return {"object": "list", "data": await models(services(request))}


@router.get("/v1/models/{model_id:path}", responses=errors(404))
async def retrieve_model(model_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    """One of the upstream's models; 404 for a model it does not list."""
    for model in await models(services(request)):
        if model["id"] == model_id:
            return model
    raise APIError(
        404,
        f"The model {shown(model_id)} does not exist; GET /v1/models lists those there are.",
        param="model",
        code="model_not_found",
    )


async def models(svc: Services) -> list[dict[str, Any]]:
    """The cached list while it is fresh; else the upstream's, or the stale list when the
    upstream cannot be reached (or another process is refreshing it)."""
    cached = await _cached(svc)
    if cached is not None and time.time() - cached[0] < FRESH_FOR:
        return cached[1]
    if cached is not None and not await _may_refresh(svc):
        return cached[1]
    try:
        fetched = await fetch(svc.settings)
    except KeyRefused:
        if cached is not None:
            return cached[1]
        raise APIError(
            502,
            "The upstream refused moonq's own key (MOONSHOT_API_KEY) when asked for its "
            "models: the server's operator must fix it; your key is fine.",
            type="invalid_authentication_error",
            code="invalid_authentication_error",
            headers={"x-should-retry": "false"},
        ) from None
    return await _kept(svc, fetched, cached)


async def _kept(
    svc: Services,
    fetched: list[dict[str, Any]] | None,
    cached: tuple[float, list[dict[str, Any]]] | None,
) -> list[dict[str, Any]]:
    """A fetched list that lists something replaces the cached one; an empty or invalid one
    never replaces a good list (an upstream's bad minute must not empty it for days)."""
    if fetched:
        document = {"fetched_at": time.time(), "data": fetched}
        await svc.redis.set(svc.keys.upstream_models(), json.dumps(document), ex=KEEP_FOR)
        return fetched
    if cached is not None:
        return cached[1]
    if fetched is not None:
        return fetched  # the upstream lists nothing, and nothing better is known
    raise APIError(
        503,
        "The upstream's model list could not be fetched; try again shortly.",
        type="service_unavailable",
        headers={"Retry-After": "5"},
    )


async def _cached(svc: Services) -> tuple[float, list[dict[str, Any]]] | None:
    raw = await svc.redis.get(svc.keys.upstream_models())
    if raw is None:
        return None
    try:
        document = json.loads(raw)
        return float(document["fetched_at"]), list(document["data"])
    except (ValueError, KeyError, TypeError):
        return None  # not what this code writes: fetch afresh


async def _may_refresh(svc: Services) -> bool:
    """True for the one process (per REFRESH_LOCK_MS) that asks the upstream."""
    key = svc.keys.upstream_models_refresh()
    return bool(await svc.redis.set(key, "1", nx=True, px=REFRESH_LOCK_MS))


class KeyRefused(Exception):
    """The upstream answered 401: it refused the server's own key."""


async def fetch(settings: Settings) -> list[dict[str, Any]] | None:
    """The upstream's models, or None when it cannot be reached or answers something else;
    raises KeyRefused on a 401. The key goes in the header only: never into a log line or an
    answer."""
    key = settings.upstream_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = settings.moonshot_base_url.rstrip("/") + "/models"
    timeout = httpx.Timeout(FETCH_TIMEOUT, connect=min(FETCH_TIMEOUT, settings.connect_timeout))
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            answer = await client.get(url)
        found = _openai_models(answer.json()) if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, RecursionError) as exc:  # nesting past the stack
        log.warning("upstream model list unreachable: %s", type(exc).__name__)
        return None
    if answer.status_code == 401:
        log.warning("upstream model list: HTTP 401, the upstream refused MOONSHOT_API_KEY")
        raise KeyRefused
    if found is None:
        log.warning("upstream model list: HTTP %d, not a model list", answer.status_code)
    return found


def _openai_models(document: Any) -> list[dict[str, Any]] | None:
    """OpenAI's four fields of each model the upstream lists (Moonshot adds `root`, `parent`,
    `permission`); None for anything but a list of models."""
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    out: dict[str, dict[str, Any]] = {}
    for item in data:
        model_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(model_id, str) and model_id and model_id not in out:  # the first of each
            created, owner = item.get("created"), item.get("owned_by")
            out[model_id] = {
                "id": model_id,
                "object": "model",
                "created": created if type(created) is int else 0,
                "owned_by": owner if isinstance(owner, str) else "upstream",
            }
    return list(out.values())
