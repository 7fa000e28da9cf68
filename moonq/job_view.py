"""How jobs look in a terminal: an answer as it streams, a job, the jobs and usage tables.

Strings the server hands on (custom_id, error messages) are shown `printable`: an escape
sequence in them cannot recolour or retitle the terminal. JSON is written ASCII-escaped, so it
can be written to any stdout, whatever its encoding.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, TextIO

from pydantic import BaseModel
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from moonq.client_errors import one_line, printable
from moonq.client_events import Event
from moonq.models import Job
from moonq.usage_models import UsageCounts, UsageReport


def as_json(value: BaseModel | list[Any] | dict[str, Any], indent: int | None = None) -> str:
    """`value` as ASCII-escaped JSON (compact without `indent`)."""
    found = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(found, indent=indent, separators=separators)


def print_json(value: BaseModel | list[Any]) -> None:
    print(as_json(value, indent=2))


def when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def tokens(usage: dict[str, Any] | None) -> str:
    if not usage:
        return "-"
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    total = usage.get("total_tokens") or prompt + completion
    return f"{total:,} ({prompt:,} prompt + {completion:,} completion)"


class Tokens:
    """Content on stdout; reasoning (dimmed on a terminal), notes and the usage on stderr, so
    stdout holds the answer alone. On a terminal content is written as it arrives (a retry's
    notice says the text above starts over); elsewhere (a file, a pipe) each attempt's content
    is held back and only the last one's is written, at the end: a retried attempt's text
    cannot be taken back once written."""

    def __init__(self, job_id: str, out: TextIO, err: TextIO) -> None:
        self.job_id, self.out, self.err = job_id, out, err
        self.live = out.isatty()
        self.dim = err.isatty()
        self.held: list[str] = []  # this attempt's content, until the end (not live)
        self.reasoning = False  # reasoning written since the last content
        self.trimmed = False  # some of this attempt's chunks were gone from the job's log

    def show(self, event: Event) -> None:
        if event.event == "retry":
            self._retry(event.data if isinstance(event.data, dict) else {})
            return
        if event.event == "trimmed":
            self._trimmed(event.data if isinstance(event.data, dict) else {})
            return
        delta = event.delta
        reasoning, content = delta.get("reasoning_content"), delta.get("content")
        if isinstance(reasoning, str) and reasoning:
            self.err.write(f"\x1b[2m{reasoning}\x1b[0m" if self.dim else reasoning)
            self.err.flush()
            self.reasoning = True
        if isinstance(content, str) and content:
            if self.reasoning:
                self.err.write("\n")
                self.reasoning = False
            self._write(content)

    def _write(self, content: str) -> None:
        if not self.live:
            self.held.append(content)
            return
        self.out.write(content)
        self.out.flush()

    def _trimmed(self, data: dict[str, Any]) -> None:
        """Events the log no longer has: the text shown so far misses theirs. Held output is
        replaced at the end by the job's result, which is whole; a terminal is told."""
        self.trimmed = True
        gone = f"events {data.get('first_seq', '?')} to {data.get('last_seq', '?')}"
        if self.live:
            self.out.write("\n")
            self.out.flush()
            where = f"the whole answer: moonq status {self.job_id}"
            print(f"moonq: {gone} are no longer in the job's log ({where})", file=self.err)

    def _retry(self, data: dict[str, Any]) -> None:
        self.held.clear()
        self.trimmed = False
        if self.live:
            self.out.write("\n")
            self.out.flush()
        attempt, why = data.get("attempt", "?"), one_line(str(data.get("reason")))
        print(f"moonq: attempt {attempt} starts over ({why})", file=self.err)

    def end(self, event: str, data: Any) -> bool:
        """Finish the output after the job's last event; whether the job completed."""
        data = data if isinstance(data, dict) else {}
        if self.trimmed and not self.live:  # the chunks were not all there
            if event == "done":
                self.held = [_answer(data) or ""]  # the result is whole
            else:  # a failed or cancelled job's text would lack its start: none is written
                self.held = []
                where = f"what the job kept: moonq status {self.job_id}"
                print(
                    f"moonq: the answer's start is no longer in the job's log ({where})",
                    file=self.err,
                )
        self.out.write("".join(self.held) + "\n")
        self.out.flush()
        self.held.clear()
        if event == "done":
            print(f"usage: {tokens(data.get('usage'))} tokens", file=self.err)
            return True
        if event == "error":
            kind, message = data.get("type", "error"), data.get("message", "")
            failed = one_line(f"{kind}: {message}")
            print(f"moonq: job {self.job_id} failed: {failed}", file=self.err)
        else:
            print(f"moonq: job {self.job_id} was cancelled", file=self.err)
        return False


