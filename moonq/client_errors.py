"""What `moonq.Client` raises: one tree, mapped once from httpx's errors and from the server's
error answers (`{"error": {"message", "type", "param", "code"}}`), each chained `from` its cause.

```
MoonqError
├── ConnectionError        the server could not be reached, or the connection broke
│   ├── Timeout            no answer within the client's timeout
│   └── StreamDropped      an event stream broke off and every reconnection failed
├── APIError               the server answered an error: .status, .type, .message, .param
│   ├── BadRequest         400, 413, 422
│   ├── AuthenticationError 401
│   ├── PermissionDenied   403
│   ├── NotFound           404
│   │   └── RouteNotFound  no such route: MOONQ_URL is not a moonq server's (or an older one)
│   ├── Conflict           409 (e.g. cancelling a job that has ended)
│   ├── RateLimited        429
│   └── ServerError        5xx
├── InvalidResponse        an answer not shaped as the API promises
├── Redirected             the server answered 3xx: MOONQ_URL should be where it points
├── ConfigurationError     the client's own settings cannot be used (nothing was sent)
└── WaitTimeout            `wait_job`'s timeout passed before the job ended
```

Every message is one line, and never holds the API key nor a password in the URL: the text of
an httpx error that may quote the request's headers is not shown.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from moonq.models import Job


class MoonqError(Exception):
    """Everything the moonq client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# Text from a server, made fit for one line of a terminal: escape sequences (colours, cursor
# moves, window titles) go, other control characters become spaces.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#]*)@")
NOTE_LIMIT = 200  # characters of a non-JSON error answer kept as its message
MESSAGE_LIMIT = 1000  # characters of the server's own error message


def printable(text: str) -> str:
    """`text` without terminal escape sequences, its control characters as spaces."""
    return _CONTROLS.sub(" ", _ESCAPES.sub("", text))


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` printable, on one line, its runs of whitespace one space, at most `limit` long."""
    line = _SPACES.sub(" ", printable(text)).strip()
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def shown_url(url: str) -> str:
    """`url` as messages show it: a password in it (`http://user:pw@host`) becomes ***."""

    def hide(found: re.Match[str]) -> str:
        user, colon, _ = found.group(2).partition(":")
        return f"{found.group(1)}{user}{':***' if colon else ''}@"

    return _USERINFO.sub(hide, url)


class ConnectionError(MoonqError):  # shadows the builtin on purpose, as requests' does
    """The server could not be reached, or the connection broke before its answer."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = shown_url(url)
        self.reason = reason
        super().__init__(f"cannot reach the moonq server at {self.url} ({reason})")


class Timeout(ConnectionError):
    """The server took longer than the client's timeout to answer."""


class StreamDropped(ConnectionError):
    """An event stream broke off, and reconnecting after its last event failed every time."""


class InvalidResponse(MoonqError):
    """An answer not shaped as the API promises (not JSON, or not the model it should be)."""


class Redirected(MoonqError):
    """The server answered with a redirect (3xx): moonq's API is elsewhere, and MOONQ_URL
    should say where. The client follows no redirect, so the key is never sent on to a host
    it was not meant for."""

    def __init__(self, url: str, status: int, location: str, base: str | None) -> None:
        where = (
            f"set MOONQ_URL (or --url) to {base}" if base else "point MOONQ_URL (or --url) at it"
        )
        super().__init__(f"the server at {url} redirected ({status}) to {location}: {where}")
        self.url, self.status, self.location, self.base = url, status, location, base


class ConfigurationError(MoonqError):
    """The client's own settings cannot be used: an API key holding a control character,
    whitespace or a non-ASCII character (a key file with Windows line endings). Nothing was
    sent."""


class WaitTimeout(MoonqError):
    """`wait_job` gave up before the job ended; `job` is the job as last seen."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.id} is still {job.status.value} after {timeout:g} s")
        self.job = job


class APIError(MoonqError):
    """The server refused the request: its HTTP status and its error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.body = body

    def __str__(self) -> str:
        return f"{self.status} {self.type or 'error'}: {self.message}"


class BadRequest(APIError):
    """400, 413 or 422: the request itself is wrong; sending it again will not help."""


class AuthenticationError(APIError):
    """401: the API key is missing or not one the server knows."""


class PermissionDenied(APIError):
    """403."""


class NotFound(APIError):
    """404: no such job, batch or file for this API key (another tenant's looks the same)."""


