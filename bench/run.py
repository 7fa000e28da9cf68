"""How much does the queue cost next to calling the upstream directly?

Starts the fake upstream, the API and the workers as real processes (the `moonq` console script)
on 127.0.0.1 with real Redis, sends the same streamed requests straight to the fake and through
moonq at a few concurrency levels, side by side in one run (each row `--repeat` times), and
prints (and writes to bench/RESULTS.md) Markdown tables of moonq/direct ratios, the jobs' pickup
time and each chunk's relay latency, the queue's own ceiling with an upstream that answers at
once, and optionally how that ceiling scales with processes (`--scaling`) and how many slow
streams at once get through (`--slow`). Bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.load import Load
from bench.measure import (
    Body,
    Crowd,
    Row,
    Run,
    Sample,
    Sent,
    Shape,
    api_client,
    batch,
    chat,
    chat_one,
    closed_loop,
    crowd,
    direct_one,
    moonq_one,
    phases,
)
from bench.report import Result, Scaling, report
from bench.stack import Stack
from moonq.cli import raise_open_files_limit
from worker.upstream import MoonshotClient

__all__ = ["Stack", "main"]  # bench/batch.py starts its processes with this Stack

KINDS = {"sse": "SSE", "wait": "long-poll ?wait=", "chat": "POST /v1/chat/completions"}
RESULTS = Path(__file__).with_name("RESULTS.md")


class Bench:
    """The benchmark's clients, and the rows it measures with them."""

    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack, self.args = stack, args
        self.top = top_level(args)
        self.direct = MoonshotClient(f"{stack.fake_url}/v1", "sk-bench", concurrency=self.top)
        self.http = api_client(stack.api_url, self.top)
        self.shape = Shape(args.chunks, args.delay, args.first_byte, stamp=args.relay)
        self.load = Load(args.clients, stack.fake_urls) if args.clients > 1 else None

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.direct.aclose()
        if self.load is not None:
            await asyncio.to_thread(self.load.close)

    def one(self, kind: str) -> Callable[[Body], Awaitable[Sample]]:
        ids = self.stack.job_ids
        if kind == "direct":
            return partial(direct_one, self.direct)
        if kind == "chat":
            return partial(chat_one, self.http, ids)
        return partial(moonq_one, self.http, ids, poll=kind == "wait")

    def run(self, kind: str, c: int, n: int, shape: Shape) -> Awaitable[Run]:
        send: Awaitable[Sent]
        if self.load is not None:
            send = self.load.run(kind, shape, n, c, self.stack.api_url, self.stack.job_ids)
        else:
            one = self.one(kind)
            send = closed_loop(n, c, lambda i: one(chat(i, shape)))
        return batch(self.stack, n, shape.chunks, send)

    def requests(self, c: int) -> int:
        return int(self.args.requests or max(10, 2 * c))

    async def warm_up(self) -> None:
        """Every connection pool on the way, at the top level."""
        for kind in ("direct", "sse"):
            await self.run(kind, self.top, max(20, 2 * self.top), Shape(2, 0.0, 0.0))

    async def row(self, name: str, c: int, n: int, shape: Shape, kinds: list[str]) -> list[Row]:
        """A direct run, then one of each kind of moonq client, `--repeat` times over."""
        runs: dict[str, list[Run]] = {k: [] for k in ("direct", *kinds)}
        for _ in range(self.args.repeat):
            for kind, done in runs.items():
                done.append(await self.run(kind, c, n, shape))
        conc = "{}/{}".format(*self.stack.slots)
        return [Row(f"{name}, {KINDS[k]}", runs["direct"], runs[k], conc) for k in kinds]

    async def levels(self) -> list[Row]:
        args, rows = self.args, list[Row]()
        for c in args.levels:
            kinds = ["sse", *["wait"] * (c == args.wait_level), *["chat"] * (c == args.chat_level)]
            rows += await self.row(f"c={c}", c, self.requests(c), self.shape, kinds)
        return rows

    async def sequential(self) -> Row:
        """One request at a time, many of them, short answers (5 chunks 10 ms apart after 50
        ms): what the queue adds to a lone request's first token, with enough samples for its
        tail. Its TTFC ratio and overhead columns are the figures to read."""
        shape = Shape(5, 0.01, 0.05, stamp=self.args.relay)
        name = "sequential: c=1, short answers"
        return (await self.row(name, 1, self.args.sequential, shape, ["sse"]))[0]

    async def ceiling(self, name: str = "ceiling") -> Row:
        """Jobs/s through moonq when the upstream answers at once: the queue's own limit."""
        args = self.args
        shape = Shape(args.ceiling_chunks, 0.0, 0.0, stamp=args.relay)
        name = f"{name}: c={args.ceiling}, instant upstream"
        return (await self.row(name, args.ceiling, args.ceiling_requests, shape, ["sse"]))[0]

    async def queued(self) -> list[Row]:
        """More jobs than slots: moonq holds them back, by design."""
        q, top, rows = self.args.queued, max(self.args.levels), list[Row]()
        for by, worker, limit in (("the worker", q, q), ("the limiter", top, q)):
            if 0 < q < top:
                await asyncio.to_thread(self.stack.start_worker, worker, limit)
                await self.warm_up()
                name = f"c={top}, queued by {by}"
                rows += await self.row(name, top, self.requests(top), self.shape, ["sse"])
        return rows

    async def scaling(self) -> Scaling:
        """The ceiling row with 1, 2, … worker processes, then 1, 2, … API processes."""
        found, stack = Scaling(), self.stack
        for count in self.args.scaling:
            if count != stack.workers:
                await asyncio.to_thread(stack.start_worker, *stack.slots, count)
            await self.warm_up()
            found.append(("worker", count, await self.ceiling(f"workers ×{count}")))
        if stack.workers != self.args.workers:
            await asyncio.to_thread(stack.start_worker, *stack.slots, self.args.workers)
        for count in self.args.api_scaling:
            if count != stack.api_procs:
                await asyncio.to_thread(stack.start_api, count)
                await self.http.aclose()  # its connections were to the processes just stopped
                self.http = api_client(stack.api_url, self.top)
            await self.warm_up()
            found.append(("API", count, await self.ceiling(f"API ×{count}")))
        return found

    async def slow(self) -> tuple[Crowd, Crowd]:
        """`--slow` streams at once, all started together, straight and through moonq (with
        a slot, and room under the limiter, for each)."""
        args, stack, n = self.args, self.stack, self.args.slow
        await asyncio.to_thread(stack.start_worker, n, n)
        shape = Shape(args.slow_chunks, args.slow_delay, 0.0, spread=False, stamp=args.relay)
        if self.load is not None:
            straight = await self.load.crowd("direct", shape, n, stack.api_url, stack.job_ids)
            await asyncio.to_thread(stack.reset_peak_rss)
            before = stack.cpu()
            queued = await self.load.crowd("sse", shape, n, stack.api_url, stack.job_ids)
        else:
            direct = MoonshotClient(f"{stack.fake_url}/v1", "sk-bench", concurrency=n)
            http, ids = api_client(stack.api_url, n), stack.job_ids
            try:
                straight = await crowd(n, lambda i: direct_one(direct, chat(i, shape)))
                await asyncio.to_thread(stack.reset_peak_rss)
                before = stack.cpu()
                queued = await crowd(n, lambda i: moonq_one(http, ids, chat(i, shape), False))
            finally:
                await http.aclose()
                await direct.aclose()
        after = stack.cpu()
        queued.cpu = {g: (after[g] - before[g]) * 1000 / n for g in ("api", "worker")}
        queued.rss = await asyncio.to_thread(stack.peak_rss)
        queued.phases = await asyncio.to_thread(phases, stack, queued.samples)
        if stack.rss_since_start:
            queued.rss_since = "the processes started"
        return straight, queued


