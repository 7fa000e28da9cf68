"""The moonq server as `moonq batch` sees it: files, batches, jobs, the token estimate, through
`moonq.client.Client`, which knows each call and maps every HTTP failure to its exception tree.

Those exceptions are mapped here, once, to a `CliError` carrying the exit code the command ends
with, so no command shows a traceback and each kind of failure has its own code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

import httpx

from moonq import client_calls as calls
from moonq.client import Client as ApiClient
from moonq.client_calls import DEFAULT_URL, Call
from moonq.client_errors import (
    APIError,
    AuthenticationError,
    ConfigurationError,
    ConnectionError,
    InvalidResponse,
    MoonqError,
    NotFound,
    Redirected,
    RouteNotFound,
)
from moonq.client_errors import StreamDropped as ApiStreamDropped

__all__ = [
    "DEFAULT_URL",
    "CliError",
    "Client",
    "EmptyDocument",
    "ExitCode",
    "StreamDropped",
    "Unextractable",
]

JSON = dict[str, Any]
# No tokenizer on this server (or none upstream): the caller estimates locally instead.
NO_ESTIMATE = frozenset({404, 405, 501, 502, 503, 504})
# What the server answers for a document that cannot be extracted (api/extract.py passes the
# upstream's refusal on): that document's failure, not the run's.
DOCUMENT_REFUSED = frozenset({400, 404, 409, 413, 415, 422})


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # argparse's own
    UNREACHABLE = 3
    AUTH = 4
    NOT_FOUND = 5
    INVALID = 6
    NO_DOCUMENTS = 7
    SOME_FAILED = 8
    INTERRUPTED = 130


class CliError(Exception):
    """A failure the command reports in one line (plus `details`) and exits on."""

    def __init__(
        self, message: str, code: ExitCode = ExitCode.ERROR, details: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or []


class Unextractable(CliError):
    """The server could not extract one document's text; the others go on."""

    error_code = "file_extract_failed"  # on its `failed` line of the results file
    label = "cannot extract"  # in the dry run's table

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.INVALID)


class EmptyDocument(Unextractable):
    """A document with no text: asking about nothing would pay for an answer to a prompt
    alone, so it is not sent, and is a `failed` line the user sees."""

    error_code = "empty_document"
    label = "not sent"


class StreamDropped(Exception):
    """The event stream broke off before its last event; the caller resumes or polls."""


def explain(exc: MoonqError, missing: str = "not found") -> str:
    """The one line a command prints for a client error (never the API key)."""
    if isinstance(exc, ApiStreamDropped | Redirected | ConfigurationError):
        return str(exc)
    if isinstance(exc, ConnectionError):
        return f"{exc}: is it running (`moonq dev`)? Set MOONQ_URL or pass --url"
    if isinstance(exc, AuthenticationError):
        return "the server refused the API key (401): set MOONQ_API_KEY or pass --api-key"
    if isinstance(exc, RouteNotFound):
        return (
            f"the server has no route {exc.url} (404 {exc.message}): is MOONQ_URL (or --url)"
            " a moonq server's address? (an older moonq lacks the newer routes)"
        )
    if isinstance(exc, NotFound):
        return missing
    if isinstance(exc, APIError):
        return f"the server answered {exc.status}: {exc.message}"
    return f"unexpected answer from the server ({exc})"


def cli_error(exc: MoonqError, missing: str = "not found") -> CliError:
    """The `CliError` (and so the exit code) of `moonq batch` for a client error."""
    code = ExitCode.ERROR
    if isinstance(exc, ConnectionError | Redirected):
        code = ExitCode.UNREACHABLE
    elif isinstance(exc, ConfigurationError):
        code = ExitCode.USAGE
    elif isinstance(exc, AuthenticationError):
        code = ExitCode.AUTH
    elif isinstance(exc, NotFound):
        code = ExitCode.NOT_FOUND
    elif isinstance(exc, APIError) and exc.status in (400, 409, 413, 422):
        code = ExitCode.INVALID
    return CliError(explain(exc, missing), code)


@contextmanager
def cli_errors(missing: str = "not found") -> Iterator[None]:
    """Client errors inside become the `CliError` they stand for."""
    try:
        yield
    except MoonqError as exc:
        raise cli_error(exc, missing) from exc


