"""The `/v1/jobs` routes and health checks."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import openapi as doc
from api.admission import admit
from api.auth import Tenant
from api.errors import APIError, resume_from, shown
from api.errors import last_event_id as parse_last_event_id
from api.openapi import answer, errors, request_example
from api.services import services
from api.sse import EventStream
from moonq.account import WAITING_REASON, paused_reason
from moonq.listing import JobLister, UnknownCursor
from moonq.models import Job, JobCreate, JobList, Status
from moonq.store import AlreadyFinished
from moonq.stream import RawEvent, follow_batches, gap_before

log = logging.getLogger("moonq.api")

router = APIRouter()

JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
# A long-poll reads the job again at least this often, in case pub/sub missed its end; the
# terminal event itself wakes it at once.
REREAD_EVERY = 1.0
_LIST_PARAMS = frozenset({"limit", "after", "status", "custom_id", "batch_id"})


async def _own_job(request: Request, job_id: str, tenant: str) -> Job:
    """The caller's job; any other tenant's job is indistinguishable from a missing one."""
    job = None
    if JOB_ID.match(job_id):
        job = await services(request).store.get(job_id, tenant)
    if job is None:
        raise APIError(404, f"No job with id {shown(job_id)}.")
    return job


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=Job,
    tags=["jobs"],
    responses={**answer(doc.JOB_QUEUED, 202), **errors(400, 401, 413, 422, 429, 503)},
    openapi_extra=request_example(job=doc.JOB_CREATE),
)
async def create_job(
    payload: JobCreate,
    request: Request,
    response: Response,
    tenant: Tenant,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="the same key within 24 h returns the first job"),
    ] = None,
) -> Job:
    """Queue a chat completion. The job streams from the upstream as soon as a worker is free."""
    job, replayed = await admit(request, tenant, payload, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=Job,
    tags=["jobs"],
    responses={**answer(doc.JOB_CANCELLED), **errors(401, 404, 409, 503)},
)
async def cancel_job(job_id: str, request: Request, tenant: Tenant) -> Job:
    """Cancel a queued or running job. A running job stops within a second, keeping the
    content it had streamed as a partial result. A job that already ended is a 409."""
    job = None
    try:
        if JOB_ID.match(job_id):
            job = await services(request).store.cancel(job_id, tenant)
    except AlreadyFinished as exc:
        raise APIError(409, f"Job {shown(job_id)} has already ended.") from exc
    if job is None:
        raise APIError(404, f"No job with id {shown(job_id)}.")
    return job


def _once(request: Request, names: Iterable[str]) -> None:
    """A parameter given twice (`?wait=1&wait=60`) would be read as its last value alone,
    silently: a 400 naming it instead, as for an unknown one."""
    for name in names:
        count = len(request.query_params.getlist(name))
        if count > 1:
            raise APIError(
                400, f"Query parameter {name!r} is given {count} times; give it once.", param=name
            )


def _known_params(request: Request) -> None:
    _once(request, sorted(_LIST_PARAMS))
    unknown = sorted(set(request.query_params) - _LIST_PARAMS)
    if unknown:
        names = ", ".join(shown(name) for name in unknown)
        allowed = ", ".join(sorted(_LIST_PARAMS))
        raise APIError(
            400, f"Unknown query parameter(s): {names}; known: {allowed}.", param=unknown[0][:64]
        )


@router.get(
    "/v1/jobs",
    response_model=JobList,
    tags=["jobs"],
    responses={**answer(doc.JOB_LIST), **errors(400, 401, 422, 503)},
)
async def list_jobs(
    request: Request,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="a job id: list older jobs")] = None,
    status: Status | None = None,
    custom_id: Annotated[str | None, Query(max_length=512)] = None,
    batch_id: Annotated[str | None, Query(max_length=256)] = None,
) -> JobList:
    """The caller's own jobs, newest first, optionally only those of a status, a `custom_id`
    or a batch. Unknown parameters are a 400, so a misspelt filter never lists everything."""
    _known_params(request)
    try:
        jobs, more = await JobLister(services(request).store).page(
            tenant, limit=limit, after=after, status=status, custom_id=custom_id, batch_id=batch_id
        )
    except UnknownCursor as exc:
        message = f"`after` is not one of your jobs (it may have expired): {shown(after or '')}."
        raise APIError(400, message, param="after") from exc
    return JobList(data=jobs, has_more=more)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=Job,
    tags=["jobs"],
    responses={**answer(doc.JOB_COMPLETED), **errors(400, 401, 404, 422, 503)},
)
async def get_job(
    job_id: str,
    request: Request,
    tenant: Tenant,
    wait: Annotated[
        float,
        Query(
            ge=0,
            allow_inf_nan=False,
            description="long-poll: seconds to wait for a terminal status (MOONQ_MAX_WAIT at most)",
        ),
    ] = 0,
) -> Job:
    """The job; with `wait`, answers as soon as it ends or after `wait` seconds (capped)."""
    _once(request, ["wait"])
    job = await _own_job(request, job_id, tenant)
    timeout = min(wait, services(request).settings.max_wait)
    if not job.status.terminal and timeout > 0:
        job = await _wait_terminal(request, job, tenant, timeout)
    if job.status == Status.QUEUED:  # say why it does not start, if the account is paused
        svc = services(request)
        if await paused_reason(svc.redis, svc.keys) is not None:
            job.waiting_reason = WAITING_REASON
    return job


async def _wait_terminal(request: Request, job: Job, tenant: str, timeout: float) -> Job:
    svc = services(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with svc.hub.listen(job.channel) as queue:
        while True:
            current = await svc.store.get(job.id, tenant)
            remaining = deadline - loop.time()
            if current is None or current.status.terminal or remaining <= 0:
                return current or job
            await _until_terminal_event(queue, min(remaining, REREAD_EVERY))


async def _until_terminal_event(queue: asyncio.Queue[bytes], timeout: float) -> None:
    """Return on a terminal event or after `timeout`; the record is then read again."""
    try:
        async with asyncio.timeout(timeout):
            while not RawEvent.parse(await queue.get()).terminal:
                pass
    except TimeoutError:
        return


@router.get(
    "/v1/jobs/{job_id}/events",
    tags=["jobs"],
    response_class=EventSourceResponse,
    responses={
        **answer(doc.JOB_EVENTS, media_type="text/event-stream"),
        204: {"description": "The job had ended at `Last-Event-ID`: nothing more will come."},
        **errors(400, 401, 404, 422, 503),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: Tenant,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Server-Sent Events: every event of the job from the start (or after `Last-Event-ID`),
    then live, ending after the terminal event. `id:` is the event's seq; `data:` is the event
    exactly as published on the job's channel.

    A `Last-Event-ID` at the end of a job that has ended is answered 204 No Content, which
    tells an EventSource to stop reconnecting; one past the job's last event is a 400."""
    return await events_response(request, job_id, tenant, last_event_id)


