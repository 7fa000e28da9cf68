"""MoonshotClient and the upstream error tree: every failure mode maps to one class."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
import re
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from aiohttp.http_exceptions import TransferEncodingError
from httpx_aiohttp import AiohttpTransport
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from moonq import errors
from moonq.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from moonq.fake_moonshot import ERRORS, FakeServer
from worker.upstream import EventData, MoonshotClient

KEY = "sk-upstream-secret-4f9a2c7e1b"
MOCK_URL = "http://upstream.test/v1"
SSE = {"content-type": "text/event-stream"}


def chat(**fake_moonshot: Any) -> dict[str, Any]:
    body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}
    return body | ({"fake_moonshot": fake_moonshot} if fake_moonshot else {})


async def drain(client: MoonshotClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with contextlib.aclosing(client.stream(body)) as chunks:
        return [chunk async for chunk in chunks]


async def failure(client: MoonshotClient, body: dict[str, Any], seen: list[Any]) -> UpstreamError:
    """The error `stream()` raises; `seen` collects the chunks yielded before it."""
    with pytest.raises(UpstreamError) as caught:
        async with contextlib.aclosing(client.stream(body)) as chunks:
            async for chunk in chunks:
                seen.append(chunk)
    return caught.value


@pytest.fixture
async def upstream(fake: FakeServer) -> AsyncIterator[MoonshotClient]:
    client = MoonshotClient(fake.url, KEY, read_timeout=0.5)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def mocked(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncIterator[Any]:
    client = MoonshotClient(MOCK_URL, KEY, transport=httpx.MockTransport(handler))
    try:
        yield client
    finally:
        await client.aclose()


def sse(*events: Any, done: bool = True) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join([*lines, "data: [DONE]\n\n" if done else ""]).encode()


CHUNK = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}}]}

# --- every failure mode through the real client against the fake ------------------------------

HTTP_FAILURES = [
    ("rate_limit_reached_error", 429, UpstreamRateLimited, True),
    ("engine_overloaded_error", 429, UpstreamRateLimited, True),
    ("exceeded_current_quota_error", 429, UpstreamQuotaExceeded, False),
    ("invalid_request_error", 400, UpstreamRejected, False),
    ("content_filter", 400, UpstreamRejected, False),
    ("invalid_authentication_error", 401, UpstreamRejected, False),
    ("permission_denied_error", 403, UpstreamRejected, False),
    ("resource_not_found_error", 404, UpstreamRejected, False),
    ("server_error", 500, UpstreamServerError, True),
    ("bad_gateway", 502, UpstreamServerError, True),
    ("unavailable", 503, UpstreamServerError, True),
]


@pytest.mark.parametrize(("name", "status", "cls", "retryable"), HTTP_FAILURES)
async def test_http_failures_map_to_one_class(
    upstream: MoonshotClient, name: str, status: int, cls: type[UpstreamError], retryable: bool
) -> None:
    error = await failure(upstream, chat(error=name), seen := [])
    assert type(error) is cls and error.retryable is retryable and seen == []
    assert error.status_code == status == ERRORS[name][0]
    assert error.type == ("server_error" if status >= 500 else name)  # Moonshot's wire type
    assert error.message == ERRORS[name][1] == str(error)
    assert error.retry_after is None and error.__cause__ is None


FORBIDDEN = [  # 403s: some of Moonshot's docs answer one for an account out of balance
    ({"type": "permission_denied_error", "message": "Your account balance is insufficient"}, True),
    ({"message": "QUOTA exceeded for this account"}, True),
    ({"type": "account_suspended", "message": "no"}, True),
    ({"type": "permission_denied_error", "message": "this key may not use kimi-k2.6"}, False),
    ({"message": "forbidden"}, False),
    (None, False),
]


@pytest.mark.parametrize(("error", "quota"), FORBIDDEN)
async def test_a_403_that_speaks_of_balance_is_the_accounts_quota(
    error: dict[str, str] | None, quota: bool
) -> None:
    body = {"error": error} if error else {}
    async with mocked(lambda request: httpx.Response(403, json=body)) as client:
        failed = await failure(client, chat(), [])
    assert type(failed) is (UpstreamQuotaExceeded if quota else UpstreamRejected)
    assert failed.status_code == 403 and not failed.retryable
    assert failed.type == (error or {}).get(
        "type", "exceeded_current_quota_error" if quota else "invalid_request_error"
    )


TRANSPORT_FAILURES = [
    ({"error": "drop", "drop_after": 3}, UpstreamConnectionError, "connection_error", 3),
    ({"error": "hang"}, UpstreamTimeout, "timeout", 0),
]


@pytest.mark.parametrize(("control", "cls", "kind", "chunks"), TRANSPORT_FAILURES)
async def test_transport_failures_are_retryable_and_chained(
    upstream: MoonshotClient, control: dict[str, Any], cls: type, kind: str, chunks: int
) -> None:
    error = await failure(upstream, chat(**control), seen := [])
    assert type(error) is cls and error.retryable and error.type == kind
    assert error.status_code is None and len(seen) == chunks
    assert isinstance(error.__cause__, httpx.TransportError)


async def test_connection_refused_is_a_connection_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = MoonshotClient(f"http://127.0.0.1:{port}/v1", KEY, connect_timeout=2)
    try:
        error = await failure(client, chat(), [])
    finally:
        await client.aclose()
    assert type(error) is UpstreamConnectionError and error.retryable
    assert error.type == "connection_error" and error.status_code is None
    assert isinstance(error.__cause__, httpx.TransportError)
    assert KEY not in str(error) and KEY not in json.dumps(error.info())


# --- Retry-After and backoff ------------------------------------------------------------------


async def test_retry_after_from_a_429_is_honoured(upstream: MoonshotClient) -> None:
    error = await failure(upstream, chat(error="rate_limit_reached_error", retry_after=7), [])
    assert type(error) is UpstreamRateLimited and error.retry_after == 7
    delays = [errors.retry_delay(error, attempt) for attempt in (1, 1, 1, 2, 3, 10) * 20]
    assert min(delays) >= 7 and errors.retry_delay(error, attempt=1) >= 7
    assert max(delays) <= 60  # still within the default cap


async def test_retry_after_http_date_is_parsed_from_the_response() -> None:
    when = formatdate(time.time() + 30, usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"type": "engine_overloaded_error", "message": "busy"}}
        return httpx.Response(429, json=body, headers={"Retry-After": when})

    async with mocked(handler) as client:
        error = await failure(client, chat(), [])
    assert type(error) is UpstreamRateLimited and error.retry_after is not None
    assert 27 < error.retry_after <= 31
    assert errors.parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0
    assert errors.parse_retry_after("soon") is errors.parse_retry_after(None) is None
    assert errors.parse_retry_after("inf") is errors.parse_retry_after("nan") is None
    assert errors.parse_retry_after("-5") == 0
    assert errors.parse_retry_after("99999999") == errors.MAX_RETRY_AFTER


def test_retry_delay_grows_with_attempt_and_is_capped() -> None:
    error = UpstreamServerError("boom")

    def mean(attempt: int, **kw: float) -> float:
        return statistics.fmean(errors.retry_delay(error, attempt, **kw) for _ in range(2000))

    means = [mean(attempt) for attempt in range(1, 6)]
    assert means == sorted(means) and means[-1] > 4 * means[0]
    capped = [errors.retry_delay(error, attempt, cap=8) for attempt in (5, 12, 40) * 500]
    assert max(capped) <= 8 and 3 < statistics.fmean(capped) < 5
    assert all(errors.retry_delay(error, 30) <= 60 for _ in range(500))


# --- the wire, with httpx.MockTransport -------------------------------------------------------

PROTOCOL_FAILURES = [
    pytest.param({"content-type": "application/json"}, b'{"id": "x"}', id="not-event-stream"),
    pytest.param(SSE, sse(CHUNK, "{not json"), id="chunk-not-json"),
    pytest.param(SSE, sse("[1, 2]"), id="chunk-not-object"),
    # Python's parser takes these; a result holding them could never be sent as JSON.
    pytest.param(SSE, sse('{"choices": [], "logprob": -Infinity}'), id="chunk-with-infinity"),
    pytest.param(SSE, sse('{"choices": [], "x": NaN}'), id="chunk-with-nan"),
    pytest.param(SSE, sse("[" * 100_000), id="chunk-nested-past-the-stack"),
]


@pytest.mark.parametrize(("headers", "content"), PROTOCOL_FAILURES)
async def test_protocol_errors(headers: dict[str, str], content: bytes) -> None:
    async with mocked(lambda request: httpx.Response(200, headers=headers, content=content)) as c:
        error = await failure(c, chat(), [])
    assert type(error) is UpstreamProtocolError and error.retryable
    assert error.message and error.status_code is None


async def test_a_stream_without_done_is_interrupted() -> None:
    content = sse(CHUNK, CHUNK, done=False)
    async with mocked(lambda request: httpx.Response(200, headers=SSE, content=content)) as c:
        error = await failure(c, chat(), seen := [])
    assert seen == [CHUNK, CHUNK]
    assert type(error) is UpstreamConnectionError and error.retryable
    assert error.type == "stream_interrupted"


MID_STREAM = [
    "rate_limit_reached_error",
    "engine_overloaded_error",
    "exceeded_current_quota_error",
    "invalid_authentication_error",
    "permission_denied_error",
    "resource_not_found_error",
    "invalid_request_error",
    "content_filter",
    "server_error",
]


@pytest.mark.parametrize("name", MID_STREAM)
async def test_an_error_event_mid_stream_is_mapped_by_type(name: str) -> None:
    _, _, cls, retryable = next(row for row in HTTP_FAILURES if row[0] == name)
    message = f"{name} happened mid-stream"
    content = sse(CHUNK, {"error": {"type": name, "message": message}})
    async with mocked(lambda request: httpx.Response(200, headers=SSE, content=content)) as c:
        error = await failure(c, chat(), seen := [])
    assert seen == [CHUNK]
    assert (error.type, error.message) == (name, message)
    assert type(error) is cls and error.retryable is retryable


async def test_the_request_streams_keeps_unknown_fields_and_authenticates() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, headers=SSE, content=sse(CHUNK))

    body = chat(chunks=3) | {"stream": False, "x_vendor": [1, {"deep": None}], "temperature": 0.3}
    original = json.loads(json.dumps(body))
    async with mocked(handler) as client:
        assert await drain(client, body) == [CHUNK]
    (request,) = sent
    assert request.method == "POST" and str(request.url) == f"{MOCK_URL}/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == original | {"stream": True}
    assert request.headers["content-type"] == "application/json"
    assert body == original  # the caller's body is not mutated


async def test_cookies_an_answer_sets_are_kept_and_answers_without_are_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client keeps the cookies an upstream sets (a load balancer's), as httpx does; an
    answer that sets none is not handed to the cookie jar (httpx builds urllib stand-ins of
    the request and the response for each, only for the jar to find no cookie header)."""
    sent: list[httpx.Request] = []
    built = 0
    stand_in = httpx.Cookies._CookieCompatResponse  # built only to read an answer's cookies

    class Counted(stand_in):  # type: ignore[misc, valid-type]
        def __init__(self, response: httpx.Response) -> None:
            nonlocal built
            built += 1
            super().__init__(response)

    monkeypatch.setattr(httpx.Cookies, "_CookieCompatResponse", Counted)

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        cookie = {"set-cookie": "lb=node-7; Path=/"} if len(sent) == 2 else {}
        return httpx.Response(200, headers=SSE | cookie, content=sse(CHUNK))

    async with mocked(handler) as client:
        for _ in range(4):
            assert await drain(client, chat()) == [CHUNK]
    assert [r.headers.get("cookie") for r in sent] == [None, None, "lb=node-7", "lb=node-7"]
    assert built == 1  # only the answer that set a cookie went to the jar


