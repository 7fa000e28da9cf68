"""What each call of the moonq client sends and how its answer is read, without any I/O: the
synchronous and the asynchronous client send the same `Call`s, so neither can drift."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from moonq.batch_models import Batch, BatchList
from moonq.client_errors import ConfigurationError, InvalidResponse
from moonq.files import FileObject
from moonq.models import ChatRequest, Job, JobList, Status
from moonq.usage_models import UsageReport

DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0
CHAT_ENDPOINT = "/v1/chat/completions"
POLL_FLOOR = 1.0  # seconds at least between long-polls, however soon the server answers

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
# What `upload_file` takes: the bytes, a path, or an open binary file.
Upload = bytes | str | os.PathLike[str] | IO[bytes]
Day = dt.date | str


def server_url(url: str | None) -> str:
    """The server: `url`, else MOONQ_URL, else http://localhost:8000. A trailing `/v1` (the
    `base_url` an OpenAI SDK is given) is dropped: the client's paths start with it."""
    return (url or os.environ.get("MOONQ_URL") or DEFAULT_URL).rstrip("/").removesuffix("/v1")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The bearer header for `api_key`, else MOONQ_API_KEY; none for an open server. A key
    that cannot be a header is refused here, naming where it came from but not the key."""
    key = api_key or os.environ.get("MOONQ_API_KEY")
    if not key:
        return {}
    bad = next((i for i, char in enumerate(key) if not "!" <= char <= "~"), None)
    if bad is not None:
        where = "the api_key argument (--api-key)" if api_key else "MOONQ_API_KEY"
        raise ConfigurationError(
            f"the API key from {where} holds {key[bad]!a} at character {bad + 1} of {len(key)}:"
            " a key is printable ASCII, without spaces or line endings (was it read from a file"
            " with its line ending?)"
        )
    return {"Authorization": f"Bearer {key}"}


def timeout(seconds: float, wait: float = 0.0) -> httpx.Timeout:
    """A read timeout that outlasts a long-poll of `wait` seconds."""
    return httpx.Timeout(seconds + wait, connect=CONNECT_TIMEOUT)


def model(kind: type[M]) -> Callable[[httpx.Response], M]:
    """A reader of answers that must be a `kind`."""

    def read(response: httpx.Response) -> M:
        try:
            return kind.model_validate_json(response.content)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(map(str, first["loc"])) or "the answer"
            raise InvalidResponse(
                f"the server's answer is not a {kind.__name__} ({where}: {first['msg']})"
            ) from exc

    return read


def content(response: httpx.Response) -> bytes:
    return response.content


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, and how its answer is read."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes | IO[bytes]]] | None = None
    data: dict[str, str] | None = None
    wait: float = 0.0  # seconds the server may hold the answer back (a long-poll)

    def options(self, seconds: float) -> dict[str, Any]:
        """`httpx.Client.request`'s keyword arguments, beside the method and path."""
        found: dict[str, Any] = {"timeout": timeout(seconds, self.wait)}
        for name in ("params", "json", "headers", "files", "data"):
            value = getattr(self, name)
            if value:
                found[name] = value
        return found


def _id(value: str) -> str:
    """An id as one path segment, whatever it holds."""
    return quote(value, safe="")


def _present(**params: Any) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


# Jobs