class RouteNotFound(NotFound):
    """404 for the route itself, not for a job or file: the server at MOONQ_URL is not a
    moonq server (or MOONQ_URL holds a path too many), or it is an older one without the
    route. `url` is the request's (its password hidden)."""

    url: str = ""


class Conflict(APIError):
    """409: the request conflicts with the resource's state (e.g. it has already ended)."""


class RateLimited(APIError):
    """429; `retry_after` is the server's `Retry-After` in seconds, when it gave one."""

    retry_after: float | None = None


class ServerError(APIError):
    """5xx: the server failed; the same request may succeed later."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    422: BadRequest,
    429: RateLimited,
}


def _error_object(response: httpx.Response) -> tuple[Any, dict[str, Any]]:
    """The answer's JSON (None if it is not JSON) and its `error` object ({} without one)."""
    try:
        body = response.json()
    except ValueError:
        return None, {}
    error = body.get("error") if isinstance(body, dict) else None
    return body, error if isinstance(error, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _note(response: httpx.Response) -> str:
    """What a non-JSON error answer says, in one short line: an HTML page's <title> (a
    proxy's error page), a short text as it is, else the status's reason phrase."""
    text = response.text
    kind = response.headers.get("content-type", "")
    if "html" in kind or text.lstrip().startswith("<"):
        title = _TITLE.search(text[:65536])
        text = html.unescape(title.group(1)) if title else ""
    return one_line(text, NOTE_LIMIT) or response.reason_phrase or f"HTTP {response.status_code}"


def _message(response: httpx.Response, body: Any, error: dict[str, Any]) -> str:
    detail = body.get("detail") if isinstance(body, dict) else None  # FastAPI's own shape
    said = _text(error.get("message")) or _text(detail)
    return one_line(said) if said and said.strip() else _note(response)


def _is_route(response: httpx.Response, error: dict[str, Any], message: str) -> bool:
    """A 404 for the path itself (a framework's bare "Not Found", or no error object at all),
    not for a job or file: those name what is missing."""
    return response.status_code == 404 and (not error or message.lower() == "not found")


def api_error(response: httpx.Response) -> APIError:
    """The `APIError` subclass an error answer stands for; its body must have been read."""
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    body, error = _error_object(response)
    message = _message(response, body, error)
    if _is_route(response, error, message):
        kind = RouteNotFound
    found = kind(
        status,
        message,
        type=_text(error.get("type")),
        param=_text(error.get("param")),
        code=_text(error.get("code")),
        body=body,
    )
    if isinstance(found, RateLimited):
        found.retry_after = _seconds(response.headers.get("retry-after"))
    if isinstance(found, RouteNotFound):
        found.url = shown_url(str(response.request.url))
    return found


def redirected(response: httpx.Response, base_url: str) -> MoonqError:
    """The error for a 3xx answer to a request sent to the server at `base_url`: where it
    points, and the server's address there when the route is kept (`http://` to `https://`)."""
    location = response.headers.get("location")
    if not location:
        return InvalidResponse(f"the server answered {response.status_code} with no Location")
    try:
        target = response.request.url.join(location)
    except httpx.InvalidURL:
        return InvalidResponse(f"the server answered {response.status_code} to a bad Location")
    route = response.request.url.path.removeprefix(httpx.URL(base_url).path.rstrip("/"))
    base = None
    if route and target.path.endswith(route):
        base = str(target.copy_with(path=target.path.removesuffix(route) or "/", query=None))
    shown = shown_url(str(target.copy_with(query=None, fragment=None)))
    return Redirected(
        shown_url(base_url), response.status_code, shown, base and shown_url(base).rstrip("/")
    )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def from_httpx(exc: httpx.HTTPError | httpx.InvalidURL, url: str) -> MoonqError:
    """The client's error for one of httpx's; the caller raises it `from exc`."""
    if isinstance(exc, httpx.DecodingError | httpx.TooManyRedirects):
        return InvalidResponse(f"the server's answer could not be read: {reason(exc)}")
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(url, f"no answer in time: {type(exc).__name__}")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ConnectionError(url, f"not an http:// or https:// URL: {reason(exc)}")
    return ConnectionError(url, reason(exc))


def reason(exc: BaseException) -> str:
    """An exception's text for a message; only its class name where the text may quote the
    request's headers (h11's "Illegal header value b'Bearer sk-...'"), and so the key."""
    if isinstance(exc, httpx.LocalProtocolError | UnicodeError):
        return f"the request could not be sent ({type(exc).__name__})"
    return one_line(str(exc), NOTE_LIMIT) or type(exc).__name__