def _echo_key(request: httpx.Request) -> httpx.Response:
    key = request.headers["authorization"].removeprefix("Bearer ")
    error = {"type": "invalid_authentication_error", "message": f"Incorrect API key: {key}"}
    return httpx.Response(401, json={"error": error})


NO_KEY_CASES = [
    pytest.param(lambda r: httpx.Response(500, text="upstream exploded"), id="http-500-text"),
    pytest.param(
        lambda r: httpx.Response(200, headers=SSE, content=sse({"error": "bad"})), id="event"
    ),
    pytest.param(lambda r: httpx.Response(200, content=b"<html>"), id="protocol"),
    pytest.param(_echo_key, id="echoed"),
]


@pytest.mark.parametrize("handler", NO_KEY_CASES)
async def test_errors_never_carry_the_api_key(handler: Any) -> None:
    async with mocked(handler) as client:
        error = await failure(client, chat(), [])
    for shown in (error.message, str(error), repr(error), json.dumps(error.info())):
        assert KEY not in shown


async def test_the_aiohttp_pool_is_sized_to_concurrency(fake: FakeServer) -> None:
    client = MoonshotClient(fake.url, KEY, concurrency=7)
    try:
        assert await drain(client, chat())
        transport = client._http._transport
        assert isinstance(transport, AiohttpTransport)
        assert transport.limits.max_connections == 7
        assert transport.client.connector.limit == 7  # what aiohttp actually enforces
    finally:
        await client.aclose()


