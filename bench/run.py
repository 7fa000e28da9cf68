"""How much does the queue cost next to calling the upstream directly?

Starts the fake upstream, the API and a worker as real processes (the `moonq` console script) on
127.0.0.1 with real Redis, sends the same streamed requests straight to the fake and through
moonq at a few concurrency levels, side by side in one run, and prints (and writes to
bench/RESULTS.md) Markdown tables of moonq/direct ratios. Bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import httpx
import redis
from httpx_aiohttp import AiohttpTransport
from httpx_sse import aconnect_sse

from tests.procs import Proc, clean_env, free_port, start, wait_http
from worker.upstream import MoonshotClient

ARQ_PREFIXES = ("arq:job:", "arq:in-progress:", "arq:result:", "arq:retry:")
PROCS = ("fake", "api", "worker", "client")
TICK = os.sysconf("SC_CLK_TCK")
Body = dict[str, Any]


@dataclass
class Sample:
    ttfc: float  # s from the request (the submit, for moonq) to the first upstream chunk
    total: float  # s from the request to the end of the stream / the `done` event
    post: float = math.nan  # the submit call alone
    job_id: str = ""
    done_at: float = 0.0  # wall clock, to line up with the job record's timestamps


@dataclass
class Run:
    samples: list[Sample]
    wall: float
    cpu: dict[str, float] = field(default_factory=dict)  # ms per request; "rest" in cores
    peak: int = 0  # the upstream's peak of requests in flight
    phases: dict[str, float] = field(default_factory=dict)  # moonq: p50 ms of each phase
    redis_per_chunk: float = 0.0  # Redis commands (scripts' inner ones too) per upstream chunk

    def pct(self, name: str, q: float) -> float:
        values: list[float] = sorted(getattr(s, name) for s in self.samples)
        return values[max(0, math.ceil(q * len(values)) - 1)]


class Row(NamedTuple):
    name: str
    direct: Run
    moonq: Run
    conc: str  # MOONQ_WORKER_CONCURRENCY / MOONQ_UPSTREAM_CONCURRENCY (the limiter's)


class Stack:
    """The fake upstream, the API and one worker, started as users start them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.prefix = args, f"bench{uuid.uuid4().hex[:10]}"
        self.workdir = Path(tempfile.mkdtemp(prefix="moonq-bench-"))
        self.ports = {"fake": free_port(), "api": free_port()}
        self.fake_url, self.api_url = (f"http://127.0.0.1:{p}" for p in self.ports.values())
        self.procs: dict[str, Proc] = {}
        self.job_ids: set[str] = set()
        self.redis = redis.Redis.from_url(args.redis_url)

    def env(self, worker: int, limit: int) -> dict[str, str]:
        """RPM and TPM limits off: the benchmark sends far more than a real account may."""
        env = {
            "REDIS_URL": self.args.redis_url,
            "MOONQ_KEY_PREFIX": self.prefix,
            "MOONQ_QUEUE_NAME": f"{self.prefix}:queue",
            "MOONSHOT_BASE_URL": f"{self.fake_url}/v1",
            "MOONSHOT_API_KEY": "sk-bench",
            "MOONQ_API_KEYS": "",
            "MOONQ_WORKER_CONCURRENCY": str(worker),
            "MOONQ_UPSTREAM_CONCURRENCY": str(limit),
            "MOONQ_UPSTREAM_RPM": "0",
            "MOONQ_UPSTREAM_TPM": "0",
        }
        return clean_env(**env | dict(item.split("=", 1) for item in self.args.env))

    def up(self, concurrency: int) -> None:
        for name, ready in (("fake", "/_fake/stats"), ("api", "/readyz")):
            args = ["fake-moonshot" if name == "fake" else name, "--port", str(self.ports[name])]
            self.procs[name] = start(name, args, self.env(concurrency, concurrency), self.workdir)
            wait_http(f"http://127.0.0.1:{self.ports[name]}{ready}", self.procs[name])
        self.start_worker(concurrency, concurrency)

    def start_worker(self, worker: int, limit: int) -> None:
        if "worker" in self.procs:
            self.procs.pop("worker").stop()
        proc = start(f"worker{worker}-{limit}", ["worker"], self.env(worker, limit), self.workdir)
        self.procs["worker"], deadline = proc, time.monotonic() + 20
        while "moonq worker:" not in proc.output():  # logged at the end of its startup
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{proc.output()}")
            time.sleep(0.05)

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each process and of the whole machine. Redis's own counters are
        server-wide (other users of this Redis would show up in them), so it is in "rest"."""
        busy = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        found = {"client": time.process_time(), "machine": (sum(busy) - busy[3] - busy[4]) / TICK}
        for name in PROCS[:-1]:
            stat = Path(f"/proc/{self.procs[name].popen.pid}/stat").read_text().rsplit(")")[-1]
            found[name] = sum(map(int, stat.split()[11:13])) / TICK
        return found

    def redis_calls(self) -> int:
        """Commands Redis has run, those run inside scripts included (server-wide: nothing
        else should use this Redis while the benchmark runs)."""
        stats: dict[str, dict[str, int]] = self.redis.info("commandstats")  # type: ignore[assignment]
        return sum(entry["calls"] for entry in stats.values())

    def peak_rss(self) -> dict[str, float]:
        """The API's and the current worker's peak resident memory (VmHWM), MiB."""
        found = {}
        for name in ("api", "worker"):
            status = Path(f"/proc/{self.procs[name].popen.pid}/status").read_text()
            kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
            found[name] = int(kib) / 1024
        return found

    def down(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        doomed = list(self.redis.scan_iter(f"{self.prefix}:*", count=1000))
        ids = self.job_ids | {k.decode().rsplit(":", 1)[1] for k in doomed if b":job:" in k}
        doomed += [p + i for i in ids for p in ARQ_PREFIXES]
        for i in range(0, len(doomed), 500):
            self.redis.delete(*doomed[i : i + 500])
        self.redis.close()


def chat(i: int, chunks: int, delay: float, first: float) -> Body:
    """Request `i`; its delays are spread ±20% (the same set both ways), so a closed loop of
    equal-length calls does not phase-lock with the worker's poll timer."""
    message = {"role": "user", "content": f"benchmark request {i}: summarise the quarterly report"}
    spread = 0.8 + 0.4 * (i * 0.618034 % 1)
    steer = {"chunks": chunks, "delay": delay * spread, "first_byte_delay": first * spread}
    return {"model": "moonshot-v1-8k", "messages": [message], "fake_moonshot": steer}


