"""The `/v1/batches` routes, as the OpenAI SDK speaks them, plus a progress feed (SSE) and the
batch's output and error files, readable while it runs."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import openapi as doc
from api.auth import Tenant
from api.budgets import batch_admission
from api.errors import APIError, OpenAIRoute, resume_from, shown
from api.errors import last_event_id as parse_last_event_id
from api.openapi import answer, errors, request_example
from api.services import services
from api.sse import EventStream
from moonq.batch_input import ENDPOINT, Limits, TooManyLines
from moonq.batch_models import BATCH_ID, BadWindow, Batch, BatchList, NotCancellable
from moonq.batches import BatchStore
from moonq.files import FileObject
from moonq.serde import dumps
from moonq.stream import TERMINAL_STATUSES, follow_record

router = APIRouter(tags=["batches"])

_OUTPUT_FILE = re.compile(r"^file-(batch_[0-9a-f]{24})-(output|errors)$")


class BatchCreate(BaseModel):
    """What `client.batches.create(...)` sends."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: StrictStr = Field(max_length=256)
    endpoint: StrictStr = Field(max_length=256)
    completion_window: StrictStr = Field("24h", max_length=16)
    metadata: (
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None
    ) = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = Field(
        None, description="accepted for the SDK's sake; moonq's files follow MOONQ_RESULT_TTL"
    )


def batch_store(request: Request) -> BatchStore:
    """One per lifespan: an app started again (tests do) must not keep the closed client."""
    state, store = request.app.state, services(request).store
    found: BatchStore | None = getattr(state, "batches", None)
    if found is None or found.jobs is not store:
        found = state.batches = BatchStore(store)
    return found


async def _own_batch(request: Request, batch_id: str, tenant: str) -> Batch:
    batch = await batch_store(request).get(batch_id, tenant)
    if batch is None:
        raise APIError(404, f"No batch with id {shown(batch_id)}.")
    return batch


# `client.batches.create(...)`: a body it cannot take is a 400, as OpenAI answers it.
create_router = APIRouter(tags=["batches"], route_class=OpenAIRoute)


@create_router.post(
    "/v1/batches",
    response_model=Batch,
    responses={**answer(doc.BATCH), **errors(400, 401, 404, 413, 429, 503)},
    openapi_extra=request_example(batch=doc.BATCH_CREATE),
)
async def create_batch(payload: BatchCreate, request: Request, tenant: Tenant) -> Batch:
    """Validate the input file and run every line as a job. A file with bad lines makes a
    `failed` batch whose `errors.data` lists each one by line number; nothing runs."""
    svc = services(request)
    if payload.endpoint != ENDPOINT:
        raise APIError(400, f"endpoint must be '{ENDPOINT}'.", param="endpoint")
    found = await svc.files.get(tenant, payload.input_file_id)
    if found is None:
        raise APIError(
            404, f"No file with id {shown(payload.input_file_id)}.", param="input_file_id"
        )
    if found.purpose != "batch":
        raise APIError(
            400, "The input file must be uploaded with purpose 'batch'.", param="input_file_id"
        )
    settings = svc.settings
    limits = Limits(settings.batch_max_lines, settings.max_body_bytes, settings.upstream_tpm)
    try:
        return await batch_store(request).create(
            tenant,
            found.id,
            lambda: svc.files.lines(found.id, max_line=limits.max_line_bytes),
            window=payload.completion_window,
            metadata=payload.metadata,
            limits=limits,
            admit=batch_admission(request, tenant),
        )
    except BadWindow as exc:
        raise APIError(400, str(exc), param="completion_window") from exc
    except TooManyLines as exc:
        raise APIError(
            400,
            f"The file holds more than {limits.max_lines} requests (MOONQ_BATCH_MAX_LINES).",
            param="input_file_id",
        ) from exc


@router.get(
    "/v1/batches/{batch_id}",
    response_model=Batch,
    responses={**answer(doc.BATCH), **errors(401, 404, 503)},
)
async def retrieve_batch(batch_id: str, request: Request, tenant: Tenant) -> Batch:
    """The batch, with its counts and usage as of now."""
    return await _own_batch(request, batch_id, tenant)


