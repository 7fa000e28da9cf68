"""The SSE response every job, batch and chat stream goes out through (`api.sse.EventStream`):
what a client receives, pings, and how a stream ends (its end, the client's disconnect, the
server's exit, a cancel from outside, a send that fails), next to sse-starlette's own response
where they must agree."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus, _get_shutdown_state

from api import sse
from api.sse import EventStream
from tests.conftest import chat
from tests.procs import real_env, start_api

GET = {"type": "http", "method": "GET", "asgi": {"spec_version": "2.3"}}


class Client:
    """The ASGI side of one request: what was sent, and a disconnect on demand."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.fail_on = fail_on  # a send whose body starts so raises, as a broken socket does
        self._asked = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.fail_on is not None and message.get("body", b"").startswith(self.fail_on):
            raise OSError("connection reset")
        self.messages.append(message)

    async def receive(self) -> dict[str, Any]:
        if not self._asked:  # a GET's (empty) body first
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages)

    @property
    def ended(self) -> bool:
        last = self.messages[-1] if self.messages else {}
        return last.get("type") == "http.response.body" and last.get("more_body") is False


class Source:
    """A stream's events; `closed` once its cleanup has run, however it ended."""

    def __init__(self, events: list[Any], pause: float = 0.0, then_wait: bool = False) -> None:
        self.events, self.pause, self.then_wait = events, pause, then_wait
        self.closed = asyncio.Event()

    async def __call__(self) -> AsyncIterator[Any]:
        try:
            for event in self.events:
                yield event
                await asyncio.sleep(self.pause)
            if self.then_wait:
                await asyncio.Event().wait()  # a job that has not ended: nothing comes
        finally:
            self.closed.set()


EVENTS = [
    ServerSentEvent(data='{"seq": 1}', id="1", event="chunk"),
    b'id: 2\nevent: chunk\ndata: {"seq": 2}\n\n',
    {"data": "three", "event": "done"},
    "plain text",
]


def test_the_installed_sse_starlette_gets_the_one_task_path() -> None:
    """If an upgrade of sse-starlette drops the shutdown watcher this path relies on, every
    stream quietly takes sse-starlette's own four tasks again: this says so instead."""
    assert sse.LEAN


@pytest.mark.parametrize("sep", [None, "\n"])
async def test_a_stream_sends_what_sse_starlettes_own_response_sends(sep: str | None) -> None:
    ours, theirs = Client(), Client()
    await EventStream(Source(EVENTS)(), ping=15, sep=sep)(GET, ours.receive, ours.send)
    await EventSourceResponse(Source(EVENTS)(), ping=15, sep=sep)(GET, theirs.receive, theirs.send)
    assert ours.messages == theirs.messages
    assert ours.ended and b'data: {"seq": 1}' in ours.body and b"data: plain text" in ours.body


async def test_an_idle_stream_is_pinged_and_no_ping_follows_its_end() -> None:
    client, source = Client(), Source(["a", "b"], pause=0.35)
    await EventStream(source(), ping=0.1)(GET, client.receive, client.send)
    bodies = [m["body"] for m in client.messages if m.get("body")]
    pings = [b for b in bodies if b.startswith(b": ping - ")]
    assert len(pings) >= 4  # ~3 a pause, two pauses
    assert bodies.index(b"data: a\r\n\r\n") < bodies.index(pings[0])
    assert client.ended and source.closed.is_set()
    await asyncio.sleep(0.3)
    assert client.messages[-1]["more_body"] is False  # nothing after the end


async def test_a_custom_ping_goes_out_as_its_factory_makes_it() -> None:
    client = Client()
    stream = EventStream(
        Source(["a"], pause=0.25)(),
        ping=0.1,
        ping_message_factory=lambda: ServerSentEvent(comment="still here"),
    )
    await stream(GET, client.receive, client.send)
    assert b": still here\r\n\r\n" in client.body


async def test_a_client_that_disconnects_ends_a_waiting_stream_and_its_cleanup_runs() -> None:
    client, source = Client(), Source(["a"], then_wait=True)
    serving = asyncio.create_task(EventStream(source(), ping=15)(GET, client.receive, client.send))
    await asyncio.sleep(0.05)
    assert client.body == b"data: a\r\n\r\n" and not serving.done()
    client.gone.set()
    async with asyncio.timeout(2):
        await serving  # ends quietly: the client is gone, nothing to raise to
    assert source.closed.is_set() and not client.ended


async def test_a_stream_cancelled_from_outside_stays_cancelled() -> None:
    client, source = Client(), Source(["a"], then_wait=True)
    before = asyncio.all_tasks()
    serving = asyncio.create_task(EventStream(source(), ping=15)(GET, client.receive, client.send))
    await asyncio.sleep(0.05)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert source.closed.is_set()
    await asyncio.sleep(0.01)
    left = {t for t in asyncio.all_tasks() - before if "_shutdown_watcher" not in repr(t)}
    assert not left  # no helper left behind (sse-starlette's one watcher a loop stays)


