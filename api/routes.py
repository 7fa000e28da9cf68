"""The `/v1/jobs` routes and health checks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Tenant
from api.errors import APIError
from api.services import services
from moonq.models import Job, JobCreate, JobList, Status
from moonq.store import AlreadyFinished, IdempotencyConflict, UnknownCursor
from moonq.stream import RawEvent, follow

router = APIRouter()

_JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
_SEQ = re.compile(r"^[0-9]{1,15}$")


async def _own_job(request: Request, job_id: str, tenant: str) -> Job:
    """The caller's job; any other tenant's job is indistinguishable from a missing one."""
    job = None
    if _JOB_ID.match(job_id):
        job = await services(request).store.get(job_id, tenant)
    if job is None:
        raise APIError(404, f"No job with id {job_id!r}.")
    return job


@router.post("/v1/jobs", status_code=202, response_model=Job, tags=["jobs"])
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
    try:
        job, replayed = await services(request).store.create(tenant, payload, idempotency_key)
    except IdempotencyConflict as exc:
        raise APIError(
            422,
            "This Idempotency-Key was used for a different request within 24 h.",
            type="idempotency_error",
            param="Idempotency-Key",
        ) from exc
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.post("/v1/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"])
async def cancel_job(job_id: str, request: Request, tenant: Tenant) -> Job:
    """Cancel a queued or running job. A running job stops within a second, keeping the
    content it had streamed as a partial result. A job that already ended is a 409."""
    job = None
    try:
        if _JOB_ID.match(job_id):
            job = await services(request).store.cancel(job_id, tenant)
    except AlreadyFinished as exc:
        raise APIError(409, f"Job {job_id!r} has already ended.") from exc
    if job is None:
        raise APIError(404, f"No job with id {job_id!r}.")
    return job


@router.get("/v1/jobs", response_model=JobList, tags=["jobs"])
async def list_jobs(
    request: Request,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="a job id: list older jobs")] = None,
    status: Status | None = None,
) -> JobList:
    """The caller's own jobs, newest first."""
    try:
        jobs, more = await services(request).store.list_jobs(
            tenant, limit=limit, after=after, status=status
        )
    except UnknownCursor as exc:
        message = f"`after` is not one of your jobs (it may have expired): {after!r}."
        raise APIError(400, message, param="after") from exc
    return JobList(data=jobs, has_more=more)


@router.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"])
async def get_job(
    job_id: str,
    request: Request,
    tenant: Tenant,
    wait: Annotated[
        float, Query(ge=0, description="long-poll: seconds to wait for a terminal status")
    ] = 0,
) -> Job:
    """The job; with `wait`, answers as soon as it ends or after `wait` seconds (capped)."""
    job = await _own_job(request, job_id, tenant)
    timeout = min(wait, services(request).settings.max_wait)
    if job.status.terminal or timeout <= 0:
        return job
    return await _wait_terminal(request, job, tenant, timeout)


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
            await _until_terminal_event(queue, min(remaining, 1.0))


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
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: Tenant,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Server-Sent Events: every event of the job from the start (or after `Last-Event-ID`),
    then live, ending after the terminal event. `id:` is the event's seq; `data:` is the event
    exactly as published on the job's channel."""
    job = await _own_job(request, job_id, tenant)
    after = 0
    if last_event_id:
        if not _SEQ.fullmatch(last_event_id.strip()):
            raise APIError(
                422, "Last-Event-ID must be an event seq (an integer).", param="Last-Event-ID"
            )
        after = int(last_event_id)
    return EventSourceResponse(_sse(request, job, after), ping=15)


async def _sse(request: Request, job: Job, after: int) -> AsyncIterator[ServerSentEvent]:
    svc = services(request)
    try:
        async for event in follow(svc.redis, svc.hub, svc.keys, job.id, after=after):
            yield ServerSentEvent(data=event.raw.decode(), id=str(event.seq))
    except (RedisError, OSError):
        # The response has started: report the failure as an event, never raise.
        message = "The job store became unavailable; reconnect with Last-Event-ID to resume."
        yield ServerSentEvent(
            event="stream_error",
            data='{"error":{"type":"service_unavailable","message":"' + message + '"}}',
        )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    """Ready when Redis answers."""
    try:
        await asyncio.wait_for(services(request).redis.ping(), 2.0)
    except (RedisError, OSError, TimeoutError):
        return JSONResponse(
            {
                "status": "unavailable",
                "error": {"type": "service_unavailable", "message": "Redis is not reachable."},
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok"})
