"""The Moonshot (OpenAI-compatible) client: httpx over the aiohttp transport, always streaming.

The aiohttp transport's pool defaults to 100 connections; it is sized to the worker's
concurrency here (DESIGN.md: plain httpx's pool degrades badly under concurrency).

The stream's events are read straight from its bytes (`EventData`), not through httpx's text
and line iterators and httpx-sse's decoder: that layering, a few generators deep for every
network read, cost the worker more than the chunk's JSON parse (a fifth of reading a stream).
Those bytes come straight from aiohttp's reader where they can (`_Transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import httpx
from aiohttp.http_exceptions import HttpProcessingError
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp import transport as aiohttp_transport

from moonq import errors, serde
from moonq.settings import Settings

# Moonshot's account endpoints (token counts, balance) answer at once or not usefully at all.
ACCOUNT_TIMEOUT = 3.0
_JSON = {"Accept": "application/json"}
_JSON_BODY = {"Content-Type": "application/json"}
_BOM = "\ufeff".encode()
# After [DONE], what is left of the body (as a rule only the end of its chunked encoding) is
# read for at most this long: a connection whose body was not read to its end is closed rather
# than kept, and the next job opens another (a TLS handshake, with the real upstream).
DRAIN_PATIENCE = 0.05
# The extension under which `_Transport` hands over an answer's body as aiohttp reads it, and
# how httpx-aiohttp maps aiohttp's errors to httpx's (reading the body, they must be the same).
_BODY = "moonq.aiohttp_body"
_MAP_ERRORS = getattr(aiohttp_transport, "map_aiohttp_exceptions", None)


class _SetCookies(httpx.Cookies):
    """httpx's cookie jar, reading only answers that set a cookie. httpx hands every response
    to the jar, first building urllib's request and response stand-ins for it (~5 % of the
    worker's CPU at the queue's ceiling), though the jar reads nothing but the `Set-Cookie`
    and `Set-Cookie2` headers, which Moonshot's answers do not carry."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


