"""The fault suite: real processes (fake upstream, API, workers, real Redis), injected upstream
faults, and workers SIGKILLed mid-stream, then every job checked.

`make chaos` runs the full size (500 jobs) and prints the table; `tests/test_chaos.py` runs a
small one in `make test`. Exits non-zero when anything was lost, duplicated or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from moonq.fake_moonshot import expected_content, expected_usage
from tests.procs import Proc, clean_env, free_port, start, wait_http

# What each kind of job is steered to do, its share of the run, and how it must end.
KINDS: dict[str, tuple[float, str]] = {
    "ok": (0.60, "completed"),
    "rate_limited": (0.10, "completed"),
    "overloaded": (0.05, "completed"),
    "server_error": (0.08, "completed"),
    "dropped": (0.07, "completed"),
    "quota": (0.03, "failed"),
    "content_filter": (0.04, "failed"),
    "hopeless": (0.03, "failed"),
}


@dataclass
class Config:
    jobs: int = 500
    workers: int = 2
    kills: int = 8
    kill_every: tuple[float, float] = (1.5, 3.0)
    limit: int = 8
    worker_concurrency: int = 20
    lock_timeout: float = 5.0
    timeout: float = 300.0
    seed: int = 7
    redis_url: str = "redis://127.0.0.1:6379/13"


@dataclass
class Report:
    jobs: int = 0
    kills: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    peak: int = 0
    limit: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.duplicated
            and not self.wrong
            and self.peak <= self.limit
            and max(self.recoveries, default=0.0) < 15
        )

    def table(self) -> str:
        recovery = f"{max(self.recoveries):.1f}" if self.recoveries else "–"
        head = "| jobs | kills | faults injected | lost | duplicated | wrong | max recovery s "
        head += "| peak concurrency (limit) |"
        row = f"| {self.jobs} | {self.kills} | {self.faults} | {self.lost} | {self.duplicated} "
        row += f"| {len(self.wrong)} | {recovery} | {self.peak} ({self.limit}) |"
        return "\n".join([head, "|---|---|---|---|---|---|---|---|", row])


def plan(config: Config) -> list[tuple[str, dict[str, Any]]]:
    """The jobs to submit: (kind, body), deterministic from the seed."""
    rng = random.Random(config.seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    jobs = []
    for i in range(config.jobs):
        kind = rng.choices(kinds, weights)[0]
        steer: dict[str, Any] = {"chunks": rng.randint(4, 16), "delay": rng.uniform(0.01, 0.04)}
        steer.update(_fault(kind, rng, f"chaos-{config.seed}-{i}"))
        body = {
            "model": "moonshot-v1-8k",
            "messages": [{"role": "user", "content": f"document {i}: {kind}"}],
            "fake_moonshot": steer,
        }
        jobs.append((kind, body))
    return jobs


def _fault(kind: str, rng: random.Random, key: str) -> dict[str, Any]:
    transient = {"fail_times": rng.randint(1, 2), "key": key}
    return {
        "ok": {},
        "rate_limited": {"error": "rate_limit_reached_error", **transient},
        "overloaded": {"error": "engine_overloaded_error", **transient},
        "server_error": {"error": rng.choice(["server_error", "bad_gateway"]), **transient},
        "dropped": {"error": "drop", "drop_after": rng.randint(2, 5), **transient},
        "quota": {"error": "exceeded_current_quota_error"},
        "content_filter": {"error": "content_filter"},
        "hopeless": {"error": "rate_limit_reached_error"},
    }[kind]


class Cluster:
    """The fake upstream, the API and the workers as separate processes."""

    def __init__(self, config: Config, workdir: Path, **env: str) -> None:
        self.config = config
        self.workdir = workdir
        self.prefix = f"chaos{free_port()}"
        self.fake_url = f"http://127.0.0.1:{free_port()}"
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.env = clean_env(
            REDIS_URL=config.redis_url,
            MOONQ_KEY_PREFIX=self.prefix,
            MOONQ_QUEUE_NAME=f"{self.prefix}:queue",
            MOONSHOT_BASE_URL=f"{self.fake_url}/v1",
            MOONSHOT_API_KEY="sk-chaos",
            MOONQ_UPSTREAM_CONCURRENCY=str(config.limit),
            MOONQ_UPSTREAM_RPM="0",
            MOONQ_UPSTREAM_TPM="0",
            MOONQ_WORKER_CONCURRENCY=str(config.worker_concurrency),
            MOONQ_LOCK_TIMEOUT=str(config.lock_timeout),
            MOONQ_RETRY_BASE_DELAY="0.05",
            MOONQ_RETRY_MAX_DELAY="0.5",
            MOONQ_POLL_DELAY="0.02",
            **env,
        )
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        self._spawned = 0

    def start(self, workers: int | None = None) -> None:
        fake_port = self.fake_url.rsplit(":", 1)[1]
        fake = self._spawn("fake", ["fake-moonshot", "--port", fake_port])
        wait_http(f"{self.fake_url}/_fake/stats", fake)
        api = self._spawn("api", ["api", "--port", self.api_url.rsplit(":", 1)[1]])
        wait_http(f"{self.api_url}/readyz", api)
        for _ in range(self.config.workers if workers is None else workers):
            self.add_worker()

    def _spawn(self, name: str, args: list[str]) -> Proc:
        self._spawned += 1
        proc = start(f"{name}-{self._spawned}", args, self.env, self.workdir)
        self.procs.append(proc)
        return proc

    def add_worker(self) -> Proc:
        worker = self._spawn("worker", ["worker"])
        self.workers.append(worker)
        return worker

    def worker_id(self, worker: Proc) -> str:
        return f"{socket.gethostname()}:{worker.popen.pid}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


async def _statuses(redis: aioredis.Redis, prefix: str, ids: list[str]) -> list[list[Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(f"{prefix}:job:{job_id}", "status", "attempts", "worker")
        rows: list[list[Any]] = await pipe.execute()
    return [[v.decode() if v else None for v in row] for row in rows]


async def _kill_one(
    cluster: Cluster, redis: aioredis.Redis, ids: list[str], report: Report
) -> None:
    """SIGKILL a worker that is streaming, start a replacement, time the victims' recovery."""
    rows = await _statuses(redis, cluster.prefix, ids)
    busy = {}
    for worker in cluster.workers:
        wid = cluster.worker_id(worker)
        held = {
            j: int(r[1])
            for j, r in zip(ids, rows, strict=True)
            if r[0] == "in_progress" and r[2] == wid
        }
        if held:
            busy[worker.popen.pid] = (worker, held)
    if not busy:
        return
    worker, held = random.choice(list(busy.values()))
    worker.popen.send_signal(signal.SIGKILL)
    worker.popen.wait(10)
    killed_at = time.monotonic()
    cluster.workers.remove(worker)
    cluster.add_worker()
    report.kills += 1
    pending = dict(held)
    while pending and time.monotonic() - killed_at < 60:
        await asyncio.sleep(0.1)
        now = await _statuses(redis, cluster.prefix, list(pending))
        for job_id, (status, attempts, _) in zip(list(pending), now, strict=True):
            if (
                status in ("completed", "failed", "cancelled")
                or int(attempts or 0) > pending[job_id]
            ):
                report.recoveries.append(time.monotonic() - killed_at)
                del pending[job_id]
    report.recoveries += [99.0] * len(pending)  # never picked up again


