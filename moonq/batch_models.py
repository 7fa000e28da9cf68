"""OpenAI's batch object and what it is made of: ids, completion windows, the record's
fields, and the errors of a failed validation."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel

from moonq.batch_input import LineError

# A failed validation lists at most this many bad lines, then says how many more there were.
MAX_LISTED_ERRORS = 1000
MAX_WINDOW = 7 * 24 * 3600
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COUNTS = ("total", "completed", "failed", "cancelled", "expired", "done")
USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
_TIMES = ("created_at", "in_progress_at", "expires_at", "completed_at", "failed_at")
_TIMES_TOO = ("cancelling_at", "cancelled_at", "expired_at", "finalizing_at")
BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}$")


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int
    cancelled: int = 0
    expired: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """Token totals of a batch's completed lines, in OpenAI's names (the SDK's `BatchUsage`)
    and in the chat completion's names moonq gave first, kept for the clients that read them.
    Reasoning tokens are not counted apart (they are in `output_tokens`): always 0."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int


def batch_usage(fields: dict[str, str]) -> BatchUsage:
    """The record's totals (FINISH adds each completed line's) as OpenAI's usage."""
    prompt, completion, total, cached = (int(fields.get(n, "0")) for n in (*USAGE, "cached_tokens"))
    return BatchUsage(
        input_tokens=prompt,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=completion,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=total,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


class Batch(BaseModel):
    """OpenAI's batch object; its `usage` sums its completed lines'."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: BatchUsage


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BadWindow(ValueError):
    """A completion window that is not a duration up to 7 days."""


class NotCancellable(Exception):
    """The batch already ended."""


def window_seconds(window: str) -> int:
    """`24h`, `90m`, `7d`, `3600s`: a duration of at most 7 days."""
    match = _WINDOW.match(window)
    if not match:
        raise BadWindow("completion_window must be a duration like '24h', '90m' or '7d'")
    seconds = int(match[1]) * _UNIT[match[2]]
    if seconds > MAX_WINDOW:
        raise BadWindow("completion_window can be at most 7 days ('7d')")
    return seconds


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output (`output`) or error (`errors`) file."""
    return f"file-{batch_id}-{kind}"


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def listed_errors(errors: list[LineError]) -> dict[str, Any]:
    """OpenAI's `errors`: the first MAX_LISTED_ERRORS bad lines, then how many more."""
    data = [error.as_json() for error in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        more = len(errors) - MAX_LISTED_ERRORS
        message = f"{more} more bad lines, not listed (the first {MAX_LISTED_ERRORS} are)"
        data.append({"code": "too_many_errors", "message": message, "param": None, "line": None})
    return {"object": "list", "data": data}


def to_batch(fields: dict[str, str]) -> Batch:
    counts = {name: int(fields.get(name, "0")) for name in COUNTS if name != "done"}
    data: dict[str, Any] = {
        name: fields[name]
        for name in ("id", "endpoint", "input_file_id", "completion_window", "status")
    }
    for name in (*_TIMES, *_TIMES_TOO):
        if fields.get(name):
            data[name] = int(float(fields[name]))
    for name in ("metadata", "errors"):
        if name in fields:
            data[name] = json.loads(fields[name])
    if data["status"] != "failed":
        data["output_file_id"] = output_file_id(fields["id"], "output")
    if data["status"] != "failed" and not _ended_without_errors(data["status"], counts):
        data["error_file_id"] = output_file_id(fields["id"], "errors")
    data["request_counts"] = counts
    data["usage"] = batch_usage(fields)
    return Batch.model_validate(data)


def _ended_without_errors(status: str, counts: dict[str, int]) -> bool:
    """An ended batch none of whose lines failed, was cancelled or expired has no error file:
    OpenAI's `error_file_id` is then null. A running batch keeps the id, to read as it grows."""
    ended = status in ("completed", "cancelled", "expired")
    return ended and not (counts["failed"] or counts["cancelled"] or counts["expired"])
