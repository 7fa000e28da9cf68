"""What `GET /v1/usage` answers: a tenant's tokens, jobs and cost by UTC day and model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class UsageCounts(BaseModel):
    """Counts of completed jobs; each completed job is counted once, whatever its retries."""

    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = Field(0, description="prompt tokens the upstream served from its cache")
    cost: float | None = Field(
        None, description="estimated cost in `currency`; null when no price is known for a model"
    )


class UsageRow(UsageCounts):
    day: str = Field(description="UTC day, YYYY-MM-DD")
    model: str


class ModelUsage(UsageCounts):
    model: str


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start: str = Field(description="first UTC day reported, YYYY-MM-DD")
    end: str = Field(description="last UTC day reported, YYYY-MM-DD (inclusive)")
    currency: str = "USD"
    data: list[UsageRow] = Field(description="one row per day and model with usage, oldest first")
    by_model: list[ModelUsage]
    total: UsageCounts
    unpriced_models: list[str] = Field(
        default_factory=list, description="models without a price: their cost is not in `total`"
    )