class Client:
    """The batch commands' view of the server, over `moonq.client.Client`: answers as JSON
    objects (the commands read them leniently), failures as `CliError`s. `transport` is
    injected by tests (httpx.MockTransport)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        with cli_errors():
            # Streams are resumed by batch_watch, which falls back to polling.
            self.api = ApiClient(url, api_key, transport=transport, timeout=timeout, reconnects=0)
        self.url = self.api.url

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.api.close()

    def request(self, method: str, path: str, missing: str = "", **kwargs: Any) -> httpx.Response:
        with cli_errors(missing or f"not found on the server: {path}"):
            return self.api.request(method, path, **kwargs)

    def json(self, method: str, path: str, missing: str = "", **kwargs: Any) -> JSON:
        answer = self.request(method, path, missing, **kwargs).json()
        if not isinstance(answer, dict):
            raise CliError(f"the server answered {path} with something other than an object")
        return answer

    def send(self, call: Call[Any], missing: str = "") -> JSON:
        """One of the client's calls, its answer as a JSON object."""
        return self.json(call.method, call.path, missing, **call.options(self.api.timeout))

    # Files

    def refused_document(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A file-extract request: a refusal is `Unextractable`, with the server's message."""
        try:
            return self.api.request(method, path, **kwargs)
        except APIError as exc:
            if exc.status in DOCUMENT_REFUSED:
                raise Unextractable(f"{exc.message} ({exc.status})") from exc
            raise cli_error(exc) from exc
        except MoonqError as exc:
            raise cli_error(exc) from exc

    def upload(self, name: str, content: bytes, purpose: str) -> JSON:
        return self.send(calls.upload_file(content, purpose, name))

    def file_bytes(self, file_id: str) -> bytes:
        return self.request("GET", calls.file_content_path(file_id), f"no file {file_id}").content

    @contextmanager
    def file_stream(self, file_id: str) -> Iterator[Iterator[bytes]]:
        """The file's content as it arrives, for output files too big to hold."""
        with cli_errors(f"no file {file_id}"), self.api.stream_file_content(file_id) as pieces:
            yield pieces

    def delete_file(self, file_id: str) -> None:
        with cli_errors(f"no file {file_id}"):
            self.api.delete_file(file_id)

    def forget(self, file_id: str) -> None:
        """Delete a file that may already be gone (Moonshot keeps at most 1,000)."""
        try:
            self.delete_file(file_id)
        except CliError as exc:
            if exc.code != ExitCode.NOT_FOUND:
                raise

    def extract(self, name: str, content: bytes) -> str:
        """A document's text through Moonshot's file-extract; the upload is deleted after."""
        upload = calls.upload_file(content, "file-extract", name)
        options = upload.options(self.api.timeout)
        uploaded = self.refused_document(upload.method, upload.path, **options).json()
        if not isinstance(uploaded, dict) or not isinstance(uploaded.get("id"), str):
            raise CliError("the server answered /v1/files with no file id")
        try:
            content_path = calls.file_content_path(uploaded["id"])
            extracted = json.loads(self.refused_document("GET", content_path).content)
        except ValueError as exc:
            raise Unextractable(f"the server's extraction of {name} is not JSON") from exc
        finally:
            self.forget(uploaded["id"])
        text = extracted.get("content") if isinstance(extracted, dict) else None
        if not isinstance(text, str):
            raise Unextractable(f"the server's extraction of {name} has no text content")
        return text

    # Batches and jobs

    def create_batch(self, input_file_id: str, window: str, metadata: dict[str, str]) -> JSON:
        return self.send(calls.create_batch(input_file_id, window, metadata))

    def batch(self, batch_id: str) -> JSON:
        return self.send(calls.get_batch(batch_id), f"no batch {batch_id} on this server")

    def cancel(self, batch_id: str) -> JSON:
        return self.send(calls.cancel_batch(batch_id), f"no batch {batch_id} on this server")

    def job(self, job_id: str) -> JSON:
        return self.send(calls.get_job(job_id), f"no job {job_id} on this server")

    def estimate(self, chat: JSON) -> int | None:
        """Prompt tokens as the server counts them; None when it cannot count."""
        try:
            response = self.api.request("POST", "/v1/tokenizers/estimate-token-count", json=chat)
        except APIError as exc:
            if exc.status in NO_ESTIMATE:
                return None
            raise cli_error(exc) from exc
        except MoonqError as exc:
            raise cli_error(exc) from exc
        try:
            answer = response.json()
        except ValueError:
            return None
        data = answer.get("data") if isinstance(answer, dict) else None
        total = data.get("total_tokens") if isinstance(data, dict) else None
        return total if isinstance(total, int) and not isinstance(total, bool) else None

    def events(self, batch_id: str, after: int = 0) -> Iterator[JSON]:
        """The batch's progress events after seq `after`; `StreamDropped` when the stream
        breaks off, and a `CliError` (NOT_FOUND) when the server has no event stream."""
        try:
            for event in self.api.batch_events(batch_id, after=after):
                yield {"seq": event.seq, "event": event.event, "data": event.data}
        except (ConnectionError, InvalidResponse) as exc:
            raise StreamDropped(str(exc)) from exc
        except MoonqError as exc:
            raise cli_error(exc, f"no event stream for batch {batch_id}") from exc