class Lines:
    """Each event as one line of JSON."""

    def show(self, event: Event) -> None:
        print(as_json(event.model_dump(mode="json", exclude_none=True)), flush=True)

    def end(self, event: str, data: Any) -> bool:
        return event == "done"


def describe(job: Job) -> list[str]:
    """The job as `moonq status` shows it; the server's strings made printable, the answer
    (after a blank line) as it is."""
    lines = [f"{job.id}: {job.status.value}", f"model: {job.model}"]
    if job.custom_id is not None:
        lines.append(f"custom_id: {job.custom_id}")
    if job.batch_id is not None:
        lines.append(f"batch: {job.batch_id}")
    lines += [f"attempts: {job.attempts}", f"created: {when(job.created_at)}"]
    lines += [f"started: {when(job.started_at)}", f"ended: {when(job.completed_at)}"]
    lines.append(f"tokens: {tokens(job.usage)}")
    if job.waiting_reason:
        lines.append(f"waiting: {job.waiting_reason}")
    if job.error is not None:
        lines.append(f"error: {job.error.type}: {job.error.message}")
    lines = [one_line(line) for line in lines]
    content = _content(job)
    return [*lines, "", content] if content else lines


def _content(job: Job) -> str | None:
    return _answer(job.result or {})


def _answer(completion: dict[str, Any]) -> str | None:
    """A chat.completion's first choice's content."""
    choices = completion.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else {}
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) and content else None


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(title=f"{len(jobs)} job(s), newest first")
    for name in ("id", "status", "model", "custom_id", "created (UTC)", "tokens"):
        table.add_column(name, justify="right" if name == "tokens" else "left")
    for job in jobs:
        total = (job.usage or {}).get("total_tokens")
        tokens = f"{total:,}" if isinstance(total, int) else "-"
        created = dt.datetime.fromtimestamp(job.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        cells = (job.id, job.status.value, job.model, job.custom_id or "-")
        table.add_row(*(printable(cell) for cell in cells), created, tokens)
    return table


def _cost(counts: UsageCounts) -> str:
    return "-" if counts.cost is None else f"{counts.cost:,.6f}"


def usage_table(report: UsageReport) -> Table:
    table = Table(title=f"usage {report.start} to {report.end} (UTC), cost in {report.currency}")
    table.add_column("day")
    table.add_column("model")
    for name in ("jobs", "prompt", "completion", "total tokens", "cost"):
        table.add_column(name, justify="right")

    def row(day: str, model: str, counts: UsageCounts) -> None:
        numbers = (counts.jobs, counts.prompt_tokens, counts.completion_tokens)
        table.add_row(
            day,
            printable(model),
            *(f"{n:,}" for n in numbers),
            f"{counts.total_tokens:,}",
            _cost(counts),
        )

    for line in report.data:
        row(line.day, line.model, line)
    table.add_section()
    for model in report.by_model:
        row("all days", model.model, model)
    row("total", "", report.total)
    return table


class Terminal(Console):
    """rich's Console, but a stdout whose reader has gone (`| head`) raises BrokenPipeError,
    as `print` does, for the command to end on, where rich would exit with 1 by itself."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def print_table(table: Table) -> None:
    """The table at its natural width, however narrow the terminal: no id is ever cut short
    (a narrow terminal wraps the lines instead)."""
    console = Terminal(markup=False, highlight=False, soft_wrap=True)
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    console.width = max(console.width, needed)
    console.print(table)
