"""One exception tree for failures of the upstream, mapped from httpx at the boundary.

Whether and when to retry is decided here, in one place, from status, error type and
`Retry-After`; the worker only asks `error.retryable` and `retry_delay()`.
"""

from __future__ import annotations

import json
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class UpstreamError(Exception):
    """The upstream failed this request. `type` and `message` are kept on the failed job."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        type: str = "upstream_error",
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.status_code = status_code
        self.retry_after = retry_after

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        return out


class UpstreamRejected(UpstreamError):
    """A 4xx the same request would get again: invalid request, auth, content filter."""


class UpstreamQuotaExceeded(UpstreamRejected):
    """429 `exceeded_current_quota_error`: the account is out of balance; retrying cannot help."""


class UpstreamRateLimited(UpstreamError):
    """429 `rate_limit_reached_error` or `engine_overloaded_error`: back off and try again."""

    retryable = True


class UpstreamServerError(UpstreamError):
    retryable = True


class UpstreamTimeout(UpstreamError):
    retryable = True


class UpstreamConnectionError(UpstreamError):
    """Could not connect, or the connection broke (also mid-stream)."""

    retryable = True


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not a chat completion stream."""

    retryable = True


_NOT_RETRYABLE_429 = {"exceeded_current_quota_error"}


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_body(text: str) -> tuple[str | None, str | None]:
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None, None
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
        return (str(kind) if kind else None, str(message) if message else None)
    if isinstance(error, str):
        return None, error
    return None, None


def from_response(status: int, text: str, headers: httpx.Headers) -> UpstreamError:
    """Map an upstream HTTP error response to the tree."""
    kind, message = _error_body(text)
    message = message or (text[:500] if text else f"upstream answered HTTP {status}")
    retry_after = parse_retry_after(headers.get("retry-after"))
    cls: type[UpstreamError]
    if status == 429:
        kind = kind or "rate_limit_reached_error"
        cls = UpstreamQuotaExceeded if kind in _NOT_RETRYABLE_429 else UpstreamRateLimited
    elif status == 408:
        cls, kind = UpstreamTimeout, kind or "timeout"
    elif status >= 500:
        cls, kind = UpstreamServerError, kind or "server_error"
    else:
        cls, kind = UpstreamRejected, kind or "invalid_request_error"
    return cls(message, type=kind, status_code=status, retry_after=retry_after)


def from_stream_error(error: Any) -> UpstreamError:
    """An `{"error": ...}` object sent inside the event stream instead of a chunk."""
    if isinstance(error, dict):
        kind = str(error.get("type") or "server_error")
        message = str(error.get("message") or "upstream sent an error mid-stream")
    else:
        kind, message = "server_error", str(error)
    if kind in _NOT_RETRYABLE_429 or kind in ("invalid_request_error", "content_filter"):
        return UpstreamRejected(message, type=kind)
    return UpstreamServerError(message, type=kind)


def from_transport(exc: httpx.TransportError) -> UpstreamError:
    """Map an httpx transport failure; the caller chains it with `from exc`."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout(f"upstream timed out: {detail}", type="timeout")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return UpstreamRejected(f"bad upstream URL: {detail}", type="configuration_error")
    return UpstreamConnectionError(f"upstream connection failed: {detail}", type="connection_error")


def retry_delay(
    error: UpstreamError, attempt: int, *, base: float = 1.0, cap: float = 60.0
) -> float:
    """Exponential backoff with full jitter, never shorter than the upstream's Retry-After."""
    backoff = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
    if error.retry_after is not None:
        return min(max(backoff, error.retry_after), max(cap, error.retry_after))
    return backoff
