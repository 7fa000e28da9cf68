"""Typed models at the edges: what clients send, what they get back, and the events they read."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from pydantic_core import PydanticCustomError

# Objects and arrays in a job request may nest this deep, the request object itself counting
# as the first level: deep enough for any real tool schema, shallow enough that encoding the
# request (for the idempotency fingerprint, for Redis, for the upstream) can never fail.
MAX_JSON_DEPTH = 64


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

    @model_validator(mode="before")
    @classmethod
    def _strict_json(cls, data: Any) -> Any:
        return strict_json(data)


def strict_json(data: Any) -> Any:
    """Refuse what JSON parsers let through but cannot be written back as JSON: a `before`
    model validator's body, naming the place (`invalid_json_value`)."""
    found = json_problem(data) if isinstance(data, dict) else None
    if found is not None:
        param, reason = found
        raise PydanticCustomError(
            "invalid_json_value",
            "{param}: {reason}",
            {"param": param or "the request", "reason": reason},
        )
    return data


_Trail = tuple[Any, str | int] | None  # (parent trail, key): a path, built only when needed
_SURROGATE = "contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode"
_BAD_KEY = "has a key with a lone surrogate (\\ud800-\\udfff), which is not valid Unicode"
_NOT_FINITE = "must be a finite number (NaN and Infinity are not JSON)"
_TOO_DEEP = f"is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)"


def json_problem(value: dict[str, Any] | list[Any]) -> tuple[str, str] | None:
    """A place in parsed JSON that strict JSON cannot encode, as (path, reason), or None.

    Python's parser accepts `NaN`, `Infinity`, lone surrogates (`"\\ud800"`) and any nesting;
    none of them can be encoded again as UTF-8 JSON, or within a sane recursion depth. One
    pass, no recursion, paths built only for the culprit: tens of ms for an 8 MiB body.
    """
    stack: list[tuple[dict[str, Any] | list[Any], int, _Trail]] = [(value, 1, None)]
    while stack:
        item, level, trail = stack.pop()
        pairs = item.items() if type(item) is dict else enumerate(item)
        for key, child in pairs:
            if type(key) is str and not _encodable(key):
                return _path(trail), _BAD_KEY
            kind = type(child)
            if kind is dict or kind is list:
                if level >= MAX_JSON_DEPTH:
                    return _path((trail, key)), _TOO_DEEP
                stack.append((child, level + 1, (trail, key)))
            elif (kind is str and not _encodable(child)) or (
                kind is float and not math.isfinite(child)
            ):
                return _path((trail, key)), _SURROGATE if kind is str else _NOT_FINITE
    return None


def _path(trail: _Trail) -> str:
    keys: list[str] = []
    while trail is not None:
        trail, key = trail
        keys.append(str(key)[:64].encode("utf-8", "backslashreplace").decode())
    return ".".join(reversed(keys))


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    # Why a queued job does not start (the upstream account is paused): GET /v1/jobs/{id} only.
    waiting_reason: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
