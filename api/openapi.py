"""What /docs shows beyond the routes' own models: the error shape every route answers with,
and examples of requests and answers.

Routers pass `errors(...)` (or `ERRORS`, every status an error handler can send) as their
routes' `responses=`; `install` then gives any route that still lacks them the statuses every
route can answer (401 behind a key, 422 for its parameters, 503 with Redis away), so a new
router is documented truthfully before its author adds a line.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema


class ErrorDetail(BaseModel):
    """OpenAI's error object; some errors add fields (`errors`, `last_seq`, `resets_at` ...)."""

    model_config = ConfigDict(extra="allow")
    message: str = Field(description="what went wrong, and what to do about it")
    type: str = Field(description="the kind of error, e.g. `invalid_request_error`")
    param: str | None = Field(description="the parameter or field at fault, if one is")
    code: str | None = Field(description="a finer reason, if there is one")


class ErrorResponse(BaseModel):
    """Every error the API answers, whatever its status."""

    error: ErrorDetail


def _error(message: str, type: str, param: str | None = None, code: str | None = None) -> Any:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_CATALOGUE: dict[int, tuple[str, Any]] = {
    400: (
        "The request is well-formed but cannot be served as asked.",
        _error(
            "Unknown query parameter(s): 'stauts'; known: after, batch_id, custom_id, limit, "
            "status.",
            "invalid_request_error",
            "stauts",
        ),
    ),
    401: (
        "No API key, or one not in MOONQ_API_KEYS.",
        _error(
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            "authentication_error",
        ),
    ),
    404: (
        "Nothing of yours by that id (another tenant's looks the same).",
        _error("No job with id 'job_9f2c0e7d5a8b4c1e9f2c0e7d5a8b4c1e'.", "not_found_error"),
    ),
    409: (
        "The resource is not in a state that allows this.",
        _error("Job 'job_9f2c0e7d5a8b4c1e9f2c0e7d5a8b4c1e' has already ended.", "conflict_error"),
    ),
    413: (
        "The body is larger than MOONQ_MAX_BODY_BYTES (uploads: MOONQ_MAX_FILE_BYTES).",
        _error(
            "The request body is larger than 8388608 bytes (MOONQ_MAX_BODY_BYTES).",
            "request_too_large",
        ),
    ),
    415: (
        "The upstream refused the document's type (`file-extract`).",
        _error("The upstream refused the file: unsupported file type", "api_error"),
    ),
    422: (
        "The body or a parameter does not validate; `param` names it.",
        _error("body.messages: Field required", "invalid_request_error", "body.messages"),
    ),
    429: (
        "A rate or budget limit: see `Retry-After`.",
        _error(
            "The upstream is rate limiting file requests; try again shortly.",
            "rate_limit_error",
        ),
    ),
    502: (
        "The upstream failed a request proxied to it.",
        _error("The upstream file service failed (HTTP 500).", "upstream_error"),
    ),
    503: (
        "Redis is unreachable: retry after `Retry-After` seconds.",
        _error("The job store is unavailable; try again shortly.", "service_unavailable"),
    ),
    504: (
        "The job ran past its time (`job_timeout`).",
        _error("The upstream stream took longer than MOONQ_JOB_TIMEOUT.", "job_timeout"),
    ),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the error statuses a route can answer, with the real body shape."""
    found: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, example = _CATALOGUE[status]
        found[status] = {
            "model": ErrorResponse,
            "description": description,
            "content": {"application/json": {"example": example}},
        }
    return found


# Every status moonq's error handlers send; for a router whose routes may answer any of them.
ERRORS = errors(*_CATALOGUE)


def answer(example: Any, status: int = 200, media_type: str = "application/json") -> Any:
    """`responses=` entry giving a route's successful answer an example."""
    return {status: {"content": {media_type: {"example": example}}}}


def request_example(**examples: Any) -> dict[str, Any]:
    """`openapi_extra=` giving a JSON request body named examples."""
    named = {name: {"value": value} for name, value in examples.items()}
    return {"requestBody": {"content": {"application/json": {"examples": named}}}}


_ALWAYS_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})


def _complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Give every operation the error statuses any route can answer, in the real shape."""
    reference = {"$ref": "#/components/schemas/ErrorResponse"}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, found = models_json_schema(
        [(ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}"
    )
    for name, definition in found["$defs"].items():
        components.setdefault(name, definition)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            needed = {"422"} & operation["responses"].keys()  # FastAPI's own shape, replaced
            if operation.get("security"):
                needed.add("401")
            if path not in _ALWAYS_OPEN:
                needed.add("503")
            for status in needed:
                _set_error(operation["responses"], status, reference)
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    return schema


def _set_error(responses: dict[str, Any], status: str, reference: dict[str, str]) -> None:
    current = responses.get(status, {}).get("content", {}).get("application/json", {})
    if current.get("schema") == reference:
        return
    description, example = _CATALOGUE[int(status)]
    responses[status] = {
        "description": description,
        "content": {"application/json": {"schema": reference, "example": example}},
    }


def install(app: FastAPI) -> None:
    """FastAPI's schema of the app, completed once, when /openapi.json is first asked for."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _complete(generate())  # FastAPI keeps what it generated: completed in place
        return generate()

    app.openapi = openapi  # type: ignore[method-assign]


