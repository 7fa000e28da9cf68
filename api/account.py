"""The upstream account as clients see it: its limits, what of them is in use, and whether it
is paused for balance (`GET /v1/account`); and prompt token counts for dry runs.

The token count is the one route that calls the upstream from the API: it asks Moonshot's
`tokenizers/estimate-token-count` (the Moonshot key stays server-side) and falls back to
moonq's local estimate where the upstream has no such endpoint, or past a tenant's bound of
upstream calls (`api.estimates`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel

from api import openapi as doc
from api.auth import Tenant
from api.estimates import EstimateGuard, estimate_key
from api.openapi import answer, errors, request_example
from api.services import services
from moonq.account import read_in_use, read_pause
from moonq.limits import local_prompt_tokens
from moonq.models import ChatRequest
from worker.upstream import MoonshotClient


@asynccontextmanager
async def _upstream(app: FastAPI) -> AsyncIterator[None]:
    """One upstream client per API process, for token counts (it remembers an upstream
    without the endpoint and stops asking); closed at shutdown."""
    client = MoonshotClient.from_settings(app.state.services.settings)
    app.state.upstream = client
    app.state.estimates = EstimateGuard()
    try:
        yield
    finally:
        await client.aclose()


router = APIRouter(lifespan=_upstream, tags=["account"])


class AccountLimits(BaseModel):
    """The limits moonq holds every worker to together (0 = no limit)."""

    tier: int
    concurrency: int
    rpm: int
    tpm: int


class AccountInUse(BaseModel):
    permits: int
    requests_last_minute: int
    tokens_last_minute: int


class AccountView(BaseModel):
    object: Literal["account"] = "account"
    paused: bool
    paused_reason: str | None = None
    paused_since: float | None = None
    next_check_at: float | None = None
    limits: AccountLimits
    in_use: AccountInUse


class TokenCount(BaseModel):
    total_tokens: int


class TokenEstimate(BaseModel):
    """Moonshot's answer (`data.total_tokens`: the prompt's tokens), and who counted them."""

    data: TokenCount
    source: Literal["upstream", "local"]


@router.get(
    "/v1/account",
    response_model=AccountView,
    responses={**answer(doc.ACCOUNT), **errors(401, 503)},
)
async def get_account(request: Request, tenant: Tenant) -> AccountView:
    """The account's limits (from `MOONQ_MOONSHOT_TIER` and the overrides), what every worker
    uses of them now, and whether it is paused because the upstream says it is out of balance
    (jobs then wait, queued, until a balance check finds it topped up). Reads only."""
    svc = services(request)
    pause = await read_pause(svc.redis, svc.keys)
    in_use = await read_in_use(svc.redis, svc.keys)
    settings = svc.settings
    limits = AccountLimits(
        tier=settings.moonshot_tier,
        concurrency=settings.upstream_concurrency,
        rpm=settings.upstream_rpm,
        tpm=settings.upstream_tpm,
    )
    return AccountView(
        paused=pause is not None,
        paused_reason=pause.reason if pause else None,
        paused_since=pause.since if pause else None,
        next_check_at=pause.next_check if pause else None,
        limits=limits,
        in_use=AccountInUse(
            permits=in_use.permits,
            requests_last_minute=in_use.requests_last_minute,
            tokens_last_minute=in_use.tokens_last_minute,
        ),
    )


@router.post(
    "/v1/tokenizers/estimate-token-count",
    response_model=TokenEstimate,
    responses={**answer(doc.TOKEN_ESTIMATE), **errors(401, 413, 422, 503)},
    openapi_extra=request_example(chat=doc.CHAT_REQUEST),
)
async def estimate_token_count(
    body: ChatRequest, request: Request, tenant: Tenant
) -> TokenEstimate:
    """A chat request's prompt tokens: the upstream's exact count where it has the endpoint
    (`source: upstream`), else moonq's cautious local estimate (`source: local`). What a job
    counts against MOONQ_UPSTREAM_TPM adds its `max_tokens` (`moonq.limits.estimate_tokens`).
    The upstream's answers are cached, and a tenant past `UPSTREAM_PER_SECOND` upstream calls
    a second gets the local estimate."""
    request_body = body.upstream_body()
    counted = await _upstream_count(request, tenant, request_body)
    if counted is None:
        local = local_prompt_tokens(request_body)
        return TokenEstimate(data=TokenCount(total_tokens=local), source="local")
    return TokenEstimate(data=TokenCount(total_tokens=counted), source="upstream")


async def _upstream_count(request: Request, tenant: str, body: dict[str, Any]) -> int | None:
    """The upstream's count: cached, else asked if the tenant is within its bound."""
    guard: EstimateGuard = request.app.state.estimates
    key = estimate_key(body)
    counted = guard.cached(key)
    if counted is not None or not guard.allow(tenant):
        return counted
    client: MoonshotClient = request.app.state.upstream
    counted = await client.estimate_prompt_tokens(body)
    if counted is not None:
        guard.remember(key, counted)
    return counted