async def direct_one(client: MoonshotClient, body: Body) -> Sample:
    t0, first = time.perf_counter(), math.nan
    async with contextlib.aclosing(client.stream(body)) as chunks:
        async for _ in chunks:
            if math.isnan(first):
                first = time.perf_counter() - t0
    return Sample(first, time.perf_counter() - t0)


async def moonq_one(http: httpx.AsyncClient, stack: Stack, body: Body, poll: bool) -> Sample:
    """Submit, then read the job's SSE events to `done` (or long-poll `?wait=`, when `poll`)."""
    t0 = time.perf_counter()
    response = await http.post("/v1/jobs", json={"body": body})
    response.raise_for_status()
    stack.job_ids.add(job_id := response.json()["id"])
    s, end = Sample(math.nan, math.nan, time.perf_counter() - t0, job_id), "no terminal event"
    if poll:
        end = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()["status"]
        s.total, end = time.perf_counter() - t0, {"completed": "done"}.get(end, end)
    else:
        async with aconnect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            async for sse in source.aiter_sse():
                event = json.loads(sse.data)["event"]
                if event == "chunk" and math.isnan(s.ttfc):
                    s.ttfc = time.perf_counter() - t0
                elif event != "chunk":
                    s.total, end = time.perf_counter() - t0, event
    if end != "done":
        raise RuntimeError(f"job {job_id} ended with {end}")
    s.done_at = time.time() - (time.perf_counter() - t0 - s.total)  # wall clock at `done`
    return s


