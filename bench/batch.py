"""A 50,000-line batch through moonq: what submitting it costs, how soon results come, how
close the batch runs to the limiter's ceiling, whether interactive jobs still stream at once,
and what it costs in Redis and API memory.

Real processes as in bench/run.py (the fake upstream, the API, one worker, real Redis). The
limiter is set so that RPM is the ceiling (MOONQ_UPSTREAM_RPM, default 3,000: 45 batch lines/s,
the other tenth being kept for interactive jobs);
the batch runs for a measured minute (a full RPM window), then is cancelled. Prints a table
and writes it to bench/BATCH_RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.run import Stack
from moonq.limits import kept_back

Row = tuple[str, str]


def lines(n: int, chunks: int, delay: float) -> bytes:
    """n requests of a few hundred bytes each, like a batch of short documents."""
    text = "Summarise this paragraph. " * 12
    rows = []
    for i in range(n):
        body = {
            "model": "moonshot-v1-8k",
            "messages": [{"role": "user", "content": f"{i} {text}"}],
            "max_tokens": 64,
            "fake_moonshot": {"chunks": chunks, "delay": delay},
        }
        rows.append(
            {"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def rss_peak_mib(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    return float("nan")


async def submit(http: httpx.AsyncClient, data: bytes) -> tuple[dict[str, Any], float, float]:
    began = time.monotonic()
    uploaded = await http.post(
        "/v1/files", files={"file": ("batch.jsonl", data)}, data={"purpose": "batch"}
    )
    uploaded.raise_for_status()
    upload_s = time.monotonic() - began
    created = await http.post(
        "/v1/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    created.raise_for_status()
    return created.json(), upload_s, time.monotonic() - began


async def first_chunk(http: httpx.AsyncClient, i: int) -> float:
    body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": f"now {i}"}]}
    began = time.monotonic()
    job = (await http.post("/v1/jobs", json={"body": body})).json()
    async with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        async for row in events.aiter_lines():
            if row.startswith("data:") and '"event":"chunk"' in row:
                return time.monotonic() - began
    return float("nan")


async def counts(http: httpx.AsyncClient, batch_id: str) -> dict[str, int]:
    found: dict[str, int] = (await http.get(f"/v1/batches/{batch_id}")).json()["request_counts"]
    return found


async def measure(stack: Stack, args: argparse.Namespace) -> list[Row]:
    http = httpx.AsyncClient(base_url=stack.api_url, timeout=httpx.Timeout(300, connect=10))
    data = lines(args.lines, args.chunks, args.delay)
    memory_before = int(stack.redis.info("memory")["used_memory"])
    batch, upload_s, submit_s = await submit(http, data)
    memory_after = int(stack.redis.info("memory")["used_memory"])
    window_start = began = time.monotonic()
    while (await counts(http, batch["id"]))["completed"] == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    first_result = time.monotonic() - began
    waits = []
    while time.monotonic() - window_start < args.window:
        waits.append(await first_chunk(http, len(waits)))
        await asyncio.sleep(args.window / 25)
    # From the batch's start: over a minute, the RPM window lets through RPM requests at most.
    done = (await counts(http, batch["id"]))["completed"]
    rate = done / (time.monotonic() - window_start)
    cancel_began = time.monotonic()
    cancelled = (await http.post(f"/v1/batches/{batch['id']}/cancel")).json()
    while cancelled["status"] != "cancelled":
        await asyncio.sleep(0.05)
        cancelled = (await http.get(f"/v1/batches/{batch['id']}")).json()
    cancel_s = time.monotonic() - cancel_began
    await http.aclose()
    ceiling = kept_back(args.rpm) / 60  # batch lines leave a tenth of RPM to interactive jobs
    waits.sort()
    per_line = (memory_after - memory_before) / args.lines
    return [
        ("input file", f"{len(data) / 2**20:.1f} MiB, {args.lines:,} lines"),
        ("upload (POST /v1/files)", f"{upload_s:.1f} s"),
        (
            "submit total (upload + POST /v1/batches: validate, write every line)",
            f"{submit_s:.1f} s",
        ),
        ("submit → first result", f"{first_result * 1000:.0f} ms"),
        (
            f"lines/s over {args.window:.0f} s vs the limiter's ceiling for batch lines (RPM "
            f"{args.rpm} less the tenth kept for interactive jobs: {ceiling:.0f}/s)",
            f"{rate:.1f}/s = **{rate / ceiling:.2f}×** the ceiling",
        ),
        (
            f"interactive job behind the batch: first chunk, {len(waits)} tries",
            f"p50 {statistics.median(waits) * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms",
        ),
        (
            "Redis memory added by the batch (file + one job per line)",
            f"{(memory_after - memory_before) / 2**20:.0f} MiB ({per_line / 1024:.1f} KiB/line)",
        ),
        ("API peak RSS (VmHWM)", f"{rss_peak_mib(stack.procs['api'].popen.pid):.0f} MiB"),
        ("worker peak RSS (VmHWM)", f"{rss_peak_mib(stack.procs['worker'].popen.pid):.0f} MiB"),
        (
            f"cancel of the {cancelled['request_counts']['cancelled']:,} lines left",
            f"{cancel_s:.1f} s",
        ),
    ]


def report(args: argparse.Namespace, rows: list[Row], elapsed: float) -> str:
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""# moonq benchmark: a {args.lines:,}-line batch

- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; run time {elapsed:.0f} s (`python -m bench.batch`)
- machine: nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, \
{platform.platform()}; the fake, API, worker, Redis and this client share these cores
- limiter: MOONQ_UPSTREAM_CONCURRENCY={args.concurrency}, MOONQ_UPSTREAM_RPM={args.rpm}, TPM off; \
each line streams {args.chunks} chunks {args.delay * 1000:.0f} ms apart

| measure | result |
|---|---|
{table}
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__)
    add = cli.add_argument
    add("--lines", type=int, default=50_000)
    add("--rpm", type=int, default=3_000)
    add("--concurrency", type=int, default=50)
    add("--chunks", type=int, default=5)
    add("--delay", type=float, default=0.05)
    add("--window", type=float, default=60.0, help="seconds the batch runs while measured")
    add("--redis-url", default="redis://127.0.0.1:6379/11")
    add("--output", type=Path, default=Path(__file__).with_name("BATCH_RESULTS.md"))
    return cli.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    settings = [
        f"MOONQ_UPSTREAM_RPM={args.rpm}",
        "MOONQ_BATCH_MAX_LINES=100000",
        f"MOONQ_UPSTREAM_CONCURRENCY={args.concurrency}",
    ]
    stack_args = argparse.Namespace(redis_url=args.redis_url, env=settings)
    t0, stack = time.monotonic(), Stack(stack_args)
    try:
        stack.up(args.concurrency)
        rows = asyncio.run(measure(stack, args))
    finally:
        stack.down()
    text = report(args, rows, time.monotonic() - t0)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
