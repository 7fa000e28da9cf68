"""What one job costs Redis, and what Redis can do on this machine: the numbers behind the
README's "Scaling".

Starts a redis-server of its own (nothing else talks to it), runs the API and a worker in
this process against it with the fake upstream, and sends jobs that a client reads over SSE
to the end, as an interactive user does, at two chunk counts, so the cost of one more chunk
shows. Redis's work is read from INFO commandstats (every command, those inside Lua scripts
included) and from the server process's CPU time. Then `redis-benchmark`, if installed, gives
the server's raw ceiling for simple commands. Prints Markdown tables.

    python -m bench.redis_cost [--jobs 200] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis as sync_redis
from httpx_sse import aconnect_sse

from api.app import create_app
from moonq.fake_moonshot import FakeConfig, start_fake
from moonq.redis import connect
from moonq.settings import Settings
from tests.procs import RedisServer
from worker.main import create_worker

TICK = os.sysconf("SC_CLK_TCK")
CHAT = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Cost:
    chunks: int
    jobs: int
    commands: int  # every command Redis ran, those inside scripts included
    scripts: int  # EVAL/EVALSHA/FCALL calls among them
    by_command: dict[str, int]
    cpu_ms: float  # the redis-server process's CPU time
    wall_s: float

    def per_job(self, value: float) -> float:
        return value / self.jobs


def _cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def _commandstats(client: sync_redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


async def _one(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/jobs", json={"body": CHAT})
    created.raise_for_status()
    url = f"/v1/jobs/{created.json()['id']}/events"
    async with aconnect_sse(client, "GET", url) as source:
        async for event in source.aiter_sse():
            if '"event":"done"' in event.data or '"event":"error"' in event.data:
                return


async def _run(server: RedisServer, chunks: int, jobs: int, concurrency: int) -> Cost:
    fake = await start_fake(config=FakeConfig(chunks=chunks))
    prefix = f"cost{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "REDIS_URL": server.url,
        "MOONSHOT_BASE_URL": fake.url,
        "MOONSHOT_API_KEY": "sk-bench",
        "MOONQ_KEY_PREFIX": prefix,
        "MOONQ_QUEUE_NAME": f"{prefix}:queue",
        # The account's limits on, as in a deployment, but far above what the run asks:
        # the limiter does all its bookkeeping and never makes a job wait.
        "MOONQ_UPSTREAM_RPM": 10**6,
        "MOONQ_UPSTREAM_TPM": 10**9,
        "MOONQ_UPSTREAM_CONCURRENCY": 10**4,
    }
    settings = Settings(_env_file=None, **values)
    redis = connect(server.url)
    app = create_app(settings, redis=redis)
    worker = create_worker(settings, redis=redis, handle_signals=False)
    stats = sync_redis.Redis.from_url(server.url)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://moonq", timeout=60) as client,
    ):
        running = asyncio.create_task(worker.main())
        await _one(client)  # warm: scripts loaded, connections open
        stats.config_resetstat()
        assert server.proc is not None
        cpu = _cpu_ms(server.proc.popen.pid)
        started = asyncio.get_running_loop().time()
        gate = asyncio.Semaphore(concurrency)

        async def gated() -> None:
            async with gate:
                await _one(client)

        await asyncio.gather(*(gated() for _ in range(jobs)))
        wall = asyncio.get_running_loop().time() - started
        cpu = _cpu_ms(server.proc.popen.pid) - cpu
        calls = _commandstats(stats)
        await worker.close()
        await asyncio.wait({running}, timeout=10)
    await redis.aclose()
    await fake.close()
    stats.close()
    calls.pop("config|resetstat", None)
    calls.pop("info", None)
    scripts = sum(n for name, n in calls.items() if name in ("evalsha", "eval", "fcall"))
    return Cost(chunks, jobs, sum(calls.values()), scripts, calls, cpu, wall)


_BENCHMARKS = (
    ["-t", "set,get,hset"],
    ["publish", "moonq:bench", "an-event"],
    ["xadd", "moonq:bench:log", "MAXLEN", "~", "1000", "*", "e", "an-event"],
)


def _benchmark(server: RedisServer) -> list[tuple[str, float]]:
    """redis-benchmark's requests/s for simple commands: one at a time, and 16 pipelined."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return []
    rows = []
    for pipeline in ("1", "16"):
        for command in _BENCHMARKS:
            common = ["-p", str(server.port), "-q", "-n", "200000", "-c", "50", "-P", pipeline]
            answer = subprocess.run(
                [binary, *common, *command], capture_output=True, text=True, check=True
            ).stdout
            for line in answer.replace("\r", "\n").splitlines():
                if "requests per second" in line:
                    name, rest = line.rsplit(":", 1)
                    rows.append(
                        (f"{name.split()[0].upper()} (-P {pipeline})", float(rest.split()[0]))
                    )
    return rows


def _table(costs: list[Cost]) -> str:
    lines = [
        "| chunks per job | jobs | Redis commands per job (in scripts too) | script calls "
        "per job | Redis CPU ms per job | jobs/s one Redis core could carry | jobs/s here |",
        "|---|---|---|---|---|---|---|",
    ]
    for cost in costs:
        cpu = cost.per_job(cost.cpu_ms)
        lines.append(
            f"| {cost.chunks} | {cost.jobs} | {cost.per_job(cost.commands):.0f} | "
            f"{cost.per_job(cost.scripts):.1f} | {cpu:.2f} | {1000 / cpu:.0f} | "
            f"{cost.jobs / cost.wall_s:.0f} |"
        )
    if len(costs) == 2:
        low, high = costs
        extra = high.chunks - low.chunks
        commands = (high.per_job(high.commands) - low.per_job(low.commands)) / extra
        cpu = (high.per_job(high.cpu_ms) - low.per_job(low.cpu_ms)) / extra
        lines.append(
            f"\nEach further chunk: {commands:.1f} commands, {cpu * 1000:.0f} µs of Redis CPU."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--chunks", type=int, nargs=2, default=[8, 40])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            costs = [
                asyncio.run(_run(server, chunks, args.jobs, args.concurrency))
                for chunks in args.chunks
            ]
            top = sorted(costs[0].by_command.items(), key=lambda item: -item[1])[:12]
            bench = _benchmark(server)
        finally:
            server.stop()
    print(f"machine: {os.cpu_count()} cores; API, worker, fake upstream and Redis share them\n")
    print(_table(costs))
    print(f"\nCommands per job at {costs[0].chunks} chunks, most called first:")
    print(", ".join(f"{name} {calls / costs[0].jobs:.1f}" for name, calls in top))
    if bench:
        print("\n| redis-benchmark, 50 clients | requests/s |\n|---|---|")
        for name, rate in bench:
            print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
