"""The benchmark's clients in processes of their own (`--clients K`), for a machine with the
cores to need them: one Python process cannot send and read what several API processes and
workers pass (it spends more CPU per request than the API does). Each run's requests are
dealt out to the K processes, each sending its share with a K-th of the run's concurrency, and
each keeps its connections open from one run to the next, as the in-process clients do.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from bench.measure import (
    Crowd,
    Sample,
    Sent,
    Shape,
    api_client,
    chat,
    chat_one,
    closed_loop,
    crowd,
    direct_one,
    moonq_one,
)
from moonq import collector
from worker.upstream import MoonshotClient


@dataclass(frozen=True)
class Part:
    """One load process's share of a run: the requests of these `indices`, `c` at a time."""

    kind: str  # "direct", "sse", "wait" (long-poll) or "chat"
    shape: Shape
    indices: tuple[int, ...]
    c: int  # at a time; with `together`, all at once instead
    fake_url: str  # the direct client's upstream
    api_url: str
    together: bool = False  # a crowd (the `--slow` row) rather than a closed loop


@dataclass
class Done:
    sent: Sent | None
    crowd: Crowd | None
    ids: set[str] = field(default_factory=set)


# In each load process: its event loop, kept from one part to the next with its clients.
_LOOP: asyncio.AbstractEventLoop | None = None
_CLIENTS: dict[tuple[str, str, int], Any] = {}


def _client(part: Part) -> Any:
    url = part.fake_url if part.kind == "direct" else part.api_url
    key = (url, part.kind, part.c)
    if key not in _CLIENTS:
        if part.kind == "direct":
            _CLIENTS[key] = MoonshotClient(f"{part.fake_url}/v1", "sk-bench", concurrency=part.c)
        else:
            _CLIENTS[key] = api_client(part.api_url, part.c)
    return _CLIENTS[key]


async def _send(part: Part) -> Done:
    ids: set[str] = set()
    client = _client(part)
    indices = part.indices

    def one(j: int) -> Awaitable[Sample]:
        body = chat(indices[j], part.shape)
        if part.kind == "direct":
            return direct_one(client, body)
        if part.kind == "chat":
            return chat_one(client, ids, body)
        return moonq_one(client, ids, body, poll=part.kind == "wait")

    if part.together:
        return Done(None, await crowd(len(indices), one), ids)
    return Done(await closed_loop(len(indices), part.c, one), None, ids)


def _part(part: Part) -> tuple[Done, float]:
    """Runs in a load process: its share, and the CPU seconds it took."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        atexit.register(_close)
    cpu = time.process_time()
    done = _LOOP.run_until_complete(_send(part))
    return done, time.process_time() - cpu


def _close() -> None:
    """Runs in a load process as it exits: its clients closed, so that it exits quietly."""
    if _LOOP is not None:
        for client in _CLIENTS.values():
            _LOOP.run_until_complete(client.aclose())
        _CLIENTS.clear()


class Load:
    """K load processes."""

    def __init__(self, k: int, fake_urls: list[str]) -> None:
        self.k, self.fake_urls = k, fake_urls
        # Set like moonq's servers' (thousands of streams' objects held at once): collector
        # pauses in a load process would count against whichever side it was reading.
        self.pool = ProcessPoolExecutor(k, get_context("spawn"), initializer=collector.tune)

    async def _parts(
        self, kind: str, shape: Shape, n: int, c: int, api_url: str, together: bool
    ) -> list[tuple[Done, float]]:
        loop, fakes = asyncio.get_running_loop(), self.fake_urls
        # `c` in flight in all (never more than `n`), dealt out, never rounded up: c=1 is one
        # process's one request. Each process holds some of the c slots and gets the requests
        # those slots would take in turn, so all of them end after the same number of rounds.
        c = min(c, n)
        k = min(self.k, c)
        shares = [c // k + (i < c % k) for i in range(k)]
        owner = [i for i, share in enumerate(shares) for _ in range(share)]  # slot → process
        dealt: list[list[int]] = [[] for _ in shares]
        for j in range(n):
            dealt[owner[j % c]].append(j)
        parts = [
            Part(kind, shape, tuple(dealt[i]), share, fakes[i % len(fakes)], api_url, together)
            for i, share in enumerate(shares)
        ]
        return await asyncio.gather(*(loop.run_in_executor(self.pool, _part, p) for p in parts))

    async def run(
        self, kind: str, shape: Shape, n: int, c: int, api_url: str, ids: set[str]
    ) -> Sent:
        done = await self._parts(kind, shape, n, c, api_url, together=False)
        for part, _ in done:
            ids |= part.ids
        samples = [s for part, _ in done for s in part.sent.samples]  # type: ignore[union-attr]
        return Sent(samples, sum(cpu for _, cpu in done))

    async def crowd(self, kind: str, shape: Shape, n: int, api_url: str, ids: set[str]) -> Crowd:
        done = await self._parts(kind, shape, n, n, api_url, together=True)
        for part, _ in done:
            ids |= part.ids
        return Crowd.merge([part.crowd for part, _ in done])  # type: ignore[misc]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
