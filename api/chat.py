"""OpenAI's `POST /v1/chat/completions` (and `GET /v1/models`) in front of the queue, so that
switching the OpenAI SDK to moonq is a `base_url` change. Each request is an ordinary job,
admitted as `POST /v1/jobs` admits one, and answered as OpenAI answers (api/chat_relay.py);
the job keeps running, and its result stays fetchable, whatever happens to the connection."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, StrictBool, model_validator

from api import chat_relay, model_list
from api.admission import admit, is_replay
from api.auth import Tenant
from api.errors import APIError, OpenAIRoute
from api.openapi import ErrorResponse, errors
from api.services import services
from moonq.account import paused_reason
from moonq.models import ChatRequest, Job, JobCreate, strict_json

JOB_HEADER = "X-Moonq-Job-Id"
# How this one answer is delivered, not what the job asks the upstream: moonq always streams
# from the upstream, and reports usage to the client itself.
_DELIVERY = ("stream", "stream_options")


router = APIRouter(route_class=OpenAIRoute)
router.include_router(model_list.router)  # the SDK's `models.list()` belongs to the drop-in


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class ChatCompletionRequest(ChatRequest):
    """The request as the OpenAI SDK sends it. What JSON cannot carry (`NaN`, lone surrogates,
    nesting past 64 levels) is refused by name before pydantic turns it into something else;
    `stream` is a JSON boolean (`"true"`, a string, would otherwise quietly not stream)."""

    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _strict_json(cls, data: Any) -> Any:
        return strict_json(data)


@router.post(
    "/v1/chat/completions",
    tags=["openai"],
    responses={
        200: {"content": {"text/event-stream": {}, "application/json": {}}},
        # the job's own failure keeps the upstream's status (a 401 of its key: 502)
        **errors(400, 404, 409, 413, 429, 502, 504),
        "5XX": {"description": "The upstream failed", "model": ErrorResponse},
    },
)
async def chat_completions(
    payload: ChatCompletionRequest,
    request: Request,
    tenant: Tenant,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="the same key within 24 h answers from the first job"),
    ] = None,
) -> Response:
    """A chat completion, queued as a job (its id in `X-Moonq-Job-Id`) and answered as OpenAI
    answers: a `chat.completion`, or with `"stream": true` an SSE stream of chunks."""
    _refuse_options_without_stream(payload)
    asked = payload.upstream_body()
    job_body = ChatRequest.model_validate({k: v for k, v in asked.items() if k not in _DELIVERY})
    job, replayed = await _admit(request, tenant, JobCreate(body=job_body), idempotency_key)
    # From here on the job exists: every answer names it, and tells the SDK not to retry (its
    # retry would be a new job while this one runs on).
    headers = {JOB_HEADER: job.id, "x-should-retry": "false"}
    headers |= {"Idempotent-Replayed": "true"} if replayed else {}
    try:
        return await _answer(request, job, tenant, asked, headers)
    except Exception as exc:
        return chat_relay.failed_answer(exc, job.id, headers)


def _refuse_options_without_stream(payload: ChatCompletionRequest) -> None:
    """OpenAI refuses `stream_options` on an answer that is not streamed (they would say
    nothing); so does moonq, rather than quietly dropping what the client asked for."""
    if payload.stream_options is not None and payload.stream is not True:
        raise APIError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


async def _answer(
    request: Request, job: Job, tenant: str, asked: dict[str, Any], headers: dict[str, str]
) -> Response:
    svc = services(request)
    if asked.get("stream") is True:
        include_usage = _include_usage(asked)
        return await chat_relay.stream_answer(svc, job, tenant, include_usage, headers)
    return await chat_relay.completion_answer(svc, job, tenant, headers, request.is_disconnected)


async def _admit(
    request: Request, tenant: str, payload: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Create the job as `POST /v1/jobs` does (the same refusals, the same queue, ahead of
    batch lines); returns it and whether it is an earlier job replayed for the key."""
    if not await is_replay(request, tenant, idempotency_key):  # a replay is answered anyway
        await _refuse_while_paused(request)
    return await admit(request, tenant, payload, idempotency_key, drop_in=True)


async def _refuse_while_paused(request: Request) -> None:
    """An account out of balance runs nothing until it is topped up: a client waiting on the
    line would time out and retry into duplicate jobs, so it is told at once, as OpenAI
    tells an account out of quota (`POST /v1/jobs` still queues: its callers poll)."""
    svc = services(request)
    reason = await paused_reason(svc.redis, svc.keys)
    if reason is not None:
        raise APIError(
            429,
            "The upstream account is out of balance: moonq runs no request until it is topped up.",
            type="insufficient_quota",
            code="exceeded_current_quota_error",
            headers={"Retry-After": "60", "x-should-retry": "false"},
        )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
