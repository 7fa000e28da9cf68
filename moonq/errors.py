"""One exception tree for failures of the upstream, mapped from httpx at the boundary.

Whether and when to retry is decided here, in one place, from status, error type and
`Retry-After`; the worker only asks `error.retryable` and `retry_delay()`.
"""

from __future__ import annotations

import json
import math
import random
import re
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
    """429 `exceeded_current_quota_error` (or a 403 that says so): the account is out of
    balance; retrying cannot help."""


class UpstreamInvalidAnswer(UpstreamError):
    """The upstream answered, but with something moonq cannot record (a usage that is not
    token counts): the same request would likely get the same answer, so it is not retried."""


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


# Moonshot's error types, by what a retry can do about them.
_BY_TYPE: dict[str, type[UpstreamError]] = {
    "rate_limit_reached_error": UpstreamRateLimited,
    "engine_overloaded_error": UpstreamRateLimited,
    "exceeded_current_quota_error": UpstreamQuotaExceeded,
    "invalid_request_error": UpstreamRejected,
    "content_filter": UpstreamRejected,
    "invalid_authentication_error": UpstreamRejected,
    "permission_denied_error": UpstreamRejected,
    "resource_not_found_error": UpstreamRejected,
    "server_error": UpstreamServerError,
}


def _by_status(status: int) -> tuple[type[UpstreamError], str]:
    if status == 429:
        return UpstreamRateLimited, "rate_limit_reached_error"
    if status == 408:
        return UpstreamTimeout, "timeout"
    if status >= 500:
        return UpstreamServerError, "server_error"
    return UpstreamRejected, "invalid_request_error"


# Some of Moonshot's docs answer an account out of balance with a 403: known by its words.
_QUOTA_WORDS = re.compile(r"balance|quota|insufficient|suspended", re.IGNORECASE)


def _says_quota(kind: str | None, message: str | None) -> bool:
    return any(_QUOTA_WORDS.search(text) for text in (kind, message) if text)


def classify(
    kind: str | None, status: int | None, message: str | None = None
) -> tuple[type[UpstreamError], str]:
    """The class for an upstream error: by Moonshot's type when known, else by HTTP status; a
    403 whose type or message speaks of balance or quota is the account's, like the 429."""
    if status == 403 and _says_quota(kind, message):
        return UpstreamQuotaExceeded, kind or "exceeded_current_quota_error"
    if kind in _BY_TYPE:
        return _BY_TYPE[kind], kind
    if status is None:
        return UpstreamServerError, kind or "server_error"
    cls, default = _by_status(status)
    if status == 429 and kind:
        cls = UpstreamRateLimited  # an unknown 429 type: back off rather than give up
    return cls, kind or default


MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta or HTTP date), clamped to [0, 1 h]."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


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
    if status >= 500 and kind in _BY_TYPE and not _BY_TYPE[kind].retryable:
        kind = None  # a 5xx is the server's fault, whatever its body says
    cls, kind = classify(kind, status, message)
    return cls(message, type=kind, status_code=status, retry_after=retry_after)


def from_stream_error(error: Any) -> UpstreamError:
    """An `{"error": ...}` object sent inside the event stream instead of a chunk."""
    kind, message = None, str(error)
    if isinstance(error, dict):
        kind = str(error["type"]) if error.get("type") else None
        message = str(error.get("message") or "upstream sent an error mid-stream")
    cls, kind = classify(kind, None)
    return cls(message, type=kind)


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
