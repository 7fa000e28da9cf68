"""The last minutes of the queue, for the dashboard's charts: jobs, tokens and time to first
token per `STEP` seconds, by tenant.

Workers count what ended in memory (`Recorder`) and add it, with their metrics flush (once a
second, in the same transaction), to the hash of the step it lands in (`Keys.metrics_slot`),
which expires once it is older than the charts' span. Nothing per chunk, nothing per job at
load: a few fields per tenant per flush.

An API process reads the steps back (`TimelineReader`): a step ends taking writes a flush after
it ends, so only the last few are read again each time; the older ones are kept in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis

from moonq.keys import Keys

STEP = 5  # seconds per point
SPAN = 600  # seconds the charts cover
KEEP = SPAN + 120  # a step's hash outlives the span a little
# Steps this recent may still be written to (a flush lands up to a second after a job ends,
# and workers' clocks may differ by a little): read again each time.
OPEN_STEPS = 3

# Time to first token: OpenTelemetry's advised buckets (as the metric `moonq.metrics.TTFT`).
TTFT_BOUNDS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5)
TTFT_BOUNDS += (0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# A field is `kind:tenant`; a tenant may hold any character, the kind none of ':'.
DONE, FAILED, TOKENS = "done", "failed", "tokens"
TTFT = "t"  # `t<bucket index>`: len(TTFT_BOUNDS) is the overflow bucket


TTFT_KINDS = tuple(f"{TTFT}{i}" for i in range(len(TTFT_BOUNDS) + 1))


def step_of(now: float) -> int:
    return int(now // STEP)


def ttft_kind(seconds: float) -> str:
    for index, bound in enumerate(TTFT_BOUNDS):
        if seconds <= bound:
            return TTFT_KINDS[index]
    return TTFT_KINDS[-1]


class Tally:
    """What a worker saw end since its last flush: field -> amount."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, kind: str, tenant: str, amount: int = 1) -> None:
        name = f"{kind}:{tenant}"
        self.counts[name] = self.counts.get(name, 0) + amount

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts

    def put_back(self, counts: Mapping[str, int]) -> None:
        for name, amount in counts.items():
            self.counts[name] = self.counts.get(name, 0) + amount


Step = dict[str, dict[str, int]]  # tenant -> kind -> amount


@dataclass
class TimelineReader:
    """An API process's copy of the last `SPAN` seconds of steps."""

    redis: Redis
    keys: Keys
    closed: dict[int, Step] = field(default_factory=dict)  # steps no flush writes to anymore

    async def read(self, now: float) -> dict[int, Step]:
        """Every step of the span: the open ones (and any closed one not yet read) from Redis,
        in one pipeline."""
        last = step_of(now)
        wanted = range(last - SPAN // STEP + 1, last + 1)
        self.closed = {step: data for step, data in self.closed.items() if step in wanted}
        asked = [step for step in wanted if step not in self.closed]
        async with self.redis.pipeline(transaction=False) as pipe:
            for step in asked:
                pipe.hgetall(self.keys.metrics_slot(step))
            rows = await pipe.execute()
        out = dict(self.closed)
        for step, raw in zip(asked, rows, strict=True):
            out[step] = _parsed(raw)
            if step <= last - OPEN_STEPS:
                self.closed[step] = out[step]
        return out


def _parsed(raw: Mapping[bytes, bytes]) -> Step:
    step: Step = {}
    for name, amount in raw.items():
        kind, sep, tenant = name.decode().partition(":")
        if sep and amount.isdigit():
            step.setdefault(tenant, {})[kind] = int(amount)
    return step


def series(
    steps: Mapping[int, Step], tenants: Iterable[str] | None, now: float
) -> dict[str, object]:
    """The charts' points, oldest first, up to the last step that has ended: jobs and failed
    jobs per second, tokens per second, and time to first token's p50 and p95 (None for a
    step without a completed job). `tenants` None adds up every tenant's."""
    wanted = None if tenants is None else set(tenants)
    last = step_of(now) - 1
    times: list[int] = []
    jobs: list[float] = []
    failed: list[float] = []
    tokens: list[float] = []
    p50: list[float | None] = []
    p95: list[float | None] = []
    for step in range(last - SPAN // STEP + 1, last + 1):
        total: dict[str, int] = {}
        for tenant, kinds in steps.get(step, {}).items():
            if wanted is None or tenant in wanted:
                for kind, amount in kinds.items():
                    total[kind] = total.get(kind, 0) + amount
        times.append(step * STEP)
        jobs.append(round(total.get(DONE, 0) / STEP, 3))
        failed.append(round(total.get(FAILED, 0) / STEP, 3))
        tokens.append(round(total.get(TOKENS, 0) / STEP, 1))
        if not total:  # most steps of a quiet queue
            p50.append(None)
            p95.append(None)
            continue
        buckets = [total.get(kind, 0) for kind in TTFT_KINDS]
        p50.append(quantile(0.5, buckets))
        p95.append(quantile(0.95, buckets))
    return {
        "step": STEP,
        "t": times,
        "jobs": jobs,
        "failed": failed,
        "tokens": tokens,
        "ttft_p50": p50,
        "ttft_p95": p95,
    }


def quantile(q: float, buckets: list[int]) -> float | None:
    """The q-quantile of counts per `TTFT_BOUNDS` bucket (the last: past every bound),
    interpolated within its bucket as Prometheus's histogram_quantile does; None if empty."""
    count = sum(buckets)
    if count == 0:
        return None
    rank = q * count
    seen = 0
    for index, n in enumerate(buckets):
        if n and seen + n >= rank:
            if index == len(TTFT_BOUNDS):
                return TTFT_BOUNDS[-1]  # past the last bound: that bound is all one can say
            low = TTFT_BOUNDS[index - 1] if index else 0.0
            high = TTFT_BOUNDS[index]
            value = low + (high - low) * (rank - seen) / n
            return round(value, 4) if math.isfinite(value) else None
        seen += n
    return TTFT_BOUNDS[-1]