# --- reading the event stream from its bytes --------------------------------------------------


def _httpx_sse_data(stream: bytes) -> list[str]:
    """The non-empty event data httpx-sse reads from a stream (its line and event decoders)."""
    lines, events = SSELineDecoder(), SSEDecoder()
    out = []
    for line in [*lines.decode(stream.decode()), *lines.flush()]:
        event = events.decode(line)
        if event is not None and event.data:
            out.append(event.data)
    return out


def _event_data(pieces: list[bytes]) -> list[str]:
    reader = EventData()
    return [data.decode() for piece in pieces for data in reader.feed(piece) if data]


def _random_stream(rng: random.Random) -> bytes:
    """Lines of every kind the SSE spec knows, each ended by CRLF, LF or CR."""
    kinds = [
        "data: {n}",
        "data:{n}",
        "data:  {n} ",
        "data",
        "data:",
        ": a comment {n}",
        "event: message",
        "id: {n}",
        "retry: 100",
        "unknown: x",
        "data: é {n} ✓",
        "",
        "",
        "",
    ]
    out = []
    for n in range(rng.randint(0, 40)):
        out.append(rng.choice(kinds).format(n=n) + rng.choice(["\n", "\r\n", "\r", "\n"]))
    return "".join(out).encode()


def _cuts(rng: random.Random, data: bytes) -> list[bytes]:
    points = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def test_events_are_read_from_bytes_as_httpx_sse_reads_them_however_the_stream_is_cut() -> None:
    rng = random.Random(20261127)
    for _ in range(3000):
        stream = _random_stream(rng)
        assert _event_data(_cuts(rng, stream)) == _httpx_sse_data(stream), stream


