"""The Moonshot (OpenAI-compatible) client: httpx over the aiohttp transport, always streaming.

The aiohttp transport's pool defaults to 100 connections; it is sized to the worker's
concurrency here (DESIGN.md: plain httpx's pool degrades badly under concurrency).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_sse import EventSource, SSEError

from moonq import errors, serde
from moonq.settings import Settings

# Moonshot's account endpoints (token counts, balance) answer at once or not usefully at all.
ACCOUNT_TIMEOUT = 3.0
_JSON = {"Accept": "application/json"}


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
        if self._include_usage:  # usage is what budgets and the ledger count: always asked
            options = body.get("stream_options")
            request["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
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
    """One chunk, as strict JSON (orjson: no `NaN` or `Infinity`, which a result cannot carry
    to a client, and a bounded depth): anything else is a malformed chunk."""
    try:
        chunk = serde.loads(data)
    except ValueError as exc:
        raise errors.UpstreamProtocolError("the upstream sent a chunk that is not JSON") from exc
    if not isinstance(chunk, dict):
        raise errors.UpstreamProtocolError("the upstream sent a chunk that is not an object")
    if "error" in chunk and "choices" not in chunk:
        raise errors.from_stream_error(chunk["error"])
    return chunk