async def batch(stack: Stack, n: int, c: int, one: Callable[[int], Awaitable[Sample]]) -> Run:
    """`n` requests, `c` at a time (a closed loop), with what they cost each process."""
    limit = asyncio.Semaphore(c)

    async def guarded(i: int) -> Sample:
        async with limit:
            return await one(i)

    async with httpx.AsyncClient(base_url=stack.fake_url) as fake:
        await fake.post("/_fake/reset")
        calls, before, t0 = stack.redis_calls(), stack.cpu(), time.perf_counter()
        run = Run(list(await asyncio.gather(*map(guarded, range(n)))), time.perf_counter() - t0)
        after = stack.cpu()
        run.redis_per_chunk = (stack.redis_calls() - calls) / (n * stack.args.chunks)
        run.peak = (await fake.get("/_fake/stats")).json()["peak_in_flight"]
    run.cpu = {k: (after[k] - before[k]) * 1000 / n for k in before}
    rest = (run.cpu.pop("machine") - sum(run.cpu.values())) * n / run.wall / 1000
    run.cpu["rest"] = max(0.0, rest)  # ticks are 10 ms: tiny negatives are rounding
    if run.samples[0].job_id:  # moonq: split its time with the job records' timestamps
        fields = ["created_at", "started_at", "completed_at"]
        with stack.redis.pipeline(transaction=False) as pipe:
            for s in run.samples:
                pipe.hmget(f"{stack.prefix}:job:{s.job_id}", fields)
            times = [[float(v) for v in row] for row in pipe.execute()]
        split = {
            "queued": [t[1] - t[0] for t in times],
            "worker run": [t[2] - t[1] for t in times],
            "delivery": [s.done_at - t[2] for s, t in zip(run.samples, times, strict=True)],
        }
        run.phases = {k: sorted(v)[(len(v) - 1) // 2] * 1000 for k, v in split.items()}
    return run


async def measure(stack: Stack, args: argparse.Namespace) -> list[Row]:
    top, rows = max(args.levels), list[Row]()
    # Idle connections are dropped before uvicorn's 5 s keep-alive closes them: reusing one the
    # server is closing at that moment fails the POST ("Server disconnected").
    limits = httpx.Limits(
        max_connections=2 * top, max_keepalive_connections=2 * top, keepalive_expiry=2.0
    )
    client = MoonshotClient(f"{stack.fake_url}/v1", "sk-bench", concurrency=top)
    transport, timeout = AiohttpTransport(limits=limits), httpx.Timeout(90, connect=10)
    http = httpx.AsyncClient(base_url=stack.api_url, transport=transport, timeout=timeout)
    direct = partial(direct_one, client)
    sse, wait = (
        partial(moonq_one, http, stack, poll=False),
        partial(moonq_one, http, stack, poll=True),
    )

    def run(one: Callable[[Body], Awaitable[Sample]], c: int, warm: bool = False) -> Awaitable[Run]:
        shape = (2, 0.0, 0.0) if warm else (args.chunks, args.delay, args.first_byte)
        n = args.requests or max(20, 4 * c)
        return batch(stack, n, c, lambda i: one(chat(i, *shape)))

    async def warm_up() -> None:  # every connection pool on the way, at the top level
        await run(direct, top, warm=True)
        await run(sse, top, warm=True)

    try:
        await warm_up()
        for c in args.levels:
            d, fair = await run(direct, c), f"{top}/{top}"
            rows.append(Row(f"c={c}, SSE", d, await run(sse, c), fair))
            if c == args.wait_level:
                rows.append(Row(f"c={c}, long-poll ?wait=", d, await run(wait, c), fair))
        q = args.queued
        for name, worker, limit in (("the worker", q, q), ("the limiter", top, q)):
            if 0 < q < top:  # more jobs than slots: moonq holds them back, by design
                await asyncio.to_thread(stack.start_worker, worker, limit)
                await warm_up()
                d, m = await run(direct, top), await run(sse, top)
                rows.append(Row(f"c={top}, SSE, queued by {name}", d, m, f"{worker}/{limit}"))
    finally:
        await http.aclose()
        await client.aclose()
    return rows


def num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"


def ratio(d: float, m: float, unit: str = "ms", scale: float = 1000) -> str:
    if math.isnan(d) or math.isnan(m):
        return "–"
    return f"**{m / d:.2f}×** ({num(d * scale)}→{num(m * scale)} {unit})"


def cells(r: Row) -> tuple[list[str], list[str]]:
    d, m = r.direct, r.moonq
    head = [r.name, str(len(m.samples)), r.conc, f"{d.peak}/{m.peak}"]
    head += [ratio(d.pct(k, q), m.pct(k, q)) for k in ("ttfc", "total") for q in (0.5, 0.95)]
    head.append(ratio(len(d.samples) / d.wall, len(m.samples) / m.wall, "req/s", 1))
    head.append(f"+{num((m.pct('total', 0.5) - d.pct('total', 0.5)) * 1000)}")
    cost = [r.name, num(m.pct("post", 0.5) * 1000), *(num(v) for v in m.phases.values())]
    cost.insert(4, num(d.pct("total", 0.5) * 1000))
    cost += [f"{num(d.cpu[k])}→{num(m.cpu[k])}" for k in PROCS]
    return head, [*cost, f"{d.cpu['rest']:.2f}→{m.cpu['rest']:.2f}", f"{m.redis_per_chunk:.1f}"]


HEADS = (
    "scenario | n | worker/limiter conc. | upstream peak in flight (direct/moonq) | TTFC p50 "
    "| TTFC p95 | total p50 | total p95 | throughput | overhead p50 (ms)",
    "scenario | submit POST | queued | worker run | direct total | delivery | CPU ms/req: fake "
    "| api | worker | client | Redis + other load (cores) | Redis commands per chunk",
)
NOTE = (
    "**Where moonq's time goes** (p50 ms; queued = created→started, worker run = started→"
    "completed, delivery = completed→`done` at the client; CPU per request, direct→moonq, the "
    "direct figures for api/worker being their idle cost)"
)


def report(args: argparse.Namespace, rows: list[Row], elapsed: float, redis_version: str) -> str:
    tables = []
    for head, lines in zip(HEADS, zip(*map(cells, rows), strict=True), strict=True):
        rule = "|---" * (head.count("|") + 1) + "|"
        tables.append("\n".join([f"| {head} |", rule, *(f"| {' | '.join(x)} |" for x in lines)]))
    env = "".join(f", {item}" for item in args.env)
    return f"""# moonq benchmark: the queue next to calling the upstream directly

- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; run time {elapsed:.0f} s (`make bench`: defaults)
- machine: nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, \
{platform.platform()}, Redis {redis_version}; the fake, API, worker, Redis and this client \
share these cores
- parameters: the upstream answers after {args.first_byte * 1000:.0f} ms with \
{args.chunks} content chunks {args.delay * 1000:.0f} ms apart (delays ±20% per request); \
levels {args.levels}, {args.requests or "max(20, 4×level)"} requests each, after a warm-up; \
MOONQ_UPSTREAM_RPM/TPM=0 (off), other settings default{env}
- ratio = moonq / direct (time: >1 is slower; throughput: <1 is fewer per second). moonq times \
count from the submit call; TTFC = time to the first upstream chunk.

{tables[0]}

{NOTE}

{tables[1]}
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    add = cli.add_argument
    add("--chunks", type=int, default=20, help="content chunks per answer")
    add("--delay", type=float, default=0.025, help="seconds between chunks")
    add("--first-byte", type=float, default=0.2, help="seconds before the upstream answers")
    add("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 50, 200])
    add("--requests", type=int, default=0, help="per level (0: max(20, 4×level))")
    add("--queued", type=int, default=50, help="concurrency of the queued rows (0: none)")
    add("--wait-level", type=int, default=50, help="the level with a long-poll row")
    add("--env", action="append", default=[], help="KEY=VALUE for moonq, e.g. MOONQ_POLL_DELAY")
    add("--redis-url", default="redis://127.0.0.1:6379/11")
    add("--budget", type=float, default=170.0, help="seconds of measuring before giving up")
    add("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = cli.parse_args(argv)
    if urlparse(args.redis_url).hostname not in ("127.0.0.1", "localhost"):
        cli.error("the benchmark talks only to 127.0.0.1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t0, stack = time.monotonic(), Stack(args)
    try:
        stack.up(max(args.levels))
        rows = asyncio.run(asyncio.wait_for(measure(stack, args), args.budget))
        server: Any = stack.redis.info("server")
        rss = stack.peak_rss()
    except BaseException:
        for proc in stack.procs.values():
            print(f"--- {proc.name} log (tail) ---\n{proc.output()[-3000:]}", file=sys.stderr)
        raise
    finally:
        stack.down()
    text = report(args, rows, time.monotonic() - t0, str(server["redis_version"]))
    text += f"\nPeak RSS (VmHWM): API {rss['api']:.0f} MiB, worker {rss['worker']:.0f} MiB.\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