class _Transport(AiohttpTransport):
    """httpx-aiohttp's transport, its answers also carrying their bodies as aiohttp reads them.

    httpx hands each network read of a body through four async generators (the transport's
    stream, httpx's stream bound to the answer, `aiter_raw`, `aiter_bytes`), each resumed
    and suspended again for every chunk of a stream: ~7 µs of the worker's CPU a chunk
    (measured: 300 streams at once of 20 chunks 50 ms apart, ~46 → ~40 µs a chunk in all).
    `_chunks` reads aiohttp's reader instead when the body is not compressed (aiohttp is told
    not to decompress; httpx decodes a compressed body, so that one still goes through
    httpx), under the transport's own mapping of aiohttp's errors to httpx's; the answer is
    still closed by httpx. Where the installed httpx-aiohttp keeps its answer elsewhere, or
    maps its errors elsewhere, bodies go through httpx as before."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        answer = getattr(response.stream, "_aiohttp_response", None)
        if isinstance(answer, aiohttp.ClientResponse):
            response.extensions[_BODY] = answer.content
        return response


class MoonshotClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int = 50,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        include_usage: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._key = api_key
        self._include_usage = include_usage
        self._missing: set[str] = set()  # account endpoints this upstream answered 404/405 to
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        # Built once: httpx parses and merges a URL given as text on every request.
        self._chat_url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            transport=transport or _Transport(limits=limits),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"},
        )
        self._http._cookies = _SetCookies()  # as httpx's `Cookies(None)`, which it was

    @classmethod
    def from_settings(
        cls, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> MoonshotClient:
        return cls(
            settings.moonshot_base_url,
            settings.upstream_key,
            concurrency=settings.worker_concurrency,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            include_usage=settings.stream_usage,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Each upstream chunk object, in order; raises `UpstreamError` (chained) on any failure.

        Leaving the iteration early closes the upstream connection.
        """
        request = {**body, "stream": True}
        if self._include_usage:  # usage is what budgets and the ledger count: always asked
            options = body.get("stream_options")
            request["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        try:
            content = serde.dump_bytes(request)
            async with self._http.stream(
                "POST", self._chat_url, content=content, headers=_JSON_BODY
            ) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace")
                    raise errors.from_response(response.status_code, text, response.headers)
                async for chunk in _chunks(response):
                    yield chunk
        except httpx.TransportError as exc:
            raise self._redact(errors.from_transport(exc)) from exc
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            # Not mapped by the transport (e.g. a malformed status line). Its repr carries the
            # request headers, the key among them: keep only the kind of failure.
            raise errors.UpstreamProtocolError(
                f"the upstream answer could not be read ({type(exc).__name__})"
            ) from None
        except errors.UpstreamError as exc:
            raise self._redact(exc) from exc.__cause__

    async def estimate_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        """The upstream's exact prompt token count (Moonshot's `tokenizers/estimate-token-count`),
        or None: the upstream lacks the endpoint (asked once), or it failed or was slow."""
        request = {k: body[k] for k in ("model", "messages", "tools") if k in body}
        data = await self._account_call("POST", "tokenizers/estimate-token-count", json=request)
        count = data.get("total_tokens") if data else None
        return count if type(count) is int and count >= 0 else None

    async def available_balance(self) -> float | None:
        """The account's available balance (Moonshot's `users/me/balance`), or None when the
        upstream lacks the endpoint or it failed: the caller cannot tell."""
        data = await self._account_call("GET", "users/me/balance")
        balance = data.get("available_balance") if data else None
        if isinstance(balance, bool) or not isinstance(balance, int | float):
            return None
        return float(balance) if math.isfinite(balance) else None

    async def _account_call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        """The `data` object of an account endpoint's answer; None on any failure, never an
        exception: these answers only refine what moonq can do without them."""
        if path in self._missing:
            return None
        try:
            async with asyncio.timeout(ACCOUNT_TIMEOUT):
                response = await self._http.request(method, path, headers=_JSON, **kwargs)
            if response.status_code in (404, 405):
                self._missing.add(path)  # not an endpoint of this upstream: stop asking
            data = response.json().get("data") if response.status_code == 200 else None
        except Exception:  # any failure (a bug in a transport included) means "unknown"
            return None
        return data if isinstance(data, dict) else None

    def _redact(self, error: errors.UpstreamError) -> errors.UpstreamError:
        """Upstreams may echo the key in an error message; the job's error must not keep it."""
        if self._key and self._key in error.message:
            error.message = error.message.replace(self._key, "***")
            error.args = (error.message,)
        return error


class EventData:
    """The data of each server-sent event in a stream of bytes, as the SSE spec reads it (lines
    end in CRLF, LF or CR; a blank line ends an event; `data` lines join with LF; comments and
    the other fields are skipped; a first byte-order mark is dropped). Only the data: that is
    all an OpenAI-compatible stream carries. An event cut off by the stream's end is dropped."""

    __slots__ = ("_cr", "_data", "_first", "_rest")

    def __init__(self) -> None:
        self._rest: list[bytes] = []  # the start of a line not yet ended, piece by piece
        self._data: list[bytes] | None = None  # the data lines of the event being read
        self._first = True  # nothing read yet: a byte-order mark may come
        self._cr = False  # the last line ended in CR: a LF first is that CR's

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of the events that end in `chunk` (with what came before it)."""
        events: list[bytes] = []
        for line in self._lines(chunk):
            if not line:
                if self._data is not None:
                    events.append(b"\n".join(self._data))
                    self._data = None
            elif line[0] != 58:  # not a comment (":")
                field, _, value = line.partition(b":")
                if field == b"data":
                    if self._data is None:
                        self._data = []
                    self._data.append(value[1:] if value[:1] == b" " else value)
        return events

    def _lines(self, chunk: bytes) -> list[bytes]:
        """The lines that end in `chunk`, without their ends."""
        if self._cr and chunk:
            self._cr = False
            chunk = chunk.removeprefix(b"\n")
        if not self._first and b"\n" not in chunk and b"\r" not in chunk:
            if chunk:  # no line ends here: kept as a piece, not copied with the line so far
                self._rest.append(chunk)
            return []
        if self._rest:
            self._rest.append(chunk)
            buf = b"".join(self._rest)
        else:
            buf = chunk
        self._rest = []
        if self._first and buf:
            if _BOM.startswith(buf) and buf != _BOM:
                self._rest = [buf]  # perhaps a mark's first bytes: wait for the rest
                return []
            self._first = False
            buf = buf.removeprefix(_BOM)
        if b"\r" in buf:
            self._cr = buf.endswith(b"\r")
            lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        else:
            lines = buf.split(b"\n")
        rest = lines.pop()
        if rest:
            self._rest = [rest]
        return lines


async def _chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    content_type = response.headers.get("content-type", "").partition(";")[0]
    if "text/event-stream" not in content_type:
        raise errors.UpstreamProtocolError(
            f"not an event stream: the upstream answered with Content-Type {content_type!r}"
        )
    events = EventData()
    reader: aiohttp.StreamReader | None = response.extensions.get(_BODY)
    stream: AsyncIterator[bytes]
    errors_mapped: contextlib.AbstractContextManager[Any]
    if reader is None or _MAP_ERRORS is None or "content-encoding" in response.headers:
        stream, errors_mapped = response.aiter_bytes(), contextlib.nullcontext()
    else:  # straight from aiohttp (`_Transport`), its errors mapped as httpx-aiohttp maps them
        stream, errors_mapped = reader.iter_any(), _MAP_ERRORS()
    with errors_mapped:
        async for raw in stream:
            for data in events.feed(raw):
                if data.strip() == b"[DONE]":
                    await _read_rest(stream)
                    return
                if data:
                    yield _parse(data)
    raise errors.UpstreamConnectionError(
        "the upstream stream ended before [DONE]", type="stream_interrupted"
    )


async def _read_rest(stream: AsyncIterator[bytes]) -> None:
    """The body's end, after [DONE], so that its connection goes back to the pool: read for at
    most DRAIN_PATIENCE and dropped; a failure or a wait past it only costs the connection."""
    try:
        async with asyncio.timeout(DRAIN_PATIENCE):
            async for _ in stream:
                pass
    except Exception:  # any (a parser's own error too): the answer is whole, the connection lost
        pass


def _parse(data: bytes) -> dict[str, Any]:
    """One chunk, as strict JSON (orjson: no `NaN` or `Infinity`, which a result cannot carry
    to a client, and a bounded depth): anything else is a malformed chunk. Bytes that are not
    UTF-8 are read as the replacement character, as a text decoder reads them."""
    try:
        chunk = serde.loads(data)
    except ValueError as exc:
        try:  # perhaps not UTF-8 (orjson refuses it): each bad byte a replacement character
            chunk = serde.loads(data.decode("utf-8", "replace"))
        except ValueError:
            raise errors.UpstreamProtocolError(
                "the upstream sent a chunk that is not JSON"
            ) from exc
    if not isinstance(chunk, dict):
        raise errors.UpstreamProtocolError("the upstream sent a chunk that is not an object")
    if "error" in chunk and "choices" not in chunk:
        raise errors.from_stream_error(chunk["error"])
    return chunk
