"""Per-tenant budgets (`MOONQ_BUDGETS`): a request rate and token or cost caps per UTC day and
month, checked when work is submitted so that one tenant cannot spend the account's allowance.

`MOONQ_BUDGETS` is JSON keyed by tenant, `"*"` being every tenant without an entry of its own:
`{"acme": {"requests_per_minute": 60, "tokens_per_day": 2000000, "cost_per_month": 50}}`.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from moonq.keys import Keys
from moonq.limits import completion_budget

if TYPE_CHECKING:  # the ledger reads the store, which reads the settings, which read Budget
    from moonq.usage import UsageLedger

DEFAULT_TENANT = "*"
DAY = 24 * 3600


class Budget(BaseModel):
    """One tenant's caps; each is optional and unset means unlimited."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)
    tokens_per_month: int | None = Field(None, ge=1)
    cost_per_day: float | None = Field(None, gt=0, allow_inf_nan=False)
    cost_per_month: float | None = Field(None, gt=0, allow_inf_nan=False)

    @property
    def spends(self) -> bool:
        return any(
            v is not None
            for v in (
                self.tokens_per_day,
                self.tokens_per_month,
                self.cost_per_day,
                self.cost_per_month,
            )
        )


# What a request that does not say `max_tokens` is held to answer with, for budgets alone:
# Moonshot's documented default `max_tokens` (its real usage replaces it when it completes).
DEFAULT_COMPLETION = 1024
NANOS = 1_000_000_000  # costs are held in billionths of the currency, as integers

# KEYS: the tenant's holds of the day, of the month. ARGV: 1 tokens, 2 cost (nanos) asked,
# 3 the day's ttl, 4 the month's ttl (s), then (cap or '', spent) for tokens per day, tokens per
# month, cost per day, cost per month (costs in nanos). Holds the amounts unless spent + held +
# asked passes a cap; returns 0, or {the cap's number (1-4), the total it would come to}.
# Checked first; the writes (HINCRBY of integers moonq alone writes, EXPIRE) cannot fail.
RESERVE = """
local held = {redis.call('HMGET', KEYS[1], 'tokens', 'nanos'),
  redis.call('HMGET', KEYS[2], 'tokens', 'nanos')}
local asked = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local checks = {{5, held[1][1], 1}, {7, held[2][1], 1}, {9, held[1][2], 2}, {11, held[2][2], 2}}
for i, c in ipairs(checks) do
  if ARGV[c[1]] ~= '' then
    local total = tonumber(ARGV[c[1] + 1]) + (tonumber(c[2]) or 0) + asked[c[3]]
    if total > tonumber(ARGV[c[1]]) then return {i, tostring(total)} end
  end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'tokens', ARGV[1])
  redis.call('HINCRBY', key, 'nanos', ARGV[2])
  redis.call('EXPIRE', key, ARGV[2 + i])
end
return 0
"""
_CAPS = ("tokens_per_day", "tokens_per_month", "cost_per_day", "cost_per_month")


def budget_completion(body: dict[str, Any]) -> int:
    """The answer tokens a request is held to: its `max_tokens`, else DEFAULT_COMPLETION."""
    return completion_budget(body) or DEFAULT_COMPLETION


@dataclass(frozen=True)
class Hold:
    """Tokens and cost held against a tenant's day and month until the work ends. A job's
    record carries its own (`Hold.field`), which FINISH gives back as its real usage counts."""

    tokens: int
    nanos: int
    day: str
    month: str

    @property
    def field(self) -> str:
        return f"{self.tokens} {self.nanos} {self.day} {self.month}"

    def part(self, tokens: int, cost: float) -> Hold:
        return Hold(tokens, round(cost * NANOS), self.day, self.month)


@dataclass(frozen=True)
class OverBudget(Exception):
    """A submission the tenant's budget refuses: which budget, and when it resets (Unix s)."""

    budget: str
    message: str
    resets_at: float


class NeverFits(OverBudget):
    """A submission whose estimate alone is more than a budget allows: waiting cannot help."""


def budget_for(budgets: dict[str, Budget], tenant: str) -> Budget | None:
    return budgets.get(tenant, budgets.get(DEFAULT_TENANT))


