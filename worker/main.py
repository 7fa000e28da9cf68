"""The arq face: worker settings tuned for LLM jobs, and the job function.

Run with `moonq worker` or `arq worker.main.WorkerSettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from arq import Worker
from arq.connections import ArqRedis, RedisSettings
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix
from arq.worker import func
from redis.exceptions import RedisError

from moonq import scripts
from moonq.keys import Keys
from moonq.limits import UpstreamLimiter
from moonq.redis import connect
from moonq.serde import arq_deserialize, arq_serialize
from moonq.settings import Settings, get_settings
from moonq.store import JOB_FUNCTION, JobStore, arq_payload
from worker.jobs import Runner
from worker.upstream import MoonshotClient

log = logging.getLogger("moonq.worker")

# arq counts every run (crash re-runs too); moonq counts attempts itself against
# MOONQ_MAX_ATTEMPTS, so arq's own cap only guards against a job looping forever.
ARQ_MAX_TRIES = 1000


HEARTBEAT_FILE = Path(tempfile.gettempdir()) / "moonq-worker.alive"
HEARTBEAT_EVERY = 5.0
ABORT_MAX_AGE_MS = 60_000


class MoonqWorker(Worker):
    """arq's worker that rides out Redis outages instead of exiting, stops waiting for upstream
    permits on SIGTERM, and leaves a heartbeat file for `moonq worker --check`."""

    def __init__(self, *args: Any, lock_timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress_timeout_s = lock_timeout
        self._beat = 0.0
        self._trim_aborts = False

    async def _poll_iteration(self) -> None:
        self._heartbeat()
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            log.warning("Redis unavailable (%s); the worker keeps polling", type(exc).__name__)
            await asyncio.sleep(1.0)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq takes a job slot before its Redis round trips and gives it back only on a
        WATCH conflict: after any other Redis error the slot would be lost for good. And a job
        this worker is still running is not started twice, even if its lock lapsed."""
        for job_id in job_ids:
            running = self.tasks.get(job_id.decode())
            if running is not None and not running.done():
                continue
            try:
                await super().start_jobs([job_id])
            except (RedisError, OSError):
                self.job_counter -= 1
                self.sem.release()
                raise

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        runner: Runner | None = self.ctx.get("moonq_runner")
        if runner is not None:
            runner.draining = True  # jobs still waiting for an upstream permit go back now
        super().handle_sig_wait_for_completion(signum)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._beat >= HEARTBEAT_EVERY:
            self._beat = now
            with contextlib.suppress(OSError):
                HEARTBEAT_FILE.touch()
            self._trim_aborts = True

    async def _cancel_aborted_jobs(self) -> None:
        await super()._cancel_aborted_jobs()
        if self._trim_aborts:
            # arq means to drop abort requests older than a minute, but its trim removes
            # nothing; one for a job no worker holds any more would stay for ever.
            self._trim_aborts = False
            cutoff = int(time.time() * 1000) - ABORT_MAX_AGE_MS
            await self.pool.zremrangebyscore(abort_jobs_ss, "-inf", cutoff)


def worker_is_alive(max_age: float = 6 * HEARTBEAT_EVERY) -> bool:
    """For container healthchecks: this host's worker polled within `max_age` seconds."""
    try:
        return time.time() - HEARTBEAT_FILE.stat().st_mtime < max_age
    except OSError:
        return False


