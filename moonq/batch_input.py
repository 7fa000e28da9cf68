"""A batch's input file, line by line: OpenAI's batch format checked the way OpenAI checks it,
with every bad line named by its number, and the good ones turned into job requests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from moonq.budgets import budget_completion
from moonq.file_lines import LongLine
from moonq.limits import completion_budget, estimate_tokens
from moonq.models import ChatRequest, json_problem

ENDPOINT = "/v1/chat/completions"
MAX_CUSTOM_ID = 512
# The input file's lines, as `FileStore.lines(max_line=)` yields them.
RawLines = AsyncIterator[tuple[int, bytes | LongLine]]


@dataclass(frozen=True)
class LineError:
    """One entry of OpenAI's `errors.data`."""

    line: int
    code: str
    message: str
    param: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class Line:
    """A valid request of the batch."""

    number: int
    custom_id: str
    body: dict[str, Any]
    model: str
    estimate: int


@dataclass
class Limits:
    max_lines: int
    max_line_bytes: int
    tpm: int  # 0 = off


@dataclass
class Report:
    """What a pass over the whole file found: its request count and every bad line."""

    lines: int = 0
    errors: list[LineError] = field(default_factory=list)
    # Estimated (prompt, completion budget) tokens by model, for budgets (moonq/budgets.py).
    demand: dict[str, list[int]] = field(default_factory=dict)

    def add_demand(self, line: Line) -> None:
        counts = self.demand.setdefault(line.model[:256], [0, 0])
        counts[0] += line.estimate - completion_budget(line.body)
        counts[1] += budget_completion(line.body)

    @property
    def tokens(self) -> int:
        return sum(prompt + completion for prompt, completion in self.demand.values())


class TooManyLines(Exception):
    """The file holds more requests than MOONQ_BATCH_MAX_LINES."""


def parse_line(number: int, raw: bytes | LongLine, limits: Limits) -> Line | LineError:
    """One line of the input file: a request, or what is wrong with it."""
    size = raw.size if isinstance(raw, LongLine) else len(raw)
    if isinstance(raw, LongLine) or size > limits.max_line_bytes:
        return LineError(
            number,
            "line_too_large",
            f"the line is {size} bytes, more than MOONQ_MAX_BODY_BYTES ({limits.max_line_bytes})",
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return LineError(number, "invalid_json", f"not valid JSON: {_short(str(exc))}")
    if not isinstance(data, dict):
        return LineError(number, "invalid_request", "a line must be a JSON object")
    problem = json_problem(data)
    if problem is not None:
        return LineError(number, "invalid_json", f"{problem[0] or 'the line'}: {problem[1]}")
    return _request(number, data, limits)


def _request(number: int, data: dict[str, Any], limits: Limits) -> Line | LineError:
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_custom_id", "custom_id must be a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        return LineError(
            number, "invalid_custom_id", f"custom_id is longer than {MAX_CUSTOM_ID} characters"
        )
    if data.get("method") != "POST":
        return LineError(number, "invalid_method", "method must be 'POST'", "method")
    if data.get("url") != ENDPOINT:
        return LineError(number, "invalid_url", f"url must be '{ENDPOINT}'", "url")
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        return LineError(number, "invalid_request", f"unknown field {unknown[0]!r}", unknown[0])
    try:
        body = ChatRequest.model_validate(data.get("body"))
    except ValidationError as exc:
        return LineError(number, "invalid_body", _body_error(exc), "body")
    request = body.upstream_body()
    estimate = estimate_tokens(request)
    if limits.tpm and estimate > limits.tpm:
        return LineError(
            number,
            "request_too_large",
            f"the request is estimated at {estimate} tokens, more than MOONQ_UPSTREAM_TPM "
            f"({limits.tpm} tokens per minute) allows: it could never run",
            "body",
        )
    return Line(number, custom_id, request, body.model, estimate)


def _body_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "missing":
        return f"body.{where} is required"
    if first["type"] == "model_type":
        return "body must be a chat completion request object (with model and messages)"
    return f"body.{where}: {_short(first['msg'])}"


def _blank(raw: bytes | LongLine) -> bool:
    return not isinstance(raw, LongLine) and not raw.strip()


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


async def check(lines: RawLines, limits: Limits) -> Report:
    """A first pass over the whole file, keeping only custom_ids and errors (not requests).

    Raises `TooManyLines` as soon as the count passes the limit.
    """
    report = Report()
    seen: dict[str, int] = {}
    async for number, raw in lines:
        if _blank(raw):
            continue  # blank lines are not requests
        report.lines += 1
        if report.lines > limits.max_lines:
            raise TooManyLines(report.lines)
        parsed = parse_line(number, raw, limits)
        if isinstance(parsed, LineError):
            report.errors.append(parsed)
        elif parsed.custom_id in seen:
            first = seen[parsed.custom_id]
            message = f"custom_id {_short(parsed.custom_id, 64)!r} repeats line {first}'s"
            report.errors.append(LineError(number, "duplicate_custom_id", message, "custom_id"))
        else:
            seen[parsed.custom_id] = number
            report.add_demand(parsed)
    if report.lines == 0:
        report.errors.append(LineError(0, "empty_file", "the file holds no requests"))
    return report


async def requests(lines: RawLines, limits: Limits) -> AsyncIterator[Line]:
    """The second pass, once `check` found nothing wrong: each request, in order."""
    async for number, raw in lines:
        if not _blank(raw):
            parsed = parse_line(number, raw, limits)
            if isinstance(parsed, Line):
                yield parsed
