"""Every error leaves the API in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with the status the OpenAI SDK maps to its own exception classes; never as a stack trace."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from moonq.models import MAX_JSON_DEPTH

log = logging.getLogger("moonq.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


_SEQ = re.compile(r"^[0-9]{1,15}$")


def shown(value: str, limit: int = 64) -> str:
    """A client's value, quoted for a message and cut short."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def last_event_id(value: str | None) -> int:
    """The seq a `Last-Event-ID` header resumes after (0 without one); 422 for anything but a
    whole number."""
    if not value or not value.strip():
        return 0
    if not _SEQ.fullmatch(value.strip()):
        raise APIError(
            422,
            f"Last-Event-ID must be the `id:` of an event received: a whole number from 0 "
            f"(got {shown(value, 20)}).",
            param="Last-Event-ID",
        )
    return int(value)


def resume_from(after: int, last: int, ended: bool, what: str) -> bool:
    """Whether a stream resumed after event `after` has nothing left to send (`what`, a job or
    a batch, has ended with event `last`: answer 204, which stops an EventSource); 400 naming
    `last_seq` for a resume past its last event."""
    if after > last:
        raise APIError(
            400,
            f"Last-Event-ID {after} is past this {what}'s last event (seq {last}); "
            f"reconnect without it to read the {what} from the start.",
            param="Last-Event-ID",
            last_seq=last,
        )
    return bool(after) and after == last and ended


class APIError(HTTPException):
    """An error with a moonq error type; raise it from routes and dependencies."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.type = type or _TYPES.get(status_code, "api_error")
        self.extra = extra


class _ErrorJSON(JSONResponse):
    """Renders any message, even one quoting a client's lone surrogate, as valid JSON."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), default=str).encode()


def error_body(message: str, type: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's error object: `message`, `type`, `param` and `code` always (null when there is
    none, as OpenAI sends them), then moonq's extras (`errors`, `job_id`, ...)."""
    param, code = extra.pop("param", None), extra.pop("code", None)
    return {"message": message, "type": type, "param": param, "code": code, **extra}


def error_response(
    status: int,
    message: str,
    type: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = error_body(message, type or _TYPES.get(status, "api_error"), **extra)
    return _ErrorJSON({"error": body}, status_code=status, headers=dict(headers or {}))


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


_NOT_AN_OBJECT = (
    "The request must be a JSON object with a `body` field (the chat completion request), "
    'like {"body": {"model": ..., "messages": [...]}}'
)
_NO_OBJECT = frozenset({"model_attributes_type", "missing"})
# Routes whose body is not a job submission: what they expect instead.
_SHAPES = {
    "/v1/chat/completions": (
        "The request must be a JSON object: a chat completion request, "
        'like {"model": ..., "messages": [...]}'
    ),
    "/v1/tokenizers/estimate-token-count": (
        'The request must be a JSON object: {"model": ..., "messages": [...]}'
    ),
    "/v1/batches": (
        'The request must be a JSON object: {"input_file_id": ..., "endpoint": '
        '"/v1/chat/completions", "completion_window": "24h"}'
    ),
}


def _whole_body_message(request: Request, exc: RequestValidationError) -> str | None:
    """A message for a request that is not a job submission at all, or None."""
    errors = exc.errors()
    unwrapped = any(e.get("loc") == ("body", "body") and e.get("type") == "missing" for e in errors)
    if unwrapped and isinstance(exc.body, dict) and {"model", "messages"} & exc.body.keys():
        return (
            "The request must be a JSON object with a `body` field; this looks like a chat "
            'completion request without it: send it wrapped, as {"body": <your request>}.'
        )
    if not any(e.get("loc") == ("body",) and e.get("type") in _NO_OBJECT for e in errors):
        return None
    expected = _SHAPES.get(request.url.path, _NOT_AN_OBJECT)
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type.lower():
        shown = repr(content_type) if content_type else "none"
        return f"{expected}, sent with Content-Type: application/json (got {shown})."
    return expected + "."


def _malformed(exc: RequestValidationError, error: dict[str, Any]) -> JSONResponse:
    doc, loc = exc.body, tuple(error.get("loc", ()))
    reason = error.get("ctx", {}).get("error", "")
    if isinstance(doc, str | bytes) and len(loc) == 2 and isinstance(loc[1], int):
        pos = loc[1]
        text = doc[:pos].decode(errors="replace") if isinstance(doc, bytes) else doc[:pos]
        line = text.count("\n") + 1
        column = pos - text.rfind("\n")
        reason = f"{reason} at line {line}, column {column} (char {pos})"
    return error_response(422, f"Malformed JSON body: {reason}.")


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return _malformed(exc, first)
    whole = _whole_body_message(request, exc)
    if whole is not None:
        return error_response(422, whole, param="body")
    if first.get("type") == "invalid_json_value":  # the model names the exact place
        ctx = first["ctx"]
        details = [{"param": ctx["param"], "message": ctx["reason"]}]
        return error_response(422, str(first["msg"]), param=ctx["param"], errors=details)
    param = _field(tuple(first.get("loc", ())))
    details = [{"param": _field(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors]
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(422, message, param=param, errors=details)


# FastAPI answers these with a bare "There was an error parsing the body".
_PARSE_ERRORS: dict[type[BaseException], str] = {
    UnicodeDecodeError: "the body is not valid UTF-8",
    ValueError: f"a number has more than {sys.get_int_max_str_digits()} digits",
    RecursionError: f"objects and arrays nest deeper than {MAX_JSON_DEPTH} levels",
}


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return error_response(exc.status_code, str(exc.detail), exc.type, exc.headers, **exc.extra)
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None and type(cause) in _PARSE_ERRORS:
        return error_response(422, f"Malformed JSON body: {_PARSE_ERRORS[type(cause)]}.")
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _redis(request: Request, exc: RedisError) -> JSONResponse:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return error_response(
        503, "The job store is unavailable; try again shortly.", headers={"Retry-After": "1"}
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "Internal error.", "api_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(RedisError, _redis)  # type: ignore[arg-type]
    app.add_exception_handler(OSError, _redis)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


class OpenAIRoute(APIRoute):
    """For the routes of OpenAI's API: a request the route cannot take is a 400, as OpenAI
    answers it (the SDK's `BadRequestError`), in the app's own error shape; `POST /v1/jobs`
    keeps its 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except (RequestValidationError, HTTPException) as exc:
                if isinstance(exc, APIError):  # moonq's own refusals keep their status
                    raise
                return await _as_400(request, exc)

        return handler


async def _as_400(request: Request, exc: Exception) -> Response:
    """The app's answer to a body it could not parse or validate, with OpenAI's status."""
    kind = next(k for k in type(exc).__mro__ if k in request.app.exception_handlers)
    answer: Response = await request.app.exception_handlers[kind](request, exc)
    if answer.status_code == 422:
        answer.status_code = 400
    return answer
