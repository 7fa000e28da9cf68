"""The door check of per-tenant budgets (moonq/budgets.py): 429 in OpenAI's shape, naming the
budget and when it resets, before anything of the submission is written."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import Request

from api.errors import APIError
from api.services import services
from moonq.batch_input import Line, Report
from moonq.budgets import Hold, NeverFits, OverBudget, budget_completion
from moonq.limits import completion_budget, estimate_tokens


def _refusal(exc: OverBudget, now: float) -> APIError:
    if isinstance(exc, NeverFits):  # no wait helps: the request's own size is the problem
        return APIError(400, exc.message, type="invalid_request_error", code=exc.budget)
    # OpenAI's own types: a request rate is `rate_limit_error`, spent money `insufficient_quota`.
    kind = "rate_limit_error" if exc.budget == "requests_per_minute" else "insufficient_quota"
    retry_after = str(max(1, math.ceil(exc.resets_at - now)))
    return APIError(
        429,
        exc.message,
        type=kind,
        code=exc.budget,
        headers={"Retry-After": retry_after},
        resets_at=int(exc.resets_at),
    )


def _demand(body: dict[str, Any]) -> tuple[str, int, int]:
    """(model, prompt, completion) tokens a request is held to."""
    prompt = estimate_tokens(body) - completion_budget(body)
    return str(body.get("model", ""))[:256], prompt, budget_completion(body)


def _cost(request: Request, model: str, prompt: int, completion: int) -> float:
    price = services(request).ledger.price(model)
    return price.cost(prompt, completion) if price is not None else 0.0


async def _hold(request: Request, tenant: str, tokens: int, cost: float) -> Hold | None:
    svc = services(request)
    try:
        return await svc.budgets.admit(tenant, tokens, cost)
    except OverBudget as exc:
        raise _refusal(exc, svc.budgets.clock()) from exc


async def hold_job(request: Request, tenant: str, body: dict[str, Any]) -> Hold | None:
    """Refuse a job its tenant's budgets have no room for, or hold its estimate until it ends
    (None: the tenant has no budget to hold against)."""
    model, prompt, completion = _demand(body)
    return await _hold(
        request, tenant, prompt + completion, _cost(request, model, prompt, completion)
    )


async def release(request: Request, tenant: str, hold: Hold | None) -> None:
    """Give back the hold of a submission that made no new job (a replay, a failure)."""
    if hold is not None:
        await services(request).budgets.release(tenant, hold)


def batch_admission(request: Request, tenant: str) -> Any:
    """What BatchStore.create calls once the whole file is valid: the batch counts as one
    request holding every line's estimate, so it is accepted whole or not at all. Returns
    what each line's record holds (given back as the line ends), or None without a budget."""

    async def admit(report: Report) -> Callable[[Line], str] | None:
        tokens = sum(prompt + completion for prompt, completion in report.demand.values())
        cost = sum(_cost(request, m, p, c) for m, (p, c) in report.demand.items())
        hold = await _hold(request, tenant, tokens, cost)
        if hold is None:
            return None

        def line_hold(line: Line) -> str:
            model, prompt, completion = _demand(line.body)
            return hold.part(prompt + completion, _cost(request, model, prompt, completion)).field

        return line_hold

    return admit