def create_job(
    body: Mapping[str, Any] | ChatRequest,
    custom_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Call[Job]:
    chat = body.upstream_body() if isinstance(body, ChatRequest) else dict(body)
    payload = {"body": chat, **_present(custom_id=custom_id, metadata=metadata)}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call("POST", "/v1/jobs", model(Job), json=payload, headers=headers)


def get_job(job_id: str, wait: float | None = None) -> Call[Job]:
    params = {"wait": wait} if wait else {}
    return Call("GET", f"/v1/jobs/{_id(job_id)}", model(Job), params=params, wait=wait or 0.0)


def cancel_job(job_id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{_id(job_id)}/cancel", model(Job))


def jobs_page(
    limit: int = 20,
    after: str | None = None,
    status: Status | str | None = None,
    custom_id: str | None = None,
    batch_id: str | None = None,
) -> Call[JobList]:
    params = _present(
        limit=limit, after=after, status=status, custom_id=custom_id, batch_id=batch_id
    )
    return Call("GET", "/v1/jobs", model(JobList), params=params)


def job_events_path(job_id: str) -> str:
    return f"/v1/jobs/{_id(job_id)}/events"


def next_after(page: JobList | BatchList) -> str | None:
    """The cursor of the page after `page`; None when it was the last."""
    return page.data[-1].id if page.has_more and page.data else None


# Usage


def _day(value: Day | None) -> str | None:
    return value.isoformat() if isinstance(value, dt.date) else value


def usage(start: Day | None = None, end: Day | None = None) -> Call[UsageReport]:
    """UTC days, inclusive; the server's default range (the last 30 days) without them."""
    params = _present(start=_day(start), end=_day(end))
    return Call("GET", "/v1/usage", model(UsageReport), params=params)


# Files and batches


def _named(file: Upload, filename: str | None) -> tuple[str, bytes | IO[bytes]]:
    if isinstance(file, bytes):
        return filename or "upload.jsonl", file
    if isinstance(file, str | os.PathLike):
        path = Path(file)
        return filename or path.name, path.read_bytes()
    return filename or Path(str(getattr(file, "name", "upload.jsonl"))).name, file


def upload_file(
    file: Upload, purpose: str = "batch", filename: str | None = None
) -> Call[FileObject]:
    files = {"file": _named(file, filename)}
    return Call("POST", "/v1/files", model(FileObject), files=files, data={"purpose": purpose})


def file_content_path(file_id: str) -> str:
    return f"/v1/files/{_id(file_id)}/content"


def file_content(file_id: str) -> Call[bytes]:
    return Call("GET", file_content_path(file_id), content)


def delete_file(file_id: str) -> Call[bytes]:
    return Call("DELETE", f"/v1/files/{_id(file_id)}", content)


def create_batch(
    input_file_id: str,
    completion_window: str = "24h",
    metadata: Mapping[str, str] | None = None,
    endpoint: str = CHAT_ENDPOINT,
) -> Call[Batch]:
    payload = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": completion_window,
        **_present(metadata=dict(metadata) if metadata is not None else None),
    }
    return Call("POST", "/v1/batches", model(Batch), json=payload)


def get_batch(batch_id: str) -> Call[Batch]:
    return Call("GET", f"/v1/batches/{_id(batch_id)}", model(Batch))


def cancel_batch(batch_id: str) -> Call[Batch]:
    return Call("POST", f"/v1/batches/{_id(batch_id)}/cancel", model(Batch))


def batches_page(limit: int = 20, after: str | None = None) -> Call[BatchList]:
    return Call("GET", "/v1/batches", model(BatchList), params=_present(limit=limit, after=after))


def batch_events_path(batch_id: str) -> str:
    return f"/v1/batches/{_id(batch_id)}/events"


# Waiting


class Deadline:
    """How long `wait_job` may still wait; `None` waits for ever."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seconds = seconds
        self.at = None if seconds is None else clock() + seconds
        self.polled = clock()
        self.floor = 0.0

    def _left(self, seconds: float) -> float:
        return seconds if self.at is None else max(0.0, min(seconds, self.at - self.clock()))

    def next_wait(self, poll: float) -> float:
        """Seconds the next long-poll may wait: `poll`, or what is left if less."""
        self.polled, self.floor = self.clock(), self._left(POLL_FLOOR)
        return self._left(poll)

    def rest(self) -> float:
        """Seconds to pause after a long-poll that answered without the job ending: each lasts
        at least POLL_FLOOR (or what was left), so a server that answers at once (MOONQ_MAX_WAIT
        of 0, a proxy dropping `?wait`) is not asked again and again in a tight loop."""
        return max(0.0, self.floor - (self.clock() - self.polled))

    @property
    def passed(self) -> bool:
        return self.at is not None and self.clock() >= self.at
