"""`GET /metrics`: Prometheus text for the whole deployment, the same from every API process.

What the workers measured is read from Redis (`moonq.metrics`), and the live gauges (jobs by
status, queue depths, jobs in flight, limiter permits and waiters) are read at scrape time:
all of it in one pipelined round trip, bounded whatever the queue's size. No tenant appears
in any label, so the route is open like `/healthz` unless MOONQ_METRICS_KEY is set.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from api.auth import OPEN_TENANT
from api.errors import APIError
from api.services import Services, services
from moonq import metrics
from moonq.models import Status

router = APIRouter()

# The text format every Prometheus reads (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Batch lines waiting in the scheduler: the pending lines of the running batches of the
# tenants with lines to hand out. Bounded: the first MOST_TENANTS tenants, MOST_BATCHES
# batches each (a larger backlog reads as this much).
MOST_TENANTS = 100
MOST_BATCHES = 20
# KEYS: 1 the tenants with batch lines (`Keys.sched_active`). ARGV: 1 tenant line base,
# 2 batch key base, 3 most tenants, 4 most batches per tenant. Returns the lines waiting.
# Reads only.
_BATCH_WAITING = """
local total = 0
for _, tenant in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)) do
  for _, batch in ipairs(redis.call('LRANGE', ARGV[1] .. tenant, 0, tonumber(ARGV[4]) - 1)) do
    local b = redis.call('HMGET', ARGV[2] .. batch, 'status', 'ending')
    if b[1] == 'in_progress' and not b[2] then
      total = total + redis.call('LLEN', ARGV[2] .. batch .. ':pending')
    end
  end
