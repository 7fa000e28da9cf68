"""`GET /dashboard`: the queue, the account, batches and a job's stream, live in a browser.

The page is three small files and uPlot, vendored (`api/dashboard/`): no build step, nothing
fetched from elsewhere. Its data comes from routes that take the API's bearer keys: a tenant's
key shows that tenant's jobs, batches and usage; a key of MOONQ_ADMIN_KEYS shows every tenant's
and the account-wide figures (`api.auth.Viewer`). The feed is one SSE stream of snapshots, at
most one a second (`api.board`); a job's stream is the job's own event stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, Request, Response
from fastapi.responses import FileResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.staticfiles import StaticFiles

from api.auth import Viewer, Viewing
from api.batches import cancel_as
from api.board import EVERY, Board, Parts, changed, joined
from api.errors import APIError, shown
from api.routes import JOB_ID, events_response
from api.services import services
from moonq.batch_models import Batch
from moonq.models import Job, Status

PAGE = Path(__file__).with_name("dashboard")
# The page runs only its own files: what a job's output holds can never run as script.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_UNAVAILABLE = '{"error":{"type":"service_unavailable","message":"The store is unavailable."}}'

router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=PAGE), name="dashboard-static")


def board(request: Request) -> Board:
    """One per lifespan, like `batch_store`."""
    state, svc = request.app.state, services(request)
    found: Board | None = getattr(state, "board", None)
    if found is None or found.svc is not svc:
        found = state.board = Board(svc)
    return found


@router.get("/dashboard")
async def page() -> FileResponse:
    return FileResponse(PAGE / "index.html", headers=HEADERS)


@router.get("/dashboard/feed")
async def feed(request: Request, viewer: Viewing, status: Status | None = None) -> Response:
    """Snapshots of what the viewer may see, about one a second, until the page goes: the
    first whole, then each with `at`, `viewer`, `filter` and only the fields that changed."""
    return EventSourceResponse(_snapshots(board(request), viewer, status), ping=15, send_timeout=30)


async def _snapshots(
    board: Board, viewer: Viewer, status: Status | None
) -> AsyncIterator[ServerSentEvent]:
    loop = asyncio.get_running_loop()
    sent: Parts = {}
    while True:
        started = loop.time()
        try:
            parts = await board.parts(viewer, status)
        except (RedisError, OSError):
            yield ServerSentEvent(event="feed_error", data=_UNAVAILABLE)
        else:
            yield ServerSentEvent(event="snapshot", data=joined(changed(parts, sent)).decode())
            sent = parts
        await asyncio.sleep(max(0.0, EVERY - (loop.time() - started)))


class JobDetail(Job):
    """The job as `GET /v1/jobs/{id}` shows it, with its tenant and why its last attempt
    before this one ended (the event log tells only of attempts that had streamed)."""

    tenant: str
    last_error: str | None = None


@router.get("/dashboard/jobs/{job_id}")
async def job(job_id: str, request: Request, viewer: Viewing) -> JobDetail:
    """The job with its result, error and attempts: the viewer's own (any, for an admin)."""
    svc = services(request)
    found: tuple[Job, str] | None = None
    last_error: bytes | None = None
    if JOB_ID.match(job_id):
        read = svc.store.read_many([job_id])
        why: Awaitable[bytes | None] = svc.redis.hget(svc.keys.job(job_id), "last_error")  # type: ignore[assignment]
        rows, last_error = await asyncio.gather(read, why)
        found = rows[0]
    if found is None or not viewer.sees(found[1]):
        raise APIError(404, f"No job with id {shown(job_id)}.")
    detail = found[0].model_dump()
    return JobDetail(**detail, tenant=found[1], last_error=last_error and last_error.decode())


@router.get("/dashboard/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    viewer: Viewing,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The job's events, as `GET /v1/jobs/{id}/events` streams them."""
    return await events_response(request, job_id, viewer.tenant, last_event_id)


@router.post("/dashboard/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, viewer: Viewing) -> Batch:
    """Cancel the viewer's batch (any, for an admin), as `POST /v1/batches/{id}/cancel`."""
    return await cancel_as(request, batch_id, viewer.tenant)
