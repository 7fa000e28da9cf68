"""What the dashboard costs: the API's CPU with 10 dashboards open, under load and idle.

Real processes as in bench/run.py (the fake upstream, the API, one worker, real Redis; the
API open, so every dashboard is an admin's, the most a view reads). The same load (c=50
streamed jobs, through SSE) runs with no dashboard open, then with `--dashboards` open on six
different views (the status filters: each view is built once a second whatever the number of
dashboards showing it), in turn, `--repeat` times; then the machine idles 10 s each way.
Prints a table and writes it to bench/DASHBOARD_RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.measure import Run, Sample, Shape, batch, chat, closed_loop, moonq_one
from bench.run import Stack

FILTERS = ["", "queued", "in_progress", "completed", "failed", "cancelled"]


@dataclass
class Watchers:
    """Open dashboards: what their feeds sent."""

    snapshots: int = 0
    received: int = 0  # bytes
    opened: float = field(default_factory=time.monotonic)
    closed: float = 0.0
    counted: tuple[int, int] = (0, 0)  # snapshots and bytes before the block

    def per_second(self, n: int) -> tuple[float, float]:
        """Snapshots and bytes per second per dashboard while the block ran."""
        took = n * (self.closed - self.opened)
        return (self.snapshots - self.counted[0]) / took, (self.received - self.counted[1]) / took


async def _watch(http: httpx.AsyncClient, status: str, into: Watchers) -> None:
    params = {"status": status} if status else {}
    async with http.stream("GET", "/dashboard/feed", params=params) as feed:
        feed.raise_for_status()
        async for text in feed.aiter_lines():
            into.received += len(text) + 1
            if text == "event: snapshot":
                into.snapshots += 1


@contextlib.asynccontextmanager
async def dashboards(url: str, n: int) -> AsyncIterator[Watchers]:
    """`n` dashboards' feeds open, on the filters in turn, for as long as the block runs."""
    found = Watchers()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30)) as http:
        tasks = [asyncio.create_task(_watch(http, FILTERS[i % 6], found)) for i in range(n)]
        await asyncio.sleep(1.5)  # every feed open and sending
        found.opened, found.counted = time.monotonic(), (found.snapshots, found.received)
        try:
            yield found
        finally:
            found.closed = time.monotonic()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def idle(stack: Stack, seconds: float) -> tuple[float, float]:
    """The API's CPU ms per second, and Redis commands per second, while nothing is sent."""
    before, calls = stack.cpu(), stack.redis_calls()
    await asyncio.sleep(seconds)
    after = stack.cpu()
    return (after["api"] - before["api"]) * 1000 / seconds, (stack.redis_calls() - calls) / seconds


async def measure(stack: Stack, args: argparse.Namespace) -> list[tuple[str, str]]:
    http = httpx.AsyncClient(base_url=stack.api_url, timeout=httpx.Timeout(90, connect=10))

    async def load(n: int, shape: Shape) -> Run:
        def one(i: int) -> Awaitable[Sample]:
            return moonq_one(http, stack.job_ids, chat(i, shape), False)

        return await batch(stack, n, shape.chunks, closed_loop(n, args.level, one))

    await load(100, Shape(2, 0.0, 0.0))  # warm-up: every connection pool on the way
    shape = Shape(args.chunks, args.delay, 0.1)
    without: list[Run] = []
    with_: list[Run] = []
    sent: list[Watchers] = []
    for _ in range(args.repeat):
        without.append(await load(args.requests, shape))
        async with dashboards(stack.api_url, args.dashboards) as watching:
            with_.append(await load(args.requests, shape))
        sent.append(watching)
    idle_without = await idle(stack, args.idle)
    async with dashboards(stack.api_url, args.dashboards):
        idle_with = await idle(stack, args.idle)
    await http.aclose()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    api0 = med([r.cpu["api"] for r in without])
    api1 = med([r.cpu["api"] for r in with_])
    pairs = zip(without, with_, strict=True)
    per_second = med([(w.cpu["api"] - o.cpu["api"]) * args.requests / w.wall for o, w in pairs])
    rate = med([w.per_second(args.dashboards)[0] for w in sent])
    size = med([w.per_second(args.dashboards)[1] for w in sent])
    jobs0, jobs1 = med([r.rate for r in without]), med([r.rate for r in with_])
    return [
        ("jobs/s through moonq, none → 10 dashboards open", f"{jobs0:.1f} → {jobs1:.1f}"),
        ("API CPU ms per job, none → 10 dashboards open", f"{api0:.2f} → {api1:.2f}"),
        ("the dashboards' API CPU under load (ms per second)", f"{per_second:.0f}"),
        (
            "idle: API CPU ms per second, none → 10 dashboards",
            f"{idle_without[0]:.1f} → {idle_with[0]:.1f}",
        ),
        (
            "idle: Redis commands per second, none → 10 dashboards",
            f"{idle_without[1]:.0f} → {idle_with[1]:.0f}",
        ),
        ("snapshots per second per dashboard", f"{rate:.2f}"),
        ("bytes per second per dashboard (under load)", f"{size / 1024:.1f} KiB"),
    ]


def report(args: argparse.Namespace, rows: list[tuple[str, str]], elapsed: float) -> str:
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""# moonq benchmark: what the dashboard costs

- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; run time {elapsed:.0f} s \
(`python -m bench.dashboard`)
- machine: nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, \
{platform.platform()}; the fake, API, worker, Redis, the dashboards' and the load's clients \
share these cores
- load: c={args.level}, {args.requests} jobs a run, each streaming {args.chunks} chunks \
{args.delay * 1000:.0f} ms apart; {args.dashboards} admin dashboards on {min(6, args.dashboards)} \
views; median of {args.repeat} runs each way, in turn; idle: {args.idle:.0f} s each way

| measure | result |
|---|---|
{table}
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    add = cli.add_argument
    add("--dashboards", type=int, default=10)
    add("--level", type=int, default=50)
    add("--requests", type=int, default=300)
    add("--chunks", type=int, default=20)
    add("--delay", type=float, default=0.025)
    add("--repeat", type=int, default=3)
    add("--idle", type=float, default=10.0)
    add("--redis-url", default="redis://127.0.0.1:6379/11")
    add("--output", type=Path, default=Path(__file__).with_name("DASHBOARD_RESULTS.md"))
    return cli.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    stack_args = argparse.Namespace(redis_url=args.redis_url, env=[])
    t0, stack = time.monotonic(), Stack(stack_args)
    try:
        stack.up(args.level)
        rows = asyncio.run(measure(stack, args))
    finally:
        stack.down()
    text = report(args, rows, time.monotonic() - t0)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