end
return total
"""
_LIVE = (Status.QUEUED.value, Status.IN_PROGRESS.value)


@dataclass
class Snapshot:
    """Everything one scrape shows, read in one round trip."""

    stored: dict[str, str] = field(default_factory=dict)  # `Keys.metrics()`: field -> amount
    workers: dict[str, str] = field(default_factory=dict)  # worker -> "in-flight unix-s"
    by_status: dict[str, int] = field(default_factory=dict)
    arq_queue: int = 0
    batch_waiting: int = 0
    permits: int = 0
    waiters: int = 0
    now: float = 0.0

    def live_workers(self) -> list[int]:
        """The jobs in flight of each worker that spoke lately."""
        counts = []
        for state in self.workers.values():
            in_flight, _, at = state.partition(" ")
            if self.now - float(at or 0) < metrics.STALE_AFTER:
                counts.append(int(in_flight))
        return counts

    def forgotten(self) -> list[str]:
        """Workers silent for so long that they are gone: their entries can be dropped."""
        return [
            worker
            for worker, state in self.workers.items()
            if self.now - float(state.partition(" ")[2] or 0) > metrics.FORGET_AFTER
        ]


@router.get("/metrics", include_in_schema=False)
async def metrics_text(request: Request) -> Response:
    """Prometheus text format (0.0.4)."""
    svc = services(request)
    _authorize(request, svc)
    snapshot = await read(svc)
    if snapshot.forgotten():
        await svc.redis.hdel(svc.keys.metrics_workers(), *snapshot.forgotten())  # type: ignore[misc]
    return Response(generate_latest(Cluster(snapshot)), media_type=CONTENT_TYPE)


def _authorize(request: Request, svc: Services) -> None:
    key = svc.settings.metrics_key.get_secret_value() if svc.settings.metrics_key else ""
    if not key:
        return
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "Missing or invalid metrics key: send 'Authorization: Bearer <MOONQ_METRICS_KEY>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def read(svc: Services) -> Snapshot:
    """One pipeline: the stored metrics, the workers, and the live gauges."""
    k, now = svc.keys, time.time()
    tenants = sorted(set(svc.tenants.values())) or [OPEN_TENANT]
    async with svc.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(k.metrics())
        pipe.hgetall(k.metrics_workers())
        pipe.zcard(svc.settings.queue_name)
        pipe.zcount(k.limit_leases(), int(now * 1000) + 1, "+inf")
        pipe.zcount(k.limit_seen(), int(now * 1000) - 3000, "+inf")
        keys_args = [k.sched_active(), k.sched_base(), k.batch_base()]
        keys_args += [str(MOST_TENANTS), str(MOST_BATCHES)]
        pipe.eval(_BATCH_WAITING, 1, *keys_args)
        for tenant in tenants:
            for status in _LIVE:
                pipe.zcard(k.tenant_status(tenant, status))
        stored, workers, queue, permits, waiters, batch, *counts = await pipe.execute()
    by_status = dict.fromkeys(_LIVE, 0)
    for i, count in enumerate(counts):
        by_status[_LIVE[i % len(_LIVE)]] += int(count)
    return Snapshot(
        stored=_decoded(stored),
        workers=_decoded(workers),
        by_status=by_status,
        arq_queue=int(queue),
        batch_waiting=int(batch),
        permits=int(permits),
        waiters=int(waiters),
        now=now,
    )


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class Cluster:
    """A prometheus_client collector over one `Snapshot`."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        grouped = _group(self.snapshot.stored)
        for spec in metrics.SPECS:
            rows = grouped.get(spec.name, {})
            yield _counter(spec, rows) if spec.kind == "counter" else _histogram(spec, rows)
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        s = self.snapshot
        jobs = GaugeMetricFamily(
            "moonq_jobs", "Jobs not over, by status (batch lines included).", labels=["status"]
        )
        for status, count in s.by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        depth = GaugeMetricFamily(
            "moonq_queue_depth",
            "Jobs waiting to start: interactive = in arq's queue (due or deferred for a retry), "
            "batch = batch lines waiting in the scheduler.",
            labels=["queue"],
        )
        depth.add_metric(["interactive"], max(0, s.arq_queue - s.by_status[Status.IN_PROGRESS]))
        depth.add_metric(["batch"], s.batch_waiting)
        yield depth
        live = s.live_workers()
        yield GaugeMetricFamily(
            "moonq_jobs_in_flight",
            "Jobs the live workers hold (waiting for an upstream permit or streaming).",
            value=sum(live),
        )
        yield GaugeMetricFamily("moonq_workers", "Workers that reported lately.", value=len(live))
        yield GaugeMetricFamily(
            "moonq_limiter_permits_in_use",
            "Upstream concurrency permits held, across all workers.",
            value=s.permits,
        )
        yield GaugeMetricFamily(
            "moonq_limiter_waiters", "Requests waiting for an upstream permit.", value=s.waiters
        )


# sample name -> label values -> (le or "") -> amount
Rows = dict[tuple[str, ...], dict[str, float]]


def _group(stored: dict[str, str]) -> dict[str, Rows]:
    """The stored samples by metric, then by label values (in each spec's order)."""
    specs = {spec.name: spec for spec in metrics.SPECS}
    out: dict[str, Rows] = {}
    for raw, amount in stored.items():
        parsed = metrics.parse_field(raw)
        if parsed is None:
            continue
        name, labels = parsed
        base, _, part = name.rpartition("_")
        spec = specs.get(base)
        if spec is None or part not in ("total", "bucket", "sum"):
            continue
        values = tuple(labels.get(label, "") for label in spec.labels)
        row = out.setdefault(base, {}).setdefault(values, {})
        slot = labels.get("le", "") if part == "bucket" else part
        row[slot] = row.get(slot, 0.0) + float(amount)
    return out


def _counter(spec: metrics.Spec, rows: Rows) -> Metric:
    family = CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    for values, row in sorted(rows.items()):
        family.add_metric(list(values), row.get("total", 0.0))
    return family


def _histogram(spec: metrics.Spec, rows: Rows) -> Metric:
    family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    for values, row in sorted(rows.items()):
        counts = {float(le): n for le, n in row.items() if le != "sum"}
        running, buckets = 0.0, []
        for bound in (*spec.buckets, float("inf")):
            running += counts.get(bound, 0.0)
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        family.add_metric(list(values), buckets, row.get("sum", 0.0))
    return family
