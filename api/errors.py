"""Every error leaves the API as `{"error": {"type", "message"}}`, never as a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

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


def error_response(
    status: int,
    message: str,
    type: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": type or _TYPES.get(status, "api_error"), "message": message, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return error_response(
            422, f"Malformed JSON body: {first.get('ctx', {}).get('error', '')}", param=None
        )
    param = _field(tuple(first.get("loc", ())))
    details = [{"param": _field(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors]
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(422, message, param=param, errors=details)


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return error_response(exc.status_code, str(exc.detail), exc.type, exc.headers, **exc.extra)
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