async def _run(config: Config, cluster: Cluster, report: Report) -> None:
    jobs = plan(config)
    redis = aioredis.from_url(config.redis_url)
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=cluster.api_url, timeout=30) as client:
            ids = await _submit(client, [body for _, body in jobs])
            killer = asyncio.create_task(_killer(config, cluster, redis, ids, report))
            await _until_done(config, redis, cluster.prefix, ids, started)
            killer.cancel()
            await asyncio.gather(killer, return_exceptions=True)
            stats = (await client.get(f"{cluster.fake_url}/_fake/stats")).json()
        report.peak, report.limit = stats["peak_in_flight"], config.limit
        report.faults = stats["errors_injected"] + report.kills
        await _check(redis, cluster.prefix, ids, jobs, report)
    finally:
        report.seconds = time.monotonic() - started
        await redis.aclose()


async def _submit(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(bodies), 50):
        batch = bodies[i : i + 50]
        answers = await asyncio.gather(*(client.post("/v1/jobs", json={"body": b}) for b in batch))
        for answer in answers:
            answer.raise_for_status()
            ids.append(answer.json()["id"])
    return ids


async def _killer(
    config: Config, cluster: Cluster, redis: aioredis.Redis, ids: list[str], report: Report
) -> None:
    rng = random.Random(config.seed + 1)
    recoveries = []
    while report.kills + len(recoveries) < config.kills:
        await asyncio.sleep(rng.uniform(*config.kill_every))
        recoveries.append(asyncio.create_task(_kill_one(cluster, redis, ids, report)))
        await asyncio.sleep(0.5)
        recoveries = [t for t in recoveries if not t.done()]
    await asyncio.gather(*recoveries)