def next_day(now: float) -> float:
    return (int(now) // DAY + 1) * DAY


def next_month(now: float) -> float:
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Budgets:
    """Checks submissions against `MOONQ_BUDGETS`; costs nothing for tenants without one."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        budgets: dict[str, Budget],
        ledger: UsageLedger,
        clock: Any = time.time,
    ) -> None:
        self.redis, self.keys, self.budgets, self.ledger = redis, keys, budgets, ledger
        self.clock = clock
        self._hold = redis.register_script(RESERVE)

    async def admit(self, tenant: str, tokens: int, cost: float) -> Hold | None:
        """Hold this submission's estimated `tokens` and `cost` against the tenant's budgets,
        or raise `OverBudget` (`NeverFits` when the estimate alone passes a cap). Spent (the
        completed jobs' usage) + held (accepted work not yet over) + this must fit, checked
        and held in one step, so concurrent submissions cannot all pass. A batch is one
        submission with every line's estimate: accepted whole or not at all. The request
        rate is counted after, so a submission refused for its size does not spend it."""
        budget = budget_for(self.budgets, tenant)
        if budget is None:
            return None
        now = self.clock()
        hold = None
        if budget.spends:
            hold = await self._reserve(budget, tenant, tokens, round(cost * NANOS), now)
        if budget.requests_per_minute is not None:
            try:
                await self._rate(budget.requests_per_minute, tenant, now)
            except OverBudget:
                if hold is not None:
                    await self.release(tenant, hold)
                raise
        return hold

    async def release(self, tenant: str, hold: Hold) -> None:
        """Give a hold back: its submission was not accepted after all (a replay, a failure)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for period in (hold.day, hold.month):
                pipe.hincrby(self.keys.budget_hold(tenant, period), "tokens", -hold.tokens)
                pipe.hincrby(self.keys.budget_hold(tenant, period), "nanos", -hold.nanos)
            await pipe.execute()

    async def _reserve(
        self, budget: Budget, tenant: str, tokens: int, nanos: int, now: float
    ) -> Hold:
        caps = [budget.tokens_per_day, budget.tokens_per_month]
        caps += [
            None if c is None else round(c * NANOS)
            for c in (budget.cost_per_day, budget.cost_per_month)
        ]
        asked = [tokens, tokens, nanos, nanos]
        for name, cap, wanted in zip(_CAPS, caps, asked, strict=True):
            if cap is not None and wanted > cap:
                raise NeverFits(name, self._message(tenant, name, cap, wanted, None), 0.0)
        day, month = await self.ledger.spent(tenant, now)
        spent = [day.total_tokens, month.total_tokens]
        spent += [round((c.cost or 0.0) * NANOS) for c in (day, month)]
        today = time.strftime("%Y-%m-%d", time.gmtime(now))
        hold = Hold(tokens, nanos, today, today[:7])
        keys = [self.keys.budget_hold(tenant, hold.day), self.keys.budget_hold(tenant, hold.month)]
        args: list[Any] = [tokens, nanos, int(next_day(now) - now) + DAY]
        args.append(int(next_month(now) - now) + DAY)
        for cap, used in zip(caps, spent, strict=True):
            args += ["" if cap is None else cap, used]
        refused = await self._hold(keys=keys, args=args)
        if refused != 0:
            number, total = int(refused[0]), float(refused[1])
            name = _CAPS[number - 1]
            resets = next_day(now) if name.endswith("day") else next_month(now)
            raise OverBudget(
                name, self._message(tenant, name, caps[number - 1], total, resets), resets
            )
        return hold

    def _message(
        self, tenant: str, name: str, cap: int | None, total: float, resets: float | None
    ) -> str:
        costs = name.startswith("cost")
        unit = self.ledger.currency if costs else "tokens"
        scale = NANOS if costs else 1
        limit, come_to = (cap or 0) / scale, total / scale
        text = f"Over budget: tenant {tenant!r} has {name} = {limit:,.6g} {unit} (MOONQ_BUDGETS); "
        if resets is None:
            return (
                text
                + f"this request alone is estimated at {come_to:,.6g} {unit}: it can never fit."
            )
        return (
            text + f"spent, accepted work not yet over and this request together come to "
            f"{come_to:,.6g} {unit}. It resets at {_iso(resets)}."
        )

    async def _rate(self, limit: int, tenant: str, now: float) -> None:
        minute = int(now) // 60
        key = self.keys.budget_requests(tenant, minute)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = await pipe.execute()
        if count > limit:
            resets = (minute + 1) * 60.0
            raise OverBudget(
                "requests_per_minute",
                f"Over budget: tenant {tenant!r} has requests_per_minute = {limit} "
                f"(MOONQ_BUDGETS). It resets at {_iso(resets)}.",
                resets,
            )
