"""What the dashboard's feed sends: one snapshot of the queue as one viewer may see it.

A `Board` per API process builds the snapshots. Each view (a tenant, or the admin, with a
status filter) is built at most once per `EVERY` seconds, however many dashboards show it, and
the parts every view shares (the account's figures, the charts' steps) once for all of them:
what the feed costs Redis grows with the views open, not with the dashboards or the load.
Everything a snapshot lists is bounded (`MOST_JOBS`, `MOST_BATCHES`, `MOST_USAGE_ROWS`), so a
dashboard receives at most one snapshot of bounded size per second whatever the load.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from api import metrics as cluster
from api.auth import OPEN_TENANT, Viewer
from api.services import Services
from moonq import timeline
from moonq.account import read_in_use, read_pause
from moonq.batch_models import Batch, to_batch
from moonq.models import Status
from moonq.serde import dump_bytes, loads

EVERY = 1.0  # seconds between two snapshots of a view
USAGE_EVERY = 10.0  # usage changes slowly: read at most this often per view
USAGE_DAYS = 7
MOST_JOBS = 50
MOST_BATCHES = 20
MOST_USAGE_ROWS = 100
RATE_WINDOW = 60.0  # seconds a batch's rate is measured over
# An ended job's row changes no more: it is read again only this often (it may expire), and at
# most this many are remembered.
ENDED_FOR = 60.0
MOST_ENDED = 5000
_RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
_CANCELLABLE = ("validating", "in_progress", "cancelling")
_JOB_FIELDS = ["id", "status", "model", "tenant", "attempts", "batch_id"]
_JOB_FIELDS += ["created_at", "started_at", "completed_at", "usage"]

T = TypeVar("T")
Parts = dict[str, bytes]  # a snapshot's fields, each as JSON
ALWAYS = ("at", "viewer", "filter")  # sent in every snapshot; the rest only when changed


def joined(parts: Parts) -> bytes:
    """Parts as one JSON object."""
    fields = (b'"%s":%s' % (name.encode(), value) for name, value in parts.items())
    return b"{" + b",".join(fields) + b"}"


def changed(parts: Parts, sent: Parts) -> Parts:
    """What a dashboard that has `sent` needs of `parts`."""
    return {n: v for n, v in parts.items() if n in ALWAYS or sent.get(n) != v}


@dataclass
class _Cached:
    at: float  # monotonic: when the making began
    value: Any
    error: BaseException | None = None


class Board:
    """The snapshots of one API process's dashboards."""

    def __init__(
        self,
        svc: Services,
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] = time.monotonic,
    ) -> None:
        self.svc, self.clock, self.ticks = svc, clock, ticks
        self.steps = timeline.TimelineReader(svc.redis, svc.keys)
        self._cache: dict[tuple[str, ...], _Cached] = {}
        self._making: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._done: dict[str, deque[tuple[float, int]]] = {}  # batch -> (when, lines over)
        self._ended: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()  # job rows
        self._charts: dict[tuple[str, str], tuple[Any, dict[str, object]]] = {}  # by scope

    async def parts(self, viewer: Viewer, status: Status | None) -> Parts:
        """The view's latest snapshot, each of its fields as JSON: built again once it is
        `EVERY` old. A part that did not change is the same bytes as before."""
        view = ("view", *self._scope(viewer), status.value if status else "")
        built: Parts = await self._shared(view, EVERY, lambda: self._build(viewer, status))
        return built

    async def snapshot(self, viewer: Viewer, status: Status | None) -> bytes:
        """The whole snapshot, as one JSON object."""
        return joined(await self.parts(viewer, status))

    async def _shared(
        self, name: tuple[str, ...], ttl: float, make: Callable[[], Awaitable[T]]
    ) -> T:
        """`make()`'s value, or its Redis error, made at most once per `ttl` (by the
        monotonic clock), by one task that everyone asking meanwhile awaits: a Redis that
        does not answer costs all of them one timeout, together. A caller that goes away
        leaves the making to the others."""
        found = self._cache.get(name)
        # A feed asks again `ttl` after it last asked: what was made since is still new.
        if found is not None and self.ticks() - found.at < ttl * 0.9:
            if found.error is not None:
                raise found.error
            value: T = found.value
            return value
        making = self._making.get(name)
        if making is None:
            making = self._making[name] = asyncio.ensure_future(self._make(name, make))
            making.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(making)

    async def _make(self, name: tuple[str, ...], make: Callable[[], Awaitable[T]]) -> T:
        began = self.ticks()
        try:
            value = await make()
        except (RedisError, OSError) as exc:
            self._cache[name] = _Cached(began, None, exc)
            raise
        finally:
            self._making.pop(name, None)
        self._cache[name] = _Cached(began, value)
        self._forget_old()
        return value

    def _forget_old(self) -> None:
        """Views nobody looked at for a minute."""
        now = self.ticks()
        for name in [n for n, c in self._cache.items() if now - c.at > 60]:
            del self._cache[name]

    @staticmethod
    def _scope(viewer: Viewer) -> tuple[str, str]:
        """A view's name: a tenant may be called anything, "admin" included."""
        return ("admin", "") if viewer.tenant is None else ("tenant", viewer.tenant)

    def tenants(self, viewer: Viewer) -> list[str]:
        if viewer.tenant is not None:
            return [viewer.tenant]
        return sorted(set(self.svc.tenants.values())) or [OPEN_TENANT]

    async def _build(self, viewer: Viewer, status: Status | None) -> Parts:
        now = self.clock()
        tenants = self.tenants(viewer)
        scope = self._scope(viewer)
        account, steps, batches, jobs, mine, usage = await asyncio.gather(
            self._shared(("account",), EVERY, self._account),
            self._shared(("steps",), EVERY, lambda: self.steps.read(self.clock())),
            self._batches(tenants, now),
            self._jobs(tenants, status),
            self._mine(tenants),
            self._shared(("usage", *scope), USAGE_EVERY, lambda: self._usage(tenants)),
        )
        shown = dict(account)
        if not viewer.admin:  # a tenant sees of the account what `GET /v1/account` shows it
            shown["queue"] = shown["in_flight"] = None
        snapshot = {
            "at": round(now, 3),
            "viewer": {"tenant": viewer.tenant, "admin": viewer.admin},
            "account": shown,
            "mine": mine,
            "series": self._series(scope, steps, None if viewer.admin else tenants, now),
            "batches": batches,
            "filter": status.value if status else None,
            "jobs": jobs,
            "usage": usage,
        }
        before = self._cache.get(("view", *scope, status.value if status else ""))
        parts = {name: dump_bytes(value) for name, value in snapshot.items()}
        if before is not None:  # unchanged parts keep their bytes: `changed()` is cheap
            for name, value in parts.items():
                if before.value is not None and before.value.get(name) == value:
                    parts[name] = before.value[name]
        return parts

    def _series(
        self, scope: tuple[str, str], steps: Any, tenants: list[str] | None, now: float
    ) -> dict[str, object]:
        """The charts of a scope, worked out once per read of the steps (a scope's views, one
        per status filter, share them)."""
        found = self._charts.get(scope)
        if found is None or found[0] is not steps:
            found = self._charts[scope] = (steps, timeline.series(steps, tenants, now))
        return found[1]

    async def _account(self) -> dict[str, Any]:
        svc = self.svc
        gauges, pause, in_use = await asyncio.gather(
            cluster.read(svc), read_pause(svc.redis, svc.keys), read_in_use(svc.redis, svc.keys)
        )
        live = gauges.live_workers()
        waiting = gauges.arq_queue - gauges.by_status[Status.IN_PROGRESS]
        return {
            "paused": pause is not None,
            "paused_reason": pause.reason if pause else None,
            "limits": {
                "concurrency": svc.settings.upstream_concurrency,
                "rpm": svc.settings.upstream_rpm,
                "tpm": svc.settings.upstream_tpm,
            },
            "in_use": {
                "permits": in_use.permits,
                "requests_last_minute": in_use.requests_last_minute,
                "tokens_last_minute": in_use.tokens_last_minute,
            },
            "workers": len(live),
            "queue": {"interactive": max(0, waiting), "batch": gauges.batch_waiting},
            "in_flight": sum(live),
        }

    async def _mine(self, tenants: list[str]) -> dict[str, int]:
        k = self.svc.keys
        async with self.svc.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(k.tenant_status(tenant, Status.QUEUED.value))
                pipe.zcard(k.tenant_status(tenant, Status.IN_PROGRESS.value))
            counts = await pipe.execute()
        return {"queued": sum(counts[0::2]), "in_progress": sum(counts[1::2])}

    async def _jobs(self, tenants: list[str], status: Status | None) -> list[dict[str, Any]]:
        """The newest `MOST_JOBS` jobs of the tenants (of a status), reading only the fields
        a row shows: never a result, which may be large."""
        k, redis = self.svc.keys, self.svc.redis
        async with redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                index = k.tenant_status(tenant, status.value) if status else k.tenant_jobs(tenant)
                pipe.zrevrange(index, 0, MOST_JOBS - 1, withscores=True)
            indexes = await pipe.execute()
        newest = sorted(
            ((score, member.decode()) for rows in indexes for member, score in rows), reverse=True
        )[:MOST_JOBS]
        now = self.ticks()
        rows: dict[str, dict[str, Any] | None] = {  # by job id; None: gone
            job_id: found[1]
            for _, job_id in newest
            if (found := self._ended.get(job_id)) is not None and now - found[0] < ENDED_FOR
        }
        asked = [job_id for _, job_id in newest if job_id not in rows]
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in asked:
                pipe.hmget(k.job(job_id), _JOB_FIELDS)
            records = await pipe.execute()
        for job_id, record in zip(asked, records, strict=True):
            fields = {n: v.decode() for n, v in zip(_JOB_FIELDS, record, strict=True) if v}
            row = _job_row(fields) if "status" in fields else None
            rows[job_id] = row
            if row is not None and Status(row["status"]).terminal:  # it changes no more
                self._ended[job_id] = (now, row)
                self._ended.move_to_end(job_id)
        while len(self._ended) > MOST_ENDED:
            self._ended.popitem(last=False)
        return [
            row
            for _, job_id in newest
            if (row := rows[job_id]) is not None
            and (status is None or row["status"] == status.value)
        ]

    async def _batches(self, tenants: list[str], now: float) -> list[dict[str, Any]]:
        """The newest `MOST_BATCHES` batches of the tenants, with each running one's rate
        (lines over per second, over the last `RATE_WINDOW`) and time left."""
        k, redis = self.svc.keys, self.svc.redis
        async with redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zrevrange(k.tenant_batches(tenant), 0, MOST_BATCHES - 1, withscores=True)
            indexes = await pipe.execute()
        newest = sorted(
            ((score, member.decode()) for rows in indexes for member, score in rows), reverse=True
        )[:MOST_BATCHES]
        async with redis.pipeline(transaction=False) as pipe:
            for _, batch_id in newest:
                pipe.hgetall(k.batch(batch_id))
            records = await pipe.execute()
        rows = []
        for raw in records:
            fields = {n.decode(): v.decode() for n, v in raw.items()}
            try:
                batch = to_batch(fields)
            except (KeyError, ValueError):  # gone, or not yet whole
                continue
            rows.append(self._batch_row(batch, fields.get("tenant", ""), now))
        # Another view may show a batch this one does not: forget only those no view showed
        # running for a whole window.
        for gone in [b for b, seen in self._done.items() if now - seen[-1][0] > RATE_WINDOW]:
            del self._done[gone]
        return rows

    def _batch_row(self, batch: Batch, tenant: str, now: float) -> dict[str, Any]:
        counts = batch.request_counts
        over = counts.completed + counts.failed
        rate = eta = None
        if batch.status in _RUNNING:
            seen = self._done.setdefault(batch.id, deque())
            if not seen or seen[-1][1] != over or now - seen[-1][0] >= 5:
                seen.append((now, over))
            while len(seen) > 2 and now - seen[1][0] >= RATE_WINDOW:
                seen.popleft()
            start = seen[0]
            if len(seen) < 2 or now - start[0] < 5:  # too short a look: since it started
                start = (float(batch.in_progress_at or batch.created_at), 0)
            if now > start[0]:
                rate = round((over - start[1]) / (now - start[0]), 3)
                left = counts.total - over
                eta = round(left / rate, 1) if rate > 0 else None
        return {
            "id": batch.id,
            "tenant": tenant,
            "status": batch.status,
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
            "created_at": batch.created_at,
            "rate": rate,
            "eta": eta,
            "cancellable": batch.status in _CANCELLABLE,
        }

    async def _usage(self, tenants: list[str]) -> dict[str, Any]:
        """The tenants' usage of the last `USAGE_DAYS` UTC days, by day and model, added up."""
        ledger = self.svc.ledger
        end = dt.datetime.fromtimestamp(self.clock(), dt.UTC).date()
        start = end - dt.timedelta(days=USAGE_DAYS - 1)
        reports = await asyncio.gather(*(ledger.report(t, start, end) for t in tenants))
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for report in reports:
            for row in report.data:
                into = rows.setdefault(
                    (row.day, row.model),
                    {"day": row.day, "model": row.model, "jobs": 0, "prompt_tokens": 0}
                    | {"completion_tokens": 0, "total_tokens": 0, "cost": 0.0},
                )
                for name in ("jobs", "prompt_tokens", "completion_tokens", "total_tokens"):
                    into[name] += getattr(row, name)
                into["cost"] = (
                    None if row.cost is None or into["cost"] is None else (into["cost"] + row.cost)
                )
        ordered = sorted(rows.values(), key=lambda r: (r["day"], r["model"]), reverse=True)
        priced = [r["cost"] for r in ordered if r["cost"] is not None]
        total = {
            "jobs": sum(r["jobs"] for r in ordered),
            "total_tokens": sum(r["total_tokens"] for r in ordered),
            "cost": round(sum(priced), 6) if priced else None,
        }
        for shown in ordered:
            shown["cost"] = None if shown["cost"] is None else round(shown["cost"], 6)
        return {
            "currency": ledger.currency,
            "days": USAGE_DAYS,
            "rows": ordered[:MOST_USAGE_ROWS],
            "total": total,
        }


def _job_row(fields: dict[str, str]) -> dict[str, Any]:
    started, ended = fields.get("started_at"), fields.get("completed_at")
    tokens = None
    if "usage" in fields:
        usage = loads(fields["usage"])
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        tokens = total if isinstance(total, int) else None
    return {
        "id": fields.get("id"),
        "tenant": fields.get("tenant"),
        "status": fields["status"],
        "model": fields.get("model"),
        "tokens": tokens,
        "duration": round(float(ended) - float(started), 3) if started and ended else None,
        "created_at": float(fields.get("created_at") or 0),
        "attempts": int(fields.get("attempts") or 0),
        "batch_id": fields.get("batch_id"),
    }