@contextlib.asynccontextmanager
async def keep_locked(
    redis: ArqRedis, keys: Keys, queue: str, job_id: str, score: int, ttl: float
) -> AsyncIterator[None]:
    """Hold arq's lock on a running job for `ttl` seconds at a time, renewed while it runs.

    arq locks a job for the longest job timeout + 10 s, so a killed worker's job would wait
    that long to run again; with a short lock kept alive here it runs again within `ttl`. If
    arq's entries for the job vanish while it runs (a superseded run of it ended elsewhere and
    arq cleaned up after it), they are put back, so the job can never be left without them.
    """
    keep = redis.register_script(scripts.KEEP_LOCK)
    lock_keys = [in_progress_key_prefix + job_id, queue, job_key_prefix + job_id, keys.job(job_id)]
    args: list[str | int | bytes] = [int(ttl * 1000), job_id, score, arq_payload(job_id, score)]

    async def renew() -> None:
        while True:
            try:
                if await keep(keys=lock_keys, args=args) == 2:
                    log.warning("job %s: arq's lock and entry were gone; restored", job_id)
            except (RedisError, OSError):
                log.warning("could not renew the lock of job %s", job_id)
            await asyncio.sleep(ttl / 4)

    keeper = asyncio.create_task(renew(), name=f"moonq-lock-{job_id}")
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def run_completion(ctx: dict[str, Any], job_id: str) -> str:
    runner: Runner = ctx["moonq_runner"]
    settings = runner.settings
    async with keep_locked(
        ctx["redis"],
        runner.store.keys,
        settings.queue_name,
        job_id,
        int(ctx["score"]),
        settings.lock_timeout,
    ):
        return await runner.run(job_id)


def worker_kwargs(
    settings: Settings,
    *,
    redis: ArqRedis | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Everything `arq.Worker` takes; `redis` and `transport` are injected by dev mode and tests."""

    async def startup(ctx: dict[str, Any]) -> None:
        client = redis or connect(settings.redis_url, settings.redis_max_connections)
        store = JobStore.from_settings(client, settings)
        upstream = MoonshotClient.from_settings(settings, transport)
        limiter = UpstreamLimiter(
            client,
            store.keys,
            concurrency=settings.upstream_concurrency,
            rpm=settings.upstream_rpm,
            tpm=settings.upstream_tpm,
            lease_ttl=settings.lock_timeout,
        )
        ctx["moonq_runner"] = Runner(store, upstream, limiter, settings)
        ctx["moonq_redis"] = client
        if settings.moonshot_api_key is None:
            log.warning("MOONSHOT_API_KEY is not set: upstream calls carry no key")
        log.info(
            "moonq worker: upstream %s, concurrency %d",
            settings.moonshot_base_url,
            settings.worker_concurrency,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        runner: Runner | None = ctx.get("moonq_runner")
        if runner is not None:
            await runner.client.aclose()
            await runner.limiter.close()
        if redis is None and "moonq_redis" in ctx:
            await ctx["moonq_redis"].aclose()

    return {
        "functions": [func(run_completion, name=JOB_FUNCTION, max_tries=ARQ_MAX_TRIES)],
        "queue_name": settings.queue_name,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "redis_pool": redis,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.worker_concurrency,
        # moonq bounds each attempt's stream itself (MOONQ_JOB_TIMEOUT) and records why; arq's
        # timeout would also count the wait for an upstream permit, then drop the job.
        "job_timeout": None,
        # moonq keeps results itself; arq's copy would only hold failures' reprs.
        "keep_result": 0,
        "poll_delay": settings.poll_delay,
        "max_tries": ARQ_MAX_TRIES,
        "job_serializer": arq_serialize,
        "job_deserializer": arq_deserialize,
        "health_check_interval": 10,
        # SIGTERM: stop taking jobs, let running ones finish for the grace period, then
        # cancel the rest, which go back to the queue.
        "job_completion_wait": settings.shutdown_grace,
        "allow_abort_jobs": True,
        "lock_timeout": settings.lock_timeout,
    }


def create_worker(settings: Settings, **overrides: Any) -> MoonqWorker:
    injected = {k: overrides.pop(k) for k in ("redis", "transport") if k in overrides}
    return MoonqWorker(**{**worker_kwargs(settings, **injected), **overrides})


def __getattr__(name: str) -> Any:
    """`WorkerSettings`, for `arq worker.main.WorkerSettings`: built from the environment when
    asked for, so importing this module reads no settings."""
    if name == "WorkerSettings":
        return worker_kwargs(get_settings())  # arq's runner drops `lock_timeout`
    raise AttributeError(name)
