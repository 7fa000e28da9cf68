"""The Python client of a moonq server: `Client` (blocking) and `AsyncClient`, on httpx.

Both find the server through their arguments, else MOONQ_URL (default http://localhost:8000)
and MOONQ_API_KEY; `transport=` takes any httpx transport (tests pass `httpx.MockTransport` or
`httpx.ASGITransport`). Answers come back as the API's own pydantic models (`Job`, `JobList`,
`Batch`, `UsageReport`, ...), failures as one exception tree (moonq/client_errors.py). What
each call sends lives in moonq/client_calls.py, the event-stream policy in client_events.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse, connect_sse

from moonq import client_calls as calls
from moonq.batch_models import Batch, BatchList
from moonq.client_calls import Call, Day, Upload
from moonq.client_errors import (
    ConnectionError,
    MoonqError,
    WaitTimeout,
    api_error,
    from_httpx,
    reason,
    redirected,
)
from moonq.client_events import Dropped, Event, Resume
from moonq.files import FileObject
from moonq.models import ChatRequest, Job, JobList, Status
from moonq.usage_models import UsageReport

T = TypeVar("T")
P = TypeVar("P", JobList, BatchList)
RECONNECTS = 5  # failed reconnections in a row before an event stream is given up
BACKOFF = 0.5  # seconds before the first reconnection; doubled each time, 8 s at most
POLL = 30.0  # seconds of one long-poll while waiting for a job
_TRANSPORT_ERRORS = (httpx.HTTPError, httpx.InvalidURL)


class _Base:
    """What both clients hold: where the server is, the key's header, timeouts, stream policy."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        timeout: float,
        reconnects: int,
        backoff: float,
    ) -> None:
        self.url = calls.server_url(url)
        self.headers = calls.auth_headers(api_key)
        self.timeout = timeout
        self.reconnects = reconnects
        self.backoff = backoff

    def _resume(self, what: str, after: int) -> Resume:
        return Resume(self.url, what, after, self.reconnects, self.backoff)

    def _mapped(self, exc: Exception) -> MoonqError:
        if isinstance(exc, _TRANSPORT_ERRORS):
            return from_httpx(exc, self.url)
        return ConnectionError(self.url, reason(exc))

    def _checked(self, response: httpx.Response) -> httpx.Response:
        """The answer, if it is one: `APIError` for an error status, `Redirected` for a 3xx
        (following it would send the key on to wherever it points)."""
        if response.status_code >= 400:
            raise api_error(response)
        if response.status_code >= 300:
            raise redirected(response, self.url)
        return response

    def _http_options(self) -> dict[str, Any]:
        return {"headers": self.headers, "timeout": calls.timeout(self.timeout)}


