"""The fake upstream's Files API (Moonshot's `file-extract`), for tests and local runs.

The "extracted text" of a document is its bytes decoded as UTF-8 (errors replaced), so a test
can check that the content round-trips. Files live in the fake's memory.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from moonq.fake_moonshot import CONFIG_KEY, _ApiError, _check_auth, _error_response

PURPOSES = ("file-extract", "image", "video")


@dataclass
class FakeFile:
    id: str
    filename: str
    purpose: str
    content_type: str
    data: bytes
    created_at: int

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "ok",
            "status_details": "",
        }


FILES_KEY = web.AppKey("files", dict[str, FakeFile])


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _api(handler: Handler) -> Handler:
    """The key is checked like the chat endpoint does; `_ApiError` becomes Moonshot's body."""

    async def handle(request: web.Request) -> web.Response:
        try:
            _check_auth(request, request.app[CONFIG_KEY])
            return await handler(request)
        except _ApiError as exc:
            return _error_response(exc)

    return handle


def _found(request: web.Request) -> FakeFile:
    found = request.app[FILES_KEY].get(request.match_info["file_id"])
    if found is None:
        raise _ApiError("resource_not_found_error", "Not found the file")
    return found


async def _parts(request: web.Request) -> tuple[str | None, BodyPartReader | None, bytes]:
    """The multipart body's `purpose` and `file` (its part and bytes), read as they come."""
    purpose, file_part, data = None, None, b""
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.read()).decode()
        elif part.name == "file":
            file_part, data = part, bytes(await part.read())
    return purpose, file_part, data


async def upload(request: web.Request) -> web.Response:
    """`POST /v1/files` (multipart `file`, `purpose`)."""
    if not request.content_type.startswith("multipart/"):
        raise _ApiError("invalid_request_error", "Invalid request: expected multipart/form-data")
    purpose, part, data = await _parts(request)
    if purpose not in PURPOSES:
        raise _ApiError("invalid_request_error", f"Invalid request: purpose {purpose!r}")
    if part is None or not data:
        raise _ApiError("invalid_request_error", "Invalid request: file is empty or missing")
    if (part.filename or "").lower().endswith(".exe"):
        raise _ApiError("invalid_request_error", "Invalid request: unsupported file type")
    kind = part.headers.get("Content-Type", "application/octet-stream")
    found = FakeFile(
        uuid.uuid4().hex[:20], part.filename or "file", purpose, kind, data, int(time.time())
    )
    request.app[FILES_KEY][found.id] = found
    return web.json_response(found.json())


async def list_files(request: web.Request) -> web.Response:
    data = [f.json() for f in request.app[FILES_KEY].values()]
    return web.json_response({"object": "list", "data": data})


async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(_found(request).json())


async def content(request: web.Request) -> web.Response:
    """The extracted text, as Moonshot answers it for `file-extract`."""
    found = _found(request)
    if found.purpose != "file-extract":
        raise _ApiError("invalid_request_error", "Invalid request: only file-extract has content")
    text = found.data.decode("utf-8", errors="replace")
    return web.json_response(
        {
            "content": text,
            "file_type": found.content_type,
            "filename": found.filename,
            "title": "",
            "type": "file",
        }
    )


async def delete(request: web.Request) -> web.Response:
    found = _found(request)
    del request.app[FILES_KEY][found.id]
    return web.json_response({"deleted": True, "id": found.id, "object": "file"})


def install(app: web.Application) -> None:
    """Add the files routes to the fake's app."""
    app[FILES_KEY] = {}
    app.router.add_post("/v1/files", _api(upload))
    app.router.add_get("/v1/files", _api(list_files))
    app.router.add_get("/v1/files/{file_id}", _api(retrieve))
    app.router.add_get("/v1/files/{file_id}/content", _api(content))
    app.router.add_delete("/v1/files/{file_id}", _api(delete))
