"""One benchmark run: `n` requests `c` at a time, straight to the fake or through moonq, and
what they cost; and the clients that send them (the worker's own upstream client, moonq's job
SSE, long-poll and OpenAI-style `POST /v1/chat/completions`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_sse import aconnect_sse

from bench.stack import Stack
from worker.upstream import MoonshotClient

Body = dict[str, Any]
SENT_AT = "x_fake_sent_at"  # the fake's `stamp`: when it wrote the chunk (time.time())


def pct(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


@dataclass
class Sample:
    ttfc: float  # s from the request (the submit, for moonq) to the first upstream chunk
    total: float  # s from the request to the end of the stream / the `done` event
    post: float = math.nan  # the submit call alone
    job_id: str = ""
    done_at: float = 0.0  # wall clock, to line up with the job record's timestamps
    relay: list[float] = field(default_factory=list)  # s from the fake's write, each chunk

    def received(self, chunk: Any) -> None:
        if isinstance(chunk, dict) and SENT_AT in chunk:
            self.relay.append(time.time() - chunk[SENT_AT])


@dataclass
class Run:
    samples: list[Sample]
    wall: float
    cpu: dict[str, float] = field(default_factory=dict)  # ms per request; "rest" in cores
    peak: int = 0  # the upstream's peak of requests in flight
    phases: dict[str, float] = field(default_factory=dict)  # moonq: p50 ms of each phase
    pickup: list[float] = field(default_factory=list)  # moonq: s from created to started
    redis_per_chunk: float = 0.0  # Redis commands (scripts' inner ones too) per upstream chunk
    redis_cpu: float = 0.0  # Redis's CPU ms per request (server-wide)

    def pct(self, name: str, q: float) -> float:
        return pct((getattr(s, name) for s in self.samples), q)

    def relay(self, q: float) -> float:
        return pct((x for s in self.samples for x in s.relay), q)

    @property
    def rate(self) -> float:
        return len(self.samples) / self.wall


class Row(NamedTuple):
    name: str
    direct: list[Run]  # one per repeat, each paired with the moonq run made right after it
    moonq: list[Run]
    conc: str  # MOONQ_WORKER_CONCURRENCY / MOONQ_UPSTREAM_CONCURRENCY (the limiter's)


class Shape(NamedTuple):
    """What the fake answers: `chunks` content chunks `delay` s apart after `first` s; with
    `spread`, the delays of request i are spread ±20% (the same set both ways), so a closed
    loop of equal-length calls does not phase-lock with the worker's poll timer."""

    chunks: int
    delay: float
    first: float
    spread: bool = True
    stamp: bool = False  # each chunk carries the fake's send time, for the relay latency


def chat(i: int, shape: Shape) -> Body:
    """Request `i` of a run."""
    message = {"role": "user", "content": f"benchmark request {i}: summarise the quarterly report"}
    spread = 0.8 + 0.4 * (i * 0.618034 % 1) if shape.spread else 1.0
    steer: Body = {"chunks": shape.chunks, "delay": shape.delay * spread}
    steer["first_byte_delay"] = shape.first * spread
    if shape.stamp:
        steer["stamp"] = True
    return {"model": "moonshot-v1-8k", "messages": [message], "fake_moonshot": steer}


def api_client(url: str, n: int) -> httpx.AsyncClient:
    """A client of the API at `url` for `n` requests at once. Idle connections are dropped
    before uvicorn's 5 s keep-alive closes them: reusing one the server is closing at that
    moment fails the POST ("Server disconnected")."""
    limits = httpx.Limits(
        max_connections=2 * n, max_keepalive_connections=2 * n, keepalive_expiry=2.0
    )
    transport, timeout = AiohttpTransport(limits=limits), httpx.Timeout(90, connect=10)
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=timeout)


async def direct_one(client: MoonshotClient, body: Body) -> Sample:
    t0, s = time.perf_counter(), Sample(math.nan, math.nan)
    async with contextlib.aclosing(client.stream(body)) as chunks:
        async for chunk in chunks:
            s.received(chunk)
            if math.isnan(s.ttfc):
                s.ttfc = time.perf_counter() - t0
    s.total = time.perf_counter() - t0
    return s


