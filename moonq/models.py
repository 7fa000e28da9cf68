"""Typed models at the edges: what clients send, what they get back, and the events they read."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class Status(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

TERMINAL_EVENTS = frozenset({"done", "error", "cancelled"})


class Message(BaseModel):
    """One chat message; only `role` is checked, everything else goes upstream untouched."""

    model_config = ConfigDict(extra="allow")
    role: StrictStr = Field(min_length=1)


class ChatRequest(BaseModel):
    """A chat completion request as the upstream takes it; unknown fields pass through."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)

    def upstream_body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    body: ChatRequest
    custom_id: StrictStr | None = Field(None, max_length=512)
    metadata: dict[str, Any] | None = None


class ErrorInfo(BaseModel):
    type: str
    message: str
    status_code: int | None = None


class Job(BaseModel):
    """The job as clients see it. Timestamps are Unix seconds."""

    id: str
    object: Literal["job"] = "job"
    status: Status
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    model: str
    custom_id: str | None = None
    metadata: dict[str, Any] | None = None
    batch_id: str | None = None
    channel: str
    result: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
