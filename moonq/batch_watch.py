"""Following a running batch: its progress events (SSE) drive a progress bar and the results
file; when the stream breaks off for good, polling the batch takes over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from moonq.batch_client import Client, CliError, ExitCode, StreamDropped
from moonq.batch_results import TERMINAL, Results, from_job, from_output

JSON = dict[str, Any]
RECONNECTS = 3  # tries of the event stream (from the last event seen) before polling
RECONNECT_AFTER = 0.5  # seconds
POLL_EVERY = 1.0  # seconds between polls, once the event stream is given up


def unfinished(counts: JSON) -> int:
    """Lines over without an answer: failed, and (moonq counts them apart) cancelled, expired."""
    return sum(int(counts.get(name) or 0) for name in ("failed", "cancelled", "expired"))


class View:
    """The progress bar: done, failed, total, tokens and the time left."""

    def __init__(self, console: Console, total: int, label: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.total} done"),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[tokens]:,} tokens"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(label, total=total, done=0, failed=0, tokens=0)

    def __enter__(self) -> View:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def show(self, counts: JSON, tokens: int) -> None:
        done, failed = int(counts.get("completed") or 0), unfinished(counts)
        total = counts.get("total") or self.progress.tasks[0].total
        self.progress.update(
            self.task, completed=done + failed, total=total, done=done, failed=failed, tokens=tokens
        )


def jsonl(chunks: Iterator[bytes]) -> Iterator[JSON]:
    """Objects from a JSONL byte stream, as its lines arrive; blank or broken lines skipped."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from _objects(lines)
    yield from _objects([pending])


def _objects(lines: list[bytes]) -> Iterator[JSON]:
    for line in lines:
        try:
            value = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


class Tracker:
    """Writes each finished line of one batch to the results file, once, and shows progress."""

    def __init__(
        self, client: Client, results: Results, batch_id: str, paths: dict[str, str], view: View
    ) -> None:
        self.client = client
        self.results = results
        self.batch_id = batch_id
        self.paths = paths
        self.view = view
        self.tokens = 0

    def add(self, entry: JSON) -> None:
        if self.results.has(self.batch_id, entry["custom_id"]):
            return
        self.results.append(entry)
        self.tokens += int((entry.get("usage") or {}).get("total_tokens") or 0)

    def line(self, data: JSON) -> None:
        """A `line` event: the job it names holds the answer."""
        custom_id = data.get("custom_id")
        if isinstance(custom_id, str) and not self.results.has(self.batch_id, custom_id):
            job = self.client.job(data["job_id"])
            if job.get("status") in ("completed", "failed", "cancelled"):
                path = self.paths.get(custom_id, "")
                self.add(from_job(job, custom_id, path, self.batch_id))
        self.view.show(data.get("request_counts") or {}, self.tokens)

    def sync(self, batch: JSON) -> None:
        """Every line the output and error files hold that is not written yet."""
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            with self.client.file_stream(file_id) as chunks:
                for line in jsonl(chunks):
                    custom_id = line.get("custom_id")
                    if isinstance(custom_id, str):
                        path = self.paths.get(custom_id, "")
                        self.add(from_output(line, path, self.batch_id))
        self.view.show(batch.get("request_counts") or {}, self.tokens)


def follow(tracker: Tracker) -> JSON | None:
    """Follow the event stream to its `done` event (the final batch); None when it would not
    stay up, or the server has no stream."""
    after = 0
    for _ in range(RECONNECTS):
        try:
            for event in tracker.client.events(tracker.batch_id, after):
                after = int(event.get("seq") or after)
                if event.get("event") == "line":
                    tracker.line(event.get("data") or {})
                elif event.get("event") == "done":
                    done: JSON = event.get("data") or tracker.client.batch(tracker.batch_id)
                    return done
        except StreamDropped:
            pass
        except CliError as exc:
            if exc.code != ExitCode.NOT_FOUND:
                raise
            return None
        time.sleep(RECONNECT_AFTER)
    return None


def poll(tracker: Tracker) -> JSON:
    """Ask for the batch until it is over, reading the output files whenever lines finished."""
    finished = -1
    while True:
        batch = tracker.client.batch(tracker.batch_id)
        counts = batch.get("request_counts") or {}
        now = int(counts.get("completed") or 0) + unfinished(counts)
        if now != finished:
            tracker.sync(batch)
            finished = now
        tracker.view.show(counts, tracker.tokens)
        if batch.get("status") in TERMINAL:
            return batch
        time.sleep(POLL_EVERY)


def watch(tracker: Tracker) -> JSON:
    """Follow the batch to its end; the final batch, with every line written."""
    final = follow(tracker) or poll(tracker)
    tracker.sync(final)  # whatever the events did not bring: a line missed, a job expired
    return final
