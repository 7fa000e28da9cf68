"""What the token-count route may ask the upstream: its answers cached, and each tenant held to
a few upstream calls per second.

The route spends the server's Moonshot key outside the upstream limiter; without a bound, one
tenant could call the upstream as fast as it can send. Past the bound it answers with moonq's
local estimate instead, so a client is never refused for asking.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

UPSTREAM_PER_SECOND = 5  # upstream token counts per tenant per second (per API process)
CACHE_SIZE = 4096  # answers kept, least recently used first out


def estimate_key(body: dict[str, Any]) -> str:
    """A hash of what the upstream counts (its answer depends on nothing else)."""
    counted = {k: body.get(k) for k in ("model", "messages", "tools")}
    text = json.dumps(counted, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class EstimateGuard:
    """One per API process: the upstream's answers by request, and each tenant's recent calls."""

    def __init__(
        self,
        per_second: int = UPSTREAM_PER_SECOND,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second, self.size, self.clock = per_second, size, clock
        self._answers: OrderedDict[str, int] = OrderedDict()
        self._calls: dict[str, deque[float]] = {}

    def cached(self, key: str) -> int | None:
        count = self._answers.get(key)
        if count is not None:
            self._answers.move_to_end(key)
        return count

    def remember(self, key: str, count: int) -> None:
        self._answers[key] = count
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    def allow(self, tenant: str) -> bool:
        """True (and counted) when the tenant may make one more upstream call this second."""
        now = self.clock()
        calls = self._calls.setdefault(tenant, deque())
        while calls and calls[0] <= now - 1.0:
            calls.popleft()
        if len(calls) >= self.per_second:
            return False
        calls.append(now)
        self._forget_idle(now)
        return True

    def _forget_idle(self, now: float) -> None:
        """Tenants with no call in the last second: dropped, so the map stays small."""
        if len(self._calls) > 1024:
            idle = [t for t, calls in self._calls.items() if not calls or calls[-1] <= now - 1.0]
            for tenant in idle:
                del self._calls[tenant]
