"""The fault suite: real processes (fake upstream, API, workers, Redis), injected upstream
faults, and workers SIGKILLed or stalled (SIGSTOP past the lock timeout) mid-stream, Redis
stalled, upstream answers with absurd usage, then every job checked.

`make chaos` runs the full size (500 jobs, its own redis-server so that it can stall it) and
prints the table; `tests/test_chaos.py` runs a small one in `make test`. Exits non-zero when
anything was lost, duplicated or wrong, or a disruption asked for could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from moonq.fake_moonshot import expected_content, expected_usage
from moonq.keys import Keys
from moonq.store import utc_day
from moonq.usage import UsageLedger
from tests.procs import Proc, RedisServer, clean_env, start, start_api, start_fake

TERMINAL = ("completed", "failed", "cancelled")
# An upstream that reports usage no account could have spent, or not as numbers.
ABSURD_USAGE: list[dict[str, Any]] = [
    {"prompt_tokens": 1, "completion_tokens": 10**20, "total_tokens": 10**20},
    {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": True},
    {"prompt_tokens": -5, "completion_tokens": 2, "total_tokens": -3},
]
INVALID_USAGE = "upstream_invalid_usage"

# What each kind of job is steered to do, its share of the run, and how it must end.
KINDS: dict[str, tuple[float, str]] = {
    "ok": (0.55, "completed"),
    "long": (0.05, "completed"),  # 3 s streams: a hand-back catches one mid-stream
    "rate_limited": (0.10, "completed"),
    "overloaded": (0.05, "completed"),
    "server_error": (0.08, "completed"),
    "dropped": (0.07, "completed"),
    "quota": (0.03, "failed"),
    "content_filter": (0.04, "failed"),
    "hopeless": (0.03, "failed"),
    "absurd_usage": (0.0, "failed"),  # `Config.absurd` of them, spread over the run
}

ONE_DAY = dt.timedelta(days=1)


@dataclass
class Config:
    jobs: int = 500
    workers: int = 2
    kills: int = 8
    stalls: int = 2  # SIGSTOP a busy worker past the lock timeout, then SIGCONT
    handbacks: int = 1  # ... and while it is stopped, its job's new holder hands it back
    redis_stalls: int = 0  # SIGSTOP Redis (only a private one: `own_redis`)
    redis_stall_s: float = 3.0
    absurd: int = 6  # jobs whose upstream answer carries absurd usage
    kill_every: tuple[float, float] = (1.5, 3.0)
    limit: int = 8
    rpm: int = 0  # MOONQ_UPSTREAM_RPM (0 = none)
    tpm: int = 0  # MOONQ_UPSTREAM_TPM (0 = none)
    worker_concurrency: int = 20
    lock_timeout: float = 5.0
    shutdown_grace: float = 1.0
    timeout: float = 300.0
    seed: int = 7
    redis_url: str = "redis://127.0.0.1:6379/13"
    own_redis: bool = False  # start a private redis-server (required for redis_stalls)


@dataclass
class Report:
    jobs: int = 0
    kills: int = 0  # SIGKILLs actually sent
    stalls: int = 0  # worker SIGSTOP/SIGCONT pairs actually made, handbacks included
    handbacks: int = 0  # of which the job's new holder handed it back while it was stopped
    redis_stalls: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: list[str] = field(default_factory=list)
    no_ttl: list[str] = field(default_factory=list)  # terminal jobs (or logs) kept for ever
    recoveries: list[float] = field(default_factory=list)
    peak: int = 0
    limit: int = 0
    # Most upstream streams a worker held when it was SIGSTOPped. A frozen process keeps its
    # connections open, so the upstream still counts them while the permits they held lapse
    # and go to other jobs, until it wakes and stops them at its next renewal: the limit holds
    # but for those.
    frozen: int = 0
    rpm_peak: int = 0  # most upstream requests the fake saw in any 59 s
    rpm: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.duplicated
            and not self.wrong
            and not self.no_ttl
            and self.peak <= self.limit + self.frozen
            and (not self.rpm or self.rpm_peak <= self.rpm)
            and max(self.recoveries, default=0.0) < self.recovery_bound
        )

    @property
    def recovery_bound(self) -> float:
        """15 s: the lock timeout plus load. A binding RPM lets a burst fill the minute's
        window, and a job set back then waits for the window to slide (up to a minute)."""
        return 15.0 if not self.rpm else 75.0

    def table(self) -> str:
        recovery = f"{max(self.recoveries):.1f}" if self.recoveries else "–"
        rpm = f"{self.rpm_peak} ({self.rpm})" if self.rpm else "–"
        head = "| jobs | kills | stalls (handed back) | Redis stalls | faults injected | lost "
        head += "| duplicated | wrong | no TTL | max recovery s "
        head += "| peak concurrency (limit + streams of a frozen worker) "
        head += "| peak RPM (limit) |"
        row = f"| {self.jobs} | {self.kills} | {self.stalls} ({self.handbacks}) "
        row += f"| {self.redis_stalls} | {self.faults} | {self.lost} | {self.duplicated} "
        row += f"| {len(self.wrong)} | {len(self.no_ttl)} | {recovery} "
        row += f"| {self.peak} ({self.limit} + {self.frozen}) | {rpm} |"
        return "\n".join([head, "|" + "---|" * 12, row])


def plan(config: Config) -> list[tuple[str, dict[str, Any]]]:
    """The jobs to submit: (kind, body), deterministic from the seed."""
    rng = random.Random(config.seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    every = config.jobs // config.absurd if config.absurd else 0
    jobs = []
    for i in range(config.jobs):
        kind = rng.choices(kinds, weights)[0]
        if every and i % every == every // 2 and i // every < config.absurd:
            kind = "absurd_usage"
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
    if kind == "absurd_usage":
        return {"usage": rng.choice(ABSURD_USAGE)}
    if kind == "long":
        return {"chunks": 60, "delay": 0.05}
    faults: dict[str, dict[str, Any]] = {
        "ok": {},
        "rate_limited": {"error": "rate_limit_reached_error", **transient},
        "overloaded": {"error": "engine_overloaded_error", **transient},
        "server_error": {"error": rng.choice(["server_error", "bad_gateway"]), **transient},
        "dropped": {"error": "drop", "drop_after": rng.randint(2, 5), **transient},
        "quota": {"error": "exceeded_current_quota_error"},
        "content_filter": {"error": "content_filter"},
        "hopeless": {"error": "rate_limit_reached_error"},
    }
    return faults[kind]


class Cluster:
    """The fake upstream, the API and the workers as separate processes (Redis too, when the
    config asks for a Redis of the run's own)."""

    def __init__(self, config: Config, workdir: Path, **env: str) -> None:
        self.config = config
        self.workdir = workdir
        self.prefix = f"chaos{uuid.uuid4().hex[:12]}"
        self.redis = RedisServer(workdir) if config.own_redis else None
        self.redis_url = config.redis_url
        self.fake_url = self.api_url = ""
        self.extra_env = env
        self.env: dict[str, str] = {}
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        self._spawned = 0

    def _environment(self) -> dict[str, str]:
        config = self.config
        defaults = dict(
            REDIS_URL=self.redis_url,
            MOONQ_KEY_PREFIX=self.prefix,
            MOONQ_QUEUE_NAME=f"{self.prefix}:queue",
            MOONSHOT_API_KEY="sk-chaos",
            MOONQ_UPSTREAM_CONCURRENCY=str(config.limit),
            MOONQ_UPSTREAM_RPM=str(config.rpm),
            MOONQ_UPSTREAM_TPM=str(config.tpm),
            MOONQ_WORKER_CONCURRENCY=str(config.worker_concurrency),
            MOONQ_LOCK_TIMEOUT=str(config.lock_timeout),
            MOONQ_SHUTDOWN_GRACE=str(config.shutdown_grace),
            MOONQ_RETRY_BASE_DELAY="0.05",
            MOONQ_RETRY_MAX_DELAY="0.5",
            MOONQ_POLL_DELAY="0.02",
        )
        return clean_env(**{**defaults, **self.extra_env})  # the caller's settings win

    def start(self, workers: int | None = None) -> None:
        if self.redis is not None:
            self.redis.start()
            self.redis_url = self.redis.url
        self.env = self._environment()
        self._spawned += 1
        fake, self.fake_url = start_fake(f"fake-{self._spawned}", self.env, self.workdir)
        self.procs.append(fake)
        self.env["MOONSHOT_BASE_URL"] = f"{self.fake_url}/v1"
        self._spawned += 1
        api, self.api_url = start_api(f"api-{self._spawned}", self.env, self.workdir)
        self.procs.append(api)
        for _ in range(self.config.workers if workers is None else workers):
            self.add_worker()

    def add_worker(self) -> Proc:
        self._spawned += 1
        worker = start(f"worker-{self._spawned}", ["worker"], self.env, self.workdir)
        self.procs.append(worker)
        self.workers.append(worker)
        return worker

    def worker_id(self, worker: Proc) -> str:
        return f"{socket.gethostname()}:{worker.popen.pid}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)  # a stalled worker cannot stop
            proc.stop()
        if self.redis is not None:
            self.redis.stop()


async def _statuses(redis: aioredis.Redis, prefix: str, ids: list[str]) -> list[list[Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(f"{prefix}:job:{job_id}", ["status", "attempts", "worker"])
        rows: list[list[Any]] = await pipe.execute()
    return [[v.decode() if v else None for v in row] for row in rows]


@dataclass
class Run:
    """What the disruptions need: the cluster, a Redis client, the jobs, the report."""

    config: Config
    cluster: Cluster
    redis: aioredis.Redis
    ids: list[str]
    report: Report
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: set[int] = field(default_factory=set)  # pids of workers now SIGSTOPped
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    long_jobs: set[str] = field(default_factory=set)  # what a hand-back stalls

    async def busy_worker(
        self, among: set[str] | None = None
    ) -> tuple[Proc, dict[str, int]] | None:
        """A live, running worker holding jobs (of `among`, if given) mid-stream, with
        {job: attempt}; waits for one while the run lasts (None once every job has ended)."""
        while not self.done.is_set():
            rows = await _statuses(self.redis, self.cluster.prefix, self.ids)
            busy = []
            for worker in self.cluster.workers:
                if worker.popen.pid in self.stopped or worker.popen.poll() is not None:
                    continue
                wid = self.cluster.worker_id(worker)
                held = {
                    j: int(r[1])
                    for j, r in zip(self.ids, rows, strict=True)
                    if r[0] == "in_progress" and r[2] == wid and (among is None or j in among)
                }
                if held:
                    busy.append((worker, held))
            if busy:
                return random.choice(busy)
            await asyncio.sleep(0.1)
        return None

    async def kill(self) -> None:
        """SIGKILL a worker that is streaming, start a replacement, time the victims' recovery."""
        found = await self.busy_worker()
        if found is None:
            return
        worker, held = found
        worker.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.popen.wait, 10)
        self.report.kills += 1
        self.cluster.workers.remove(worker)
        self.cluster.add_worker()
        self.watchers.append(asyncio.create_task(self._recovery(held, time.monotonic())))

    async def _recovery(self, held: dict[str, int], since: float) -> None:
        pending = dict(held)
        while pending and time.monotonic() - since < 60:
            await asyncio.sleep(0.1)
            now = await _statuses(self.redis, self.cluster.prefix, list(pending))
            for job_id, (status, attempts, _) in zip(list(pending), now, strict=True):
                if status in TERMINAL or int(attempts or 0) > pending[job_id]:
                    self.report.recoveries.append(time.monotonic() - since)
                    del pending[job_id]
        self.report.recoveries += [99.0] * len(pending)  # never picked up again

    async def stall(self, hand_back: bool = False) -> None:
        """SIGSTOP a streaming worker past the lock timeout, so that its jobs are taken over,
        then SIGCONT it: its stale runs must be fenced off. With `hand_back`, the worker that
        took one of its jobs over is told to stop (SIGTERM) while the first is still stopped,
        and hands the job back to the queue before the stalled one wakes up."""
        found = await self.busy_worker(self.long_jobs if hand_back else None)
        if found is None:
            return
        worker, held = found
        pid = worker.popen.pid
        worker.popen.send_signal(signal.SIGSTOP)
        self.report.frozen = max(self.report.frozen, len(held))
        self.stopped.add(pid)
        stopped_at = time.monotonic()
        try:
            if hand_back and await self._hand_back(worker, held):
                self.report.handbacks += 1
            rest = self.config.lock_timeout + 2.0 - (time.monotonic() - stopped_at)
            await asyncio.sleep(max(0.0, rest))
        finally:
            worker.popen.send_signal(signal.SIGCONT)
            self.stopped.discard(pid)
        self.report.stalls += 1

    async def _hand_back(self, stalled: Proc, held: dict[str, int]) -> bool:
        """Wait for a live worker to take one of `held` over, then SIGTERM that worker."""
        deadline = time.monotonic() + self.config.lock_timeout + 15
        mine = self.cluster.worker_id(stalled)
        rows: list[list[Any]] = []
        while time.monotonic() < deadline and not self.done.is_set():
            rows = await _statuses(self.redis, self.cluster.prefix, list(held))
            for (status, attempts, owner), first in zip(rows, held.values(), strict=True):
                if status != "in_progress" or owner in (None, mine) or int(attempts) <= first:
                    continue
                taker = next(
                    (w for w in self.cluster.workers if self.cluster.worker_id(w) == owner), None
                )
                if taker is None or taker.popen.pid in self.stopped:
                    continue
                taker.popen.send_signal(signal.SIGTERM)
                await asyncio.to_thread(taker.popen.wait, 30)
                self.cluster.workers.remove(taker)
                self.cluster.add_worker()
                return True
            await asyncio.sleep(0.05)
        print(f"hand-back: no live worker took over {held} from {mine}: {rows}", file=sys.stderr)
        return False

    async def stall_redis(self) -> None:
        """SIGSTOP the run's own redis-server: it stops answering but keeps every connection."""
        redis = self.cluster.redis
        if redis is None or self.done.is_set():
            return
        redis.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(self.config.redis_stall_s)
        finally:
            redis.signal(signal.SIGCONT)
        self.report.redis_stalls += 1


async def _disrupt(run: Run) -> None:
    """Every disruption the config asks for, one at a time, in a seeded order; each waits for
    a worker to be busy, so that all are made unless the run ends first."""
    config = run.config
    rng = random.Random(config.seed + 1)
    todo = ["kill"] * config.kills + ["stall"] * (config.stalls - config.handbacks)
    todo += ["handback"] * config.handbacks + ["redis"] * config.redis_stalls
    rng.shuffle(todo)
    actions = {
        "kill": run.kill,
        "stall": run.stall,
        "handback": lambda: run.stall(hand_back=True),
        "redis": run.stall_redis,
    }
    for action in todo:
        await asyncio.sleep(rng.uniform(*config.kill_every))
        await actions[action]()
    await asyncio.gather(*run.watchers)


async def _rpm_sampler(fake_url: str, samples: list[tuple[float, float, int]]) -> None:
    """(sent, answered, requests so far) of the fake, every 0.25 s."""
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            sent = time.monotonic()
            stats = (await client.get(f"{fake_url}/_fake/stats")).json()
            samples.append((sent, time.monotonic(), int(stats["requests"])))
            await asyncio.sleep(0.25)


def _peak_per_minute(samples: list[tuple[float, float, int]], window: float = 59.0) -> int:
    """The most requests between two samples whose reads lie within `window` seconds (a
    second short of the limiter's minute: a permit's request reaches the fake a little later)."""
    peak = 0
    for i, (_, answered, before) in enumerate(samples):
        for sent, _, after in samples[i + 1 :]:
            if sent - answered > window:
                break
            peak = max(peak, after - before)
    return peak


async def _run(config: Config, cluster: Cluster, report: Report) -> None:
    jobs = plan(config)
    redis: aioredis.Redis = aioredis.from_url(cluster.redis_url)  # type: ignore[no-untyped-call]
    started = time.monotonic()
    samples: list[tuple[float, float, int]] = []
    sampler = asyncio.create_task(_rpm_sampler(cluster.fake_url, samples))
    try:
        async with httpx.AsyncClient(base_url=cluster.api_url, timeout=30) as client:
            ids = await _submit(client, [body for _, body in jobs])
            run = Run(config, cluster, redis, ids, report)
            run.long_jobs = {i for i, (kind, _) in zip(ids, jobs, strict=True) if kind == "long"}
            disruptor = asyncio.create_task(_disrupt(run))
            await _until_done(config, redis, cluster.prefix, ids, started)
            run.done.set()
            await asyncio.wait_for(disruptor, config.lock_timeout + 60)
            stats = (await client.get(f"{cluster.fake_url}/_fake/stats")).json()
        report.peak, report.limit = stats["peak_in_flight"], config.limit
        report.rpm, report.rpm_peak = config.rpm, _peak_per_minute(samples)
        report.faults = stats["errors_injected"] + report.kills + report.stalls
        report.faults += report.redis_stalls + config.absurd
        await _check(redis, cluster.prefix, ids, jobs, report)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
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


async def _until_done(
    config: Config, redis: aioredis.Redis, prefix: str, ids: list[str], started: float
) -> None:
    while time.monotonic() - started < config.timeout:
        rows = await _statuses(redis, prefix, ids)
        if all(r[0] in TERMINAL for r in rows):
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
        if await _check_job(redis, prefix, job_id, kind, body, report):
            expected_usage_total.update(expected_usage(body))
            expected_usage_total["jobs"] += 1
    today = dt.date.fromisoformat(utc_day(time.time()))  # a run may span a UTC midnight
    report = await UsageLedger(redis, Keys(prefix)).report("default", today - ONE_DAY, today)
    ledger = {name: getattr(report.total, name) for name in expected_usage_total}
    if ledger != dict(expected_usage_total):
        report.duplicated += 1
        report.wrong.append(
            f"tenant usage {ledger} != the completed jobs' {dict(expected_usage_total)}"
        )


async def _check_job(
    redis: aioredis.Redis,
    prefix: str,
    job_id: str,
    kind: str,
    body: dict[str, Any],
    report: Report,
) -> bool:
    """Check one job; whether it completed, as it should have (its usage then counts)."""
    raw: dict[bytes, bytes] = await redis.hgetall(f"{prefix}:job:{job_id}")  # type: ignore[misc]
    record = {k.decode(): v.decode() for k, v in raw.items()}
    status = record.get("status")
    report.outcomes[f"{kind}:{status}"] += 1
    if status not in TERMINAL:
        report.lost += 1
        return False
    for key in (f"{prefix}:job:{job_id}", f"{prefix}:log:{job_id}"):
        if await redis.ttl(key) <= 0:  # -1: kept for ever; -2: gone already
            report.no_ttl.append(f"{key} ({kind}, {status})")
    log = await redis.xrange(f"{prefix}:log:{job_id}")
    events = [json.loads(fields[b"e"]) for _, fields in log]
    terminal = [e for e in events if e["event"] in ("done", "error", "cancelled")]
    if len(terminal) != 1 or [e["seq"] for e in events] != list(range(1, len(events) + 1)):
        report.duplicated += 1
    want = KINDS[kind][1]
    if status != want:
        report.wrong.append(f"{job_id} ({kind}) ended {status}, not {want}")
        return False
    if kind == "absurd_usage":
        _check_absurd(job_id, record, events, report)
    if status != "completed":
        return False
    result = json.loads(record["result"])
    if result["choices"][0]["message"]["content"] != expected_content(body):
        report.wrong.append(f"{job_id} ({kind}): stored content differs")
    if json.loads(record["usage"]) != expected_usage(body):
        report.wrong.append(f"{job_id} ({kind}): usage differs")
    return True


def _check_absurd(
    job_id: str, record: dict[str, str], events: list[dict[str, Any]], report: Report
) -> None:
    """Failed once, as the upstream's fault, never retried for it (crash re-runs aside)."""
    error = json.loads(record.get("error") or "null") or {}
    if error.get("type") != INVALID_USAGE:
        report.wrong.append(f"{job_id} (absurd_usage): error {error}, not {INVALID_USAGE}")
    retried = [e for e in events if e["event"] == "retry" and INVALID_USAGE in json.dumps(e)]
    if retried or record.get("failures", "0") not in ("0", "1"):
        report.wrong.append(f"{job_id} (absurd_usage): retried upstream: {retried}")


def run(config: Config, workdir: Path) -> Report:
    from tests.conftest import cleanup_prefix

    cluster = Cluster(config, workdir)
    report = Report()
    try:
        cluster.start()
        asyncio.run(_run(config, cluster, report))
    finally:
        cluster.stop()
        if cluster.redis is None:
            cleanup_prefix(config.redis_url, cluster.prefix)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--stalls", type=int, default=3)
    parser.add_argument("--redis-stalls", type=int, default=2)
    parser.add_argument("--rpm", type=int, default=400)
    parser.add_argument("--tpm", type=int, default=8000)
    parser.add_argument(
        "--redis-url",
        help="run on this Redis instead of a redis-server of the run's own (no Redis stalls)",
    )
    args = parser.parse_args(argv)
    config = Config(
        jobs=args.jobs,
        kills=args.kills,
        stalls=args.stalls,
        handbacks=min(1, args.stalls),
        redis_stalls=0 if args.redis_url else args.redis_stalls,
        redis_stall_s=6.0,  # past the 5 s lock: every lock lapses while Redis is stopped
        rpm=args.rpm,
        tpm=args.tpm,
        timeout=600,
        redis_url=args.redis_url or "",
        own_redis=not args.redis_url,
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = run(config, Path(tmp))
    print(report.table())
    print(f"\n{report.seconds:.0f} s; outcomes: {dict(sorted(report.outcomes.items()))}")
    for line in report.wrong[:20] + report.no_ttl[:20]:
        print("WRONG:", line)
    asked = (config.kills, config.stalls, config.handbacks, config.redis_stalls)
    made = (report.kills, report.stalls, report.handbacks, report.redis_stalls)
    if made != asked:
        print(f"disruptions made {made} != asked {asked} (kills, stalls, handbacks, Redis)")
    return 0 if report.ok and made == asked else 1


if __name__ == "__main__":
    sys.exit(main())