class Client(_Base):
    """A blocking client; use it as a context manager, or call `close()`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = calls.DEFAULT_TIMEOUT,
        reconnects: int = RECONNECTS,
        backoff: float = BACKOFF,
    ) -> None:
        super().__init__(url, api_key, timeout, reconnects, backoff)
        try:
            self.http = httpx.Client(base_url=self.url, transport=transport, **self._http_options())
        except httpx.InvalidURL as exc:
            raise self._mapped(exc) from exc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any request, its answer read; `APIError` for an error status. The typed calls below
        use it; it is here for what they do not cover."""
        try:
            response = self.http.request(method, path, **kwargs)
        except _TRANSPORT_ERRORS as exc:
            raise self._mapped(exc) from exc
        return self._checked(response)

    def _call(self, call: Call[T]) -> T:
        return call.read(self.request(call.method, call.path, **call.options(self.timeout)))

    # Jobs

    def create_job(
        self,
        body: Mapping[str, Any] | ChatRequest,
        *,
        custom_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a chat completion (`body`: any chat completion request)."""
        return self._call(calls.create_job(body, custom_id, metadata, idempotency_key))

    def get_job(self, job_id: str, *, wait: float | None = None) -> Job:
        """The job; with `wait`, the server holds the answer until it ends or `wait` s pass."""
        return self._call(calls.get_job(job_id, wait))

    def wait_job(self, job_id: str, *, timeout: float | None = None, poll: float = POLL) -> Job:
        """The job once it has ended, by long-polls of `poll` s; `WaitTimeout` after `timeout`
        seconds (None: no limit)."""
        deadline = calls.Deadline(timeout)
        while True:
            job = self.get_job(job_id, wait=deadline.next_wait(poll))
            if job.status.terminal:
                return job
            if deadline.passed:
                raise WaitTimeout(job, timeout or 0.0)
            time.sleep(deadline.rest())

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job; `Conflict` if it has already ended."""
        return self._call(calls.cancel_job(job_id))

    def list_job_pages(
        self,
        *,
        status: Status | str | None = None,
        custom_id: str | None = None,
        batch_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Iterator[JobList]:
        """Pages of the caller's jobs, newest first, `limit` (1-100) a page, each fetched as
        the one before has been taken."""

        def page(cursor: str | None) -> Call[JobList]:
            return calls.jobs_page(limit, cursor, status, custom_id, batch_id)

        return self._pages(page, after)

    def list_jobs(
        self,
        *,
        status: Status | str | None = None,
        custom_id: str | None = None,
        batch_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Iterator[Job]:
        """The caller's jobs, newest first, across pages of `limit`."""
        pages = self.list_job_pages(
            status=status, custom_id=custom_id, batch_id=batch_id, limit=limit, after=after
        )
        for page in pages:
            yield from page.data

    def _pages(self, page: Callable[[str | None], Call[P]], after: str | None) -> Iterator[P]:
        cursor: str | None = after
        while True:
            found = self._call(page(cursor))
            yield found
            cursor = calls.next_after(found)
            if cursor is None:
                return

    def job_events(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        """Every event of the job after seq `after`, in order, each once, live until the
        terminal one; a dropped connection is resumed with `Last-Event-ID`."""
        return self._follow(calls.job_events_path(job_id), f"job {job_id}", after)

    # Usage

    def usage(self, start: Day | None = None, end: Day | None = None) -> UsageReport:
        """Tokens, jobs and cost by UTC day and model, `start` to `end` inclusive
        (`date`s or YYYY-MM-DD; the server's default: the last 30 days)."""
        return self._call(calls.usage(start, end))

    # Files and batches

    def upload_file(
        self, file: Upload, *, purpose: str = "batch", filename: str | None = None
    ) -> FileObject:
        """Upload a batch input file (bytes, a path, or an open binary file)."""
        return self._call(calls.upload_file(file, purpose, filename))

    def file_content(self, file_id: str) -> bytes:
        return self._call(calls.file_content(file_id))

    @contextmanager
    def stream_file_content(self, file_id: str) -> Iterator[Iterator[bytes]]:
        """A file's bytes as they arrive: for batch output files too large to hold."""
        try:
            with self.http.stream("GET", calls.file_content_path(file_id)) as response:
                if response.status_code >= 300:
                    response.read()
                    self._checked(response)
                yield self._mapping(response.iter_bytes())
        except _TRANSPORT_ERRORS as exc:
            raise self._mapped(exc) from exc

    def _mapping(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from pieces
        except _TRANSPORT_ERRORS as exc:
            raise self._mapped(exc) from exc

    def delete_file(self, file_id: str) -> None:
        self._call(calls.delete_file(file_id))

    def create_batch(
        self,
        input_file_id: str,
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        endpoint: str = calls.CHAT_ENDPOINT,
    ) -> Batch:
        """Run every line of an uploaded file as a job; a file with bad lines gives a batch
        that is `failed`, its `errors` naming each."""
        return self._call(calls.create_batch(input_file_id, completion_window, metadata, endpoint))

    def get_batch(self, batch_id: str) -> Batch:
        return self._call(calls.get_batch(batch_id))

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._call(calls.cancel_batch(batch_id))

    def list_batch_pages(self, *, limit: int = 20, after: str | None = None) -> Iterator[BatchList]:
        return self._pages(lambda cursor: calls.batches_page(limit, cursor), after)

    def list_batches(self, *, limit: int = 20, after: str | None = None) -> Iterator[Batch]:
        for page in self.list_batch_pages(limit=limit, after=after):
            yield from page.data

    def batch_events(self, batch_id: str, *, after: int = 0) -> Iterator[Event]:
        """A batch's progress: a `line` event as each line ends, then `done` with the batch."""
        return self._follow(calls.batch_events_path(batch_id), f"batch {batch_id}", after)

    # Following a stream

    def _follow(self, path: str, what: str, after: int) -> Iterator[Event]:
        resume = self._resume(what, after)
        while not resume.ended:
            try:
                yield from self._stream(path, resume)
            except (*_TRANSPORT_ERRORS, Dropped) as exc:
                delay = resume.retry_in(exc)
                if delay is None:
                    raise self._mapped(exc) from exc
                time.sleep(delay)

    def _stream(self, path: str, resume: Resume) -> Iterator[Event]:
        with connect_sse(self.http, "GET", path, headers=resume.headers()) as source:
            if source.response.status_code >= 400:
                source.response.read()
            resume.opened(source.response)
            if resume.ended:
                return
            for sse in source.iter_sse():
                event = resume.take(sse)
                if event is not None:
                    yield event
                if resume.ended:
                    return
        resume.closed()


class AsyncClient(_Base):
    """The same calls as `Client`, awaited; use it as an async context manager, or `aclose()`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = calls.DEFAULT_TIMEOUT,
        reconnects: int = RECONNECTS,
        backoff: float = BACKOFF,
    ) -> None:
        super().__init__(url, api_key, timeout, reconnects, backoff)
        try:
            self.http = httpx.AsyncClient(
                base_url=self.url, transport=transport, **self._http_options()
            )
        except httpx.InvalidURL as exc:
            raise self._mapped(exc) from exc

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any request, its answer read; `APIError` for an error status."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except _TRANSPORT_ERRORS as exc:
            raise self._mapped(exc) from exc
        return self._checked(response)

    async def _call(self, call: Call[T]) -> T:
        options = call.options(self.timeout)
        return call.read(await self.request(call.method, call.path, **options))

    # Jobs

    async def create_job(
        self,
        body: Mapping[str, Any] | ChatRequest,
        *,
        custom_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a chat completion (`body`: any chat completion request)."""
        return await self._call(calls.create_job(body, custom_id, metadata, idempotency_key))

    async def get_job(self, job_id: str, *, wait: float | None = None) -> Job:
        """The job; with `wait`, the server holds the answer until it ends or `wait` s pass."""
        return await self._call(calls.get_job(job_id, wait))

    async def wait_job(
        self, job_id: str, *, timeout: float | None = None, poll: float = POLL
    ) -> Job:
        """The job once it has ended, by long-polls of `poll` s; `WaitTimeout` after `timeout`
        seconds (None: no limit)."""
        deadline = calls.Deadline(timeout)
        while True:
            job = await self.get_job(job_id, wait=deadline.next_wait(poll))
            if job.status.terminal:
                return job
            if deadline.passed:
                raise WaitTimeout(job, timeout or 0.0)
            await asyncio.sleep(deadline.rest())

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job; `Conflict` if it has already ended."""
        return await self._call(calls.cancel_job(job_id))

    def list_job_pages(
        self,
        *,
        status: Status | str | None = None,
        custom_id: str | None = None,
        batch_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> AsyncIterator[JobList]:
        """Pages of the caller's jobs, newest first, `limit` (1-100) a page."""

        def page(cursor: str | None) -> Call[JobList]:
            return calls.jobs_page(limit, cursor, status, custom_id, batch_id)

        return self._pages(page, after)

    async def list_jobs(
        self,
        *,
        status: Status | str | None = None,
        custom_id: str | None = None,
        batch_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> AsyncIterator[Job]:
        """The caller's jobs, newest first, across pages of `limit`."""
        pages = self.list_job_pages(
            status=status, custom_id=custom_id, batch_id=batch_id, limit=limit, after=after
        )
        async for page in pages:
            for job in page.data:
                yield job

    async def _pages(
        self, page: Callable[[str | None], Call[P]], after: str | None
    ) -> AsyncIterator[P]:
        cursor: str | None = after
        while True:
            found = await self._call(page(cursor))
            yield found
            cursor = calls.next_after(found)
            if cursor is None:
                return

    def job_events(self, job_id: str, *, after: int = 0) -> AsyncIterator[Event]:
        """Every event of the job after seq `after`, in order, each once, live until the
        terminal one; a dropped connection is resumed with `Last-Event-ID`."""
        return self._follow(calls.job_events_path(job_id), f"job {job_id}", after)

    # Usage

    async def usage(self, start: Day | None = None, end: Day | None = None) -> UsageReport:
        """Tokens, jobs and cost by UTC day and model, `start` to `end` inclusive."""
        return await self._call(calls.usage(start, end))

    # Files and batches

    async def upload_file(
        self, file: Upload, *, purpose: str = "batch", filename: str | None = None
    ) -> FileObject:
        """Upload a batch input file (bytes, a path, or an open binary file)."""
        return await self._call(calls.upload_file(file, purpose, filename))

    async def file_content(self, file_id: str) -> bytes:
        return await self._call(calls.file_content(file_id))

    @asynccontextmanager
    async def stream_file_content(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """A file's bytes as they arrive: for batch output files too large to hold."""
        try:
            async with self.http.stream("GET", calls.file_content_path(file_id)) as response:
                if response.status_code >= 300:
                    await response.aread()
                    self._checked(response)
                yield self._mapping(response.aiter_bytes())
        except _TRANSPORT_ERRORS as exc:
            raise self._mapped(exc) from exc

    async def _mapping(self, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for piece in pieces:
                yield piece
        except _TRANSPORT_ERRORS as exc:
            raise self._mapped(exc) from exc

    async def delete_file(self, file_id: str) -> None:
        await self._call(calls.delete_file(file_id))

    async def create_batch(
        self,
        input_file_id: str,
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        endpoint: str = calls.CHAT_ENDPOINT,
    ) -> Batch:
        """Run every line of an uploaded file as a job."""
        call = calls.create_batch(input_file_id, completion_window, metadata, endpoint)
        return await self._call(call)

    async def get_batch(self, batch_id: str) -> Batch:
        return await self._call(calls.get_batch(batch_id))

    async def cancel_batch(self, batch_id: str) -> Batch:
        return await self._call(calls.cancel_batch(batch_id))

    def list_batch_pages(
        self, *, limit: int = 20, after: str | None = None
    ) -> AsyncIterator[BatchList]:
        return self._pages(lambda cursor: calls.batches_page(limit, cursor), after)

    async def list_batches(
        self, *, limit: int = 20, after: str | None = None
    ) -> AsyncIterator[Batch]:
        async for page in self.list_batch_pages(limit=limit, after=after):
            for batch in page.data:
                yield batch

    def batch_events(self, batch_id: str, *, after: int = 0) -> AsyncIterator[Event]:
        """A batch's progress: a `line` event as each line ends, then `done` with the batch."""
        return self._follow(calls.batch_events_path(batch_id), f"batch {batch_id}", after)

    # Following a stream

    async def _follow(self, path: str, what: str, after: int) -> AsyncIterator[Event]:
        resume = self._resume(what, after)
        while not resume.ended:
            try:
                async with aclosing(self._stream(path, resume)) as events:
                    async for event in events:
                        yield event
            except (*_TRANSPORT_ERRORS, Dropped) as exc:
                delay = resume.retry_in(exc)
                if delay is None:
                    raise self._mapped(exc) from exc
                await asyncio.sleep(delay)

    async def _stream(self, path: str, resume: Resume) -> AsyncGenerator[Event]:
        async with aconnect_sse(self.http, "GET", path, headers=resume.headers()) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
            resume.opened(source.response)
            if resume.ended:
                return
            async for sse in source.aiter_sse():
                event = resume.take(sse)
                if event is not None:
                    yield event
                if resume.ended:
                    return
        resume.closed()
