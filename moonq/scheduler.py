"""The hand-out of batch lines to workers: fair between tenants, and never in the way of
interactive jobs (see `batch_lua` for the model)."""

from __future__ import annotations

import time
from collections.abc import Callable

from arq.constants import job_key_prefix
from redis.asyncio import Redis

from moonq.batch_lua import DISPATCH
from moonq.keys import Keys
from moonq.limits import kept_back
from moonq.settings import Settings
from moonq.store import arq_payload

# Batch lines wait behind every interactive job for an upstream permit: their priority in the
# limiter's line is their creation time plus this (about 300 years).
BATCH_PRIORITY_OFFSET = 1e10


def batch_cap(settings: Settings) -> int:
    """The most batch lines in flight account-wide: the upstream's concurrency less what is
    kept back for interactive jobs (`limits.kept_back`); 0 = no cap (no concurrency limit)."""
    return kept_back(settings.upstream_concurrency)


def worker_reserve(max_jobs: int) -> int:
    """Job slots a worker keeps free of batch lines, so an interactive job finds one."""
    return max(1, max_jobs // 10)


class Scheduler:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        queue_name: str,
        *,
        cap: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_name = queue_name
        self.cap = cap
        self.clock = clock
        self._dispatch = redis.register_script(DISPATCH)
        self._template = arq_payload("JOBID", 0).decode()

    async def dispatch(self, want: int) -> list[str]:
        """Up to `want` batch lines, now in arq's queue for the caller to start."""
        if want <= 0:
            return []
        k = self.keys
        now_ms = int(self.clock() * 1000)
        payload = self._template.replace('"et":0', f'"et":{now_ms}')
        keys = [k.sched_active(), k.sched_vtime(), k.sched_clock(), k.sched_inflight()]
        ids = await self._dispatch(
            keys=[*keys, self.queue_name],
            args=[
                k.sched_base(),
                k.batch_base(),
                k.job(""),
                job_key_prefix,
                want,
                self.cap,
                payload,
            ],
        )
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