@router.get(
    "/v1/batches",
    response_model=BatchList,
    responses={**answer(doc.BATCH_LIST), **errors(400, 401, 422, 503)},
)
async def list_batches(
    request: Request,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="a batch id")] = None,
) -> BatchList:
    """The caller's batches, newest first."""
    try:
        return await batch_store(request).page(tenant, after=after, limit=limit)
    except LookupError as exc:
        raise APIError(
            400, f"`after` is not one of your batches: {shown(after or '')}.", param="after"
        ) from exc


@router.post(
    "/v1/batches/{batch_id}/cancel",
    response_model=Batch,
    responses={**answer(doc.BATCH_CANCELLING), **errors(401, 404, 409, 503)},
)
async def cancel_batch(batch_id: str, request: Request, tenant: Tenant) -> Batch:
    """Lines not started never run, running ones stop; the batch ends `cancelled` with true
    counts once its last line has. A batch that already ended is a 409."""
    return await cancel_as(request, batch_id, tenant)


async def cancel_as(request: Request, batch_id: str, tenant: str | None) -> Batch:
    """Cancel the tenant's batch (`tenant` None: whoever's it is, for the admin's
    dashboard); 404 if it is not theirs, 409 if it already ended."""
    batches = batch_store(request)
    if tenant is None and BATCH_ID.match(batch_id):
        tenant = await batches.tenant_of(batch_id)
    try:
        batch = await batches.cancel(batch_id, tenant) if tenant is not None else None
    except NotCancellable as exc:
        raise APIError(409, f"Batch {shown(batch_id)} has already ended.") from exc
    if batch is None:
        raise APIError(404, f"No batch with id {shown(batch_id)}.")
    return batch


@router.get(
    "/v1/batches/{batch_id}/events",
    response_class=EventSourceResponse,
    responses={
        **answer(doc.BATCH_EVENTS, media_type="text/event-stream"),
        **errors(401, 404, 422, 503),
    },
)
async def batch_events(
    batch_id: str,
    request: Request,
    tenant: Tenant,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Progress as Server-Sent Events: a `line` event as each line ends (its `custom_id`,
    job id, outcome and the counts so far), then `done` with the final batch object. Replays
    from the start, or after `Last-Event-ID`."""
    batch = await _own_batch(request, batch_id, tenant)
    after = parse_last_event_id(last_event_id)
    if after:
        svc = services(request)
        seq = await svc.redis.hget(svc.keys.batch(batch.id), "seq")  # type: ignore[misc]
        if resume_from(after, int(seq or 0), batch.status in TERMINAL_STATUSES, "batch"):
            return Response(status_code=204)
    return EventStream(_progress(request, batch, tenant, after), ping=15)


async def _progress(
    request: Request, batch: Batch, tenant: str, after: int
) -> AsyncIterator[ServerSentEvent | bytes]:
    svc = services(request)
    k = svc.keys
    feed = follow_record(
        svc.redis,
        svc.hub,
        k.batch(batch.id),
        k.batch_log(batch.id),
        k.batch_channel(batch.id),
        after,
    )
    try:
        async for events in feed:
            end = events[-1] if events[-1].terminal else None
            if end is not None:
                events = events[:-1]
            if events:
                yield b"".join(event.sse() for event in events)
            if end is not None:
                final = await batch_store(request).get(batch.id, tenant) or batch
                data = {"seq": end.seq, "event": end.event, "data": final.model_dump()}
                yield ServerSentEvent(data=dumps(data), id=str(end.seq))
                return
        if batch.status == "failed":  # failed validation: it never had a line
            data = {"seq": 0, "event": "done", "data": batch.model_dump()}
            yield ServerSentEvent(data=dumps(data), id="0")
    except (RedisError, OSError):
        message = "The store became unavailable; reconnect with Last-Event-ID to resume."
        yield ServerSentEvent(
            event="stream_error",
            data=dumps({"error": {"type": "service_unavailable", "message": message}}),
        )


async def output_file(
    request: Request, tenant: str, file_id: str
) -> tuple[FileObject, AsyncIterator[bytes]] | None:
    """A batch's output or error file: every line over so far, produced from its jobs."""
    match = _OUTPUT_FILE.match(file_id)
    if match is None:
        return None
    batch = await batch_store(request).get(match[1], tenant)
    if batch is None or batch.output_file_id is None:
        return None
    purpose = "batch_output"
    name = f"{batch.id}_{'output' if match[2] == 'output' else 'error'}.jsonl"
    found = FileObject(
        id=file_id, bytes=0, created_at=batch.created_at, filename=name, purpose=purpose
    )
    return found, batch_store(request).results(batch.id, match[2])