async def _until_done(
    config: Config, redis: aioredis.Redis, prefix: str, ids: list[str], started: float
) -> None:
    while time.monotonic() - started < config.timeout:
        rows = await _statuses(redis, prefix, ids)
        if all(r[0] in ("completed", "failed", "cancelled") for r in rows):
            return
        await asyncio.sleep(0.5)


async def _check(
    redis: aioredis.Redis,
    prefix: str,
    ids: list[str],
    jobs: list[tuple[str, dict[str, Any]]],
    report: Report,
) -> None:
    report.jobs = len(ids)
    expected_usage_total: Counter[str] = Counter()
    for job_id, (kind, body) in zip(ids, jobs, strict=True):
        record = {
            k.decode(): v.decode()
            for k, v in (await redis.hgetall(f"{prefix}:job:{job_id}")).items()
        }
        status = record.get("status")
        report.outcomes[f"{kind}:{status}"] += 1
        if status not in ("completed", "failed", "cancelled"):
            report.lost += 1
            continue
        log = await redis.xrange(f"{prefix}:log:{job_id}")
        events = [json.loads(fields[b"e"]) for _, fields in log]
        terminal = [e for e in events if e["event"] in ("done", "error", "cancelled")]
        if len(terminal) != 1 or [e["seq"] for e in events] != list(range(1, len(events) + 1)):
            report.duplicated += 1
        want = KINDS[kind][1]
        if status != want:
            report.wrong.append(f"{job_id} ({kind}) ended {status}, not {want}")
        elif status == "completed":
            result = json.loads(record["result"])
            if result["choices"][0]["message"]["content"] != expected_content(body):
                report.wrong.append(f"{job_id} ({kind}): stored content differs")
            if json.loads(record["usage"]) != expected_usage(body):
                report.wrong.append(f"{job_id} ({kind}): usage differs")
            expected_usage_total.update(expected_usage(body))
            expected_usage_total["jobs"] += 1
    ledger = {
        k.decode(): int(v) for k, v in (await redis.hgetall(f"{prefix}:usage:default")).items()
    }
    if ledger != dict(expected_usage_total):
        report.duplicated += 1
        report.wrong.append(
            f"tenant usage {ledger} != the completed jobs' {dict(expected_usage_total)}"
        )


def run(config: Config, workdir: Path) -> Report:
    from tests.conftest import cleanup_prefix

    cluster = Cluster(config, workdir)
    report = Report()
    try:
        cluster.start()
        asyncio.run(_run(config, cluster, report))
    finally:
        cluster.stop()
        cleanup_prefix(config.redis_url, cluster.prefix)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args(argv)
    config = Config(jobs=args.jobs, kills=args.kills, redis_url=args.redis_url)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(config, Path(tmp))
    print(report.table())
    print(f"\n{report.seconds:.0f} s; outcomes: {dict(sorted(report.outcomes.items()))}")
    for line in report.wrong[:20]:
        print("WRONG:", line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
