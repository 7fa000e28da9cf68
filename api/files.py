"""The `/v1/files` routes, as the OpenAI SDK speaks them: batch input files kept in Redis
(moonq/files.py), and `file-extract` uploads proxied to the upstream (api/extract.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.datastructures import FormData, UploadFile

from api import extract
from api import openapi as doc
from api.auth import Tenant
from api.errors import APIError, shown
from api.openapi import answer, errors
from api.services import services
from moonq.file_quota import OverQuota
from moonq.files import PIECE, FileObject, FileTooLarge, UnknownCursor

router = APIRouter(tags=["files"])

PURPOSES = ("batch", extract.PURPOSE)
# What a multipart body may add to the file's bytes (boundaries, part headers, `purpose`...):
# `BodyLimit` lets `POST /v1/files` reach MOONQ_MAX_FILE_BYTES plus this.
MULTIPART_OVERHEAD = 64 * 1024
MAX_FILENAME = 255
_BINARY = "application/octet-stream"
# What routes that may proxy a `file-extract` file can answer: the upstream's refusals too.
_PROXIED = (400, 401, 404, 413, 415, 422, 429, 502, 503)

# The form is read by hand (to answer 400s of our own), so OpenAPI is told its shape.
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                    },
                }
            }
        },
    }
}


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


async def virtual_file(
    request: Request, tenant: str, file_id: str
) -> tuple[FileObject, AsyncIterator[bytes]] | None:
    """A batch's output and error files, produced from its jobs as it runs."""
    from api.batches import output_file  # api.batches imports this module's models

    return await output_file(request, tenant, file_id)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"The file is larger than {max_bytes} bytes (MOONQ_MAX_FILE_BYTES).", param="file"
    )


def _over_quota(exc: OverQuota) -> APIError:
    what = "files" if exc.setting == "MOONQ_TENANT_MAX_FILES" else "bytes of files"
    return APIError(
        409,
        f"You keep as many {what} as you may ({exc.limit}, {exc.setting}); "
        "delete some files first.",
        param="file",
    )


def _purpose(form: FormData) -> str:
    purpose = form.get("purpose")
    allowed = ", ".join(map(repr, PURPOSES))
    if not isinstance(purpose, str) or not purpose.strip():
        raise APIError(400, f"`purpose` is required: one of {allowed}.", param="purpose")
    if purpose.strip() not in PURPOSES:
        raise APIError(
            400, f"`purpose` must be one of {allowed} (got {shown(purpose)}).", param="purpose"
        )
    return purpose.strip()


def _upload(form: FormData) -> tuple[UploadFile, str]:
    """The uploaded file and its name; an empty or missing one is a 400."""
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise APIError(400, "`file` is required: a file sent as multipart/form-data.", param="file")
    if not file.size:
        raise APIError(400, "The file is empty.", param="file")
    filename = file.filename or "file"
    if len(filename) > MAX_FILENAME:
        raise APIError(
            400, f"The file name is longer than {MAX_FILENAME} characters.", param="file"
        )
    return file, filename


async def _pieces(file: UploadFile) -> AsyncIterator[bytes]:
    """The spooled upload (on disk past 1 MiB), a piece at a time."""
    await file.seek(0)
    while piece := await file.read(PIECE):
        yield piece


@router.post(
    "/v1/files",
    response_model=FileObject,
    openapi_extra=_UPLOAD_DOC,
    responses={**answer(doc.FILE), **errors(400, 401, 409, 413, 415, 422, 429, 502, 503)},
)
async def upload_file(request: Request, tenant: Tenant) -> Any:
    """Upload a file (multipart `file`, `purpose`): `batch` input files are kept by moonq,
    `file-extract` documents go to the upstream, which extracts their text."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(
            400, "Send the file as multipart/form-data, with `file` and `purpose`.", param="file"
        )
    form = await request.form(max_files=1, max_fields=16)
    try:
        purpose = _purpose(form)
        file, filename = _upload(form)
        if purpose == extract.PURPOSE:
            return await extract.upload(request, tenant, file, filename)
        files = services(request).files
        if (file.size or 0) > files.max_bytes:
            raise _too_large(files.max_bytes)
        await files.check_room(tenant, file.size or 0)
        return await files.create(tenant, purpose, filename, _pieces(file))
    except FileTooLarge as exc:
        raise _too_large(exc.max_bytes) from exc
    except OverQuota as exc:
        raise _over_quota(exc) from exc
    finally:
        await form.close()


@router.get(
    "/v1/files",
    response_model=FileList,
    responses={**answer(doc.FILE_LIST), **errors(400, 401, 422, 503)},
)
async def list_files(
    request: Request,
    tenant: Tenant,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=128, description="a file id")] = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """The caller's files by creation time (`desc`, newest first, by default)."""
    try:
        data, more = await services(request).files.page(
            tenant, purpose=purpose, after=after, limit=limit, order=order
        )
    except UnknownCursor as exc:
        message = f"`after` is not one of your files (it may be deleted): {shown(after or '')}."
        raise APIError(400, message, param="after") from exc
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return FileList(data=data, has_more=more, first_id=first, last_id=last)


async def _close(stream: AsyncIterator[bytes]) -> None:
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()


@router.get(
    "/v1/files/{file_id}",
    response_model=FileObject,
    responses={**answer(doc.FILE), **errors(*_PROXIED)},
)
async def retrieve_file(file_id: str, request: Request, tenant: Tenant) -> Any:
    """The caller's file (or the upstream's object of its own `file-extract` upload)."""
    virtual = await virtual_file(request, tenant, file_id)
    if virtual is not None:
        await _close(virtual[1])
        return virtual[0]
    found = await services(request).files.get(tenant, file_id)
    if found is not None:
        return found
    return await extract.retrieve(request, tenant, file_id)


async def _guarded(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A store failure after the response started ends it short (the declared length then
    tells the client), never with a traceback."""
    try:
        async for piece in stream:
            yield piece
    except (RedisError, OSError):
        return


@router.get(
    "/v1/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={**answer(doc.FILE_CONTENT, media_type=_BINARY), **errors(*_PROXIED)},
)
async def file_content(file_id: str, request: Request, tenant: Tenant) -> Response:
    """The file's bytes, streamed from Redis (for `file-extract`: the extracted text, as JSON)."""
    virtual = await virtual_file(request, tenant, file_id)
    if virtual is not None:
        return StreamingResponse(_guarded(virtual[1]), media_type=_BINARY)
    files = services(request).files
    found = await files.get(tenant, file_id)
    if found is None:
        return await extract.content(request, tenant, file_id)
    headers = {"Content-Length": str(found.bytes)}
    return StreamingResponse(_guarded(files.read(found.id)), media_type=_BINARY, headers=headers)


@router.delete(
    "/v1/files/{file_id}",
    response_model=FileDeleted,
    responses={**answer(doc.FILE_DELETED), **errors(*_PROXIED)},
)
async def delete_file(file_id: str, request: Request, tenant: Tenant) -> Any:
    """Delete the caller's file (an extracted one upstream too)."""
    if await services(request).files.delete(tenant, file_id):
        return FileDeleted(id=file_id)
    return await extract.delete(request, tenant, file_id)
