"""What a model costs and how much it can read: the one place `moonq batch run --dry-run` asks.

Prices are Moonshot's published list prices (platform.moonshot.ai, USD per 1M tokens, input at
the cache-miss rate) as of 2026. They change: check the pricing page before relying on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Costs are rounded to this many decimals of the currency: far below any price's own
# precision, and no float noise (0.0005832000000000001) in what the API answers.
COST_DIGITS = 10


@dataclass(frozen=True)
class Price:
    """Per 1M tokens, in MOONQ_PRICE_CURRENCY; a `MOONQ_PRICES` entry is one of these."""

    input: float  # prompt tokens (cache miss)
    output: float  # completion tokens
    cached_input: float | None = None  # prompt tokens served from the cache (None: as input)

    def __post_init__(self) -> None:
        for value in (self.input, self.output, self.cached_input):
            if value is not None and not (0 <= value < 1e6):
                raise ValueError("prices are per 1M tokens: from 0 to under 1,000,000")

    def cost(self, prompt: int, completion: int, cached: int = 0) -> float:
        cached = min(max(cached, 0), prompt)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        total = (prompt - cached) * self.input + cached * cached_rate + completion * self.output
        return round(total / 1_000_000, COST_DIGITS)


# Moonshot's published prices as of 2026; they may change. moonshot-v1-auto is billed as the
# size it picks, so its price is unknown in advance.
# K2 models cache prompt prefixes automatically and bill a cache hit at the lower rate.
PRICES: dict[str, Price] = {
    "kimi-k2.6": Price(0.95, 4.00, 0.16),
    "kimi-k2.5": Price(0.60, 3.00, 0.10),
    "kimi-k2-0905-preview": Price(0.60, 2.50, 0.15),
    "kimi-k2-turbo-preview": Price(1.15, 8.00, 0.15),
    "kimi-k2-thinking": Price(0.60, 2.50, 0.15),
    "kimi-k2-thinking-turbo": Price(1.15, 8.00, 0.15),
    "moonshot-v1-8k": Price(0.20, 2.00),
    "moonshot-v1-32k": Price(1.00, 3.00),
    "moonshot-v1-128k": Price(2.00, 5.00),
}

# Context windows in tokens (prompt and answer together), by exact name, then by prefix.
CONTEXT: dict[str, int] = {
    "moonshot-v1-8k": 8_192,
    "moonshot-v1-32k": 32_768,
    "moonshot-v1-128k": 131_072,
    "moonshot-v1-auto": 131_072,
}
CONTEXT_BY_PREFIX: dict[str, int] = {
    "moonshot-v1-8k-": 8_192,
    "moonshot-v1-32k-": 32_768,
    "moonshot-v1-128k-": 131_072,
    "kimi-k2": 262_144,
}


def price(model: str, table: Mapping[str, Price] | None = None) -> Price | None:
    """The model's price: `table` (MOONQ_PRICES) first, then Moonshot's published ones."""
    if table and model in table:
        return table[model]
    return PRICES.get(model)


def context_window(model: str) -> int | None:
    """The model's context window, or None for a model this table does not know."""
    if model in CONTEXT:
        return CONTEXT[model]
    for prefix, size in CONTEXT_BY_PREFIX.items():
        if model.startswith(prefix):
            return size
    return None


def cost(model: str, prompt_tokens: int, completion_tokens: int = 0) -> float | None:
    """USD for that many tokens, or None for a model without a known price."""
    known = price(model)
    return None if known is None else known.cost(prompt_tokens, completion_tokens)