async def measure(bench: Bench) -> Result:
    args = bench.args
    await bench.warm_up()
    if args.scaling:
        scaling = await bench.scaling()
        return Result([row for *_, row in scaling], scaling, None, {})
    rows = [await bench.sequential()] if args.sequential else []
    rows += await bench.levels()
    if args.ceiling:
        rows.append(await bench.ceiling())
    rows += await bench.queued()
    rss = await asyncio.to_thread(bench.stack.peak_rss)
    return Result(rows, [], await bench.slow() if args.slow else None, rss)


async def measured(stack: Stack, args: argparse.Namespace) -> Result:
    bench = Bench(stack, args)
    try:
        return await asyncio.wait_for(measure(bench), args.budget)
    finally:
        await bench.aclose()


def top_level(args: argparse.Namespace) -> int:
    """The most requests in flight of any row but `--slow`'s: the worker's and the limiter's
    concurrency, and the clients' pool sizes."""
    levels: list[int] = [args.ceiling] if args.scaling else [*args.levels, args.ceiling]
    return max(levels)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv: list[str] | None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    add, on = cli.add_argument, argparse.BooleanOptionalAction
    add("--chunks", type=int, default=20, help="content chunks per answer")
    add("--delay", type=float, default=0.025, help="seconds between chunks")
    add("--first-byte", type=float, default=0.2, help="seconds before the upstream answers")
    add("--levels", type=ints, default=[1, 50, 200])
    add("--requests", type=int, default=0, help="per level (0: max(10, 2×level))")
    add("--sequential", type=int, default=60, help="requests of the sequential row (0: none)")
    add("--repeat", type=int, default=3, help="runs of each row; figures are their medians")
    add("--queued", type=int, default=50, help="concurrency of the queued rows (0: none)")
    add("--wait-level", type=int, default=50, help="the level with a long-poll row")
    add(
        "--chat-level",
        type=int,
        help="the level with a POST /v1/chat/completions row (default: the middle level; 0: none)",
    )
    add("--pickup", action=on, default=True, help="report pickup (created→started) p50/p99")
    add("--relay", action=on, default=True, help="stamp chunks; report relay latency p50/p99")
    add("--ceiling", type=int, default=200, help="in flight in the ceiling row (0: no row)")
    add("--ceiling-requests", type=int, default=1200, help="requests of a ceiling run")
    add("--ceiling-chunks", type=int, default=20, help="chunks of a ceiling answer")
    add("--clients", type=int, default=1, help="processes that send the load (1: this one)")
    add("--fakes", type=int, default=1, help="fake upstream processes (worker i calls i mod F)")
    add("--workers", type=int, default=1, help="worker processes")
    add("--api-procs", type=int, default=1, help="API processes (`moonq api --workers N`)")
    add(
        "--scaling",
        type=ints,
        default=[],
        help="e.g. 1,2: only the ceiling row, with that "
        "many worker processes, then API processes; a table of jobs/s by processes",
    )
    add("--api-scaling", type=ints, help="the API processes of --scaling (default: the same)")
    add("--slow", type=int, default=0, help="a row of N slow streams at once (0: none)")
    add("--slow-chunks", type=int, default=20, help="chunks of a slow stream")
    add("--slow-delay", type=float, default=1.0, help="seconds between a slow stream's chunks")
    add("--env", action="append", default=[], help="KEY=VALUE for moonq, e.g. MOONQ_POLL_DELAY")
    add("--redis-url", default="redis://127.0.0.1:6379/11")
    add("--budget", type=float, default=420.0, help="seconds of measuring before giving up")
    add("--output", type=Path, help=f"default: {RESULTS.name} (none with --scaling)")
    args = cli.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if urlparse(args.redis_url).hostname not in ("127.0.0.1", "localhost"):
        cli.error("the benchmark talks only to 127.0.0.1")
    if args.scaling and not args.ceiling:
        cli.error("--scaling measures the ceiling row: --ceiling must not be 0")
    if args.api_scaling is None:
        args.api_scaling = args.scaling
    elif not args.scaling:
        cli.error("--api-scaling comes with --scaling")
    counts = [args.repeat, args.workers, args.api_procs, args.clients, args.fakes, *args.levels]
    if min(*counts, *args.scaling, *args.api_scaling) < 1:
        cli.error(
            "--repeat, --workers, --api-procs, --clients, --fakes, --levels and the scaling "
            "counts count from 1"
        )
    if args.chat_level is None:
        args.chat_level = args.levels[len(args.levels) // 2]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    raise_open_files_limit()  # `--slow` holds two sockets a stream
    t0, stack = time.monotonic(), Stack(args)
    try:
        stack.up(top_level(args))
        result = asyncio.run(measured(stack, args))
        server: Any = stack.redis.info("server")
    except BaseException:
        for proc in stack.procs.values():
            print(f"--- {proc.name} log (tail) ---\n{proc.output()[-3000:]}", file=sys.stderr)
        raise
    finally:
        stack.down()
    elapsed = time.monotonic() - t0
    text = report(args, result, elapsed, str(server["redis_version"]))
    print(text)
    if output := args.output or (None if args.scaling else RESULTS):
        output.write_text(text)


if __name__ == "__main__":
    main()
