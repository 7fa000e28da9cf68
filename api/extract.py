"""Moonshot's document extraction (`purpose=file-extract`), proxied so that the Moonshot key stays
on the server. The API's one upstream call: uploads go to `{MOONSHOT_BASE_URL}/files` and Redis
remembers which tenant uploaded which upstream file, so only that tenant reads or deletes it."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from api.errors import APIError
from api.services import Services, services
from moonq.settings import Settings

log = logging.getLogger("moonq.api")

PURPOSE = "file-extract"
# How long moonq remembers an upload's tenant when MOONQ_FILE_TTL keeps files forever.
OWNER_TTL = 7 * 24 * 3600
# Upstream ids go into a URL path: nothing but these characters.
_UPSTREAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Upstream statuses that are the document's or the request's fault, passed on as they are.
_PASSED_ON = frozenset({400, 404, 413, 415, 422})


async def _call(settings: Settings, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One upstream request; a network failure is a 502, any answer is returned."""
    headers = {"Authorization": f"Bearer {settings.upstream_key}"} if settings.upstream_key else {}
    timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            return await client.request(method, f"{settings.moonshot_base_url}{path}", **kwargs)
    except httpx.HTTPError as exc:
        log.warning("file-extract upstream unreachable: %s", type(exc).__name__)
        raise APIError(
            502, "The upstream file service could not be reached.", type="upstream_error"
        ) from exc


def _message(answer: httpx.Response, settings: Settings) -> str:
    """The upstream's error message, cut short, and never quoting the server's key."""
    try:
        message = str(answer.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {answer.status_code}"
    if settings.upstream_key:
        message = message.replace(settings.upstream_key, "***")
    return message[:500]


def _check(answer: httpx.Response, settings: Settings) -> None:
    """A refused document keeps its status; the upstream's other failures (its key refused,
    its errors) are a 502: they are the server's to fix, not the client's."""
    status = answer.status_code
    if answer.is_success:
        return
    if status in _PASSED_ON:
        raise APIError(status, f"The upstream refused the file: {_message(answer, settings)}")
    if status == 429:
        raise APIError(429, "The upstream is rate limiting file requests; try again shortly.")
    log.warning("file-extract upstream answered HTTP %d", status)
    raise APIError(502, f"The upstream file service failed (HTTP {status}).", type="upstream_error")


def _object(answer: httpx.Response) -> dict[str, Any]:
    try:
        found = answer.json()
    except ValueError:
        found = None
    if not isinstance(found, dict) or not isinstance(found.get("id"), str):
        raise APIError(502, "The upstream answered without a file object.", type="upstream_error")
    return found


async def upload(request: Request, tenant: str, file: UploadFile, filename: str) -> Response:
    """Send the spooled upload to the upstream and remember that it is the tenant's."""
    svc = services(request)
    await file.seek(0)
    parts = {"file": (filename, file.file, file.content_type or "application/octet-stream")}
    answer = await _call(svc.settings, "POST", "/files", files=parts, data={"purpose": PURPOSE})
    _check(answer, svc.settings)
    found = _object(answer)
    if not _UPSTREAM_ID.match(found["id"]):
        raise APIError(502, "The upstream answered an unusable file id.", type="upstream_error")
    ttl = svc.settings.file_ttl or OWNER_TTL
    await svc.redis.set(svc.keys.extract_owner(found["id"]), tenant, ex=ttl)
    return JSONResponse(found)


async def _owned(svc: Services, tenant: str, file_id: str) -> bool:
    if not _UPSTREAM_ID.match(file_id):
        return False
    owner = await svc.redis.get(svc.keys.extract_owner(file_id))
    return owner is not None and owner.decode() == tenant


async def _owned_or_404(request: Request, tenant: str, file_id: str) -> Services:
    svc = services(request)
    if not await _owned(svc, tenant, file_id):
        shown = repr(file_id if len(file_id) <= 64 else file_id[:64] + "…")
        raise APIError(404, f"No file with id {shown}.")
    return svc


async def retrieve(request: Request, tenant: str, file_id: str) -> Response:
    """The upstream's file object of the tenant's own extracted file; else a 404."""
    svc = await _owned_or_404(request, tenant, file_id)
    answer = await _call(svc.settings, "GET", f"/files/{file_id}")
    _check(answer, svc.settings)
    return JSONResponse(_object(answer))


async def content(request: Request, tenant: str, file_id: str) -> Response:
    """The extracted text, as the upstream answers it (`{"content": ..., ...}`)."""
    svc = await _owned_or_404(request, tenant, file_id)
    answer = await _call(svc.settings, "GET", f"/files/{file_id}/content")
    _check(answer, svc.settings)
    kind = answer.headers.get("content-type", "application/json")
    return Response(answer.content, media_type=kind)


async def delete(request: Request, tenant: str, file_id: str) -> Response:
    """Delete upstream, then forget the owner; one the upstream no longer has is forgotten too."""
    svc = await _owned_or_404(request, tenant, file_id)
    answer = await _call(svc.settings, "DELETE", f"/files/{file_id}")
    if answer.is_success or answer.status_code == 404:
        await svc.redis.delete(svc.keys.extract_owner(file_id))
    _check(answer, svc.settings)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