def test_a_stream_cut_at_every_byte_gives_the_same_events_and_a_first_bom_is_dropped() -> None:
    accented = '{"choices": [{"delta": {"content": "héllo ✓"}}]}'  # cut inside its characters
    stream = "\ufeff".encode() + sse(CHUNK, accented).replace(b"\n\n", b"\r\n\r\n", 1)
    whole = _event_data([stream])
    assert whole == [json.dumps(CHUNK), accented, "[DONE]"]
    for cut in range(len(stream) + 1):
        assert _event_data([stream[:cut], stream[cut:]]) == whole, cut
    assert _event_data([bytes([b]) for b in stream]) == whole


async def test_bytes_that_are_not_utf8_in_a_chunk_are_read_as_replacement_characters() -> None:
    content = b'data: {"choices": [{"delta": {"content": "a\xffb"}}]}\n\ndata: [DONE]\n\n'
    async with mocked(lambda request: httpx.Response(200, headers=SSE, content=content)) as c:
        chunks = await drain(c, chat())
    assert chunks == [{"choices": [{"delta": {"content": "a\ufffdb"}}]}]


def test_a_large_event_in_network_sized_pieces_is_read_in_linear_time() -> None:
    """From a review: the transport hands the body over in 16 KiB pieces, and the line so far
    was copied with each piece and scanned again (a line of N bytes cost ~N²/32 KiB of copying,
    all of it on the worker's event loop: 24 s for 32 MiB, every other job's stream stalled
    meanwhile). The pieces are kept apart until the line ends (~0.2 s)."""
    size = 32 << 20
    body = b"data: " + b"x" * size + b"\n\n"
    pieces = [body[i : i + 16384] for i in range(0, len(body), 16384)]
    reader = EventData()
    started = time.perf_counter()
    events = [data for piece in pieces for data in reader.feed(piece)]
    elapsed = time.perf_counter() - started
    assert [len(data) for data in events] == [size]
    assert elapsed < 5.0, f"{elapsed:.1f} s to read one {size >> 20} MiB event"


# --- The connection after [DONE] -------------------------------------------------------------


