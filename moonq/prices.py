"""What a model costs and how much it can read: the one place `moonq batch run --dry-run` asks.

Prices are Moonshot's published list prices (platform.moonshot.ai, USD per 1M tokens, input at
the cache-miss rate) as of 2026. They change: check the pricing page before relying on them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input: float  # USD per 1M prompt tokens (cache miss)
    output: float  # USD per 1M completion tokens


# Moonshot's published prices as of 2026; they may change. moonshot-v1-auto is billed as the
# size it picks, so its price is unknown in advance.
PRICES: dict[str, Price] = {
    "kimi-k2.6": Price(0.95, 4.00),
    "kimi-k2.5": Price(0.60, 3.00),
    "kimi-k2-0905-preview": Price(0.60, 2.50),
    "kimi-k2-turbo-preview": Price(1.15, 8.00),
    "kimi-k2-thinking": Price(0.60, 2.50),
    "kimi-k2-thinking-turbo": Price(1.15, 8.00),
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


def price(model: str) -> Price | None:
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
    if known is None:
        return None
    return (prompt_tokens * known.input + completion_tokens * known.output) / 1_000_000