async def test_a_cancel_that_lands_with_the_clients_disconnect_stays_a_cancel() -> None:
    client, source = Client(), Source(["a"], then_wait=True)
    serving = asyncio.create_task(EventStream(source(), ping=15)(GET, client.receive, client.send))
    await asyncio.sleep(0.05)
    client.gone.set()
    serving.cancel()  # both before the stream's task runs again
    with pytest.raises(asyncio.CancelledError):
        await serving


@pytest.mark.parametrize("by", ["disconnect", "exit"])
async def test_a_stop_that_lands_as_a_wait_for_completes_still_ends_the_stream(by: str) -> None:
    """Python 3.11's `asyncio.wait_for` returns its result when a cancel lands as its wait
    completes (redis-py awaits one for each command under a socket timeout, in the request's
    task when a stream subscribes): the stop is sent again, as sse-starlette's cancel scope
    cancels again at each await, so the stream still ends (found by a review helper)."""
    client, cleaned = Client(), asyncio.Event()

    async def a_command_on_the_socket() -> None:
        await asyncio.sleep(0)
        if by == "disconnect":
            client.gone.set()
        else:
            for stop in list(_get_shutdown_state().events):
                stop.set()  # what sse-starlette's watcher does at the server's exit

    async def source() -> AsyncIterator[str]:
        try:
            yield "a"
            await asyncio.wait_for(a_command_on_the_socket(), 5)
            while True:
                await asyncio.sleep(0.05)  # a job that has not run: nothing else would end it
                yield "tick"
        finally:
            cleaned.set()

    serving = asyncio.create_task(EventStream(source(), ping=15)(GET, client.receive, client.send))
    try:
        async with asyncio.timeout(2):
            await asyncio.shield(serving)
    finally:
        serving.cancel()
    assert cleaned.is_set() and not serving.cancelled()
    assert not serving.exception() and serving.get_coro() is not None


async def test_a_disconnect_in_a_task_with_an_earlier_swallowed_cancel_ends_quietly() -> None:
    """A cancel taken (and swallowed) before the response began is not the stream's to count:
    the client's disconnect still ends the stream without raising, as sse-starlette's does."""
    client, source = Client(), Source(["a"], then_wait=True)

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1)  # some earlier code took a cancel and went on
        await EventStream(source(), ping=15)(GET, client.receive, client.send)

    serving = asyncio.create_task(serve())
    await asyncio.sleep(0.05)
    client.gone.set()
    async with asyncio.timeout(2):
        await serving
    assert source.closed.is_set()


async def test_a_ping_that_cannot_be_sent_ends_the_stream_with_its_error() -> None:
    client, source = Client(fail_on=b": ping"), Source(["a"], then_wait=True)
    with pytest.raises(OSError, match="connection reset"):
        async with asyncio.timeout(2):
            await EventStream(source(), ping=0.05)(GET, client.receive, client.send)
    assert source.closed.is_set()


async def test_an_event_that_cannot_be_sent_closes_the_stream_with_its_error() -> None:
    client, source = Client(fail_on=b"data: b"), Source(["a", "b", "c"])
    with pytest.raises(OSError, match="connection reset"):
        await EventStream(source(), ping=15)(GET, client.receive, client.send)
    assert source.closed.is_set() and client.body == b"data: a\r\n\r\n"


async def test_the_servers_exit_ends_open_streams() -> None:
    client, source = Client(), Source(["a"], then_wait=True)
    serving = asyncio.create_task(EventStream(source(), ping=15)(GET, client.receive, client.send))
    await asyncio.sleep(0.05)
    AppStatus.should_exit = True  # what uvicorn's exit sets, through sse-starlette's hook
    try:
        async with asyncio.timeout(3):  # sse-starlette's watcher looks every 0.5 s
            await serving
    finally:
        AppStatus.should_exit = False
    assert source.closed.is_set()


async def test_head_is_answered_by_sse_starlette_without_starting_the_stream() -> None:
    client, source = Client(), Source(["a"])
    head = {**GET, "method": "HEAD"}
    await EventStream(source(), ping=15)(head, client.receive, client.send)
    assert client.messages[0]["status"] == 200 and client.body == b"" and client.ended
    assert not source.closed.is_set()  # never started


@pytest.mark.redis
def test_a_stopping_api_process_ends_the_streams_it_serves(
    real_redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """`moonq api` told to stop (SIGTERM) while a client follows a job that has not run (no
    worker): the stream is cut and the process exits at once, rather than waiting for a job
    that may run for minutes."""
    env = real_env(real_redis_url, prefix, MOONSHOT_API_KEY="sk-unused", MOONQ_API_KEYS="")
    proc, url = start_api("api", env, tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            job = http.post("/v1/jobs", json=chat()).json()
            with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                assert events.status_code == 200  # the stream is open, the job queued
                proc.popen.terminate()
                with pytest.raises(httpx.RemoteProtocolError):  # cut, as an EventSource sees
                    list(events.iter_lines())  # a drop it reconnects after (to another API)
        proc.popen.wait(5)  # uvicorn ends with the signal it was stopped by
    finally:
        proc.stop()