class _ChunkedServer:
    """A raw HTTP/1.1 server answering each POST with an event stream in chunked encoding: two
    chunks, [DONE], then (after `tail_after` s; never if None) more bytes `tail` and the body's
    end. It counts the connections it accepts, as an upstream behind a TLS handshake would."""

    CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'

    def __init__(self, tail_after: float | None, tail: bytes = b"") -> None:
        self.tail_after, self.tail = tail_after, tail
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                for piece in (self.CHUNK, self.CHUNK, b"data: [DONE]\n\n"):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                if self.tail_after is None:
                    await asyncio.Event().wait()  # the body never ends
                await asyncio.sleep(self.tail_after)
                if self.tail:
                    writer.write(b"%x\r\n%s\r\n" % (len(self.tail), self.tail))
                writer.write(b"0\r\n\r\n")
                await writer.drain()


async def test_a_stream_read_to_done_keeps_its_connection_for_the_next_one() -> None:
    """The body's end comes a moment after [DONE] (as it often does across a network): the
    client reads it, so the next request reuses the connection rather than opening another
    (with the real upstream, another TLS handshake)."""
    upstream = _ChunkedServer(tail_after=0.01)
    async with upstream as url:
        client = MoonshotClient(url, KEY)
        try:
            for _ in range(3):
                assert len(await drain(client, chat())) == 2
        finally:
            await client.aclose()
    assert upstream.connections == 1


@pytest.mark.parametrize("tail", [b"", b"data: more after the end\n\n" * 10])
async def test_a_body_that_does_not_end_after_done_delays_the_answer_only_briefly(
    tail: bytes,
) -> None:
    """An upstream that keeps the body open (or sends more) after [DONE]: the answer is what
    came before [DONE], a moment later (DRAIN_PATIENCE), not after the read timeout."""
    upstream = _ChunkedServer(tail_after=None if not tail else 0.0, tail=tail)
    async with upstream as url:
        client = MoonshotClient(url, KEY, read_timeout=30)
        try:
            started = time.monotonic()
            chunks = await drain(client, chat())
            took = time.monotonic() - started
        finally:
            await client.aclose()
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["x", "x"]
    assert took < 5


class _BrokenBody(httpx.AsyncByteStream):
    """A body whose chunked encoding turns out malformed after `good` (aiohttp's pure-Python
    parser raises this, an `HttpProcessingError` that the transport does not map)."""

    def __init__(self, good: bytes) -> None:
        self.good = good

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.good
        raise TransferEncodingError("Not enough data to satisfy transfer length header.")


async def test_a_body_broken_after_done_still_answers() -> None:
    good = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    answer = httpx.Response(200, headers=SSE, stream=_BrokenBody(good))
    async with mocked(lambda request: answer) as client:
        chunks = await drain(client, chat())
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["x"]


async def test_a_body_broken_midway_is_a_protocol_error() -> None:
    good = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    answer = httpx.Response(200, headers=SSE, stream=_BrokenBody(good))
    async with mocked(lambda request: answer) as client:
        error = await failure(client, chat(), seen := [])
    assert type(error) is UpstreamProtocolError and len(seen) == 1
    assert "TransferEncodingError" in str(error) and KEY not in str(error)


async def test_a_stream_is_read_straight_from_aiohttp(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the installed httpx-aiohttp, the body's bytes come from aiohttp's reader, not
    through httpx's four generators a read (~7 µs of the worker's CPU a chunk): an upgrade
    that moves the answer's aiohttp response fails here rather than quietly costing that."""

    def through_httpx(self: httpx.Response, chunk_size: int | None = None) -> Any:
        raise AssertionError("the body went through httpx's iterators")

    monkeypatch.setattr(httpx.Response, "aiter_bytes", through_httpx)
    client = MoonshotClient(fake.url, KEY)
    try:
        chunks = await drain(client, chat())
    finally:
        await client.aclose()
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text and chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_compressed_stream_is_decoded_by_httpx() -> None:
    """aiohttp is told not to decompress; a body the upstream compressed goes through httpx's
    decoder, as before."""
    plain = sse(CHUNK | {"choices": [{"index": 0, "delta": {"content": "zipped"}}]})
    body = gzip.compress(plain)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MoonshotClient(f"http://127.0.0.1:{port}/v1", KEY)
    try:
        chunks = await drain(client, chat())
    finally:
        await client.aclose()
        server.close()
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["zipped"]
