"""The Moonshot (OpenAI-compatible) client: httpx over the aiohttp transport, always streaming.

The aiohttp transport's pool defaults to 100 connections; it is sized to the worker's
concurrency here (DESIGN.md: plain httpx's pool degrades badly under concurrency).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_sse import EventSource, SSEError

from moonq import errors
from moonq.settings import Settings


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
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            transport=transport or AiohttpTransport(limits=limits),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"},
        )

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
        if self._include_usage and "stream_options" not in body:
            request["stream_options"] = {"include_usage": True}
        try:
            async with self._http.stream("POST", "chat/completions", json=request) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace")
                    raise errors.from_response(response.status_code, text, response.headers)
                async for chunk in _chunks(EventSource(response)):
                    yield chunk
        except httpx.TransportError as exc:
            raise self._redact(errors.from_transport(exc)) from exc
        except aiohttp.ClientError as exc:
            # Not mapped by the transport (e.g. a malformed status line). Its repr carries the
            # request headers, the key among them: keep only the kind of failure.
            raise errors.UpstreamProtocolError(
                f"the upstream answer could not be read ({type(exc).__name__})"
            ) from None
        except errors.UpstreamError as exc:
            raise self._redact(exc) from exc.__cause__

    def _redact(self, error: errors.UpstreamError) -> errors.UpstreamError:
        """Upstreams may echo the key in an error message; the job's error must not keep it."""
        if self._key and self._key in error.message:
            error.message = error.message.replace(self._key, "***")
            error.args = (error.message,)
        return error


async def _chunks(source: EventSource) -> AsyncIterator[dict[str, Any]]:
    done = False
    try:
        async for sse in source.aiter_sse():
            if sse.data.strip() == "[DONE]":
                done = True
                break
            if not sse.data:
                continue
            yield _parse(sse.data)
    except SSEError as exc:
        raise errors.UpstreamProtocolError(f"not an event stream: {exc}") from exc
    if not done:
        raise errors.UpstreamConnectionError(
            "the upstream stream ended before [DONE]", type="stream_interrupted"
        )


def _parse(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise errors.UpstreamProtocolError("the upstream sent a chunk that is not JSON") from exc
    if not isinstance(chunk, dict):
        raise errors.UpstreamProtocolError("the upstream sent a chunk that is not an object")
    if "error" in chunk and "choices" not in chunk:
        raise errors.from_stream_error(chunk["error"])
    return chunk