async def moonq_one(http: httpx.AsyncClient, ids: set[str], body: Body, poll: bool) -> Sample:
    """Submit, then read the job's SSE events to `done` (or long-poll `?wait=`, when `poll`);
    the job's id goes into `ids` (the benchmark deletes those jobs at the end)."""
    t0 = time.perf_counter()
    response = await http.post("/v1/jobs", json={"body": body})
    response.raise_for_status()
    ids.add(job_id := response.json()["id"])
    s, end = Sample(math.nan, math.nan, time.perf_counter() - t0, job_id), "no terminal event"
    if poll:
        end = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()["status"]
        s.total, end = time.perf_counter() - t0, {"completed": "done"}.get(end, end)
    else:
        async with aconnect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            async for sse in source.aiter_sse():
                if not sse.data:  # httpx-sse's reading of the API's `: ping` every 15 s
                    continue
                if sse.event == "stream_error":  # the API lost Redis mid-stream
                    end = sse.event
                    break
                event = json.loads(sse.data)
                if event["event"] == "chunk":
                    s.received(event["data"])
                    if math.isnan(s.ttfc):
                        s.ttfc = time.perf_counter() - t0
                else:
                    s.total, end = time.perf_counter() - t0, event["event"]
    if end != "done":
        raise RuntimeError(f"job {job_id} ended with {end}")
    s.done_at = time.time() - (time.perf_counter() - t0 - s.total)  # wall clock at `done`
    return s


async def chat_one(http: httpx.AsyncClient, ids: set[str], body: Body) -> Sample:
    """The OpenAI drop-in: `POST /v1/chat/completions` with `"stream": true`, read as plain
    SSE lines to `data: [DONE]`; the job's id comes in `X-Moonq-Job-Id`."""
    t0, s = time.perf_counter(), Sample(math.nan, math.nan)
    request = {**body, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=request) as response:
        if response.status_code != 200:
            raise RuntimeError(
                f"chat completion: {response.status_code} {await response.aread()!r}"
            )
        ids.add(job_id := response.headers["X-Moonq-Job-Id"])
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            if (data := line[5:].strip()) == "[DONE]":
                s.total = time.perf_counter() - t0
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"job {job_id} failed: {chunk['error']}")
            s.received(chunk)
            if math.isnan(s.ttfc):
                s.ttfc = time.perf_counter() - t0
    if math.isnan(s.total):
        raise RuntimeError(f"job {job_id}: the stream ended before [DONE]")
    s.job_id, s.done_at = job_id, time.time() - (time.perf_counter() - t0 - s.total)
    return s


class Sent(NamedTuple):
    """What a run's clients brought back, and the CPU seconds of the load processes that sent
    it (0 when this process sent it: its CPU is counted as the client's)."""

    samples: list[Sample]
    cpu: float = 0.0


async def closed_loop(n: int, c: int, one: Callable[[int], Awaitable[Sample]]) -> Sent:
    """`n` requests, `c` at a time, from this process."""
    limit = asyncio.Semaphore(c)

    async def guarded(i: int) -> Sample:
        async with limit:
            return await one(i)

    return Sent(list(await asyncio.gather(*map(guarded, range(n)))))