async def events_response(
    request: Request, job_id: str, tenant: str | None, last_event_id: str | None
) -> Response:
    """A job's events as SSE (`tenant` None: any tenant's job, for the admin's dashboard)."""
    last, ended = await _own_position(request, job_id, tenant)
    after = parse_last_event_id(last_event_id)
    if resume_from(after, last, ended, "job"):
        return Response(status_code=204)
    return EventStream(_sse(request, job_id, after, live=not ended), ping=15)


async def _own_position(request: Request, job_id: str, tenant: str | None) -> tuple[int, bool]:
    """The caller's job's last seq and whether it has ended, in one read (a stream needs no
    more of the record); 404 as `_own_job` answers it."""
    svc = services(request)
    owner, status, seq = None, None, None
    if JOB_ID.match(job_id):
        fields = ["tenant", "status", "seq"]
        owner, status, seq = await svc.redis.hmget(svc.keys.job(job_id), fields)  # type: ignore[misc]
    if owner is None or status is None or tenant not in (None, owner.decode()):
        raise APIError(404, f"No job with id {shown(job_id)}.")
    return int(seq or 0), Status(status.decode()).terminal


async def _sse(
    request: Request, job_id: str, after: int, *, live: bool = True
) -> AsyncIterator[ServerSentEvent | bytes]:
    svc = services(request)
    try:
        follower = follow_batches(svc.redis, svc.hub, svc.keys, job_id, after=after, live=live)
        async for events in follower:
            gap = gap_before(job_id, events, after)
            if gap is not None:  # the log was trimmed past events this reader never had
                events = [gap, *events]
            after = events[-1].seq
            yield b"".join(event.sse() for event in events)  # those at hand: one write
    except (RedisError, OSError) as exc:
        # The response has started: report the failure as an event, never raise.
        log.warning("job %s: its stream ended on a Redis error (%s)", job_id, type(exc).__name__)
        message = "The job store became unavailable; reconnect with Last-Event-ID to resume."
        yield ServerSentEvent(
            event="stream_error",
            data='{"error":{"type":"service_unavailable","message":"' + message + '"}}',
        )


@router.get("/healthz", tags=["health"], responses=answer({"status": "ok"}))
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    responses={
        **answer(doc.READY),
        503: {
            "description": "Redis is not reachable.",
            "content": {"application/json": {"example": doc.NOT_READY}},
        },
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Ready when Redis answers. An account paused for balance is still ready (the API takes
    jobs, which wait): `account` says so, for a monitor to alert on."""
    svc = services(request)
    try:
        async with asyncio.timeout(2.0):
            await svc.redis.ping()
            reason = await paused_reason(svc.redis, svc.keys)
    except (RedisError, OSError, TimeoutError):
        return JSONResponse(
            {
                "status": "unavailable",
                "error": {"type": "service_unavailable", "message": "Redis is not reachable."},
            },
            status_code=503,
        )
    account = {"paused": reason is not None, "reason": reason}
    return JSONResponse({"status": "ok", "account": account})