# Examples /docs shows; ids and times are made up, shapes are real.

_JOB_ID = "job_9f2c0e7d5a8b4c1e9f2c0e7d5a8b4c1e"
_USAGE = {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}
CHAT_REQUEST = {
    "model": "moonshot-v1-8k",
    "messages": [{"role": "user", "content": "Summarise: ..."}],
}
JOB_CREATE = {
    "body": CHAT_REQUEST,
    "custom_id": "doc-42",
    "metadata": {"batch": "november"},
}
JOB_QUEUED = {
    "id": _JOB_ID,
    "object": "job",
    "status": "queued",
    "created_at": 1795632800.12,
    "started_at": None,
    "completed_at": None,
    "attempts": 0,
    "model": "moonshot-v1-8k",
    "custom_id": "doc-42",
    "metadata": {"batch": "november"},
    "batch_id": None,
    "channel": f"moonq:events:{_JOB_ID}",
    "result": None,
    "usage": None,
    "error": None,
    "waiting_reason": None,
}
JOB_COMPLETED = {
    **JOB_QUEUED,
    "status": "completed",
    "started_at": 1795632800.19,
    "completed_at": 1795632801.02,
    "attempts": 1,
    "result": {
        "id": "chatcmpl-5f0e",
        "object": "chat.completion",
        "created": 1795632800,
        "model": "moonshot-v1-8k",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The report says ..."},
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
    },
    "usage": _USAGE,
}
JOB_CANCELLED = {**JOB_QUEUED, "status": "cancelled", "completed_at": 1795632800.5}
JOB_LIST = {"object": "list", "data": [JOB_COMPLETED], "has_more": False}
JOB_EVENTS = (
    'id: 1\ndata: {"seq":1,"event":"chunk","attempt":1,"data":{"id":"chatcmpl-5f0e",'
    '"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"The"}}]}}\n\n'
    'id: 2\ndata: {"seq":2,"event":"done","attempt":1,"data":{"object":"chat.completion"}}\n\n'
)
_FILE_ID = "file-7c1b3f9e0d2a4b6c8e1f3a5b"
FILE = {
    "id": _FILE_ID,
    "object": "file",
    "bytes": 1824,
    "created_at": 1795632700,
    "filename": "requests.jsonl",
    "purpose": "batch",
    "status": "processed",
    "expires_at": None,
    "status_details": None,
}
FILE_LIST = {
    "object": "list",
    "data": [FILE],
    "has_more": False,
    "first_id": _FILE_ID,
    "last_id": _FILE_ID,
}
FILE_DELETED = {"id": _FILE_ID, "object": "file", "deleted": True}
FILE_CONTENT = (
    '{"custom_id": "doc-1", "method": "POST", "url": "/v1/chat/completions", '
    '"body": {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hi"}]}}\n'
)
_BATCH_ID = "batch_4e5d6c7b8a9f0e1d2c3b4a59"
BATCH_CREATE = {
    "input_file_id": _FILE_ID,
    "endpoint": "/v1/chat/completions",
    "completion_window": "24h",
    "metadata": {"project": "q3"},
}
BATCH = {
    "id": _BATCH_ID,
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "errors": None,
    "input_file_id": _FILE_ID,
    "completion_window": "24h",
    "status": "in_progress",
    "output_file_id": f"file-{_BATCH_ID}-output",
    "error_file_id": f"file-{_BATCH_ID}-errors",
    "created_at": 1795632710,
    "in_progress_at": 1795632710,
    "expires_at": 1795719110,
    "finalizing_at": None,
    "completed_at": None,
    "failed_at": None,
    "expired_at": None,
    "cancelling_at": None,
    "cancelled_at": None,
    "request_counts": {"total": 3, "completed": 1, "failed": 0, "cancelled": 0, "expired": 0},
    "metadata": {"project": "q3"},
    "usage": _USAGE,
}
BATCH_CANCELLING = {**BATCH, "status": "cancelling", "cancelling_at": 1795632720}
BATCH_LIST = {
    "object": "list",
    "data": [BATCH],
    "first_id": _BATCH_ID,
    "last_id": _BATCH_ID,
    "has_more": False,
}
BATCH_EVENTS = (
    'id: 1\ndata: {"seq":1,"event":"line","data":{"custom_id":"doc-1","job_id":"job_…",'
    '"status":"completed","request_counts":{"total":3,"completed":1,"failed":0}}}\n\n'
)
ACCOUNT = {
    "object": "account",
    "paused": False,
    "paused_reason": None,
    "paused_since": None,
    "next_check_at": None,
    "limits": {"tier": 1, "concurrency": 50, "rpm": 200, "tpm": 2000000},
    "in_use": {"permits": 3, "requests_last_minute": 41, "tokens_last_minute": 18250},
}
TOKEN_ESTIMATE = {"data": {"total_tokens": 12}, "source": "upstream"}
READY = {"status": "ok", "account": {"paused": False, "reason": None}}
NOT_READY = {
    "status": "unavailable",
    "error": {"type": "service_unavailable", "message": "Redis is not reachable."},
}