async def batch(stack: Stack, n: int, chunks: int, send: Awaitable[Sent]) -> Run:
    """The `n` requests that `send` makes (a closed loop, here or in the load processes), with
    what they cost each process."""
    async with httpx.AsyncClient() as fake:
        for url in stack.fake_urls:
            await fake.post(f"{url}/_fake/reset")
        calls, redis_cpu = stack.redis_calls(), stack.redis_cpu()
        before, t0 = stack.cpu(), time.perf_counter()
        sent = await send
        run = Run(sent.samples, time.perf_counter() - t0)
        after = stack.cpu()
        run.redis_cpu = (stack.redis_cpu() - redis_cpu) * 1000 / n
        run.redis_per_chunk = (stack.redis_calls() - calls) / (n * chunks)
        # Each fake's own peak, summed: at most the upstream's (they may peak apart).
        peaks = [(await fake.get(f"{url}/_fake/stats")).json() for url in stack.fake_urls]
        run.peak = sum(p["peak_in_flight"] for p in peaks)
    after["client"] += sent.cpu
    run.cpu = {k: (after[k] - before[k]) * 1000 / n for k in before}
    rest = (run.cpu.pop("machine") - sum(run.cpu.values())) * n / run.wall / 1000
    run.cpu["rest"] = max(0.0, rest)  # ticks are 10 ms: tiny negatives are rounding
    if run.samples[0].job_id:
        split_phases(stack, run)
    return run


def split_phases(stack: Stack, run: Run) -> None:
    """moonq's time split with the job records' timestamps."""
    split = phases(stack, run.samples)
    run.pickup = split["queued"]
    run.phases = {k: pct(v, 0.5) * 1000 for k, v in split.items()}


def phases(stack: Stack, samples: list[Sample]) -> dict[str, list[float]]:
    """Each sample's time queued (created → started), in the worker (started → completed),
    and in delivery (completed → `done` at the client), s, from its job record."""
    fields = ["created_at", "started_at", "completed_at"]
    with stack.redis.pipeline(transaction=False) as pipe:
        for s in samples:
            pipe.hmget(f"{stack.prefix}:job:{s.job_id}", fields)
        rows = pipe.execute()
    # A record without its times (gone, or never started) has no phases: left out, rather
    # than losing a whole run's report to it.
    found = [
        (s, [float(v) for v in row])
        for s, row in zip(samples, rows, strict=True)
        if None not in row
    ]
    return {
        "queued": [t[1] - t[0] for _, t in found],
        "worker run": [t[2] - t[1] for _, t in found],
        "delivery": [s.done_at - t[2] for s, t in found],
    }


@dataclass
class Crowd:
    """`n` streams started together: those that completed, and why the others did not."""

    n: int
    samples: list[Sample]
    errors: Counter[str]
    wall: float  # s until the last one ended
    rss: dict[str, float] = field(default_factory=dict)  # moonq: peak RSS (MiB) meanwhile
    rss_since: str = "the crowd began"  # or "the start", where the kernel cannot reset it
    cpu: dict[str, float] = field(default_factory=dict)  # moonq: CPU ms per stream, by server
    phases: dict[str, list[float]] = field(default_factory=dict)  # moonq: `phases`, completed

    @classmethod
    def merge(cls, parts: list[Crowd]) -> Crowd:
        """One crowd of the parts sent by the load processes, all started together."""
        errors: Counter[str] = Counter()
        for part in parts:
            errors.update(part.errors)
        samples = [s for part in parts for s in part.samples]
        return cls(sum(p.n for p in parts), samples, errors, max(p.wall for p in parts))


async def crowd(n: int, one: Callable[[int], Awaitable[Sample]]) -> Crowd:
    """`n` requests at once; a failed one is counted, not raised."""

    async def guarded(i: int) -> Sample | BaseException:
        try:
            return await one(i)
        except Exception as exc:  # a crowd is measured by how many get through
            return exc

    t0 = time.perf_counter()
    ended = await asyncio.gather(*map(guarded, range(n)))
    wall = time.perf_counter() - t0
    errors = Counter(error_line(e) for e in ended if not isinstance(e, Sample))
    return Crowd(n, [s for s in ended if isinstance(s, Sample)], errors, wall)


def error_line(exc: BaseException) -> str:
    """An error as one line of a table cell: its type and first line, job ids left out (so
    like errors count together), at most 120 characters."""
    first = str(exc).split("\n", 1)[0].replace("|", "/")
    return re.sub(r"job_[0-9a-f]{32}", "job_…", f"{type(exc).__name__}: {first}")[:120]
