"""Admission of one chat completion job, the same for `POST /v1/jobs` and the OpenAI drop-in:
the refusals at the door (a request that could never run, a spent budget), then the job."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from api.budgets import hold_job, release
from api.errors import APIError
from api.services import services
from moonq.limits import estimate_tokens, local_prompt_tokens
from moonq.models import Job, JobCreate
from moonq.store import IdempotencyConflict


async def admit(
    request: Request,
    tenant: str,
    payload: JobCreate,
    idempotency_key: str | None,
    *,
    drop_in: bool = False,
) -> tuple[Job, bool]:
    """Create the job (ahead of batch lines); returns it and whether it is an earlier job
    replayed for the same `idempotency_key`. `drop_in`: the client sent the chat request
    itself (`POST /v1/chat/completions`), so a refusal names its fields, not `body`."""
    check_tokens(request, payload, drop_in=drop_in)
    store = services(request).store
    replay = idempotency_key is not None and await store.replayed_job(tenant, idempotency_key)
    # A replay is no new work: it is answered whatever the budgets say now.
    hold = None if replay else await hold_job(request, tenant, payload.body.upstream_body())
    try:
        job, replayed = await store.create(
            tenant, payload, idempotency_key, None if hold is None else hold.field
        )
    except IdempotencyConflict as exc:
        await release(request, tenant, hold)
        raise APIError(
            422,
            "This Idempotency-Key was used for a different request within 24 h.",
            type="idempotency_error",
            param="Idempotency-Key",
        ) from exc
    except BaseException:
        await asyncio.shield(release(request, tenant, hold))
        raise
    if replayed:  # another request with the key made the job meanwhile
        await release(request, tenant, hold)
    return job, replayed


async def is_replay(request: Request, tenant: str, idempotency_key: str | None) -> bool:
    """Whether this submission only replays a job its Idempotency-Key already made."""
    if idempotency_key is None:
        return False
    return await services(request).store.replayed_job(tenant, idempotency_key) is not None


def check_tokens(request: Request, payload: JobCreate, *, drop_in: bool = False) -> None:
    """A request larger than the account's whole TPM budget could never be given a permit."""
    tpm = services(request).settings.upstream_tpm
    body = payload.body.upstream_body()
    tokens = estimate_tokens(body)
    if tpm > 0 and tokens > tpm:
        estimate = str(tokens) if tokens < 10**15 else "more than 10^15"  # a 4000-digit max_tokens
        raise APIError(
            400,
            f"This request is estimated at {estimate} tokens (prompt characters / 3 + "
            f"max_tokens), more than MOONQ_UPSTREAM_TPM ({tpm} tokens per minute) allows: "
            "it could never run.",
            param=too_large_part(body, tpm) if drop_in else "body",
        )


def too_large_part(body: dict[str, Any], tpm: int) -> str:
    """The field to lower: the prompt when it alone passes the budget (no `max_tokens` could
    make it fit), else the completion budget the request asked for."""
    if local_prompt_tokens(body) > tpm:
        return "messages"
    return "max_tokens" if body.get("max_tokens") else "max_completion_tokens"
