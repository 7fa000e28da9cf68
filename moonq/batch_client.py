"""The moonq server as `moonq batch` sees it: files, batches, jobs, the token estimate.

Every HTTP failure is mapped here, once, to a `CliError` carrying the exit code the command
ends with, so no command shows a traceback and each kind of failure has its own code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

DEFAULT_URL = "http://localhost:8000"
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

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.INVALID)


class StreamDropped(Exception):
    """The event stream broke off before its last event; the caller resumes or polls."""


def error_message(response: httpx.Response) -> str:
    """The server's `{"error": {"message"}}`, or the start of whatever else it said."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return response.text[:200] or response.reason_phrase


def check(response: httpx.Response, missing: str = "not found") -> None:
    """Raise the `CliError` an unsuccessful answer stands for."""
    status = response.status_code
    if status < 400:
        return
    if status == 401:
        raise CliError(
            "the server refused the API key (401): set MOONQ_API_KEY or pass --api-key",
            ExitCode.AUTH,
        )
    if status == 404:
        raise CliError(missing, ExitCode.NOT_FOUND)
    code = ExitCode.INVALID if status in (400, 409, 413, 422) else ExitCode.ERROR
    raise CliError(f"the server answered {status}: {error_message(response)}", code)


class Client:
    """A synchronous client; `transport` is injected by tests (httpx.MockTransport)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.url = (url or os.environ.get("MOONQ_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("MOONQ_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=self.url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def unreachable(self, exc: httpx.TransportError) -> CliError:
        reason = str(exc) or type(exc).__name__
        return CliError(
            f"cannot reach the moonq server at {self.url} ({reason}): is it running"
            " (`moonq dev`)? Set MOONQ_URL or pass --url",
            ExitCode.UNREACHABLE,
        )

    def request(self, method: str, path: str, missing: str = "", **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        check(response, missing or f"not found on the server: {path}")
        return response

    def json(self, method: str, path: str, missing: str = "", **kwargs: Any) -> JSON:
        answer = self.request(method, path, missing, **kwargs).json()
        if not isinstance(answer, dict):
            raise CliError(f"the server answered {path} with something other than an object")
        return answer

    # Files

    def refused_document(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A file-extract request: a refusal is `Unextractable`, with the server's message."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if response.status_code in DOCUMENT_REFUSED:
            raise Unextractable(f"{error_message(response)} ({response.status_code})")
        check(response)
        return response

    def upload(self, name: str, content: bytes, purpose: str) -> JSON:
        files = {"file": (name, content)}
        return self.json("POST", "/v1/files", files=files, data={"purpose": purpose})

    def file_bytes(self, file_id: str) -> bytes:
        return self.request("GET", f"/v1/files/{file_id}/content", f"no file {file_id}").content

    @contextmanager
    def file_stream(self, file_id: str) -> Iterator[Iterator[bytes]]:
        """The file's content as it arrives, for output files too big to hold."""
        try:
            with self.http.stream("GET", f"/v1/files/{file_id}/content") as response:
                if response.status_code >= 400:
                    response.read()
                check(response, f"no file {file_id}")
                yield response.iter_bytes()
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc

    def delete_file(self, file_id: str) -> None:
        self.request("DELETE", f"/v1/files/{file_id}", f"no file {file_id}")

    def forget(self, file_id: str) -> None:
        """Delete a file that may already be gone (Moonshot keeps at most 1,000)."""
        try:
            self.delete_file(file_id)
        except CliError as exc:
            if exc.code != ExitCode.NOT_FOUND:
                raise

    def extract(self, name: str, content: bytes) -> str:
        """A document's text through Moonshot's file-extract; the upload is deleted after."""
        files = {"file": (name, content)}
        data = {"purpose": "file-extract"}
        uploaded = self.refused_document("POST", "/v1/files", files=files, data=data).json()
        if not isinstance(uploaded, dict) or not isinstance(uploaded.get("id"), str):
            raise CliError("the server answered /v1/files with no file id")
        try:
            content_path = f"/v1/files/{uploaded['id']}/content"
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
        body = {
            "input_file_id": input_file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": window,
            "metadata": metadata,
        }
        return self.json("POST", "/v1/batches", json=body)

    def batch(self, batch_id: str) -> JSON:
        return self.json("GET", f"/v1/batches/{batch_id}", f"no batch {batch_id} on this server")

    def cancel(self, batch_id: str) -> JSON:
        missing = f"no batch {batch_id} on this server"
        return self.json("POST", f"/v1/batches/{batch_id}/cancel", missing)

    def job(self, job_id: str) -> JSON:
        return self.json("GET", f"/v1/jobs/{job_id}", f"no job {job_id} on this server")

    def estimate(self, chat: JSON) -> int | None:
        """Prompt tokens as the server counts them; None when it cannot count."""
        path = "/v1/tokenizers/estimate-token-count"
        try:
            response = self.http.post(path, json=chat)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if response.status_code in NO_ESTIMATE:
            return None
        check(response)
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
        headers = {"Last-Event-ID": str(after)} if after else {}
        path = f"/v1/batches/{batch_id}/events"
        timeout = httpx.Timeout(60.0, connect=5.0)
        try:
            with connect_sse(self.http, "GET", path, headers=headers, timeout=timeout) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                check(source.response, f"no event stream for batch {batch_id}")
                for sse in source.iter_sse():
                    if sse.event == "stream_error":  # the server lost its store: resume later
                        raise StreamDropped(sse.data)
                    if sse.data:
                        yield json.loads(sse.data)
        except (httpx.TransportError, SSEError, ValueError) as exc:
            raise StreamDropped(str(exc)) from exc
