"""`GET /v1/usage`: the caller's tokens, jobs and estimated cost by UTC day and model."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.auth import Tenant
from api.errors import APIError, shown
from api.openapi import errors
from api.services import services
from moonq.store import utc_day
from moonq.usage import MAX_DAYS
from moonq.usage_models import UsageReport

router = APIRouter()

DEFAULT_DAYS = 30
_PARAMS = frozenset({"start", "end"})
_DAY = Annotated[
    str | None, Query(max_length=10, description="a UTC day, YYYY-MM-DD", examples=["2026-11-01"])
]


def _day(value: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value) if len(value) == 10 else _bad_day(value, name)
    except ValueError:
        return _bad_day(value, name)


def _bad_day(value: str, name: str) -> dt.date:
    raise APIError(
        400, f"`{name}` must be a UTC day as YYYY-MM-DD (got {shown(value)}).", param=name
    )


def _range(request: Request, start: str | None, end: str | None) -> tuple[dt.date, dt.date]:
    unknown = sorted(set(request.query_params) - _PARAMS)
    if unknown:
        raise APIError(
            400,
            f"Unknown query parameter(s): {', '.join(map(shown, unknown))}; known: end, start.",
            param=unknown[0][:64],
        )
    last = (
        _day(end, "end")
        if end
        else dt.date.fromisoformat(utc_day(services(request).ledger.clock()))
    )
    try:
        first = _day(start, "start") if start else last - dt.timedelta(days=DEFAULT_DAYS - 1)
    except OverflowError as exc:  # the default start falls before year 1
        raise APIError(400, "The range starts before year 1; give `start`.", param="start") from exc
    if first > last:
        raise APIError(400, f"`start` ({first}) is after `end` ({last}).", param="start")
    if (last - first).days >= MAX_DAYS:
        raise APIError(
            400,
            f"The range covers more than {MAX_DAYS} days; ask for a shorter one.",
            param="start",
        )
    return first, last


@router.get("/v1/usage", response_model=UsageReport, tags=["usage"], responses=errors(400))
async def get_usage(
    request: Request, tenant: Tenant, start: _DAY = None, end: _DAY = None
) -> UsageReport:
    """The caller's usage by UTC day and model from `start` to `end` (inclusive; by default
    the last 30 days): completed jobs, prompt/completion/total/cached tokens, and the cost
    estimated from the price table (MOONQ_PRICES over Moonshot's published prices). Each
    completed job counts once, on the day it completed, whatever its retries; the counts
    outlive the jobs (MOONQ_USAGE_RETENTION_DAYS)."""
    first, last = _range(request, start, end)
    return await services(request).ledger.report(tenant, first, last)
