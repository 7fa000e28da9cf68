"""The usage ledger: what each tenant's completed jobs used, by UTC day and model, with cost.

FINISH (moonq/scripts.py) adds a completed job's counts to its tenant's hash for the day in the
same step that ends the job, so a job counts once whatever its retries. One hash per tenant
per day (`model|name` -> amount), kept MOONQ_USAGE_RETENTION_DAYS, bounds what Redis holds.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from redis.asyncio import Redis

from moonq import prices
from moonq.keys import Keys
from moonq.store import utc_day
from moonq.usage_models import ModelUsage, UsageCounts, UsageReport, UsageRow

COUNTS = ("jobs", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
MAX_DAYS = 366


def days(start: dt.date, end: dt.date) -> list[str]:
    return [str(start + dt.timedelta(days=i)) for i in range((end - start).days + 1)]


class UsageLedger:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        price_table: Mapping[str, prices.Price] | None = None,
        currency: str = "USD",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis, self.keys, self.clock = redis, keys, clock
        self.price_table = dict(price_table or {})
        self.currency = currency
        # Sums of a month's finished days, by (tenant, today): those days no longer change.
        self._past: dict[tuple[str, str], UsageCounts] = {}

    async def report(self, tenant: str, start: dt.date, end: dt.date) -> UsageReport:
        """The tenant's usage from `start` to `end` (UTC days, inclusive)."""
        names = days(start, end)
        rows = [
            UsageRow(day=day, model=model, **self._priced(model, counts).model_dump())
            for day, raw in zip(names, await self._read(tenant, names), strict=True)
            for model, counts in sorted(_by_model(raw).items())
        ]
        models: dict[str, UsageCounts] = {}
        for row in rows:
            models[row.model] = _add(models.get(row.model, UsageCounts()), row)
        by_model = [ModelUsage(model=m, **c.model_dump()) for m, c in sorted(models.items())]
        unpriced = sorted(m for m, c in models.items() if c.cost is None)
        return UsageReport(
            start=str(start),
            end=str(end),
            currency=self.currency,
            data=rows,
            by_model=by_model,
            total=_sum(by_model),
            unpriced_models=unpriced,
        )

    async def spent(self, tenant: str, now: float) -> tuple[UsageCounts, UsageCounts]:
        """What the tenant has used today and this month (UTC), with cost."""
        today = dt.date.fromisoformat(utc_day(now))
        cache_key = (tenant, str(today))
        past = self._past.get(cache_key)
        names = days(today.replace(day=1), today)
        raws = await self._read(tenant, names[-1:] if past is not None else names)
        if past is None:
            past = _sum(c for raw in raws[:-1] for c in self._priced_all(raw))
            if len(self._past) > 10_000:
                self._past.clear()
            self._past[cache_key] = past
        day = _sum(self._priced_all(raws[-1]))
        return day, _add(past, day)

    async def _read(self, tenant: str, names: list[str]) -> list[dict[bytes, bytes]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in names:
                pipe.hgetall(self.keys.usage(tenant, day))
            found: list[dict[bytes, bytes]] = await pipe.execute()
        return found

    def price(self, model: str) -> prices.Price | None:
        return prices.price(model, self.price_table)

    def _priced(self, model: str, counts: dict[str, int]) -> UsageCounts:
        known = self.price(model)
        cost = None
        if known is not None:
            prompt, completion = counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0)
            cost = known.cost(prompt, completion, counts.get("cached_tokens", 0))
        return UsageCounts(**counts, cost=cost)

    def _priced_all(self, raw: dict[bytes, bytes]) -> list[UsageCounts]:
        return [self._priced(model, counts) for model, counts in _by_model(raw).items()]


def _by_model(raw: dict[bytes, bytes]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        model, _, name = field.decode(errors="replace").rpartition("|")
        if name in COUNTS and value.isdigit():
            found.setdefault(model, {})[name] = int(value)
    return found


def _add(a: UsageCounts, b: UsageCounts) -> UsageCounts:
    """Counts added; the cost of the priced parts (None when no part has a price: the report
    lists unpriced models apart rather than count them as free)."""
    values: dict[str, Any] = {name: getattr(a, name) + getattr(b, name) for name in COUNTS}
    costs = [c.cost for c in (a, b) if c.cost is not None]
    return UsageCounts(**values, cost=round(sum(costs), prices.COST_DIGITS) if costs else None)


def _sum(items: Iterable[UsageCounts]) -> UsageCounts:
    total = UsageCounts()
    for item in items:
        total = _add(total, item)
    return total
